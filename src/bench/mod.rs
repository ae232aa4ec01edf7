//! `snapvmm bench`: the snapshot-latency benchmark a user runs on their own machine.
//!
//! ```text
//! snapvmm bench [--dir DIR] [--memory 128M,1G] [--quick] [--json FILE] [--html FILE]
//!               [--markdown FILE] [--firecracker PATH] [--from-json FILE]
//! ```
//!
//! Everything runs from this binary: micro-guest VMs in this process on the `vmm` library,
//! `snapvmm img` verbs as child processes of [`std::env::current_exe`] (so they compare
//! with qemu-img process for process), and the peers (qemu-img, qemu-storage-daemon,
//! QEMU-TCG) side by side when they are installed ("not installed" otherwise). Each family
//! of measurements is one module; `report/` renders the results (table as it goes, JSON,
//! HTML with SVG plots, the README's Markdown table). `--from-json` renders the reports of
//! an earlier run without measuring anything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

mod checkpoint;
mod clones;
mod compare;
mod counter_guest;
mod cow;
mod firecracker;
mod guest_stall;
mod images;
mod internal;
mod jobs;
mod load;
mod machine;
mod micro_guest;
mod model;
mod process;
mod qemu_live;
mod qmp;
mod qsd;
mod report;
mod seccomp;
mod stats;
mod switch;
mod tools;
mod vhost;

use model::{Figure, Report, Status};
use stats::Summary;
use tools::Tools;

/// Arguments of `snapvmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measure on this directory's filesystem (a temporary directory is made inside it and
    /// removed at the end) [default: the system temporary directory].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Guest memory sizes of the checkpoint figures, comma-separated (qemu-img suffixes)
    /// [default: 128M,1G; with --quick 128M].
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_memory)]
    memory: Vec<u64>,
    /// Few samples and small sizes: under a minute on a small machine.
    #[arg(long)]
    quick: bool,
    /// Write every figure's samples and summary as JSON to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG plots to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Write the README's performance table (Markdown) to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Run only these families, comma-separated: switch, guest-stall, jobs, internal, cow,
    /// checkpoint, qemu-live, vhost, clones, firecracker, seccomp [default: all].
    #[arg(long, value_name = "FAMILIES", value_delimiter = ',', value_parser = family_name)]
    only: Vec<String>,
    /// Also measure Firecracker's snapshot create and load with this Firecracker binary,
    /// beside snapvmm's checkpoint save and whole-process restore.
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// Measure nothing: render the reports (--json, --html, --markdown) of an earlier run's
    /// JSON.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["dir", "memory", "quick", "firecracker", "only"])]
    from_json: Option<PathBuf>,
}

/// `128M` -> 128 (MiB), at least 32 MiB (the micro-guest's floor) and at most 64 GiB.
fn parse_memory(text: &str) -> Result<u64, String> {
    let bytes = crate::img::parse_size_arg(text)?;
    let mib = bytes >> 20;
    if bytes % (1 << 20) != 0 || !(32..=64 << 10).contains(&mib) {
        return Err(format!(
            "{text}: a guest memory size is whole MiB from 32M to 64G"
        ));
    }
    Ok(mib)
}

/// The state of a run: where it works, what it found, what it measured so far.
pub struct Bench {
    /// Working directory (inside --dir), removed at the end.
    pub dir: PathBuf,
    /// `--quick`.
    pub quick: bool,
    /// Guest memory sizes, MiB.
    pub memory_mib: Vec<u64>,
    /// This binary, for `snapvmm img` child processes.
    pub exe: PathBuf,
    /// The peers found.
    pub tools: Tools,
    /// `--firecracker`.
    pub firecracker: Option<PathBuf>,
    /// Every figure so far.
    pub figures: Vec<Figure>,
    progress: ProgressBar,
    /// Whether stdout carries a report (`--json -`), so the table goes to stderr.
    stdout_taken: bool,
}

