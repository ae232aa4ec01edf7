//! Which host clusters hold metadata, so that no guest data write ever lands on one.
//!
//! A crafted or corrupted L2 entry can point a guest cluster at the header, an L1 or L2
//! table, the refcount structures or the snapshot table; QEMU refuses such writes ("Preventing
//! invalid write on metadata") and marks the image corrupt. The data write path asks
//! [`MetadataMap::contains`] once per write.
//!
//! The set is kept as sorted, disjoint runs of clusters: its size follows the number of
//! metadata runs, never the highest offset named. (A bitmap indexed by offset let a small
//! image whose snapshot tables name far-apart clusters reserve hundreds of MiB.)

use std::collections::BTreeMap;

use parking_lot::RwLock;

/// A set of host cluster indices.
#[derive(Default)]
pub struct MetadataMap {
    /// Runs `start -> end` (exclusive), disjoint and never adjacent.
    runs: RwLock<BTreeMap<u64, u64>>,
}

impl std::fmt::Debug for MetadataMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataMap")
            .field("runs", &self.runs.read().len())
            .finish()
    }
}

impl MetadataMap {
    /// Marks `count` clusters from `first` as metadata.
    pub fn insert(&self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let mut start = first;
        let mut end = first.saturating_add(count);
        let mut runs = self.runs.write();
        // Absorb every run that overlaps or touches [start, end).
        if let Some((&s, &e)) = runs.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<u64> = runs.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = runs.remove(&s) {
                end = end.max(e);
            }
        }
        runs.insert(start, end);
    }

    /// Forgets cluster `cluster` (its refcount dropped to 0).
    pub fn remove(&self, cluster: u64) {
        let mut runs = self.runs.write();
        let Some((&s, &e)) = runs.range(..=cluster).next_back() else {
            return;
        };
        if cluster >= e {
            return;
        }
        runs.remove(&s);
        if s < cluster {
            runs.insert(s, cluster);
        }
        if cluster + 1 < e {
            runs.insert(cluster + 1, e);
        }
    }

    /// Whether cluster `cluster` holds metadata.
    pub fn contains(&self, cluster: u64) -> bool {
        self.runs
            .read()
            .range(..=cluster)
            .next_back()
            .is_some_and(|(_, &e)| cluster < e)
    }

    /// Number of disjoint runs held: what the map's memory is proportional to.
    pub fn runs(&self) -> usize {
        self.runs.read().len()
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
        assert!(map.contains(5) && map.contains(7) && !map.contains(8) && !map.contains(4));
        map.remove(6);
        assert!(!map.contains(6) && map.contains(5) && map.contains(7));
        map.insert(6, 1);
        assert_eq!(map.runs(), 1);
        map.insert(8, 2);
        map.insert(3, 2);
        assert_eq!(map.runs(), 1);
        assert!((3..10).all(|c| map.contains(c)));
        map.insert(u64::MAX - 1, 5);
        assert!(map.contains(u64::MAX - 1));
        map.remove(2);
        map.remove(100);
        assert_eq!(map.runs(), 2);
    }

    /// Finding 10: far-apart clusters cost a run each, not a bitmap up to the highest one.
    #[test]
    fn far_apart_clusters_cost_memory_per_run() {
        let map = MetadataMap::default();
        for k in 0..4096u64 {
            map.insert(k << 20, 1);
        }
        assert_eq!(map.runs(), 4096);
        assert!(map.contains(4095 << 20) && !map.contains((4095 << 20) + 1));
    }
}
