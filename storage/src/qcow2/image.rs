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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::cache::{L2Cache, Slice};
use super::compress::decompress;
use super::entry::{decode_l1, decode_l2, Mapping, OFLAG_COPIED, OFLAG_ZERO};
use super::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::overlap::MetadataMap;
use super::refcount::Refcounts;
use super::snapshot::{parse_table, SnapshotEntry, MAX_TABLE_BYTES};
use crate::device::{check_range, Allocation, BlockDevice, BlockStatus, ImageInfo};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::open::OpenOptions;
use crate::ImageFormat;

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
    /// The internal snapshot table.
    pub(super) snapshots: Vec<SnapshotEntry>,
    /// Host clusters holding metadata (shared with the refcount state, which keeps it
    /// current); data writes never land on one.
    pub(super) metadata: Arc<MetadataMap>,
    /// Bytes the snapshot table occupies on disk.
    pub(super) snapshot_table_bytes: u64,
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

fn read_header(file: &ImageFile) -> Result<Header> {
    let first = header::read_first_cluster(file)?;
    Header::parse(file.path(), &first, file.len()?)
}

impl Qcow2Image {
    /// Opens one qcow2 layer; `open_backing` opens the backing file named in the header
    /// (called with the stored name and format) when `options.open_backing` is set.
    pub fn open_with(
        path: &Path,
        read_only: bool,
        options: &OpenOptions,
        open_backing: impl FnOnce(&str, Option<ImageFormat>) -> Result<Arc<dyn BlockDevice>>,
    ) -> Result<Self> {
        let probe = ImageFile::open(path, true, false)?;
        let mut hdr = read_header(&probe)?;
        drop(probe);
        let mut read_only = read_only;
        if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only {
            tracing::warn!(path = %path.display(), "image is marked corrupt: opening read-only");
            read_only = true;
        }
        let file = ImageFile::open(path, read_only, options.direct)?;
        let file_len = file.len()?;
        let was_dirty = !read_only && hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        if was_dirty {
            tracing::info!(path = %path.display(), "dirty bit set: rebuilding refcounts");
            super::check::rebuild_refcounts(&file, &mut hdr)?;
        }
        if !read_only && hdr.autoclear_features != 0 {
            // Auto-clear bits promise consistency of structures (persistent bitmaps) that
            // snapvmm does not maintain: clear them before the first write, as QEMU does.
            // Without the bit QEMU ignores the bitmaps extension, so drop it too and free the
            // clusters the bitmaps held (a leak check does exactly that) instead of leaving
            // them leaked.
            let had_bitmaps = hdr
                .other_extensions
                .iter()
                .any(|e| e.kind == header::EXT_BITMAPS);
            hdr.other_extensions
                .retain(|e| e.kind != header::EXT_BITMAPS);
            hdr.autoclear_features = 0;
            write_header(&file, &mut hdr)?;
            file.sync()?;
            if had_bitmaps {
                super::check::check(path, super::check::RepairMode::Leaks)?;
                hdr = read_header(&file)?;
            }
        }
        let cluster_size = hdr.cluster_size();
        // Load and validate the active L1 table.
        let mut raw = vec![0u8; hdr.l1_size as usize * 8];
        file.read_at(&mut raw, hdr.l1_table_offset)?;
        let mut l1 = Vec::with_capacity(hdr.l1_size as usize);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            let (offset, _) = decode_l1(e, cluster_size)
                .map_err(|err| Error::invalid(path, format!("L1 entry {i}: {}", err.0)))?;
            if offset != 0
                && offset
                    .checked_add(cluster_size)
                    .is_none_or(|end| end > file_len)
            {
                return Err(Error::invalid(
                    path,
                    format!("L1 entry {i}: L2 table at {offset:#x} lies past the end of the file"),
                ));
            }
            if offset != 0 && offset < cluster_size {
                return Err(Error::invalid(
                    path,
                    format!("L1 entry {i}: L2 table overlaps the header"),
                ));
            }
            l1.push(AtomicU64::new(e));
        }
        let refcount_cache = options
            .refcount_cache_bytes
            .unwrap_or(DEFAULT_REFCOUNT_CACHE);
        let refcounts = Refcounts::load(&file, &hdr, refcount_cache)?;
        let (snapshots, snapshot_table_bytes) = load_snapshots(&file, &hdr, file_len)?;
        let metadata = refcounts.metadata.clone();
        mark_metadata(
            &file,
            &hdr,
            &l1,
            &refcounts.table,
            &snapshots,
            snapshot_table_bytes,
            &metadata,
        )?;

