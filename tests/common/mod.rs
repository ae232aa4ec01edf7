//! Helpers shared by the storage whole-system tests: running qemu-img and qemu-io, judging
//! images with `qemu-img check`, deterministic data patterns, and content comparison.
//!
//! Every test that needs QEMU's tools starts with `if !common::need_qemu("name") { return; }`:
//! without qemu-img the test is skipped with a printed reason, unless the environment sets
//! `SNAPVMM_REQUIRE_QEMU=1` (CI does), in which case it fails.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use storage::{BlockDevice, OpenOptions};

/// Whether `qemu-img` and `qemu-io` run on this machine.
pub fn qemu_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        ["qemu-img", "qemu-io"].iter().all(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    })
}

/// Returns true when the QEMU tools are usable. Otherwise prints why `test` is skipped and
/// returns false, or panics when `SNAPVMM_REQUIRE_QEMU=1`.
pub fn need_qemu(test: &str) -> bool {
    if qemu_available() {
        return true;
    }
    if std::env::var("SNAPVMM_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: qemu-img/qemu-io not found but SNAPVMM_REQUIRE_QEMU=1");
    }
    eprintln!("SKIPPED {test}: qemu-img/qemu-io not found (install qemu-utils)");
    false
}

/// Runs `program` with `args`, returning its output whatever the exit status.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn describe<S: AsRef<OsStr>>(program: &str, args: &[S], out: &Output) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    format!(
        "{program} {} exited with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qemu-img and panics unless it succeeds; returns its stdout.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = run("qemu-img", args);
    assert!(out.status.success(), "{}", describe("qemu-img", args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs each of `commands` through `qemu-io -f format` on `path`, panicking on any failure
/// (a failed write, a pattern verification that does not match).
pub fn qemu_io(path: &Path, format: &str, commands: &[&str]) -> String {
    let mut args: Vec<String> = vec!["-f".into(), format.into()];
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(path.display().to_string());
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // Older qemu-io versions exit 0 after a failed command; read the output too.
    let failed = !out.status.success()
        || stdout.contains("verification failed")
        || stdout.contains(" failed: ")
        || stdout.contains("failed:");
    assert!(!failed, "{}", describe("qemu-io", &args, &out));
    stdout
}

/// `qemu-img create -f qcow2 -o OPTIONS path size` (size may be empty with a backing file).
pub fn qemu_create(path: &Path, options: &str, size: Option<u64>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.into());
    }
    args.push(path.display().to_string());
    if let Some(size) = size {
        args.push(size.to_string());
    }
    qemu_img(&args);
}

/// What `qemu-img check` said about an image.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// qemu-img's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub exit: i32,
    /// Corruptions (refcount too low, COPIED mismatches, bad entries).
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// Errors while checking.
    pub check_errors: u64,
    /// The full output, for messages.
    pub output: String,
}

impl CheckResult {
    /// No corruption and no check error (leaks allowed).
    pub fn consistent(&self) -> bool {
        matches!(self.exit, 0 | 3) && self.corruptions == 0 && self.check_errors == 0
    }

