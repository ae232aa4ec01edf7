//! Pulling a snapshot out of the store for offline use: a checkpoint directory (state and
//! a full memory file) and one qcow2 image per disk, which `snapvmm restore DIR/checkpoint`
//! starts like any local checkpoint.

use std::path::{Path, PathBuf};

use serde::Serialize;
use snapshot::checkpoint::{memory_path, state_file, state_path, MemoryFile};
use storage::qcow2::create::{create, CreateOptions};

use crate::catalog::read_manifest;
use crate::client::Store;
use crate::error::{Error, Result};
use crate::manifest::StoreManifest;
use crate::remote::RemoteChunks;

/// What a pull wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PullSummary {
    /// The checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// The disk images, in device order.
    pub disks: Vec<PathBuf>,
    /// Bytes fetched from the store (chunks the cache did not hold).
    pub bytes_fetched: u64,
}

/// Rewrites the machine state's disk paths (`disks[i].disk.top`) to `tops`.
pub fn set_disk_tops(machine: &mut serde_json::Value, tops: &[PathBuf]) -> Result<()> {
    let disks = machine
        .get_mut("disks")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or_else(|| Error::manifest("state", "machine state without a disks list"))?;
    if disks.len() != tops.len() {
        return Err(Error::manifest(
            "state",
            format!(
                "{} disks in the machine state, {} in the manifest",
                disks.len(),
                tops.len()
            ),
        ));
    }
    for (disk, top) in disks.iter_mut().zip(tops) {
        let slot = disk
            .get_mut("disk")
            .and_then(|d| d.get_mut("top"))
            .ok_or_else(|| Error::manifest("state", "disk state without its top image"))?;
        *slot = serde_json::Value::String(top.display().to_string());
    }
    Ok(())
}

/// Fetches the state blob of `manifest` and decodes it as a checkpoint manifest.
pub fn fetch_state(
    chunks: &RemoteChunks,
    manifest: &StoreManifest,
) -> Result<snapshot::checkpoint::Manifest> {
    let blob = manifest.state.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!("snapshot '{}' holds no memory", manifest.name))
    })?;
    let bytes = chunks.get(&blob.hash)?;
    let name = format!("{}/{} (state)", chunks.store().location(), manifest.name);
    Ok(state_file::decode(&bytes, Path::new(&name))?)
}

/// Writes chunked data through `write` (non-zero chunks only).
fn copy_chunks(
    chunks: &RemoteChunks,
    list: &crate::manifest::ChunkList,
    chunk_size: u64,
    total: u64,
    write: &mut dyn FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    for (index, hash) in list.iter().enumerate() {
        let Some(hash) = hash else { continue };
        let bytes = chunks.get(hash)?;
        let offset = index as u64 * chunk_size;
        let want = chunk_size.min(total - offset) as usize;
        if bytes.len() != want {
            return Err(Error::manifest(
                hash.as_str(),
                format!("chunk of {} bytes, {want} expected", bytes.len()),
            ));
        }
        write(&bytes, offset)?;
    }
    Ok(())
}

/// Pulls snapshot `name` into `out` (created; must not hold a previous pull), reading
/// through the chunk cache in `cache_dir`.
pub fn pull(
    store: std::sync::Arc<Store>,
    name: &str,
    out: &Path,
    cache_dir: &Path,
) -> Result<PullSummary> {
    let manifest = read_manifest(&store, name)?;
    let chunks = RemoteChunks::new(store, cache_dir)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, "create directory", e))?;
    let mut disks = Vec::new();
    for disk in &manifest.disks {
        let path = out.join(format!("{}.qcow2", disk.name));
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} exists: pull into an empty directory",
                path.display()
            )));
        }
        create(
            &path,
            &CreateOptions {
                size: Some(disk.virtual_size),
                ..Default::default()
            },
        )?;
        let image = storage::open(&path, &storage::OpenOptions::default())?;
        copy_chunks(
            &chunks,
            &disk.chunks,
            manifest.chunk_size,
            disk.virtual_size,
            &mut |b, o| Ok(image.write_at(b, o)?),
        )?;
        image.flush()?;
        disks.push(
            path.canonicalize()
                .map_err(|e| Error::io(&path, "resolve", e))?,
        );
    }
    let mut checkpoint = None;
    if let Some(memory) = &manifest.memory {
        let dir = out.join("checkpoint");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
        let mut state = fetch_state(&chunks, &manifest)?;
        set_disk_tops(&mut state.machine, &disks)?;
        let total = memory.layout.total_bytes();
        if state.memory != memory.layout {
            return Err(Error::manifest(
                name,
                "the state's memory layout differs from the manifest's",
            ));
        }
        let file = MemoryFile::create(&memory_path(&dir), state.id, total)?;
        copy_chunks(
            &chunks,
            &memory.chunks,
            manifest.chunk_size,
            total,
            &mut |b, o| Ok(file.write_at(b, o)?),
        )?;
        file.sync()?;
        // The state file last: it is the checkpoint's commit point.
        state_file::write(&state_path(&dir), &state)?;
        checkpoint = Some(dir);
    }
    Ok(PullSummary {
        checkpoint,
        disks,
        bytes_fetched: chunks.fetched_bytes(),
    })
}
