//! An open qcow2 layer: the read, write, zero, discard and flush paths.
//!
//! Concurrency model:
//! - The active L1 table is an array of atomics; L2 slices live in a sharded cache whose
//!   entries are atomics too. A read or an in-place write takes only a per-cluster stripe lock
//!   (shared) and a shard lock for the cache lookup: no global lock on a cache hit.
//! - Anything that changes a guest cluster's mapping (allocation, copy-on-write, zeroing,
//!   discard) holds that cluster's stripe lock exclusively, so overlapping writes to one
//!   cluster are ordered and a reader never follows a mapping being replaced.
//! - The refcounts, the allocator and the list of deferred frees sit under one metadata
//!   mutex, taken only to allocate, to free and to write metadata back.
//!
//! Crash safety (DESIGN.md §3): metadata reaches the disk only in `writeback`, in the order
//! refcount blocks → fsync → L2 slices → fsync → L1 → fsync. A cluster whose last reference
//! was dropped is freed only after that, so a crash can leak clusters but never leaves a
//! referenced cluster with refcount 0.
//!
//! The layer's code is split by what it does: [`open`] loads and validates an image,
//! `mapping` finds and changes what a guest cluster maps to (L1/L2 tables, allocation),
//! `io` moves guest data, `writeback` makes metadata durable, and `copied` keeps the COPIED
//! flags in line with the refcounts.

mod copied;
mod cow_batch;
mod io;
mod mapping;
mod open;
mod writeback;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::cache::L2Cache;
use super::header::{self, Header};
use super::overlap::MetadataMap;
use super::refcount::Refcounts;
use super::snapshot::SnapshotEntry;
use crate::device::{BlockDevice, ImageInfo};
use crate::error::{Error, Result};
use crate::file::ImageFile;

/// Stripe locks serialising mapping changes per guest cluster; a power of two.
const STRIPES: usize = 1024;
/// Most clusters one batched read covers: bounds the stripe locks held at once.
const MAX_BATCH_CLUSTERS: u64 = 32;
/// Bytes per L2 cache slice (QEMU's default `l2-cache-entry-size`).
const L2_SLICE_BYTES: u64 = 4096;
/// Guest bytes the default L2 cache covers.
const DEFAULT_L2_COVERAGE: u64 = 8 << 30;
/// Default refcount cache size.
const DEFAULT_REFCOUNT_CACHE: usize = 1 << 20;

/// State changed only under the metadata lock.
pub(super) struct Meta {
    pub(super) header: Header,
    pub(super) refcounts: Refcounts,
    /// Host extents whose reference was dropped by a mapping change not yet durable.
    pub(super) pending_frees: Vec<(u64, u64)>,
    /// 512-byte sectors of the L1 table holding changed entries.
    pub(super) l1_dirty: BTreeSet<u64>,
}

/// One open qcow2 layer with its backing chain below it.
pub struct Qcow2Image {
    pub(super) file: ImageFile,
    pub(super) path: PathBuf,
    /// Writes refused; set for good once a layer becomes a backing file.
    pub(super) read_only: AtomicBool,
    pub(super) version: u32,
    pub(super) cluster_bits: u32,
    pub(super) cluster_size: u64,
    pub(super) size: u64,
    pub(super) l2_entries: u64,
    pub(super) slice_entries: u64,
    pub(super) compression: header::CompressionType,
    /// Static header facts for `info`.
    pub(super) info: ImageInfo,
    pub(super) l1: Box<[AtomicU64]>,
    pub(super) l1_offset: u64,
    pub(super) l2_cache: L2Cache,
    pub(super) l2_capacity: usize,
    pub(super) meta: Mutex<Meta>,
    pub(super) stripes: Box<[RwLock<()>]>,
    /// The layer below; replaced when a stream or commit rewrites the backing pointer.
    pub(super) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// Slices dirtied since the last writeback; a writeback runs when it exceeds the cache.
    pub(super) dirtied: AtomicUsize,
    /// Data may have been written since the last sync.
    pub(super) unsynced: AtomicBool,
    /// Where concurrent copy-on-writes of neighbouring clusters meet to share their I/O.
    pub(in crate::qcow2::image) cow_batcher: cow_batch::CowBatcher,
    /// The internal snapshot table.
    pub(super) snapshots: Vec<SnapshotEntry>,
    /// Host clusters holding metadata (shared with the refcount state, which keeps it
    /// current); data writes never land on one.
    pub(super) metadata: Arc<MetadataMap>,
    /// Bytes the snapshot table occupies on disk.
    pub(super) snapshot_table_bytes: u64,
    /// The format was guessed from the first bytes, not given.
    pub(super) format_probed: bool,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Index of the bottom layer of the chain, counting this one as 0.
    fn bottom_depth(&self) -> u32 {
        let mut depth = 0;
        let mut layer = self.backing();
        while let Some(l) = layer {
            depth += 1;
            layer = l.backing();
        }
        depth
    }

    /// Records that the image was opened without an explicit format (see
    /// [`BlockDevice::format_probed`]).
    pub(crate) fn set_format_probed(&mut self) {
        self.format_probed = true;
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    /// Replaces the in-memory backing device without touching the file (after the header
    /// already names it, e.g. when reopening a chain read-only).
    pub fn replace_backing_device(&self, device: Option<Arc<dyn BlockDevice>>) {
        *self.backing.write() = device;
    }

    /// The underlying file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta.lock().header.clone()
    }

    pub(super) fn stripe(&self, guest_cluster: u64) -> &RwLock<()> {
        &self.stripes[guest_cluster as usize & (STRIPES - 1)]
    }

    pub(super) fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::invalid(&self.path, reason)
    }

    pub(super) fn writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(path = %self.path.display(), error = %e, "flush on close failed");
        }
    }
}
