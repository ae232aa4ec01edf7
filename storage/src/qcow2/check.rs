//! Consistency check and repair of qcow2 images (`qemu-img check` semantics).
//!
//! The checker recomputes, from the metadata alone, how many references every host cluster
//! has (header, L1/L2 tables, data and compressed clusters of the active layer and of every
//! internal snapshot, the snapshot table, persistent bitmaps, and the refcount structures
//! themselves) and compares the result with the refcounts stored in the image. The counting
//! rules follow QEMU's `qcow2_check_refcounts` (block/qcow2-refcount.c) closely, so that the
//! numbers in [`CheckReport`] equal those of `qemu-img check --output json`; where this code
//! deliberately differs, the comment at that spot says why.
//!
//! Every offset, size and count read from the file is untrusted: arithmetic is checked,
//! reads past the end of the file see zeroes (as QEMU's block layer does), and allocations
//! are bounded by the file size or by QEMU's own table limits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::entry::{
    decode_l2, L1_RESERVED, L2_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::header::{
    self, be16, be32, be64, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES,
};
use crate::error::{Error, Result};
use crate::file::ImageFile;

/// Low bits of a refcount table entry that must be clear.
const REFT_RESERVED: u64 = 0x1ff;
/// Fixed part of a snapshot table entry.
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: more extra data than this fails the check.
const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: a longer snapshot table fails the check.
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * 65536;
/// Extra data every version 3 snapshot entry needs (vm_state_size_large and disk_size).
const MIN_V3_SNAPSHOT_EXTRA: u32 = 16;
/// Header extension: persistent dirty bitmaps.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Auto-clear feature: the bitmaps extension is consistent with the image.
const AUTOCLEAR_BITMAPS: u64 = 1;
/// QEMU's `QCOW2_MAX_BITMAPS`.
const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's `BME_MAX_TABLE_SIZE` (entries of one bitmap table).
const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x800_0000;
/// Bits that must be clear in a bitmap table entry.
const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry flag: the cluster reads as all ones (only valid without an offset).
const BME_ALL_ONES: u64 = 1;
/// Bitmap table entries read at once; bitmap tables may be 1 GiB, so they are streamed.
const BITMAP_TABLE_CHUNK: u64 = 1 << 17;
/// Distinct snapshot L2 tables gathered before they are walked, bounding the map's memory.
const MAX_PENDING_L2: usize = 1 << 22;
/// Refcount block bytes cached while looking up on-disk refcounts for the COPIED check.
const LOOKUP_CACHE_BYTES: usize = 32 << 20;
/// Messages kept in a report; a badly broken image could otherwise produce millions.
const MAX_MESSAGES: usize = 1000;
/// QEMU handles file offsets as `int64_t`: anything above fails to read (EIO).
const MAX_OFFSET: u64 = i64::MAX as u64;
/// Ranges referenced past the end of the file remembered for a rebuild to keep clear of.
const MAX_BEYOND_RANGES: usize = 1 << 16;

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Fix leaked clusters (refcount higher than references).
    Leaks,
    /// Fix leaks and errors (refcounts too low, wrong COPIED flags).
    All,
}

/// The result of a check, with qemu-img's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Path of the image checked.
    pub filename: String,
    /// Errors found (refcount too low, bad entries, COPIED mismatches) and not fixed.
    pub corruptions: u64,
    /// Leaked clusters found and not fixed.
    pub leaks: u64,
    /// Errors while checking (I/O, unreadable tables).
    pub check_errors: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// One past the last used byte of the file.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// What was found and repaired, one line per finding in qemu-img's wording (at most
    /// about a thousand lines: a CLI prints them the way qemu-img prints its stderr).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether the image has no corruption, no leak and no check error left.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// Appends a message, formatting it only while the report has room.
fn note(res: &mut CheckReport, message: impl FnOnce() -> String) {
    match res.messages.len() {
        n if n < MAX_MESSAGES => res.messages.push(message()),
        MAX_MESSAGES => res.messages.push("... further messages suppressed".into()),
        _ => {}
    }
}

/// Checks (and with `repair`, fixes) the qcow2 image at `path`.
///
/// Like `qemu-img check -r`, a repairing check is followed by a read-only one: the counts
/// reported are what is left after the repair, and `leaks_fixed` / `corruptions_fixed` say
/// what the repair did. When the refcount structure itself is broken (a used cluster with
/// refcount 0, a misplaced refcount block), `RepairMode::All` rebuilds it from scratch;
/// `RepairMode::Leaks` then reports a check error instead, as QEMU does.
///
/// ```no_run
/// use storage::qcow2::{check, RepairMode};
/// let report = check("disk.qcow2".as_ref(), RepairMode::None)?;
/// if !report.is_clean() {
///     let fixed = check("disk.qcow2".as_ref(), RepairMode::All)?;
///     assert!(fixed.is_clean(), "{:?}", fixed.messages);
/// }
/// # Ok::<(), storage::Error>(())
/// ```
pub fn check(path: &Path, repair: RepairMode) -> Result<CheckReport> {
    let file = ImageFile::open(path, repair == RepairMode::None, false)?;
    let (first, completed) = check_pass(&file, repair)?;
    if repair == RepairMode::None || !completed {
        return Ok(first);
    }
    // Report what is left, counted afresh, together with what the repair fixed.
    let (mut again, _) = check_pass(&file, RepairMode::None)?;
    let mut messages = first.messages;
    if first.leaks_fixed > 0 || first.corruptions_fixed > 0 {
        messages.push(format!(
            "The following inconsistencies were found and repaired: {} leaked clusters, {} corruptions",
            first.leaks_fixed, first.corruptions_fixed
        ));
    }
    messages.append(&mut again.messages);
    again.messages = messages;
    again.leaks_fixed = first.leaks_fixed;
    again.corruptions_fixed = first.corruptions_fixed;
    Ok(again)
}

/// Recomputes every refcount from the L1/L2 tables of the active layer and every snapshot,
/// writes them, and clears the dirty bit in `header` (written to the file).
///
/// This is the repair QEMU runs when it opens a dirty (lazy refcounts) image writable. The
/// new refcount table and blocks go into clusters no metadata uses and that do not belong to
/// the old refcount structures, so the old ones stay valid until the header names the new
/// ones; afterwards the old ones are simply free. COPIED flags of the active tables are
/// brought in line with the new refcounts before the dirty bit is cleared.
///
/// Refuses (leaving the image untouched) when the metadata itself is corrupt (reserved bits,
/// unaligned offsets, references past the end of the file, refcount overflow): refcounts
/// computed from such tables would let the allocator hand out clusters still in use.
pub(crate) fn rebuild_refcounts(file: &ImageFile, header: &mut Header) -> Result<()> {
    let mut checker = Checker::with_header(file, header.clone())?;
    if let Err(reason) = checker.load_snapshots()? {
        return Err(Error::invalid(file.path(), reason));
    }
    let mut res = CheckReport::default();
    let mut refs = checker.new_refs()?;
    checker.walk_metadata(&mut refs, &mut res, RepairMode::None)?;
    if res.corruptions > 0 || res.check_errors > 0 {
        let first = res.messages.first().cloned().unwrap_or_default();
        return Err(Error::invalid(
            file.path(),
            format!(
                "cannot rebuild the refcounts of a dirty image with corrupt metadata ({} corruptions; first: {first}); run a check with repair",
                res.corruptions + res.check_errors
            ),
        ));
    }
    checker.write_new_structure(&mut refs)?;
    let mut copied = CheckReport::default();
    checker.check_copied(&mut copied, RepairMode::All)?;
    if copied.check_errors > 0 {
        return Err(Error::invalid(
            file.path(),
            format!(
                "could not fix COPIED flags after rebuilding refcounts: {}",
                copied.messages.join("; ")
            ),
        ));
    }
    checker.header.incompatible_features &= !INCOMPAT_DIRTY;
    super::image::write_header(file, &mut checker.header)?;
    file.sync()?;
    *header = checker.header;
    Ok(())
}

/// One check of the open image; with a repair mode, fixes what it may. The flag is false
/// when the check stopped early (QEMU fails the whole check at that point).
fn check_pass(file: &ImageFile, fix: RepairMode) -> Result<(CheckReport, bool)> {
    let mut checker = Checker::open(file)?;
    let mut res = CheckReport {
        filename: file.path().display().to_string(),
        ..Default::default()
    };
    if let Err(reason) = checker.load_snapshots()? {
        res.check_errors += 1;
        note(&mut res, || {
            format!("ERROR failed to read the snapshot table: {reason}")
        });
        return Ok((res, false));
    }
    let mut snapshot_corruptions = 0;
    if checker.header.version >= 3 {
        for (i, sn) in checker.snapshots.iter().enumerate() {
            if sn.extra_data_size < MIN_V3_SNAPSHOT_EXTRA {
                // QEMU rewrites the snapshot table here under `-r all`; snapvmm reports the
                // entry and leaves the table alone (it does not change refcounts).
                snapshot_corruptions += 1;
                note(&mut res, || {
                    format!("ERROR snapshot table entry {i} is incomplete")
                });
            }
        }
    }
    let completed = checker.check_refcounts(&mut res, fix)?;
    res.corruptions += snapshot_corruptions;
    if !completed {
        return Ok((res, false));
    }
    if fix != RepairMode::None && res.check_errors == 0 && res.corruptions == 0 {
        checker.mark_clean()?;
    }
    Ok((res, true))
}

