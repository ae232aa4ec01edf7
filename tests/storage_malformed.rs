//! Malformed images, generated here from valid qemu-img images by patching bytes: each must
//! give a clear `Err` whose message names the problem, never a panic (every call runs
//! inside `catch_unwind`) and never data read through a broken mapping.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use storage::{BlockDevice, ImageFormat, OpenOptions};
use test_support::image::snapvmm_create;
use test_support::qemu::{qemu_create, qemu_img, qemu_io};
use test_support::require::have_qemu;

const CLUSTER: u64 = 65536;
const COPIED: u64 = 1 << 63;

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Header field offsets (qcow2.rst).
mod field {
    pub const VERSION: usize = 4;
    pub const BACKING_OFFSET: usize = 8;
    pub const BACKING_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const CRYPT_METHOD: usize = 32;
    pub const L1_SIZE: usize = 36;
    pub const L1_OFFSET: usize = 40;
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub const NB_SNAPSHOTS: usize = 60;
    pub const SNAPSHOTS_OFFSET: usize = 64;
    pub const INCOMPATIBLE: usize = 72;
    pub const REFCOUNT_ORDER: usize = 96;
    pub const HEADER_LENGTH: usize = 100;
    pub const COMPRESSION_TYPE: usize = 104;
}

/// Valid images to corrupt, made once per test.
struct Fixtures {
    dir: tempfile::TempDir,
    /// v3, 64 KiB clusters, 16 MiB, data at 0 (one cluster) and at 8 MiB.
    v3: Vec<u8>,
    /// The same as version 2.
    v2: Vec<u8>,
    /// v3, compressed clusters (zlib), 1 MiB.
    compressed: Vec<u8>,
}

fn fixtures() -> Fixtures {
    let dir = tempfile::tempdir().expect("tempdir");
    let make = |name: &str, compat: &str| {
        let p = dir.path().join(name);
        qemu_create(
            &p,
            &format!("cluster_size={CLUSTER},compat={compat}"),
            Some(16 << 20),
        );
        qemu_io(
            &p,
            "qcow2",
            &["write -P 0x5a 0 64k", "write -P 0x5b 8M 64k"],
        );
        std::fs::read(&p).expect("read fixture")
    };
    let v3 = make("v3.qcow2", "1.1");
    let v2 = make("v2.qcow2", "0.10");
    let raw = dir.path().join("compressible.raw");
    std::fs::write(&raw, test_support::pattern::compressible(7, 1 << 20)).expect("write raw");
    let c = dir.path().join("compressed.qcow2");
    qemu_img(&[
        "convert".as_ref(),
        "-c".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        c.as_os_str(),
    ]);
    let compressed = std::fs::read(&c).expect("read fixture");
    Fixtures {
        dir,
        v3,
        v2,
        compressed,
    }
}

impl Fixtures {
    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).expect("write case");
        p
    }
}

/// Host offset of the L2 table mapping guest offset 0, and of its first entry's cluster.
fn first_l2(image: &[u8]) -> (u64, u64) {
    let l1 = get64(image, field::L1_OFFSET) as usize;
    let l2 = get64(image, l1) & 0x00ff_ffff_ffff_fe00;
    let data = get64(image, l2 as usize) & 0x00ff_ffff_ffff_fe00;
    (l2, data)
}

fn qcow2_options(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        format: Some(ImageFormat::Qcow2),
        ..OpenOptions::default()
    }
}

/// Runs `f` and turns a panic into a test failure naming the case.
fn no_panic<T>(case: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{case}: the engine panicked instead of returning an error: {msg}");
        }
    }
}

/// Whether `msg` contains one of the `|`-separated alternatives of `expect` (any case).
fn mentions(msg: &str, expect: &str) -> bool {
    let msg = msg.to_lowercase();
    expect
        .split('|')
        .any(|alt| msg.contains(&alt.to_lowercase()))
}

