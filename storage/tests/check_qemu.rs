//! The checker against `qemu-img check`: images made and damaged with qemu-img and qemu-io,
//! checked and repaired by both tools, must give the same numbers and end up clean.

use std::path::{Path, PathBuf};
use std::process::Command;

use storage::file::ImageFile;
use storage::qcow2::check::rebuild_refcounts;
use storage::qcow2::entry::{OFFSET_MASK, OFLAG_COPIED};
use storage::qcow2::header::{read_first_cluster, INCOMPAT_DIRTY};
use storage::qcow2::refcount::{read_entry, write_entry};
use storage::qcow2::{check, CheckReport, Header, RepairMode};

/// Low bits of a refcount table entry that must be clear.
const REFT_RESERVED: u64 = 0x1ff;

/// qemu-img and qemu-io are the reference; without them the tests have nothing to compare
/// against, and are skipped unless CI demands them (`test_support::require`).
macro_rules! require_qemu {
    () => {
        if !test_support::require::have_qemu(concat!(file!(), ":", line!())) {
            return;
        }
    };
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(dir: &Path, name: &str, options: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().expect("utf-8 path");
    if options.is_empty() {
        run("qemu-img", &["create", "-q", "-f", "qcow2", p, size]);
    } else {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", options, p, size],
        );
    }
    path
}

fn io(path: &Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().expect("utf-8 path"));
    run("qemu-io", &args);
}

fn snapshot(path: &Path, name: &str) {
    run(
        "qemu-img",
        &["snapshot", "-c", name, path.to_str().expect("utf-8 path")],
    );
}

