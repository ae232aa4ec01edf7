//! Internal qcow2 snapshots: create, apply and delete, `snapvmm img snapshot` against
//! `qemu-img snapshot` as whole processes on copies of one fully allocated image, rounds
//! alternating which tool goes first. The method of `benches/compare-snapshots.sh`.

use std::path::Path;
use std::process::Command;

use super::images;
use super::model::{Figure, Status};
use super::tools::timed;
use super::Bench;

const OPS: [(&str, &str); 3] = [("create", "-c"), ("apply", "-a"), ("delete", "-d")];

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let mib: u64 = if bench.quick { 256 } else { 1024 };
    let rounds = bench.samples(3, 7);
    let dir = bench.dir.join("internal");
    bench.step(format!("internal snapshots: {mib} MiB image"));
    let base = dir.join("base.qcow2");
    let made = images::fresh_dir(&dir).and_then(|()| images::data(&base, mib << 20));
    let ours_img = dir.join("ours.qcow2");
    let theirs_img = dir.join("theirs.qcow2");
    let made = made.and_then(|()| {
        for copy in [&ours_img, &theirs_img] {
            std::fs::copy(&base, copy).map_err(|e| format!("copying {}: {e}", base.display()))?;
        }
        let _ = std::fs::remove_file(&base);
        Ok(())
    });
    let qemu = bench.tools.qemu_img.clone();
    // samples[tool][op]
    let start = || made.clone().map(|()| Vec::new());
    let mut samples: [[Result<Vec<f64>, String>; 3]; 2] =
        [[start(), start(), start()], [start(), start(), start()]];
    for round in 0..rounds {
        bench.step(format!("internal snapshots, round {}/{rounds}", round + 1));
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for tool in order {
            let (program, image) = match (tool, &qemu) {
                (0, _) => (bench.exe.as_path(), &ours_img),
                (_, Some(q)) => (q.as_path(), &theirs_img),
                (_, None) => continue,
            };
            for (op, (_, flag)) in OPS.iter().enumerate() {
                let slot = &mut samples[tool][op];
                let Ok(list) = slot else { continue };
                match one(program, tool == 0, flag, &format!("s{round}"), image) {
                    Ok(ms) => list.push(ms),
                    Err(e) => *slot = Err(e),
                }
            }
        }
    }
    let [ours, theirs] = samples;
    for ((op, _), result) in OPS.iter().zip(ours) {
        bench.record(figure(op, "snapvmm", mib), result);
    }
    for ((op, _), result) in OPS.iter().zip(theirs) {
        let fig = figure(op, "qemu-img", mib);
        match qemu {
            Some(_) => bench.record(fig, result),
            None => bench.unmeasured(fig, Status::NotInstalled, "qemu-img not installed"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn figure(op: &str, tool: &str, mib: u64) -> Figure {
    Figure::new(
        &format!("internal.{op}.{tool}"),
        "Internal snapshots",
        &format!("snapshot {op} ({tool})"),
        tool,
        "ms",
    )
    .what(format!(
        "`{} snapshot` {op} on a fully allocated {mib} MiB qcow2 image (64 KiB clusters), \
         whole process (start, open, update, fsync, exit)",
        if tool == "snapvmm" {
            "snapvmm img"
        } else {
            "qemu-img"
        }
    ))
}

/// One `snapshot FLAG NAME IMAGE` run; its wall time in ms.
fn one(program: &Path, ours: bool, flag: &str, name: &str, image: &Path) -> Result<f64, String> {
    let mut command = Command::new(program);
    if ours {
        command.arg("img");
    }
    command.args(["snapshot", flag, name]).arg(image);
    Ok(timed(&mut command)?.as_secs_f64() * 1e3)
}
