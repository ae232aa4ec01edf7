//! The guest-write log of a live disk: which granules changed since a mirror last took them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::check_range;
use crate::error::{Error, Result};

/// Which granules of a disk changed since they were last taken: the guest-write log a
/// mirror copies from. Lock-free: marking is a `fetch_or`, taking a `fetch_and`.
#[derive(Debug)]
pub struct DirtyBitmap {
    granule_bits: u32,
    size: u64,
    words: Box<[AtomicU64]>,
    /// Number of set bits, kept alongside so progress needs no scan.
    count: AtomicU64,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes tracked in `granule`-byte units (a power of
    /// two, at least 512).
    pub fn new(size: u64, granule: u64) -> Result<Self> {
        if !granule.is_power_of_two() || granule < 512 {
            return Err(Error::InvalidArgument(format!(
                "dirty bitmap granule {granule} is not a power of two of at least 512"
            )));
        }
        let granules = size.div_ceil(granule);
        Ok(DirtyBitmap {
            granule_bits: granule.trailing_zeros(),
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            count: AtomicU64::new(0),
        })
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        1 << self.granule_bits
    }

    /// Marks every granule that `offset..offset+len` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return;
        }
        let first = offset >> self.granule_bits;
        let last = (offset + len - 1) >> self.granule_bits;
        for granule in first..=last {
            let bit = 1u64 << (granule % 64);
            let old = self.words[(granule / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            if old & bit == 0 {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Clears and returns the first dirty granule at or after granule `from` (wrapping
    /// round once), as a byte range `(offset, len)`.
    pub fn take_next(&self, from: u64) -> Option<(u64, u64)> {
        let words = self.words.len();
        if words == 0 {
            return None;
        }
        let start_word = ((from / 64) as usize).min(words - 1);
        for step in 0..=words {
            let w = (start_word + step) % words;
            let mut value = self.words[w].load(Ordering::Acquire);
            if step == 0 {
                // Granules below `from` in the first word are visited on the wrap.
                value &= !0u64 << (from % 64);
            }
            while value != 0 {
                let bit = value.trailing_zeros() as u64;
                let mask = 1u64 << bit;
                if self.words[w].fetch_and(!mask, Ordering::AcqRel) & mask != 0 {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    let granule = w as u64 * 64 + bit;
                    let offset = granule << self.granule_bits;
                    return Some((offset, self.granule().min(self.size - offset)));
                }
                value &= !mask;
            }
        }
        None
    }

    /// Like [`DirtyBitmap::take_next`], and goes on taking the dirty granules that follow
    /// it, up to `max_len` bytes in all, so that neighbouring granules are copied in one
    /// request.
    pub fn take_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let (offset, mut len) = self.take_next(from)?;
        let mut granule = (offset + len) >> self.granule_bits;
        while len < max_len && (granule << self.granule_bits) < self.size {
            let word = &self.words[(granule / 64) as usize];
            let mask = 1u64 << (granule % 64);
            if word.fetch_and(!mask, Ordering::AcqRel) & mask == 0 {
                break;
            }
            self.count.fetch_sub(1, Ordering::Relaxed);
            len += self
                .granule()
                .min(self.size - (granule << self.granule_bits));
            granule += 1;
        }
        Some((offset, len))
    }

    /// Number of dirty granules.
    pub fn dirty_granules(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Number of dirty bytes (granules times granule size, the last one clipped).
    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty_granules() << self.granule_bits).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_marks_and_takes_each_granule_once() {
        let map = DirtyBitmap::new(1 << 20, 4096).unwrap();
        map.mark(4095, 2); // granules 0 and 1
        map.mark(200 * 4096, 1);
        map.mark(4096, 10); // already dirty
        assert_eq!(map.dirty_granules(), 3);
        assert_eq!(map.take_next(1), Some((4096, 4096)));
        assert_eq!(map.take_next(2), Some((200 * 4096, 4096)));
        // Wraps round to granule 0.
        assert_eq!(map.take_next(201), Some((0, 4096)));
        assert_eq!(map.take_next(0), None);
        assert_eq!(map.dirty_bytes(), 0);
    }

    #[test]
    fn bitmap_takes_runs_of_neighbours() {
        let map = DirtyBitmap::new(1 << 20, 4096).unwrap();
        map.mark(60 * 4096, 8 * 4096); // granules 60..68, across a word boundary
        map.mark(70 * 4096, 1);
        assert_eq!(map.take_run(0, 1 << 20), Some((60 * 4096, 8 * 4096)));
        assert_eq!(map.take_run(0, 4096), Some((70 * 4096, 4096)));
        map.mark(0, 3 * 4096);
        assert_eq!(map.take_run(0, 2 * 4096), Some((0, 2 * 4096)));
        assert_eq!(map.dirty_granules(), 1);
    }

    #[test]
    fn bitmap_clips_the_last_granule_and_ignores_out_of_range() {
        let map = DirtyBitmap::new(10_000, 4096).unwrap();
        map.mark(9_000, 1000);
        map.mark(20_000, 5);
        assert_eq!(map.take_next(0), Some((8192, 10_000 - 8192)));
        assert!(DirtyBitmap::new(1, 1000).is_err());
    }
}