/// The numbers both tools report.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// A field of qemu-img's flat JSON object; absent fields are 0, as qemu-img omits them.
fn json_u64(json: &str, key: &str) -> u64 {
    let needle = format!("\"{key}\":");
    let Some(at) = json.find(&needle) else {
        return 0;
    };
    json[at + needle.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

fn qemu_check(path: &Path) -> Counts {
    let out = Command::new("qemu-img")
        .args(["check", "--output", "json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img check");
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("image-end-offset") || json.contains("check-errors"),
        "qemu-img check failed: {json}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Counts {
        corruptions: json_u64(&json, "corruptions"),
        leaks: json_u64(&json, "leaks"),
        check_errors: json_u64(&json, "check-errors"),
        image_end_offset: json_u64(&json, "image-end-offset"),
        total_clusters: json_u64(&json, "total-clusters"),
        allocated_clusters: json_u64(&json, "allocated-clusters"),
        fragmented_clusters: json_u64(&json, "fragmented-clusters"),
        compressed_clusters: json_u64(&json, "compressed-clusters"),
    }
}

fn counts(r: &CheckReport) -> Counts {
    Counts {
        corruptions: r.corruptions,
        leaks: r.leaks,
        check_errors: r.check_errors,
        image_end_offset: r.image_end_offset,
        total_clusters: r.total_clusters,
        allocated_clusters: r.allocated_clusters,
        fragmented_clusters: r.fragmented_clusters,
        compressed_clusters: r.compressed_clusters,
    }
}

/// Our read-only check reports what qemu-img reports.
fn assert_matches_qemu(path: &Path) -> CheckReport {
    let ours = check(path, RepairMode::None).expect("check");
    assert_eq!(
        counts(&ours),
        qemu_check(path),
        "messages: {:#?}",
        ours.messages
    );
    ours
}

fn assert_qemu_clean(path: &Path) {
    let c = qemu_check(path);
    assert_eq!(
        (c.corruptions, c.leaks, c.check_errors),
        (0, 0, 0),
        "qemu-img check of {}: {c:?}",
        path.display()
    );
}

/// Repairs a copy of `path` with `mode` and returns the copy and the report, after
/// checking that qemu-img agrees with the report on what is left, and that
/// `qemu-img check -r` on another copy fixes and leaves the same numbers.
fn repair_copy(path: &Path, mode: RepairMode) -> (PathBuf, CheckReport) {
    repair_copy_as(path, mode, true)
}

/// Repairs a copy of `path` fully, like `qemu-img check -r all`: our report after the repair
/// and qemu-img's check of the copy must both be clean. `what` starts the failure message.
fn assert_repairs_clean(path: &Path, what: &str) -> (PathBuf, CheckReport) {
    check_repaired_clean(repair_copy(path, RepairMode::All), what)
}

/// [`assert_repairs_clean`] without comparing with what `qemu-img check -r` fixes.
fn assert_repairs_clean_unlike_qemu(path: &Path, what: &str) -> (PathBuf, CheckReport) {
    check_repaired_clean(repair_copy_as(path, RepairMode::All, false), what)
}

fn check_repaired_clean(
    (copy, repaired): (PathBuf, CheckReport),
    what: &str,
) -> (PathBuf, CheckReport) {
    assert!(repaired.is_clean(), "{what}{repaired:#?}");
    assert_qemu_clean(&copy);
    (copy, repaired)
}

/// `repair_copy`, optionally without comparing with what `qemu-img check -r` fixes
/// (for the cases where snapvmm deliberately repairs differently).
fn repair_copy_as(path: &Path, mode: RepairMode, like_qemu: bool) -> (PathBuf, CheckReport) {
    let copy = path.with_extension(format!("{mode:?}.qcow2"));
    std::fs::copy(path, &copy).expect("copy");
    let report = check(&copy, mode).expect("repair");
    let theirs = qemu_check(&copy);
    assert_eq!(
        counts(&report),
        theirs,
        "after {mode:?}: {:#?}",
        report.messages
    );
    if !like_qemu {
        return (copy, report);
    }
    let reference = path.with_extension(format!("{mode:?}-qemu.qcow2"));
    std::fs::copy(path, &reference).expect("copy");
    let out = Command::new("qemu-img")
        .args(["check", "--output", "json", "-f", "qcow2", "-r"])
        .arg(if mode == RepairMode::All {
            "all"
        } else {
            "leaks"
        })
        .arg(&reference)
        .output()
        .expect("qemu-img check -r");
    let json = String::from_utf8_lossy(&out.stdout);
    if json.contains("image-end-offset") {
        let fixed = (
            json_u64(&json, "leaks-fixed"),
            json_u64(&json, "corruptions-fixed"),
        );
        assert_eq!(
            (report.leaks_fixed, report.corruptions_fixed),
            fixed,
            "fixed counts after {mode:?}: {json} vs {:#?}",
            report.messages
        );
        let left = counts(&report);
        assert_eq!(
            (left.corruptions, left.leaks, left.check_errors),
            (
                json_u64(&json, "corruptions"),
                json_u64(&json, "leaks"),
                json_u64(&json, "check-errors")
            ),
            "left after {mode:?}: {json}"
        );
    }
    (copy, report)
}

fn header_of(path: &Path) -> Header {
    let f = ImageFile::open(path, true, false).expect("open");
    read_header(&f)
}

/// The header as the checker reads it: the first cluster, with tables allowed past the end
/// of the file.
fn read_header(file: &ImageFile) -> Header {
    let first = read_first_cluster(file).expect("read header");
    Header::parse(file.path(), &first, u64::MAX).expect("parse header")
}

fn read_u64(path: &Path, offset: u64) -> u64 {
    let f = ImageFile::open(path, true, false).expect("open");
    let mut b = [0u8; 8];
    f.read_at(&mut b, offset).expect("read");
    u64::from_be_bytes(b)
}

fn write_u64(path: &Path, offset: u64, value: u64) {
    let f = ImageFile::open(path, false, false).expect("open");
    f.write_at(&value.to_be_bytes(), offset).expect("write");
}

/// Byte offset of the refcount block covering `cluster`, and the index inside it.
fn refblock_of(path: &Path, cluster: u64) -> (u64, u64) {
    let h = header_of(path);
    let per = (h.cluster_size() * 8) >> h.refcount_order;
    let block = read_u64(path, h.refcount_table_offset + cluster / per * 8) & !REFT_RESERVED;
    assert_ne!(block, 0, "no refcount block for cluster {cluster}");
    (block, cluster % per)
}

fn get_refcount(path: &Path, cluster: u64) -> u64 {
    let h = header_of(path);
    let (block, index) = refblock_of(path, cluster);
    let f = ImageFile::open(path, true, false).expect("open");
    let mut data = vec![0u8; h.cluster_size() as usize];
    f.read_at(&mut data, block).expect("read");
    read_entry(h.refcount_order, &data, index)
}

fn set_refcount(path: &Path, cluster: u64, value: u64) {
    let h = header_of(path);
    let (block, index) = refblock_of(path, cluster);
    let f = ImageFile::open(path, false, false).expect("open");
    let mut data = vec![0u8; h.cluster_size() as usize];
    f.read_at(&mut data, block).expect("read");
    write_entry(h.refcount_order, &mut data, index, value);
    f.write_at(&data, block).expect("write");
}

/// File offsets of the L1 entry and the L2 entry mapping `guest_offset`.
fn entries_of(path: &Path, guest_offset: u64) -> (u64, u64) {
    let h = header_of(path);
    let cluster = guest_offset >> h.cluster_bits;
    let l1_at = h.l1_table_offset + cluster / h.l2_entries() * 8;
    let l2 = read_u64(path, l1_at) & OFFSET_MASK;
    assert_ne!(l2, 0, "guest offset {guest_offset:#x} has no L2 table");
    (l1_at, l2 + cluster % h.l2_entries() * 8)
}

/// Host cluster index of the data at `guest_offset`.
fn host_cluster(path: &Path, guest_offset: u64) -> u64 {
    let (_, l2_at) = entries_of(path, guest_offset);
    (read_u64(path, l2_at) & OFFSET_MASK) >> header_of(path).cluster_bits
}

/// Appends a cluster to the file with refcount 1 that nothing references.
fn append_leaked_cluster(path: &Path) -> u64 {
    let cs = header_of(path).cluster_size();
    let len = std::fs::metadata(path).expect("stat").len();
    let cluster = len.div_ceil(cs);
    let f = ImageFile::open(path, false, false).expect("open");
    f.write_at(&vec![0x5a; cs as usize], cluster * cs)
        .expect("write");
    drop(f);
    set_refcount(path, cluster, 1);
    cluster
}

/// A small image with scattered, out-of-order writes (so some fragmentation).
fn populated(dir: &Path, name: &str, options: &str, unit: u64) -> PathBuf {
    let size = (256 * unit).max(64 << 20).to_string();
    let path = create(dir, name, options, &size);
    let cmds: Vec<String> = [5u64, 0, 1, 2, 9, 3, 200, 40]
        .iter()
        .map(|k| format!("write -P {} {} {}", 0x10 + k, k * unit, unit))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&path, &cmds);
    path
}

#[test]
fn clean_image_matches_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "clean.qcow2", "", 64 << 10);
    io(
        &path,
        &["write -z 128M 64k", "write -z -u 0 64k"]
            .map(|c| c.replace("128M", "1M"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let report = assert_matches_qemu(&path);
    assert!(report.is_clean(), "{report:?}");
    assert!(report.fragmented_clusters > 0, "{report:?}");
    let (_, repaired) = repair_copy(&path, RepairMode::All);
    assert_eq!((repaired.leaks_fixed, repaired.corruptions_fixed), (0, 0));
}

#[test]
fn leak_is_reported_and_repaired() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "leak.qcow2", "", 64 << 10);
    append_leaked_cluster(&path);
    let report = assert_matches_qemu(&path);
    assert_eq!((report.leaks, report.corruptions), (1, 0));
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let (copy, repaired) = repair_copy(&path, mode);
        assert_eq!(repaired.leaks_fixed, 1);
        assert!(repaired.is_clean(), "{repaired:?}");
        assert_qemu_clean(&copy);
    }
}

