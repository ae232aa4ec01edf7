//! VMM benchmarks with the built-in micro-guest, on /dev/kvm.
//!
//! - `vm_start/first_serial_byte/{no_disk,qcow2_disk}`: from calling `Vmm::start` (memory,
//!   KVM VM, devices, guest image, vCPU threads) to the first byte the guest writes to its
//!   serial port, timed on the host by a serial writer that notes the instant of its first
//!   byte. Teardown is not timed.
//! - `guest_io/4k_random_rw`: the 4 KiB request rate the guest sees through virtio-blk on a
//!   fully allocated 16 MiB qcow2 disk, half reads, half writes, one request in flight.
//!   The guest's `io-bench` workload times its own requests with `rdtsc` and reports every
//!   64 requests; one iteration is one request and its time is guest TSC time.
//! - `snapshot_stall/{no_snapshot,live_snapshot}`: the guest-visible stall of a live
//!   disk-only snapshot, as the longest single 4 KiB request of the guest's 64-request window
//!   in which the disk switches to its new overlay, next to the longest request of windows
//!   without a snapshot. Method: the guest records the longest request of each window in TSC
//!   ticks and prints it; the host timestamps each line as it arrives and notes the instant
//!   of the switch (from the snapshot's hook, which runs with the disk quiesced). With one
//!   request in flight, a request held by the quiesce completes in the first window that
//!   ends after that instant, so that window's maximum bounds the stall from above. After
//!   each sample (untimed) an active commit pivots the disk back so the chain stays one
//!   layer deep. Printed at the end: medians and p90 of both, of the windows spanning the
//!   whole snapshot call (overlay creation, flushes, the first copy-on-writes into the new
//!   overlay) and of the host-side hold (`SnapshotReport::quiesced_for`). On a busy host
//!   both carry scheduler noise: a request whose device thread waits for a CPU takes one
//!   timer tick (4 ms at HZ=250), which dwarfs a hold of microseconds; compare medians.
//!
//! Guest TSC ticks become time at the host's TSC rate, measured against the monotonic clock
//! at start (KVM runs the guest's TSC at the host's rate unless told otherwise).
//!
//! Without a usable /dev/kvm every benchmark is skipped with a message.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot_with, DiskOverlay};
use snapshot::JobStatus;
use storage::qcow2::{create, CreateOptions};
use test_support::image::{open_rw, qcow2};
use test_support::require::have_kvm;
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::console::{Console, SerialLine};
use vmm::Vmm;