/// Opening `path` (read-only and read-write) must fail with a message containing `expect`.
fn expect_open_error(case: &str, path: &Path, options: &OpenOptions, expect: &str) {
    for read_only in [true, false] {
        let options = OpenOptions {
            read_only,
            ..options.clone()
        };
        let result = no_panic(case, || storage::open(path, &options));
        match result {
            Ok(disk) => panic!(
                "{case}: opened (read_only {read_only}) instead of failing; size {}",
                disk.size()
            ),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{case} (read_only {read_only}): {msg}");
                assert!(
                    mentions(&msg, expect),
                    "{case}: error does not mention {expect:?}: {msg}"
                );
            }
        }
    }
}

/// The image opens, but reading, writing and block status at `offset` fail with `expect`,
/// and reads elsewhere still work.
fn expect_io_error(case: &str, path: &Path, offset: u64, expect: &str, also_status: bool) {
    let disk = no_panic(case, || storage::open(path, &qcow2_options(false)))
        .unwrap_or_else(|e| panic!("{case}: does not open: {e}"));
    let check = |what: &str, result: storage::Result<()>| match result {
        Ok(()) => panic!("{case}: {what} at {offset:#x} succeeded through a broken mapping"),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{case} ({what}): {msg}");
            assert!(
                mentions(&msg, expect),
                "{case}: {what} error does not mention {expect:?}: {msg}"
            );
        }
    };
    let mut buf = vec![0u8; 4096];
    check("read", no_panic(case, || disk.read_at(&mut buf, offset)));
    check(
        "partial write",
        no_panic(case, || disk.write_at(&[1u8; 512], offset + 512)),
    );
    if also_status {
        check(
            "block_status",
            no_panic(case, || disk.block_status(offset, 4096).map(|_| ())),
        );
    }
    let healthy = disk.size() / 2 / 65536 * 65536;
    no_panic(case, || disk.read_at(&mut buf, healthy)).expect("a healthy cluster still reads");
    drop(disk);
}

fn header_case(
    f: &Fixtures,
    name: &str,
    base: &[u8],
    patch: impl FnOnce(&mut Vec<u8>),
    expect: &str,
) {
    let mut data = base.to_vec();
    patch(&mut data);
    let path = f.write(&format!("{name}.qcow2"), &data);
    expect_open_error(name, &path, &qcow2_options(true), expect);
    // Probing finds the magic, so the default options reach the same error.
    if data.len() >= 4 && data[..4] == *b"QFI\xfb" {
        expect_open_error(name, &path, &OpenOptions::default(), expect);
    }
}

