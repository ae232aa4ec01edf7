//! What each block of a live disk must hold while writer threads run: the generation
//! [`Model`], [`fill`] to build backing files, [`verify`] to read a disk against the model,
//! and [`Writers`] doing verified random 4 KiB writes. Blocks are the self-verifying
//! [`crate::pattern::block_data`] blocks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use storage::LiveDisk;

use crate::image::open_rw;
use crate::pattern::{block_data, generation_of, BLOCK};

/// The first generation a [`Writers`] thread writes: above any [`fill`] generation, so a
/// read that sees a newer block than the model knows can tell a write in flight.
pub const WRITER_GENERATIONS: u64 = 1_000_000;

/// What each block of one disk must hold.
#[derive(Debug, Default)]
pub struct Model {
    /// Block number to generation; a missing block is generation 0 (zeroes).
    pub gens: Mutex<HashMap<u64, u64>>,
    /// Per block: writes begun ([`Model::begin`]) and writes recorded ([`Model::record`]),
    /// so that [`verify`] can tell whether a write of a block overlapped a read of it.
    counts: Mutex<HashMap<u64, WriteCounts>>,
}

/// Writes of one block begun and recorded so far.
#[derive(Debug, Default, Clone, Copy)]
struct WriteCounts {
    begun: u64,
    recorded: u64,
}

impl Model {
    /// The generation `block` must hold.
    pub fn expect(&self, block: u64) -> u64 {
        self.gens().get(&block).copied().unwrap_or(0)
    }

    /// Notes that a write of `block` starts (a [`Writers`] thread calls this right before it
    /// writes, and [`Model::record`] once the write completed).
    pub fn begin(&self, block: u64) {
        lock(&self.counts).entry(block).or_default().begun += 1;
    }

    /// Records that `block` now holds generation `gen`.
    pub fn record(&self, block: u64, gen: u64) {
        self.gens().insert(block, gen);
        lock(&self.counts).entry(block).or_default().recorded += 1;
    }

    fn counts(&self, block: u64) -> WriteCounts {
        lock(&self.counts).get(&block).copied().unwrap_or_default()
    }

    /// The map, even after a writer thread panicked while holding it (its panic is reported
    /// by [`Writers::stop`]).
    fn gens(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        lock(&self.gens)
    }
}

/// The map, even after a writer thread panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes generation `gen` of every `stride`-th block starting at `first` of `path`'s top
/// layer (to build backing files), recording it in `model`.
pub fn fill(path: &Path, disk: u64, blocks: u64, first: u64, stride: u64, gen: u64, model: &Model) {
    let dev = open_rw(path);
    let mut b = first;
    while b < blocks {
        dev.write_at(&block_data(disk, b, gen), b * BLOCK)
            .unwrap_or_else(|e| panic!("fill {}: {e}", path.display()));
        model.record(b, gen);
        b += stride;
    }
    dev.flush()
        .unwrap_or_else(|e| panic!("flush {}: {e}", path.display()));
}

/// Asserts that every block of `read` (a disk or a chain) equals the model.
pub fn verify(disk: u64, blocks: u64, model: &Model, read: impl Fn(&mut [u8], u64), what: &str) {
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..blocks {
        // Writers may still be running: a block's generation only grows, and a writer records
        // it only after its write completed. So the read sees at least the model's value from
        // before the read, and anything newer than the model's value after the read can only
        // be a writer's write in flight.
        let before = model.expect(b);
        let recorded_before = model.counts(b).recorded;
        read(&mut buf, b * BLOCK);
        let after = model.expect(b);
        let got = generation_of(disk, b, &buf);
        // A read racing a write of the same block may return a mix of old and new bytes:
        // buffered reads and writes of a page are not atomic against each other (the kernel
        // copies without a lock, and fast string copies may store out of order), nor are a
        // disk's overlapping requests. Only a write begun before the read ended and not
        // recorded before it started can have overlapped it; then, and only then, a block
        // that is no valid generation is no error.
        if got.is_none() && model.counts(b).begun > recorded_before {
            continue;
        }
        assert!(
            got.is_some_and(|g| g >= before && (g <= after || g >= WRITER_GENERATIONS)),
            "{what}: block {b} of disk {disk}: read generation {got:?}, model {before}..={after}"
        );
    }
}

/// Writer threads doing verified random 4K writes through a live disk. Each thread owns the
/// blocks congruent to its index, so the model has one writer per block.
pub struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
    /// Writes completed so far, all threads together.
    pub writes: Arc<AtomicU64>,
}

impl Writers {
    /// Starts `threads` writers on `live` (numbered `disk_no` in block contents) over its
    /// first `blocks` blocks; each sleeps `pause` between writes (zero: as fast as it can).
    pub fn start(
        live: &Arc<LiveDisk>,
        disk_no: u64,
        blocks: u64,
        model: &Arc<Model>,
        threads: u64,
        pause: Duration,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let handles = (0..threads)
            .map(|t| {
                let (live, model, stop, writes) =
                    (live.clone(), model.clone(), stop.clone(), writes.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(disk_no * 1000 + t);
                    let mut buf = vec![0u8; BLOCK as usize];
                    let mut n = 0u64;
                    // Generations above any fill() generation, unique per thread.
                    let mut gen = WRITER_GENERATIONS * (t + 1);
                    while !stop.load(Ordering::Relaxed) {
                        let b = rng.random_range(0..blocks / threads) * threads + t;
                        gen += 1;
                        model.begin(b);
                        live.write_at(&block_data(disk_no, b, gen), b * BLOCK)
                            .unwrap_or_else(|e| panic!("write block {b}: {e}"));
                        model.record(b, gen);
                        n += 1;
                        writes.fetch_add(1, Ordering::Relaxed);
                        if n % 8 == 0 {
                            let r = rng.random_range(0..blocks / threads) * threads + t;
                            live.read_at(&mut buf, r * BLOCK)
                                .unwrap_or_else(|e| panic!("read block {r}: {e}"));
                            assert_eq!(
                                generation_of(disk_no, r, &buf),
                                Some(model.expect(r)),
                                "read-back of block {r} on disk {disk_no}"
                            );
                        }
                        if n % 64 == 0 {
                            live.flush()
                                .unwrap_or_else(|e| panic!("flush disk {disk_no}: {e}"));
                        }
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                    n
                })
            })
            .collect();
        Writers {
            stop,
            threads: handles,
            writes,
        }
    }

    /// Stops the writers (propagating their panics) and returns the number of writes.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .sum()
    }
}
