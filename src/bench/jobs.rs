//! Stream and commit throughput.
//!
//! - offline, process against process on identical chains, alternating which tool goes first
//!   each round, each run on a case copied in just before it, after a `sync`: `snapvmm img
//!   rebase -b ""` against `qemu-img rebase -b ""` (stream: an empty top pulls in its data
//!   backing file) and `snapvmm img commit -d` against `qemu-img commit -d` (a data top into
//!   an empty base); every result is checked (untimed) to read as the template does. The
//!   method of `benches/compare-jobs.sh`.
//! - live, in this process: the stream job and the active commit job (to ready, then pivot)
//!   on a live disk with no guest.
//! - active-commit convergence under a guest write load: the micro-guest's io-bench writes
//!   into an overlay while it is committed; the time to "ready" (mirroring caught up).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::JobStatus;
use storage::{LiveDisk, OpenOptions};

use super::images;
use super::micro_guest::start_io_bench;
use super::model::{Figure, Status};
use super::tools::{sync, timed};
use super::Bench;

const FAMILY: &str = "Stream and commit";
/// How long one job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let mib: u64 = if bench.quick { 32 } else { 512 };
    let bytes = mib << 20;
    let rounds = bench.samples(3, 6);
    let dir = bench.dir.join("jobs");
    let data = dir.join("template").join("data.qcow2");
    bench.step(format!("stream and commit: {mib} MiB template"));
    let made = images::fresh_dir(&dir)
        .and_then(|()| images::fresh_dir(&dir.join("template")))
        .and_then(|()| images::data(&data, bytes));
    offline(bench, made.clone(), &data, mib, rounds);
    live(bench, made.clone(), &data, mib, rounds);
    super::qsd::run(bench, made, &data, mib, rounds);
    convergence(bench);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A throughput figure of this family.
fn figure(id: &str, label: &str, tool: &str, what: String) -> Figure {
    Figure::new(id, FAMILY, label, tool, "MiB/s")
        .what(what)
        .higher_is_better()
}

/// The offline figures, snapvmm's and qemu-img's, rounds interleaved.
fn offline(bench: &mut Bench, made: Result<(), String>, data: &Path, mib: u64, rounds: usize) {
    let bytes = mib << 20;
    let dir = bench.dir.join("jobs");
    for kind in ["stream", "commit"] {
        let what = match kind {
            "stream" => format!(
                "rebase -b \"\" of an empty qcow2 over a {mib} MiB data image (stream: makes \
                 the top standalone), whole process, page cache; {mib} MiB / wall time"
            ),
            _ => format!(
                "commit -d of a {mib} MiB data qcow2 into an empty base, whole process, page \
                 cache; {mib} MiB / wall time"
            ),
        };
        let ours = figure(
            &format!("jobs.{kind}.offline.snapvmm"),
            &format!("offline {kind} (snapvmm img)"),
            "snapvmm",
            what.clone(),
        );
        let theirs = figure(
            &format!("jobs.{kind}.offline.qemu-img"),
            &format!("offline {kind} (qemu-img)"),
            "qemu-img",
            what,
        );
        if let Err(e) = &made {
            bench.record(ours, Err(e.clone()));
            bench.record(theirs, Err(e.clone()));
            continue;
        }
        bench.step(format!("offline {kind}, {rounds} rounds"));
        let qemu = bench.tools.qemu_img.clone();
        let (mut ours_mibs, mut theirs_mibs) = (Ok(Vec::new()), Ok(Vec::new()));
        for round in 0..rounds {
            // Whoever goes second after the copies may find page-cache pages warmer:
            // alternate.
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_ours in order {
                let (tool, samples) = match (is_ours, &qemu) {
                    (true, _) => (bench.exe.clone(), &mut ours_mibs),
                    (false, Some(q)) => (q.clone(), &mut theirs_mibs),
                    (false, None) => continue,
                };
                let Ok(list) = samples else { continue };
                let case = dir.join(if is_ours { "ours" } else { "theirs" });
                match one_offline(kind, &tool, is_ours, data, &case, bytes) {
                    Ok(took) => list.push(mib as f64 / took.as_secs_f64()),
                    Err(e) => *samples = Err(e),
                }
            }
        }
        bench.record(ours, ours_mibs);
        match qemu {
            Some(_) => bench.record(theirs, theirs_mibs),
            None => bench.unmeasured(theirs, Status::NotInstalled, "qemu-img not installed"),
        }
    }
}