        let backing = match (&hdr.backing_file, options.open_backing) {
            (Some(name), true) => {
                let fmt =
                    match hdr.backing_format.as_deref() {
                        None => None,
                        Some(f) => Some(f.parse::<ImageFormat>().map_err(|_| {
                            Error::unsupported(path, format!("backing format '{f}'"))
                        })?),
                    };
                Some(open_backing(name, fmt)?)
            }
            _ => None,
        };
        let slice_bytes = L2_SLICE_BYTES.min(cluster_size);
        let l2_bytes = options.l2_cache_bytes.unwrap_or_else(|| {
            // 8 bytes of L2 per cluster of data.
            (DEFAULT_L2_COVERAGE / cluster_size * 8) as usize
        });
        let l2_capacity = (l2_bytes as u64 / slice_bytes).max(16) as usize;
        let info = ImageInfo {
            format: Some(ImageFormat::Qcow2),
            filename: path.display().to_string(),
            virtual_size: hdr.size,
            cluster_size: Some(cluster_size),
            backing_filename: hdr.backing_file.clone(),
            backing_format: hdr.backing_format.clone(),
            compat: Some(if hdr.version >= 3 { "1.1" } else { "0.10" }.into()),
            lazy_refcounts: hdr.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: Some(hdr.refcount_bits()),
            corrupt: hdr.incompatible_features & INCOMPAT_CORRUPT != 0,
            compression_type: Some(
                match hdr.compression_type {
                    header::CompressionType::Zlib => "zlib",
                    header::CompressionType::Zstd => "zstd",
                }
                .into(),
            ),
            snapshot_count: hdr.nb_snapshots,
        };
        let mut image = Qcow2Image {
            path: path.to_path_buf(),
            read_only: AtomicBool::new(read_only),
            version: hdr.version,
            cluster_bits: hdr.cluster_bits,
            cluster_size,
            size: hdr.size,
            l2_entries: hdr.l2_entries(),
            slice_entries: slice_bytes / 8,
            compression: hdr.compression_type,
            info,
            l1: l1.into_boxed_slice(),
            l1_offset: hdr.l1_table_offset,
            l2_cache: L2Cache::new(l2_capacity),
            l2_capacity,
            meta: Mutex::new(Meta {
                header: hdr,
                refcounts,
                pending_frees: Vec::new(),
                l1_dirty: BTreeSet::new(),
            }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            backing: RwLock::new(backing),
            dirtied: AtomicUsize::new(0),
            unsynced: AtomicBool::new(false),
            snapshots,
            snapshot_table_bytes,
            metadata,
            file,
        };
        if was_dirty {
            // Rebuilt refcounts may disagree with COPIED flags written before the crash.
            image.fix_copied_flags()?;
        }
        Ok(image)
    }

