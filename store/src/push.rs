//! Pushing a local snapshot into a store: memory and disk data cut into chunks, zero
//! chunks skipped, chunks the store already holds not uploaded again, then the manifest.
//!
//! The manifest is written last: a snapshot is in the store once its manifest is, and a
//! push that fails before leaves only chunks (which `gc` reclaims if nothing uses them).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use crate::chunk::{is_zero, ChunkHash, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::client::{Store, PARALLEL_REQUESTS};
use crate::error::{Error, Result};
use crate::location::check_snapshot_name;
use crate::manifest::{
    manifest_key, Blob, ChunkList, DiskData, MemoryImage, StoreManifest, MANIFEST_VERSION,
};
use crate::origin::{open_with_origin, RemoteBase};
use crate::source::{range_is_hole, FlatMemory, SnapshotSource};
use storage::{Allocation, BlockDevice};

/// How to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Replace a snapshot of the same name already in the store.
    pub replace: bool,
    /// The name in the store [default: the snapshot's own].
    pub store_name: Option<String>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            replace: false,
            store_name: None,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushSummary {
    /// The snapshot's name in the store.
    pub name: String,
    /// Its manifest's key (bucket-relative).
    pub manifest: String,
    /// Bytes of memory and disk read.
    pub bytes_scanned: u64,
    /// Bytes of chunk data uploaded.
    pub bytes_uploaded: u64,
    /// Non-zero chunks the snapshot references.
    pub chunks: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Chunk references that needed no upload (already in the store, or earlier in this
    /// push).
    pub chunks_reused: u64,
    /// Chunks of zeroes (not stored).
    pub zero_chunks: u64,
}

/// Progress of a push: bytes scanned of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

struct Uploader<'a> {
    store: &'a Store,
    seen: HashSet<ChunkHash>,
    pending: Vec<(ChunkHash, Bytes)>,
    summary: PushSummary,
}

impl Uploader<'_> {
    /// Names a chunk of data and queues it for upload; `None` for zeroes.
    fn add(&mut self, bytes: &[u8]) -> Result<Option<ChunkHash>> {
        self.summary.bytes_scanned += bytes.len() as u64;
        if is_zero(bytes) {
            self.summary.zero_chunks += 1;
            return Ok(None);
        }
        let hash = ChunkHash::of(bytes);
        self.summary.chunks += 1;
        if !self.seen.insert(hash.clone()) {
            self.summary.chunks_reused += 1;
            return Ok(Some(hash));
        }
        self.pending
            .push((hash.clone(), Bytes::copy_from_slice(bytes)));
        if self.pending.len() >= PARALLEL_REQUESTS * 2 {
            self.flush()?;
        }
        Ok(Some(hash))
    }

    /// A chunk known to be in the store already, referenced without being read.
    fn reuse(&mut self, len: u64) {
        self.summary.bytes_scanned += len;
        self.summary.chunks += 1;
        self.summary.chunks_reused += 1;
    }

    fn zero(&mut self, len: u64) {
        self.summary.bytes_scanned += len;
        self.summary.zero_chunks += 1;
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let uploaded = self.store.put_missing_chunks(&self.pending)?;
        for ((_, bytes), up) in self.pending.iter().zip(uploaded) {
            if up {
                self.summary.chunks_uploaded += 1;
                self.summary.bytes_uploaded += bytes.len() as u64;
            } else {
                self.summary.chunks_reused += 1;
            }
        }
        self.pending.clear();
        Ok(())
    }
}