#[test]
fn refcount_too_high_is_a_leak_and_a_copied_error() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "high.qcow2", "", 64 << 10);
    let cluster = host_cluster(&path, 0);
    set_refcount(&path, cluster, 2);
    let report = assert_matches_qemu(&path);
    assert_eq!((report.leaks, report.corruptions), (1, 1));
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let (copy, repaired) = repair_copy(&path, mode);
        assert!(repaired.is_clean(), "{mode:?}: {repaired:?}");
        assert_qemu_clean(&copy);
    }
}

#[test]
fn zero_refcount_needs_a_rebuild() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "zero.qcow2", "", 64 << 10);
    let cluster = host_cluster(&path, 64 << 10);
    set_refcount(&path, cluster, 0);
    let report = assert_matches_qemu(&path);
    assert_eq!(report.corruptions, 2, "{:#?}", report.messages);
    // Leaks only cannot rebuild: a check error, as in QEMU.
    let copy = path.with_extension("leaks.qcow2");
    std::fs::copy(&path, &copy).expect("copy");
    let leaks = check(&copy, RepairMode::Leaks).expect("check");
    assert_eq!(leaks.check_errors, 1, "{leaks:?}");
    let (copy, repaired) = assert_repairs_clean(&path, "");
    assert!(repaired.corruptions_fixed >= 1, "{repaired:?}");
    // The repaired image still reads back what was written.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 64k 64k",
            copy.to_str().expect("utf-8"),
        ],
    );
}

