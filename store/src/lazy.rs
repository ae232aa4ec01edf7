//! Preparing a lazy restore: the snapshot's state file in a local checkpoint directory,
//! each disk as a local qcow2 overlay over a [`RemoteDisk`], and its memory as a
//! [`RemoteMemory`] for a userfaultfd pager. Nothing of the data is fetched here (but the
//! working set, when asked to prefetch it).
//!
//! Layout under the cache directory: `chunks/` (shared by every restore and clone that
//! uses the directory) and `runs/NAME.N/` per restore: `checkpoint/state`, `DISK.qcow2`
//! (the overlay the guest writes) and `DISK.origin.json` (where its data below comes from).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::checkpoint::{state_file, state_path};
use storage::qcow2::create::{create, CreateOptions};
use storage::qcow2::Qcow2Image;
use storage::BlockDevice;

use crate::catalog::{read_manifest, read_working_set};
use crate::chunk::ChunkHash;
use crate::client::Store;
use crate::error::{Error, Result};
use crate::manifest::{StoreManifest, WorkingSet};
use crate::origin::Origin;
use crate::pull::{fetch_state, set_disk_tops};
use crate::remote::{RemoteChunks, RemoteDisk, RemoteMemory};

/// Most runs kept side by side under one cache for one snapshot name.
const MAX_RUNS: u32 = 100_000;

/// A snapshot ready to be started lazily.
pub struct LazyRestore {
    /// The snapshot's manifest.
    pub manifest: StoreManifest,
    /// Its chunks, through the local cache.
    pub chunks: Arc<RemoteChunks>,
    /// This restore's directory (`CACHE/runs/NAME.N`).
    pub run_dir: PathBuf,
    /// The checkpoint directory holding the state file (no memory file: memory comes from
    /// [`LazyRestore::memory`]).
    pub checkpoint: PathBuf,
    /// The remote layer of each disk.
    pub remote_disks: Vec<Arc<RemoteDisk>>,
    /// Each disk's top: a local qcow2 overlay over its remote layer.
    pub overlays: Vec<Arc<dyn BlockDevice>>,
    /// Guest memory.
    pub memory: Arc<RemoteMemory>,
    /// The working set a previous restore recorded, if any.
    pub working_set: Option<WorkingSet>,
}

fn new_run_dir(cache: &Path, name: &str) -> Result<PathBuf> {
    let runs = cache.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, "create directory", e))?;
    for n in 0..MAX_RUNS {
        let dir = runs.join(format!("{name}.{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&dir, "create directory", e)),
        }
    }
    Err(Error::InvalidArgument(format!(
        "{}: too many runs of '{name}'",
        runs.display()
    )))
}

/// Prepares snapshot `name` of `store` for a lazy start, with its chunk cache and run
/// directory under `cache_dir`.
pub fn prepare(store: Arc<Store>, name: &str, cache_dir: &Path) -> Result<LazyRestore> {
    let manifest = read_manifest(&store, name)?;
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, "create directory", e))?;
    // Absolute: the origin files name it for readers in other directories.
    let cache = std::fs::canonicalize(cache_dir).map_err(|e| Error::io(cache_dir, "resolve", e))?;
    let working_set = read_working_set(&store, &manifest)?;
    let chunks = Arc::new(RemoteChunks::new(store, cache_dir)?);
    let memory = Arc::new(RemoteMemory::new(chunks.clone(), &manifest)?);
    let run_dir = new_run_dir(cache_dir, name)?;
    let mut remote_disks = Vec::new();
    let mut overlays = Vec::new();
    let mut tops = Vec::new();
    for (index, disk) in manifest.disks.iter().enumerate() {
        let remote = Arc::new(RemoteDisk::new(chunks.clone(), &manifest, index)?);
        let path = run_dir.join(format!("{}.qcow2", disk.name));
        // No backing name in the header (nothing local could open it); the remote layer
        // is attached in memory, and the origin file says where it comes from.
        create(
            &path,
            &CreateOptions {
                size: Some(disk.virtual_size),
                ..Default::default()
            },
        )?;
        Origin {
            store: chunks.store().location().to_string(),
            snapshot: manifest.name.clone(),
            disk: disk.name.clone(),
            cache: cache.clone(),
        }
        .write(&path)?;
        let overlay = Qcow2Image::open(&path, &storage::OpenOptions::default())?;
        overlay.replace_backing_device(Some(remote.clone() as Arc<dyn BlockDevice>));
        overlays.push(Arc::new(overlay) as Arc<dyn BlockDevice>);
        remote_disks.push(remote);
        tops.push(path);
    }
    let checkpoint = run_dir.join("checkpoint");
    std::fs::create_dir_all(&checkpoint)
        .map_err(|e| Error::io(&checkpoint, "create directory", e))?;
    let mut state = fetch_state(&chunks, &manifest)?;
    set_disk_tops(&mut state.machine, &tops)?;
    state_file::write(&state_path(&checkpoint), &state)?;
    Ok(LazyRestore {
        manifest,
        chunks,
        run_dir,
        checkpoint,
        remote_disks,
        overlays,
        memory,
        working_set,
    })
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore")
            .field("name", &self.manifest.name)
            .field("run_dir", &self.run_dir)
            .finish_non_exhaustive()
    }
}

impl LazyRestore {
    /// Fetches the recorded working set's chunks into the cache, in parallel; returns how
    /// many were fetched (0 without a working set).
    pub fn prefetch(&self) -> Result<u64> {
        let (mut hashes, disks) = self.working_set_hashes();
        hashes.extend(disks);
        self.chunks.prefetch(&hashes)
    }

    /// The stored chunks of the recorded working set: memory's, then the disks' (empty
    /// without a working set). A restore fetches memory's before the VM starts (the pager
    /// installs them ahead of faults) and the disks' beside the starting guest.
    pub fn working_set_hashes(&self) -> (Vec<ChunkHash>, Vec<ChunkHash>) {
        let Some(set) = &self.working_set else {
            return (Vec::new(), Vec::new());
        };
        let memory = set
            .memory
            .iter()
            .filter_map(|&i| self.memory.chunk_hash(i).cloned())
            .collect();
        let mut disks = Vec::new();
        for (disk, indices) in self.manifest.disks.iter().zip(&set.disks) {
            disks.extend(
                indices
                    .iter()
                    .filter_map(|&i| disk.chunks.get(i as usize).cloned().flatten()),
            );
        }
        (memory, disks)
    }

    /// The chunks touched so far, as a working set (memory, then each disk).
    pub fn touched(&self) -> (Vec<u64>, Vec<Vec<u64>>) {
        (
            self.memory.touched(),
            self.remote_disks.iter().map(|d| d.touched()).collect(),
        )
    }
}
