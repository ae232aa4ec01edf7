//! The benchmark's results as data: what `--json` writes and every report renders from.

use serde::{Deserialize, Serialize};

use super::machine::Machine;
use super::stats::Summary;

/// Version of the JSON layout; bumped when a field changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// One whole run of `snapvmm bench`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// The snapvmm version that measured.
    pub snapvmm_version: String,
    /// Start of the run, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
    /// Whether it was a `--quick` run (fewer samples, smaller sizes).
    pub quick: bool,
    /// Guest memory sizes of the checkpoint figures, in MiB.
    pub memory_mib: Vec<u64>,
    /// Where it ran.
    pub machine: Machine,
    /// Every figure, measured or not.
    pub figures: Vec<Figure>,
    /// snapvmm against a peer, as ratios.
    pub comparisons: Vec<Comparison>,
    /// The open performance goals, with this run's value.
    pub gaps: Vec<Gap>,
}

impl Report {
    /// The figure with this id.
    pub fn figure(&self, id: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.id == id)
    }
}

/// What became of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Samples were taken.
    Measured,
    /// The tool it needs is not on this machine.
    NotInstalled,
    /// Not run (the note says why: `--quick`, no kernel image, not landed...).
    Skipped,
    /// The measurement failed (the note holds the error).
    Failed,
}

impl Status {
    /// How the tables print it.
    pub fn text(self) -> &'static str {
        match self {
            Status::Measured => "measured",
            Status::NotInstalled => "not installed",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
        }
    }
}

/// One measured quantity: its samples and what they mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// Stable identifier (`switch.host.1x1GiB`), what comparisons and gaps refer to.
    pub id: String,
    /// Family heading (`Live overlay switch`).
    pub family: String,
    /// Short label for tables and plots.
    pub label: String,
    /// What was measured, and how.
    pub what: String,
    /// Who did the work: `snapvmm`, `qemu-img`, `qemu-storage-daemon`, `QEMU (TCG)`...
    pub tool: String,
    /// Unit of every sample (`ms`, `us`, `MiB/s`).
    pub unit: String,
    /// Whether a larger value is better (throughput) or worse (latency).
    pub higher_is_better: bool,
    /// Parameter for plots against size (guest memory in MiB), when there is one.
    pub param: Option<f64>,
    /// What became of it.
    pub status: Status,
    /// Why it was not measured, or a remark on the method.
    pub note: String,
    /// The summary of `samples`.
    pub summary: Option<Summary>,
    /// Every sample, in the order taken.
    pub samples: Vec<f64>,
}

impl Figure {
    /// The figure's headline value: the median.
    pub fn median(&self) -> Option<f64> {
        self.summary.map(|s| s.p50)
    }
}

/// snapvmm against a peer on the same work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// What both did.
    pub what: String,
    /// Id of snapvmm's figure.
    pub ours: String,
    /// Id of the peer's figure.
    pub theirs: String,
    /// The peer's tool.
    pub peer: String,
    /// How many times better snapvmm is, on medians (> 1: snapvmm ahead; for times the
    /// peer's over ours, for throughput ours over the peer's). None when either is missing.
    pub ratio: Option<f64>,
}

/// An open performance goal and where this run puts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gap {
    /// The goal's figure, as the issue words it.
    pub figure: String,
    /// This run's value (text with unit or ratio), or why it has none.
    pub now: String,
    /// The target.
    pub target: String,
    /// Whether this run meets it; None when not measured.
    pub met: Option<bool>,
}

impl Figure {
    /// A figure not measured yet: status [`Status::Skipped`] until a result is recorded.
    pub fn new(id: &str, family: &str, label: &str, tool: &str, unit: &str) -> Figure {
        Figure {
            id: id.into(),
            family: family.into(),
            label: label.into(),
            what: String::new(),
            tool: tool.into(),
            unit: unit.into(),
            higher_is_better: false,
            param: None,
            status: Status::Skipped,
            note: String::new(),
            summary: None,
            samples: Vec::new(),
        }
    }

    /// Sets what was measured and how.
    pub fn what(mut self, what: impl Into<String>) -> Figure {
        self.what = what.into();
        self
    }

    /// Marks a throughput: larger is better.
    pub fn higher_is_better(mut self) -> Figure {
        self.higher_is_better = true;
        self
    }

    /// Sets the remark on the method (kept when samples are recorded).
    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    /// Sets the plot parameter (guest memory in MiB).
    pub fn param(mut self, value: f64) -> Figure {
        self.param = Some(value);
        self
    }
}