#[test]
fn malformed_headers_are_refused() {
    if !have_qemu("malformed_headers_are_refused") {
        return;
    }
    let f = fixtures();
    let v3 = f.v3.clone();
    let file_len = v3.len() as u64;
    let rt_offset = get64(&v3, field::REFCOUNT_TABLE_OFFSET);

    header_case(
        &f,
        "truncated-header",
        &v3,
        |d| d.truncate(50),
        "shorter than a qcow2 header|truncated",
    );
    header_case(
        &f,
        "truncated-v3-header",
        &v3,
        |d| d.truncate(80),
        "shorter than a qcow2 header|truncated",
    );
    header_case(
        &f,
        "empty-file",
        &v3,
        |d| d.clear(),
        "shorter than a qcow2 header|bad magic",
    );
    header_case(
        &f,
        "version-4",
        &v3,
        |d| put32(d, field::VERSION, 4),
        "version 4",
    );
    header_case(
        &f,
        "version-1",
        &v3,
        |d| put32(d, field::VERSION, 1),
        "version 1",
    );
    header_case(
        &f,
        "cluster-bits-8",
        &v3,
        |d| put32(d, field::CLUSTER_BITS, 8),
        "cluster_bits 8",
    );
    header_case(
        &f,
        "cluster-bits-22",
        &v3,
        |d| put32(d, field::CLUSTER_BITS, 22),
        "cluster_bits 22",
    );
    header_case(
        &f,
        "cluster-bits-64",
        &v3,
        |d| put32(d, field::CLUSTER_BITS, 64),
        "cluster_bits 64",
    );
    header_case(
        &f,
        "unknown-incompatible-bit",
        &v3,
        |d| put64(d, field::INCOMPATIBLE, 1 << 5),
        "unknown incompatible feature",
    );
    header_case(
        &f,
        "unknown-incompatible-bit-63",
        &v3,
        |d| put64(d, field::INCOMPATIBLE, 1 << 63),
        "unknown incompatible feature",
    );
    header_case(
        &f,
        "crypt-method-aes",
        &v3,
        |d| put32(d, field::CRYPT_METHOD, 1),
        "encryption",
    );
    header_case(
        &f,
        "crypt-method-luks",
        &v3,
        |d| put32(d, field::CRYPT_METHOD, 2),
        "encryption",
    );
    header_case(
        &f,
        "external-data-file-bit",
        &v3,
        |d| put64(d, field::INCOMPATIBLE, 1 << 2),
        "external data file",
    );
    header_case(
        &f,
        "extended-l2-bit",
        &v3,
        |d| put64(d, field::INCOMPATIBLE, 1 << 4),
        "extended L2",
    );
    header_case(
        &f,
        "refcount-order-7",
        &v3,
        |d| put32(d, field::REFCOUNT_ORDER, 7),
        "refcount_order",
    );
    header_case(
        &f,
        "compression-type-2",
        &v3,
        |d| {
            put32(d, field::HEADER_LENGTH, 112);
            d[field::COMPRESSION_TYPE] = 2;
        },
        "compression type",
    );
    header_case(
        &f,
        "zstd-without-incompatible-bit",
        &v3,
        |d| {
            put32(d, field::HEADER_LENGTH, 112);
            d[field::COMPRESSION_TYPE] = 1;
        },
        "compression",
    );
    header_case(
        &f,
        "header-length-unaligned",
        &v3,
        |d| put32(d, field::HEADER_LENGTH, 105),
        "header_length",
    );
    header_case(
        &f,
        "header-length-past-cluster",
        &v3,
        |d| put32(d, field::HEADER_LENGTH, 0x20000),
        "header_length",
    );
    header_case(
        &f,
        "l1-table-past-eof",
        &v3,
        |d| put64(d, field::L1_OFFSET, (file_len / CLUSTER + 4) * CLUSTER),
        "past the end",
    );
    header_case(
        &f,
        "l1-size-over-32MiB",
        &v3,
        |d| put32(d, field::L1_SIZE, (32 << 20) / 8 + 1),
        "32 MiB",
    );
    header_case(
        &f,
        "l1-too-small-for-disk",
        &v3,
        |d| put64(d, field::SIZE, 1 << 40),
        "too small",
    );
    header_case(
        &f,
        "refcount-table-over-8MiB",
        &v3,
        |d| {
            put32(
                d,
                field::REFCOUNT_TABLE_CLUSTERS,
                ((8 << 20) / CLUSTER + 1) as u32,
            )
        },
        "8 MiB",
    );
    header_case(
        &f,
        "refcount-table-past-eof",
        &v3,
        |d| {
            put64(
                d,
                field::REFCOUNT_TABLE_OFFSET,
                (file_len / CLUSTER + 4) * CLUSTER,
            )
        },
        "past the end",
    );
    header_case(
        &f,
        "refcount-table-zero-clusters",
        &v3,
        |d| put32(d, field::REFCOUNT_TABLE_CLUSTERS, 0),
        "refcount_table_clusters",
    );
    header_case(
        &f,
        "l1-overlaps-refcount-table",
        &v3,
        |d| put64(d, field::L1_OFFSET, rt_offset),
        "overlap",
    );
    header_case(
        &f,
        "l1-table-unaligned",
        &v3,
        |d| {
            let l1 = get64(d, field::L1_OFFSET);
            put64(d, field::L1_OFFSET, l1 + 512);
        },
        "not cluster aligned",
    );
    header_case(
        &f,
        "extension-past-cluster",
        &v3,
        |d| {
            // The first extension (at header_length) claims more bytes than the cluster has.
            let at = get32(d, field::HEADER_LENGTH) as usize;
            put32(d, at, 0x1234_5678);
            put32(d, at + 4, 0x0010_0000);
        },
        "runs past the first cluster",
    );
    header_case(
        &f,
        "extension-list-unterminated",
        &v3,
        |d| {
            // Extensions of 0 bytes to the end of the cluster, with no end marker.
            let start = get32(d, field::HEADER_LENGTH) as usize;
            for at in (start..CLUSTER as usize).step_by(8) {
                put32(d, at, 0x0bad_0000);
                put32(d, at + 4, 0);
            }
        },
        "past the first cluster",
    );
    header_case(
        &f,
        "backing-name-past-cluster",
        &v3,
        |d| {
            put64(d, field::BACKING_OFFSET, CLUSTER - 4);
            put32(d, field::BACKING_SIZE, 64);
        },
        "backing file name",
    );
    header_case(
        &f,
        "backing-name-too-long",
        &v3,
        |d| {
            put64(d, field::BACKING_OFFSET, 4096);
            put32(d, field::BACKING_SIZE, 4000);
        },
        "backing file name",
    );
    header_case(
        &f,
        "huge-nb-snapshots",
        &v3,
        |d| {
            put32(d, field::NB_SNAPSHOTS, u32::MAX);
            put64(d, field::SNAPSHOTS_OFFSET, CLUSTER);
        },
        "snapshot",
    );
    header_case(
        &f,
        "snapshot-table-past-eof",
        &v3,
        |d| {
            put32(d, field::NB_SNAPSHOTS, 1);
            put64(
                d,
                field::SNAPSHOTS_OFFSET,
                (file_len / CLUSTER + 4) * CLUSTER,
            );
        },
        "snapshot",
    );
    header_case(
        &f,
        "l1-entry-unaligned-l2",
        &v3,
        |d| {
            let l1 = get64(d, field::L1_OFFSET) as usize;
            let e = get64(d, l1);
            put64(d, l1, e | 0x200);
        },
        "not cluster aligned",
    );
    header_case(
        &f,
        "l1-entry-reserved-bits",
        &v3,
        |d| {
            let l1 = get64(d, field::L1_OFFSET) as usize;
            let e = get64(d, l1);
            put64(d, l1, e | 1 << 60);
        },
        "reserved bits",
    );
    header_case(
        &f,
        "l1-entry-past-eof",
        &v3,
        |d| {
            let l1 = get64(d, field::L1_OFFSET) as usize;
            put64(d, l1, COPIED | ((file_len / CLUSTER + 8) * CLUSTER));
        },
        "past the end",
    );
    header_case(
        &f,
        "l1-entry-in-header",
        &v3,
        |d| {
            let l1 = get64(d, field::L1_OFFSET) as usize;
            put64(d, l1, COPIED | 0x200);
        },
        "l1 entry 0",
    );
    header_case(
        &f,
        "refcount-block-past-eof",
        &v3,
        |d| {
            let rt = get64(d, field::REFCOUNT_TABLE_OFFSET) as usize;
            put64(d, rt, (file_len / CLUSTER + 8) * CLUSTER);
        },
        "past the end",
    );
    header_case(
        &f,
        "refcount-block-unaligned",
        &v3,
        |d| {
            let rt = get64(d, field::REFCOUNT_TABLE_OFFSET) as usize;
            let e = get64(d, rt);
            put64(d, rt, e + 512);
        },
        "not cluster aligned",
    );
}