#[test]
fn refcount_too_low_with_snapshot_is_repaired() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "low.qcow2", "", 64 << 10);
    snapshot(&path, "s1");
    let cluster = host_cluster(&path, 0);
    assert_eq!(get_refcount(&path, cluster), 2);
    set_refcount(&path, cluster, 1);
    let report = assert_matches_qemu(&path);
    assert_eq!(report.corruptions, 2, "{:#?}", report.messages);
    let (copy, _) = assert_repairs_clean(&path, "");
    assert_eq!(get_refcount(&copy, cluster), 2);
}

#[test]
fn wrong_copied_flags_are_repaired() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "copied.qcow2", "", 64 << 10);
    let (l1_at, l2_at) = entries_of(&path, 0);
    write_u64(&path, l1_at, read_u64(&path, l1_at) & !OFLAG_COPIED);
    write_u64(&path, l2_at, read_u64(&path, l2_at) & !OFLAG_COPIED);
    let report = assert_matches_qemu(&path);
    assert_eq!(report.corruptions, 2);
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let (copy, repaired) = repair_copy(&path, mode);
        assert_eq!(repaired.corruptions_fixed, 2, "{mode:?}");
        assert_qemu_clean(&copy);
    }
    // COPIED on a compressed entry is an error of its own.
    let path = populated(dir.path(), "copied2.qcow2", "", 64 << 10);
    let (_, l2_at) = entries_of(&path, 0);
    write_u64(&path, l2_at, read_u64(&path, l2_at) | (1 << 60));
    assert_eq!(assert_matches_qemu(&path).corruptions, 1);
}

#[test]
fn internal_snapshots_match_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "snap.qcow2", "", 64 << 10);
    snapshot(&path, "s1");
    io(&path, &["write -P 0x77 0 128k", "write -P 0x78 10M 64k"]);
    snapshot(&path, "s2");
    io(&path, &["write -P 0x79 64k 64k", "discard 128k 64k"]);
    snapshot(&path, "s3");
    run(
        "qemu-img",
        &["snapshot", "-d", "s2", path.to_str().expect("utf-8")],
    );
    let report = assert_matches_qemu(&path);
    assert!(report.is_clean(), "{report:#?}");
    // A leaked cluster and a too-low shared refcount together.
    append_leaked_cluster(&path);
    let shared = host_cluster(&path, 5 << 16);
    let count = get_refcount(&path, shared);
    assert!(count >= 2, "cluster {shared} refcount {count}");
    set_refcount(&path, shared, count - 1);
    assert_matches_qemu(&path);
    assert_repairs_clean(&path, "");
}

