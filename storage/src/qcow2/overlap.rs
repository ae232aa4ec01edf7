//! Which host clusters hold metadata, so that no guest data write ever lands on one.
//!
//! A crafted or corrupted L2 entry can point a guest cluster at the header, an L1 or L2
//! table, the refcount structures or the snapshot table; QEMU refuses such writes ("Preventing
//! invalid write on metadata") and marks the image corrupt. The data write path asks
//! [`MetadataMap::contains`] once per write: a lock-free two-level bitmap, one bit per host
//! cluster, whose second level is allocated on first use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Clusters one second-level chunk covers (128 KiB of bits).
const CHUNK_CLUSTERS: u64 = 1 << 20;
/// First-level slots: 2^32 clusters in all (2 TiB of 512-byte clusters, 256 TiB of 64 KiB).
const CHUNKS: usize = 4096;

/// A set of host cluster indices.
pub struct MetadataMap {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl Default for MetadataMap {
    fn default() -> Self {
        MetadataMap {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl std::fmt::Debug for MetadataMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataMap").finish_non_exhaustive()
    }
}

impl MetadataMap {
    fn slot(&self, cluster: u64, create: bool) -> Option<(&AtomicU64, u64)> {
        let chunk = self.chunks.get((cluster / CHUNK_CLUSTERS) as usize)?;
        let words = if create {
            chunk.get_or_init(|| {
                (0..CHUNK_CLUSTERS / 64)
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
        } else {
            chunk.get()?
        };
        let bit = cluster % CHUNK_CLUSTERS;
        Some((&words[(bit / 64) as usize], 1 << (bit % 64)))
    }

    /// Marks `count` clusters from `first` as metadata.
    pub fn insert(&self, first: u64, count: u64) {
        for cluster in first..first.saturating_add(count) {
            if let Some((word, mask)) = self.slot(cluster, true) {
                word.fetch_or(mask, Ordering::AcqRel);
            }
        }
    }

    /// Forgets cluster `cluster` (its refcount dropped to 0).
    pub fn remove(&self, cluster: u64) {
        if let Some((word, mask)) = self.slot(cluster, false) {
            word.fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// Whether cluster `cluster` holds metadata.
    pub fn contains(&self, cluster: u64) -> bool {
        self.slot(cluster, false)
            .is_some_and(|(word, mask)| word.load(Ordering::Acquire) & mask != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_contains_remove() {
        let map = MetadataMap::default();
        assert!(!map.contains(5));
        map.insert(5, 3);
        assert!(map.contains(5) && map.contains(7) && !map.contains(8));
        map.remove(6);
        assert!(!map.contains(6));
        map.insert(CHUNK_CLUSTERS * 3 + 1, 1);
        assert!(map.contains(CHUNK_CLUSTERS * 3 + 1));
        assert!(!map.contains(u64::MAX));
    }
}