/// Found by the open_image fuzz target (fuzz/): a backing_file_offset near u64::MAX makes
/// `backing_file_offset + backing_file_size` overflow in `Header::parse`
/// (storage/src/qcow2/header.rs, the backing file name check): "attempt to add with
/// overflow" with overflow checks; without them the sum wraps, passes the bound check and
/// `buf[offset..end]` panics with start > end.
#[test]
fn fuzz_reproducer_backing_offset_overflow() {
    if !have_qemu("fuzz_reproducer_backing_offset_overflow") {
        return;
    }
    let f = fixtures();
    let v3 = f.v3.clone();
    header_case(
        &f,
        "backing-offset-overflow",
        &v3,
        |d| {
            put64(d, field::BACKING_OFFSET, u64::MAX - 3);
            put32(d, field::BACKING_SIZE, 8);
        },
        "backing file name",
    );
    // The same with an offset that makes the sum exactly wrap to a small value.
    header_case(
        &f,
        "backing-offset-wrap",
        &v3,
        |d| {
            put64(d, field::BACKING_OFFSET, u64::MAX - 7);
            put32(d, field::BACKING_SIZE, 16);
        },
        "backing file name",
    );
}

#[test]
fn bad_mapping_entries_fail_reads() {
    if !have_qemu("bad_mapping_entries_fail_reads") {
        return;
    }
    let f = fixtures();
    let (l2, _data) = first_l2(&f.v3);
    let l2 = l2 as usize;
    let io_case = |name: &str,
                   base: &[u8],
                   entry_at: usize,
                   patch: &dyn Fn(u64) -> u64,
                   expect: &str,
                   status: bool| {
        let mut d = base.to_vec();
        let e = get64(&d, entry_at);
        put64(&mut d, entry_at, patch(e));
        let path = f.write(&format!("{name}.qcow2"), &d);
        expect_io_error(name, &path, 0, expect, status);
    };
    io_case(
        "l2-entry-reserved-bits",
        &f.v3,
        l2,
        &|e| e | 1 << 57,
        "reserved bits",
        true,
    );
    io_case(
        "l2-entry-unaligned",
        &f.v3,
        l2,
        &|e| e + 512,
        "not cluster aligned",
        true,
    );
    io_case(
        "compressed-entry-with-copied",
        &f.v3,
        l2,
        &|e| e | 1 << 62,
        "copied",
        true,
    );
    let (l2_v2, _) = first_l2(&f.v2);
    io_case(
        "zero-flag-in-v2",
        &f.v2,
        l2_v2 as usize,
        &|e| e | 1,
        "zero flag",
        true,
    );

    // Compressed clusters: corrupt stream, and a descriptor pointing past the end.
    let (cl2, _) = first_l2(&f.compressed);
    let entry = get64(&f.compressed, cl2 as usize);
    assert!(
        entry & 1 << 62 != 0,
        "fixture's first cluster is not compressed: {entry:#x}"
    );
    // 64 KiB clusters: x = 62 - (16 - 8) low bits hold the byte offset.
    let x = 62 - (16 - 8);
    let host = (entry & ((1u64 << x) - 1)) as usize;
    let mut d = f.compressed.clone();
    for b in &mut d[host..host + 256] {
        *b ^= 0xa5;
    }
    let path = f.write("corrupt-compressed.qcow2", &d);
    expect_io_error("corrupt-compressed", &path, 0, "decompress", false);
    let mut d = f.compressed.clone();
    let past = (d.len() as u64 / 512 + 64) * 512;
    put64(&mut d, cl2 as usize, (entry & !((1u64 << x) - 1)) | past);
    let path = f.write("compressed-past-eof.qcow2", &d);
    expect_io_error("compressed-past-eof", &path, 0, "past the end", false);
}

