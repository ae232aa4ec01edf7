//! Live snapshot and block-job benchmarks.
//!
//! - `switch_stall/{disks}x{size}`: the I/O hold of an external snapshot (new requests held
//!   → every disk serving from its new overlay; no drain) while writer threads issue 4 KiB
//!   random writes, for 1 and 8 disks of 1 GiB and 64 GiB (sparse). Criterion times the
//!   stall alone; p50/p99 over all samples are printed at the end of each group. Disks are
//!   rebuilt every 32 snapshots (untimed) so chains stay short.
//! - `stream/*`: pulling a 128 MiB backing file into an empty overlay: the stream job
//!   (`snapshot::stream`) beside `qemu-img rebase -b ""` on an identical chain.
//! - `commit/*`: committing a 128 MiB overlay into its backing file: the active-commit job
//!   (ready, then pivot) and `snapshot::offline::commit` (`snapvmm img commit -d`) beside
//!   `qemu-img commit -d` on an identical chain.
//!
//! Buffered I/O throughout: the page cache holds the data, so these measure the engines.
//! `SNAPVMM_BENCH_JOB_MIB` changes the 128 MiB. qemu-img is skipped if not installed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::JobStatus;
use storage::LiveDisk;
use test_support::image::{open_rw, qcow2};
use test_support::qemu::ok_in;
use test_support::require::have_qemu;

// The shipped `snapvmm bench`'s images and write load (self-contained modules of the
// binary), so that this bench and `snapvmm bench` measure the same thing.
#[path = "../src/bench/images.rs"]
mod images;
#[path = "../src/bench/load.rs"]
mod load;

const GIB: u64 = 1 << 30;
const SWITCHES_PER_CHAIN: u32 = 32;

/// Disks under a 4 KiB random-write load from two threads, rebuilt on demand.
struct Rig {
    dir: tempfile::TempDir,
    disks: Vec<Arc<LiveDisk>>,
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    writers: Vec<std::thread::JoinHandle<()>>,
    generation: u32,
    switches: u32,
}

impl Rig {
    fn new(count: usize, size: u64) -> Rig {
        let mut rig = Rig {
            dir: tempfile::tempdir().expect("tempdir"),
            disks: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            error: Arc::new(Mutex::new(None)),
            writers: Vec::new(),
            generation: 0,
            switches: 0,
        };
        rig.rebuild(count, size);
        rig
    }

    fn rebuild(&mut self, count: usize, size: u64) {
        self.stop_writers();
        self.disks.clear();
        for entry in std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .flatten()
        {
            let _ = std::fs::remove_file(entry.path());
        }
        self.generation += 1;
        self.switches = 0;
        self.disks = (0..count)
            .map(|i| {
                let path = self
                    .dir
                    .path()
                    .join(format!("d{i}.g{}.qcow2", self.generation));
                qcow2(&path, size, None);
                LiveDisk::new(format!("vd{i}"), open_rw(&path))
            })
            .collect();
        self.stop = Arc::new(AtomicBool::new(false));
        for t in 0..2u64 {
            let (disks, stop, error) = (self.disks.clone(), self.stop.clone(), self.error.clone());
            self.writers.push(std::thread::spawn(move || {
                load::write_load(&disks, &stop, &error, t)
            }));
        }
        // Let the writers get going.
        std::thread::sleep(Duration::from_millis(20));
    }

    fn stop_writers(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.writers.drain(..) {
            w.join().expect("writer panicked");
        }
        if let Some(e) = self.error.lock().expect("writer error slot").take() {
            panic!("write: {e}");
        }
    }