#[test]
fn compressed_clusters_match_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = populated(dir.path(), "src.qcow2", "", 64 << 10);
    let dst = dir.path().join("compressed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().expect("utf-8"),
            dst.to_str().expect("utf-8"),
        ],
    );
    io(&dst, &["write -P 0x33 1M 64k"]);
    let report = assert_matches_qemu(&dst);
    assert!(report.compressed_clusters > 0, "{report:?}");
    snapshot(&dst, "s1");
    assert_matches_qemu(&dst);
    append_leaked_cluster(&dst);
    let (copy, _) = repair_copy(&dst, RepairMode::All);
    assert_qemu_clean(&copy);
}

#[test]
fn refcount_widths_match_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    for bits in [1u32, 2, 4, 8, 32, 64] {
        let path = populated(
            dir.path(),
            &format!("rb{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
            64 << 10,
        );
        assert!(assert_matches_qemu(&path).is_clean());
        if bits > 1 {
            snapshot(&path, "s1");
            io(&path, &["write -P 0x44 0 64k"]);
            assert!(assert_matches_qemu(&path).is_clean());
        }
        append_leaked_cluster(&path);
        let cluster = host_cluster(&path, 1 << 16);
        if bits > 1 {
            set_refcount(&path, cluster, 3);
        } else {
            set_refcount(&path, cluster, 0);
        }
        assert_matches_qemu(&path);
        assert_repairs_clean(&path, &format!("refcount_bits={bits}: "));
    }
}

#[test]
fn cluster_sizes_match_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    for (cs, unit) in [(512u64, 512u64), (2 << 20, 2 << 20)] {
        let path = populated(
            dir.path(),
            &format!("cs{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            unit,
        );
        assert!(assert_matches_qemu(&path).is_clean());
        snapshot(&path, "s1");
        io(&path, &[&format!("write -P 0x55 0 {unit}")]);
        assert!(assert_matches_qemu(&path).is_clean());
        append_leaked_cluster(&path);
        let (l1_at, _) = entries_of(&path, 0);
        write_u64(&path, l1_at, read_u64(&path, l1_at) ^ OFLAG_COPIED);
        assert_matches_qemu(&path);
        assert_repairs_clean(&path, &format!("cluster_size={cs}: "));
    }
}

#[test]
fn version_2_images_match_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "v2.qcow2", "compat=0.10", 64 << 10);
    assert!(assert_matches_qemu(&path).is_clean());
    snapshot(&path, "s1");
    io(&path, &["write -P 0x66 0 192k"]);
    assert!(assert_matches_qemu(&path).is_clean());
    append_leaked_cluster(&path);
    set_refcount(&path, host_cluster(&path, 5 << 16), 0);
    assert_matches_qemu(&path);
    let (copy, _) = assert_repairs_clean(&path, "");
    assert_eq!(header_of(&copy).version, 2);
}

#[test]
fn persistent_bitmaps_are_counted() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create(dir.path(), "bitmap.qcow2", "", "64M");
    let p = path.to_str().expect("utf-8");
    run("qemu-img", &["bitmap", "--add", p, "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", p, "b1"]);
    io(&path, &["write 0 4M", "write 32M 1M"]);
    let report = assert_matches_qemu(&path);
    assert!(report.is_clean(), "{report:#?}");
}

/// A crash with lazy refcounts leaves the dirty bit and refcounts that are too low.
fn dirty_image(dir: &Path, name: &str) -> PathBuf {
    let path = create(dir, name, "lazy_refcounts=on", "64M");
    io(&path, &["write -P 0x21 0 256k"]);
    snapshot(&path, "s1");
    let status = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 64k 64k",
            "-c",
            "write -P 0x23 8M 128k",
            "-c",
            "sigraise 9",
        ])
        .arg(&path)
        .output()
        .expect("qemu-io");
    assert!(!status.status.success(), "qemu-io should have been killed");
    assert_ne!(header_of(&path).incompatible_features & INCOMPAT_DIRTY, 0);
    path
}

