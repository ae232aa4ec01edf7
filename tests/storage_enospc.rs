//! Out of space: a child process writes to a qcow2 image under an `RLIMIT_FSIZE` limit a
//! little above the file's size, so that allocations (data clusters, L2 tables, refcount
//! blocks, a moved refcount table) fail part-way with `EFBIG` as they would with `ENOSPC`.
//! The engine must return errors, never panic; afterwards
//! - `qemu-img check` finds no corruption (leaks allowed): no cluster still referenced may
//!   have lost its refcount (DESIGN.md §3, "leaked-but-live clusters after ENOSPC"),
//! - every write acknowledged before a successful flush reads back, and no sector holds
//!   data nobody wrote,
//! - without the limit the image takes writes again, and `qemu-img check -r leaks` leaves it
//!   clean.
//!
//! The child is this test binary re-executed with `SNAPVMM_ENOSPC_CHILD` set (the
//! `enospc_child_process` test turns into the writer; in a normal run it does nothing).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use storage::OpenOptions;
use test_support::image::snapvmm_create;
use test_support::qemu::{assert_check_clean, assert_check_consistent, qemu_img};
use test_support::require::have_qemu;

const CHILD_ENV: &str = "SNAPVMM_ENOSPC_CHILD";
const SECTOR: u64 = 512;
const OPS: u64 = 400;

#[derive(Debug, Clone, Copy)]
enum SectorOp {
    Write { sector: u64, count: u64 },
    Zeroes { sector: u64, count: u64 },
    Discard { sector: u64, count: u64 },
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Operation `seq` of the run with `seed` (mostly writes to fresh places, so the file grows).
fn op_at(seed: u64, seq: u64, size: u64, cluster_size: u64) -> SectorOp {
    let r = splitmix(seed ^ splitmix(seq));
    let sectors = size / SECTOR;
    let per_cluster = cluster_size / SECTOR;
    let mut sector = (r >> 8) % sectors;
    if r & 1 == 0 {
        sector = sector / per_cluster * per_cluster;
    }
    let count = match (r >> 1) % 3 {
        0 => 1 + (r >> 40) % 8,
        1 => per_cluster,
        _ => 1 + (r >> 40) % (4 * per_cluster),
    }
    .min(sectors - sector);
    match (r >> 4) % 10 {
        0..=7 => SectorOp::Write { sector, count },
        8 => SectorOp::Zeroes { sector, count },
        _ => SectorOp::Discard { sector, count },
    }
}

/// Marks this file's sector tags (see `test_support::pattern::sector_tag`).
const MARKER: u8 = 0xc3;

fn sector_data(seq: u64, sector: u64, count: u64) -> Vec<u8> {
    test_support::pattern::tagged_sectors(MARKER, seq, sector, count)
}

/// `image log limit seed size cluster_size`
fn child_main(spec: &str) {
    let f: Vec<&str> = spec.split(' ').collect();
    let (image, log) = (PathBuf::from(f[0]), PathBuf::from(f[1]));
    let num = |i: usize| f[i].parse::<u64>().expect("number in child spec");
    let (limit, seed, size, cluster_size) = (num(2), num(3), num(4), num(5));
    let mut log = std::fs::File::create(log).expect("child: create log");
    // SAFETY: plain libc calls with valid arguments; SIGXFSZ ignored so that writes past the
    // limit fail with EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut current), 0);
        let wanted = libc::rlimit {
            rlim_cur: limit,
            rlim_max: current.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &wanted), 0, "setrlimit");
    }
    let disk = storage::open(&image, &OpenOptions::default()).expect("child: open");
    let mut lines = String::new();
    for seq in 0..OPS {
        let result = match op_at(seed, seq, size, cluster_size) {
            SectorOp::Write { sector, count } => {
                disk.write_at(&sector_data(seq, sector, count), sector * SECTOR)
            }
            SectorOp::Zeroes { sector, count } => {
                disk.write_zeroes(sector * SECTOR, count * SECTOR)
            }
            SectorOp::Discard { sector, count } => disk.discard(sector * SECTOR, count * SECTOR),
        };
        lines.push_str(&format!("op {seq} {}\n", result.is_ok()));
        if seq % 5 == 4 || seq == OPS - 1 {
            let result = disk.flush();
            lines.push_str(&format!("flush {seq} {}\n", result.is_ok()));
        }
    }
    // The log stays far below the limit.
    log.write_all(lines.as_bytes()).expect("child: write log");
    drop(disk);
    std::process::exit(0);
}

