//! Rebuilding the refcount structure from scratch, and marking a repaired image clean.

use std::collections::BTreeSet;

use super::checker::{Checker, MAX_OFFSET, REFT_RESERVED};
use super::count::RefArray;
use super::report::{CheckReport, RepairMode};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::qcow2::header::{
    write_header, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFCOUNT_TABLE_BYTES,
};

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
pub fn rebuild_refcounts(file: &ImageFile, header: &mut Header) -> Result<()> {
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
    write_header(file, &mut checker.header)?;
    file.sync()?;
    *header = checker.header;
    Ok(())
}

impl Checker<'_> {
    /// Clears the dirty and corrupt bits once a repair left nothing wrong (QEMU's
    /// `qcow2_mark_clean` and `qcow2_mark_consistent`).
    pub(super) fn mark_clean(&mut self) -> Result<()> {
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.file.sync()?;
        self.header.incompatible_features &= !bits;
        write_header(self.file, &mut self.header)?;
        self.file.sync()
    }

    /// Writes a refcount table and blocks holding `refs` (which must count everything but
    /// refcount structures) plus the new structures themselves, and points the header at
    /// them. The new clusters are free in `refs` and outside the old refcount table and
    /// blocks, so until the header is written the old structure stays intact.
    pub(super) fn write_new_structure(&mut self, refs: &mut RefArray) -> Result<()> {
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
