//! Shared by the `live_*` tests: self-verifying blocks, a model of what each disk must
//! hold, writer threads, and qemu-img checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use std::sync::Mutex;
use storage::qcow2::{create, CreateOptions};
use storage::{BlockDevice, ImageFormat, LiveDisk, OpenOptions};

/// Bytes per test block: the guest's 4K random-write unit.
pub const BLOCK: u64 = 4096;

/// Whether qemu-img runs here; explains a skip unless SNAPVMM_REQUIRE_QEMU=1 makes it fail.
pub fn have_qemu(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var("SNAPVMM_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: qemu-img not found and SNAPVMM_REQUIRE_QEMU=1");
    }
    eprintln!("skipping the qemu-img part of {test}: qemu-img is not installed");
    false
}

/// Contents of `block` at generation `gen` (0: never written, reads as zeroes). The first
/// 16 bytes name the block and generation, so a misplaced or stale block is recognised.
pub fn block_data(disk: u64, block: u64, gen: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    if gen == 0 {
        return out;
    }
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x = (disk << 48) ^ (block << 20) ^ gen ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The generation a block holds, judged from its contents (None: not a valid block).
pub fn generation_of(disk: u64, block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (block_data(disk, block, gen) == data).then_some(gen)
}

/// What each block of one disk must hold.
#[derive(Debug, Default)]
pub struct Model {
    pub gens: Mutex<HashMap<u64, u64>>,
}

impl Model {
    pub fn expect(&self, block: u64) -> u64 {
        self.gens.lock().unwrap().get(&block).copied().unwrap_or(0)
    }
}

/// Creates a qcow2 image.
pub fn qcow2(path: &Path, size: u64, cluster_size: u64, backing: Option<&Path>) {
    create(
        path,
        &CreateOptions {
            size: Some(size),
            cluster_size,
            backing_file: backing.map(|b| b.display().to_string()),
            backing_format: backing.map(|_| ImageFormat::Qcow2),
            ..CreateOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Opens an image with its chain, writable.
pub fn open(path: &Path) -> Arc<dyn BlockDevice> {
    storage::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes generation `gen` of every `stride`-th block starting at `first` of `path`'s top
/// layer (to build backing files), recording it in `model`.
pub fn fill(path: &Path, disk: u64, blocks: u64, first: u64, stride: u64, gen: u64, model: &Model) {
    let dev = open(path);
    let mut b = first;
    while b < blocks {
        dev.write_at(&block_data(disk, b, gen), b * BLOCK)
            .unwrap_or_else(|e| panic!("fill {}: {e}", path.display()));
        model.gens.lock().unwrap().insert(b, gen);
        b += stride;
    }
    dev.flush().unwrap();
}

/// Asserts that every block of `read` (a disk or a chain) equals the model.
pub fn verify(disk: u64, blocks: u64, model: &Model, read: impl Fn(&mut [u8], u64), what: &str) {
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..blocks {
        // Writers may still be running: a block's generation only grows, and a writer records
        // it only after its write completed. So the read sees at least the model's value from
        // before the read, and anything newer than the model's value after the read can only
        // be a writer's write in flight (writer generations start at 1_000_000).
        let before = model.expect(b);
        read(&mut buf, b * BLOCK);
        let after = model.expect(b);
        let got = generation_of(disk, b, &buf);
        assert!(
            got.is_some_and(|g| g >= before && (g <= after || g >= 1_000_000)),
            "{what}: block {b} of disk {disk}: read generation {got:?}, model {before}..={after}"
        );
    }
}

/// Writer threads doing verified random 4K writes through a live disk. Each thread owns the
/// blocks congruent to its index, so the model has one writer per block.
pub struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
    pub writes: Arc<AtomicU64>,
}

impl Writers {
    /// Starts `threads` writers on `disk` (numbered `disk_no` in block contents); each
    /// sleeps `pause` between writes (zero: as fast as it can).
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
                    let mut gen = 1_000_000 * (t + 1);
                    while !stop.load(Ordering::Relaxed) {
                        let b = rng.random_range(0..blocks / threads) * threads + t;
                        gen += 1;
                        live.write_at(&block_data(disk_no, b, gen), b * BLOCK)
                            .unwrap_or_else(|e| panic!("write block {b}: {e}"));
                        model.gens.lock().unwrap().insert(b, gen);
                        n += 1;
                        writes.fetch_add(1, Ordering::Relaxed);
                        if n % 8 == 0 {
                            let r = rng.random_range(0..blocks / threads) * threads + t;
                            live.read_at(&mut buf, r * BLOCK).unwrap();
                            assert_eq!(
                                generation_of(disk_no, r, &buf),
                                Some(model.expect(r)),
                                "read-back of block {r} on disk {disk_no}"
                            );
                        }
                        if n % 64 == 0 {
                            live.flush().unwrap();
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

/// `qemu-img check` must find no errors and no leaks.
pub fn assert_qemu_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: status {:?}\n{text}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` must find no corruption (leaked clusters, status 3, are allowed: a
/// crash may leak clusters but never corrupt).
pub fn assert_qemu_check_consistent(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check {}: status {:?}\n{}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files of `path`'s backing chain as `qemu-img info --backing-chain` sees them.
pub fn qemu_chain(path: &Path) -> Vec<PathBuf> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(path)
        .output()
        .expect("run qemu-img info");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    json.as_array()
        .expect("array")
        .iter()
        .map(|layer| {
            let name = layer["filename"].as_str().expect("filename");
            std::fs::canonicalize(name).unwrap_or_else(|_| PathBuf::from(name))
        })
        .collect()
}

/// Asserts that `qemu-img info --backing-chain` lists exactly `expected`, top first.
pub fn assert_qemu_chain(top: &Path, expected: &[&Path]) {
    let want: Vec<PathBuf> = expected
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .collect();
    assert_eq!(qemu_chain(top), want, "backing chain of {}", top.display());
}
