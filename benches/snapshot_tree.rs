//! Snapshot tree benchmarks (`snapshot::tree`), on one sparse 1 GiB qcow2 disk holding
//! `SNAPVMM_BENCH_TREE_MIB` (default 64) MiB of data, no VM (disk-only snapshots):
//!
//! - `revert/external`: revert to an external snapshot: a fresh overlay on its frozen image,
//!   the disk switched, the overlay left behind deleted, the metadata rewritten (fsync).
//! - `revert/internal_in_place`: revert to an internal snapshot of the active image (the
//!   image reopened, the snapshot applied).
//! - `create_delete/external`: take an external snapshot and delete it again at once (the
//!   frozen image, holding nothing new, streamed into the active one).
//! - `delete_merge/stream`: delete a snapshot whose image holds all the data, the disk's
//!   active image built on it: a stream job copies every MiB up.
//!
//! Buffered I/O: the page cache holds the data, so this measures the tree and the engines.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use snapshot::tree::{DeleteOptions, SnapshotTree, TakeOptions};
use storage::LiveDisk;
use test_support::image::{open_rw, qcow2};

const GIB: u64 = 1 << 30;

fn data_mib() -> u64 {
    std::env::var("SNAPVMM_BENCH_TREE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// A tree over one fresh disk in `dir` whose active image holds `mib` MiB of data.
fn setup(dir: &Path, mib: u64) -> (Arc<LiveDisk>, SnapshotTree) {
    let path = dir.join("vda.qcow2");
    qcow2(&path, GIB, None);
    let disk = LiveDisk::new("vda", open_rw(&path));
    fill(&disk, mib);
    let tree =
        SnapshotTree::open(dir.join("snapshots.json"), vec![disk.clone()], None).expect("tree");
    (disk, tree)
}

fn fill(disk: &LiveDisk, mib: u64) {
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..mib {
        disk.write_at(&chunk, i << 20).expect("write");
    }
    disk.flush().expect("flush");
}

fn revert(c: &mut Criterion) {
    let mut group = c.benchmark_group("revert");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let (disk, tree) = setup(dir.path(), data_mib());
    tree.create("s", &TakeOptions::disk_only())
        .expect("snapshot");
    group.bench_function("external", |b| {
        b.iter(|| {
            disk.write_at(&[1; 4096], 0).expect("write");
            tree.revert("s").expect("revert");
        })
    });
    drop((tree, disk));

    let dir = tempfile::tempdir().expect("tempdir");
    let (disk, tree) = setup(dir.path(), data_mib());
    tree.create("i", &TakeOptions::internal(false))
        .expect("snapshot");
    group.bench_function("internal_in_place", |b| {
        b.iter(|| {
            disk.write_at(&[1; 4096], 0).expect("write");
            tree.revert("i").expect("revert");
        })
    });
    group.finish();
}

fn create_delete(c: &mut Criterion) {
    let mut group = c.benchmark_group("create_delete");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let (_disk, tree) = setup(dir.path(), data_mib());
    // The disk's own image stays; the tree's overlays come and go above it.
    tree.create("base", &TakeOptions::disk_only())
        .expect("snapshot");
    group.bench_function("external", |b| {
        b.iter(|| {
            tree.create("x", &TakeOptions::disk_only()).expect("create");
            tree.delete("x", &DeleteOptions::default()).expect("delete");
        })
    });
    group.finish();
}

fn delete_merge(c: &mut Criterion) {
    let mib = data_mib();
    let mut group = c.benchmark_group("delete_merge");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(mib << 20));
    group.bench_function("stream", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let (disk, tree) = setup(dir.path(), 0);
                tree.create("a", &TakeOptions::disk_only()).expect("a");
                fill(&disk, mib);
                tree.create("b", &TakeOptions::disk_only()).expect("b");
                (dir, disk, tree)
            },
            |(dir, disk, tree)| {
                tree.delete("b", &DeleteOptions::default()).expect("delete");
                (dir, disk, tree)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, revert, create_delete, delete_merge);
criterion_main!(benches);
