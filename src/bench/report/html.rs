//! The self-contained HTML report: machine, every figure, the comparisons and goals, and
//! SVG plots inlined (no script, no external file).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::plots::{self, Scale, Series};
use crate::bench::compare::{number, times};
use crate::bench::model::{Figure, Report, Status};

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;\
color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid \
#ccc;padding:3px 7px;text-align:left;vertical-align:top}td.n{text-align:right;\
font-variant-numeric:tabular-nums}figure{margin:2em 0}figcaption{font-size:90%;color:#444;\
max-width:760px}.met{color:#070}.unmet{color:#a00}.muted{color:#777}";

/// Renders the page.
pub fn render(report: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>snapvmm bench</title><style>{STYLE}</style></head><body>\n\
         <h1>snapvmm bench</h1>\n<p>snapvmm {} &middot; {} run &middot; {:.1} s &middot; \
         started at Unix time {}</p>\n",
        esc(&report.snapvmm_version),
        if report.quick { "--quick" } else { "full" },
        report.seconds,
        report.started_unix
    );
    machine(&mut h, report);
    results(&mut h, report);
    comparisons(&mut h, report);
    goals(&mut h, report);
    plots_section(&mut h, report);
    h.push_str("</body></html>\n");
    h
}

fn machine(h: &mut String, report: &Report) {
    let m = &report.machine;
    h.push_str("<h2 id=\"machine\">Machine</h2>\n<table>\n");
    let mut rows: Vec<(String, String)> = vec![
        ("CPU".into(), m.cpu.clone()),
        ("cores".into(), m.cores.to_string()),
        ("memory".into(), format!("{} MiB", m.memory_mib)),
        ("kernel".into(), m.kernel.clone()),
        ("KVM".into(), m.kvm.clone()),
        ("benchmark directory".into(), m.dir.clone()),
        ("filesystem".into(), m.filesystem.clone()),
    ];
    rows.extend(m.tools.iter().cloned());
    for (k, v) in &rows {
        let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table>\n");
}

fn results(h: &mut String, report: &Report) {
    h.push_str(
        "<h2 id=\"results\">Results</h2>\n<p>Every figure of the run: its samples' count, \
         median (p50), 99th percentile (nearest rank: the maximum below 100 samples) and \
         maximum.</p>\n<table>\n<tr><th>family</th><th>figure</th><th>tool</th><th>n</th>\
         <th>p50</th><th>p99</th><th>max</th><th>unit</th><th>what was measured</th></tr>\n",
    );
    for f in &report.figures {
        let cells = match (f.status, f.summary) {
            (Status::Measured, Some(s)) => format!(
                "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td>{}</td>",
                s.n,
                number(s.p50),
                number(s.p99),
                number(s.max),
                esc(&f.unit)
            ),
            (status, _) => format!(
                "<td colspan=\"5\" class=\"muted\">{}: {}</td>",
                status.text(),
                esc(&f.note)
            ),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td>{cells}<td>{}</td></tr>",
            esc(&f.family),
            esc(&f.label),
            esc(&f.tool),
            esc(&f.what)
        );
    }
    h.push_str("</table>\n");
}

fn comparisons(h: &mut String, report: &Report) {
    h.push_str(
        "<h2 id=\"comparisons\">Side by side</h2>\n<p>Ratios of medians, measured in the \
         same run: how many times faster snapvmm is (&gt; 1: snapvmm ahead).</p>\n<table>\n\
         <tr><th>what</th><th>snapvmm</th><th>peer</th><th>peer's</th><th>ratio</th></tr>\n",
    );
    for c in &report.comparisons {
        let show = |id: &str| {
            report
                .figure(id)
                .map(|f| match f.median() {
                    Some(v) if f.status == Status::Measured => format!("{} {}", number(v), f.unit),
                    _ => f.status.text().to_string(),
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            esc(&c.what),
            esc(&show(&c.ours)),
            esc(&c.peer),
            esc(&show(&c.theirs)),
            c.ratio.map_or_else(|| "&ndash;".to_string(), times)
        );
    }
    h.push_str("</table>\n");
}

fn goals(h: &mut String, report: &Report) {
    h.push_str(
        "<h2 id=\"goals\">Performance goals</h2>\n<table>\n<tr><th>figure</th><th>now</th>\
         <th>target</th><th></th></tr>\n",
    );
    for g in &report.gaps {
        let verdict = match g.met {
            Some(true) => "<span class=\"met\">met</span>",
            Some(false) => "<span class=\"unmet\">not met</span>",
            None => "<span class=\"muted\">&ndash;</span>",
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{verdict}</td></tr>",
            esc(&g.figure),
            esc(&g.now),
            esc(&g.target)
        );
    }
    h.push_str("</table>\n");
}

/// Appends one plot (or the reason it could not be drawn) with its caption.
fn figure(h: &mut String, svg: Result<String, String>, caption: &str) {
    h.push_str("<figure>\n");
    match svg {
        Ok(svg) => h.push_str(&svg),
        Err(e) => {
            let _ = write!(h, "<p class=\"unmet\">{}</p>", esc(&e));
        }
    }
    let _ = writeln!(h, "\n<figcaption>{}</figcaption>\n</figure>", esc(caption));
}

fn measured(f: &Figure) -> bool {
    f.status == Status::Measured && !f.samples.is_empty()
}

fn plots_section(h: &mut String, report: &Report) {
    let machine = report.machine.one_line();
    h.push_str("<h2 id=\"plots\">Plots</h2>\n");

    // Latency distributions: one plot per family and unit.
    let mut groups: BTreeMap<(String, String), Vec<&Figure>> = BTreeMap::new();
    for f in report
        .figures
        .iter()
        .filter(|f| measured(f) && !f.higher_is_better)
    {
        groups
            .entry((f.family.clone(), f.unit.clone()))
            .or_default()
            .push(f);
    }
    for ((family, unit), figures) in &groups {
        let series: Vec<Series> = figures
            .iter()
            .map(|f| {
                let mut sorted = f.samples.clone();
                sorted.sort_by(f64::total_cmp);
                let n = sorted.len() as f64;
                Series {
                    name: format!("{} ({})", f.label, f.tool),
                    points: sorted
                        .iter()
                        .enumerate()
                        .map(|(i, v)| ((i + 1) as f64 / n * 100.0, *v))
                        .collect(),
                }
            })
            .collect();
        let counts: Vec<String> = figures
            .iter()
            .map(|f| format!("{} ({}): {} samples", f.label, f.tool, f.samples.len()))
            .collect();
        let svg = plots::lines(
            &format!("{family}: latency distribution ({unit})"),
            "percentile (share of samples at or below)",
            unit,
            &series,
            Some(100.0),
            Scale::Log,
        );
        figure(
            h,
            svg,
            &format!(
                "{family}, latency distribution: each sample sorted, plotted at its \
                 percentile; unit {unit}, logarithmic axis. {}. Machine: {machine}.",
                counts.join("; ")
            ),
        );
    }

    // Throughput bars: one plot per unit, medians.
    let mut units: BTreeMap<String, Vec<&Figure>> = BTreeMap::new();
    for f in report
        .figures
        .iter()
        .filter(|f| measured(f) && f.higher_is_better)
    {
        units.entry(f.unit.clone()).or_default().push(f);
    }
    for (unit, figures) in &units {
        let bars: Vec<(String, f64)> = figures
            .iter()
            .filter_map(|f| Some((f.label.clone(), f.median()?)))
            .collect();
        let counts: Vec<String> = figures
            .iter()
            .map(|f| format!("{}: median of {}", f.label, f.samples.len()))
            .collect();
        figure(
            h,
            plots::bars(
                &format!("Throughput ({unit}, median)"),
                unit,
                &bars,
                None,
                Scale::Linear,
            ),
            &format!(
                "Throughput, median of the rounds; unit {unit}; higher is better. {}. \
                 Machine: {machine}.",
                counts.join("; ")
            ),
        );
    }

    // Ratios against the peers.
    let ratios: Vec<(String, f64)> = report
        .comparisons
        .iter()
        .filter_map(|c| Some((format!("{} / {}", short(&c.what), c.peer), c.ratio?)))
        .collect();
    if !ratios.is_empty() {
        figure(
            h,
            plots::bars(
                "snapvmm vs peers (ratio of medians)",
                "times (logarithmic)",
                &ratios,
                Some(1.0),
                Scale::Log,
            ),
            &format!(
                "How many times faster snapvmm is than each peer on the same work in the \
                 same run (ratio of medians; the line marks 1.0, right of it snapvmm is \
                 ahead). Sample counts as in the results table. Machine: {machine}."
            ),
        );
    }

    // Save time against memory size.
    let save_series: Vec<Series> = [
        ("ckpt.save.idle.", "save, idle guest"),
        ("ckpt.save.dirty.", "save, fully dirtied guest"),
        ("ckpt.plain.", "plain write + fsync"),
    ]
    .iter()
    .map(|(prefix, name)| {
        let mut points: Vec<(f64, f64)> = report
            .figures
            .iter()
            .filter(|f| f.id.starts_with(prefix) && measured(f))
            .filter_map(|f| Some((f.param?, f.median()?)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Series {
            name: name.to_string(),
            points,
        }
    })
    .filter(|s| !s.points.is_empty())
    .collect();
    if !save_series.is_empty() {
        let n = report
            .figures
            .iter()
            .filter(|f| f.id.starts_with("ckpt.save.") && measured(f))
            .map(|f| f.samples.len())
            .max()
            .unwrap_or(0);
        figure(
            h,
            plots::lines(
                "Checkpoint save time against guest memory size (median)",
                "guest memory (MiB)",
                "ms",
                &save_series,
                None,
                Scale::Linear,
            ),
            &format!(
                "Full checkpoint save (fsync included) of a paused micro-guest, idle and \
                 fully dirtied, beside a plain sequential write + fsync of the same bytes; \
                 median of up to {n} samples per point; unit ms. Machine: {machine}."
            ),
        );
    }
}

/// The first clause of a comparison's text, for bar labels.
fn short(what: &str) -> String {
    let cut = what.split([',', '(']).next().unwrap_or(what).trim();
    let mut s: String = cut.chars().take(40).collect();
    if cut.chars().count() > 40 {
        s.push('~');
    }
    s
}