/// The stored chunk that `offset..offset + len` of a lazily restored disk's frozen chain
/// still reads from, when nothing above its remote layer changed that range, the remote
/// layer is in the store pushed to, chunks line up and the store still holds the chunk (a
/// gc after a `rm` may have taken it): then the push references it without fetching it.
fn unchanged_remote_chunk(
    disk: &dyn BlockDevice,
    base: &Option<RemoteBase>,
    store: &Store,
    offset: u64,
    len: u64,
    chunk_size: u64,
) -> Result<Option<ChunkHash>> {
    let Some(base) = base else { return Ok(None) };
    if !base.same_store || base.chunk_size != chunk_size || offset % chunk_size != 0 {
        return Ok(None);
    }
    let mut done = 0;
    while done < len {
        let status = disk.block_status(offset + done, len - done)?;
        if status.allocation != Allocation::Data || status.depth != base.depth {
            return Ok(None);
        }
        done += status.len.max(1);
    }
    let Some(hash) = base
        .data
        .chunks
        .get((offset / chunk_size) as usize)
        .cloned()
        .flatten()
    else {
        return Ok(None);
    };
    Ok(store.exists(&hash.key())?.then_some(hash))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Pushes `source` into `store`; `progress` is told the bytes scanned so far and the total.
pub fn push(
    store: &Arc<Store>,
    source: &SnapshotSource,
    options: &PushOptions,
    progress: Progress<'_>,
) -> Result<PushSummary> {
    let name = options.store_name.as_deref().unwrap_or(&source.name);
    check_snapshot_name(name)?;
    let size = options.chunk_size;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) || !size.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "chunk size {size}: a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )));
    }
    let key = manifest_key(name);
    if !options.replace && store.exists(&key)? {
        return Err(Error::InvalidArgument(format!(
            "{}: snapshot '{name}' is already in the store (replace it explicitly)",
            store.location()
        )));
    }
    let memory = source
        .checkpoint
        .as_deref()
        .map(FlatMemory::open)
        .transpose()?;
    let disks = source
        .disks
        .iter()
        .map(|(disk, path)| {
            let (image, base) = open_with_origin(path, store)?;
            Ok((disk.clone(), image, base))
        })
        .collect::<Result<Vec<_>>>()?;
    let total = memory.as_ref().map_or(0, |m| m.layout().total_bytes())
        + disks.iter().map(|(_, d, _)| d.size()).sum::<u64>();

    let mut up = Uploader {
        store,
        seen: HashSet::new(),
        pending: Vec::new(),
        summary: PushSummary {
            name: name.to_string(),
            manifest: store.location().key(&key),
            ..Default::default()
        },
    };
    let mut buf = vec![0u8; size as usize];
    let mut state = None;
    let mut memory_image = None;
    if let Some(memory) = &memory {
        let state_bytes = memory.state_bytes()?;
        let hash = ChunkHash::of(&state_bytes);
        store.put_missing_chunks(&[(hash.clone(), Bytes::from(state_bytes.clone()))])?;
        state = Some(Blob {
            hash,
            len: state_bytes.len() as u64,
        });
        let len = memory.layout().total_bytes();
        let mut chunks = ChunkList::new();
        let mut offset = 0;
        while offset < len {
            let n = size.min(len - offset) as usize;
            memory.read(&mut buf[..n], offset)?;
            chunks.push(up.add(&buf[..n])?);
            offset += n as u64;
            progress(up.summary.bytes_scanned, total);
        }
        memory_image = Some(MemoryImage {
            layout: memory.layout().clone(),
            chunks,
        });
    }
    let mut disk_data = Vec::new();
    for (disk_name, disk, base) in &disks {
        let len = disk.size();
        let mut chunks = ChunkList::new();
        let mut offset = 0;
        while offset < len {
            let n = size.min(len - offset);
            if range_is_hole(disk.as_ref(), offset, n)? {
                up.zero(n);
                chunks.push(None);
            } else if let Some(hash) =
                unchanged_remote_chunk(disk.as_ref(), base, store, offset, n, size)?
            {
                up.reuse(n);
                chunks.push(Some(hash));
            } else {
                disk.read_at(&mut buf[..n as usize], offset)?;
                chunks.push(up.add(&buf[..n as usize])?);
            }
            offset += n;
            progress(up.summary.bytes_scanned, total);
        }
        disk_data.push(DiskData {
            name: disk_name.clone(),
            virtual_size: len,
            format: "raw".into(),
            source_format: disk
                .info()
                .format
                .map(|f| f.name().to_string())
                .unwrap_or_else(|| "raw".into()),
            chunks,
        });
    }
    up.flush()?;
    let manifest = StoreManifest {
        version: MANIFEST_VERSION,
        name: name.to_string(),
        pushed_unix: now_unix(),
        chunk_size: size,
        state,
        memory: memory_image,
        disks: disk_data,
    };
    manifest
        .validate()
        .map_err(|reason| Error::manifest(&key, reason))?;
    store.put(&key, Bytes::from(manifest.encode()))?;
    Ok(up.summary)
}
