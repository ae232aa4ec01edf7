//! A hash map keyed by file offsets, with a cheap multiplicative hash.
//!
//! Cache lookups sit on every I/O; SipHash's flood resistance buys nothing for keys the image
//! layout chooses, and its cost shows in profiles.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes one `u64` by a Fibonacci multiply; offsets are multiples of 512, so the low nine
/// bits are dropped first.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (value >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A `HashMap` from file offsets to `V`.
pub type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;
