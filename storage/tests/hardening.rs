//! Regression tests for the storage findings of issue 13 (adversarial pass): each failed
//! before its fix.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use storage::qcow2::{create, CreateOptions, Qcow2Image};
use storage::raw::RawImage;
use storage::{ImageFormat, OpenOptions};

fn new_qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    create(
        &path,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .expect("create");
    path
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Finding 1: a guest must not turn its probed raw disk into an image of another format.
#[test]
fn a_probed_raw_image_refuses_a_foreign_header_in_sector_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    RawImage::create(&path, 1 << 20).unwrap();
    let disk = storage::open(&path, &OpenOptions::default()).unwrap();
    assert!(disk.format_probed());
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    let err = disk
        .write_at(&header, 0)
        .expect_err("qcow2 magic in sector 0");
    assert!(err.to_string().contains("probe as qcow2"), "{err}");
    match &err {
        storage::Error::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied)
        }
        other => panic!("{other:?}"),
    }
    // Built up piecewise, the header is refused at the piece that completes it.
    disk.write_at(b"QFI", 0).unwrap();
    assert!(disk.write_at(b"\xfb", 3).is_err());
    // Other data in sector 0, and the magic elsewhere, are ordinary writes.
    disk.write_at(&[0x55; 512], 0).unwrap();
    disk.write_at(&header, 4096).unwrap();
    disk.flush().unwrap();
    assert_eq!(storage::probe_format(&path).unwrap(), ImageFormat::Raw);

    // With the format given, the guest owns every byte.
    let explicit = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..Default::default()
    };
    let disk = storage::open(&path, &explicit).unwrap();
    assert!(!disk.format_probed());
    disk.write_at(&header, 0).unwrap();
}

/// Finding 2: images the engine creates are private whatever the umask.
#[test]
fn created_images_and_directories_are_private() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: umask only changes this process's file-creation mask; 022 is the usual
    // default, which made new images world-readable before the fix.
    let old = unsafe { libc::umask(0o022) };
    let qcow2 = new_qcow2(dir.path(), "a.qcow2", 1 << 20);
    let raw = dir.path().join("b.raw");
    RawImage::create(&raw, 1 << 20).unwrap();
    let private = dir.path().join("x/y");
    storage::file::create_private_dir(&private).unwrap();
    let file = private.join("mem");
    storage::file::create_private_file(&file).unwrap();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    assert_eq!(mode(&qcow2), 0o600);
    assert_eq!(mode(&raw), 0o600);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&private), 0o700);
    assert_eq!(mode(&dir.path().join("x")), 0o700);
}

/// Finding 15: `backing_file_size = 0` with an offset means no backing file.
#[test]
fn an_empty_backing_name_is_no_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_qcow2(dir.path(), "a.qcow2", 1 << 20);
    let file = storage::file::ImageFile::open(&path, false, false).unwrap();
    file.write_at(&0x1f0u64.to_be_bytes(), 8).unwrap();
    file.write_at(&0u32.to_be_bytes(), 16).unwrap();
    drop(file);
    let disk = storage::open(&path, &OpenOptions::default()).unwrap();
    assert!(disk.backing().is_none());
    assert_eq!(disk.info().backing_filename, None);
    let mut buf = [1u8; 512];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    drop(disk);
    assert!(Qcow2Image::open(&path, &OpenOptions::default()).is_ok());
}

use test_support::qemu::run as qemu;

/// An image opened read-only, everything else default.
fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

