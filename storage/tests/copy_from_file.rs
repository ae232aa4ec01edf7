//! The file-to-file copy that commit and stream use (`ImageFile::copy_from`,
//! `BlockDevice::write_from_file`): in the kernel, through memory when the kernel cannot
//! copy (injected, O_DIRECT, across file systems) or stops short (the end of the source),
//! and failed part-way: a failed copy publishes no mapping, and the image stays consistent
//! (`qemu-img check`: leaks at most).

use std::path::{Path, PathBuf};
use std::process::Command;

use storage::fault::{self, Fault, FaultPlan, Op};
use storage::file::{CopyPath, ImageFile};
use storage::qcow2::{create, CreateOptions, Qcow2Image};
use storage::{Allocation, BlockDevice, OpenOptions};

const CLUSTER: u64 = 4096;
const SIZE: u64 = 1 << 20;

/// Bytes that differ from offset to offset, so a copy from the wrong place shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A source file holding `data`, opened read-only as an image file.
fn source(dir: &Path, data: &[u8]) -> ImageFile {
    let path = dir.join("source.raw");
    std::fs::write(&path, data).expect("write source");
    ImageFile::open(&path, true, false).expect("open source")
}

fn new_qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    create(
        &path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size: CLUSTER,
            ..Default::default()
        },
    )
    .expect("create");
    path
}

fn open_qcow2(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &OpenOptions::default()).expect("open qcow2")
}

fn read_all(device: &dyn BlockDevice) -> Vec<u8> {
    let mut out = vec![0u8; device.size() as usize];
    device.read_at(&mut out, 0).expect("read");
    out
}

/// `qemu-img check` exit status: 0 clean, 3 leaks only, 2 corruption; None without qemu-img.
fn qemu_check(path: &Path) -> Option<i32> {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .ok()?;
    Some(out.status.code().unwrap_or(-1))
}

fn have_qemu() -> bool {
    let ok = qemu_check(Path::new("/nonexistent")).is_some();
    if !ok {
        assert!(
            std::env::var("SNAPVMM_REQUIRE_QEMU").is_err(),
            "qemu-img is required (SNAPVMM_REQUIRE_QEMU is set) but not found"
        );
        eprintln!("skipping the qemu-img check: qemu-img not found");
    }
    ok
}

#[test]
fn the_kernel_copies_within_a_file_system_and_stops_short_at_the_source_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(300 << 10, 1);
    let src = source(dir.path(), &data);
    let dst = ImageFile::create(&dir.path().join("dst")).expect("create dst");
    let path = dst.copy_from(&src, 4096, 128 << 10, 8192).expect("copy");
    assert_eq!(
        path,
        CopyPath::Kernel,
        "a copy in one file system runs in the kernel"
    );
    // Past the source's end: what the kernel copied, then zeroes through memory.
    let path = dst
        .copy_from(&src, (300 << 10) - 1000, 5000, 200 << 10)
        .expect("copy past the end");
    assert_eq!(path, CopyPath::Mixed);
    let mut got = vec![0u8; 128 << 10];
    dst.read_at(&mut got, 8192).expect("read");
    assert_eq!(got, &data[4096..4096 + (128 << 10)]);
    let mut tail = vec![0xffu8; 5000];
    dst.read_at(&mut tail, 200 << 10).expect("read tail");
    assert_eq!(&tail[..1000], &data[(300 << 10) - 1000..]);
    assert!(
        tail[1000..].iter().all(|&b| b == 0),
        "past the source's end reads as zeroes"
    );
}

#[test]
fn a_kernel_that_cannot_copy_falls_back_to_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(256 << 10, 2);
    let src = source(dir.path(), &data);

    // Injected: the kernel answers EOPNOTSUPP.
    let dst = ImageFile::create(&dir.path().join("injected")).expect("create");
    let guard =
        fault::inject(FaultPlan::fail_nth(1, Some(Op::Copy), Fault::Unsupported).under(dir.path()));
    let path = dst.copy_from(&src, 0, 256 << 10, 0).expect("copy");
    assert_eq!(guard.fired(), 1);
    drop(guard);
    assert_eq!(path, CopyPath::Memory);
    let mut got = vec![0u8; 256 << 10];
    dst.read_at(&mut got, 0).expect("read");
    assert_eq!(got, data);

    // O_DIRECT on the destination: through aligned memory.
    let direct_path = dir.path().join("direct");
    std::fs::write(&direct_path, b"").expect("create");
    if let Ok(direct) = ImageFile::open(&direct_path, false, true) {
        let path = direct
            .copy_from(&src, 4096, 64 << 10, 8192)
            .expect("direct copy");
        assert_eq!(path, CopyPath::Memory);
        let mut got = vec![0u8; 64 << 10];
        direct.read_at(&mut got, 8192).expect("read");
        assert_eq!(got, &data[4096..4096 + (64 << 10)]);
    }

    // Across file systems (tmpfs to the test directory's), where the kernel says EXDEV.
    let shm = Path::new("/dev/shm");
    let other_fs = |a: &Path, b: &Path| {
        use std::os::unix::fs::MetadataExt;
        matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() != y.dev())
    };
    if other_fs(shm, dir.path()) {
        let far = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let far_src = source(far.path(), &data);
        let dst = ImageFile::create(&dir.path().join("cross")).expect("create");
        let path = dst
            .copy_from(&far_src, 0, 256 << 10, 0)
            .expect("cross copy");
        assert_ne!(path, CopyPath::Mixed);
        let mut got = vec![0u8; 256 << 10];
        dst.read_at(&mut got, 0).expect("read");
        assert_eq!(got, data);
    }
}