    /// Nothing at all to report.
    pub fn clean(&self) -> bool {
        self.exit == 0 && self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

fn json_u64(output: &str, key: &str) -> u64 {
    let json: serde_json::Value = match serde_json::from_str(output) {
        Ok(v) => v,
        Err(_) => return 0,
    };
    json.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// Runs `qemu-img check --output=json` on a qcow2 image.
pub fn qemu_check(path: &Path) -> CheckResult {
    let args = [
        "check".to_string(),
        // -U: the test process may hold the image open itself (image locking).
        "-U".to_string(),
        "--output=json".to_string(),
        "-f".to_string(),
        "qcow2".to_string(),
        path.display().to_string(),
    ];
    let out = run("qemu-img", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    CheckResult {
        exit: out.status.code().unwrap_or(-1),
        corruptions: json_u64(&stdout, "corruptions"),
        leaks: json_u64(&stdout, "leaks"),
        check_errors: json_u64(&stdout, "check-errors"),
        output,
    }
}

/// Panics unless `qemu-img check` finds the image free of corruption and leaks.
pub fn assert_check_clean(path: &Path) {
    let result = qemu_check(path);
    if !result.clean() {
        let human = run(
            "qemu-img",
            &[
                "check".as_ref(),
                "-U".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
            ],
        );
        panic!(
            "qemu-img check {} is not clean: {result:?}\n{}",
            path.display(),
            String::from_utf8_lossy(&human.stdout)
        );
    }
}

/// Panics unless `qemu-img check` finds no corruption (leaks allowed).
pub fn assert_check_consistent(path: &Path) -> CheckResult {
    let result = qemu_check(path);
    if !result.consistent() {
        let human = run(
            "qemu-img",
            &[
                "check".as_ref(),
                "-U".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
            ],
        );
        panic!(
            "qemu-img check {} found corruption: {result:?}\n{}",
            path.display(),
            String::from_utf8_lossy(&human.stdout)
        );
    }
    result
}

/// The guest contents of an image as QEMU reads them (`qemu-img convert -O raw`).
pub fn qemu_read_all(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("converted.raw");
    qemu_img(&[
        "convert".as_ref(),
        "-U".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        path.as_os_str(),
        raw.as_os_str(),
    ]);
    std::fs::read(&raw).expect("read converted image")
}

/// `qemu-img compare` of a qcow2 image against a raw file: panics unless equal.
pub fn assert_qemu_compare_equal(qcow2: &Path, raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            qcow2.as_os_str(),
            raw.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} differ:\n{}{}",
        qcow2.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic pseudo-random bytes (xorshift64*), different for every seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(0x2545_f491_4f6c_dd1d)
        | 1;
    let mut words = vec![0u64; len.div_ceil(8)];
    for w in words.iter_mut() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        *w = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    // SAFETY: a u64 slice viewed as bytes: same allocation, 8 times the length, u8 has no
    // alignment or validity requirements. (A byte loop is slow in unoptimised test builds.)
    let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
    bytes[..len].to_vec()
}

/// Compressible data: runs of repeated bytes derived from `seed`.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let noise = pattern(seed, len.div_ceil(64));
    (0..len).map(|i| noise[i / 64] & 0x0f).collect()
}

/// Panics with the first differing offset (and how many bytes differ) unless equal.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: lengths differ ({} vs {})",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .expect("some byte differs");
    let count = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(actual.len());
    panic!(
        "{what}: {count} bytes differ, first at {first:#x} (sector {}): got {:02x?}, expected {:02x?}",
        first / 512,
        &actual[first..end],
        &expected[first..end]
    );
}

/// Opens an image read-write with its backing chain.
pub fn open_rw(path: &Path) -> Arc<dyn BlockDevice> {
    storage::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Opens an image read-only with its backing chain.
pub fn open_ro(path: &Path) -> Arc<dyn BlockDevice> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    storage::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Every guest byte of `disk`, read through snapvmm in 1 MiB requests.
pub fn read_all(disk: &dyn BlockDevice) -> Vec<u8> {
    let size = disk.size() as usize;
    let mut out = vec![0u8; size];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, (i << 20) as u64)
            .unwrap_or_else(|e| panic!("read at {:#x}: {e}", i << 20));
    }
    out
}

/// Creates a qcow2 image with snapvmm's own `create`.
pub fn snapvmm_create(
    path: &Path,
    size: Option<u64>,
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    backing: Option<(&str, storage::ImageFormat)>,
) {
    let options = storage::qcow2::CreateOptions {
        size,
        cluster_size,
        version,
        refcount_bits,
        backing_file: backing.map(|(name, _)| name.to_string()),
        backing_format: backing.map(|(_, format)| format),
        ..Default::default()
    };
    storage::qcow2::create(path, &options)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// A raw file of `data`.
pub fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A path inside `dir`.
pub fn file_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The raw reference of a disk: applies the same operations as the device under test to a
/// byte vector, with snapvmm's documented semantics for whole-cluster unmapping.
#[derive(Debug, Clone)]
pub struct Model {
    /// What every guest byte must read.
    pub data: Vec<u8>,
    /// What the backing chain reads (zeroes without one, zero-padded to the disk size).
    pub below: Vec<u8>,
    /// Cluster size of the top qcow2 layer.
    pub cluster_size: u64,
    /// Whether a discarded whole cluster reads zero (no backing file, or qcow2 v3) rather
    /// than the backing file's data (v2 over a backing file).
    pub discard_reads_zero: bool,
}

impl Model {
    /// A model of a fresh overlay over `below` (all zeroes when there is no backing file).
    pub fn new(below: Vec<u8>, cluster_size: u64, discard_reads_zero: bool) -> Self {
        Model {
            data: below.clone(),
            below,
            cluster_size,
            discard_reads_zero,
        }
    }

    /// A write of `buf` at `offset`.
    pub fn write(&mut self, buf: &[u8], offset: u64) {
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
    }

    /// `write_zeroes`: always reads back zero.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        self.data[offset as usize..(offset + len) as usize].fill(0);
    }

    /// `discard`: whole clusters (the last one may end at the disk's end) are unmapped;
    /// parts of clusters keep their data.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let size = self.data.len() as u64;
        let cs = self.cluster_size;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let whole = at % cs == 0 && (n == cs || at + n == size);
            if whole {
                let range = at as usize..(at + n) as usize;
                if self.discard_reads_zero {
                    self.data[range].fill(0);
                } else {
                    let below = self.below[range.clone()].to_vec();
                    self.data[range].copy_from_slice(&below);
                }
            }
            at += n;
        }
    }
}

/// One operation of a test sequence, applied alike to a device and to a [`Model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at` of `pattern(seed, len)` at `offset`.
    Write { offset: u64, len: u64, seed: u64 },
    /// `write_zeroes`.
    Zeroes { offset: u64, len: u64 },
    /// `discard`.
    Discard { offset: u64, len: u64 },
    /// `flush`.
    Flush,
    /// Close the device (dropping it flushes) and open it again.
    Reopen,
}

