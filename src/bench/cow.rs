//! 4 KiB copy-on-write writes: `snapvmm img bench -w` against `qemu-img bench -w`, O_DIRECT
//! (`-t none`), one write per 64 KiB cluster into a fresh empty overlay over a fully written
//! image, so each write allocates a cluster and copies the rest of it from the backing
//! file. The `write-4k-cow` case of `benches/compare-qemu.sh`.

use std::path::Path;
use std::process::Command;

use super::images;
use super::model::{Figure, Status};
use super::tools::output;
use super::Bench;

const CLUSTER: u64 = 64 << 10;
const DEPTH: u64 = 32;

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let mib: u64 = if bench.quick { 128 } else { 1024 };
    let rounds = bench.samples(3, 5);
    let count = (mib << 20) / CLUSTER;
    let dir = bench.dir.join("cow");
    bench.step(format!("4K COW writes: {mib} MiB base"));
    let base = dir.join("base.qcow2");
    let made = images::fresh_dir(&dir).and_then(|()| images::data(&base, mib << 20));
    let qemu = bench.tools.qemu_img.clone();
    let mut results: [Result<Vec<f64>, String>; 2] =
        [made.clone().map(|()| Vec::new()), made.map(|()| Vec::new())];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for tool in order {
            let program = match (tool, &qemu) {
                (0, _) => bench.exe.clone(),
                (_, Some(q)) => q.clone(),
                (_, None) => continue,
            };
            let slot = &mut results[tool];
            let Ok(list) = slot else { continue };
            match one(&program, tool == 0, &dir, mib << 20, count) {
                Ok(seconds) => list.push(count as f64 / seconds),
                Err(e) => *slot = Err(e),
            }
        }
    }
    let [ours, theirs] = results;
    bench.record(figure("snapvmm", mib, count), ours);
    let fig = figure("qemu-img", mib, count);
    match qemu {
        Some(_) => bench.record(fig, theirs),
        None => bench.unmeasured(fig, Status::NotInstalled, "qemu-img not installed"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn figure(tool: &str, mib: u64, count: u64) -> Figure {
    Figure::new(
        &format!("cow.write4k.{tool}"),
        "4K copy-on-write writes",
        &format!("4K COW writes ({tool})"),
        tool,
        "writes/s",
    )
    .what(format!(
        "`{} bench -w -t none -d {DEPTH} -s 4096 -S 65536 -c {count}` on an empty qcow2 \
         overlay over a fully written {mib} MiB qcow2 (64 KiB clusters): one 4 KiB write \
         per cluster, each a copy-on-write; writes / reported run time",
        if tool == "snapvmm" {
            "snapvmm img"
        } else {
            "qemu-img"
        }
    ))
    .higher_is_better()
}

/// One run on a fresh overlay; the tool's "Run completed in X seconds".
fn one(program: &Path, ours: bool, dir: &Path, size: u64, count: u64) -> Result<f64, String> {
    let overlay = dir.join("overlay.qcow2");
    let _ = std::fs::remove_file(&overlay);
    images::qcow2(&overlay, size, Some("base.qcow2"))?;
    let mut command = Command::new(program);
    if ours {
        command.arg("img");
    }
    command
        .args(["bench", "-w", "-f", "qcow2", "-t", "none"])
        .args(["-d", &DEPTH.to_string(), "-c", &count.to_string()])
        .args(["-s", "4096", "-S", &CLUSTER.to_string()])
        .arg(&overlay);
    let text = output(&mut command)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|rest| rest.strip_suffix(" seconds."))
                .and_then(|s| s.parse::<f64>().ok())
        })
        .filter(|s| *s > 0.0)
        .ok_or_else(|| format!("no \"Run completed in X seconds.\" in: {}", text.trim()))
}
