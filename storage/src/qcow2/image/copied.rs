//! COPIED flags follow the refcounts: set exactly on the active L1 entries and L2 entries
//! whose cluster has refcount 1 (the active layer alone owns it and may write it in place).

use std::sync::atomic::Ordering;

use super::Qcow2Image;
use crate::error::Result;
use crate::qcow2::cache::L2Cache;
use crate::qcow2::entry::{
    decode_l1, decode_l2, Mapping, L2_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};

impl Qcow2Image {
    /// Sets COPIED exactly where the refcount is 1 in the active L1 table and the L2 tables
    /// it alone owns, rewriting only the tables that change. Clears it elsewhere.
    pub(in crate::qcow2) fn fix_copied_flags(&mut self) -> Result<()> {
        let l1: Vec<u64> = self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect();
        let mut new_l1 = l1.clone();
        for (i, &e) in l1.iter().enumerate() {
            let (l2, _) = decode_l1(e, self.cluster_size)
                .map_err(|err| self.invalid(format!("L1 entry {i}: {}", err.0)))?;
            if l2 == 0 {
                continue;
            }
            let owned = self.refcount(l2)? == 1;
            new_l1[i] = if owned { l2 | OFLAG_COPIED } else { l2 };
            let table = self.read_table(l2, self.l2_entries)?;
            let mut hosts = Vec::with_capacity(table.len());
            for &entry in &table {
                if entry & (OFLAG_COMPRESSED | L2_RESERVED | OFLAG_ZERO) == 0 {
                    let host = entry & OFFSET_MASK;
                    if host != 0 && host & (self.cluster_size - 1) == 0 {
                        hosts.push(Some(host >> self.cluster_bits));
                        continue;
                    }
                }
                let mapping = decode_l2(entry, self.cluster_bits, self.version)
                    .map_err(|err| self.invalid(format!("L2 table {l2:#x}: {}", err.0)))?;
                hosts.push(match mapping {
                    Mapping::Data { host, .. } => Some(host >> self.cluster_bits),
                    Mapping::Zero { host: Some(h), .. } => Some(h >> self.cluster_bits),
                    _ => None,
                });
            }
            let wanted: Vec<u64> = hosts.iter().flatten().copied().collect();
            let counts = self
                .meta
                .get_mut()
                .refcounts
                .get_many(&self.file, &wanted)?;
            let mut counts = counts.into_iter();
            let mut new_table = table.clone();
            for (j, host) in hosts.iter().enumerate() {
                if host.is_none() {
                    continue;
                }
                // COPIED follows the cluster's own refcount, as QEMU's check wants it. In a
                // table truly shared with a snapshot every cluster is counted once per owner,
                // so none has refcount 1; a table whose refcount is only too high (a leaked
                // reference left by a crash) still has its clusters' exact counts.
                let copied = counts.next() == Some(1);
                new_table[j] = if copied {
                    table[j] | OFLAG_COPIED
                } else {
                    table[j] & !OFLAG_COPIED
                };
            }
            if new_table != table {
                self.write_table(l2, &new_table)?;
            }
        }
        self.finish_flag_rewrite(&l1, &new_l1)
    }

    fn refcount(&mut self, offset: u64) -> Result<u64> {
        let meta = self.meta.get_mut();
        meta.refcounts.get(&self.file, offset >> self.cluster_bits)
    }

    /// Ends a COPIED-flag rewrite: stores the active L1 if it changed, syncs, and drops the
    /// cached L2 slices, which may predate the rewritten tables.
    pub(in crate::qcow2) fn finish_flag_rewrite(
        &mut self,
        old_l1: &[u64],
        new_l1: &[u64],
    ) -> Result<()> {
        if new_l1 != old_l1 {
            self.write_table(self.l1_offset, new_l1)?;
            for (slot, e) in self.l1.iter().zip(new_l1) {
                slot.store(*e, Ordering::Release);
            }
        }
        self.file.sync()?;
        self.l2_cache = L2Cache::new(self.l2_capacity);
        Ok(())
    }
}
