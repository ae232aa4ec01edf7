//! Push, pull, lazy reads, listing and garbage collection against `object_store`'s
//! in-memory backend (a real implementation of the same trait the S3 client uses; the
//! whole-system tests in `tests/store.rs` run the same paths against SeaweedFS).

use std::path::Path;
use std::sync::Arc;

use object_store::memory::InMemory;
use snapshot::checkpoint::{
    memory_path, state_file, state_path, Manifest, MemoryFile, MemoryLayout, MemoryRegion,
    PAGE_SIZE,
};
use storage::qcow2::create::{create, CreateOptions};
use storage::BlockDevice;

use crate::catalog::{gc, list, read_manifest, remove};
use crate::chunk::DEFAULT_CHUNK_SIZE;
use crate::client::Store;
use crate::lazy::prepare;
use crate::location::Location;
use crate::push::{push, PushOptions};
use crate::source::SnapshotSource;

const MEMORY: u64 = 4 << 20;
const DISK: u64 = 3 << 20;

fn store() -> Arc<Store> {
    let location = Location::parse("s3://test/fleet").unwrap();
    Arc::new(Store::with_object_store(location, Arc::new(InMemory::new())).unwrap())
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A checkpoint (one region, pages 3 and 300 written) and a qcow2 disk with data in its
/// first and third MiB.
fn make_snapshot(dir: &Path, seed: u8) -> SnapshotSource {
    let disk = dir.join("vda.qcow2");
    create(
        &disk,
        &CreateOptions {
            size: Some(DISK),
            ..Default::default()
        },
    )
    .unwrap();
    let image = storage::open(&disk, &storage::OpenOptions::default()).unwrap();
    image.write_at(&fill(seed, 4096), 0).unwrap();
    image.write_at(&fill(seed ^ 0x55, 8192), 2 << 20).unwrap();
    image.flush().unwrap();
    drop(image);

    let checkpoint = dir.join("ckpt");
    std::fs::create_dir_all(&checkpoint).unwrap();
    let layout = MemoryLayout::new(vec![MemoryRegion {
        guest_addr: 0,
        size: MEMORY,
    }]);
    let machine = serde_json::json!({"disks": [{"disk": {"top": disk, "name": "vda"}}]});
    let manifest = Manifest::new_full(layout, machine);
    let file = MemoryFile::create(&memory_path(&checkpoint), manifest.id, MEMORY).unwrap();
    file.write_at(&fill(seed, 4096), 3 * PAGE_SIZE).unwrap();
    file.write_at(&fill(7, 4096), 300 * PAGE_SIZE).unwrap();
    state_file::write(&state_path(&checkpoint), &manifest).unwrap();
    SnapshotSource {
        name: format!("s{seed}"),
        checkpoint: Some(checkpoint),
        disks: vec![("vda".into(), disk)],
    }
}

#[test]
fn push_skips_zeroes_and_dedups_and_pull_gives_the_same_data() {
    let store = store();
    let dir = tempfile::tempdir().unwrap();
    let source = make_snapshot(dir.path(), 1);
    let first = push(&store, &source, &PushOptions::default(), &mut |_, _| {}).unwrap();
    // Memory: 8 chunks, 2 with data; disk: 6 chunks, 2 with data; plus the state blob
    // (not counted in the chunk summary).
    assert_eq!(first.chunks, 4, "{first:?}");
    assert_eq!(first.chunks_uploaded, 4, "{first:?}");
    assert_eq!(first.zero_chunks, 10, "{first:?}");
    assert_eq!(first.bytes_scanned, MEMORY + DISK);
    assert_eq!(first.bytes_uploaded, 4 * DEFAULT_CHUNK_SIZE);

    // The same snapshot under another name uploads nothing.
    let options = PushOptions {
        store_name: Some("again".into()),
        ..Default::default()
    };
    let again = push(&store, &source, &options, &mut |_, _| {}).unwrap();
    assert_eq!(
        (again.chunks_uploaded, again.chunks_reused),
        (0, 4),
        "{again:?}"
    );
    // Pushing over an existing name needs `replace`.
    let err = push(&store, &source, &options, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("already in the store"), "{err}");

    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let pulled =
        crate::pull::pull(store.clone(), "s1", &out.path().join("p"), cache.path()).unwrap();
    let disk = storage::open(&pulled.disks[0], &storage::OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 8192];
    disk.read_at(&mut buf, 2 << 20).unwrap();
    assert_eq!(buf, fill(0x54, 8192));
    let ckpt = pulled.checkpoint.unwrap();
    let manifest = state_file::read(&state_path(&ckpt)).unwrap();
    assert_eq!(
        manifest.machine["disks"][0]["disk"]["top"],
        serde_json::json!(pulled.disks[0].display().to_string())
    );
    let memory = MemoryFile::open(&memory_path(&ckpt), manifest.id, MEMORY).unwrap();
    let mut page = vec![0u8; 4096];
    memory.read_at(&mut page, 300 * PAGE_SIZE).unwrap();
    assert_eq!(page, fill(7, 4096));
    memory.read_at(&mut page, 100 * PAGE_SIZE).unwrap();
    assert!(page.iter().all(|&b| b == 0));
}

#[test]
fn lazy_disks_read_through_a_local_overlay_and_corruption_is_an_io_error() {
    let store = store();
    let dir = tempfile::tempdir().unwrap();
    let source = make_snapshot(dir.path(), 2);
    push(&store, &source, &PushOptions::default(), &mut |_, _| {}).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let lazy = prepare(store.clone(), "s2", cache.path()).unwrap();
    let overlay = &lazy.overlays[0];
    let mut buf = vec![0u8; 4096];
    overlay.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, fill(2, 4096));
    // Writes land in the overlay; the remote layer and the store are untouched.
    overlay.write_at(&[9u8; 512], 512).unwrap();
    overlay.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[512..1024], &[9u8; 512]);
    assert_eq!(&buf[..512], &fill(2, 4096)[..512]);
    lazy.remote_disks[0].read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, fill(2, 4096));
    assert_eq!(lazy.remote_disks[0].touched(), vec![0]);
    // One chunk fetched for the disk and one for the state.
    assert_eq!(lazy.chunks.fetched_chunks(), 2);

    // Memory chunk 0 holds page 3.
    let mut chunk = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
    lazy.memory.read_chunk(0, &mut chunk).unwrap();
    assert_eq!(&chunk[3 * 4096..4 * 4096], &fill(2, 4096)[..]);
    assert!(lazy.memory.is_zero_chunk(1));

    // Corrupt the chunk at the disk's third MiB in the store: a fresh cache's read fails
    // with an error naming the chunk, and nothing panics.
    let manifest = read_manifest(&store, "s2").unwrap();
    let hash = manifest.disks[0].chunks[4].clone().unwrap();
    store
        .put(
            &hash.key(),
            bytes::Bytes::from(vec![1u8; DEFAULT_CHUNK_SIZE as usize]),
        )
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let lazy = prepare(store.clone(), "s2", cache.path()).unwrap();
    let err = lazy.overlays[0].read_at(&mut buf, 2 << 20).unwrap_err();
    assert!(err.to_string().contains(hash.as_str()), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn list_remove_and_gc_keep_what_manifests_reference() {
    let store = store();
    let dir = tempfile::tempdir().unwrap();
    let a = make_snapshot(&dir.path().join("a").tap_mkdir(), 3);
    let b = make_snapshot(&dir.path().join("b").tap_mkdir(), 4);
    push(&store, &a, &PushOptions::default(), &mut |_, _| {}).unwrap();
    push(&store, &b, &PushOptions::default(), &mut |_, _| {}).unwrap();
    crate::catalog::write_working_set(&store, "s3", vec![0], vec![vec![0]]).unwrap();
    let names: Vec<_> = list(&store)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.working_set))
        .collect();
    assert_eq!(
        names,
        vec![("s3".to_string(), true), ("s4".to_string(), false)]
    );

    remove(&store, "s3").unwrap();
    assert!(remove(&store, "s3").is_err());
    let young = gc(&store, 3600).unwrap();
    assert_eq!(young.deleted, 0);
    assert!(young.kept_young > 0, "{young:?}");
    let summary = gc(&store, 0).unwrap();
    // s3's own chunks (its first memory chunk, its state, its two disk chunks) go; the
    // chunk both share (page 300's) stays.
    assert_eq!(summary.deleted, 4, "{summary:?}");
    assert_eq!(summary.manifests, 1);
    let cache = tempfile::tempdir().unwrap();
    crate::pull::pull(store.clone(), "s4", &dir.path().join("out"), cache.path()).unwrap();
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
