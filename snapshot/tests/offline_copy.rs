//! Offline commit and safe rebase (`snapshot::offline`) copy plain data extents file to file:
//! the result must not depend on whether the kernel copied or the copy went through memory,
//! clusters of zeroes must still be left out of a rebase onto nothing, and a copy failed
//! part-way must leave every image reading as before.

use std::path::{Path, PathBuf};

use snapshot::offline::{commit, rebase};
use storage::fault::{self, Fault, FaultPlan, Op};
use storage::qcow2::{create, CreateOptions};
use storage::{Allocation, BlockDevice, ImageFormat, OpenOptions};

const CLUSTER: u64 = 64 << 10;
/// Not a whole number of clusters: the last cluster is partial.
const SIZE: u64 = 40 * CLUSTER + 12 * 1024;

fn make(dir: &Path, name: &str, backing: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    create(
        &path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size: CLUSTER,
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .expect("create");
    path
}

fn open(path: &Path) -> std::sync::Arc<dyn BlockDevice> {
    storage::open(path, &OpenOptions::default()).expect("open")
}

fn fill(image: &dyn BlockDevice, from: u64, clusters: u64, seed: u8) {
    let len = (clusters * CLUSTER).min(SIZE - from * CLUSTER) as usize;
    let data: Vec<u8> = (0..len).map(|i| (i / 7) as u8 ^ seed).collect();
    image.write_at(&data, from * CLUSTER).expect("write");
}

fn read_all(path: &Path) -> Vec<u8> {
    let image = open(path);
    let mut out = vec![0u8; SIZE as usize];
    image.read_at(&mut out, 0).expect("read");
    out
}

/// What each cluster of `path`'s own layer holds (not its backing files').
fn own_clusters(path: &Path) -> Vec<Allocation> {
    let image = open(path);
    (0..SIZE.div_ceil(CLUSTER))
        .map(|c| {
            let at = c * CLUSTER;
            let status = image
                .block_status(at, CLUSTER.min(SIZE - at))
                .expect("status");
            match status.depth {
                0 => status.allocation,
                _ => Allocation::Unallocated,
            }
        })
        .collect()
}

/// base <- mid <- top, with data in each, a cluster of data that is all zeroes, one whose
/// first page is zeroes and the rest is not, a zero cluster hiding data, and data in the
/// partial last cluster.
fn chain(dir: &Path) -> PathBuf {
    let base = make(dir, "base.qcow2", None);
    let mid = make(dir, "mid.qcow2", Some("base.qcow2"));
    let top = make(dir, "top.qcow2", Some("mid.qcow2"));
    {
        let image = open(&base);
        fill(&*image, 0, 12, 0x10);
        image
            .write_at(&vec![0u8; CLUSTER as usize], 14 * CLUSTER)
            .expect("zero data");
        let mut late = vec![0u8; CLUSTER as usize];
        late[(CLUSTER - 1) as usize] = 0x99;
        late[5000] = 0x98;
        image.write_at(&late, 15 * CLUSTER).expect("late data");
        fill(&*image, 39, 2, 0x20);
        image.flush().expect("flush");
    }
    {
        let image = open(&mid);
        fill(&*image, 4, 6, 0x30);
        image
            .write_zeroes(8 * CLUSTER, 2 * CLUSTER)
            .expect("zeroes");
        fill(&*image, 20, 10, 0x40);
        image.flush().expect("flush");
    }
    {
        let image = open(&top);
        fill(&*image, 2, 3, 0x50);
        fill(&*image, 25, 1, 0x60);
        image.flush().expect("flush");
    }
    top
}

/// Every in-kernel copy made to look unsupported: the copies go through memory.
fn through_memory(dir: &Path) -> fault::FaultGuard {
    fault::inject(
        FaultPlan::fail_nth(1, Some(Op::Copy), Fault::Unsupported)
            .under(dir)
            .sticky(),
    )
}

#[test]
fn rebase_onto_nothing_is_the_same_through_the_kernel_or_memory() {
    let mut results = Vec::new();
    for memory in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = chain(dir.path());
        let before = read_all(&top);
        let guard = memory.then(|| through_memory(dir.path()));
        rebase(&top, None, None, false, &mut |_, _| {}).expect("rebase");
        if let Some(guard) = guard {
            assert!(guard.fired() > 0, "no copy went through memory");
        }
        assert!(open(&top).backing().is_none(), "still has a backing file");
        assert_eq!(read_all(&top), before, "contents changed (memory {memory})");
        let own = own_clusters(&top);
        // The cluster of zeroes is not copied; the one with data after its first page is.
        assert_eq!(
            own[14],
            Allocation::Unallocated,
            "a cluster of zeroes was copied"
        );
        assert_eq!(own[15], Allocation::Data, "late data was not copied");
        assert_eq!(
            own[40],
            Allocation::Data,
            "the partial last cluster was not copied"
        );
        results.push((before, own));
    }
    assert_eq!(results[0], results[1], "kernel and memory copies differ");
}

#[test]
fn rebase_onto_another_backing_file_copies_only_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path());
    let before = read_all(&top);
    rebase(
        &top,
        Some("base.qcow2"),
        Some(ImageFormat::Qcow2),
        false,
        &mut |_, _| {},
    )
    .expect("rebase");
    assert_eq!(read_all(&top), before);
    let own = own_clusters(&top);
    // Cluster 0 reads the same from base: not copied; cluster 20 came from mid: copied.
    assert_eq!(own[0], Allocation::Unallocated);
    assert_eq!(own[20], Allocation::Data);
}

#[test]
fn commit_is_the_same_through_the_kernel_or_memory() {
    let mut results = Vec::new();
    for memory in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = chain(dir.path());
        let before = read_all(&top);
        let guard = memory.then(|| through_memory(dir.path()));
        let base = dir.path().join("base.qcow2");
        let summary = commit(&top, Some(&base), false, &mut |_, _| {}).expect("commit");
        if let Some(guard) = guard {
            assert!(guard.fired() > 0, "no copy went through memory");
        }
        assert_eq!(read_all(&base), before, "base differs (memory {memory})");
        results.push((read_all(&base), own_clusters(&base), summary.copied));
    }
    assert_eq!(results[0], results[1], "kernel and memory copies differ");
}

#[test]
fn a_commit_or_rebase_failed_mid_copy_leaves_the_chain_reading_the_same() {
    for error in [Fault::Eio, Fault::Enospc] {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = chain(dir.path());
        let before = read_all(&top);
        let base = dir.path().join("base.qcow2");
        let guard = fault::inject(FaultPlan::fail_nth(2, Some(Op::Copy), error).under(dir.path()));
        let result = commit(&top, Some(&base), false, &mut |_, _| {});
        assert_eq!(guard.fired(), 1, "commit: no copy failed ({error:?})");
        drop(guard);
        assert!(result.is_err(), "commit reported success ({error:?})");
        assert_eq!(
            read_all(&top),
            before,
            "commit ({error:?}) changed the chain's contents"
        );

        let guard = fault::inject(FaultPlan::fail_nth(2, Some(Op::Copy), error).under(dir.path()));
        let result = rebase(&top, None, None, false, &mut |_, _| {});
        assert_eq!(guard.fired(), 1, "rebase: no copy failed ({error:?})");
        drop(guard);
        assert!(result.is_err(), "rebase reported success ({error:?})");
        assert!(
            open(&top).backing().is_some(),
            "a failed rebase dropped the backing file"
        );
        assert_eq!(
            read_all(&top),
            before,
            "rebase ({error:?}) changed the chain's contents"
        );
    }
}
