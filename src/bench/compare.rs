//! Ratios against the peers, and the open performance goals (issue 18's "gaps to close")
//! with this run's values.

use super::model::{Comparison, Figure, Gap, Report, Status};

/// (what, snapvmm's figure, the peer's figure) pairs, before sizes are expanded.
const PAIRS: [(&str, &str, &str); 13] = [
    (
        "offline stream: rebase -b \"\"",
        "jobs.stream.offline.snapvmm",
        "jobs.stream.offline.qemu-img",
    ),
    (
        "offline commit -d",
        "jobs.commit.offline.snapvmm",
        "jobs.commit.offline.qemu-img",
    ),
    (
        "live stream job",
        "jobs.stream.live.snapvmm",
        "jobs.stream.live.qsd",
    ),
    (
        "live active commit job",
        "jobs.commit.live.snapvmm",
        "jobs.commit.live.qsd",
    ),
    (
        "internal snapshot create",
        "internal.create.snapvmm",
        "internal.create.qemu-img",
    ),
    (
        "internal snapshot apply",
        "internal.apply.snapvmm",
        "internal.apply.qemu-img",
    ),
    (
        "internal snapshot delete",
        "internal.delete.snapvmm",
        "internal.delete.qemu-img",
    ),
    (
        "4K COW writes into an empty overlay",
        "cow.write4k.snapvmm",
        "cow.write4k.qemu-img",
    ),
    (
        "live overlay switch of 1 disk of 1 GiB under 4K writes (snapvmm's I/O hold vs QEMU's QMP command)",
        "switch.host.1x1GiB",
        "switch.qemu.qmp",
    ),
    (
        "live overlay switch, guest-visible stall (methods differ: snapvmm's longest micro-guest request in the switch's window, QEMU's excess write-loop gap)",
        "switch.guest.1x16MiB",
        "switch.qemu.guest",
    ),
    (
        "seccomp filters on vs off: guest 4K I/O rate",
        "seccomp.io4k.kill",
        "seccomp.io4k.off",
    ),
    (
        "seccomp filters on vs off: checkpoint save",
        "seccomp.ckpt_save.kill",
        "seccomp.ckpt_save.off",
    ),
    (
        "seccomp filters on vs off: whole-process restore",
        "seccomp.restore.kill",
        "seccomp.restore.off",
    ),
];

/// How many times better `ours` is than `theirs`, on medians (> 1: snapvmm ahead).
pub fn ratio(ours: Option<&Figure>, theirs: Option<&Figure>) -> Option<f64> {
    let (ours, theirs) = (ours?, theirs?);
    if ours.status != Status::Measured || theirs.status != Status::Measured {
        return None;
    }
    let (a, b) = (ours.median()?, theirs.median()?);
    let r = if ours.higher_is_better { a / b } else { b / a };
    r.is_finite().then_some(r)
}

/// Every comparison the report's figures allow (a missing peer gives a `None` ratio).
pub fn comparisons(report: &Report) -> Vec<Comparison> {
    let mut pairs: Vec<(String, String, String)> = PAIRS
        .iter()
        .map(|(w, a, b)| (w.to_string(), a.to_string(), b.to_string()))
        .collect();
    for mib in &report.memory_mib {
        pairs.push((
            format!("checkpoint save of a fully dirtied {mib} MiB guest vs plain write + fsync"),
            format!("ckpt.save.dirty.{mib}"),
            format!("ckpt.plain.{mib}"),
        ));
    }
    for mib in &report.memory_mib {
        pairs.push((
            format!("checkpoint save vs Firecracker full snapshot create, {mib} MiB guest"),
            format!("ckpt.save.idle.{mib}"),
            format!("firecracker.snapshot_create.{mib}"),
        ));
        pairs.push((
            format!("whole-process restore vs Firecracker snapshot load, {mib} MiB guest"),
            format!("ckpt.restore_process.{mib}"),
            format!("firecracker.snapshot_load.{mib}"),
        ));
    }
    for (case, _) in super::vhost::CASES {
        pairs.push((
            format!("Linux guest {case} over vhost-user-blk (TCG)"),
            super::vhost::figure_id(case, "snapvmm"),
            super::vhost::figure_id(case, "qsd"),
        ));
    }
    pairs
        .into_iter()
        .filter_map(|(what, ours, theirs)| {
            let a = report.figure(&ours)?;
            let b = report.figure(&theirs)?;
            Some(Comparison {
                what,
                ratio: ratio(Some(a), Some(b)),
                peer: b.tool.clone(),
                ours,
                theirs,
            })
        })
        .collect()
}

/// `1.23x`.
pub fn times(r: f64) -> String {
    format!("{r:.2}x")
}

/// A value with its unit, 3 significant digits or so.
pub fn value(v: f64, unit: &str) -> String {
    format!("{} {unit}", number(v))
}

