//! Live overlay switch, host-measured: how long an external snapshot of 1 or 8 live disks
//! holds their I/O (`SnapshotReport::quiesced_for`: new requests held until every disk serves
//! from its new overlay) while two writer threads issue 4 KiB random writes to them. The
//! switch does not drain (`LiveDisk::switch_all`): the only other wait it causes, a new
//! write to a cluster an old-top write in flight changes, is counted and reported.
//! The same method as `cargo bench --bench live -- switch_stall`, from the shipped binary.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use storage::qcow2::{create, CreateOptions};
use storage::{LiveDisk, OpenOptions};

use super::load::write_load;
use super::model::Figure;
use super::Bench;

const GIB: u64 = 1 << 30;
/// Switches on one chain before the disks are rebuilt (untimed), so chains stay short.
const SWITCHES_PER_CHAIN: usize = 32;
/// Writer threads of the load.
const WRITERS: u64 = 2;

/// Measures every (disks, size) case.
pub fn run(bench: &mut Bench) {
    let mut cases = vec![(1usize, GIB), (8, GIB)];
    if !bench.quick {
        cases.extend([(1, 64 * GIB), (8, 64 * GIB)]);
    }
    let count = bench.samples(20, 200);
    for (disks, size) in cases {
        let label = format!("{disks}x{}GiB", size / GIB);
        bench.step(format!("live overlay switch {label}"));
        let figure = Figure::new(
            &format!("switch.host.{label}"),
            "Live overlay switch",
            &format!("I/O hold, {disks} disk(s) of {} GiB", size / GIB),
            "snapvmm",
            "ms",
        );
        let dir = bench.dir.join(format!("switch-{label}"));
        let result = measure(&dir, disks, size, count);
        let _ = std::fs::remove_dir_all(&dir);
        let waits = result.as_ref().map_or(0, |(_, waits)| *waits);
        let figure = figure.what(format!(
            "External snapshot of {disks} live qcow2 disk(s) of {} GiB (sparse) onto new \
                 overlays while {WRITERS} threads write 4 KiB at random offsets; the host-measured \
                 time new requests are held (to all serving from the new overlays; requests in \
                 flight finish on the old tops). {waits} write(s) over the run waited for an \
                 old-top write in flight on the same cluster. Disks rebuilt every \
                 {SWITCHES_PER_CHAIN} switches.",
            size / GIB
        ));
        bench.record(figure, result.map(|(holds, _)| holds));
    }
}

/// `count` switches of `disks` disks of `size` bytes under load; the holds in ms, and how
/// many writes waited for an overlapping old-top write.
fn measure(dir: &Path, disks: usize, size: u64, count: usize) -> Result<(Vec<f64>, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut holds = Vec::with_capacity(count);
    let mut waits = 0;
    let mut generation = 0;
    while holds.len() < count {
        generation += 1;
        let rig = Rig::new(dir, disks, size, generation)?;
        let mut switch = 0;
        while switch < SWITCHES_PER_CHAIN && holds.len() < count {
            switch += 1;
            let specs: Vec<DiskOverlay> = rig
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    DiskOverlay::new(d, dir.join(format!("d{i}.g{generation}.s{switch}.qcow2")))
                })
                .collect();
            let report = external_snapshot(&specs).map_err(|e| format!("snapshot: {e}"))?;
            holds.push(report.quiesced_for.as_secs_f64() * 1e3);
        }
        waits += rig.disks.iter().map(|d| d.overlap_waits()).sum::<u64>();
        rig.stop()?;
        clear(dir);
    }
    Ok((holds, waits))
}

fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Disks under a 4 KiB random-write load.
struct Rig {
    disks: Vec<Arc<LiveDisk>>,
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    writers: Vec<std::thread::JoinHandle<()>>,
}

impl Rig {
    fn new(dir: &Path, count: usize, size: u64, generation: usize) -> Result<Rig, String> {
        let mut disks = Vec::with_capacity(count);
        for i in 0..count {
            let path = dir.join(format!("d{i}.g{generation}.qcow2"));
            create(
                &path,
                &CreateOptions {
                    size: Some(size),
                    ..CreateOptions::default()
                },
            )
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
            let device = storage::open(&path, &OpenOptions::default())
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            disks.push(LiveDisk::new(format!("vd{i}"), device));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let writers = (0..WRITERS)
            .map(|t| {
                let (disks, stop, error) = (disks.clone(), stop.clone(), error.clone());
                std::thread::spawn(move || write_load(&disks, &stop, &error, t))
            })
            .collect();
        // Let the writers get going.
        std::thread::sleep(Duration::from_millis(20));
        Ok(Rig {
            disks,
            stop,
            error,
            writers,
        })
    }

    /// Stops the writers; fails with the first write error they met.
    fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        for writer in self.writers.drain(..) {
            let _ = writer.join();
        }
        let error = self.error.lock().map(|e| e.clone()).unwrap_or(None);
        error.map_or(Ok(()), Err)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for writer in self.writers.drain(..) {
            let _ = writer.join();
        }
    }
}
