//! Internal snapshots of an open qcow2 image: create, apply (goto), delete, and the VM-state
//! area, compatible with `qemu-img snapshot` and QEMU's savevm/loadvm.
//!
//! Every operation takes `&mut self`: the caller holds the image exclusively (a VMM pauses
//! the guest and drains its queues first), so no request races the table rewrites.
//!
//! Crash safety: each operation first settles the image (all metadata written, frees
//! applied), then, on version 3 images, sets the dirty bit. Its single commit point is one
//! header write (snapshot table offset and count, or the active L1 offset, size and disk size,
//! all in the header's first sector). References are added before that point and dropped
//! after it, so a crash leaves either the old or the new snapshot set; refcounts may then be
//! too high and COPIED flags stale, which the dirty bit makes the next writable open rebuild.
//! Version 2 images have no dirty bit: a crash can leave leaks and stale COPIED flags that
//! `check -r all` repairs.
//!
//! The outcome reported is the outcome on disk, as a snapshot command must answer: an
//! operation that returns an error left the snapshot set and the active state as they were,
//! one that returns `Ok` is durable. A failed commit write or sync is in doubt (the header may
//! have reached the file), so it is undone by writing the old header back and syncing it
//! ([`Qcow2Image::commit_header`]). A failure after the commit point (freeing what the old
//! state held, clearing the dirty bit) cannot undo the operation: it is logged and only leaves
//! leaks, which the still-set dirty bit makes the next writable open repair.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::cache::L2Cache;
use super::entry::{
    decode_l1, decode_l2, Mapping, L2_RESERVED, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use super::header::{write_header, Header, INCOMPAT_DIRTY};
use super::image::Qcow2Image;
use super::snapshot::{serialize_table, SnapshotEntry, MAX_SNAPSHOTS};
use crate::error::{Error, Result};

/// The references an L1 table holds: its L2 tables and the clusters they map.
struct References {
    /// Cluster indices of L2 tables (one per L1 reference).
    l2_tables: Vec<u64>,
    /// Cluster indices of data clusters (one per L2 reference).
    data: Vec<u64>,
}

impl References {
    /// Every referenced cluster. Not sorted: the batched refcount update only needs
    /// neighbours to share slices, which table order already gives.
    fn all(mut self) -> Vec<u64> {
        self.l2_tables.append(&mut self.data);
        self.l2_tables
    }
}

impl Qcow2Image {
    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> &[SnapshotEntry] {
        &self.snapshots
    }

    /// Finds a snapshot by id or, failing that, by name (as `qemu-img snapshot` does).
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }

    /// Guest offset where the VM-state area begins: the first L1 index past the disk.
    pub fn vm_state_offset(&self) -> u64 {
        let per_l1 = self.cluster_size * self.l2_entries;
        self.size.div_ceil(per_l1) * per_l1
    }

    /// Writes every piece of metadata and applies deferred frees, so on-disk refcounts are
    /// exact.
    fn settle(&mut self) -> Result<()> {
        self.writeback()?;
        self.writeback()
    }

    fn sync_header(&mut self) -> Result<()> {
        let meta = self.meta.get_mut();
        write_header(&self.file, &mut meta.header)?;
        self.file.sync()
    }

    /// The commit point of create, apply and delete: applies `update` to the header, writes
    /// it and syncs it. When either fails the new header may or may not be on disk, so the
    /// old one is written back and synced: on error the image is as it was before the call,
    /// in memory and (unless restoring failed too, which the error then says) on disk.
    fn commit_header(&mut self, update: impl FnOnce(&mut Header)) -> Result<()> {
        let old = self.meta.get_mut().header.clone();
        update(&mut self.meta.get_mut().header);
        let Err(error) = self.sync_header() else {
            return Ok(());
        };
        self.meta.get_mut().header = old;
        match self.sync_header() {
            Ok(()) => Err(error),
            Err(restore) => Err(Error::io(
                self.path.clone(),
                "restore the header after a failed commit",
                std::io::Error::other(format!(
                    "{error}; writing the previous header back failed too ({restore}): \
                     the image holds the old or the new state, check it before use"
                )),
            )),
        }
    }

    /// Logs a failure after an operation's commit point: the operation is done and durable,
    /// what failed only leaves leaks that the dirty bit (still set) makes the next open fix.
    fn after_commit(&self, operation: &str, result: Result<()>) {
        if let Err(e) = result {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "{operation} is committed, but cleaning up after it failed: \
                 the image keeps leaked clusters until it is next opened writable"
            );
        }
    }

    fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        if self.version < 3 {
            return Ok(());
        }
        let header = &mut self.meta.get_mut().header;
        if dirty {
            header.incompatible_features |= INCOMPAT_DIRTY;
        } else {
            header.incompatible_features &= !INCOMPAT_DIRTY;
        }
        self.sync_header()
    }

    fn l1_clusters(&self, entries: u64) -> u64 {
        (entries * 8).div_ceil(self.cluster_size).max(1)
    }

    /// The L2 table offsets an L1 table references, validated.
    fn l2_tables(&self, l1: &[u64]) -> Result<Vec<u64>> {
        let file_len = self.file.len()?;
        let mut tables = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let (l2, _) = decode_l1(e, self.cluster_size)
                .map_err(|err| self.invalid(format!("L1 entry {i}: {}", err.0)))?;
            if l2 == 0 {
                continue;
            }
            if l2 + self.cluster_size > file_len {
                return Err(self.invalid(format!("L2 table {l2:#x} lies past the end of the file")));
            }
            tables.push(l2);
        }
        Ok(tables)
    }

    /// The references held through `tables` (one count per listed table): the tables
    /// themselves and every cluster they map. Read from the file: the caller has settled.
    fn references_of(&self, tables: &[u64]) -> Result<References> {
        let mut refs = References {
            l2_tables: tables.iter().map(|t| t >> self.cluster_bits).collect(),
            data: Vec::new(),
        };
        for &l2 in tables {
            for entry in self.read_table(l2, self.l2_entries)? {
                // Fast path for the common plain entry; anything unusual is fully decoded
                // (and validated) below.
                if entry & (OFLAG_COMPRESSED | L2_RESERVED | OFLAG_ZERO) == 0 {
                    let host = entry & OFFSET_MASK;
                    if host != 0 && host & (self.cluster_size - 1) == 0 {
                        refs.data.push(host >> self.cluster_bits);
                        continue;
                    }
                }
                let mapping = decode_l2(entry, self.cluster_bits, self.version)
                    .map_err(|err| self.invalid(format!("L2 table {l2:#x}: {}", err.0)))?;
                if let Some((offset, len)) = mapping.host_extent(self.cluster_size) {
                    let first = offset >> self.cluster_bits;
                    let last = (offset + len - 1) >> self.cluster_bits;
                    refs.data.extend(first..=last);
                }
            }
        }
        Ok(refs)
    }

    /// Walks an L1 table (read from the file: the caller has settled the image).
    fn references(&self, l1: &[u64]) -> Result<References> {
        self.references_of(&self.l2_tables(l1)?)
    }

    /// Clears COPIED in the active L1 and every table it references: after a snapshot
    /// shares them all, no refcount is 1. Each table is written at most once.
    fn clear_copied_flags(&mut self) -> Result<()> {
        let l1: Vec<u64> = self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect();
        for l2 in self.l2_tables(&l1)? {
            let table = self.read_table(l2, self.l2_entries)?;
            if table.iter().any(|e| e & OFLAG_COPIED != 0) {
                let cleared: Vec<u64> = table.iter().map(|e| e & !OFLAG_COPIED).collect();
                self.write_table(l2, &cleared)?;
            }
        }
        let cleared: Vec<u64> = l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        self.finish_flag_rewrite(&l1, &cleared)
    }

    fn update_refcounts(&mut self, clusters: &[u64], delta: i64) -> Result<()> {
        let meta = self.meta.get_mut();
        meta.refcounts.update_sorted(&self.file, clusters, delta)
    }

    /// Allocates `count` clusters for metadata (L1 tables, snapshot tables).
    fn allocate_now(&mut self, count: u64) -> Result<u64> {
        let mut meta = self.meta.lock();
        let offset = self.allocate(&mut meta, count)?;
        self.metadata.insert(offset >> self.cluster_bits, count);
        Ok(offset)
    }

    fn free_now(&mut self, offset: u64, len: u64) -> Result<()> {
        let meta = self.meta.get_mut();
        meta.refcounts.update_range(&self.file, offset, len, -1)
    }

    fn flush_refcounts(&mut self) -> Result<()> {
        let meta = self.meta.get_mut();
        meta.refcounts.flush(&self.file)?;
        self.file.sync()
    }

    /// Writes a new snapshot table and switches the header to it (the commit point of create
    /// and delete); on success the old table is freed, failing which is only logged.
    fn commit_table(&mut self, operation: &str, entries: Vec<SnapshotEntry>) -> Result<()> {
        let raw = serialize_table(&entries)?;
        let new_offset = if entries.is_empty() {
            0
        } else {
            let clusters = (raw.len() as u64).div_ceil(self.cluster_size);
            let offset = self.allocate_now(clusters)?;
            self.file.write_at(&raw, offset)?;
            offset
        };
        self.flush_refcounts()?;
        let old_offset = self.meta.get_mut().header.snapshots_offset;
        let old_len = self.snapshot_table_bytes;
        let count = entries.len() as u32;
        self.commit_header(|header| {
            header.nb_snapshots = count;
            header.snapshots_offset = new_offset;
        })?;
        self.snapshots = entries;
        self.snapshot_table_bytes = raw.len() as u64;
        self.info.snapshot_count = self.snapshots.len() as u32;
        if old_offset != 0 && old_len != 0 {
            let len = old_len.div_ceil(self.cluster_size) * self.cluster_size;
            let freed = self.free_now(old_offset, len);
            self.after_commit(operation, freed);
        }
        Ok(())
    }

    /// Creates an internal snapshot named `name` of the active layer (and of whatever VM
    /// state was written with [`Qcow2Image::write_vm_state`], `vm_state_size` bytes of it).
    pub fn create_snapshot(
        &mut self,
        name: &str,
        vm_clock_nsec: u64,
        vm_state_size: u64,
    ) -> Result<SnapshotEntry> {
        self.writable()?;
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named '{name}' already exists"
            )));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(Error::InvalidArgument("too many snapshots".into()));
        }
        self.settle()?;
        self.set_dirty(true)?;

        // 1. The snapshot's L1 table: a copy of the active one without COPIED flags.
        let l1: Vec<u64> = self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect();
        let snapshot_l1: Vec<u64> = l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        let l1_offset = self.allocate_now(self.l1_clusters(l1.len() as u64))?;
        self.write_table(l1_offset, &snapshot_l1)?;

        // 2. One more reference on every L2 table and cluster it reaches, batched.
        let refs = self.references(&l1)?.all();
        self.update_refcounts(&refs, 1)?;
        self.flush_refcounts()?;

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let entry = SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec,
            vm_state_size,
            disk_size: self.size,
            icount: -1,
            extra_unknown: Vec::new(),
        };
        // 3. The active tables are about to share everything: COPIED goes first (as QEMU
        //    does it), so that at every point the flags agree with the refcounts on disk,
        //    which already count the snapshot's references.
        self.clear_copied_flags()?;

        // 4. Commit: the new table, switched to by one header write.
        let mut entries = self.snapshots.clone();
        entries.push(entry.clone());
        self.commit_table("snapshot create", entries)?;

        // 5. The VM state belongs to the snapshot alone; keeping it in the active layer would
        //    only force copies on the next snapshot (QEMU drops it too).
        let cleanup = (|| {
            if vm_state_size > 0 {
                self.drop_vm_state(vm_state_size)?;
            }
            self.settle()?;
            self.set_dirty(false)
        })();
        self.after_commit("snapshot create", cleanup);
        Ok(entry)
    }

    fn drop_vm_state(&mut self, len: u64) -> Result<()> {
        let start = self.vm_state_offset() >> self.cluster_bits;
        let end = (self.vm_state_offset() + len).div_ceil(self.cluster_size);
        for cluster in start..end {
            if (cluster / self.l2_entries) as usize >= self.l1.len() {
                break;
            }
            self.unmap_cluster(cluster, 0)?;
        }
        Ok(())
    }

    /// Makes snapshot `id_or_name` the active state: the disk reads as it did when the
    /// snapshot was taken, and the disk size returns to the snapshot's.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("snapshot '{id_or_name}' not found")))?;
        let snapshot = self.snapshots[index].clone();
        // Snapshot L1 tables are not validated at open (see `mark_metadata`): now is the time.
        let file_len = self.file.len()?;
        let l1_end = snapshot
            .l1_table_offset
            .checked_add(snapshot.l1_size as u64 * 8);
        if l1_end.is_none_or(|end| end > file_len) {
            return Err(self.invalid(format!(
                "snapshot '{}': L1 table at {:#x} ({} entries) lies past the end of the file",
                snapshot.name, snapshot.l1_table_offset, snapshot.l1_size
            )));
        }
        self.settle()?;
        self.set_dirty(true)?;

        let per_l1 = self.cluster_size * self.l2_entries;
        let needed = snapshot.disk_size.div_ceil(per_l1);
        let new_len = (snapshot.l1_size as u64).max(needed);
        if new_len * 8 > super::header::MAX_L1_BYTES {
            return Err(self.invalid(format!("snapshot '{}' L1 table too large", snapshot.name)));
        }
        let mut new_l1 = self.read_table(snapshot.l1_table_offset, snapshot.l1_size as u64)?;
        for e in new_l1.iter_mut() {
            *e &= !OFLAG_COPIED;
        }
        new_l1.resize(new_len as usize, 0);
        let old_l1: Vec<u64> = self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect();
        // A table referenced by both the old and the new active L1 keeps its count, and so
        // does every cluster it maps: only the tables that differ are walked.
        let mut old_tables = self.l2_tables(&old_l1)?;
        let mut new_tables = self.l2_tables(&new_l1)?;
        old_tables.sort_unstable();
        new_tables.sort_unstable();
        let (only_old, only_new) = multiset_difference(&old_tables, &new_tables);
        let old_refs = self.references_of(&only_old)?.all();

        // References of the snapshot's tables are added first.
        let new_refs = self.references_of(&only_new)?.all();
        self.update_refcounts(&new_refs, 1)?;
        let new_offset = self.allocate_now(self.l1_clusters(new_len))?;
        self.write_table(new_offset, &new_l1)?;
        self.flush_refcounts()?;

        // Commit: active L1 offset, size and disk size in one header write.
        let old_offset = self.l1_offset;
        let old_clusters = self.l1_clusters(old_l1.len() as u64);
        self.commit_header(|header| {
            header.l1_table_offset = new_offset;
            header.l1_size = new_len as u32;
            header.size = snapshot.disk_size;
        })?;
        self.l1 = new_l1.iter().map(|&e| AtomicU64::new(e)).collect();
        self.l1_offset = new_offset;
        self.size = snapshot.disk_size;
        self.info.virtual_size = snapshot.disk_size;
        self.l2_cache = L2Cache::new(self.l2_capacity);

        // The old active state's references go after the commit.
        let cleanup = (|| {
            self.update_refcounts(&old_refs, -1)?;
            self.free_now(old_offset, old_clusters * self.cluster_size)?;
            self.flush_refcounts()?;
            self.fix_copied_flags()?;
            self.settle()?;
            self.set_dirty(false)
        })();
        self.after_commit("snapshot apply", cleanup);
        Ok(())
    }

    /// Deletes snapshot `id_or_name`, releasing every cluster only it referenced.
    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("snapshot '{id_or_name}' not found")))?;
        let snapshot = self.snapshots[index].clone();
        self.settle()?;
        self.set_dirty(true)?;
        let l1 = self.read_table(snapshot.l1_table_offset, snapshot.l1_size as u64)?;
        let refs = self.references(&l1)?.all();

        // Commit: the entry leaves the table first, so a crash can only leak.
        let mut entries = self.snapshots.clone();
        entries.remove(index);
        self.commit_table("snapshot delete", entries)?;

        let cleanup = (|| {
            self.update_refcounts(&refs, -1)?;
            let l1_clusters = self.l1_clusters(snapshot.l1_size as u64);
            self.free_now(snapshot.l1_table_offset, l1_clusters * self.cluster_size)?;
            self.flush_refcounts()?;
            self.fix_copied_flags()?;
            self.settle()?;
            self.set_dirty(false)
        })();
        self.after_commit("snapshot delete", cleanup);
        Ok(())
    }

    /// Grows the active L1 table to `entries`, moving it to fresh clusters.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::NoSpace {
                path: self.path.clone(),
                reason: "the L1 table would exceed 32 MiB".into(),
            });
        }
        self.settle()?;
        let mut l1: Vec<u64> = self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect();
        let old_clusters = self.l1_clusters(l1.len() as u64);
        l1.resize(entries as usize, 0);
        let new_offset = self.allocate_now(self.l1_clusters(entries))?;
        let mut raw = vec![0u8; (self.l1_clusters(entries) * self.cluster_size) as usize];
        for (i, e) in l1.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write_at(&raw, new_offset)?;
        self.flush_refcounts()?;
        let old_offset = self.l1_offset;
        {
            let header = &mut self.meta.get_mut().header;
            header.l1_table_offset = new_offset;
            header.l1_size = entries as u32;
        }
        self.sync_header()?;
        self.l1 = l1.iter().map(|&e| AtomicU64::new(e)).collect();
        self.l1_offset = new_offset;
        self.free_now(old_offset, old_clusters * self.cluster_size)?;
        Ok(())
    }

    /// Writes VM state at byte `pos` of the VM-state area of the active layer, to be captured
    /// by the next [`Qcow2Image::create_snapshot`] (savevm: write the state, then create).
    pub fn write_vm_state(&mut self, buf: &[u8], pos: u64) -> Result<()> {
        self.writable()?;
        let start = self
            .vm_state_offset()
            .checked_add(pos)
            .ok_or_else(|| Error::InvalidArgument("VM state position overflows".into()))?;
        let end = start
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::InvalidArgument("VM state length overflows".into()))?;
        let per_l1 = self.cluster_size * self.l2_entries;
        self.grow_l1(end.div_ceil(per_l1))?;
        let mut done = 0usize;
        let ranges: Vec<(u64, u64)> = self.clusters(start, buf.len() as u64).collect();
        for (at, n) in ranges {
            self.write_in_cluster(&buf[done..done + n as usize], at)?;
            done += n as usize;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at byte `pos` of snapshot `id_or_name`'s VM state (loadvm).
    pub fn read_vm_state(&self, id_or_name: &str, buf: &mut [u8], pos: u64) -> Result<()> {
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("snapshot '{id_or_name}' not found")))?;
        let snapshot = &self.snapshots[index];
        let end = pos.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > snapshot.vm_state_size) {
            return Err(Error::InvalidArgument(format!(
                "VM state read at {pos} length {} is past the snapshot's {} bytes",
                buf.len(),
                snapshot.vm_state_size
            )));
        }
        let per_l1 = self.cluster_size * self.l2_entries;
        let base = snapshot.disk_size.div_ceil(per_l1) * per_l1;
        let l1 = self.read_table(snapshot.l1_table_offset, snapshot.l1_size as u64)?;
        let mut done = 0usize;
        for (at, n) in self.clusters(base + pos, buf.len() as u64) {
            let out = &mut buf[done..done + n as usize];
            done += n as usize;
            let cluster = at >> self.cluster_bits;
            let in_cluster = at & (self.cluster_size - 1);
            let l1_index = (cluster / self.l2_entries) as usize;
            let Some(&l1e) = l1.get(l1_index) else {
                out.fill(0);
                continue;
            };
            let (l2, _) = decode_l1(l1e, self.cluster_size)
                .map_err(|err| self.invalid(format!("snapshot L1 entry {l1_index}: {}", err.0)))?;
            if l2 == 0 {
                out.fill(0);
                continue;
            }
            let mut raw = [0u8; 8];
            self.file
                .read_at(&mut raw, l2 + (cluster % self.l2_entries) * 8)?;
            let mapping = decode_l2(u64::from_be_bytes(raw), self.cluster_bits, self.version)
                .map_err(|err| self.invalid(format!("snapshot L2 table {l2:#x}: {}", err.0)))?;
            match mapping {
                Mapping::Data { host, .. } => self.file.read_at(out, host + in_cluster)?,
                Mapping::Compressed(extent) => {
                    let data = self.read_compressed(extent)?;
                    out.copy_from_slice(
                        &data[in_cluster as usize..in_cluster as usize + out.len()],
                    );
                }
                Mapping::Zero { .. } | Mapping::Unallocated => out.fill(0),
            }
        }
        Ok(())
    }
}

/// Elements of `a` not matched in `b`, and of `b` not matched in `a` (both sorted).
fn multiset_difference(a: &[u64], b: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let (mut i, mut j) = (0, 0);
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a.push(*x);
                i += 1;
            }
            (Some(_), Some(y)) => {
                only_b.push(*y);
                j += 1;
            }
            (Some(x), None) => {
                only_a.push(*x);
                i += 1;
            }
            (None, Some(y)) => {
                only_b.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

#[cfg(test)]
mod tests {
    use super::multiset_difference;

    #[test]
    fn multiset_difference_counts_repeats() {
        let (a, b) = multiset_difference(&[1, 2, 2, 5], &[2, 3, 5, 5]);
        assert_eq!(a, [1, 2]);
        assert_eq!(b, [3, 5]);
    }
}
