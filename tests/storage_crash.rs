//! Crash trials: a child process writes to a qcow2 image with periodic flushes and is
//! SIGKILLed at a random moment; then
//! - `qemu-img check` finds no corruption (leaked clusters are allowed: exit 0 or 3),
//! - the image opens through snapvmm, and
//! - every sector holds the value of the last write acknowledged before the last completed
//!   flush, or the value of some later write/zero/discard that touched it (never older data,
//!   never a value nobody wrote).
//!
//! The child is this very test binary, re-executed with `SNAPVMM_CRASH_CHILD` set so that
//! the `crash_child_process` test turns into the writer (in a normal run that test does
//! nothing). After each flush returns the child records the sequence number of the last
//! operation it covers in a progress file. A SIGKILL loses nothing already written to the
//! page cache, so that record needs no fsync; what the trials test is the engine's own
//! ordering of metadata writes (refcounts, L2, L1, header), which decides what a process
//! crash at any point leaves on disk.
//!
//! Each trial continues on the image the previous one left behind, so crashed images are
//! also reopened for writing. `SNAPVMM_CRASH_SEED` replays a run; `SNAPVMM_CRASH_TRIALS`
//! sets the number of trials per configuration.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use storage::{ImageFormat, OpenOptions};
use test_support::image::{snapvmm_create, write_raw};
use test_support::pattern::pattern;
use test_support::qemu::assert_check_consistent;
use test_support::require::have_qemu;

const CHILD_ENV: &str = "SNAPVMM_CRASH_CHILD";
/// Operations a child performs at most before it stops on its own.
const MAX_OPS_PER_TRIAL: u64 = 3000;
const SECTOR: u64 = 512;

/// What the child and the parent agree on, passed to the child in `SNAPVMM_CRASH_CHILD` as
/// space-separated fields.
#[derive(Debug, Clone)]
struct Spec {
    image: PathBuf,
    progress: PathBuf,
    seed: u64,
    first_seq: u64,
    size: u64,
    cluster_size: u64,
    l2_cache_bytes: Option<usize>,
}

impl Spec {
    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.image.display(),
            self.progress.display(),
            self.seed,
            self.first_seq,
            self.size,
            self.cluster_size,
            self.l2_cache_bytes.unwrap_or(0)
        )
    }

    fn decode(s: &str) -> Spec {
        let f: Vec<&str> = s.split(' ').collect();
        assert_eq!(f.len(), 7, "bad child spec {s:?}");
        let num = |i: usize| f[i].parse::<u64>().expect("number in child spec");
        Spec {
            image: PathBuf::from(f[0]),
            progress: PathBuf::from(f[1]),
            seed: num(2),
            first_seq: num(3),
            size: num(4),
            cluster_size: num(5),
            l2_cache_bytes: Some(num(6) as usize).filter(|&n| n > 0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum CrashOp {
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

/// Operation number `seq` of the run with `seed`; the same in parent and child.
fn op_at(seed: u64, seq: u64, size: u64, cluster_size: u64) -> (CrashOp, bool) {
    let r = splitmix(seed ^ splitmix(seq));
    let sectors = size / SECTOR;
    let per_cluster = cluster_size / SECTOR;
    // Half the requests start on a cluster boundary, the rest anywhere.
    let mut sector = (r >> 8) % sectors;
    if r & 1 == 0 {
        sector = sector / per_cluster * per_cluster;
    }
    let count = match (r >> 1) % 4 {
        0 => 1 + (r >> 40) % 8,
        1 => per_cluster,
        2 => 1 + (r >> 40) % (3 * per_cluster),
        _ => 2 * per_cluster,
    }
    .min(sectors - sector);
    let op = match (r >> 4) % 10 {
        0..=6 => CrashOp::Write { sector, count },
        7 => CrashOp::Zeroes { sector, count },
        _ => CrashOp::Discard { sector, count },
    };
    // A flush after about one operation in five.
    let flush = (r >> 60) % 5 == 0;
    (op, flush)
}

/// Marks this file's sector tags (see `test_support::pattern::sector_tag`).
const MARKER: u8 = 0xa5;

fn sector_data(seq: u64, sector: u64, count: u64) -> Vec<u8> {
    test_support::pattern::tagged_sectors(MARKER, seq, sector, count)
}

/// The child: opens the image, performs operations from `first_seq` on, and records the
/// last operation covered by each completed flush. Runs until killed or done.
fn child_main(spec: Spec) {
    let options = OpenOptions {
        l2_cache_bytes: spec.l2_cache_bytes,
        refcount_cache_bytes: spec.l2_cache_bytes,
        ..OpenOptions::default()
    };
    let disk = storage::open(&spec.image, &options).expect("child: open image");
    let progress = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&spec.progress)
        .expect("child: create progress file");
    let record = |value: u64| {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&value.to_le_bytes());
        buf[8..].copy_from_slice(&(!value).to_le_bytes());
        progress
            .write_all_at(&buf, 0)
            .expect("child: write progress");
    };
    // 0: started, nothing flushed yet; n + 1: operations up to n are durable.
    record(0);
    for seq in spec.first_seq..spec.first_seq + MAX_OPS_PER_TRIAL {
        let (op, flush) = op_at(spec.seed, seq, spec.size, spec.cluster_size);
        match op {
            CrashOp::Write { sector, count } => disk
                .write_at(&sector_data(seq, sector, count), sector * SECTOR)
                .expect("child: write"),
            CrashOp::Zeroes { sector, count } => disk
                .write_zeroes(sector * SECTOR, count * SECTOR)
                .expect("child: write_zeroes"),
            CrashOp::Discard { sector, count } => disk
                .discard(sector * SECTOR, count * SECTOR)
                .expect("child: discard"),
        }
        if flush {
            disk.flush().expect("child: flush");
            record(seq + 1);
        }
    }
    disk.flush().expect("child: final flush");
    record(spec.first_seq + MAX_OPS_PER_TRIAL);
    // Exit without unwinding into the test harness' output.
    std::process::exit(0);
}

/// Not a test of its own: the entry point of the crash child (see the module doc).
#[test]
fn crash_child_process() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(Spec::decode(&spec));
    }
}

