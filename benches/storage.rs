//! Storage engine throughput: qcow2 next to raw on the same access patterns, so the cost of
//! the qcow2 layer (L1/L2 lookup, stripe locks, copy-on-write) reads straight off the report.
//!
//! Groups, each with a `raw` and a `qcow2` function (and a backing-file variant for 4K):
//! - `read_4k_random`: 4 KiB reads at scattered offsets of a fully allocated image;
//!   `qcow2_backing` reads through an empty qcow2 overlay into its qcow2 backing file.
//! - `write_4k_random`: 4 KiB in-place writes to allocated clusters; `qcow2_cow_backing`
//!   writes into an empty overlay over a backing file, so every write allocates a cluster and
//!   copies the rest of it from the backing file (a fresh overlay replaces a full one; creating
//!   and closing overlays is not timed).
//! - `read_1m_seq` / `write_1m_seq`: 1 MiB sequential transfers, wrapping at the end.
//!
//! All I/O is buffered (no `O_DIRECT`): the data stays in the page cache, so these numbers
//! measure the engine's CPU cost per request rather than the disk. `snapvmm img bench -t none`
//! (and `benches/compare-qemu.sh`) cover direct I/O and the comparison with QEMU.
//!
//! Images live in a temporary directory made by the bench: a 1 GiB qcow2 (64 KiB clusters)
//! and a 1 GiB raw file, both written out in full through the engine before measuring.
//! `SNAPVMM_BENCH_IMAGE_MIB` changes the size. The whole run takes about two minutes.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use storage::raw::RawImage;
use storage::{BlockDevice, ImageFormat, OpenOptions};
use test_support::image::snapvmm_create;

const CLUSTER_SIZE: u64 = 64 << 10;
const SMALL: usize = 4 << 10;
const LARGE: usize = 1 << 20;
/// Allocating writes per overlay before a fresh one replaces it (bounds the disk traffic of
/// the copy-on-write case: each such write stores a whole 64 KiB cluster).
const WRITES_PER_OVERLAY: u64 = 4096;

/// xorshift64*: cheap, deterministic scattered offsets.
struct Scatter(u64);

impl Scatter {
    fn new(seed: u64) -> Self {
        Scatter(seed | 1)
    }

    /// A block index below `blocks`.
    fn next(&mut self, blocks: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks
    }
}

/// The images every benchmark runs on.
struct Fixture {
    dir: tempfile::TempDir,
    size: u64,
    raw: Arc<dyn BlockDevice>,
    qcow2: Arc<dyn BlockDevice>,
    /// An empty overlay over the qcow2 image, opened read-only: reads fall through.
    overlay: Arc<dyn BlockDevice>,
    base_path: PathBuf,
    next_overlay: u64,
}