    /// One snapshot of every disk; returns the stall.
    fn switch(&mut self) -> Duration {
        self.switches += 1;
        let specs: Vec<DiskOverlay> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                DiskOverlay::new(
                    d,
                    self.dir.path().join(format!(
                        "d{i}.g{}.s{}.qcow2",
                        self.generation, self.switches
                    )),
                )
            })
            .collect();
        external_snapshot(&specs).expect("snapshot").quiesced_for
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_writers();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn switch_stall(c: &mut Criterion) {
    let mut group = c.benchmark_group("switch_stall");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    for &(disks, size) in &[(1usize, GIB), (8, GIB), (1, 64 * GIB), (8, 64 * GIB)] {
        let label = format!("{disks}x{}GiB", size / GIB);
        let mut rig = Rig::new(disks, size);
        let mut stalls = Vec::new();
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if rig.switches >= SWITCHES_PER_CHAIN {
                        rig.rebuild(disks, size);
                    }
                    let stall = rig.switch();
                    stalls.push(stall);
                    total += stall;
                }
                total
            })
        });
        stalls.sort();
        eprintln!(
            "switch_stall/{label}: {} switches, stall p50 {:?} p99 {:?} max {:?}",
            stalls.len(),
            percentile(&stalls, 0.50),
            percentile(&stalls, 0.99),
            stalls.last().copied().unwrap_or_default()
        );
    }
    group.finish();
}

/// A template directory holding `data.qcow2` (`mib` MiB of non-zero data, 64 KiB clusters);
/// each run copies it so jobs start from identical files.
struct Template {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bytes: u64,
}

impl Template {
    fn new() -> Template {
        let mib: u64 = std::env::var("SNAPVMM_BENCH_JOB_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128);
        let bytes = mib << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data.qcow2");
        images::data(&data, bytes).expect("template data");
        Template {
            _dir: dir,
            data,
            bytes,
        }
    }

    /// A fresh stream case: an empty `top.qcow2` over a copy of the data.
    fn copy(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = images::stream_case(&self.data, dir.path(), self.bytes).expect("stream case");
        (dir, top)
    }

    /// The same data as the *top* of a chain: `top.qcow2` (data) over an empty `base.qcow2`.
    fn copy_as_top(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = images::commit_case(&self.data, dir.path(), self.bytes).expect("commit case");
        (dir, top)
    }
}

fn jobs(c: &mut Criterion) {
    let template = Template::new();
    let qemu = have_qemu("the qemu-img side of the job benches");

    let mut group = c.benchmark_group("stream");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(template.bytes));
    group.bench_function("snapvmm_stream_job", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (_dir, top) = template.copy();
                let live = LiveDisk::new("vda", open_rw(&top));
                let start = Instant::now();
                stream(&live, StreamOptions::default())
                    .expect("stream")
                    .wait()
                    .expect("stream");
                total += start.elapsed();
            }
            total
        })
    });
    if qemu {
        group.bench_function("qemu_img_rebase_standalone", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (dir, _top) = template.copy();
                    let start = Instant::now();
                    ok_in(
                        dir.path(),
                        "qemu-img",
                        &["rebase", "-q", "-b", "", "top.qcow2"],
                    );
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("commit");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(template.bytes));
    group.bench_function("snapvmm_active_commit_job", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (_dir, top) = template.copy_as_top();
                let live = LiveDisk::new("vda", open_rw(&top));
                let start = Instant::now();
                let job = commit(&live, CommitOptions::default()).expect("commit");
                assert!(job.wait_for(Duration::from_secs(600), |s| s == JobStatus::Ready));
                job.complete().expect("complete");
                job.wait().expect("commit");
                total += start.elapsed();
            }
            total
        })
    });
    group.bench_function("snapvmm_img_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (_dir, top) = template.copy_as_top();
                let start = Instant::now();
                snapshot::offline::commit(&top, None, true, &mut |_, _| {}).expect("commit");
                total += start.elapsed();
            }
            total
        })
    });
    if qemu {
        group.bench_function("qemu_img_commit", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (dir, _top) = template.copy_as_top();
                    let start = Instant::now();
                    ok_in(dir.path(), "qemu-img", &["commit", "-q", "-d", "top.qcow2"]);
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, switch_stall, jobs);
criterion_main!(benches);