/// Disk of the I/O benchmarks, written whole before the guest starts.
const DISK_SIZE: u64 = 16 << 20;
/// How long the guest may stay silent before a benchmark gives up.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The host's TSC ticks per second, against `Instant` over 200 ms.
fn tsc_hz() -> f64 {
    use std::arch::x86_64::_rdtsc;
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    let (t0, c0) = (Instant::now(), unsafe { _rdtsc() });
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let (c1, t1) = (unsafe { _rdtsc() }, Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn ticks(ticks: u64, hz: f64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// A qcow2 disk of [`DISK_SIZE`] with every cluster allocated (so the benchmarks measure
/// requests, not cluster allocation).
fn filled_disk(path: &Path) {
    qcow2(path, DISK_SIZE, None);
    let disk = open_rw(path);
    let data = vec![0xa5u8; 1 << 20];
    for offset in (0..DISK_SIZE).step_by(data.len()) {
        disk.write_at(&data, offset).expect("fill disk");
    }
    disk.flush().expect("flush disk");
}

/// A serial output that reports the instant of the guest's first byte.
struct FirstByte(Option<mpsc::Sender<Instant>>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            if let Some(sender) = self.0.take() {
                let _ = sender.send(Instant::now());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn vm_start(c: &mut Criterion) {
    if !have_kvm("vm_start") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    create(
        &disk,
        &CreateOptions {
            size: Some(DISK_SIZE),
            ..Default::default()
        },
    )
    .expect("create disk");
    let mut group = c.benchmark_group("vm_start");
    group.sample_size(20);
    for (name, disks) in [("no_disk", vec![]), ("qcow2_disk", vec![disk])] {
        let mut config = VmConfig::new(BootSource::MicroGuest {
            workload: Workload::Counter,
            seed: 1,
        });
        config.disks = disks.into_iter().map(DiskConfig::new).collect();
        group.bench_function(format!("first_serial_byte/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (sender, first) = mpsc::channel();
                    let start = Instant::now();
                    let vm = Vmm::start_with_serial(&config, Box::new(FirstByte(Some(sender))))
                        .expect("start VM");
                    let at = first.recv_timeout(TIMEOUT).expect("no serial output");
                    total += at - start;
                    vm.stop().expect("stop VM");
                }
                total
            })
        });
    }
    group.finish();
}

/// One `io-bench ops N ticks T max M errors E` line.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// When the line reached the host.
    at: Instant,
    /// Requests in the window.
    ops: u64,
    /// TSC ticks the window's requests took.
    ticks: u64,
    /// The longest request, in ticks.
    max: u64,
}

fn parse_window(line: &SerialLine) -> Option<Window> {
    let words: Vec<&str> = line.text.split_whitespace().collect();
    match words[..] {
        ["io-bench", "ops", _, "ticks", ticks, "max", max, "errors", errors] => {
            assert_eq!(errors, "0", "the guest saw I/O errors: {}", line.text);
            Some(Window {
                at: line.at,
                ops: 64,
                ticks: ticks.parse().ok()?,
                max: max.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// An `io-bench` guest on a filled qcow2 disk.
struct BenchVm {
    _dir: tempfile::TempDir,
    overlays: PathBuf,
    vm: Option<Vmm>,
    console: Console,
}

impl BenchVm {
    fn start() -> BenchVm {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        filled_disk(&base);
        let mut config = VmConfig::new(BootSource::MicroGuest {
            workload: Workload::IoBench,
            seed: 7,
        });
        config.memory_mib = 32;
        config.disks.push(DiskConfig::new(&base));
        let (sink, mut console) = vmm::console::channel();
        let vm = Vmm::start_with_serial(&config, Box::new(sink)).expect("start VM");
        console
            .wait_for(TIMEOUT, |l| l == "io-bench start")
            .expect("io-bench did not start");
        BenchVm {
            overlays: dir.path().to_path_buf(),
            _dir: dir,
            vm: Some(vm),
            console,
        }
    }

    fn next_window(&mut self) -> Window {
        loop {
            let line = self
                .console
                .next_line(TIMEOUT)
                .expect("the guest stopped reporting");
            if let Some(window) = parse_window(&line) {
                return window;
            }
            assert!(!line.text.contains("io error"), "{}", line.text);
        }
    }

    /// Forgets the windows already reported: the next one starts after now.
    fn skip_reported(&mut self) {
        self.console.drain();
    }

    fn vm(&self) -> &Vmm {
        self.vm.as_ref().expect("running")
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            let _ = vmm::guest::request_finish(vm.memory());
            let _ = vm.stop();
        }
    }
}

/// The host's TSC rate and a running `io-bench` guest, or `None` (said why) without KVM.
fn io_bench(bench: &str) -> Option<(f64, BenchVm)> {
    have_kvm(bench).then(|| (tsc_hz(), BenchVm::start()))
}

fn guest_io(c: &mut Criterion) {
    let Some((hz, mut vm)) = io_bench("guest_io") else {
        return;
    };
    let mut group = c.benchmark_group("guest_io");
    group.throughput(Throughput::Elements(1));
    group.bench_function("4k_random_rw", |b| {
        b.iter_custom(|iters| {
            // Whole windows until `iters` requests are covered; time scaled to `iters`.
            let (mut ops, mut spent) = (0u64, 0u64);
            while ops < iters {
                let window = vm.next_window();
                ops += window.ops;
                spent += window.ticks;
            }
            ticks(spent, hz).mul_f64(iters as f64 / ops as f64)
        })
    });
    group.finish();
}

fn snapshot_stall(c: &mut Criterion) {
    let Some((hz, mut vm)) = io_bench("snapshot_stall") else {
        return;
    };
    let mut group = c.benchmark_group("snapshot_stall");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    let mut quiet = Vec::new();
    group.bench_function("no_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let longest = ticks(vm.next_window().max, hz);
                quiet.push(longest);
                total += longest;
            }
            total
        })
    });
    let mut held = Vec::new();
    let mut stalled = Vec::new();
    let mut whole_call = Vec::new();
    let mut count = 0u32;
    group.bench_function("live_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                count += 1;
                let disk = vm.vm().disks()[0].disk.clone();
                let overlay = vm.overlays.join(format!("s{count}.qcow2"));
                vm.skip_reported();
                let start = Instant::now();
                // The hook runs with the disk quiesced, just before the switch: the request
                // the guest has in flight then completes in the first window after it.
                let mut switch = start;
                let report = external_snapshot_with(&[DiskOverlay::new(&disk, &overlay)], || {
                    switch = Instant::now();
                    Ok(())
                })
                .expect("snapshot");
                let end = Instant::now();
                held.push(report.quiesced_for);
                let (mut at_switch, mut around) = (None, 0);
                loop {
                    let window = vm.next_window();
                    if window.at > switch && at_switch.is_none() {
                        at_switch = Some(window.max);
                    }
                    around = around.max(window.max);
                    if window.at > end {
                        break;
                    }
                }
                let longest = ticks(at_switch.expect("a window after the switch"), hz);
                stalled.push(longest);
                whole_call.push(ticks(around, hz));
                total += longest;
                // Untimed: back onto the base, so every snapshot is of a one-layer disk.
                let job = commit(&disk, CommitOptions::default()).expect("commit");
                assert!(job.wait_for(TIMEOUT, |s| s == JobStatus::Ready));
                job.complete().expect("pivot");
                job.wait().expect("commit");
                std::fs::remove_file(&overlay).expect("remove overlay");
            }
            total
        })
    });
    group.finish();
    // Medians beside criterion's means: on a busy host a few descheduled samples move a mean.
    for (what, values) in [
        ("longest guest request, no snapshot", quiet),
        ("longest guest request, window of the switch", stalled),
        (
            "longest guest request, windows of the whole snapshot call",
            whole_call,
        ),
        ("host-side I/O hold (quiesced_for)", held),
    ] {
        println!("snapshot_stall: {what}: {}", percentiles(values));
    }
}

/// "median M, p90 P, max X over N".
fn percentiles(mut values: Vec<Duration>) -> String {
    values.sort();
    let at = |q: f64| values[((values.len() - 1) as f64 * q) as usize];
    match values.len() {
        0 => "no samples".into(),
        n => format!(
            "median {:?}, p90 {:?}, max {:?} over {n}",
            at(0.5),
            at(0.9),
            at(1.0)
        ),
    }
}

criterion_group!(benches, vm_start, guest_io, snapshot_stall);
criterion_main!(benches);