/// One offline run of `tool` (our binary when `is_ours`) on a fresh case in `case`.
fn one_offline(
    kind: &str,
    tool: &Path,
    is_ours: bool,
    data: &Path,
    case: &Path,
    bytes: u64,
) -> Result<Duration, String> {
    let mut command = Command::new(tool);
    if is_ours {
        command.arg("img");
    }
    let top = if kind == "stream" {
        let top = images::stream_case(data, case, bytes)?;
        command.args(["rebase", "-b", ""]).arg(&top);
        top
    } else {
        let top = images::commit_case(data, case, bytes)?;
        command.args(["commit", "-q", "-d"]).arg(&top);
        top
    };
    sync();
    let took = timed(&mut command)?;
    let result = if kind == "stream" {
        let info = storage::open(&top, &OpenOptions::default())
            .map_err(|e| format!("opening {} after the stream: {e}", top.display()))?;
        if info.backing().is_some() {
            return Err(format!("{} still has a backing file", top.display()));
        }
        top.clone()
    } else {
        case.join("base.qcow2")
    };
    // Whichever tool ran, its result reads as the template does (untimed).
    same_contents(data, &result)?;
    // Disk space is the user's: no more than one case at a time.
    let _ = std::fs::remove_dir_all(case);
    Ok(took)
}