/// What a sector may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    /// What it held when the trial started.
    Old,
    /// Written by operation `seq`.
    Tag(u64),
    Zero,
    /// The backing file's data (a discard on a v2 image over a backing file).
    Below,
}

fn matches(value: Value, actual: &[u8], lba: u64, old: &[u8], below: &[u8]) -> bool {
    let at = (lba * SECTOR) as usize;
    match value {
        Value::Old => actual == &old[at..at + SECTOR as usize],
        Value::Tag(seq) => test_support::pattern::holds_tag(MARKER, seq, lba, actual),
        Value::Zero => actual.iter().all(|&b| b == 0),
        Value::Below => actual == &below[at..at + SECTOR as usize],
    }
}

fn describe(actual: &[u8]) -> String {
    let word = u64::from_le_bytes(actual[..8].try_into().expect("8 bytes"));
    if actual.iter().all(|&b| b == 0) {
        "zeroes".into()
    } else if word >> 56 == 0xa5 && actual.chunks(8).all(|w| w == &actual[..8]) {
        format!(
            "write #{} (lba {})",
            (word >> 24) & 0xffff_ffff,
            word & 0xff_ffff
        )
    } else {
        format!("other data {:02x?}", &actual[..16])
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    size: u64,
    backing: Option<ImageFormat>,
    l2_cache_bytes: Option<usize>,
    /// Keep the image on the disk's file system (fdatasync takes milliseconds, and most
    /// kills land inside one) rather than in /dev/shm (fdatasync is free, so the kills
    /// spread over the data and metadata writes and the child gets much further).
    on_disk: bool,
}

/// The effect of `op` on the sectors it touches, with whole-cluster discard semantics.
fn effects(op: CrashOp, seq: u64, config: &Config, size: u64, out: &mut Vec<(u64, Value)>) {
    out.clear();
    let discard_reads_zero = config.backing.is_none() || config.version >= 3;
    match op {
        CrashOp::Write { sector, count } => {
            out.extend((sector..sector + count).map(|lba| (lba, Value::Tag(seq))))
        }
        CrashOp::Zeroes { sector, count } => {
            out.extend((sector..sector + count).map(|lba| (lba, Value::Zero)))
        }
        CrashOp::Discard { sector, count } => {
            let cs = config.cluster_size;
            let (start, end) = (sector * SECTOR, (sector + count) * SECTOR);
            let mut at = start;
            while at < end {
                let n = (cs - at % cs).min(end - at);
                if at % cs == 0 && (n == cs || at + n == size) {
                    let value = if discard_reads_zero {
                        Value::Zero
                    } else {
                        Value::Below
                    };
                    out.extend((at / SECTOR..(at + n) / SECTOR).map(|lba| (lba, value)));
                }
                at += n;
            }
        }
    }
}

fn read_progress(path: &Path) -> Option<u64> {
    let data = std::fs::read(path).ok()?;
    if data.len() < 16 {
        return None;
    }
    let value = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let check = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    assert_eq!(value, !check, "torn progress record");
    Some(value)
}

fn read_image(path: &Path) -> Vec<u8> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let disk = storage::open(path, &options)
        .unwrap_or_else(|e| panic!("crashed image {} does not open: {e}", path.display()));
    test_support::image::read_all(&*disk)
}