impl Model {
    /// Applies `op` to the model (`Flush` and `Reopen` change nothing visible).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { offset, len, seed } => self.write(&pattern(seed, len as usize), offset),
            Op::Zeroes { offset, len } => self.write_zeroes(offset, len),
            Op::Discard { offset, len } => self.discard(offset, len),
            Op::Flush | Op::Reopen => {}
        }
    }
}

/// Applies `op` to the device, reopening it from `path` (read-write) for `Op::Reopen`.
pub fn apply(disk: &mut Arc<dyn BlockDevice>, path: &Path, op: &Op) {
    let result = match *op {
        Op::Write { offset, len, seed } => disk.write_at(&pattern(seed, len as usize), offset),
        Op::Zeroes { offset, len } => disk.write_zeroes(offset, len),
        Op::Discard { offset, len } => disk.discard(offset, len),
        Op::Flush => disk.flush(),
        Op::Reopen => {
            // Replace first so the old handle is dropped (and flushed) before the new open.
            *disk = Arc::new(NullDevice);
            *disk = open_rw(path);
            Ok(())
        }
    };
    if let Err(e) = result {
        panic!("{op:?} on {}: {e}", path.display());
    }
}

/// A placeholder device used only while a real one is being reopened.
pub struct NullDevice;

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn write_at(&self, _: &[u8], _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn write_zeroes(&self, _: u64, _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn discard(&self, _: u64, _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn flush(&self) -> storage::Result<()> {
        Ok(())
    }
    fn block_status(&self, _: u64, _: u64) -> storage::Result<storage::BlockStatus> {
        unreachable!("placeholder device")
    }
    fn read_only(&self) -> bool {
        true
    }
    fn info(&self) -> storage::ImageInfo {
        storage::ImageInfo::default()
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn path(&self) -> &Path {
        Path::new("")
    }
}

/// A deterministic mix of writes (aligned and not, inside one cluster and across clusters
/// and L2 tables), zeroes, discards and flushes over a disk of `size` bytes.
pub fn mixed_ops(size: u64, cluster_size: u64, seed: u64, count: usize) -> Vec<Op> {
    let mut rng = pattern(seed, count * 40).into_iter();
    let mut next = move || {
        let mut v = 0u64;
        for _ in 0..5 {
            v = (v << 8) | rng.next().unwrap_or(0x5a) as u64;
        }
        v
    };
    let l2_span = cluster_size * (cluster_size / 8);
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let kind = next() % 16;
        let aligned = next() % 3 != 0;
        let mut offset = next() % size;
        // Aim some requests at cluster and L2-table boundaries.
        match next() % 4 {
            0 => offset = (offset / cluster_size * cluster_size).saturating_sub(next() % 1024),
            1 if l2_span < size => {
                offset = (offset / l2_span * l2_span).saturating_sub(cluster_size / 2)
            }
            _ => {}
        }
        let max_len = match next() % 4 {
            0 => 512,
            1 => cluster_size,
            2 => 3 * cluster_size,
            _ => (size / 8).clamp(1, 512 << 10),
        };
        let mut len = 1 + next() % max_len;
        if aligned {
            offset = offset / 512 * 512;
            len = len.div_ceil(512) * 512;
        }
        offset = offset.min(size - 1);
        len = len.min(size - offset).max(1);
        let op = match kind {
            0..=8 => Op::Write {
                offset,
                len,
                seed: seed.wrapping_mul(1000).wrapping_add(i as u64),
            },
            9..=11 => Op::Zeroes { offset, len },
            12..=14 => Op::Discard { offset, len },
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

/// Bytes in the sectors the crash and ENOSPC trials tag.
pub const TAG_SECTOR: u64 = 512;

/// The word every 8 bytes of sector `lba` hold after write `seq`; `marker` tells the test
/// files apart so one test's data can never pass for another's.
pub fn sector_tag(marker: u8, seq: u64, lba: u64) -> u64 {
    (marker as u64) << 56 | (seq & 0xffff_ffff) << 24 | lba
}

/// `count` sectors from `sector`, each filled with its tag for write `seq`.
pub fn tagged_sectors(marker: u8, seq: u64, sector: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((count * TAG_SECTOR) as usize);
    for lba in sector..sector + count {
        let word = sector_tag(marker, seq, lba).to_le_bytes();
        for _ in 0..TAG_SECTOR / 8 {
            out.extend_from_slice(&word);
        }
    }
    out
}

/// Whether `actual` (one sector) holds sector `lba`'s tag for write `seq`.
pub fn holds_tag(marker: u8, seq: u64, lba: u64, actual: &[u8]) -> bool {
    let word = sector_tag(marker, seq, lba).to_le_bytes();
    actual.chunks(8).all(|w| w == word)
}