/// An L2 entry pointing at the image's own metadata (here: the refcount table) must not let
/// a guest write overwrite that metadata; QEMU refuses such writes ("Preventing invalid
/// write on metadata") and marks the image corrupt.
#[test]
fn guest_writes_never_overwrite_metadata() {
    if !have_qemu("guest_writes_never_overwrite_metadata") {
        return;
    }
    let f = fixtures();
    let (l2, _) = first_l2(&f.v3);
    let rt = get64(&f.v3, field::REFCOUNT_TABLE_OFFSET);
    let l1 = get64(&f.v3, field::L1_OFFSET);
    for (name, target) in [
        ("l2-points-at-refcount-table", rt),
        ("l2-points-at-l1-table", l1),
    ] {
        let mut d = f.v3.clone();
        put64(&mut d, l2 as usize, COPIED | target);
        let path = f.write(&format!("{name}.qcow2"), &d);
        let before = std::fs::read(&path).expect("read");
        let disk = no_panic(name, || storage::open(&path, &qcow2_options(false)))
            .unwrap_or_else(|e| panic!("{name}: does not open: {e}"));
        let _ = no_panic(name, || disk.write_at(&[0xeeu8; 4096], 0));
        let _ = no_panic(name, || disk.flush());
        drop(disk);
        let after = std::fs::read(&path).expect("read");
        let range = target as usize..(target + CLUSTER) as usize;
        assert!(
            after[range.clone()] == before[range],
            "{name}: a guest write replaced metadata at {target:#x}"
        );
    }
}

