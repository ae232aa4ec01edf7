//! Live overlay switch, guest-visible: the micro-guest's `io-bench` workload (4 KiB random
//! reads and writes, half each, one in flight, timed by the guest with `rdtsc`) reports the
//! longest request of every 64; the window in which its disk switches to a new overlay
//! bounds the guest-visible stall from above. Beside it, the longest request of windows
//! without a snapshot (the noise floor). The method of `cargo bench --bench vmm --
//! snapshot_stall`.

use std::path::Path;
use std::time::Instant;

use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{prepare, DiskOverlay};
use snapshot::JobStatus;

use super::micro_guest::{start_io_bench, tsc_hz, TIMEOUT};
use super::model::{Figure, Status};
use super::Bench;

/// The guest's disk, fully written first so requests do not allocate.
const DISK_SIZE: u64 = 16 << 20;

/// Measures both figures.
pub fn run(bench: &mut Bench) {
    let family = "Live overlay switch";
    let what = "Micro-guest io-bench on a 16 MiB qcow2 disk (4 KiB random reads and writes, \
                one in flight, guest-timed with rdtsc, reported per 64 requests)";
    let quiet = Figure::new(
        "switch.guest.quiet",
        family,
        "longest guest request, no snapshot",
        "snapvmm",
        "ms",
    )
    .what(format!(
        "{what}: the longest request of a window without a snapshot."
    ));
    let stalled = Figure::new(
        "switch.guest.1x16MiB",
        family,
        "longest guest request, window of the switch",
        "snapvmm",
        "ms",
    )
    .what(format!(
        "{what}: the longest request of the window in which the disk switched to a new \
         overlay (an upper bound of the guest-visible stall). After each sample an active \
         commit pivots back, untimed."
    ));
    if let Err(reason) = vmm::check_kvm() {
        let note = format!("KVM unusable: {reason}");
        bench.unmeasured(quiet, Status::Skipped, &note);
        bench.unmeasured(stalled, Status::Skipped, note);
        return;
    }
    let count = bench.samples(5, 50);
    let dir = bench.dir.join("guest-stall");
    match measure(&dir, count) {
        Ok((q, s)) => {
            bench.record(quiet, Ok(q));
            bench.record(stalled, Ok(s));
        }
        Err(e) => {
            bench.record(quiet, Err(e.clone()));
            bench.record(stalled, Err(e));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `count` samples of each: (quiet windows, switch windows), in ms.
fn measure(dir: &Path, count: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let hz = tsc_hz();
    let ms = |ticks: u64| ticks as f64 / hz * 1e3;
    let mut guest = start_io_bench(&dir.join("base.qcow2"), DISK_SIZE)?;
    let mut quiet = Vec::with_capacity(count);
    for _ in 0..count {
        quiet.push(ms(guest.next_window()?.max));
    }
    let disk = guest.disk()?;
    let mut stalls = Vec::with_capacity(count);
    for n in 0..count {
        let overlay = dir.join(format!("s{n}.qcow2"));
        guest.console.drain();
        // The switch a disk-only snapshot makes (no drain): the request the guest has in
        // flight finishes on the old top, and the first window reported after the switch
        // bounds the stall.
        let mut prepared =
            prepare(&[DiskOverlay::new(&disk, &overlay)]).map_err(|e| format!("snapshot: {e}"))?;
        let switch = Instant::now();
        prepared
            .switch_in_flight()
            .map_err(|e| format!("snapshot: {e}"))?;
        prepared.seal().map_err(|e| format!("snapshot: {e}"))?;
        let mut longest = None;
        while longest.is_none() {
            let window = guest.next_window()?;
            if window.at > switch {
                longest = Some(window.max);
            }
        }
        stalls.push(longest.map_or(0.0, ms));
        // Untimed: back onto the base, so every snapshot is of a one-layer disk.
        let job = commit(&disk, CommitOptions::default()).map_err(|e| format!("commit: {e}"))?;
        if !job.wait_for(TIMEOUT, |s| s == JobStatus::Ready) {
            job.cancel();
            return Err(format!("the commit was not ready in {TIMEOUT:?}"));
        }
        job.complete().map_err(|e| format!("pivot: {e}"))?;
        job.wait().map_err(|e| format!("commit: {e}"))?;
        let _ = std::fs::remove_file(&overlay);
    }
    Ok((quiet, stalls))
}
