//! The console table, printed row by row as figures land, and the closing summary.

use std::fmt::Write;

use crate::bench::compare::{number, times};
use crate::bench::model::{Figure, Report, Status};

/// The column headings.
pub fn header() -> String {
    format!(
        "{:<44} {:<20} {:>4} {:>9} {:>9} {:>9}  {}",
        "figure", "tool", "n", "p50", "p99", "max", "unit"
    )
}

/// One figure's row: its summary, or its status and why.
pub fn row(figure: &Figure) -> String {
    let label = truncate(&figure.label, 44);
    let tool = truncate(&figure.tool, 20);
    match (figure.status, figure.summary) {
        (Status::Measured, Some(s)) => format!(
            "{label:<44} {tool:<20} {:>4} {:>9} {:>9} {:>9}  {}",
            s.n,
            number(s.p50),
            number(s.p99),
            number(s.max),
            figure.unit
        ),
        (status, _) => format!(
            "{label:<44} {tool:<20} {}: {}",
            status.text(),
            first_line(&figure.note)
        ),
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('~');
    out
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// The comparisons and goals, printed at the end of a run.
pub fn comparisons(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsnapvmm against its peers (medians; > 1.00x: snapvmm ahead)"
    );
    for c in &report.comparisons {
        let ratio = match c.ratio {
            Some(r) => times(r),
            None => format!("{} not measured", c.peer),
        };
        let _ = writeln!(
            out,
            "  {:<70} {:<20} {ratio}",
            truncate(&c.what, 70),
            c.peer
        );
    }
    let _ = writeln!(out, "\nperformance goals");
    for g in &report.gaps {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "-",
        };
        let _ = writeln!(
            out,
            "  {:<70} {:<8} now {} (target {})",
            truncate(&g.figure, 70),
            verdict,
            g.now,
            g.target
        );
    }
    let _ = writeln!(out, "total {:.1} s", report.seconds);
    out
}
