//! Refcount table, a slice cache of refcount blocks, and the cluster allocator.
//!
//! Everything here runs under the image's metadata lock. Refcount increments may reach the
//! disk at any time (a crash then leaks at worst); decrements are only ever applied after the
//! mapping that dropped the reference is durable (see `Qcow2Image::writeback`), so whatever is
//! cached is always safe to write.

use std::collections::VecDeque;

use super::offset_map::OffsetMap;

use std::sync::Arc;

use super::header::{be32, be64, Header};
use super::overlap::MetadataMap;
use crate::error::{Error, Result};
use crate::file::ImageFile;

/// Bytes of refcount block kept per cache slice.
const SLICE_BYTES: u64 = 4096;

struct RefSlice {
    data: Vec<u8>,
    dirty: bool,
}

/// Refcount state of one open image.
pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    /// Host offsets of refcount blocks, indexed by block number; 0 = no block.
    pub table: Vec<u64>,
    /// Where the refcount table lives.
    pub table_offset: u64,
    /// Clusters the refcount table occupies.
    pub table_clusters: u32,
    slices: OffsetMap<RefSlice>,
    order: VecDeque<u64>,
    capacity: usize,
    slice_bytes: u64,
    /// Lowest cluster index that may be free.
    free_cursor: u64,
    /// One past the highest cluster index known to be in use or inside the file.
    pub end_cluster: u64,
    /// The refcount table was moved; the header must be rewritten (done by the caller).
    pub table_moved: bool,
    /// The table the last move replaced, freed once the header names the new one.
    pending_old_table: Option<(u64, u64)>,
    /// Host clusters holding metadata: kept up to date as refcount structures move, and
    /// never handed out by the allocator even when a corrupt image gives them refcount 0.
    pub metadata: Arc<MetadataMap>,
}

