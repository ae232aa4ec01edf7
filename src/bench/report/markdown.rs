//! The README's performance section, rendered from a run's JSON: the README holds it
//! between [`BEGIN`] and [`END`], and `tests/bench.rs` checks it matches the committed run
//! (`src/bench/readme-run.json`).

use std::fmt::Write;

use crate::bench::compare::{number, times};
use crate::bench::model::{Report, Status};

/// The line that opens the generated section in README.md.
pub const BEGIN: &str = "<!-- snapvmm bench: begin (generated, do not edit) -->";
/// The line that closes it.
pub const END: &str = "<!-- snapvmm bench: end -->";

/// Renders the section, markers included.
pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let m = &report.machine;
    let _ = writeln!(
        md,
        "One {} run of `snapvmm bench` (snapvmm {}, {:.0} s) on {}, {} cores, {} MiB RAM, \
         Linux {}, KVM {}; files on {}.\n",
        if report.quick { "`--quick`" } else { "full" },
        report.snapvmm_version,
        report.seconds,
        m.cpu,
        m.cores,
        m.memory_mib,
        m.kernel,
        m.kvm,
        m.filesystem
    );
    let _ = writeln!(
        md,
        "| figure | tool | n | p50 | p99 | max | unit |\n|---|---|---:|---:|---:|---:|---|"
    );
    for f in &report.figures {
        match (f.status, f.summary) {
            (Status::Measured, Some(s)) => {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    cell(&f.label),
                    cell(&f.tool),
                    s.n,
                    number(s.p50),
                    number(s.p99),
                    number(s.max),
                    f.unit
                );
            }
            (status, _) => {
                let _ = writeln!(
                    md,
                    "| {} | {} | | {} | | | |",
                    cell(&f.label),
                    cell(&f.tool),
                    status.text()
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nSide by side, ratio of medians (> 1.00x: snapvmm ahead):\n\n\
         | what | peer | ratio |\n|---|---|---:|"
    );
    for c in &report.comparisons {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            cell(&c.what),
            cell(&c.peer),
            c.ratio.map_or_else(|| "not measured".to_string(), times)
        );
    }
    let _ = writeln!(
        md,
        "\nGoals still open:\n\n| figure | now | target | met |\n|---|---|---|---|"
    );
    for g in &report.gaps {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {met} |",
            cell(&g.figure),
            cell(&g.now),
            cell(&g.target)
        );
    }
    let _ = writeln!(md, "{END}");
    md
}

/// A table cell: no `|`, no line break.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}