struct Totals {
    trials: u64,
    with_progress: u64,
    durable_ops: u64,
    leaky: u64,
}

fn run_series(config: Config, trials: u64, seed: u64, totals: &mut Totals) {
    let shm = Path::new("/dev/shm");
    let dir = if !config.on_disk && shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    };
    // How long the child may run after it has started: long enough for a few flushes.
    let window_us = if config.on_disk { 120_000 } else { 30_000 };
    let image = dir.path().join("crash.qcow2");
    let size = config.size;
    let below = match config.backing {
        None => {
            snapvmm_create(
                &image,
                Some(size),
                config.cluster_size,
                config.version,
                config.refcount_bits,
                None,
            );
            vec![0u8; size as usize]
        }
        Some(format) => {
            let data = pattern(seed, size as usize);
            let name = match format {
                ImageFormat::Raw => {
                    write_raw(&dir.path().join("base.raw"), &data);
                    "base.raw"
                }
                ImageFormat::Qcow2 => {
                    let base = dir.path().join("base.qcow2");
                    snapvmm_create(&base, Some(size), 65536, 3, 16, None);
                    let disk = test_support::image::open_rw(&base);
                    disk.write_at(&data, 0).expect("fill base");
                    drop(disk);
                    "base.qcow2"
                }
            };
            snapvmm_create(
                &image,
                Some(size),
                config.cluster_size,
                config.version,
                config.refcount_bits,
                Some((name, format)),
            );
            data
        }
    };
    let table_before = refcount_table_offset(&image);
    let mut old = below.clone();
    let progress = dir.path().join("progress");
    let stderr_path = dir.path().join("child.stderr");
    let exe = std::env::current_exe().expect("current_exe");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next_seq = 0u64;
    let mut leaks_before = 0;
    let mut effects_buf = Vec::new();
    for trial in 0..trials {
        let spec = Spec {
            image: image.clone(),
            progress: progress.clone(),
            seed,
            first_seq: next_seq,
            size,
            cluster_size: config.cluster_size,
            l2_cache_bytes: config.l2_cache_bytes,
        };
        let _ = std::fs::remove_file(&progress);
        let mut child = Command::new(&exe)
            .args([
                "crash_child_process",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, spec.encode())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn crash child");
        // Mostly let the child start writing first; sometimes kill it while it opens.
        if rng.random_range(0..8) != 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while read_progress(&progress).is_none() {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!(
                        "{}: crash child exited early ({status}):\n{}",
                        config.name,
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: crash child never started",
                    config.name
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..window_us)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..8_000)));
        }
        let _ = child.kill();
        let status = child.wait().expect("wait for crash child");
        if status.code().is_some_and(|c| c != 0) {
            panic!(
                "{}: crash child failed ({status}):\n{}",
                config.name,
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        let durable_end = read_progress(&progress).unwrap_or(0).max(next_seq);
        let check = assert_check_consistent(&image);
        totals.leaky += u64::from(check.leaks > leaks_before);
        leaks_before = check.leaks;
        let actual = read_image(&image);

        // Sector by sector: the last durable value, or anything a later operation wrote.
        let sectors = (size / SECTOR) as usize;
        let mut durable = vec![Value::Old; sectors];
        let mut later: Vec<Vec<Value>> = vec![Vec::new(); sectors];
        for seq in next_seq..next_seq + MAX_OPS_PER_TRIAL {
            let (op, _) = op_at(seed, seq, size, config.cluster_size);
            effects(op, seq, &config, size, &mut effects_buf);
            for &(lba, value) in &effects_buf {
                if seq < durable_end {
                    durable[lba as usize] = value;
                } else {
                    later[lba as usize].push(value);
                }
            }
        }
        for lba in 0..sectors {
            let got = &actual[lba * SECTOR as usize..(lba + 1) * SECTOR as usize];
            let ok = std::iter::once(&durable[lba])
                .chain(later[lba].iter())
                .any(|&v| matches(v, got, lba as u64, &old, &below));
            if !ok {
                let kept = dir.keep();
                panic!(
                    "{} trial {trial} (seed {seed}): sector {lba} holds {}, expected {:?} \
                     (operations below #{durable_end} were flushed) or one of {:?}; image kept in {}",
                    config.name,
                    describe(got),
                    durable[lba],
                    later[lba],
                    kept.display()
                );
            }
        }
        totals.trials += 1;
        if durable_end > next_seq {
            totals.with_progress += 1;
            totals.durable_ops += durable_end - next_seq;
        }
        old = actual;
        next_seq += MAX_OPS_PER_TRIAL;
    }
    // The image left by the last crash takes further writes and closes clean of errors.
    let disk = test_support::image::open_rw(&image);
    disk.write_at(
        &vec![0x3cu8; 3 * config.cluster_size as usize],
        config.cluster_size / 2,
    )
    .expect("write after crashes");
    drop(disk);
    assert_check_consistent(&image);
    if config.refcount_bits == 64 && config.cluster_size == 512 {
        assert_ne!(
            refcount_table_offset(&image),
            table_before,
            "{}: the refcount table never moved, the series does not test that",
            config.name
        );
    }
}

