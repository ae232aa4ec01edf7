//! The image being checked: its header, snapshot table and bitmaps as QEMU's check reads
//! them, and reads that see zeroes past the end of the file.

use std::path::Path;

use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::qcow2::header::{self, be16, be32, be64, Header};

/// Low bits of a refcount table entry that must be clear.
pub(super) const REFT_RESERVED: u64 = 0x1ff;
/// Fixed part of a snapshot table entry.
pub(super) const SNAPSHOT_HEADER_LEN: u64 = 40;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: more extra data than this fails the check.
pub(super) const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: a longer snapshot table fails the check.
pub(super) const MAX_SNAPSHOTS_SIZE: u64 = 1024 * 65536;
/// Extra data every version 3 snapshot entry needs (vm_state_size_large and disk_size).
pub(super) const MIN_V3_SNAPSHOT_EXTRA: u32 = 16;
/// Header extension: persistent dirty bitmaps.
pub(super) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Auto-clear feature: the bitmaps extension is consistent with the image.
pub(super) const AUTOCLEAR_BITMAPS: u64 = 1;
/// QEMU's `QCOW2_MAX_BITMAPS`.
pub(super) const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub(super) const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's `BME_MAX_TABLE_SIZE` (entries of one bitmap table).
pub(super) const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x800_0000;
/// Bits that must be clear in a bitmap table entry.
pub(super) const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry flag: the cluster reads as all ones (only valid without an offset).
pub(super) const BME_ALL_ONES: u64 = 1;
/// Bitmap table entries read at once; bitmap tables may be 1 GiB, so they are streamed.
pub(super) const BITMAP_TABLE_CHUNK: u64 = 1 << 17;
/// Distinct snapshot L2 tables gathered before they are walked, bounding the map's memory.
pub(super) const MAX_PENDING_L2: usize = 1 << 22;
/// Refcount block bytes cached while looking up on-disk refcounts for the COPIED check.
pub(super) const LOOKUP_CACHE_BYTES: usize = 32 << 20;
/// Messages kept in a report; a badly broken image could otherwise produce millions.
pub(super) const MAX_MESSAGES: usize = 1000;
/// QEMU handles file offsets as `int64_t`: anything above fails to read (EIO).
pub(super) const MAX_OFFSET: u64 = i64::MAX as u64;
/// Ranges referenced past the end of the file remembered for a rebuild to keep clear of.
pub(super) const MAX_BEYOND_RANGES: usize = 1 << 16;

/// Like the header read of the image open path: the first cluster (or the whole, shorter, file).
///
/// Unlike opening, a check does not refuse tables that lie past the end of the file: QEMU
/// opens such images and its check counts them as corruptions, and so does this one. The
/// header is therefore validated as if the file were unbounded; only offsets QEMU cannot
/// even represent are refused.
pub(super) fn read_header(file: &ImageFile) -> Result<Header> {
    let first = header::read_first_cluster(file)?;
    let h = Header::parse(file.path(), &first, u64::MAX)?;
    let tables = [
        (
            "l1_table_offset",
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
        ),
        (
            "refcount_table_offset",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * h.cluster_size(),
        ),
    ];
    for (name, offset, len) in tables {
        if offset.checked_add(len).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::invalid(
                file.path(),
                format!("{name} {offset:#x} + {len} bytes lies beyond any file offset"),
            ));
        }
    }
    Ok(h)
}

/// Reads `buf.len()` bytes at `offset` of a file of `file_len` bytes; whatever lies past the
/// end (or past any representable offset) reads as zeroes, as in QEMU's block layer.
pub(super) fn read_zero_padded(
    file: &ImageFile,
    file_len: u64,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    buf.fill(0);
    if offset >= file_len {
        return Ok(());
    }
    let avail = (file_len - offset).min(buf.len() as u64) as usize;
    file.read_at(&mut buf[..avail], offset)
}

/// One internal snapshot, as far as refcounts care.
pub(super) struct SnapshotEntry {
    pub(super) l1_table_offset: u64,
    pub(super) l1_size: u32,
    pub(super) extra_data_size: u32,
}

/// The persistent bitmaps extension.
pub(super) struct Bitmaps {
    pub(super) count: u32,
    pub(super) directory_offset: u64,
    pub(super) directory_size: u64,
}

/// Reads the bitmaps extension when the auto-clear bit says it is valid (QEMU ignores it
/// otherwise). Values QEMU refuses at open are refused here too.
pub(super) fn parse_bitmaps(path: &Path, header: &Header) -> Result<Option<Bitmaps>> {
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(ext) = header
        .other_extensions
        .iter()
        .find(|e| e.kind == EXT_BITMAPS)
    else {
        return Ok(None);
    };
    if ext.data.len() < 24 {
        return Err(Error::invalid(
            path,
            format!("bitmaps extension is {} bytes, needs 24", ext.data.len()),
        ));
    }
    let count = be32(&ext.data, 0);
    let directory_size = be64(&ext.data, 8);
    let directory_offset = be64(&ext.data, 16);
    if count > MAX_BITMAPS {
        return Err(Error::invalid(
            path,
            format!("bitmaps extension: nb_bitmaps {count} exceeds {MAX_BITMAPS}"),
        ));
    }
    if directory_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid(
            path,
            format!("bitmaps extension: bitmap_directory_size {directory_size} too large"),
        ));
    }
    if directory_offset % header.cluster_size() != 0 || directory_offset > MAX_OFFSET {
        return Err(Error::invalid(
            path,
            format!("bitmaps extension: bitmap_directory_offset {directory_offset:#x} is invalid"),
        ));
    }
    Ok(Some(Bitmaps {
        count,
        directory_offset,
        directory_size,
    }))
}

