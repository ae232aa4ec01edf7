//! Regression tests for the storage findings of issue 13 (adversarial pass): each failed
//! before its fix.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use storage::qcow2::{create, CreateOptions, Qcow2Image};
use storage::raw::RawImage;
use storage::{BlockDevice, ImageFormat, OpenOptions};

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