impl Bench {
    /// `quick` samples with --quick, else `full`.
    pub fn samples(&self, quick: usize, full: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// Shows what is being measured now.
    pub fn step(&self, message: impl Into<String>) {
        self.progress.set_message(message.into());
    }

    /// Records `figure` with `result` (its samples, or why there are none) and prints its
    /// table row.
    pub fn record(&mut self, mut figure: Figure, result: Result<Vec<f64>, String>) {
        match result {
            Ok(samples) => match Summary::of(&samples) {
                Some(summary) => {
                    figure.status = Status::Measured;
                    figure.summary = Some(summary);
                    figure.samples = samples;
                }
                None => {
                    figure.status = Status::Failed;
                    figure.note = "no valid sample".into();
                }
            },
            Err(error) => {
                figure.status = Status::Failed;
                figure.note = error;
            }
        }
        self.push(figure);
    }

    /// Records `figure` as not measured, with `status` and the reason.
    pub fn unmeasured(&mut self, mut figure: Figure, status: Status, note: impl Into<String>) {
        figure.status = status;
        figure.note = note.into();
        self.push(figure);
    }

    fn push(&mut self, figure: Figure) {
        self.say(&report::table::row(&figure));
        self.figures.push(figure);
    }

    /// Prints a line of the table: above the progress bar on a terminal, else plainly
    /// (indicatif draws nothing, and prints nothing, without one).
    fn say(&self, line: &str) {
        if !self.progress.is_hidden() {
            self.progress.println(line);
        } else if self.stdout_taken {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// One family of measurements: its `--only` name, what it measures, and its function.
type Family = (&'static str, &'static str, fn(&mut Bench));

/// The families, in the order they run.
const FAMILIES: [Family; 11] = [
    ("switch", "live overlay switch (host)", switch::run),
    (
        "guest-stall",
        "live overlay switch (guest)",
        guest_stall::run,
    ),
    ("jobs", "stream and commit", jobs::run),
    ("internal", "internal snapshots", internal::run),
    ("cow", "4K copy-on-write writes", cow::run),
    ("checkpoint", "checkpoints", checkpoint::run),
    ("qemu-live", "QEMU live snapshot", qemu_live::run),
    ("vhost", "vhost-user-blk vs qemu-storage-daemon", vhost::run),
    ("clones", "clones", clones::run),
    ("firecracker", "Firecracker snapshots", firecracker::run),
    ("seccomp", "seccomp filters on and off", seccomp::run),
];

/// The `--only` names.
fn family_name(text: &str) -> Result<String, String> {
    match FAMILIES.iter().find(|(name, _, _)| *name == text) {
        Some(_) => Ok(text.to_string()),
        None => Err(format!(
            "{text}: no such family (one of: {})",
            FAMILIES.map(|f| f.0).join(", ")
        )),
    }
}

/// Runs `snapvmm bench`; returns the process exit status.
pub fn main(args: BenchArgs) -> u8 {
    let result = match &args.from_json {
        Some(path) => std::fs::read(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|bytes| {
                serde_json::from_slice::<Report>(&bytes)
                    .map_err(|e| format!("{}: not a snapvmm bench report: {e}", path.display()))
            })
            .map(|mut report| {
                // The figures are the data; ratios and goals follow this build's rules.
                report.comparisons = compare::comparisons(&report);
                report.gaps = compare::gaps(&report);
                report
            }),
        None => measure(&args),
    };
    let written = result.and_then(|report| write_reports(&args, &report));
    match written {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("snapvmm bench: error: {message}");
            1
        }
    }
}

/// Takes every measurement; returns the report.
fn measure(args: &BenchArgs) -> Result<Report, String> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let parent = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
            dir.clone()
        }
        None => std::env::temp_dir(),
    };
    let work = tempfile::Builder::new()
        .prefix("snapvmm-bench.")
        .tempdir_in(&parent)
        .map_err(|e| format!("creating a directory in {}: {e}", parent.display()))?;
    // The largest family keeps about this much on disk at once (the job chains, the COW
    // base and its overlay, a 1 GiB checkpoint).
    let needed: u64 = if args.quick { 1 << 30 } else { 4 << 30 };
    let free = free_bytes(work.path())?;
    if free < needed {
        return Err(format!(
            "{} has {} MiB free; the benchmark needs about {} MiB there (--dir elsewhere?)",
            parent.display(),
            free >> 20,
            needed >> 20
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let memory_mib = match (&args.memory[..], args.quick) {
        ([], true) => vec![128],
        ([], false) => vec![128, 1024],
        (sizes, _) => sizes.to_vec(),
    };
    let tools = Tools::find();
    let machine = machine::describe(&parent, tools.versions(args.firecracker.as_deref()));

    let stdout_taken = args.json.as_deref() == Some(Path::new("-"))
        || args.markdown.as_deref() == Some(Path::new("-"));
    let progress = if stdout_taken {
        // stdout carries the report: the table and the bar go to stderr only.
        ProgressBar::with_draw_target(
            Some(FAMILIES.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        )
    } else {
        ProgressBar::new(FAMILIES.len() as u64)
    };
    progress.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    let mut bench = Bench {
        dir: work.path().to_path_buf(),
        quick: args.quick,
        memory_mib: memory_mib.clone(),
        exe,
        tools,
        firecracker: args.firecracker.clone(),
        figures: Vec::new(),
        progress: progress.clone(),
        stdout_taken,
    };
    bench.say(&format!("machine: {}", machine.one_line()));
    bench.say(&report::table::header());
    let families: Vec<&Family> = FAMILIES
        .iter()
        .filter(|(name, _, _)| args.only.is_empty() || args.only.iter().any(|o| o == name))
        .collect();
    progress.set_length(families.len() as u64);
    for (_, what, run) in families {
        bench.step(*what);
        run(&mut bench);
        progress.inc(1);
    }
    progress.finish_and_clear();

    let mut report = Report {
        format: model::FORMAT_VERSION,
        snapvmm_version: env!("CARGO_PKG_VERSION").into(),
        started_unix,
        seconds: started.elapsed().as_secs_f64(),
        quick: args.quick,
        memory_mib,
        machine,
        figures: bench.figures,
        comparisons: Vec::new(),
        gaps: Vec::new(),
    };
    report.comparisons = compare::comparisons(&report);
    report.gaps = compare::gaps(&report);
    let summary = report::table::comparisons(&report);
    if stdout_taken {
        eprint!("{summary}");
    } else {
        print!("{summary}");
    }
    Ok(report)
}

/// Bytes an unprivileged user may still write on `dir`'s filesystem.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", dir.display()))?;
    // SAFETY: statvfs is plain old data, valid zeroed; it is only read after the call
    // filled it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(format!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Writes the reports asked for.
fn write_reports(args: &BenchArgs, report: &Report) -> Result<(), String> {
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| format!("encoding the JSON report: {e}"))?;
        write_out(path, &(text + "\n"))?;
    }
    if let Some(path) = &args.html {
        write_out(path, &report::html::render(report))?;
    }
    if let Some(path) = &args.markdown {
        write_out(path, &report::markdown::render(report))?;
    }
    Ok(())
}

/// Writes `text` to `path`, or stdout for `-`.
fn write_out(path: &Path, text: &str) -> Result<(), String> {
    if path == Path::new("-") {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to stdout: {e}"));
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}
