//! Internal snapshot create / apply / delete on a 10 GiB fully mapped image.
//!
//! The image lives on tmpfs (/dev/shm) so the figures measure the metadata work (O(metadata),
//! refcounts batched per block) rather than this host's fsync latency (~7 ms each on the
//! build machine's disk); the whole-process comparison with qemu-img on a real disk is
//! `benches/compare-snapshots.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use storage::qcow2::Qcow2Image;
use storage::OpenOptions;

fn make_image(dir: &Path) -> Option<PathBuf> {
    let path = dir.join("big.qcow2");
    let ok = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&path)
        .arg("10G")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping internal snapshot benches: qemu-img is needed to build the image");
        return None;
    }
    Some(path)
}

fn bench(c: &mut Criterion) {
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let Some(path) = make_image(base.path()) else {
        return;
    };
    let mut image = Qcow2Image::open(&path, &OpenOptions::default()).expect("open");
    image.create_snapshot("base", 0, 0).expect("base snapshot");

    let mut group = c.benchmark_group("internal-snapshot-10GiB");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("create", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                image.create_snapshot("tmp", 0, 0).expect("create");
                total += start.elapsed();
                image.delete_snapshot("tmp").expect("delete");
            }
            total
        })
    });
    group.bench_function("delete", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                image.create_snapshot("tmp", 0, 0).expect("create");
                let start = Instant::now();
                image.delete_snapshot("tmp").expect("delete");
                total += start.elapsed();
            }
            total
        })
    });
    group.bench_function("apply", |b| {
        b.iter(|| image.apply_snapshot("base").expect("apply"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
