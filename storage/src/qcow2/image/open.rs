//! Opening one qcow2 layer: header, active L1 table, refcounts, snapshot table and the map of
//! metadata clusters, all validated against the file before the first request.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::{
    Meta, Qcow2Image, DEFAULT_L2_COVERAGE, DEFAULT_REFCOUNT_CACHE, L2_SLICE_BYTES, STRIPES,
};
use crate::device::{BlockDevice, ImageInfo};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::format::ImageFormat;
use crate::options::OpenOptions;
use crate::qcow2::cache::L2Cache;
use crate::qcow2::entry::decode_l1;
use crate::qcow2::header::{self, write_header, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::qcow2::overlap::MetadataMap;
use crate::qcow2::refcount::Refcounts;
use crate::qcow2::snapshot::{parse_table, SnapshotEntry, MAX_TABLE_BYTES};

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
        let mut file = ImageFile::open(path, read_only, options.direct)?;
        // Claimed before anything is written (a dirty-image rebuild, a header update).
        if let Some(mode) = options.lock_mode(read_only)? {
            file.lock(mode)?;
        }
        let file_len = file.len()?;
        let was_dirty = !read_only && hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        if was_dirty {
            tracing::info!(path = %path.display(), "dirty bit set: rebuilding refcounts");
            crate::qcow2::check::rebuild_refcounts(&file, &mut hdr)?;
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
                crate::qcow2::check::check(path, crate::qcow2::check::RepairMode::Leaks)?;
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
            &hdr,
            &l1,
            &refcounts.table,
            &snapshots,
            snapshot_table_bytes,
            &metadata,
        );

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
            cow_batcher: Default::default(),
            snapshots,
            snapshot_table_bytes,
            metadata,
            format_probed: false,
            file,
        };
        if was_dirty {
            // Rebuilt refcounts may disagree with COPIED flags written before the crash.
            image.fix_copied_flags()?;
        }
        Ok(image)
    }
}

/// Records every metadata cluster of a freshly opened image that the header and the tables
/// already in memory name: header, active L1 and its L2 tables, refcount table and blocks,
/// snapshot table and every snapshot's L1 table.
///
/// Snapshot L1 tables are not read here: an image may have thousands of snapshots with L1
/// tables of up to 32 MiB each, and opening must cost time and memory bounded by what it
/// needs (they are read when a snapshot is applied, deleted or checked). Their L2 tables are
/// therefore not in the map, as QEMU's default overlap check ("cached") leaves inactive L2
/// tables out too; the allocator never hands them out, since their refcount is not 0.
fn mark_metadata(
    hdr: &Header,
    l1: &[AtomicU64],
    refcount_table: &[u64],
    snapshots: &[SnapshotEntry],
    snapshot_table_bytes: u64,
    map: &MetadataMap,
) {
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
    for e in l1 {
        let l2 = e.load(Ordering::Relaxed) & crate::qcow2::entry::OFFSET_MASK;
        if l2 != 0 {
            map.insert(l2 >> bits, 1);
        }
    }
    if snapshot_table_bytes > 0 {
        map.insert(hdr.snapshots_offset >> bits, clusters(snapshot_table_bytes));
    }
    for snapshot in snapshots {
        let bytes = snapshot.l1_size as u64 * 8;
        map.insert(snapshot.l1_table_offset >> bits, clusters(bytes));
    }
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