/// Checks that the images at `a` and `b` read the same, a MiB at a time.
fn same_contents(a: &Path, b: &Path) -> Result<(), String> {
    let open = |path: &Path| {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        storage::open(path, &options).map_err(|e| format!("opening {}: {e}", path.display()))
    };
    let (a_dev, b_dev) = (open(a)?, open(b)?);
    let size = a_dev.size();
    if b_dev.size() < size {
        return Err(format!("{} is smaller than {}", b.display(), a.display()));
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 20) as usize;
        a_dev
            .read_at(&mut x[..n], at)
            .and_then(|()| b_dev.read_at(&mut y[..n], at))
            .map_err(|e| format!("comparing at {at:#x}: {e}"))?;
        if x[..n] != y[..n] {
            return Err(format!(
                "{} differs from {} near {at:#x}",
                b.display(),
                a.display()
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// The live stream and active-commit jobs in this process.
fn live(bench: &mut Bench, made: Result<(), String>, data: &Path, mib: u64, rounds: usize) {
    let bytes = mib << 20;
    let case = bench.dir.join("jobs").join("live");
    let stream_fig = figure(
        "jobs.stream.live.snapvmm",
        "live stream job",
        "snapvmm",
        format!(
            "snapshot::stream job on a live disk (no guest): an empty overlay pulls in its \
             {mib} MiB data backing file; {mib} MiB / time to concluded"
        ),
    );
    let commit_fig = figure(
        "jobs.commit.live.snapvmm",
        "live active commit job",
        "snapvmm",
        format!(
            "snapshot::commit active job on a live disk (no guest): a {mib} MiB data top \
             into an empty base, to ready then pivot; {mib} MiB / time"
        ),
    );
    if let Err(e) = made {
        bench.record(stream_fig, Err(e.clone()));
        bench.record(commit_fig, Err(e));
        return;
    }
    bench.step("live stream and commit jobs");
    let stream_result = (0..rounds)
        .map(|_| {
            let top = images::stream_case(data, &case, bytes)?;
            let live = open_live(&top)?;
            sync();
            let start = Instant::now();
            let job =
                stream(&live, StreamOptions::default()).map_err(|e| format!("stream: {e}"))?;
            finish(&job, false)?;
            let took = start.elapsed();
            let _ = std::fs::remove_dir_all(&case);
            Ok(mib as f64 / took.as_secs_f64())
        })
        .collect();
    bench.record(stream_fig, stream_result);
    let commit_result = (0..rounds)
        .map(|_| {
            let top = images::commit_case(data, &case, bytes)?;
            let live = open_live(&top)?;
            sync();
            let start = Instant::now();
            let job =
                commit(&live, CommitOptions::default()).map_err(|e| format!("commit: {e}"))?;
            finish(&job, true)?;
            let took = start.elapsed();
            let _ = std::fs::remove_dir_all(&case);
            Ok(mib as f64 / took.as_secs_f64())
        })
        .collect();
    bench.record(commit_fig, commit_result);
}

fn open_live(top: &Path) -> Result<Arc<LiveDisk>, String> {
    let device = storage::open(top, &OpenOptions::default())
        .map_err(|e| format!("opening {}: {e}", top.display()))?;
    Ok(LiveDisk::new("vda", device))
}

/// Runs `job` to its end, completing (pivoting) it once ready when `pivot`.
fn finish(job: &snapshot::Job, pivot: bool) -> Result<(), String> {
    if pivot {
        if !job.wait_for(JOB_TIMEOUT, |s| {
            matches!(s, JobStatus::Ready | JobStatus::Concluded)
        }) {
            job.cancel();
            return Err(format!("job {} not ready in {JOB_TIMEOUT:?}", job.id()));
        }
        if job.status() == JobStatus::Ready {
            job.complete()
                .map_err(|e| format!("job {}: complete: {e}", job.id()))?;
        }
    }
    if !job.wait_for(JOB_TIMEOUT, |s| s == JobStatus::Concluded) {
        job.cancel();
        return Err(format!("job {} did not end in {JOB_TIMEOUT:?}", job.id()));
    }
    job.wait()
        .map(|_| ())
        .map_err(|e| format!("job {}: {e}", job.id()))
}

/// Active commit of an overlay the guest keeps writing into: time to ready.
fn convergence(bench: &mut Bench) {
    let fig = Figure::new(
        "jobs.commit.converge.snapvmm",
        FAMILY,
        "active commit under guest writes, to ready",
        "snapvmm",
        "ms",
    )
    .what(
        "Micro-guest io-bench (4 KiB random reads and writes on a 64 MiB qcow2 disk) \
         writes into a fresh overlay for 300 ms; then an active commit of the overlay into \
         its base: time from start to ready (the mirror has caught up with the guest's \
         writes), then pivot (untimed).",
    );
    if let Err(reason) = vmm::check_kvm() {
        bench.unmeasured(fig, Status::Skipped, format!("KVM unusable: {reason}"));
        return;
    }
    bench.step("active commit convergence under guest writes");
    let count = bench.samples(2, 10);
    let dir = bench.dir.join("converge");
    let result = images::fresh_dir(&dir).and_then(|()| {
        let guest = start_io_bench(&dir.join("base.qcow2"), 64 << 20)?;
        let disk = guest.disk()?;
        let mut samples = Vec::with_capacity(count);
        for n in 0..count {
            let overlay = dir.join(format!("s{n}.qcow2"));
            external_snapshot(&[DiskOverlay::new(&disk, &overlay)])
                .map_err(|e| format!("snapshot: {e}"))?;
            std::thread::sleep(Duration::from_millis(300));
            let start = Instant::now();
            let job =
                commit(&disk, CommitOptions::default()).map_err(|e| format!("commit: {e}"))?;
            if !job.wait_for(JOB_TIMEOUT, |s| s == JobStatus::Ready) {
                job.cancel();
                return Err(format!("the commit was not ready in {JOB_TIMEOUT:?}"));
            }
            samples.push(start.elapsed().as_secs_f64() * 1e3);
            job.complete().map_err(|e| format!("pivot: {e}"))?;
            job.wait().map_err(|e| format!("commit: {e}"))?;
            let _ = std::fs::remove_file(&overlay);
        }
        drop(guest);
        Ok(samples)
    });
    bench.record(fig, result);
    let _ = std::fs::remove_dir_all(&dir);
}