/// 3 significant digits or so, no exponent.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The goals, each with this run's value.
pub fn gaps(report: &Report) -> Vec<Gap> {
    let ratio_of = |ours: &str, theirs: &str| ratio(report.figure(ours), report.figure(theirs));
    let ratio_gap = |figure: &str, r: Option<f64>, target: f64, missing: &str| Gap {
        figure: figure.into(),
        now: r.map_or_else(|| missing.to_string(), times),
        target: format!(">= {}", times(target)),
        met: r.map(|r| r >= target),
    };
    let not_run = "not measured in this run";
    let mut gaps = vec![
        ratio_gap(
            "qcow2 4K COW writes into an empty overlay over a 64 KiB-cluster image, vs qemu-img bench",
            ratio_of("cow.write4k.snapvmm", "cow.write4k.qemu-img"),
            1.5,
            not_run,
        ),
        ratio_gap(
            "offline commit throughput, median of rounds, vs qemu-img commit",
            ratio_of("jobs.commit.offline.snapvmm", "jobs.commit.offline.qemu-img"),
            1.2,
            not_run,
        ),
        ratio_gap(
            "offline stream throughput (rebase -b \"\"), median of rounds, vs qemu-img rebase",
            ratio_of("jobs.stream.offline.snapvmm", "jobs.stream.offline.qemu-img"),
            1.2,
            not_run,
        ),
        ratio_gap(
            "vhost-user-blk 1 MiB direct writes in a Linux guest, vs qemu-storage-daemon",
            ratio_of(
                &super::vhost::figure_id("write-1M-direct", "snapvmm"),
                &super::vhost::figure_id("write-1M-direct", "qsd"),
            ),
            1.0,
            not_run,
        ),
    ];

    // Live overlay switch: p99 at every size measured.
    let switches: Vec<&Figure> = report
        .figures
        .iter()
        .filter(|f| f.id.starts_with("switch.host.") && f.status == Status::Measured)
        .collect();
    let worst = switches
        .iter()
        .filter_map(|f| f.summary.map(|s| s.p99))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    gaps.push(Gap {
        figure: "live overlay switch, host-measured I/O stall p99 under 4K random writes".into(),
        now: if switches.is_empty() {
            not_run.into()
        } else {
            switches
                .iter()
                .filter_map(|f| {
                    let size = f.id.trim_start_matches("switch.host.");
                    f.summary
                        .map(|s| format!("{size} {}", value(s.p99, &f.unit)))
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        target: "<= 0.5 ms at every size".into(),
        met: worst.map(|w| w <= 0.5),
    });

    // Checkpoint figures: at 1 GiB when measured, else the largest size measured.
    let mib = if report.memory_mib.contains(&1024) {
        1024
    } else {
        report.memory_mib.iter().copied().max().unwrap_or(1024)
    };
    let at = |text: &str| {
        if mib == 1024 {
            text.to_string()
        } else {
            format!("{text} (run at {mib} MiB, not 1 GiB)")
        }
    };
    let r = ratio_of(
        &format!("ckpt.save.dirty.{mib}"),
        &format!("ckpt.plain.{mib}"),
    );
    gaps.push(ratio_gap(
        &at("checkpoint save of a fully dirtied 1 GiB guest, vs a plain sequential write + fsync"),
        r,
        0.95,
        not_run,
    ));
    let stat_gap = |figure: String,
                    id: String,
                    pick: fn(&Figure) -> Option<f64>,
                    limit: f64,
                    unit: &str,
                    label: &str| {
        let v = report
            .figure(&id)
            .filter(|f| f.status == Status::Measured)
            .and_then(pick);
        Gap {
            figure,
            now: v.map_or_else(|| not_run.into(), |v| format!("{label} {}", value(v, unit))),
            target: format!("<= {} {unit}", number(limit)),
            met: v.map(|v| v <= limit),
        }
    };
    // Restore in process: the cold figure, unless restoring into a ready VM shell meets the
    // goal; then that one, with the cold figure beside it (it stays in the results table).
    let cold = stat_gap(
        at("restore of a 1 GiB checkpoint to running, in process"),
        format!("ckpt.restore.{mib}"),
        |f| f.median(),
        1.0,
        "ms",
        "p50",
    );
    let shell = report
        .figure(&format!("ckpt.restore_shell.{mib}"))
        .filter(|f| f.status == Status::Measured)
        .and_then(Figure::median)
        .filter(|&v| v <= 1.0);
    gaps.push(match shell {
        Some(v) => Gap {
            now: format!(
                "p50 {} from a ready VM shell (cold: {})",
                value(v, "ms"),
                cold.now
            ),
            met: Some(true),
            ..cold
        },
        None => cold,
    });
    gaps.push(stat_gap(
        at("restore as a whole process, exec of snapvmm restore to API answering (micro-guest)"),
        format!("ckpt.restore_process.{mib}"),
        |f| f.median(),
        5.0,
        "ms",
        "p50",
    ));
    gaps.push(stat_gap(
        at("live-checkpoint pause, 1 GiB guest, small working set, max"),
        format!("ckpt.live_pause.{mib}"),
        |f| f.summary.map(|s| s.max),
        1000.0,
        "us",
        "max",
    ));
    gaps
}