/// Not a test of its own: the entry point of the child (see the module doc).
#[test]
fn enospc_child_process() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(&spec);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Old,
    Tag(u64),
    Zero,
}

fn effects(op: SectorOp, seq: u64, cluster_size: u64, size: u64) -> Vec<(u64, Value)> {
    match op {
        SectorOp::Write { sector, count } => (sector..sector + count)
            .map(|l| (l, Value::Tag(seq)))
            .collect(),
        SectorOp::Zeroes { sector, count } => {
            (sector..sector + count).map(|l| (l, Value::Zero)).collect()
        }
        SectorOp::Discard { sector, count } => {
            let (start, end) = (sector * SECTOR, (sector + count) * SECTOR);
            let mut out = Vec::new();
            let mut at = start;
            while at < end {
                let n = (cluster_size - at % cluster_size).min(end - at);
                if at % cluster_size == 0 && (n == cluster_size || at + n == size) {
                    out.extend((at / SECTOR..(at + n) / SECTOR).map(|l| (l, Value::Zero)));
                }
                at += n;
            }
            out
        }
    }
}

fn matches(value: Value, actual: &[u8], lba: u64, old: &[u8]) -> bool {
    let at = (lba * SECTOR) as usize;
    match value {
        Value::Old => actual == &old[at..at + SECTOR as usize],
        Value::Tag(seq) => test_support::pattern::holds_tag(MARKER, seq, lba, actual),
        Value::Zero => actual.iter().all(|&b| b == 0),
    }
}

struct Config {
    name: &'static str,
    cluster_size: u64,
    refcount_bits: u32,
    size: u64,
    /// Guest bytes written before the trial, so the file starts near a refcount boundary.
    prefill: u64,
    /// Put the limit within 64 KiB after this file size (where the refcount table must
    /// move) rather than anywhere in the next 256 KiB.
    limit_near: Option<u64>,
}

/// The header's refcount_table_offset.
fn refcount_table_offset(image: &std::path::Path) -> u64 {
    let header = std::fs::read(image).expect("read image");
    u64::from_be_bytes(header[48..56].try_into().expect("8 bytes"))
}