/// The header's refcount_table_offset.
fn refcount_table_offset(image: &Path) -> u64 {
    let header = std::fs::read(image).expect("read image");
    u64::from_be_bytes(header[48..56].try_into().expect("8 bytes"))
}

#[test]
fn sigkill_during_writes_never_corrupts() {
    if !have_qemu("sigkill_during_writes_never_corrupts") {
        return;
    }
    let seed = std::env::var("SNAPVMM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let trials = std::env::var("SNAPVMM_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30u64);
    eprintln!("crash trials: SNAPVMM_CRASH_SEED={seed}, {trials} trials per configuration");
    let configs = [
        Config {
            name: "v3, 64 KiB clusters",
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            size: 4 << 20,
            backing: None,
            l2_cache_bytes: None,
            on_disk: true,
        },
        Config {
            name: "v2, 4 KiB clusters over raw, small cache",
            cluster_size: 4096,
            version: 2,
            refcount_bits: 16,
            size: 4 << 20,
            backing: Some(ImageFormat::Raw),
            l2_cache_bytes: Some(8192),
            on_disk: false,
        },
        Config {
            name: "v3, 4 KiB clusters over qcow2, small cache",
            cluster_size: 4096,
            version: 3,
            refcount_bits: 16,
            size: 2 << 20,
            backing: Some(ImageFormat::Qcow2),
            l2_cache_bytes: Some(8192),
            on_disk: false,
        },
        Config {
            // 64-bit refcounts and 512-byte clusters: the refcount table (2 MiB of file per
            // table cluster) moves while the child runs.
            name: "v3, 512-byte clusters, 64-bit refcounts",
            cluster_size: 512,
            version: 3,
            refcount_bits: 64,
            size: 8 << 20,
            backing: None,
            l2_cache_bytes: None,
            on_disk: false,
        },
    ];
    let mut totals = Totals {
        trials: 0,
        with_progress: 0,
        durable_ops: 0,
        leaky: 0,
    };
    for (i, config) in configs.into_iter().enumerate() {
        run_series(config, trials, seed.wrapping_add(i as u64), &mut totals);
    }
    eprintln!(
        "crash trials: {} trials, {} with flushed progress ({} durable operations), {} leaked more clusters",
        totals.trials, totals.with_progress, totals.durable_ops, totals.leaky
    );
    // The trials only mean something if the children got to flush before being killed.
    assert!(
        totals.with_progress * 4 >= totals.trials,
        "only {} of {} trials flushed anything: the children are killed too early",
        totals.with_progress,
        totals.trials
    );
}