#[test]
fn dirty_image_is_rebuilt_clean() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dirty_image(dir.path(), "dirty.qcow2");
    let report = assert_matches_qemu(&path);
    assert!(report.corruptions > 0, "{report:?}");

    let rebuilt = path.with_extension("rebuilt.qcow2");
    std::fs::copy(&path, &rebuilt).expect("copy");
    let file = ImageFile::open(&rebuilt, false, false).expect("open");
    let mut h = read_header(&file);
    rebuild_refcounts(&file, &mut h).expect("rebuild");
    drop(file);
    assert_eq!(h.incompatible_features & INCOMPAT_DIRTY, 0);
    assert_eq!(header_of(&rebuilt), h);
    assert_qemu_clean(&rebuilt);
    assert!(check(&rebuilt, RepairMode::None).expect("check").is_clean());
    let r = rebuilt.to_str().expect("utf-8");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 64k 64k",
            "-c",
            "read -P 0x23 8M 128k",
            r,
        ],
    );
    // Rebuilding twice in a row reuses the space of the first rebuild's old structure.
    let len = std::fs::metadata(&rebuilt).expect("stat").len();
    let file = ImageFile::open(&rebuilt, false, false).expect("open");
    rebuild_refcounts(&file, &mut h).expect("rebuild again");
    drop(file);
    assert_qemu_clean(&rebuilt);
    assert_eq!(std::fs::metadata(&rebuilt).expect("stat").len(), len);

    let (copy, _) = assert_repairs_clean(&path, "");
    assert_eq!(header_of(&copy).incompatible_features & INCOMPAT_DIRTY, 0);
}

#[test]
fn opening_a_dirty_image_writable_rebuilds_it() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dirty_image(dir.path(), "open-dirty.qcow2");
    {
        let disk = storage::open(&path, &storage::OpenOptions::default()).expect("open");
        let mut buf = vec![0u8; 64 << 10];
        disk.read_at(&mut buf, 64 << 10).expect("read");
        assert!(buf.iter().all(|&b| b == 0x22));
        disk.write_at(&vec![0x24; 64 << 10], 16 << 20)
            .expect("write");
        disk.flush().expect("flush");
    }
    assert_eq!(header_of(&path).incompatible_features & INCOMPAT_DIRTY, 0);
    assert_qemu_clean(&path);
    let p = path.to_str().expect("utf-8");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x24 16M 64k",
            "-c",
            "read -P 0x23 8M 128k",
            p,
        ],
    );
    run("qemu-img", &["snapshot", "-a", "s1", p]);
    run("qemu-io", &["-f", "qcow2", "-c", "read -P 0x21 0 256k", p]);
    assert_qemu_clean(&path);
}

#[test]
fn broken_refcount_structures_are_rebuilt() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = populated(dir.path(), "broken.qcow2", "", 64 << 10);
    snapshot(&path, "s1");
    let h = header_of(&path);
    // The first refcount block pointed at twice.
    let first = read_u64(&path, h.refcount_table_offset);
    write_u64(&path, h.refcount_table_offset + 8, first);
    assert_matches_qemu(&path);
    assert_repairs_clean(&path, "");

    // An unaligned refcount table entry.
    let path = populated(dir.path(), "unaligned.qcow2", "", 64 << 10);
    write_u64(&path, h.refcount_table_offset, first | 0x200);
    let theirs = qemu_check(&path);
    let ours = check(&path, RepairMode::None).expect("check");
    assert_eq!(ours.corruptions, theirs.corruptions, "{:#?}", ours.messages);
    assert_repairs_clean(&path, "");

    // A refcount block outside the file: QEMU grows the file to cover it (here to
    // 1 TiB); snapvmm rebuilds the refcount structure instead.
    let path = populated(dir.path(), "outside.qcow2", "", 64 << 10);
    write_u64(&path, h.refcount_table_offset + 16, 1 << 40);
    assert_matches_qemu(&path);
    let (copy, _) = assert_repairs_clean_unlike_qemu(&path, "");
    assert!(std::fs::metadata(&copy).expect("stat").len() < 1 << 30);
}

