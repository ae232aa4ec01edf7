//! A sharded cache of L2 table slices whose hits take no global lock.
//!
//! A slice is up to 4 KiB of one L2 table (512 entries), QEMU's `l2-cache-entry-size`
//! default: small slices make a cache of a given size cover more scattered data and make a
//! miss cheap. Entries are atomics so that readers on any thread see a consistent entry while a
//! writer updates another one; a slice that is dirty or in use is never evicted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::offset_map::OffsetMap;

/// Number of shards; a power of two.
const SHARDS: usize = 64;

/// One cached slice of an L2 table.
#[derive(Debug)]
pub struct Slice {
    /// Host offset of the slice's first entry.
    pub offset: u64,
    /// The entries, host-endian.
    pub entries: Box<[AtomicU64]>,
    dirty: AtomicBool,
    referenced: AtomicBool,
}

impl Slice {
    /// Builds a slice from its on-disk big-endian bytes.
    pub fn from_bytes(offset: u64, raw: &[u8]) -> Self {
        let entries = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        Slice {
            offset,
            entries,
            dirty: AtomicBool::new(false),
            referenced: AtomicBool::new(true),
        }
    }

    /// Loads entry `index`.
    pub fn get(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Acquire)
    }

    /// Stores entry `index` and marks the slice dirty; returns whether the slice was clean
    /// before. The entry is stored before the dirty mark so that a concurrent writeback
    /// either sees the new entry or leaves the slice dirty.
    pub fn set(&self, index: usize, value: u64) -> bool {
        self.entries[index].store(value, Ordering::Release);
        !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// Whether the slice holds changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Clears the dirty mark and returns the on-disk bytes to write.
    pub fn take_for_writeback(&self) -> Vec<u8> {
        self.dirty.store(false, Ordering::Release);
        let mut raw = Vec::with_capacity(self.entries.len() * 8);
        for e in self.entries.iter() {
            raw.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
        }
        raw
    }

    /// Marks the slice dirty again after a failed writeback.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

#[derive(Default)]
struct Shard {
    map: OffsetMap<Arc<Slice>>,
    order: VecDeque<u64>,
}

/// The L2 slice cache.
pub struct L2Cache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl L2Cache {
    /// A cache holding about `capacity` slices.
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(2),
        }
    }

    fn shard(&self, offset: u64) -> &Mutex<Shard> {
        // Slices are at least 512 bytes apart; mix the bits so neighbours spread out.
        let h = (offset >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58;
        &self.shards[h as usize & (SHARDS - 1)]
    }

    /// Returns the slice at `offset`, loading it with `load` on a miss. The shard lock is
    /// held across the load so one slice is never read twice at once.
    pub fn get_or_load<E>(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Slice, E>,
    ) -> Result<Arc<Slice>, E> {
        let mut shard = self.shard(offset).lock();
        if let Some(s) = shard.map.get(&offset) {
            s.referenced.store(true, Ordering::Relaxed);
            return Ok(s.clone());
        }
        let slice = Arc::new(load()?);
        self.insert_locked(&mut shard, slice.clone());
        Ok(slice)
    }

    /// Inserts (or replaces) a slice, e.g. one of a freshly allocated L2 table.
    pub fn insert(&self, slice: Slice) -> Arc<Slice> {
        let slice = Arc::new(slice);
        let mut shard = self.shard(slice.offset).lock();
        self.insert_locked(&mut shard, slice.clone());
        slice
    }

    fn insert_locked(&self, shard: &mut Shard, slice: Arc<Slice>) {
        let offset = slice.offset;
        if shard.map.insert(offset, slice).is_none() {
            shard.order.push_back(offset);
        }
        // Clock eviction over clean, unused slices; dirty or borrowed slices stay (the cache
        // may then run over its size until the next writeback).
        let mut budget = shard.order.len();
        while shard.map.len() > self.per_shard && budget > 0 {
            budget -= 1;
            let Some(victim) = shard.order.pop_front() else {
                break;
            };
            let evict = match shard.map.get(&victim) {
                None => continue,
                Some(s) => {
                    victim != offset
                        && !s.is_dirty()
                        && Arc::strong_count(s) == 1
                        && !s.referenced.swap(false, Ordering::Relaxed)
                }
            };
            if evict {
                shard.map.remove(&victim);
            } else {
                shard.order.push_back(victim);
            }
        }
    }

    /// Every dirty slice, for writeback.
    pub fn dirty_slices(&self) -> Vec<Arc<Slice>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            out.extend(shard.map.values().filter(|s| s.is_dirty()).cloned());
        }
        out
    }

    /// Whether any cached slice holds changes not yet written.
    pub fn has_dirty(&self) -> bool {
        self.shards
            .iter()
            .any(|shard| shard.lock().map.values().any(|s| s.is_dirty()))
    }

    /// Whether the cache holds more slices than it should (dirty ones pinned it).
    pub fn over_capacity(&self) -> bool {
        self.shards
            .iter()
            .any(|s| s.lock().map.len() > self.per_shard * 2)
    }

    /// Drops every clean slice of the L2 table at `table_offset` (`len` bytes), used when the
    /// table's cluster is freed so stale slices never shadow a reuse.
    pub fn forget_range(&self, table_offset: u64, len: u64) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard
                .map
                .retain(|&o, _| !(o >= table_offset && o < table_offset + len));
        }
    }
}
