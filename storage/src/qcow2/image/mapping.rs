//! What a guest cluster maps to, and changing it: L1 entries, cached L2 slices, cluster
//! allocation and the copy-on-write of L2 tables shared with internal snapshots.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Meta, Qcow2Image};
use crate::error::{Error, Result};
use crate::qcow2::cache::Slice;
use crate::qcow2::entry::{decode_l1, decode_l2, Mapping, OFLAG_COPIED, OFLAG_ZERO};
use crate::qcow2::header::{write_header, INCOMPAT_CORRUPT};

impl Qcow2Image {
    /// The L2 slice holding entry `index` of the table at `l2_offset`, and the entry's
    /// position inside it.
    pub(in crate::qcow2) fn l2_slice(
        &self,
        l2_offset: u64,
        index: u64,
    ) -> Result<(Arc<Slice>, usize)> {
        let slice_no = index / self.slice_entries;
        let slice_offset = l2_offset + slice_no * self.slice_entries * 8;
        let slice = self.l2_cache.get_or_load(slice_offset, || {
            let mut raw = vec![0u8; (self.slice_entries * 8) as usize];
            self.file.read_at(&mut raw, slice_offset)?;
            Ok::<_, Error>(Slice::from_bytes(slice_offset, &raw))
        })?;
        Ok((slice, (index % self.slice_entries) as usize))
    }

    pub(in crate::qcow2) fn l1_entry(&self, guest_cluster: u64) -> Result<(u64, bool)> {
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

    pub(in crate::qcow2) fn decode(&self, entry: u64, guest_cluster: u64) -> Result<Mapping> {
        decode_l2(entry, self.cluster_bits, self.version).map_err(|e| {
            self.invalid(format!(
                "L2 entry for guest offset {:#x}: {}",
                guest_cluster << self.cluster_bits,
                e.0
            ))
        })
    }

    /// What guest cluster `guest_cluster` maps to in this layer.
    pub(in crate::qcow2) fn lookup(&self, guest_cluster: u64) -> Result<Mapping> {
        let (l2_offset, _) = self.l1_entry(guest_cluster)?;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let (slice, index) = self.l2_slice(l2_offset, guest_cluster % self.l2_entries)?;
        self.decode(slice.get(index), guest_cluster)
    }

    /// Splits `[offset, offset+len)` at cluster boundaries.
    pub(in crate::qcow2) fn clusters(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64)> + '_ {
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
    pub(in crate::qcow2) fn allocate(&self, meta: &mut Meta, count: u64) -> Result<u64> {
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
    pub(in crate::qcow2) fn l2_for_write(&self, guest_cluster: u64) -> Result<(Arc<Slice>, usize)> {
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
    pub(super) fn check_data_target(&self, host: u64) -> Result<()> {
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

    pub(in crate::qcow2) fn defer_free(&self, mapping: Mapping) {
        if let Some(extent) = mapping.host_extent(self.cluster_size) {
            self.meta.lock().pending_frees.push(extent);
        }
    }

    /// Counts a slice that just turned dirty (`newly`); dirty slices are pinned in the
    /// cache, so once more of them exist than the cache holds, write them back. Counting
    /// transitions, not entry updates, keeps this fsync-heavy path off the steady state.
    pub(in crate::qcow2) fn note_dirty(&self, newly: bool) -> Result<()> {
        if !newly {
            return Ok(());
        }
        let n = self.dirtied.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.l2_capacity {
            self.writeback()?;
        }
        Ok(())
    }

    /// Makes whole guest cluster `guest_cluster` unallocated or zero-flagged (`entry` is the
    /// new L2 entry, 0 or `OFLAG_ZERO`).
    pub(in crate::qcow2) fn unmap_cluster(&self, guest_cluster: u64, entry: u64) -> Result<()> {
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

    pub(in crate::qcow2) fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; (entries * 8) as usize];
        self.file.read_at(&mut raw, offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    pub(in crate::qcow2) fn write_table(&self, offset: u64, entries: &[u64]) -> Result<()> {
        let mut raw = Vec::with_capacity(entries.len() * 8);
        for e in entries {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.file.write_at(&raw, offset)
    }
}