/// The corrupt bit opens the image read-only: reads work, writes are refused.
#[test]
fn corrupt_bit_opens_read_only() {
    if !have_qemu("corrupt_bit_opens_read_only") {
        return;
    }
    let f = fixtures();
    let mut d = f.v3.clone();
    put64(&mut d, field::INCOMPATIBLE, 1 << 1);
    let path = f.write("corrupt-bit.qcow2", &d);
    let disk = no_panic("corrupt-bit", || {
        storage::open(&path, &qcow2_options(false))
    })
    .expect("an image marked corrupt still opens (read-only)");
    assert!(disk.read_only(), "an image marked corrupt opened writable");
    assert!(disk.info().corrupt);
    let mut buf = vec![0u8; 512];
    disk.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, vec![0x5a; 512]);
    let err = disk
        .write_at(&buf, 0)
        .expect_err("write to a corrupt image");
    assert!(err.to_string().contains("read-only"), "{err}");
    drop(disk);
    assert_eq!(
        std::fs::read(&path).expect("read"),
        d,
        "the corrupt image was modified"
    );
}

/// Without the magic, probing sees a raw image (as QEMU does); asked for qcow2 explicitly
/// the open fails.
#[test]
fn bad_magic() {
    if !have_qemu("bad_magic") {
        return;
    }
    let f = fixtures();
    let mut d = f.v3.clone();
    d[3] = 0xfc;
    let path = f.write("bad-magic.qcow2", &d);
    expect_open_error("bad-magic", &path, &qcow2_options(true), "bad magic");
    let disk = no_panic("bad-magic", || {
        storage::open(&path, &OpenOptions::default())
    })
    .expect("opens as raw");
    assert_eq!(disk.info().format, Some(ImageFormat::Raw));
    assert_eq!(disk.size(), d.len() as u64);
}