impl Refcounts {
    /// Loads the refcount table described by `header`.
    pub fn load(file: &ImageFile, header: &Header, cache_bytes: usize) -> Result<Self> {
        let cs = header.cluster_size();
        let entries = header.refcount_table_clusters as u64 * cs / 8;
        let mut raw = vec![0u8; (entries * 8) as usize];
        file.read_at(&mut raw, header.refcount_table_offset)?;
        let file_len = file.len()?;
        let mut table = Vec::with_capacity(entries as usize);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            if e & 0x1ff != 0 || e % cs != 0 {
                return Err(Error::invalid(
                    file.path(),
                    format!("refcount table entry {i} ({e:#x}) is not cluster aligned"),
                ));
            }
            if e != 0 && e.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(Error::invalid(
                    file.path(),
                    format!("refcount block {i} at {e:#x} lies past the end of the file"),
                ));
            }
            table.push(e);
        }
        let slice_bytes = SLICE_BYTES.min(cs);
        Ok(Refcounts {
            cluster_bits: header.cluster_bits,
            refcount_order: header.refcount_order,
            table,
            table_offset: header.refcount_table_offset,
            table_clusters: header.refcount_table_clusters,
            slices: OffsetMap::default(),
            order: VecDeque::new(),
            capacity: (cache_bytes as u64 / slice_bytes).max(4) as usize,
            slice_bytes,
            free_cursor: 0,
            end_cluster: file_len.div_ceil(cs),
            table_moved: false,
            pending_old_table: None,
            metadata: Arc::new(MetadataMap::default()),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    fn max_refcount(&self) -> u64 {
        max_refcount(self.refcount_order)
    }

    /// The cache slice holding `cluster`'s refcount entry, and the entry's index inside it.
    #[inline]
    fn locate(&self, cluster: u64) -> Option<(u64, u64)> {
        // Every size here is a power of two: shifts and masks, no divisions (this runs once
        // per cluster when a snapshot operation walks a whole image).
        let block_shift = self.cluster_bits + 3 - self.refcount_order;
        let block_offset = *self.table.get((cluster >> block_shift) as usize)?;
        if block_offset == 0 {
            return None;
        }
        let index = cluster & ((1u64 << block_shift) - 1);
        let byte = (index << self.refcount_order) >> 3;
        let per_slice = (self.slice_bytes * 8) >> self.refcount_order;
        Some((
            block_offset + (byte & !(self.slice_bytes - 1)),
            index & (per_slice - 1),
        ))
    }

    fn slice(&mut self, file: &ImageFile, offset: u64) -> Result<&mut RefSlice> {
        if !self.slices.contains_key(&offset) {
            self.load_slice(file, offset)?;
        }
        Ok(self.slices.get_mut(&offset).expect("just inserted"))
    }

    fn load_slice(&mut self, file: &ImageFile, offset: u64) -> Result<()> {
        {
            self.evict(file)?;
            let mut data = vec![0u8; self.slice_bytes as usize];
            file.read_at(&mut data, offset)?;
            self.slices.insert(offset, RefSlice { data, dirty: false });
            self.order.push_back(offset);
        }
        Ok(())
    }

    fn evict(&mut self, file: &ImageFile) -> Result<()> {
        while self.slices.len() >= self.capacity {
            let Some(victim) = self.order.pop_front() else {
                break;
            };
            if let Some(s) = self.slices.remove(&victim) {
                if s.dirty {
                    file.write_at(&s.data, victim)?;
                }
            }
        }
        Ok(())
    }

    /// The refcount of cluster index `cluster` (0 when no block covers it).
    pub fn get(&mut self, file: &ImageFile, cluster: u64) -> Result<u64> {
        let Some((slice, index)) = self.locate(cluster) else {
            return Ok(0);
        };
        let order = self.refcount_order;
        let s = self.slice(file, slice)?;
        Ok(read_entry(order, &s.data, index))
    }

    /// Refcounts of many clusters at once (in any order; sorted input touches each slice
    /// once per run).
    pub fn get_many(&mut self, file: &ImageFile, clusters: &[u64]) -> Result<Vec<u64>> {
        let order = self.refcount_order;
        let mut out = Vec::with_capacity(clusters.len());
        let per_slice = (self.slice_bytes * 8) >> order;
        // (first cluster the slice covers, its bytes)
        let mut current: Option<(u64, Vec<u8>)> = None;
        for &cluster in clusters {
            let slice_first = cluster & !(per_slice - 1);
            if current
                .as_ref()
                .is_none_or(|(first, _)| *first != slice_first)
            {
                let Some((slice, _)) = self.locate(cluster) else {
                    out.push(0);
                    continue;
                };
                let data = self.slice(file, slice)?.data.clone();
                current = Some((slice_first, data));
            }
            let (_, data) = current.as_ref().expect("loaded");
            out.push(read_entry(order, data, cluster - slice_first));
        }
        Ok(out)
    }

    fn set(&mut self, file: &ImageFile, cluster: u64, value: u64) -> Result<()> {
        let (slice, index) = self.locate(cluster).ok_or_else(|| {
            Error::invalid(
                file.path(),
                format!("no refcount block covers cluster {cluster}"),
            )
        })?;
        let order = self.refcount_order;
        let s = self.slice(file, slice)?;
        write_entry(order, &mut s.data, index, value);
        s.dirty = true;
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcount of every cluster touched by the byte range.
    pub fn update_range(
        &mut self,
        file: &ImageFile,
        offset: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            self.update(file, cluster, delta)?;
        }
        Ok(())
    }

    /// Adds `delta` to one cluster's refcount, refusing overflow and underflow.
    pub fn update(&mut self, file: &ImageFile, cluster: u64, delta: i64) -> Result<()> {
        let current = self.get(file, cluster)?;
        let new = if delta >= 0 {
            current
                .checked_add(delta as u64)
                .filter(|&v| v <= self.max_refcount())
                .ok_or_else(|| {
                    Error::invalid(
                        file.path(),
                        format!(
                            "refcount of cluster {cluster} would exceed {} (refcount_bits {})",
                            self.max_refcount(),
                            1 << self.refcount_order
                        ),
                    )
                })?
        } else {
            current.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::invalid(
                    file.path(),
                    format!("refcount of cluster {cluster} would drop below 0"),
                )
            })?
        };
        self.set(file, cluster, new)?;
        if new == 0 {
            self.metadata.remove(cluster);
            if cluster < self.free_cursor {
                self.free_cursor = cluster;
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every cluster index in `clusters` (sorted, repeats
    /// allowed), touching each cached refcount slice once per run: the batched path used by
    /// snapshot operations, which update every cluster of an image at once.
    pub fn update_sorted(&mut self, file: &ImageFile, clusters: &[u64], delta: i64) -> Result<()> {
        let max = self.max_refcount();
        let order = self.refcount_order;
        let mut i = 0;
        while i < clusters.len() {
            let cluster = clusters[i];
            let Some((slice_offset, _)) = self.locate(cluster) else {
                return Err(Error::invalid(
                    file.path(),
                    format!("no refcount block covers cluster {cluster}"),
                ));
            };
            self.slice(file, slice_offset)?;
            let mut slice = self.slices.remove(&slice_offset).expect("cached");
            let mut result = Ok(());
            // The slice holds an aligned run of `per_slice` clusters' entries.
            let per_slice = (self.slice_bytes * 8) >> order;
            let slice_first = cluster & !(per_slice - 1);
            while i < clusters.len() {
                let c = clusters[i];
                if c < slice_first || c >= slice_first + per_slice {
                    break;
                }
                let index = c - slice_first;
                let current = read_entry(order, &slice.data, index);
                let new = if delta >= 0 {
                    current.checked_add(delta as u64).filter(|&v| v <= max)
                } else {
                    current.checked_sub(delta.unsigned_abs())
                };
                let Some(new) = new else {
                    result = Err(Error::invalid(
                        file.path(),
                        format!("refcount of cluster {c} would leave 0..={max} (at {current}, adding {delta})"),
                    ));
                    break;
                };
                write_entry(order, &mut slice.data, index, new);
                slice.dirty = true;
                if new == 0 {
                    self.metadata.remove(c);
                    if c < self.free_cursor {
                        self.free_cursor = c;
                    }
                }
                i += 1;
            }
            self.slices.insert(slice_offset, slice);
            result?;
        }
        Ok(())
    }

    /// Allocates `count` contiguous clusters with refcount 1 and returns the host offset of
    /// the first. Refcount blocks and the refcount table grow as needed.
    pub fn allocate(&mut self, file: &ImageFile, count: u64) -> Result<u64> {
        let count = count.max(1);
        loop {
            let start = self.find_free_run(file, count)?;
            if self.ensure_blocks(file, start, count)? {
                // A new refcount block took the run's first free cluster: search again.
                continue;
            }
            for c in start..start + count {
                self.update(file, c, 1)?;
            }
            if start == self.free_cursor {
                self.free_cursor = start + count;
            }
            self.end_cluster = self.end_cluster.max(start + count);
            return Ok(start << self.cluster_bits);
        }
    }

    fn find_free_run(&mut self, file: &ImageFile, count: u64) -> Result<u64> {
        let mut start = self.free_cursor.max(1);
        let mut c = start;
        // The header cluster is never free; clusters beyond every block count as free.
        let limit = (super::header::MAX_REFCOUNT_TABLE_BYTES / 8) * self.entries_per_block();
        let order = self.refcount_order;
        let metadata = self.metadata.clone();
        while c - start < count {
            if c >= limit {
                return Err(Error::NoSpace {
                    path: file.path().to_path_buf(),
                    reason: "the refcount table cannot describe more clusters".into(),
                });
            }
            match self.locate(c) {
                None => {
                    if metadata.contains(c) {
                        start = c + 1;
                    }
                    c += 1;
                }
                Some((slice_offset, _)) => {
                    // Scan the rest of this slice without further lookups.
                    let per_slice = (self.slice_bytes * 8) >> order;
                    let slice_end = c - c % per_slice + per_slice;
                    let slice = self.slice(file, slice_offset)?;
                    while c < slice_end && c - start < count {
                        let value = read_entry(order, &slice.data, c % per_slice);
                        if value != 0 || metadata.contains(c) {
                            start = c + 1;
                        }
                        c += 1;
                    }
                }
            }
        }
        if count == 1 {
            self.free_cursor = start;
        }
        Ok(start)
    }

    /// Creates refcount blocks for the run `[start, start+count)` where missing. A new block
    /// is placed at the first cluster of the run inside its own range, so it describes
    /// itself. Returns true if a block was created (the run is then no longer free).
    fn ensure_blocks(&mut self, file: &ImageFile, start: u64, count: u64) -> Result<bool> {
        let per_block = self.entries_per_block();
        let first_block = start / per_block;
        let last_block = (start + count - 1) / per_block;
        for block in first_block..=last_block {
            let missing = self.table.get(block as usize).is_none_or(|&o| o == 0);
            if !missing {
                continue;
            }
            if block as usize >= self.table.len() {
                self.grow_table(file, block + 1)?;
                return Ok(true);
            }
            let at = start.max(block * per_block);
            let cs = self.cluster_size();
            let mut data = vec![0u8; cs as usize];
            write_entry(self.refcount_order, &mut data, at % per_block, 1);
            file.write_at(&data, at * cs)?;
            self.table[block as usize] = at * cs;
            self.metadata.insert(at, 1);
            self.write_table_entry(file, block)?;
            self.end_cluster = self.end_cluster.max(at + 1);
            return Ok(true);
        }
        Ok(false)
    }

    fn write_table_entry(&self, file: &ImageFile, block: u64) -> Result<()> {
        // The block itself is written first; the table entry pointing at it may follow at once
        // because the new block only counts itself (a crash leaves a leak at worst).
        let e = self.table[block as usize].to_be_bytes();
        file.write_at(&e, self.table_offset + block * 8)
    }

    /// Moves the refcount table to the end of the file with room for at least `min_entries`
    /// blocks, creating blocks that describe the new table and themselves.
    fn grow_table(&mut self, file: &ImageFile, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_block = self.entries_per_block();
        let entries_per_cluster = cs / 8;
        let mut new_entries = min_entries.max(self.table.len() as u64 * 2).max(1);
        let start = self
            .end_cluster
            .max(self.table_offset / cs + self.table_clusters as u64);
        let (table_clusters, new_blocks) = loop {
            let table_clusters = new_entries.div_ceil(entries_per_cluster);
            // Blocks to cover [start, start + table_clusters + k) where missing.
            let mut k = 0u64;
            loop {
                let end = start + table_clusters + k;
                let needed = (start / per_block..=(end - 1) / per_block)
                    .filter(|&b| self.table.get(b as usize).is_none_or(|&o| o == 0))
                    .count() as u64;
                if needed == k {
                    break;
                }
                k = needed;
            }
            let end = start + table_clusters + k;
            let max_block = (end - 1) / per_block;
            if max_block < new_entries {
                let blocks: Vec<u64> = (start / per_block..=max_block)
                    .filter(|&b| self.table.get(b as usize).is_none_or(|&o| o == 0))
                    .collect();
                break (table_clusters, blocks);
            }
            new_entries = max_block + 1;
        };
        if table_clusters * cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::NoSpace {
                path: file.path().to_path_buf(),
                reason: "refcount table would exceed 8 MiB".into(),
            });
        }
        let mut table = self.table.clone();
        table.resize((table_clusters * entries_per_cluster) as usize, 0);
        // New blocks go right after the new table.
        let blocks_at = start + table_clusters;
        for (i, &b) in new_blocks.iter().enumerate() {
            table[b as usize] = (blocks_at + i as u64) * cs;
        }
        let used_end = blocks_at + new_blocks.len() as u64;
        for (i, &b) in new_blocks.iter().enumerate() {
            let mut data = vec![0u8; cs as usize];
            let range = b * per_block..(b + 1) * per_block;
            for c in start.max(range.start)..used_end.min(range.end) {
                write_entry(self.refcount_order, &mut data, c % per_block, 1);
            }
            file.write_at(&data, (blocks_at + i as u64) * cs)?;
        }
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters as u64;
        self.metadata.insert(start, used_end - start);
        self.table = table;
        self.table_offset = start * cs;
        self.table_clusters = table_clusters as u32;
        self.end_cluster = self.end_cluster.max(used_end);
        // Clusters of the new table inside already existing blocks get their refcount there.
        for c in start..used_end {
            if self.get(file, c)? == 0 {
                self.set(file, c, 1)?;
            }
        }
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in self.table.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.flush(file)?;
        file.write_at(&raw, self.table_offset)?;
        file.sync()?;
        self.table_moved = true;
        // The caller rewrites the header, syncs, then calls `release_old_table`.
        self.pending_old_table = Some((old_offset, old_clusters));
        Ok(())
    }

    /// After the header naming the moved table is durable: drops the old table's clusters.
    pub fn release_old_table(&mut self, file: &ImageFile) -> Result<()> {
        self.table_moved = false;
        if let Some((offset, clusters)) = self.pending_old_table.take() {
            let cs = self.cluster_size();
            self.update_range(file, offset, clusters * cs, -1)?;
        }
        Ok(())
    }

    /// Writes every dirty refcount slice (no sync).
    pub fn flush(&mut self, file: &ImageFile) -> Result<bool> {
        let mut wrote = false;
        for (offset, slice) in self.slices.iter_mut() {
            if slice.dirty {
                file.write_at(&slice.data, *offset)?;
                slice.dirty = false;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Marks every cached slice dirty: after a failed fsync the kernel may have dropped what
    /// was written, so the next flush writes it all again. The cache always holds values
    /// that are safe on disk (decrements come only after the mappings are durable).
    pub fn mark_cached_dirty(&mut self) {
        self.slices.values_mut().for_each(|s| s.dirty = true);
    }

    /// Whether any refcount slice is waiting to be written.
    pub fn is_dirty(&self) -> bool {
        self.slices.values().any(|s| s.dirty)
    }
}

/// Entry `index` of refcount-block bytes `data` whose entries are `1 << order` bits wide.
/// Sub-byte widths are packed from the least significant bit; wider ones are big-endian.
/// 16-bit refcounts (the default) get a direct path: snapshot operations and the checker
/// call this once per cluster of the image. The caller keeps `index` inside `data`.
#[inline]
pub fn read_entry(order: u32, data: &[u8], index: u64) -> u64 {
    let i = index as usize;
    match order {
        4 => u16::from_be_bytes([data[2 * i], data[2 * i + 1]]) as u64,
        0..=2 => {
            let bit = index << order;
            let mask = (1u64 << (1u32 << order)) - 1;
            (u64::from(data[(bit / 8) as usize]) >> (bit % 8)) & mask
        }
        3 => u64::from(data[i]),
        5 => u64::from(be32(data, 4 * i)),
        _ => be64(data, 8 * i),
    }
}

/// Stores `value` (already within the width) as entry `index` of refcount-block bytes whose
/// entries are `1 << order` bits wide; the encoding [`read_entry`] decodes.
#[inline]
pub fn write_entry(order: u32, data: &mut [u8], index: u64, value: u64) {
    let i = index as usize;
    match order {
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        0..=2 => {
            let bit = index << order;
            let shift = bit % 8;
            let mask = (((1u16 << (1u32 << order)) - 1) as u8) << shift;
            let byte = &mut data[(bit / 8) as usize];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => data[i] = value as u8,
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => data[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Largest refcount an entry of `1 << order` bits holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_encoding_round_trips_every_width() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 64];
            let max = max_refcount(order);
            let count = (64 * 8) >> order;
            for i in 0..count {
                write_entry(order, &mut data, i, (i * 7 + 1) & max);
            }
            for i in 0..count {
                assert_eq!(
                    read_entry(order, &data, i),
                    (i * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
        }
        // Sub-byte widths are packed from the least significant bit.
        let mut data = [0u8; 1];
        write_entry(0, &mut data, 1, 1);
        assert_eq!(data[0], 0b10);
        write_entry(2, &mut data, 1, 0xf);
        assert_eq!(data[0], 0xf2);
    }
}