fn open(path: &Path, format: ImageFormat, read_only: bool) -> Arc<dyn BlockDevice> {
    let options = OpenOptions {
        format: Some(format),
        read_only,
        ..OpenOptions::default()
    };
    storage::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes every byte of `device` with a non-zero pattern, so every cluster is allocated and
/// backed by real file blocks.
///
/// Both images are written in cluster-sized pieces (qcow2 splits larger writes at cluster
/// boundaries anyway): the page cache then holds folios of the same size for both files. A
/// raw file written in 1 MiB pieces gets large folios, and every later 4 KiB buffered write
/// into one walks all its buffer heads (`ext4_block_write_begin`), which made raw look 4x
/// slower than qcow2 at 4 KiB writes for reasons that have nothing to do with the engine.
fn fill(device: &dyn BlockDevice) {
    let mut chunk = vec![0u8; CLUSTER_SIZE as usize];
    let mut offset = 0;
    while offset < device.size() {
        let n = (device.size() - offset).min(CLUSTER_SIZE) as usize;
        chunk.fill((offset >> 20) as u8 | 1);
        device.write_at(&chunk[..n], offset).expect("fill image");
        offset += n as u64;
    }
    device.flush().expect("flush filled image");
}

impl Fixture {
    fn new() -> Self {
        let mib: u64 = std::env::var("SNAPVMM_BENCH_IMAGE_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let size = mib << 20;
        let dir = tempfile::Builder::new()
            .prefix("snapvmm-bench-")
            .tempdir()
            .expect("temp dir");
        let raw_path = dir.path().join("disk.raw");
        RawImage::create(&raw_path, size).expect("create raw");
        let base_path = dir.path().join("base.qcow2");
        snapvmm_create(&base_path, Some(size), CLUSTER_SIZE, 3, 16, None);
        let raw = open(&raw_path, ImageFormat::Raw, false);
        let qcow2 = open(&base_path, ImageFormat::Qcow2, false);
        fill(&*raw);
        fill(&*qcow2);
        let overlay_path = dir.path().join("read-overlay.qcow2");
        create_overlay(&overlay_path, &base_path);
        let overlay = open(&overlay_path, ImageFormat::Qcow2, true);
        Fixture {
            dir,
            size,
            raw,
            qcow2,
            overlay,
            base_path,
            next_overlay: 0,
        }
    }

    /// A fresh, empty, writable overlay over the qcow2 image.
    fn fresh_overlay(&mut self) -> (Arc<dyn BlockDevice>, PathBuf) {
        self.next_overlay += 1;
        let path = self
            .dir
            .path()
            .join(format!("cow-{}.qcow2", self.next_overlay));
        create_overlay(&path, &self.base_path);
        (open(&path, ImageFormat::Qcow2, false), path)
    }
}

fn create_overlay(path: &Path, backing: &Path) {
    let backing = backing.to_string_lossy();
    snapvmm_create(
        path,
        None,
        CLUSTER_SIZE,
        3,
        16,
        Some((&backing, ImageFormat::Qcow2)),
    );
}

fn read_4k_random(c: &mut Criterion, fx: &Fixture) {
    let blocks = fx.size / SMALL as u64;
    let mut group = c.benchmark_group("read_4k_random");
    group.throughput(Throughput::Bytes(SMALL as u64));
    let devices = [
        ("raw", &fx.raw),
        ("qcow2", &fx.qcow2),
        ("qcow2_backing", &fx.overlay),
    ];
    for (name, device) in devices {
        group.bench_function(name, |b| {
            let mut scatter = Scatter::new(0x5eed);
            let mut buf = vec![0u8; SMALL];
            b.iter(|| {
                let offset = scatter.next(blocks) * SMALL as u64;
                device.read_at(&mut buf, offset).expect("read");
                black_box(&buf);
            });
        });
    }
    group.finish();
}

fn write_4k_random(c: &mut Criterion, fx: &mut Fixture) {
    let blocks = fx.size / SMALL as u64;
    let mut group = c.benchmark_group("write_4k_random");
    group.throughput(Throughput::Bytes(SMALL as u64));
    for (name, device) in [("raw", fx.raw.clone()), ("qcow2", fx.qcow2.clone())] {
        group.bench_function(name, |b| {
            let mut scatter = Scatter::new(0xfeed);
            let buf = vec![0xa5u8; SMALL];
            // Each sample starts from clean page cache, not behind the previous one's
            // dirty pages (the flush is not timed).
            device.flush().expect("flush");
            b.iter(|| {
                let offset = scatter.next(blocks) * SMALL as u64;
                device.write_at(&buf, offset).expect("write");
            });
        });
    }

    // Every timed write lands in a cluster the overlay does not hold yet. Clusters are
    // visited in a scattered order (an odd stride modulo a power of two is a permutation).
    let clusters = fx.size / CLUSTER_SIZE;
    let per_overlay = WRITES_PER_OVERLAY.min(clusters);
    let stride = (clusters / 2 + 0x9e37) | 1;
    group.sample_size(10);
    group.bench_function("qcow2_cow_backing", |b| {
        let buf = vec![0x3cu8; SMALL];
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let (overlay, path) = fx.fresh_overlay();
                let n = (iters - done).min(per_overlay);
                let start = Instant::now();
                for i in 0..n {
                    let cluster = (i * stride) % clusters;
                    let block = i % (CLUSTER_SIZE / SMALL as u64);
                    let offset = cluster * CLUSTER_SIZE + block * SMALL as u64;
                    overlay.write_at(&buf, offset).expect("allocating write");
                }
                timed += start.elapsed();
                drop(overlay);
                std::fs::remove_file(&path).expect("remove overlay");
                done += n;
            }
            timed
        });
    });
    group.finish();
}

fn sequential_1m(c: &mut Criterion, fx: &Fixture, write: bool) {
    let chunks = fx.size / LARGE as u64;
    let name = if write { "write_1m_seq" } else { "read_1m_seq" };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(LARGE as u64));
    for (name, device) in [("raw", &fx.raw), ("qcow2", &fx.qcow2)] {
        group.bench_function(name, |b| {
            let mut buf = vec![0x5au8; LARGE];
            let mut chunk = 0u64;
            if write {
                device.flush().expect("flush");
            }
            b.iter(|| {
                let offset = chunk * LARGE as u64;
                chunk = (chunk + 1) % chunks;
                if write {
                    device.write_at(&buf, offset).expect("write");
                } else {
                    device.read_at(&mut buf, offset).expect("read");
                    black_box(&buf);
                }
            });
        });
    }
    group.finish();
}

fn storage_benches(c: &mut Criterion) {
    let mut fx = Fixture::new();
    read_4k_random(c, &fx);
    sequential_1m(c, &fx, false);
    write_4k_random(c, &mut fx);
    sequential_1m(c, &fx, true);
}

criterion_group! {
    name = benches;
    // Short runs: ten functions at ~4 s each plus the image setup stay near two minutes.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = storage_benches
}
criterion_main!(benches);
