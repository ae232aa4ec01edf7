//! Checkpoint benchmarks on micro-guest VMs (KVM needed; skipped with a note without it).
//!
//! - `save/{idle,dirty}/{MiB}`: a full checkpoint of a paused VM, fsync included. *idle*: the
//!   counter guest, which touches a few pages; *dirty*: every page of guest RAM written
//!   (non-zero) by the host first. Throughput is the guest RAM size.
//! - `plain_write/{MiB}`: writing the same number of bytes sequentially to a file and
//!   fsyncing it: the bandwidth a dirty save is compared with (ratio in the report).
//! - `live_pause/{MiB}`: the vCPU stop of a live checkpoint of the counter guest (small
//!   working set), measured by the checkpointer from pause to resume.
//! - `restore/{MiB}`: `Vmm::restore` of a full checkpoint until its vCPU threads are started
//!   (the next thing they do is enter the guest).
//! - `revert/{MiB}`: an in-place revert of a running counter guest, pause to resume.
//!
//! `SNAPVMM_BENCH_CKPT_MIB` (comma-separated, default `128,512,1024`) picks the sizes of
//! the save and plain-write groups; the others use 1024 MiB. Files go under
//! `SNAPVMM_BENCH_DIR` or the system temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use test_support::require::have_kvm;
use vmm::{CheckpointOptions, Vmm};

// The shipped `snapvmm bench`'s counter guest (a self-contained module of the binary), so
// that this bench and `snapvmm bench` measure the same thing.
#[path = "../src/bench/counter_guest.rs"]
mod counter_guest;

fn sizes() -> Vec<u64> {
    std::env::var("SNAPVMM_BENCH_CKPT_MIB")
        .unwrap_or_else(|_| "128,512,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("SNAPVMM_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

/// A counter micro-guest of `mib` MiB, booted for 100 ms.
fn counter_vm(mib: u64) -> Vmm {
    counter_guest::counter_vm(mib).expect("start VM")
}

fn save(c: &mut Criterion) {
    if !have_kvm("checkpoint benches") {
        return;
    }
    let mut group = c.benchmark_group("save");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    let dir = bench_dir();
    for mib in sizes() {
        for kind in ["idle", "dirty"] {
            let vmm = counter_vm(mib);
            vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
            if kind == "dirty" {
                counter_guest::dirty_all(&vmm).expect("dirty guest RAM");
            }
            let target: PathBuf = dir.path().join(format!("save-{kind}-{mib}"));
            group.throughput(Throughput::Bytes(mib << 20));
            group.bench_function(BenchmarkId::new(kind, mib), |b| {
                b.iter_custom(|iterations| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        // A checkpoint never overwrites one: clear the last (untimed).
                        let _ = std::fs::remove_dir_all(&target);
                        let started = std::time::Instant::now();
                        vmm.checkpointer()
                            .checkpoint(&target, CheckpointOptions::default())
                            .unwrap();
                        total += started.elapsed();
                    }
                    total
                })
            });
            vmm.pause_gate().resume();
            vmm.stop().unwrap();
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    group.finish();

    let mut group = c.benchmark_group("plain_write");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    for mib in sizes() {
        let buffer: Vec<u8> = (0..(mib << 20)).map(|i| (i >> 12) as u8 | 1).collect();
        let path = dir.path().join(format!("plain-{mib}"));
        group.throughput(Throughput::Bytes(mib << 20));
        group.bench_function(BenchmarkId::from_parameter(mib), |b| {
            b.iter(|| plain_write(&path, &buffer))
        });
        let _ = std::fs::remove_file(&path);
    }
    group.finish();
}

/// What a checkpoint's memory write competes with: create, write in 8 MiB pieces, fsync.
fn plain_write(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).unwrap();
    for chunk in bytes.chunks(8 << 20) {
        file.write_all(chunk).unwrap();
    }
    file.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn live_pause(c: &mut Criterion) {
    if !have_kvm("checkpoint benches") {
        return;
    }
    let mut group = c.benchmark_group("live_pause");
    group.sample_size(20).warm_up_time(Duration::from_secs(1));
    let dir = bench_dir();
    let mib = 1024;
    let vmm = counter_vm(mib);
    let target = dir.path().join("live");
    let mut pauses = Vec::new();
    group.bench_function(BenchmarkId::from_parameter(mib), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let pause_us = counter_guest::live_checkpoint(&vmm, &target).unwrap();
                let pause = Duration::from_micros(pause_us);
                pauses.push(pause);
                total += pause;
            }
            total
        })
    });
    group.finish();
    pauses.sort();
    if !pauses.is_empty() {
        eprintln!(
            "live_pause/{mib}: p50 {:?} p99 {:?} max {:?} over {} checkpoints",
            pauses[pauses.len() / 2],
            pauses[pauses.len() * 99 / 100],
            pauses[pauses.len() - 1],
            pauses.len()
        );
    }
    vmm.stop().unwrap();
}

fn restore_and_revert(c: &mut Criterion) {
    if !have_kvm("checkpoint benches") {
        return;
    }
    let dir = bench_dir();
    let mib = 1024;
    let target = dir.path().join("restore");
    let vmm = counter_vm(mib);
    vmm.checkpointer()
        .checkpoint(&target, CheckpointOptions::default())
        .unwrap();

    let mut group = c.benchmark_group("revert");
    group.sample_size(20).warm_up_time(Duration::from_secs(1));
    group.bench_function(BenchmarkId::from_parameter(mib), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += vmm.checkpointer().revert(&target).unwrap();
            }
            total
        })
    });
    group.finish();
    vmm.stop().unwrap();

    let mut group = c.benchmark_group("restore");
    group.sample_size(20).warm_up_time(Duration::from_secs(1));
    group.bench_function(BenchmarkId::from_parameter(mib), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                let restored = Vmm::restore(&target, Box::new(std::io::sink()), false).unwrap();
                total += started.elapsed();
                restored.stop().unwrap();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, save, live_pause, restore_and_revert);
criterion_main!(benches);