#[test]
fn rebuild_refuses_corrupt_metadata() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dirty_image(dir.path(), "refuse.qcow2");
    let (_, l2_at) = entries_of(&path, 0);
    write_u64(&path, l2_at, (1 << 50) | OFLAG_COPIED);
    let before = std::fs::read(&path).expect("read");
    let file = ImageFile::open(&path, false, false).expect("open");
    let mut h = read_header(&file);
    let err = rebuild_refcounts(&file, &mut h).expect_err("corrupt metadata");
    assert!(err.to_string().contains("corrupt metadata"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

/// Tiny xorshift generator: deterministic fuzzing without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn malformed_metadata_never_panics() {
    require_qemu!();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("fuzz-src.qcow2");
    let base = populated(dir.path(), "fuzz-base.qcow2", "cluster_size=4096", 4096);
    snapshot(&base, "s1");
    io(&base, &["write -P 0x99 0 8k"]);
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            base.to_str().expect("utf-8"),
            src.to_str().expect("utf-8"),
        ],
    );
    snapshot(&src, "s2");
    io(&src, &["write -P 0x98 4k 4k"]);
    let h = header_of(&src);
    let cs = h.cluster_size();
    let pristine = std::fs::read(&src).expect("read");
    // Metadata regions worth corrupting: header fields, refcount table and first block,
    // L1 tables, L2 tables and the snapshot table.
    let mut regions: Vec<(u64, u64)> = vec![
        (0, 104),
        (h.refcount_table_offset, 64),
        (read_u64(&src, h.refcount_table_offset), 256),
        (h.l1_table_offset, 64),
        (h.snapshots_offset, 128),
    ];
    let l2 = read_u64(&src, h.l1_table_offset) & OFFSET_MASK;
    regions.push((l2, cs));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let work = dir.path().join("fuzz.qcow2");
    let qemu_json = |path: &Path| {
        let out = Command::new("qemu-img")
            .args(["check", "--output", "json", "-f", "qcow2"])
            .arg(path)
            .output()
            .expect("qemu-img check");
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        // Without a report qemu-img could not open or finish the check.
        json.contains("image-end-offset").then_some(json)
    };
    // Each round runs qemu-img up to four times; CI keeps the default small, longer
    // runs set SNAPVMM_CHECK_FUZZ_ROUNDS.
    let rounds: usize = std::env::var("SNAPVMM_CHECK_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for round in 0..rounds {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.next() % 4 {
            let (start, len) = regions[(rng.next() % regions.len() as u64) as usize];
            let at = (start + rng.next() % len) as usize;
            if at < bytes.len() {
                bytes[at] ^= 1 << (rng.next() % 8);
            }
        }
        std::fs::write(&work, &bytes).expect("write");
        // Read-only: the same numbers as qemu-img whenever both produce a report.
        if let (Ok(ours), Some(_)) = (check(&work, RepairMode::None), qemu_json(&work)) {
            assert_eq!(
                counts(&ours),
                qemu_check(&work),
                "round {round}: {:#?}",
                ours.messages
            );
        }
        // Repair: what is left is what qemu-img sees afterwards.
        let mode = [RepairMode::Leaks, RepairMode::All][round % 2];
        if let Ok(report) = check(&work, mode) {
            if mode == RepairMode::All && qemu_json(&work).is_some() {
                let theirs = qemu_check(&work);
                assert_eq!(
                    (report.corruptions, report.leaks, report.check_errors),
                    (theirs.corruptions, theirs.leaks, theirs.check_errors),
                    "round {round}: {:#?}",
                    report.messages
                );
            }
        }
    }
}