#[test]
fn backing_chain_loops_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    snapvmm_create(&a, Some(1 << 20), 65536, 3, 16, None);
    snapvmm_create(
        &b,
        None,
        65536,
        3,
        16,
        Some(("a.qcow2", ImageFormat::Qcow2)),
    );
    // a -> b -> a: rewrite a's header to name b as its backing file.
    let mut header = std::fs::read(&a).expect("read a");
    set_backing(&mut header, "b.qcow2");
    std::fs::write(&a, &header).expect("write a");
    expect_open_error("loop a->b->a", &b, &OpenOptions::default(), "loop");
    expect_open_error("loop a->b->a from a", &a, &OpenOptions::default(), "loop");
    // a -> a.
    let c = dir.path().join("c.qcow2");
    snapvmm_create(&c, Some(1 << 20), 65536, 3, 16, None);
    let mut header = std::fs::read(&c).expect("read c");
    set_backing(&mut header, "c.qcow2");
    std::fs::write(&c, &header).expect("write c");
    expect_open_error("loop c->c", &c, &OpenOptions::default(), "loop");
    // Through a symlink: the same file under another name.
    let link = dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&b, &link).expect("symlink");
    let mut header = std::fs::read(&a).expect("read a");
    set_backing(&mut header, "link.qcow2");
    std::fs::write(&a, &header).expect("write a");
    expect_open_error("loop a->link(b)->a", &b, &OpenOptions::default(), "loop");
    if have_qemu("backing_chain_loops_are_refused (qemu-img rebase)") {
        // The same loop written by qemu-img itself.
        let d = dir.path().join("d.qcow2");
        let e = dir.path().join("e.qcow2");
        snapvmm_create(&d, Some(1 << 20), 65536, 3, 16, None);
        snapvmm_create(
            &e,
            None,
            65536,
            3,
            16,
            Some(("d.qcow2", ImageFormat::Qcow2)),
        );
        qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "e.qcow2",
            "-F",
            "qcow2",
            &d.display().to_string(),
        ]);
        expect_open_error("loop d->e->d", &e, &OpenOptions::default(), "loop");
    }
}

/// Rewrites the backing file name in a snapvmm-created header (no extensions after it).
fn set_backing(image: &mut [u8], name: &str) {
    let at = 4096usize;
    put64(image, field::BACKING_OFFSET, at as u64);
    put32(image, field::BACKING_SIZE, name.len() as u32);
    image[at..at + name.len()].copy_from_slice(name.as_bytes());
}

/// A chain of `layers` images (layer 0 is a raw base); returns the top.
fn chain(dir: &Path, layers: usize) -> PathBuf {
    std::fs::write(dir.join("layer0.raw"), vec![0u8; 65536]).expect("base");
    let mut below = ("layer0.raw".to_string(), ImageFormat::Raw);
    let mut top = dir.join("layer0.raw");
    for i in 1..layers {
        let name = format!("layer{i}.qcow2");
        top = dir.join(&name);
        snapvmm_create(&top, Some(65536), 65536, 3, 16, Some((&below.0, below.1)));
        below = (name, ImageFormat::Qcow2);
    }
    top
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let max = storage::DEFAULT_MAX_CHAIN_DEPTH;
    assert_eq!(max, 64);
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path(), max + 2);
    expect_open_error(
        "default limit",
        &top,
        &OpenOptions::default(),
        "deeper than",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path(), max);
    let disk = no_panic("chain at the limit", || {
        storage::open(&top, &OpenOptions::default())
    })
    .expect("a chain of DEFAULT_MAX_CHAIN_DEPTH layers opens");
    let mut depth = 1;
    let mut layer: Option<Arc<dyn BlockDevice>> = disk.backing();
    while let Some(l) = layer {
        depth += 1;
        layer = l.backing();
    }
    assert_eq!(depth, max);
    // A lower limit set in the options.
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path(), 8);
    let options = OpenOptions {
        max_chain_depth: 5,
        ..OpenOptions::default()
    };
    expect_open_error("max_chain_depth 5", &top, &options, "deeper than");
    let options = OpenOptions {
        max_chain_depth: 8,
        ..OpenOptions::default()
    };
    no_panic("max_chain_depth 8", || storage::open(&top, &options))
        .expect("8 layers open with a limit of 8");
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = dir.path().join("top.qcow2");
    snapvmm_create(&top, Some(1 << 20), 65536, 3, 16, None);
    let mut header = std::fs::read(&top).expect("read");
    set_backing(&mut header, "does-not-exist.qcow2");
    std::fs::write(&top, &header).expect("write");
    expect_open_error(
        "missing backing",
        &top,
        &OpenOptions::default(),
        "does-not-exist.qcow2",
    );
}