/// Replicates `read_header` of image.rs: the first cluster (or the whole, shorter, file).
///
/// Unlike opening, a check does not refuse tables that lie past the end of the file: QEMU
/// opens such images and its check counts them as corruptions, and so does this one. The
/// header is therefore validated as if the file were unbounded; only offsets QEMU cannot
/// even represent are refused.
fn read_header(file: &ImageFile) -> Result<Header> {
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
fn read_zero_padded(file: &ImageFile, file_len: u64, buf: &mut [u8], offset: u64) -> Result<()> {
    buf.fill(0);
    if offset >= file_len {
        return Ok(());
    }
    let avail = (file_len - offset).min(buf.len() as u64) as usize;
    file.read_at(&mut buf[..avail], offset)
}

/// Value of refcount entry `index` in refcount-block bytes of width `1 << order` bits.
/// Sub-byte widths are packed from the least significant bit; wider ones are big-endian.
fn entry_get(order: u32, data: &[u8], index: u64) -> u64 {
    match order {
        0..=2 => {
            let bit = index << order;
            let mask = (1u64 << (1u32 << order)) - 1;
            (u64::from(data[(bit / 8) as usize]) >> (bit % 8)) & mask
        }
        3 => u64::from(data[index as usize]),
        4 => u64::from(be16(data, (index * 2) as usize)),
        5 => u64::from(be32(data, (index * 4) as usize)),
        _ => be64(data, (index * 8) as usize),
    }
}

/// Stores `value` (already within the width) as refcount entry `index`.
fn entry_set(order: u32, data: &mut [u8], index: u64, value: u64) {
    match order {
        0..=2 => {
            let bit = index << order;
            let shift = bit % 8;
            let mask = (((1u16 << (1u32 << order)) - 1) as u8) << shift;
            let byte = &mut data[(bit / 8) as usize];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => data[index as usize] = value as u8,
        4 => {
            let at = (index * 2) as usize;
            data[at..at + 2].copy_from_slice(&(value as u16).to_be_bytes());
        }
        5 => {
            let at = (index * 4) as usize;
            data[at..at + 4].copy_from_slice(&(value as u32).to_be_bytes());
        }
        _ => {
            let at = (index * 8) as usize;
            data[at..at + 8].copy_from_slice(&value.to_be_bytes());
        }
    }
}

/// Largest refcount an entry of `1 << order` bits holds.
fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Computed refcounts, stored in the image's own entry width (as QEMU does, so overflow
/// behaves the same). Block `b`'s entries are then byte for byte the refcount block that
/// describes clusters `b * entries_per_block ..`, which is what a rebuild writes.
struct RefArray {
    order: u32,
    clusters: u64,
    data: Vec<u8>,
    /// Cluster ranges `[first, end)` referenced a cluster or more past the end of the file:
    /// not counted (they are corruptions), but a rebuild must not put anything there.
    beyond: Vec<(u64, u64)>,
    /// More such ranges than `MAX_BEYOND_RANGES`: a rebuild cannot keep clear of them all.
    beyond_overflow: bool,
}

impl RefArray {
    fn get(&self, cluster: u64) -> u64 {
        if cluster >= self.clusters {
            return 0;
        }
        entry_get(self.order, &self.data, cluster)
    }

    fn set(&mut self, cluster: u64, value: u64) {
        entry_set(self.order, &mut self.data, cluster, value);
    }

    fn len(&self) -> u64 {
        self.clusters
    }

    /// Makes room for `clusters` entries; false when memory cannot be had.
    fn grow(&mut self, clusters: u64) -> bool {
        if clusters <= self.clusters {
            return true;
        }
        let Some(bytes) = clusters
            .checked_mul(1 << self.order)
            .map(|bits| bits.div_ceil(8))
            .and_then(|b| usize::try_from(b).ok())
        else {
            return false;
        };
        if bytes > self.data.len() {
            if self.data.try_reserve(bytes - self.data.len()).is_err() {
                return false;
            }
            self.data.resize(bytes, 0);
        }
        self.clusters = clusters;
        true
    }

    /// The bytes a refcount block with `cluster_size` bytes holds for block index `block`.
    fn block_bytes(&self, block: u64, cluster_size: u64) -> &[u8] {
        let len = self.data.len() as u64;
        let start = (block * cluster_size).min(len);
        let end = ((block + 1) * cluster_size).min(len);
        &self.data[start as usize..end as usize]
    }
}

/// One internal snapshot, as far as refcounts care.
struct SnapshotEntry {
    l1_table_offset: u64,
    l1_size: u32,
    extra_data_size: u32,
}

/// The persistent bitmaps extension.
struct Bitmaps {
    count: u32,
    directory_offset: u64,
    directory_size: u64,
}

/// Reads the bitmaps extension when the auto-clear bit says it is valid (QEMU ignores it
/// otherwise). Values QEMU refuses at open are refused here too.
fn parse_bitmaps(path: &Path, header: &Header) -> Result<Option<Bitmaps>> {
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

/// Where to look for on-disk refcounts while checking COPIED flags: the refcount table and a
/// bounded cache of blocks.
struct RefLookup<'a> {
    file: &'a ImageFile,
    file_len: u64,
    cluster_size: u64,
    order: u32,
    table: Vec<u64>,
    cache: HashMap<u64, Vec<u8>>,
    cached_bytes: usize,
}

impl RefLookup<'_> {
    /// The on-disk refcount of `cluster`; `None` when its refcount block cannot be read
    /// (unaligned offset), which QEMU's COPIED check silently skips.
    fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
        let per_block = (self.cluster_size * 8) >> self.order;
        let Some(&raw) = self.table.get((cluster / per_block) as usize) else {
            return Ok(Some(0));
        };
        let block = raw & !REFT_RESERVED;
        if block == 0 {
            return Ok(Some(0));
        }
        if block % self.cluster_size != 0 || block > MAX_OFFSET {
            return Ok(None);
        }
        if !self.cache.contains_key(&block) {
            if self.cached_bytes + self.cluster_size as usize > LOOKUP_CACHE_BYTES {
                self.cache.clear();
                self.cached_bytes = 0;
            }
            let mut data = vec![0u8; self.cluster_size as usize];
            read_zero_padded(self.file, self.file_len, &mut data, block)?;
            self.cache.insert(block, data);
            self.cached_bytes += self.cluster_size as usize;
        }
        let data = &self.cache[&block];
        Ok(Some(entry_get(self.order, data, cluster % per_block)))
    }
}

/// The image being checked and what was read of it.
struct Checker<'a> {
    file: &'a ImageFile,
    header: Header,
    file_len: u64,
    cluster_size: u64,
    cluster_bits: u32,
    order: u32,
    snapshots: Vec<SnapshotEntry>,
    snapshots_size: u64,
    bitmaps: Option<Bitmaps>,
}

impl<'a> Checker<'a> {
    fn open(file: &'a ImageFile) -> Result<Self> {
        let header = read_header(file)?;
        Self::with_header(file, header)
    }

    fn with_header(file: &'a ImageFile, header: Header) -> Result<Self> {
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

    fn per_block(&self) -> u64 {
        (self.cluster_size * 8) >> self.order
    }

    fn read_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_zero_padded(self.file, self.file_len, buf, offset)
    }