fn qemu_ok(program: &str, args: &[&str]) {
    let out = qemu(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` exit status: 0 clean, 3 leaks only, 2 corruptions.
fn qemu_check(path: &Path) -> i32 {
    qemu("qemu-img", &["check", "-q", "-U", path.to_str().unwrap()])
        .status
        .code()
        .unwrap_or(-1)
}

fn read_u64(file: &storage::file::ImageFile, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// Adds `delta` to the on-disk refcount of host cluster `cluster` of the image at `path`.
fn bump_refcount(path: &Path, cluster: u64, delta: i64) {
    use storage::qcow2::refcount::{read_entry, write_entry};
    let file = storage::file::ImageFile::open(path, false, false).unwrap();
    let first = storage::qcow2::header::read_first_cluster(&file).unwrap();
    let h = storage::qcow2::Header::parse(path, &first, u64::MAX).unwrap();
    let per_block = (h.cluster_size() * 8) >> h.refcount_order;
    let block = read_u64(&file, h.refcount_table_offset + cluster / per_block * 8);
    let mut data = vec![0u8; h.cluster_size() as usize];
    file.read_at(&mut data, block).unwrap();
    let index = cluster % per_block;
    let value = read_entry(h.refcount_order, &data, index) as i64 + delta;
    write_entry(h.refcount_order, &mut data, index, value as u64);
    file.write_at(&data, block).unwrap();
    file.sync().unwrap();
}

/// Finding 6: reverting onto a copy (apply, then delete every snapshot) keeps COPIED in line
/// with the refcounts even when the snapshot's L2 table carries a leaked reference.
#[test]
fn revert_onto_a_copy_keeps_copied_flags_right_with_a_leaked_l2_reference() {
    if !test_support::require::have_qemu(
        "revert_onto_a_copy_keeps_copied_flags_right_with_a_leaked_l2_reference",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let p = path.to_str().unwrap();
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 256k", p]);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", p]);
    // The active layer copies the shared L2 table on this write: s1 keeps the old one.
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 64k", p]);
    let l2 = {
        let image = Qcow2Image::open(&path, &read_only()).unwrap();
        let l1 = image.snapshots()[0].l1_table_offset;
        read_u64(image.file(), l1) & storage::qcow2::entry::OFFSET_MASK
    };
    // What a kill -9 between a refcount increment and its commit leaves.
    bump_refcount(&path, l2 >> 16, 1);
    assert_eq!(qemu_check(&path), 3, "a leak, no corruption");

    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&path, &copy).unwrap();
    {
        let mut image = Qcow2Image::open(&copy, &OpenOptions::default()).unwrap();
        image.apply_snapshot("s1").unwrap();
        image.delete_snapshot("s1").unwrap();
    }
    let code = qemu_check(&copy);
    assert!(
        code == 0 || code == 3,
        "qemu-img check of the copy exits {code}"
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 256k",
            copy.to_str().unwrap(),
        ],
    );
}

/// Finding 9: opening an image reads no snapshot L1 table, however many snapshots it has and
/// however large their tables claim to be.
#[test]
fn opening_reads_no_snapshot_l1_table() {
    use storage::fault::{self, FaultPlan, Op};
    use storage::qcow2::snapshot::{serialize_table, SnapshotEntry};
    let dir = tempfile::tempdir().unwrap();
    let path = new_qcow2(dir.path(), "many.qcow2", 1 << 20);
    let entries: Vec<SnapshotEntry> = (0..1024u32)
        .map(|i| SnapshotEntry {
            l1_table_offset: 0x30000,
            // 32 MiB of L1 table each, past the end of a 384 KiB file.
            l1_size: 4 << 20,
            id: (i + 1).to_string(),
            name: format!("s{i}"),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 1 << 20,
            icount: -1,
            extra_unknown: Vec::new(),
        })
        .collect();
    let table = serialize_table(&entries).unwrap();
    let file = storage::file::ImageFile::open(&path, false, false).unwrap();
    let at = file.len().unwrap().next_multiple_of(65536);
    file.write_at(&table, at).unwrap();
    file.set_len(384 << 10).unwrap();
    file.write_at(&1024u32.to_be_bytes(), 60).unwrap();
    file.write_at(&at.to_be_bytes(), 64).unwrap();
    drop(file);

    let reads =
        fault::inject(FaultPlan::fail_nth(0, Some(Op::Read), fault::Fault::Eio).under(dir.path()));
    let image = Qcow2Image::open(&path, &read_only()).unwrap();
    let count = reads.count();
    drop(reads);
    assert_eq!(image.snapshots().len(), 1024);
    assert!(count < 64, "opening made {count} reads");
    drop(image);
    // Applying such a snapshot is refused, naming it, before anything changes.
    let mut image = Qcow2Image::open(&path, &OpenOptions::default()).unwrap();
    let err = image
        .apply_snapshot("s5")
        .expect_err("L1 table past the end");
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
}

/// Image locking against QEMU: a writer here keeps qemu-img from reading without -U, and a
/// writer in qemu-io keeps this engine from writing.
#[test]
fn image_locks_interoperate_with_qemu() {
    use std::io::{BufRead, Write};
    if !test_support::require::have_qemu("image_locks_interoperate_with_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = new_qcow2(dir.path(), "locked.qcow2", 1 << 20);
    let p = path.to_str().unwrap();
    {
        let disk = storage::open(&path, &OpenOptions::default()).unwrap();
        let info = qemu("qemu-img", &["info", p]);
        assert!(!info.status.success(), "qemu-img info without -U must fail");
        assert!(
            String::from_utf8_lossy(&info.stderr).contains("lock"),
            "{}",
            String::from_utf8_lossy(&info.stderr)
        );
        qemu_ok("qemu-img", &["info", "-U", p]);
        // Reopening in this process, read-only or writable, is not a conflict.
        let again = storage::open(&path, &read_only()).unwrap();
        drop(again);
        disk.write_at(&[1; 512], 0).unwrap();
        disk.flush().unwrap();
        // Sealed read-only (a live snapshot's old top), it no longer holds the write lock
        // but still refuses other writers.
        disk.as_qcow2().unwrap().make_read_only().unwrap();
        qemu_ok("qemu-img", &["info", p]);
        let write = qemu("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p]);
        assert!(
            !write.status.success(),
            "qemu-io must not write under a reader"
        );
    }
    // All released with the last handle.
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p]);

    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", p])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    writeln!(stdin, "read 0 512").unwrap();
    let mut line = String::new();
    // qemu-io answers only once it holds the image.
    while !line.contains("bytes at offset") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "qemu-io exited");
    }
    let err = storage::open(&path, &OpenOptions::default())
        .err()
        .expect("qemu-io writes it");
    assert!(matches!(err, storage::Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked.qcow2"), "{err}");
    let err = storage::open(&path, &read_only())
        .err()
        .expect("a reader refuses a writer it cannot stop");
    assert!(err.to_string().contains("shared \"write\" lock"), "{err}");
    let shared = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    storage::open(&path, &shared).expect("-U reads anyway");
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
    storage::open(&path, &OpenOptions::default()).expect("free again");
}