/// One trial; returns how many operations and flushes failed, and whether the refcount
/// table moved while the child ran.
fn trial(config: &Config, seed: u64, rng: &mut impl Rng) -> (u64, u64, bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("full.qcow2");
    snapvmm_create(
        &image,
        Some(config.size),
        config.cluster_size,
        3,
        config.refcount_bits,
        None,
    );
    let disk = test_support::image::open_rw(&image);
    for at in (0..config.prefill).step_by(1 << 16) {
        let len = (1u64 << 16).min(config.prefill - at);
        disk.write_at(&test_support::pattern::pattern(at, len as usize), at)
            .expect("prefill");
    }
    drop(disk);
    let old = test_support::image::read_all(&*test_support::image::open_ro(&image));
    let table_before = refcount_table_offset(&image);
    let len = std::fs::metadata(&image).expect("stat").len();
    let limit = match config.limit_near {
        Some(near) => near.max(len) + rng.random_range(0..64 << 10),
        None => len + rng.random_range(0..256 << 10),
    };
    let extra = limit - len;
    let log = dir.path().join("log");
    let stderr = dir.path().join("stderr");
    let spec = format!(
        "{} {} {limit} {seed} {} {}",
        image.display(),
        log.display(),
        config.size,
        config.cluster_size
    );
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "enospc_child_process",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr"))
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{}: child hangs", config.name);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        status.success(),
        "{} (seed {seed}, limit +{extra}): the child failed ({status}) instead of getting errors:\n{}",
        config.name,
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log).expect("child log");
    let mut op_ok = vec![false; OPS as usize];
    let mut last_good_flush: Option<u64> = None;
    let (mut failed_ops, mut failed_flushes) = (0, 0);
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let seq: u64 = f[1].parse().expect("seq");
        let ok = f[2] == "true";
        match f[0] {
            "op" => {
                op_ok[seq as usize] = ok;
                failed_ops += u64::from(!ok);
            }
            _ => {
                failed_flushes += u64::from(!ok);
                if ok {
                    last_good_flush = Some(seq);
                }
            }
        }
    }
    let what = format!("{} (seed {seed}, limit +{extra})", config.name);
    assert_check_consistent(&image);
    let table_moved = refcount_table_offset(&image) != table_before;

    // Each sector: the last acknowledged value before the last good flush, or anything a
    // failed operation or an operation after that flush wrote.
    let sectors = (config.size / SECTOR) as usize;
    let mut durable = vec![Value::Old; sectors];
    let mut others: Vec<Vec<Value>> = vec![Vec::new(); sectors];
    for seq in 0..OPS {
        let op = op_at(seed, seq, config.size, config.cluster_size);
        let covered = last_good_flush.is_some_and(|f| seq <= f);
        for (lba, value) in effects(op, seq, config.cluster_size, config.size) {
            if covered && op_ok[seq as usize] {
                durable[lba as usize] = value;
            } else {
                others[lba as usize].push(value);
            }
        }
    }
    let actual = test_support::image::read_all(&*test_support::image::open_ro(&image));
    for lba in 0..sectors {
        let got = &actual[lba * SECTOR as usize..(lba + 1) * SECTOR as usize];
        let ok = std::iter::once(&durable[lba])
            .chain(others[lba].iter())
            .any(|&v| matches(v, got, lba as u64, &old));
        assert!(
            ok,
            "{what}: sector {lba} holds {:02x?}, expected {:?} or one of {:?}",
            &got[..16],
            durable[lba],
            others[lba]
        );
    }
    // With room again: more writes, a clean close, and a repair of the leaks leaves nothing.
    let disk = test_support::image::open_rw(&image);
    disk.write_at(
        &vec![0x77u8; 3 * config.cluster_size as usize],
        config.size / 2,
    )
    .expect("write with room again");
    drop(disk);
    assert_check_consistent(&image);
    qemu_img(&[
        "check".as_ref(),
        "-q".as_ref(),
        "-r".as_ref(),
        "leaks".as_ref(),
        image.as_os_str(),
    ]);
    assert_check_clean(&image);
    (failed_ops, failed_flushes, table_moved)
}

#[test]
fn running_out_of_space_never_corrupts() {
    if !have_qemu("running_out_of_space_never_corrupts") {
        return;
    }
    let seed = std::env::var("SNAPVMM_ENOSPC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("out-of-space trials: SNAPVMM_ENOSPC_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let configs = [
        Config {
            name: "64 KiB clusters",
            cluster_size: 65536,
            refcount_bits: 16,
            size: 16 << 20,
            prefill: 1 << 20,
            limit_near: None,
        },
        Config {
            name: "4 KiB clusters",
            cluster_size: 4096,
            refcount_bits: 16,
            size: 8 << 20,
            prefill: 1 << 20,
            limit_near: None,
        },
        Config {
            // The refcount table (one 512-byte cluster: 2 MiB of file at 64 bits) must move
            // soon after the prefill.
            name: "512-byte clusters, 64-bit refcounts",
            cluster_size: 512,
            refcount_bits: 64,
            size: 4 << 20,
            prefill: 1800 << 10,
            limit_near: Some(2 << 20),
        },
    ];
    let (mut failed_ops, mut failed_flushes, mut trials, mut moves) = (0, 0, 0, 0);
    for config in &configs {
        for _ in 0..6 {
            let (ops, flushes, moved) = trial(config, rng.random(), &mut rng);
            failed_ops += ops;
            failed_flushes += flushes;
            moves += u64::from(moved);
            trials += 1;
        }
    }
    eprintln!(
        "out-of-space trials: {trials} trials, {failed_ops} failed operations, \
         {failed_flushes} failed flushes, {moves} refcount table moves"
    );
    assert!(
        failed_ops > 0,
        "no operation ever ran out of space: the limits are too generous"
    );
}