    /// `count` big-endian u64 entries at `offset` (callers bound `count`).
    fn read_entries(&self, offset: u64, count: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; (count * 8) as usize];
        self.read_bytes(&mut raw, offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn reftable(&self) -> Result<Vec<u64>> {
        let entries = self.header.refcount_table_clusters as u64 * self.cluster_size / 8;
        self.read_entries(self.header.refcount_table_offset, entries)
    }

    /// Reads the snapshot table the way QEMU does in check mode. The inner error is a
    /// check error (QEMU stops the check there), the outer one an I/O failure.
    fn load_snapshots(&mut self) -> Result<std::result::Result<(), String>> {
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

    /// An empty refcount array covering every cluster of the file.
    fn new_refs(&self) -> Result<RefArray> {
        let mut refs = RefArray {
            order: self.order,
            clusters: 0,
            data: Vec::new(),
            beyond: Vec::new(),
            beyond_overflow: false,
        };
        let clusters = self.file_len.div_ceil(self.cluster_size);
        if !refs.grow(clusters) {
            return Err(self.no_memory(clusters));
        }
        Ok(refs)
    }

    fn no_memory(&self, clusters: u64) -> Error {
        Error::NoSpace {
            path: self.file.path().to_path_buf(),
            reason: format!("cannot hold refcounts of {clusters} clusters in memory"),
        }
    }

    /// Adds `times` references to every cluster touched by `[offset, offset + size)`.
    /// A range ending a cluster or more past the end of the file, and every increment past
    /// the refcount width, is a corruption (QEMU's `qcow2_inc_refcounts_imrt`).
    fn inc(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        offset: u64,
        size: u64,
        times: u64,
    ) -> Result<()> {
        if size == 0 || times == 0 {
            return Ok(());
        }
        let end = match offset.checked_add(size) {
            Some(end) if end < self.file_len.saturating_add(self.cluster_size) => end,
            end => {
                res.corruptions += times;
                note(res, || {
                    format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
                )
                });
                if refs.beyond.len() < MAX_BEYOND_RANGES {
                    let first = offset >> self.cluster_bits;
                    let last = end.map_or(first, |e| (e - 1) >> self.cluster_bits);
                    refs.beyond.push((first, last.saturating_add(1)));
                } else {
                    refs.beyond_overflow = true;
                }
                return Ok(());
            }
        };
        let first = offset >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        if !refs.grow(last + 1) {
            return Err(self.no_memory(last + 1));
        }
        let max = max_refcount(self.order);
        for cluster in first..=last {
            let current = refs.get(cluster);
            let add = times.min(max - current);
            if add < times {
                res.corruptions += times - add;
                note(res, || {
                    format!(
                        "ERROR: overflow cluster offset={:#x} (refcount_bits {})",
                        cluster << self.cluster_bits,
                        1u32 << self.order
                    )
                });
            }
            if add > 0 {
                refs.set(cluster, current + add);
            }
        }
        Ok(())
    }

    /// Counts everything but the refcount structures: header, active L1 and its tables,
    /// snapshots, snapshot table, bitmaps.
    fn walk_metadata(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        fix: RepairMode,
    ) -> Result<()> {
        self.inc(refs, res, 0, self.cluster_size, 1)?;
        self.walk_active(refs, res, fix)?;
        self.walk_snapshots(refs, res, fix)?;
        self.inc(
            refs,
            res,
            self.header.snapshots_offset,
            self.snapshots_size,
            1,
        )?;
        self.walk_bitmaps(refs, res)
    }

    /// Counts an L1 entry's L2 table; returns the L2 offset to walk.
    fn l1_entry(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        entry: u64,
        times: u64,
    ) -> Result<u64> {
        if entry & L1_RESERVED != 0 {
            res.corruptions += times;
            note(res, || {
                format!("ERROR found L1 entry with reserved bits set: {entry:x}")
            });
        }
        let l2_offset = entry & OFFSET_MASK;
        self.inc(refs, res, l2_offset, self.cluster_size, times)?;
        if l2_offset % self.cluster_size != 0 {
            res.corruptions += times;
            note(res, || {
                format!("ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            });
        }
        Ok(l2_offset)
    }

    fn walk_active(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        fix: RepairMode,
    ) -> Result<()> {
        let l1_size = u64::from(self.header.l1_size);
        if l1_size == 0 {
            return Ok(());
        }
        let l1_offset = self.header.l1_table_offset;
        self.inc(refs, res, l1_offset, l1_size * 8, 1)?;
        for entry in self.read_entries(l1_offset, l1_size)? {
            if entry == 0 {
                continue;
            }
            let l2_offset = self.l1_entry(refs, res, entry, 1)?;
            self.walk_l2(refs, res, l2_offset, 1, true, fix)?;
        }
        Ok(())
    }

    /// Snapshot L1 tables mostly share their L2 tables: each distinct table is walked once
    /// with the number of L1 entries naming it, which counts exactly what QEMU's one walk
    /// per reference counts (overflow and per-entry errors are multiplied alike).
    fn walk_snapshots(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        fix: RepairMode,
    ) -> Result<()> {
        let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
        for (k, sn) in self.snapshots.iter().enumerate() {
            let l1_offset = sn.l1_table_offset;
            if l1_offset % self.cluster_size != 0 {
                res.corruptions += 1;
                note(res, || {
                    format!(
                    "ERROR snapshot {k} l1_offset={l1_offset:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                });
                continue;
            }
            let l1_size = u64::from(sn.l1_size);
            if l1_size > MAX_L1_BYTES / 8 {
                res.corruptions += 1;
                note(res, || {
                    format!(
                    "ERROR snapshot {k} l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"
                )
                });
                continue;
            }
            if l1_size == 0 {
                continue;
            }
            self.inc(refs, res, l1_offset, l1_size * 8, 1)?;
            if l1_offset > MAX_OFFSET - l1_size * 8 {
                res.check_errors += 1;
                note(res, || {
                    format!(
                    "ERROR: I/O error in check_refcounts_l1: snapshot {k} L1 table at {l1_offset:#x}"
                )
                });
                continue;
            }
            for entry in self.read_entries(l1_offset, l1_size)? {
                if entry == 0 {
                    continue;
                }
                let l2_offset = self.l1_entry(refs, res, entry, 1)?;
                *pending.entry(l2_offset).or_insert(0) += 1;
            }
            if pending.len() > MAX_PENDING_L2 {
                for (l2_offset, times) in std::mem::take(&mut pending) {
                    self.walk_l2(refs, res, l2_offset, times, false, fix)?;
                }
            }
        }
        for (l2_offset, times) in pending {
            self.walk_l2(refs, res, l2_offset, times, false, fix)?;
        }
        Ok(())
    }

    /// Counts the clusters one L2 table references, `times` over; `active` collects
    /// allocation statistics (QEMU's CHECK_FRAG_INFO, set for the active L1 only).
    fn walk_l2(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        l2_offset: u64,
        times: u64,
        active: bool,
        fix: RepairMode,
    ) -> Result<()> {
        if l2_offset >= self.file_len {
            // Reads as zeroes: nothing allocated.
            return Ok(());
        }
        let entries = self.read_entries(l2_offset, self.cluster_size / 8)?;
        // QEMU measures fragmentation within one L2 table at a time.
        let mut next_contiguous = 0u64;
        for (i, &entry) in entries.iter().enumerate() {
            if entry & OFLAG_COMPRESSED != 0 {
                if entry & OFLAG_COPIED != 0 {
                    res.corruptions += times;
                    note(res, || {
                        format!(
                        "ERROR: compressed L2 entry {entry:#x}: copied flag must never be set for compressed clusters"
                    )
                    });
                }
                let extent = decode_l2(
                    entry & !OFLAG_COPIED,
                    self.cluster_bits,
                    self.header.version,
                )
                .ok()
                .and_then(|m| m.host_extent(self.cluster_size));
                if let Some((start, len)) = extent {
                    self.inc(refs, res, start, len, times)?;
                }
                if active {
                    // Compressed clusters count as fragmented by nature (sector granularity).
                    res.allocated_clusters += 1;
                    res.compressed_clusters += 1;
                    res.fragmented_clusters += 1;
                }
                continue;
            }
            if entry & L2_RESERVED != 0 {
                res.corruptions += times;
                note(res, || {
                    format!("ERROR found l2 entry with reserved bits set: {entry:x}")
                });
            }
            let offset = entry & OFFSET_MASK;
            if offset == 0 {
                // Unallocated, or zero without a preallocated cluster.
                continue;
            }
            if offset % self.cluster_size != 0 {
                res.corruptions += times;
                if entry & OFLAG_ZERO == 0 {
                    note(res, || {
                        format!(
                        "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                    )
                    });
                } else {
                    let repair = fix == RepairMode::All;
                    note(res, || {
                        format!(
                        "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        if repair { "Repairing" } else { "ERROR" }
                    )
                    });
                    if repair {
                        // It reads as zeroes anyway: drop the bogus preallocation.
                        let at = l2_offset + i as u64 * 8;
                        if self.overlaps_metadata(at, 8)? {
                            res.check_errors += 1;
                            note(res, || {
                                format!(
                                "ERROR: L2 entry at {at:#x} overlaps other metadata; not rewriting it"
                            )
                            });
                        } else {
                            self.file.write_at(&OFLAG_ZERO.to_be_bytes(), at)?;
                            self.file.sync()?;
                            res.corruptions -= times;
                            res.corruptions_fixed += 1;
                            continue;
                        }
                    }
                }
            }
            if active {
                res.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    res.fragmented_clusters += 1;
                }
                next_contiguous = offset + self.cluster_size;
            }
            self.inc(refs, res, offset, self.cluster_size, times)?;
        }
        Ok(())
    }

    /// Persistent bitmaps: directory, bitmap tables and their data clusters.
    fn walk_bitmaps(&self, refs: &mut RefArray, res: &mut CheckReport) -> Result<()> {
        let Some(bm) = &self.bitmaps else {
            return Ok(());
        };
        if bm.count == 0 {
            return Ok(());
        }
        self.inc(refs, res, bm.directory_offset, bm.directory_size, 1)?;
        let mut dir = vec![0u8; bm.directory_size as usize];
        self.read_bytes(&mut dir, bm.directory_offset)?;
        let mut at = 0usize;
        for k in 0..bm.count {
            if at + 24 > dir.len() {
                res.corruptions += 1;
                note(res, || {
                    format!("ERROR bitmap directory entry {k} runs past the directory")
                });
                return Ok(());
            }
            let table_offset = be64(&dir, at);
            let table_size = u64::from(be32(&dir, at + 8));
            let name_size = usize::from(be16(&dir, at + 18));
            let extra_size = be32(&dir, at + 20) as usize;
            at = (at + 24 + extra_size + name_size).next_multiple_of(8);
            if table_size > MAX_BITMAP_TABLE_ENTRIES
                || table_offset % self.cluster_size != 0
                || table_offset > MAX_OFFSET
            {
                res.corruptions += 1;
                note(res, || {
                    format!(
                    "ERROR bitmap {k}: table at {table_offset:#x} with {table_size} entries is invalid"
                )
                });
                continue;
            }
            self.inc(refs, res, table_offset, table_size * 8, 1)?;
            let mut done = 0u64;
            while done < table_size {
                let start = table_offset.saturating_add(done * 8);
                if start >= self.file_len {
                    break;
                }
                let n = (table_size - done).min(BITMAP_TABLE_CHUNK);
                for entry in self.read_entries(start, n)? {
                    let offset = entry & OFFSET_MASK;
                    let bad = entry & BME_RESERVED != 0
                        || (offset != 0
                            && (entry & BME_ALL_ONES != 0 || offset % self.cluster_size != 0));
                    if bad {
                        res.corruptions += 1;
                        note(res, || {
                            format!("ERROR bitmap {k}: invalid bitmap table entry {entry:#x}")
                        });
                        continue;
                    }
                    if offset != 0 {
                        self.inc(refs, res, offset, self.cluster_size, 1)?;
                    }
                }
                done += n;
            }
        }
        Ok(())
    }

    /// Whether rewriting `[offset, offset+len)` would clobber metadata other than L2 tables
    /// (QEMU's pre-write overlap check, minus the expensive L2 part).
    fn overlaps_metadata(&self, offset: u64, len: u64) -> Result<bool> {
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

    /// Everything QEMU's `calculate_refcounts` counts, including the refcount table and
    /// blocks; sets `rebuild` when the refcount structure itself is broken.
    fn calculate(
        &self,
        res: &mut CheckReport,
        fix: RepairMode,
        rebuild: &mut bool,
    ) -> Result<RefArray> {
        let mut refs = self.new_refs()?;
        self.walk_metadata(&mut refs, res, fix)?;
        self.inc(
            &mut refs,
            res,
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * self.cluster_size,
            1,
        )?;
        self.check_refblocks(&mut refs, res, fix, rebuild)?;
        Ok(refs)
    }

    /// QEMU's `check_refblocks`: counts every refcount block, which must be referenced
    /// exactly once.
    fn check_refblocks(
        &self,
        refs: &mut RefArray,
        res: &mut CheckReport,
        fix: RepairMode,
        rebuild: &mut bool,
    ) -> Result<()> {
        for (i, raw) in self.reftable()?.into_iter().enumerate() {
            let offset = raw & !REFT_RESERVED;
            if raw & REFT_RESERVED != 0 {
                res.corruptions += 1;
                *rebuild = true;
                note(res, || {
                    format!("ERROR refcount table entry {i} has reserved bits set")
                });
                continue;
            }
            if offset % self.cluster_size != 0 {
                res.corruptions += 1;
                *rebuild = true;
                note(res, || {
                    format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                )
                });
                continue;
            }
            if offset == 0 {
                continue;
            }
            let cluster = offset >> self.cluster_bits;
            if cluster >= refs.len() {
                // QEMU extends the file to cover the block; snapvmm rebuilds the refcount
                // structure instead, which also fixes it and does not trust the block.
                res.corruptions += 1;
                let repair = fix == RepairMode::All;
                if repair {
                    *rebuild = true;
                }
                note(res, || {
                    format!(
                        "{} refcount block {i} is outside image",
                        if repair { "Repairing" } else { "ERROR" }
                    )
                });
                continue;
            }
            self.inc(refs, res, offset, self.cluster_size, 1)?;
            let count = refs.get(cluster);
            if count != 1 {
                res.corruptions += 1;
                *rebuild = true;
                note(res, || format!("ERROR refcount block {i} refcount={count}"));
            }
        }
        Ok(())
    }

    /// QEMU's `compare_refcounts`: the on-disk refcount of every cluster against `refs`,
    /// fixing what `fix` allows. Returns the highest cluster in use.
    fn compare(
        &self,
        refs: &RefArray,
        res: &mut CheckReport,
        fix: RepairMode,
        rebuild: &mut bool,
    ) -> Result<u64> {
        let table = self.reftable()?;
        let cs = self.cluster_size;
        let per_block = self.per_block();
        let clusters = refs.len();
        let mut highest = 0u64;
        let mut wrote = false;
        let mut block = vec![0u8; cs as usize];
        for b in 0..clusters.div_ceil(per_block) {
            let raw = table.get(b as usize).copied().unwrap_or(0);
            let offset = raw & !REFT_RESERVED;
            let readable = offset % cs == 0 && offset <= MAX_OFFSET;
            if offset != 0 && readable {
                read_zero_padded(self.file, self.file_len, &mut block, offset)?;
            } else {
                block.fill(0);
            }
            let mut dirty = false;
            let first = b * per_block;
            for cluster in first..clusters.min(first + per_block) {
                if !readable {
                    res.check_errors += 1;
                    note(res, || {
                        format!(
                        "Can't get refcount for cluster {cluster}: Input/output error (refcount block offset {offset:#x})"
                    )
                    });
                    continue;
                }
                let on_disk = entry_get(self.order, &block, cluster - first);
                let expected = refs.get(cluster);
                if on_disk > 0 || expected > 0 {
                    highest = cluster;
                }
                if on_disk == expected {
                    continue;
                }
                let fixable = if on_disk == 0 {
                    // No refcount block, or a zero entry, for a used cluster: only a new
                    // refcount structure can fix it.
                    *rebuild = true;
                    false
                } else if on_disk > expected {
                    fix != RepairMode::None
                } else {
                    fix == RepairMode::All
                };
                note(res, || {
                    format!(
                        "{} cluster {cluster} refcount={on_disk} reference={expected}",
                        if fixable {
                            "Repairing"
                        } else if on_disk < expected {
                            "ERROR"
                        } else {
                            "Leaked"
                        }
                    )
                });
                if fixable {
                    entry_set(self.order, &mut block, cluster - first, expected);
                    dirty = true;
                    if on_disk > expected {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                } else if on_disk < expected {
                    res.corruptions += 1;
                } else {
                    res.leaks += 1;
                }
            }
            if dirty {
                self.file.write_at(&block, offset)?;
                wrote = true;
            }
        }
        if wrote {
            self.file.sync()?;
        }
        Ok(highest)
    }

    /// QEMU's `check_oflag_copied`: on the active L1 and its L2 tables, COPIED must be set
    /// exactly when the on-disk refcount is 1.
    fn check_copied(&self, res: &mut CheckReport, fix: RepairMode) -> Result<()> {
        let repair = match fix {
            RepairMode::All => true,
            // Safe only if the refcounts were found (or made) right.
            RepairMode::Leaks => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
            RepairMode::None => false,
        };
        let label = if repair { "Repairing" } else { "ERROR" };
        let mut lookup = RefLookup {
            file: self.file,
            file_len: self.file_len,
            cluster_size: self.cluster_size,
            order: self.order,
            table: self.reftable()?,
            cache: HashMap::new(),
            cached_bytes: 0,
        };
        let l1_offset = self.header.l1_table_offset;
        let l1 = self.read_entries(l1_offset, u64::from(self.header.l1_size))?;
        let mut wrote = false;
        for (i, &entry) in l1.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if let Some(count) = lookup.get(l2_offset >> self.cluster_bits)? {
                if (count == 1) != (entry & OFLAG_COPIED != 0) {
                    note(res, || {
                        format!(
                        "{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={count}"
                    )
                    });
                    if repair {
                        let fixed = if count == 1 {
                            entry | OFLAG_COPIED
                        } else {
                            entry & !OFLAG_COPIED
                        };
                        self.file
                            .write_at(&fixed.to_be_bytes(), l1_offset + i as u64 * 8)?;
                        wrote = true;
                        res.corruptions_fixed += 1;
                    } else {
                        res.corruptions += 1;
                    }
                }
            }
            if l2_offset >= self.file_len {
                continue;
            }
            let mut entries = self.read_entries(l2_offset, self.cluster_size / 8)?;
            let mut dirty = 0u64;
            for e in entries.iter_mut() {
                let entry = *e;
                let offset = entry & OFFSET_MASK;
                if entry & OFLAG_COMPRESSED != 0 || offset == 0 {
                    continue;
                }
                let Some(count) = lookup.get(offset >> self.cluster_bits)? else {
                    continue;
                };
                if (count == 1) != (entry & OFLAG_COPIED != 0) {
                    note(res, || {
                        format!("{label} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={count}")
                    });
                    if repair {
                        *e = if count == 1 {
                            entry | OFLAG_COPIED
                        } else {
                            entry & !OFLAG_COPIED
                        };
                        dirty += 1;
                    } else {
                        res.corruptions += 1;
                    }
                }
            }
            if dirty > 0 {
                if self.overlaps_metadata(l2_offset, self.cluster_size)? {
                    res.check_errors += 1;
                    res.corruptions += dirty;
                    note(res, || {
                        format!(
                        "ERROR: Could not write L2 table at {l2_offset:#x}: it overlaps other metadata"
                    )
                    });
                    break;
                }
                let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.file.write_at(&raw, l2_offset)?;
                wrote = true;
                res.corruptions_fixed += dirty;
            }
        }
        if wrote {
            self.file.sync()?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_refcounts`. Returns false when the check had to stop (a
    /// rebuild is needed but not allowed).
    fn check_refcounts(&mut self, res: &mut CheckReport, fix: RepairMode) -> Result<bool> {
        let clusters = self.file_len.div_ceil(self.cluster_size);
        if clusters > i32::MAX as u64 {
            res.check_errors += 1;
            note(res, || {
                format!("ERROR image file has {clusters} clusters, too many to check")
            });
            return Ok(false);
        }
        // QEMU's total_sectors truncates the virtual size to whole sectors.
        res.total_clusters = (self.header.size / 512 * 512).div_ceil(self.cluster_size);
        let mut rebuild = false;
        let mut refs = self.calculate(res, fix, &mut rebuild)?;
        let before_compare = res.clone();
        let mut highest = self.compare(&refs, res, RepairMode::None, &mut rebuild)?;
        if rebuild && fix == RepairMode::All {
            let old = res.clone();
            note(res, || "Rebuilding refcount structure".into());
            let mut fresh = self.new_refs()?;
            let mut scratch = CheckReport::default();
            self.walk_metadata(&mut fresh, &mut scratch, RepairMode::None)?;
            self.write_new_structure(&mut fresh)?;
            // The references are counted again against the new structure.
            res.corruptions = 0;
            res.leaks = 0;
            let mut still_broken = false;
            refs = self.calculate(res, RepairMode::None, &mut still_broken)?;
            let mut fresh_res = CheckReport::default();
            highest = self.compare(&refs, &mut fresh_res, RepairMode::Leaks, &mut still_broken)?;
            if still_broken {
                note(res, || {
                    "ERROR rebuilt refcount structure is still broken".into()
                });
            }
            for m in fresh_res.messages {
                note(res, || m);
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_res.leaks;
        } else if fix != RepairMode::None {
            if rebuild {
                res.check_errors += 1;
                note(res, || {
                    "ERROR need to rebuild refcount structures (repair all)".into()
                });
                res.image_end_offset = (highest + 1) * self.cluster_size;
                return Ok(false);
            }
            if res.leaks > 0 || res.corruptions > 0 {
                *res = before_compare;
                highest = self.compare(&refs, res, fix, &mut rebuild)?;
            }
        }
        self.check_copied(res, fix)?;
        res.image_end_offset = (highest + 1) * self.cluster_size;
        Ok(true)
    }

    /// Clears the dirty and corrupt bits once a repair left nothing wrong (QEMU's
    /// `qcow2_mark_clean` and `qcow2_mark_consistent`).
    fn mark_clean(&mut self) -> Result<()> {
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.file.sync()?;
        self.header.incompatible_features &= !bits;
        super::image::write_header(self.file, &mut self.header)?;
        self.file.sync()
    }

    /// Writes a refcount table and blocks holding `refs` (which must count everything but
    /// refcount structures) plus the new structures themselves, and points the header at
    /// them. The new clusters are free in `refs` and outside the old refcount table and
    /// blocks, so until the header is written the old structure stays intact.
    fn write_new_structure(&mut self, refs: &mut RefArray) -> Result<()> {
        let cs = self.cluster_size;
        let per_block = self.per_block();
        let limit = refs.len();
        // Old refcount structures inside the file must survive until the header switch.
        let mut reserved = BTreeSet::new();
        let table_first = self.header.refcount_table_offset >> self.cluster_bits;
        for c in table_first..table_first + u64::from(self.header.refcount_table_clusters) {
            if c < limit {
                reserved.insert(c);
            }
        }
        for raw in self.reftable()? {
            let offset = raw & !REFT_RESERVED;
            if offset == 0 {
                continue;
            }
            for c in [
                offset >> self.cluster_bits,
                offset.saturating_add(cs - 1) >> self.cluster_bits,
            ] {
                if c < limit {
                    reserved.insert(c);
                }
            }
        }
        let is_free = |refs: &RefArray, c: u64| refs.get(c) == 0 && !reserved.contains(&c);
        // Outside the file, keep clear of every table the header names and of whatever
        // entries reference there (uncounted corruptions): a refcount block placed there
        // would later be read, or written, as one of them.
        if refs.beyond_overflow {
            return Err(Error::invalid(
                self.file.path(),
                "too many references past the end of the file to place a new refcount structure safely",
            ));
        }
        let cb = self.cluster_bits;
        let mut avoid = refs.beyond.clone();
        let mut keep_clear = |offset: u64, len: u64| {
            if len > 0 {
                let last = offset.saturating_add(len - 1) >> cb;
                avoid.push((offset >> cb, last.saturating_add(1)));
            }
        };
        let h = &self.header;
        keep_clear(h.l1_table_offset, u64::from(h.l1_size) * 8);
        keep_clear(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        keep_clear(h.snapshots_offset, self.snapshots_size);
        for sn in &self.snapshots {
            keep_clear(sn.l1_table_offset, u64::from(sn.l1_size) * 8);
        }
        if let Some(b) = &self.bitmaps {
            keep_clear(b.directory_offset, b.directory_size);
        }
        for raw in self.reftable()? {
            if raw & !REFT_RESERVED != 0 {
                keep_clear(raw & !REFT_RESERVED, cs);
            }
        }
        let max_cluster = MAX_OFFSET >> cb;
        // First fit of `need` clusters, everything from `limit` on being free in `refs`.
        let place = |refs: &RefArray, need: u64| -> Option<u64> {
            let mut from = 1u64;
            loop {
                let mut start = from;
                let mut c = from;
                while c - start < need && c < limit {
                    if !is_free(refs, c) {
                        start = c + 1;
                    }
                    c += 1;
                }
                if start > max_cluster.saturating_sub(need) {
                    return None;
                }
                match avoid
                    .iter()
                    .filter(|&&(a, b)| a < start + need && start < b)
                    .map(|&(_, b)| b)
                    .max()
                {
                    Some(b) => from = b,
                    None => return Some(start),
                }
            }
        };
        // Blocks are needed wherever a cluster is in use; then find room for the table and
        // the blocks, which may need blocks of their own: repeat until nothing changes.
        let mut blocks: BTreeSet<u64> = (0..limit.div_ceil(per_block))
            .filter(|&b| refs.block_bytes(b, cs).iter().any(|&x| x != 0))
            .collect();
        let (start, table_clusters) = loop {
            let entries = blocks.last().map_or(1, |&b| b + 1);
            let table_clusters = (entries * 8).div_ceil(cs);
            if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
                return Err(Error::NoSpace {
                    path: self.file.path().to_path_buf(),
                    reason: "a rebuilt refcount table would exceed 8 MiB".into(),
                });
            }
            let need = table_clusters + blocks.len() as u64;
            let Some(start) = place(refs, need) else {
                return Err(Error::NoSpace {
                    path: self.file.path().to_path_buf(),
                    reason: "no room for a rebuilt refcount structure".into(),
                });
            };
            let before = blocks.len();
            blocks.extend((start..start + need).map(|c| c / per_block));
            if blocks.len() == before {
                break (start, table_clusters);
            }
        };
        let total = table_clusters + blocks.len() as u64;
        if !refs.grow(start + total) {
            return Err(self.no_memory(start + total));
        }
        for c in start..start + total {
            refs.set(c, 1);
        }
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        let mut data = vec![0u8; cs as usize];
        for (k, &b) in blocks.iter().enumerate() {
            let at = (start + table_clusters + k as u64) * cs;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
            let bytes = refs.block_bytes(b, cs);
            data.fill(0);
            data[..bytes.len()].copy_from_slice(bytes);
            self.file.write_at(&data, at)?;
        }
        self.file.write_at(&table, start * cs)?;
        self.file.sync()?;
        // Switch to the new structure with one 12-byte write of refcount_table_offset and
        // refcount_table_clusters (header bytes 48..60), as QEMU does: it cannot tear, and
        // it leaves every other header byte exactly as it was.
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&(start * cs).to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.file.write_at(&fields, 48)?;
        self.file.sync()?;
        self.header.refcount_table_offset = start * cs;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.file_len = self.file.len()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// qemu-img and qemu-io are the reference; without them the tests have nothing to
    /// compare against.
    fn qemu_available() -> bool {
        ["qemu-img", "qemu-io"].iter().all(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    macro_rules! require_qemu {
        () => {
            if !qemu_available() {
                eprintln!("skipped: qemu-img / qemu-io not installed");
                return;
            }
        };
    }

    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create(dir: &Path, name: &str, options: &str, size: &str) -> PathBuf {
        let path = dir.join(name);
        let p = path.to_str().expect("utf-8 path");
        if options.is_empty() {
            run("qemu-img", &["create", "-q", "-f", "qcow2", p, size]);
        } else {
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", options, p, size],
            );
        }
        path
    }

    fn io(path: &Path, commands: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in commands {
            args.push("-c");
            args.push(c);
        }
        args.push(path.to_str().expect("utf-8 path"));
        run("qemu-io", &args);
    }

    fn snapshot(path: &Path, name: &str) {
        run(
            "qemu-img",
            &["snapshot", "-c", name, path.to_str().expect("utf-8 path")],
        );
    }

    /// The numbers both tools report.
    #[derive(Debug, PartialEq, Eq)]
    struct Counts {
        corruptions: u64,
        leaks: u64,
        check_errors: u64,
        image_end_offset: u64,
        total_clusters: u64,
        allocated_clusters: u64,
        fragmented_clusters: u64,
        compressed_clusters: u64,
    }

    /// A field of qemu-img's flat JSON object; absent fields are 0, as qemu-img omits them.
    fn json_u64(json: &str, key: &str) -> u64 {
        let needle = format!("\"{key}\":");
        let Some(at) = json.find(&needle) else {
            return 0;
        };
        json[at + needle.len()..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("{key} in {json}"))
    }

    fn qemu_check(path: &Path) -> Counts {
        let out = Command::new("qemu-img")
            .args(["check", "--output", "json", "-f", "qcow2"])
            .arg(path)
            .output()
            .expect("qemu-img check");
        let json = String::from_utf8_lossy(&out.stdout);
        assert!(
            json.contains("image-end-offset") || json.contains("check-errors"),
            "qemu-img check failed: {json}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Counts {
            corruptions: json_u64(&json, "corruptions"),
            leaks: json_u64(&json, "leaks"),
            check_errors: json_u64(&json, "check-errors"),
            image_end_offset: json_u64(&json, "image-end-offset"),
            total_clusters: json_u64(&json, "total-clusters"),
            allocated_clusters: json_u64(&json, "allocated-clusters"),
            fragmented_clusters: json_u64(&json, "fragmented-clusters"),
            compressed_clusters: json_u64(&json, "compressed-clusters"),
        }
    }

    fn counts(r: &CheckReport) -> Counts {
        Counts {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            image_end_offset: r.image_end_offset,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
        }
    }

    /// Our read-only check reports what qemu-img reports.
    fn assert_matches_qemu(path: &Path) -> CheckReport {
        let ours = check(path, RepairMode::None).expect("check");
        assert_eq!(
            counts(&ours),
            qemu_check(path),
            "messages: {:#?}",
            ours.messages
        );
        ours
    }

    fn assert_qemu_clean(path: &Path) {
        let c = qemu_check(path);
        assert_eq!(
            (c.corruptions, c.leaks, c.check_errors),
            (0, 0, 0),
            "qemu-img check of {}: {c:?}",
            path.display()
        );
    }

    /// Repairs a copy of `path` with `mode` and returns the copy and the report, after
    /// checking that qemu-img agrees with the report on what is left, and that
    /// `qemu-img check -r` on another copy fixes and leaves the same numbers.
    fn repair_copy(path: &Path, mode: RepairMode) -> (PathBuf, CheckReport) {
        repair_copy_as(path, mode, true)
    }

    /// `repair_copy`, optionally without comparing with what `qemu-img check -r` fixes
    /// (for the cases where snapvmm deliberately repairs differently).
    fn repair_copy_as(path: &Path, mode: RepairMode, like_qemu: bool) -> (PathBuf, CheckReport) {
        let copy = path.with_extension(format!("{mode:?}.qcow2"));
        std::fs::copy(path, &copy).expect("copy");
        let report = check(&copy, mode).expect("repair");
        let theirs = qemu_check(&copy);
        assert_eq!(
            counts(&report),
            theirs,
            "after {mode:?}: {:#?}",
            report.messages
        );
        if !like_qemu {
            return (copy, report);
        }
        let reference = path.with_extension(format!("{mode:?}-qemu.qcow2"));
        std::fs::copy(path, &reference).expect("copy");
        let out = Command::new("qemu-img")
            .args(["check", "--output", "json", "-f", "qcow2", "-r"])
            .arg(if mode == RepairMode::All {
                "all"
            } else {
                "leaks"
            })
            .arg(&reference)
            .output()
            .expect("qemu-img check -r");
        let json = String::from_utf8_lossy(&out.stdout);
        if json.contains("image-end-offset") {
            let fixed = (
                json_u64(&json, "leaks-fixed"),
                json_u64(&json, "corruptions-fixed"),
            );
            assert_eq!(
                (report.leaks_fixed, report.corruptions_fixed),
                fixed,
                "fixed counts after {mode:?}: {json} vs {:#?}",
                report.messages
            );
            let left = counts(&report);
            assert_eq!(
                (left.corruptions, left.leaks, left.check_errors),
                (
                    json_u64(&json, "corruptions"),
                    json_u64(&json, "leaks"),
                    json_u64(&json, "check-errors")
                ),
                "left after {mode:?}: {json}"
            );
        }
        (copy, report)
    }

    fn header_of(path: &Path) -> Header {
        let f = ImageFile::open(path, true, false).expect("open");
        read_header(&f).expect("header")
    }

    fn read_u64(path: &Path, offset: u64) -> u64 {
        let f = ImageFile::open(path, true, false).expect("open");
        let mut b = [0u8; 8];
        f.read_at(&mut b, offset).expect("read");
        u64::from_be_bytes(b)
    }

    fn write_u64(path: &Path, offset: u64, value: u64) {
        let f = ImageFile::open(path, false, false).expect("open");
        f.write_at(&value.to_be_bytes(), offset).expect("write");
    }

    /// Byte offset of the refcount block covering `cluster`, and the index inside it.
    fn refblock_of(path: &Path, cluster: u64) -> (u64, u64) {
        let h = header_of(path);
        let per = (h.cluster_size() * 8) >> h.refcount_order;
        let block = read_u64(path, h.refcount_table_offset + cluster / per * 8) & !REFT_RESERVED;
        assert_ne!(block, 0, "no refcount block for cluster {cluster}");
        (block, cluster % per)
    }

    fn get_refcount(path: &Path, cluster: u64) -> u64 {
        let h = header_of(path);
        let (block, index) = refblock_of(path, cluster);
        let f = ImageFile::open(path, true, false).expect("open");
        let mut data = vec![0u8; h.cluster_size() as usize];
        f.read_at(&mut data, block).expect("read");
        entry_get(h.refcount_order, &data, index)
    }

    fn set_refcount(path: &Path, cluster: u64, value: u64) {
        let h = header_of(path);
        let (block, index) = refblock_of(path, cluster);
        let f = ImageFile::open(path, false, false).expect("open");
        let mut data = vec![0u8; h.cluster_size() as usize];
        f.read_at(&mut data, block).expect("read");
        entry_set(h.refcount_order, &mut data, index, value);
        f.write_at(&data, block).expect("write");
    }

    /// File offsets of the L1 entry and the L2 entry mapping `guest_offset`.
    fn entries_of(path: &Path, guest_offset: u64) -> (u64, u64) {
        let h = header_of(path);
        let cluster = guest_offset >> h.cluster_bits;
        let l1_at = h.l1_table_offset + cluster / h.l2_entries() * 8;
        let l2 = read_u64(path, l1_at) & OFFSET_MASK;
        assert_ne!(l2, 0, "guest offset {guest_offset:#x} has no L2 table");
        (l1_at, l2 + cluster % h.l2_entries() * 8)
    }

    /// Host cluster index of the data at `guest_offset`.
    fn host_cluster(path: &Path, guest_offset: u64) -> u64 {
        let (_, l2_at) = entries_of(path, guest_offset);
        (read_u64(path, l2_at) & OFFSET_MASK) >> header_of(path).cluster_bits
    }

    /// Appends a cluster to the file with refcount 1 that nothing references.
    fn append_leaked_cluster(path: &Path) -> u64 {
        let cs = header_of(path).cluster_size();
        let len = std::fs::metadata(path).expect("stat").len();
        let cluster = len.div_ceil(cs);
        let f = ImageFile::open(path, false, false).expect("open");
        f.write_at(&vec![0x5a; cs as usize], cluster * cs)
            .expect("write");
        drop(f);
        set_refcount(path, cluster, 1);
        cluster
    }

    /// A small image with scattered, out-of-order writes (so some fragmentation).
    fn populated(dir: &Path, name: &str, options: &str, unit: u64) -> PathBuf {
        let size = (256 * unit).max(64 << 20).to_string();
        let path = create(dir, name, options, &size);
        let cmds: Vec<String> = [5u64, 0, 1, 2, 9, 3, 200, 40]
            .iter()
            .map(|k| format!("write -P {} {} {}", 0x10 + k, k * unit, unit))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        io(&path, &cmds);
        path
    }

    #[test]
    fn entry_encoding_round_trips_every_width() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 64];
            let max = max_refcount(order);
            let count = (64 * 8) >> order;
            for i in 0..count {
                entry_set(order, &mut data, i, (i * 7 + 1) & max);
            }
            for i in 0..count {
                assert_eq!(
                    entry_get(order, &data, i),
                    (i * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
        }
        // Sub-byte widths are packed from the least significant bit.
        let mut data = [0u8; 1];
        entry_set(0, &mut data, 1, 1);
        assert_eq!(data[0], 0b10);
        entry_set(2, &mut data, 1, 0xf);
        assert_eq!(data[0], 0xf2);
    }

    #[test]
    fn clean_image_matches_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "clean.qcow2", "", 64 << 10);
        io(
            &path,
            &["write -z 128M 64k", "write -z -u 0 64k"]
                .map(|c| c.replace("128M", "1M"))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let report = assert_matches_qemu(&path);
        assert!(report.is_clean(), "{report:?}");
        assert!(report.fragmented_clusters > 0, "{report:?}");
        let (_, repaired) = repair_copy(&path, RepairMode::All);
        assert_eq!((repaired.leaks_fixed, repaired.corruptions_fixed), (0, 0));
    }

    #[test]
    fn leak_is_reported_and_repaired() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "leak.qcow2", "", 64 << 10);
        append_leaked_cluster(&path);
        let report = assert_matches_qemu(&path);
        assert_eq!((report.leaks, report.corruptions), (1, 0));
        for mode in [RepairMode::Leaks, RepairMode::All] {
            let (copy, repaired) = repair_copy(&path, mode);
            assert_eq!(repaired.leaks_fixed, 1);
            assert!(repaired.is_clean(), "{repaired:?}");
            assert_qemu_clean(&copy);
        }
    }

    #[test]
    fn refcount_too_high_is_a_leak_and_a_copied_error() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "high.qcow2", "", 64 << 10);
        let cluster = host_cluster(&path, 0);
        set_refcount(&path, cluster, 2);
        let report = assert_matches_qemu(&path);
        assert_eq!((report.leaks, report.corruptions), (1, 1));
        for mode in [RepairMode::Leaks, RepairMode::All] {
            let (copy, repaired) = repair_copy(&path, mode);
            assert!(repaired.is_clean(), "{mode:?}: {repaired:?}");
            assert_qemu_clean(&copy);
        }
    }

    #[test]
    fn zero_refcount_needs_a_rebuild() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "zero.qcow2", "", 64 << 10);
        let cluster = host_cluster(&path, 64 << 10);
        set_refcount(&path, cluster, 0);
        let report = assert_matches_qemu(&path);
        assert_eq!(report.corruptions, 2, "{:#?}", report.messages);
        // Leaks only cannot rebuild: a check error, as in QEMU.
        let copy = path.with_extension("leaks.qcow2");
        std::fs::copy(&path, &copy).expect("copy");
        let leaks = check(&copy, RepairMode::Leaks).expect("check");
        assert_eq!(leaks.check_errors, 1, "{leaks:?}");
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert!(repaired.corruptions_fixed >= 1, "{repaired:?}");
        assert_qemu_clean(&copy);
        // The repaired image still reads back what was written.
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x11 64k 64k",
                copy.to_str().expect("utf-8"),
            ],
        );
    }

    #[test]
    fn refcount_too_low_with_snapshot_is_repaired() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "low.qcow2", "", 64 << 10);
        snapshot(&path, "s1");
        let cluster = host_cluster(&path, 0);
        assert_eq!(get_refcount(&path, cluster), 2);
        set_refcount(&path, cluster, 1);
        let report = assert_matches_qemu(&path);
        assert_eq!(report.corruptions, 2, "{:#?}", report.messages);
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_eq!(get_refcount(&copy, cluster), 2);
        assert_qemu_clean(&copy);
    }

    #[test]
    fn wrong_copied_flags_are_repaired() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "copied.qcow2", "", 64 << 10);
        let (l1_at, l2_at) = entries_of(&path, 0);
        write_u64(&path, l1_at, read_u64(&path, l1_at) & !OFLAG_COPIED);
        write_u64(&path, l2_at, read_u64(&path, l2_at) & !OFLAG_COPIED);
        let report = assert_matches_qemu(&path);
        assert_eq!(report.corruptions, 2);
        for mode in [RepairMode::Leaks, RepairMode::All] {
            let (copy, repaired) = repair_copy(&path, mode);
            assert_eq!(repaired.corruptions_fixed, 2, "{mode:?}");
            assert_qemu_clean(&copy);
        }
        // COPIED on a compressed entry is an error of its own.
        let path = populated(dir.path(), "copied2.qcow2", "", 64 << 10);
        let (_, l2_at) = entries_of(&path, 0);
        write_u64(&path, l2_at, read_u64(&path, l2_at) | (1 << 60));
        assert_eq!(assert_matches_qemu(&path).corruptions, 1);
    }

    #[test]
    fn internal_snapshots_match_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "snap.qcow2", "", 64 << 10);
        snapshot(&path, "s1");
        io(&path, &["write -P 0x77 0 128k", "write -P 0x78 10M 64k"]);
        snapshot(&path, "s2");
        io(&path, &["write -P 0x79 64k 64k", "discard 128k 64k"]);
        snapshot(&path, "s3");
        run(
            "qemu-img",
            &["snapshot", "-d", "s2", path.to_str().expect("utf-8")],
        );
        let report = assert_matches_qemu(&path);
        assert!(report.is_clean(), "{report:#?}");
        // A leaked cluster and a too-low shared refcount together.
        append_leaked_cluster(&path);
        let shared = host_cluster(&path, 5 << 16);
        let count = get_refcount(&path, shared);
        assert!(count >= 2, "cluster {shared} refcount {count}");
        set_refcount(&path, shared, count - 1);
        assert_matches_qemu(&path);
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_qemu_clean(&copy);
    }

    #[test]
    fn compressed_clusters_match_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path(), "src.qcow2", "", 64 << 10);
        let dst = dir.path().join("compressed.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                src.to_str().expect("utf-8"),
                dst.to_str().expect("utf-8"),
            ],
        );
        io(&dst, &["write -P 0x33 1M 64k"]);
        let report = assert_matches_qemu(&dst);
        assert!(report.compressed_clusters > 0, "{report:?}");
        snapshot(&dst, "s1");
        assert_matches_qemu(&dst);
        append_leaked_cluster(&dst);
        let (copy, _) = repair_copy(&dst, RepairMode::All);
        assert_qemu_clean(&copy);
    }

    #[test]
    fn refcount_widths_match_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        for bits in [1u32, 2, 4, 8, 32, 64] {
            let path = populated(
                dir.path(),
                &format!("rb{bits}.qcow2"),
                &format!("refcount_bits={bits}"),
                64 << 10,
            );
            assert!(assert_matches_qemu(&path).is_clean());
            if bits > 1 {
                snapshot(&path, "s1");
                io(&path, &["write -P 0x44 0 64k"]);
                assert!(assert_matches_qemu(&path).is_clean());
            }
            append_leaked_cluster(&path);
            let cluster = host_cluster(&path, 1 << 16);
            if bits > 1 {
                set_refcount(&path, cluster, 3);
            } else {
                set_refcount(&path, cluster, 0);
            }
            assert_matches_qemu(&path);
            let (copy, repaired) = repair_copy(&path, RepairMode::All);
            assert!(repaired.is_clean(), "refcount_bits={bits}: {repaired:#?}");
            assert_qemu_clean(&copy);
        }
    }

    #[test]
    fn cluster_sizes_match_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        for (cs, unit) in [(512u64, 512u64), (2 << 20, 2 << 20)] {
            let path = populated(
                dir.path(),
                &format!("cs{cs}.qcow2"),
                &format!("cluster_size={cs}"),
                unit,
            );
            assert!(assert_matches_qemu(&path).is_clean());
            snapshot(&path, "s1");
            io(&path, &[&format!("write -P 0x55 0 {unit}")]);
            assert!(assert_matches_qemu(&path).is_clean());
            append_leaked_cluster(&path);
            let (l1_at, _) = entries_of(&path, 0);
            write_u64(&path, l1_at, read_u64(&path, l1_at) ^ OFLAG_COPIED);
            assert_matches_qemu(&path);
            let (copy, repaired) = repair_copy(&path, RepairMode::All);
            assert!(repaired.is_clean(), "cluster_size={cs}: {repaired:#?}");
            assert_qemu_clean(&copy);
        }
    }

    #[test]
    fn version_2_images_match_qemu() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "v2.qcow2", "compat=0.10", 64 << 10);
        assert!(assert_matches_qemu(&path).is_clean());
        snapshot(&path, "s1");
        io(&path, &["write -P 0x66 0 192k"]);
        assert!(assert_matches_qemu(&path).is_clean());
        append_leaked_cluster(&path);
        set_refcount(&path, host_cluster(&path, 5 << 16), 0);
        assert_matches_qemu(&path);
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_eq!(header_of(&copy).version, 2);
        assert_qemu_clean(&copy);
    }

    #[test]
    fn persistent_bitmaps_are_counted() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create(dir.path(), "bitmap.qcow2", "", "64M");
        let p = path.to_str().expect("utf-8");
        run("qemu-img", &["bitmap", "--add", p, "b0"]);
        run("qemu-img", &["bitmap", "--add", "-g", "512", p, "b1"]);
        io(&path, &["write 0 4M", "write 32M 1M"]);
        let report = assert_matches_qemu(&path);
        assert!(report.is_clean(), "{report:#?}");
    }

    /// A crash with lazy refcounts leaves the dirty bit and refcounts that are too low.
    fn dirty_image(dir: &Path, name: &str) -> PathBuf {
        let path = create(dir, name, "lazy_refcounts=on", "64M");
        io(&path, &["write -P 0x21 0 256k"]);
        snapshot(&path, "s1");
        let status = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x22 64k 64k",
                "-c",
                "write -P 0x23 8M 128k",
                "-c",
                "sigraise 9",
            ])
            .arg(&path)
            .output()
            .expect("qemu-io");
        assert!(!status.status.success(), "qemu-io should have been killed");
        assert_ne!(header_of(&path).incompatible_features & INCOMPAT_DIRTY, 0);
        path
    }

    #[test]
    fn dirty_image_is_rebuilt_clean() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dirty_image(dir.path(), "dirty.qcow2");
        let report = assert_matches_qemu(&path);
        assert!(report.corruptions > 0, "{report:?}");

        let rebuilt = path.with_extension("rebuilt.qcow2");
        std::fs::copy(&path, &rebuilt).expect("copy");
        let file = ImageFile::open(&rebuilt, false, false).expect("open");
        let mut h = read_header(&file).expect("header");
        rebuild_refcounts(&file, &mut h).expect("rebuild");
        drop(file);
        assert_eq!(h.incompatible_features & INCOMPAT_DIRTY, 0);
        assert_eq!(header_of(&rebuilt), h);
        assert_qemu_clean(&rebuilt);
        assert!(check(&rebuilt, RepairMode::None).expect("check").is_clean());
        let r = rebuilt.to_str().expect("utf-8");
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x22 64k 64k",
                "-c",
                "read -P 0x23 8M 128k",
                r,
            ],
        );
        // Rebuilding twice in a row reuses the space of the first rebuild's old structure.
        let len = std::fs::metadata(&rebuilt).expect("stat").len();
        let file = ImageFile::open(&rebuilt, false, false).expect("open");
        rebuild_refcounts(&file, &mut h).expect("rebuild again");
        drop(file);
        assert_qemu_clean(&rebuilt);
        assert_eq!(std::fs::metadata(&rebuilt).expect("stat").len(), len);

        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_eq!(header_of(&copy).incompatible_features & INCOMPAT_DIRTY, 0);
        assert_qemu_clean(&copy);
    }

    #[test]
    fn opening_a_dirty_image_writable_rebuilds_it() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dirty_image(dir.path(), "open-dirty.qcow2");
        {
            let disk = crate::open(&path, &crate::OpenOptions::default()).expect("open");
            let mut buf = vec![0u8; 64 << 10];
            disk.read_at(&mut buf, 64 << 10).expect("read");
            assert!(buf.iter().all(|&b| b == 0x22));
            disk.write_at(&vec![0x24; 64 << 10], 16 << 20)
                .expect("write");
            disk.flush().expect("flush");
        }
        assert_eq!(header_of(&path).incompatible_features & INCOMPAT_DIRTY, 0);
        assert_qemu_clean(&path);
        let p = path.to_str().expect("utf-8");
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x24 16M 64k",
                "-c",
                "read -P 0x23 8M 128k",
                p,
            ],
        );
        run("qemu-img", &["snapshot", "-a", "s1", p]);
        run("qemu-io", &["-f", "qcow2", "-c", "read -P 0x21 0 256k", p]);
        assert_qemu_clean(&path);
    }

    #[test]
    fn broken_refcount_structures_are_rebuilt() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = populated(dir.path(), "broken.qcow2", "", 64 << 10);
        snapshot(&path, "s1");
        let h = header_of(&path);
        // The first refcount block pointed at twice.
        let first = read_u64(&path, h.refcount_table_offset);
        write_u64(&path, h.refcount_table_offset + 8, first);
        assert_matches_qemu(&path);
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_qemu_clean(&copy);

        // An unaligned refcount table entry.
        let path = populated(dir.path(), "unaligned.qcow2", "", 64 << 10);
        write_u64(&path, h.refcount_table_offset, first | 0x200);
        let theirs = qemu_check(&path);
        let ours = check(&path, RepairMode::None).expect("check");
        assert_eq!(ours.corruptions, theirs.corruptions, "{:#?}", ours.messages);
        let (copy, repaired) = repair_copy(&path, RepairMode::All);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert_qemu_clean(&copy);

        // A refcount block outside the file: QEMU grows the file to cover it (here to
        // 1 TiB); snapvmm rebuilds the refcount structure instead.
        let path = populated(dir.path(), "outside.qcow2", "", 64 << 10);
        write_u64(&path, h.refcount_table_offset + 16, 1 << 40);
        assert_matches_qemu(&path);
        let (copy, repaired) = repair_copy_as(&path, RepairMode::All, false);
        assert!(repaired.is_clean(), "{repaired:#?}");
        assert!(std::fs::metadata(&copy).expect("stat").len() < 1 << 30);
        assert_qemu_clean(&copy);
    }

    #[test]
    fn rebuild_refuses_corrupt_metadata() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dirty_image(dir.path(), "refuse.qcow2");
        let (_, l2_at) = entries_of(&path, 0);
        write_u64(&path, l2_at, (1 << 50) | OFLAG_COPIED);
        let before = std::fs::read(&path).expect("read");
        let file = ImageFile::open(&path, false, false).expect("open");
        let mut h = read_header(&file).expect("header");
        let err = rebuild_refcounts(&file, &mut h).expect_err("corrupt metadata");
        assert!(err.to_string().contains("corrupt metadata"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);
    }

    /// Tiny xorshift generator: deterministic fuzzing without another dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn malformed_metadata_never_panics() {
        require_qemu!();
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("fuzz-src.qcow2");
        let base = populated(dir.path(), "fuzz-base.qcow2", "cluster_size=4096", 4096);
        snapshot(&base, "s1");
        io(&base, &["write -P 0x99 0 8k"]);
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                base.to_str().expect("utf-8"),
                src.to_str().expect("utf-8"),
            ],
        );
        snapshot(&src, "s2");
        io(&src, &["write -P 0x98 4k 4k"]);
        let h = header_of(&src);
        let cs = h.cluster_size();
        let pristine = std::fs::read(&src).expect("read");
        // Metadata regions worth corrupting: header fields, refcount table and first block,
        // L1 tables, L2 tables and the snapshot table.
        let mut regions: Vec<(u64, u64)> = vec![
            (0, 104),
            (h.refcount_table_offset, 64),
            (read_u64(&src, h.refcount_table_offset), 256),
            (h.l1_table_offset, 64),
            (h.snapshots_offset, 128),
        ];
        let l2 = read_u64(&src, h.l1_table_offset) & OFFSET_MASK;
        regions.push((l2, cs));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let work = dir.path().join("fuzz.qcow2");
        let qemu_json = |path: &Path| {
            let out = Command::new("qemu-img")
                .args(["check", "--output", "json", "-f", "qcow2"])
                .arg(path)
                .output()
                .expect("qemu-img check");
            let json = String::from_utf8_lossy(&out.stdout).into_owned();
            // Without a report qemu-img could not open or finish the check.
            json.contains("image-end-offset").then_some(json)
        };
        // Each round runs qemu-img up to four times; CI keeps the default small, longer
        // runs set SNAPVMM_CHECK_FUZZ_ROUNDS.
        let rounds: usize = std::env::var("SNAPVMM_CHECK_FUZZ_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        for round in 0..rounds {
            let mut bytes = pristine.clone();
            for _ in 0..1 + rng.next() % 4 {
                let (start, len) = regions[(rng.next() % regions.len() as u64) as usize];
                let at = (start + rng.next() % len) as usize;
                if at < bytes.len() {
                    bytes[at] ^= 1 << (rng.next() % 8);
                }
            }
            std::fs::write(&work, &bytes).expect("write");
            // Read-only: the same numbers as qemu-img whenever both produce a report.
            if let (Ok(ours), Some(_)) = (check(&work, RepairMode::None), qemu_json(&work)) {
                assert_eq!(
                    counts(&ours),
                    qemu_check(&work),
                    "round {round}: {:#?}",
                    ours.messages
                );
            }
            // Repair: what is left is what qemu-img sees afterwards.
            let mode = [RepairMode::Leaks, RepairMode::All][round % 2];
            if let Ok(report) = check(&work, mode) {
                if mode == RepairMode::All && qemu_json(&work).is_some() {
                    let theirs = qemu_check(&work);
                    assert_eq!(
                        (report.corruptions, report.leaks, report.check_errors),
                        (theirs.corruptions, theirs.leaks, theirs.check_errors),
                        "round {round}: {:#?}",
                        report.messages
                    );
                }
            }
        }
    }
}