/// The image being checked and what was read of it.
pub(super) struct Checker<'a> {
    pub(super) file: &'a ImageFile,
    pub(super) header: Header,
    pub(super) file_len: u64,
    pub(super) cluster_size: u64,
    pub(super) cluster_bits: u32,
    pub(super) order: u32,
    pub(super) snapshots: Vec<SnapshotEntry>,
    pub(super) snapshots_size: u64,
    pub(super) bitmaps: Option<Bitmaps>,
}

impl<'a> Checker<'a> {
    pub(super) fn open(file: &'a ImageFile) -> Result<Self> {
        let header = read_header(file)?;
        Self::with_header(file, header)
    }

    pub(super) fn with_header(file: &'a ImageFile, header: Header) -> Result<Self> {
        let bitmaps = parse_bitmaps(file.path(), &header)?;
        Ok(Checker {
            file,
            file_len: file.len()?,
            cluster_size: header.cluster_size(),
            cluster_bits: header.cluster_bits,
            order: header.refcount_order,
            header,
            snapshots: Vec::new(),
            snapshots_size: 0,
            bitmaps,
        })
    }

    pub(super) fn per_block(&self) -> u64 {
        (self.cluster_size * 8) >> self.order
    }

    pub(super) fn read_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_zero_padded(self.file, self.file_len, buf, offset)
    }

    /// `count` big-endian u64 entries at `offset` (callers bound `count`).
    pub(super) fn read_entries(&self, offset: u64, count: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; (count * 8) as usize];
        self.read_bytes(&mut raw, offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    pub(super) fn reftable(&self) -> Result<Vec<u64>> {
        let entries = self.header.refcount_table_clusters as u64 * self.cluster_size / 8;
        self.read_entries(self.header.refcount_table_offset, entries)
    }

    /// Reads the snapshot table the way QEMU does in check mode. The inner error is a
    /// check error (QEMU stops the check there), the outer one an I/O failure.
    pub(super) fn load_snapshots(&mut self) -> Result<std::result::Result<(), String>> {
        let start = self.header.snapshots_offset;
        let count = self.header.nb_snapshots;
        if count > 0 && start > MAX_OFFSET - u64::from(count) * SNAPSHOT_HEADER_LEN {
            return Ok(Err(format!("snapshot table offset {start:#x} invalid")));
        }
        let mut entries = Vec::with_capacity(count.min(1024) as usize);
        let mut offset = start;
        for i in 0..count {
            offset = offset.next_multiple_of(8);
            let mut raw = [0u8; SNAPSHOT_HEADER_LEN as usize];
            self.read_bytes(&mut raw, offset)?;
            let id_str_size = u64::from(be16(&raw, 12));
            let name_size = u64::from(be16(&raw, 14));
            let extra_data_size = be32(&raw, 36);
            if u64::from(extra_data_size) > MAX_SNAPSHOT_EXTRA_DATA {
                return Ok(Err(format!(
                    "too much extra metadata in snapshot table entry {i} (extra_data_size {extra_data_size} > {MAX_SNAPSHOT_EXTRA_DATA})"
                )));
            }
            offset += SNAPSHOT_HEADER_LEN + u64::from(extra_data_size) + id_str_size + name_size;
            if offset - start > MAX_SNAPSHOTS_SIZE {
                return Ok(Err(format!(
                    "snapshot table is too big (more than {MAX_SNAPSHOTS_SIZE} bytes at entry {i})"
                )));
            }
            entries.push(SnapshotEntry {
                l1_table_offset: be64(&raw, 0),
                l1_size: be32(&raw, 8),
                extra_data_size,
            });
        }
        self.snapshots = entries;
        self.snapshots_size = offset - start;
        Ok(Ok(()))
    }

    pub(super) fn no_memory(&self, clusters: u64) -> Error {
        Error::NoSpace {
            path: self.file.path().to_path_buf(),
            reason: format!("cannot hold refcounts of {clusters} clusters in memory"),
        }
    }

    /// Whether rewriting `[offset, offset+len)` would clobber metadata other than L2 tables
    /// (QEMU's pre-write overlap check, minus the expensive L2 part).
    pub(super) fn overlaps_metadata(&self, offset: u64, len: u64) -> Result<bool> {
        let cs = self.cluster_size;
        let start = offset & !(cs - 1);
        let end = offset.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        let hit = |o: u64, l: u64| l > 0 && o < end && start < o.saturating_add(l);
        let h = &self.header;
        if hit(0, cs)
            || hit(h.l1_table_offset, u64::from(h.l1_size) * 8)
            || hit(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
            || hit(h.snapshots_offset, self.snapshots_size)
            || self
                .snapshots
                .iter()
                .any(|s| hit(s.l1_table_offset, u64::from(s.l1_size) * 8))
            || self
                .bitmaps
                .as_ref()
                .is_some_and(|b| hit(b.directory_offset, b.directory_size))
        {
            return Ok(true);
        }
        Ok(self.reftable()?.iter().any(|&e| {
            hit(
                e & !REFT_RESERVED,
                if e & !REFT_RESERVED == 0 { 0 } else { cs },
            )
        }))
    }
}
