//! Counting references: every host cluster the metadata uses (header, tables, data,
//! snapshots, bitmaps, refcount structures), as QEMU's `calculate_refcounts` counts them.

use std::collections::BTreeMap;

use super::checker::{
    Checker, BITMAP_TABLE_CHUNK, BME_ALL_ONES, BME_RESERVED, MAX_BEYOND_RANGES,
    MAX_BITMAP_TABLE_ENTRIES, MAX_OFFSET, MAX_PENDING_L2, REFT_RESERVED,
};
use super::report::{note, CheckReport, RepairMode};
use crate::error::Result;
use crate::qcow2::entry::{
    decode_l2, L1_RESERVED, L2_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::qcow2::header::{be16, be32, be64, MAX_L1_BYTES};
use crate::qcow2::refcount::{max_refcount, read_entry, write_entry};

/// Computed refcounts, stored in the image's own entry width (as QEMU does, so overflow
/// behaves the same). Block `b`'s entries are then byte for byte the refcount block that
/// describes clusters `b * entries_per_block ..`, which is what a rebuild writes.
pub(super) struct RefArray {
    pub(super) order: u32,
    pub(super) clusters: u64,
    pub(super) data: Vec<u8>,
    /// Cluster ranges `[first, end)` referenced a cluster or more past the end of the file:
    /// not counted (they are corruptions), but a rebuild must not put anything there.
    pub(super) beyond: Vec<(u64, u64)>,
    /// More such ranges than `MAX_BEYOND_RANGES`: a rebuild cannot keep clear of them all.
    pub(super) beyond_overflow: bool,
}

impl RefArray {
    pub(super) fn get(&self, cluster: u64) -> u64 {
        if cluster >= self.clusters {
            return 0;
        }
        read_entry(self.order, &self.data, cluster)
    }

    pub(super) fn set(&mut self, cluster: u64, value: u64) {
        write_entry(self.order, &mut self.data, cluster, value);
    }

    pub(super) fn len(&self) -> u64 {
        self.clusters
    }

    /// Makes room for `clusters` entries; false when memory cannot be had.
    pub(super) fn grow(&mut self, clusters: u64) -> bool {
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
    pub(super) fn block_bytes(&self, block: u64, cluster_size: u64) -> &[u8] {
        let len = self.data.len() as u64;
        let start = (block * cluster_size).min(len);
        let end = ((block + 1) * cluster_size).min(len);
        &self.data[start as usize..end as usize]
    }
}

impl Checker<'_> {
    /// An empty refcount array covering every cluster of the file.
    pub(super) fn new_refs(&self) -> Result<RefArray> {
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

    /// Adds `times` references to every cluster touched by `[offset, offset + size)`.
    /// A range ending a cluster or more past the end of the file, and every increment past
    /// the refcount width, is a corruption (QEMU's `qcow2_inc_refcounts_imrt`).
    pub(super) fn inc(
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
    pub(super) fn walk_metadata(
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
    pub(super) fn l1_entry(
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

    pub(super) fn walk_active(
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
    pub(super) fn walk_snapshots(
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
    pub(super) fn walk_l2(
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
    pub(super) fn walk_bitmaps(&self, refs: &mut RefArray, res: &mut CheckReport) -> Result<()> {
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

    /// Everything QEMU's `calculate_refcounts` counts, including the refcount table and
    /// blocks; sets `rebuild` when the refcount structure itself is broken.
    pub(super) fn calculate(
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
    pub(super) fn check_refblocks(
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
}