    /// Opens a qcow2 image with its backing chain, as [`crate::open`] does.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        let read_only = options.read_only;
        let mut seen = std::collections::HashSet::new();
        if let Ok(c) = std::fs::canonicalize(path) {
            seen.insert(c);
        }
        Qcow2Image::open_with(path, read_only, options, |name, fmt| {
            let backing = crate::open::resolve_backing_path(path, name);
            crate::open::open_layer(&backing, fmt, options, true, 1, &mut seen)
        })
    }

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

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Flushes and then refuses every further write: the layer is becoming the backing file
    /// of a new overlay (a live external snapshot). Cannot be undone on this handle.
    pub fn make_read_only(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.close()?;
        self.read_only.store(true, Ordering::Release);
        Ok(())
    }

    /// Rewrites the backing file pointer in the header (name and backing-format extension;
    /// `None` makes the image standalone) and, when `device` is given, serves reads of
    /// unallocated clusters from it from now on. The caller guarantees the new backing
    /// chain reads the same data where this layer is unallocated (stream and commit do);
    /// metadata and data are flushed before the header changes, and the header is synced.
    pub fn set_backing(
        &self,
        name: Option<&str>,
        format: Option<ImageFormat>,
        device: Option<Arc<dyn BlockDevice>>,
    ) -> Result<()> {
        self.writable()?;
        self.writeback()?;
        {
            let mut meta = self.meta.lock();
            meta.header.backing_file = name.map(str::to_string);
            meta.header.backing_format = name.and(format).map(|f| f.name().to_string());
            write_header(&self.file, &mut meta.header)?;
            self.file.sync()?;
        }
        *self.backing.write() = device;
        Ok(())
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

    /// The L2 slice holding entry `index` of the table at `l2_offset`, and the entry's
    /// position inside it.
    pub(super) fn l2_slice(&self, l2_offset: u64, index: u64) -> Result<(Arc<Slice>, usize)> {
        let slice_no = index / self.slice_entries;
        let slice_offset = l2_offset + slice_no * self.slice_entries * 8;
        let slice = self.l2_cache.get_or_load(slice_offset, || {
            let mut raw = vec![0u8; (self.slice_entries * 8) as usize];
            self.file.read_at(&mut raw, slice_offset)?;
            Ok::<_, Error>(Slice::from_bytes(slice_offset, &raw))
        })?;
        Ok((slice, (index % self.slice_entries) as usize))
    }

    pub(super) fn l1_entry(&self, guest_cluster: u64) -> Result<(u64, bool)> {
        let index = guest_cluster / self.l2_entries;
        let entry = self
            .l1
            .get(index as usize)
            .ok_or_else(|| {
                self.invalid(format!("guest cluster {guest_cluster} beyond the L1 table"))
            })?
            .load(Ordering::Acquire);
        decode_l1(entry, self.cluster_size)
            .map_err(|e| self.invalid(format!("L1 entry {index}: {}", e.0)))
    }

    pub(super) fn decode(&self, entry: u64, guest_cluster: u64) -> Result<Mapping> {
        decode_l2(entry, self.cluster_bits, self.version).map_err(|e| {
            self.invalid(format!(
                "L2 entry for guest offset {:#x}: {}",
                guest_cluster << self.cluster_bits,
                e.0
            ))
        })
    }

    /// What guest cluster `guest_cluster` maps to in this layer.
    pub(super) fn lookup(&self, guest_cluster: u64) -> Result<Mapping> {
        let (l2_offset, _) = self.l1_entry(guest_cluster)?;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let (slice, index) = self.l2_slice(l2_offset, guest_cluster % self.l2_entries)?;
        self.decode(slice.get(index), guest_cluster)
    }

    /// Reads guest bytes that this layer does not hold: from the backing chain, zeroes past
    /// its end or without one.
    pub(super) fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let backing = self.backing.read();
        match &*backing {
            Some(b) if offset < b.size() => {
                let n = (b.size() - offset).min(buf.len() as u64) as usize;
                b.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub(super) fn read_compressed(
        &self,
        extent: super::entry::CompressedExtent,
    ) -> Result<Vec<u8>> {
        let file_len = self.file.len()?;
        if extent.offset >= file_len {
            return Err(self.invalid(format!(
                "compressed cluster at {:#x} lies past the end of the file",
                extent.offset
            )));
        }
        let len = extent.len.min(file_len - extent.offset) as usize;
        let mut packed = vec![0u8; len];
        self.file.read_at(&mut packed, extent.offset)?;
        let mut out = vec![0u8; self.cluster_size as usize];
        if !decompress(self.compression, &packed, &mut out) {
            return Err(self.invalid(format!(
                "compressed cluster at {:#x} does not decompress",
                extent.offset
            )));
        }
        Ok(out)
    }

    /// Reads part of one guest cluster.
    pub(super) fn read_in_cluster(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let guest_cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (self.cluster_size - 1);
        let _shared = self.stripe(guest_cluster).read();
        match self.lookup(guest_cluster)? {
            Mapping::Data { host, .. } => self.file.read_at(buf, host + in_cluster),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_below(buf, offset),
            Mapping::Compressed(extent) => {
                let data = self.read_compressed(extent)?;
                let start = in_cluster as usize;
                buf.copy_from_slice(&data[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    /// Reads up to [`MAX_BATCH_CLUSTERS`] clusters, merging neighbouring clusters that are
    /// contiguous in the file (or all in the backing file) into one request each.
    pub(super) fn read_batch(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let last = (offset + buf.len() as u64 - 1) >> self.cluster_bits;
        if first == last {
            return self.read_in_cluster(buf, offset);
        }
        // Shared stripe locks taken in ascending order: writers hold at most one stripe at a
        // time, so this cannot deadlock.
        let mut stripes: Vec<usize> = (first..=last).map(|c| c as usize & (STRIPES - 1)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _shared: Vec<_> = stripes.iter().map(|&i| self.stripes[i].read()).collect();

        /// A run of buffer bytes served by one request.
        enum Run {
            Host { host: u64 },
            Below { guest: u64 },
        }
        let mut pending: Option<(Run, usize, usize)> = None;
        let flush = |pending: &mut Option<(Run, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            match pending.take() {
                Some((Run::Host { host }, start, len)) => {
                    self.file.read_at(&mut buf[start..start + len], host)
                }
                Some((Run::Below { guest }, start, len)) => {
                    self.read_below(&mut buf[start..start + len], guest)
                }
                None => Ok(()),
            }
        };
        let mut done = 0usize;
        for (at, n) in self.clusters(offset, buf.len() as u64) {
            let n = n as usize;
            let in_cluster = at & (self.cluster_size - 1);
            match self.lookup(at >> self.cluster_bits)? {
                Mapping::Data { host, .. } => {
                    let host = host + in_cluster;
                    let extends = matches!(
                        &pending,
                        Some((Run::Host { host: h }, start, len)) if h + *len as u64 == host && start + len == done
                    );
                    if extends {
                        if let Some((_, _, len)) = pending.as_mut() {
                            *len += n;
                        }
                    } else {
                        flush(&mut pending, buf)?;
                        pending = Some((Run::Host { host }, done, n));
                    }
                }
                Mapping::Unallocated => {
                    let extends = matches!(&pending, Some((Run::Below { .. }, _, _)));
                    if extends {
                        if let Some((_, _, len)) = pending.as_mut() {
                            *len += n;
                        }
                    } else {
                        flush(&mut pending, buf)?;
                        pending = Some((Run::Below { guest: at }, done, n));
                    }
                }
                Mapping::Zero { .. } => {
                    flush(&mut pending, buf)?;
                    buf[done..done + n].fill(0);
                }
                Mapping::Compressed(extent) => {
                    flush(&mut pending, buf)?;
                    let data = self.read_compressed(extent)?;
                    let start = in_cluster as usize;
                    buf[done..done + n].copy_from_slice(&data[start..start + n]);
                }
            }
            done += n;
        }
        flush(&mut pending, buf)
    }

    /// Splits `[offset, offset+len)` at cluster boundaries.
    pub(super) fn clusters(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let cs = self.cluster_size;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (cs - (at & (cs - 1))).min(end - at);
            let item = (at, n);
            at += n;
            Some(item)
        })
    }

    /// Allocates `count` clusters, rewriting the header if the refcount table moved.
    pub(super) fn allocate(&self, meta: &mut Meta, count: u64) -> Result<u64> {
        let offset = meta.refcounts.allocate(&self.file, count)?;
        if meta.refcounts.table_moved {
            meta.header.refcount_table_offset = meta.refcounts.table_offset;
            meta.header.refcount_table_clusters = meta.refcounts.table_clusters;
            write_header(&self.file, &mut meta.header)?;
            self.file.sync()?;
            meta.refcounts.release_old_table(&self.file)?;
        }
        Ok(offset)
    }

    /// The L2 slice and index for `guest_cluster`, with the L2 table allocated and owned by
    /// the active L1 (COPIED) so that its entries may be changed. Caller holds the cluster's
    /// stripe lock exclusively.
    pub(super) fn l2_for_write(&self, guest_cluster: u64) -> Result<(Arc<Slice>, usize)> {
        let index = guest_cluster % self.l2_entries;
        let (l2_offset, copied) = self.l1_entry(guest_cluster)?;
        if l2_offset != 0 && copied {
            return self.l2_slice(l2_offset, index);
        }
        let mut meta = self.meta.lock();
        // Another cluster's writer may have allocated the table meanwhile.
        let (l2_offset, copied) = self.l1_entry(guest_cluster)?;
        if l2_offset != 0 && copied {
            drop(meta);
            return self.l2_slice(l2_offset, index);
        }
        let new_offset = self.allocate(&mut meta, 1)?;
        self.metadata.insert(new_offset >> self.cluster_bits, 1);
        let mut raw = vec![0u8; self.cluster_size as usize];
        if l2_offset != 0 {
            // Copy-on-write of an L2 table shared with an internal snapshot. Shared tables
            // are never changed in place, so the file holds their current contents.
            self.file.read_at(&mut raw, l2_offset)?;
        }
        // The new table is on disk before the L1 entry that points at it can be written.
        self.file.write_at(&raw, new_offset)?;
        let slice_bytes = (self.slice_entries * 8) as usize;
        for (k, chunk) in raw.chunks_exact(slice_bytes).enumerate() {
            self.l2_cache.insert(Slice::from_bytes(
                new_offset + (k * slice_bytes) as u64,
                chunk,
            ));
        }
        let l1_index = guest_cluster / self.l2_entries;
        self.l1[l1_index as usize].store(new_offset | OFLAG_COPIED, Ordering::Release);
        meta.l1_dirty.insert(l1_index * 8 / 512);
        if l2_offset != 0 {
            meta.pending_frees.push((l2_offset, self.cluster_size));
        }
        drop(meta);
        self.l2_slice(new_offset, index)
    }

    /// Refuses a data write into a metadata cluster (a corrupt or crafted L2 entry) and marks
    /// the image corrupt and read-only, as QEMU does.
    fn check_data_target(&self, host: u64) -> Result<()> {
        if !self.metadata.contains(host >> self.cluster_bits) {
            return Ok(());
        }
        tracing::error!(
            path = %self.path.display(),
            host,
            "preventing a data write on metadata: marking the image corrupt"
        );
        self.read_only.store(true, Ordering::Release);
        let mut meta = self.meta.lock();
        meta.header.incompatible_features |= INCOMPAT_CORRUPT;
        write_header(&self.file, &mut meta.header)?;
        self.file.sync()?;
        Err(self.invalid(format!(
            "a data write to host offset {host:#x} would overwrite metadata: image marked corrupt"
        )))
    }

    pub(super) fn defer_free(&self, mapping: Mapping) {
        if let Some(extent) = mapping.host_extent(self.cluster_size) {
            self.meta.lock().pending_frees.push(extent);
        }
    }

    /// Counts a slice that just turned dirty (`newly`); dirty slices are pinned in the
    /// cache, so once more of them exist than the cache holds, write them back. Counting
    /// transitions, not entry updates, keeps this fsync-heavy path off the steady state.
    pub(super) fn note_dirty(&self, newly: bool) -> Result<()> {
        if !newly {
            return Ok(());
        }
        let n = self.dirtied.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.l2_capacity {
            self.writeback()?;
        }
        Ok(())
    }

    /// Writes part of one guest cluster.
    pub(super) fn write_in_cluster(&self, data: &[u8], offset: u64) -> Result<()> {
        self.write_in_cluster_unsynced(data, offset)?;
        // Marked after the data is written and before the write is acknowledged, so a
        // flush that starts after the acknowledgement always syncs it.
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    fn write_in_cluster_unsynced(&self, data: &[u8], offset: u64) -> Result<()> {
        let guest_cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (self.cluster_size - 1);
        {
            let _shared = self.stripe(guest_cluster).read();
            if let Mapping::Data { host, copied: true } = self.lookup(guest_cluster)? {
                self.check_data_target(host)?;
                return self.file.write_at(data, host + in_cluster);
            }
        }
        let _exclusive = self.stripe(guest_cluster).write();
        let (slice, index) = self.l2_for_write(guest_cluster)?;
        let old = self.decode(slice.get(index), guest_cluster)?;
        if let Mapping::Data { host, copied: true } = old {
            self.check_data_target(host)?;
            return self.file.write_at(data, host + in_cluster);
        }
        // A preallocated zero cluster we own can take the data in place of a new one.
        let (target, reuse) = match old {
            Mapping::Zero {
                host: Some(h),
                copied: true,
            } => {
                self.check_data_target(h)?;
                (h, true)
            }
            _ => {
                let mut meta = self.meta.lock();
                (self.allocate(&mut meta, 1)?, false)
            }
        };
        if data.len() as u64 == self.cluster_size {
            self.file.write_at(data, target)?;
        } else {
            let cluster_start = guest_cluster << self.cluster_bits;
            let mut full = vec![0u8; self.cluster_size as usize];
            let head = in_cluster as usize;
            let tail = head + data.len();
            // Copy-on-write reads only the parts the write does not cover.
            match old {
                Mapping::Data { host, .. } => {
                    self.file.read_at(&mut full[..head], host)?;
                    self.file.read_at(&mut full[tail..], host + tail as u64)?;
                }
                Mapping::Compressed(extent) => full = self.read_compressed(extent)?,
                Mapping::Zero { .. } => {}
                Mapping::Unallocated => {
                    if self.backing.read().is_some() {
                        self.read_below(&mut full[..head], cluster_start)?;
                        self.read_below(&mut full[tail..], cluster_start + tail as u64)?;
                    }
                }
            }
            full[head..tail].copy_from_slice(data);
            self.file.write_at(&full, target)?;
        }
        let newly = slice.set(index, target | OFLAG_COPIED);
        if !reuse {
            self.defer_free(old);
        }
        self.note_dirty(newly)
    }

    /// Writes `data`, whole clusters starting at cluster-aligned `offset`: the clusters that
    /// need new space get it from one allocation, and every run contiguous in the file is
    /// written with one call (as QEMU does for multi-cluster writes), which is what makes
    /// sequential writes, stream and commit fast.
    fn write_whole_clusters(&self, data: &[u8], offset: u64) -> Result<()> {
        /// Where one cluster of the request goes.
        enum Target {
            /// Owned cluster, written in place.
            InPlace(u64),
            /// Needs a fresh cluster; the old mapping is released afterwards.
            Fresh(Arc<Slice>, usize, Mapping),
        }
        let cs = self.cluster_size;
        let first = offset >> self.cluster_bits;
        let count = data.len() as u64 >> self.cluster_bits;
        // Exclusive stripes in ascending order (see `read_batch` for why that is safe).
        let mut stripes: Vec<usize> = (first..first + count)
            .map(|c| c as usize & (STRIPES - 1))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _exclusive: Vec<_> = stripes.iter().map(|&i| self.stripes[i].write()).collect();

        let mut plan = Vec::with_capacity(count as usize);
        let mut fresh = 0u64;
        for guest_cluster in first..first + count {
            if let Mapping::Data { host, copied: true } = self.lookup(guest_cluster)? {
                self.check_data_target(host)?;
                plan.push(Target::InPlace(host));
                continue;
            }
            let (slice, index) = self.l2_for_write(guest_cluster)?;
            let old = self.decode(slice.get(index), guest_cluster)?;
            if let Mapping::Data { host, copied: true } = old {
                self.check_data_target(host)?;
                plan.push(Target::InPlace(host));
            } else {
                fresh += 1;
                plan.push(Target::Fresh(slice, index, old));
            }
        }
        let mut next = if fresh > 0 {
            let mut meta = self.meta.lock();
            self.allocate(&mut meta, fresh)?
        } else {
            0
        };
        let hosts: Vec<u64> = plan
            .iter()
            .map(|t| match t {
                Target::InPlace(host) => *host,
                Target::Fresh(..) => {
                    next += cs;
                    next - cs
                }
            })
            .collect();
        let mut run_start = 0usize;
        for i in 1..=hosts.len() {
            if i == hosts.len() || hosts[i] != hosts[i - 1] + cs {
                let bytes = &data[run_start * cs as usize..i * cs as usize];
                self.file.write_at(bytes, hosts[run_start])?;
                run_start = i;
            }
        }
        // The data is in place: publish the new mappings.
        for (target, host) in plan.into_iter().zip(hosts) {
            if let Target::Fresh(slice, index, old) = target {
                let newly = slice.set(index, host | OFLAG_COPIED);
                self.defer_free(old);
                self.note_dirty(newly)?;
            }
        }
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes whole guest cluster `guest_cluster` unallocated or zero-flagged (`entry` is the
    /// new L2 entry, 0 or `OFLAG_ZERO`).
    pub(super) fn unmap_cluster(&self, guest_cluster: u64, entry: u64) -> Result<()> {
        let _exclusive = self.stripe(guest_cluster).write();
        let (l2_offset, _) = self.l1_entry(guest_cluster)?;
        if l2_offset == 0 && entry == 0 {
            return Ok(());
        }
        let current = self.lookup(guest_cluster)?;
        let done = match current {
            Mapping::Unallocated => entry == 0,
            Mapping::Zero { host: None, .. } => entry == OFLAG_ZERO,
            _ => false,
        };
        if done {
            return Ok(());
        }
        let (slice, index) = self.l2_for_write(guest_cluster)?;
        let old = self.decode(slice.get(index), guest_cluster)?;
        let newly = slice.set(index, entry);
        self.defer_free(old);
        self.note_dirty(newly)
    }

    /// Shared body of `write_zeroes` and `discard`.
    pub(super) fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        // What a whole unmapped cluster becomes: unallocated reads as zero without a backing
        // file; with one, version 3 has the zero flag; version 2 can only fall through to
        // the backing file (allowed for discard) or store zeroes.
        let unmapped_entry = if self.backing.read().is_none() {
            Some(0)
        } else if self.version >= 3 {
            Some(OFLAG_ZERO)
        } else if discard {
            Some(0)
        } else {
            None
        };
        let ranges: Vec<(u64, u64)> = self.clusters(offset, len).collect();
        let mut zeroes: Vec<u8> = Vec::new();
        for (at, n) in ranges {
            let in_cluster = at & (self.cluster_size - 1);
            let whole = in_cluster == 0 && (n == self.cluster_size || at + n == self.size);
            match (whole, unmapped_entry) {
                (true, Some(entry)) => self.unmap_cluster(at >> self.cluster_bits, entry)?,
                _ if discard => {}
                _ => {
                    zeroes.resize(n as usize, 0);
                    self.write_in_cluster(&zeroes[..n as usize], at)?;
                }
            }
        }
        Ok(())
    }

    /// Writes dirty metadata back in crash-safe order, then applies deferred frees.
    pub(super) fn writeback(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut meta = self.meta.lock();
        self.dirtied.store(0, Ordering::Relaxed);
        let data_written = self.unsynced.swap(false, Ordering::AcqRel);
        let dirty_slices = self.l2_cache.dirty_slices();
        if !data_written
            && dirty_slices.is_empty()
            && meta.l1_dirty.is_empty()
            && meta.pending_frees.is_empty()
            && !meta.refcounts.is_dirty()
        {
            // Nothing since the last barrier: skip the fsyncs.
            return Ok(());
        }
        // 1. Refcount blocks (covering every cluster any dirty L2 entry can point at), and
        //    the data written so far, reach the disk.
        meta.refcounts.flush(&self.file)?;
        self.file.sync()?;
        // 2. L2 slices (collected again: writers may have dirtied more meanwhile).
        drop(dirty_slices);
        let dirty = self.l2_cache.dirty_slices();
        for slice in &dirty {
            let raw = slice.take_for_writeback();
            if let Err(e) = self.file.write_at(&raw, slice.offset) {
                slice.mark_dirty();
                return Err(e);
            }
        }
        if !dirty.is_empty() {
            self.file.sync()?;
        }
        // 3. L1 sectors.
        if !meta.l1_dirty.is_empty() {
            let sectors: Vec<u64> = std::mem::take(&mut meta.l1_dirty).into_iter().collect();
            for sector in sectors {
                let first = (sector * 64) as usize;
                let last = (first + 64).min(self.l1.len());
                let mut raw = Vec::with_capacity(512);
                for e in &self.l1[first..last] {
                    raw.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
                }
                self.file.write_at(&raw, self.l1_offset + sector * 512)?;
            }
            self.file.sync()?;
        }
        // 4. Only now may references dropped by those mappings be released.
        let frees = std::mem::take(&mut meta.pending_frees);
        for (offset, len) in frees {
            meta.refcounts.update_range(&self.file, offset, len, -1)?;
        }
        Ok(())
    }

    /// Flushes until nothing is pending, so the file on disk has no leaks (used on close).
    pub fn close(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.writeback()?;
        // Frees applied by the first pass are written by the second.
        self.writeback()
    }

    fn status_of(&self, mapping: &Mapping) -> (Allocation, bool) {
        match mapping {
            Mapping::Data { .. } => (Allocation::Data, false),
            Mapping::Compressed(_) => (Allocation::Data, true),
            Mapping::Zero { .. } => (Allocation::Zero, false),
            Mapping::Unallocated => (Allocation::Unallocated, false),
        }
    }
}

/// Records every metadata cluster of a freshly opened image: header, active L1 and its L2
/// tables, refcount table and blocks, snapshot table, and every snapshot's L1 and L2 tables.
fn mark_metadata(
    file: &ImageFile,
    hdr: &Header,
    l1: &[AtomicU64],
    refcount_table: &[u64],
    snapshots: &[SnapshotEntry],
    snapshot_table_bytes: u64,
    map: &MetadataMap,
) -> Result<()> {
    let cs = hdr.cluster_size();
    let bits = hdr.cluster_bits;
    let clusters = |bytes: u64| bytes.div_ceil(cs).max(1);
    map.insert(0, 1);
    map.insert(
        hdr.l1_table_offset >> bits,
        clusters(hdr.l1_size as u64 * 8),
    );
    map.insert(
        hdr.refcount_table_offset >> bits,
        hdr.refcount_table_clusters as u64,
    );
    for &block in refcount_table.iter().filter(|&&b| b != 0) {
        map.insert(block >> bits, 1);
    }
    let mark_l1 = |entries: &mut dyn Iterator<Item = u64>| {
        for e in entries {
            let l2 = e & super::entry::OFFSET_MASK;
            if l2 != 0 {
                map.insert(l2 >> bits, 1);
            }
        }
    };
    mark_l1(&mut l1.iter().map(|e| e.load(Ordering::Relaxed)));
    if snapshot_table_bytes > 0 {
        map.insert(hdr.snapshots_offset >> bits, clusters(snapshot_table_bytes));
    }
    for snapshot in snapshots {
        let bytes = snapshot.l1_size as u64 * 8;
        map.insert(snapshot.l1_table_offset >> bits, clusters(bytes));
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(&mut raw, snapshot.l1_table_offset)?;
        mark_l1(
            &mut raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))),
        );
    }
    Ok(())
}

/// Reads and parses the snapshot table named by the header.
fn load_snapshots(
    file: &ImageFile,
    hdr: &Header,
    file_len: u64,
) -> Result<(Vec<SnapshotEntry>, u64)> {
    if hdr.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    // Read the table in growing chunks: its length is only known once parsed.
    let max = MAX_TABLE_BYTES.min(file_len.saturating_sub(hdr.snapshots_offset));
    let mut want = (hdr.nb_snapshots as u64 * 64).min(max).max(4096.min(max));
    loop {
        let mut raw = vec![0u8; want as usize];
        file.read_at(&mut raw, hdr.snapshots_offset)?;
        match parse_table(
            file.path(),
            &raw,
            hdr.nb_snapshots,
            hdr.size,
            hdr.cluster_size(),
        ) {
            Ok((entries, len)) => return Ok((entries, len as u64)),
            Err(e) if want >= max => return Err(e),
            Err(_) => want = (want * 2).min(max),
        }
    }
}

/// Writes the header (with its extensions and backing name) into the first cluster.
pub(crate) fn write_header(file: &ImageFile, header: &mut Header) -> Result<()> {
    let buf = header.serialize()?;
    let used = buf.iter().rposition(|&b| b != 0).map_or(512, |p| p + 1);
    let len = used.div_ceil(512) * 512;
    file.write_at(&buf[..len.min(buf.len())], 0)
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(path = %self.path.display(), error = %e, "flush on close failed");
        }
    }
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let batch = MAX_BATCH_CLUSTERS * self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            // Batches end on cluster boundaries so each covers whole clusters but the ends.
            let limit = batch - (at & (self.cluster_size - 1));
            let n = (buf.len() - done).min(limit as usize);
            self.read_batch(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let remaining = (buf.len() - done) as u64;
            if at & (cs - 1) == 0 && remaining >= 2 * cs {
                // Runs of whole clusters: one allocation and one write per contiguous run.
                let n = ((remaining / cs).min(MAX_BATCH_CLUSTERS) * cs) as usize;
                self.write_whole_clusters(&buf[done..done + n], at)?;
                done += n;
            } else {
                let n = (cs - (at & (cs - 1))).min(remaining) as usize;
                self.write_in_cluster(&buf[done..done + n], at)?;
                done += n;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        self.writeback()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        let mut status = BlockStatus {
            len: 0,
            allocation: Allocation::Unallocated,
            depth: 0,
            offset: None,
            compressed: false,
        };
        if len == 0 {
            return Ok(status);
        }
        let mut first: Option<Mapping> = None;
        let per_table = self.cluster_size * self.l2_entries;
        let mut skip_until = 0u64;
        for (at, n) in self.clusters(offset, len) {
            if at < skip_until {
                status.len += n;
                continue;
            }
            let mapping = self.lookup(at >> self.cluster_bits)?;
            if self.l1_entry(at >> self.cluster_bits)?.0 == 0
                && matches!(first, None | Some(Mapping::Unallocated))
            {
                // No L2 table: the whole range it would map is unallocated here.
                skip_until = (at / per_table + 1) * per_table;
            }
            let in_cluster = at & (self.cluster_size - 1);
            match first {
                None => {
                    let (allocation, compressed) = self.status_of(&mapping);
                    status.allocation = allocation;
                    status.compressed = compressed;
                    status.depth = 0;
                    status.offset = match mapping {
                        Mapping::Data { host, .. } => Some(host + in_cluster),
                        Mapping::Zero { host: Some(h), .. } => Some(h + in_cluster),
                        _ => None,
                    };
                    first = Some(mapping);
                }
                Some(prev) => {
                    let same = match (prev, mapping) {
                        (Mapping::Data { .. }, Mapping::Data { host, .. })
                        | (
                            Mapping::Zero { host: Some(_), .. },
                            Mapping::Zero {
                                host: Some(host), ..
                            },
                        ) => status.offset.map(|o| o + status.len) == Some(host + in_cluster),
                        (Mapping::Zero { host: Some(_), .. }, _)
                        | (_, Mapping::Zero { host: Some(_), .. }) => false,
                        (a, b) => {
                            self.status_of(&a) == self.status_of(&b)
                                && !matches!(a, Mapping::Data { .. })
                        }
                    };
                    if !same {
                        break;
                    }
                }
            }
            status.len += n;
        }
        if status.allocation == Allocation::Unallocated {
            match &*self.backing.read() {
                Some(b) if offset < b.size() => {
                    let n = status.len.min(b.size() - offset);
                    let mut below = b.block_status(offset, n)?;
                    below.depth += 1;
                    return Ok(below);
                }
                _ => status.depth = self.bottom_depth(),
            }
        }
        Ok(status)
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    fn info(&self) -> ImageInfo {
        self.info.clone()
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing.read().clone()
    }

    fn as_qcow2(&self) -> Option<&Qcow2Image> {
        Some(self)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