#[test]
fn a_qcow2_layer_takes_whole_and_partial_clusters_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(SIZE as usize, 3);
    let src = source(dir.path(), &data);
    for fallback in [false, true] {
        let path = new_qcow2(dir.path(), &format!("target-{fallback}.qcow2"));
        let image = open_qcow2(&path);
        // An owned cluster in the middle of the range: written in place, between two runs
        // of fresh clusters.
        image
            .write_at(&vec![0x77; CLUSTER as usize], 40 * CLUSTER)
            .expect("write");
        let mut expected = vec![0u8; SIZE as usize];
        expected[(40 * CLUSTER) as usize..(41 * CLUSTER) as usize].fill(0x77);
        let guard = fallback.then(|| {
            fault::inject(
                FaultPlan::fail_nth(1, Some(Op::Copy), Fault::Unsupported)
                    .under(dir.path())
                    .sticky(),
            )
        });
        // A partial head, 100 whole clusters, a partial tail.
        let (offset, len, from) = (3 * CLUSTER + 100, 100 * CLUSTER + 50, 7 * CLUSTER + 100);
        image
            .write_from_file(offset, len, &src, from)
            .expect("write from file");
        if let Some(guard) = guard {
            assert!(guard.fired() > 0, "the fallback was not taken");
        }
        expected[offset as usize..(offset + len) as usize]
            .copy_from_slice(&data[from as usize..(from + len) as usize]);
        assert_eq!(read_all(&image), expected, "fallback {fallback}");
        image.flush().expect("flush");
        drop(image);
        let image = open_qcow2(&path);
        assert_eq!(
            read_all(&image),
            expected,
            "after reopening (fallback {fallback})"
        );
        let status = image.block_status(10 * CLUSTER, CLUSTER).expect("status");
        assert_eq!(status.allocation, Allocation::Data);
        drop(image);
        if have_qemu() {
            assert_eq!(
                qemu_check(&path),
                Some(0),
                "qemu-img check of {}",
                path.display()
            );
        }
    }
}

#[test]
fn a_failed_copy_publishes_no_mapping_and_leaves_the_image_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(SIZE as usize, 4);
    let src = source(dir.path(), &data);
    // The copy below is two kernel copies (fresh clusters on either side of an owned one):
    // fail the first, then the second, with each error a disk can give.
    for nth in [1, 2] {
        for error in [Fault::Eio, Fault::Enospc] {
            let path = new_qcow2(dir.path(), &format!("failed-{nth}-{error:?}.qcow2"));
            let image = open_qcow2(&path);
            image
                .write_at(&vec![0x55; CLUSTER as usize], 20 * CLUSTER)
                .expect("write");
            image.flush().expect("flush");
            let guard =
                fault::inject(FaultPlan::fail_nth(nth, Some(Op::Copy), error).under(dir.path()));
            let result = image.write_from_file(0, 32 * CLUSTER, &src, 0);
            assert_eq!(guard.fired(), 1, "copy {nth} ({error:?}) was not failed");
            drop(guard);
            assert!(result.is_err(), "copy {nth} ({error:?}) reported success");
            // No fresh cluster is mapped: the copy's clusters read as before.
            for cluster in (0..32).filter(|&c| c != 20) {
                let status = image
                    .block_status(cluster * CLUSTER, CLUSTER)
                    .expect("status");
                assert_eq!(
                    status.allocation,
                    Allocation::Unallocated,
                    "cluster {cluster} mapped after failed copy {nth} ({error:?})"
                );
            }
            // As after a crash: no flush, no close.
            std::mem::forget(image);
            if have_qemu() {
                let code = qemu_check(&path);
                assert!(
                    matches!(code, Some(0 | 3)),
                    "qemu-img check after failed copy {nth} ({error:?}): exit {code:?}"
                );
            }
            let image = open_qcow2(&path);
            let mut cluster = vec![0u8; CLUSTER as usize];
            image.read_at(&mut cluster, 20 * CLUSTER).expect("read");
            let written = cluster.iter().all(|&b| b == 0x55)
                || cluster == data[20 * CLUSTER as usize..21 * CLUSTER as usize];
            assert!(
                written,
                "the owned cluster holds neither its old nor its new bytes"
            );
        }
    }
}
