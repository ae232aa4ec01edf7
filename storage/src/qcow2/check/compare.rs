//! Comparing counted references with the refcounts on disk (QEMU's `compare_refcounts`),
//! and COPIED flags with the refcounts (`check_oflag_copied`), fixing what the mode allows.

use std::collections::HashMap;

use super::checker::{read_zero_padded, Checker, LOOKUP_CACHE_BYTES, MAX_OFFSET, REFT_RESERVED};
use super::count::RefArray;
use super::report::{note, CheckReport, RepairMode};
use crate::error::Result;
use crate::file::ImageFile;
use crate::qcow2::entry::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::qcow2::refcount::{read_entry, write_entry};

/// Where to look for on-disk refcounts while checking COPIED flags: the refcount table and a
/// bounded cache of blocks.
pub(super) struct RefLookup<'a> {
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
    pub(super) fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
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
        Ok(Some(read_entry(self.order, data, cluster % per_block)))
    }
}

impl Checker<'_> {
    /// QEMU's `compare_refcounts`: the on-disk refcount of every cluster against `refs`,
    /// fixing what `fix` allows. Returns the highest cluster in use.
    pub(super) fn compare(
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
                let on_disk = read_entry(self.order, &block, cluster - first);
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
                    write_entry(self.order, &mut block, cluster - first, expected);
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
    pub(super) fn check_copied(&self, res: &mut CheckReport, fix: RepairMode) -> Result<()> {
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
}
