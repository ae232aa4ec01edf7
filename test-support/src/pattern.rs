//! Deterministic test data: pseudo-random and compressible bytes, tagged sectors that name
//! the write and sector they belong to, self-verifying 4 KiB blocks, and a byte comparison
//! that reports the first difference.

/// Deterministic pseudo-random bytes (xorshift64*), different for every seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(0x2545_f491_4f6c_dd1d)
        | 1;
    let mut words = vec![0u64; len.div_ceil(8)];
    for w in words.iter_mut() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        *w = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    // SAFETY: a u64 slice viewed as bytes: same allocation, 8 times the length, u8 has no
    // alignment or validity requirements. (A byte loop is slow in unoptimised test builds.)
    let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
    bytes[..len].to_vec()
}

/// Compressible data: runs of repeated bytes derived from `seed`.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let noise = pattern(seed, len.div_ceil(64));
    (0..len).map(|i| noise[i / 64] & 0x0f).collect()
}

/// Panics with the first differing offset (and how many bytes differ) unless equal.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: lengths differ ({} vs {})",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .expect("some byte differs");
    let count = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(actual.len());
    panic!(
        "{what}: {count} bytes differ, first at {first:#x} (sector {}): got {:02x?}, expected {:02x?}",
        first / 512,
        &actual[first..end],
        &expected[first..end]
    );
}

/// Bytes in the sectors the crash and ENOSPC trials tag.
pub const TAG_SECTOR: u64 = 512;

/// The word every 8 bytes of sector `lba` hold after write `seq`; `marker` tells the test
/// files apart so one test's data can never pass for another's.
pub fn sector_tag(marker: u8, seq: u64, lba: u64) -> u64 {
    (marker as u64) << 56 | (seq & 0xffff_ffff) << 24 | lba
}

/// `count` sectors from `sector`, each filled with its tag for write `seq`.
pub fn tagged_sectors(marker: u8, seq: u64, sector: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((count * TAG_SECTOR) as usize);
    for lba in sector..sector + count {
        let word = sector_tag(marker, seq, lba).to_le_bytes();
        for _ in 0..TAG_SECTOR / 8 {
            out.extend_from_slice(&word);
        }
    }
    out
}

/// Whether `actual` (one sector) holds sector `lba`'s tag for write `seq`.
pub fn holds_tag(marker: u8, seq: u64, lba: u64, actual: &[u8]) -> bool {
    let word = sector_tag(marker, seq, lba).to_le_bytes();
    actual.chunks(8).all(|w| w == word)
}

/// Bytes per self-verifying block: the guest's 4K random-write unit.
pub const BLOCK: u64 = 4096;

/// Contents of `block` of disk number `disk` at generation `gen` (0: never written, reads as
/// zeroes). The first 16 bytes name the block and generation, so a misplaced or stale block
/// is recognised.
pub fn block_data(disk: u64, block: u64, gen: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    if gen == 0 {
        return out;
    }
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x = (disk << 48) ^ (block << 20) ^ gen ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The generation a block holds, judged from its contents (None: not a valid block).
pub fn generation_of(disk: u64, block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    (block_data(disk, block, gen) == data).then_some(gen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_name_their_generation() {
        for gen in [0, 1, 7, 1_000_001] {
            assert_eq!(generation_of(3, 9, &block_data(3, 9, gen)), Some(gen));
        }
        assert_eq!(generation_of(3, 10, &block_data(3, 9, 5)), None);
        assert_eq!(generation_of(4, 9, &block_data(3, 9, 5)), None);
    }

    #[test]
    fn tags_tell_writes_and_sectors_apart() {
        let data = tagged_sectors(7, 2, 10, 2);
        assert!(holds_tag(7, 2, 10, &data[..512]));
        assert!(holds_tag(7, 2, 11, &data[512..]));
        assert!(!holds_tag(7, 3, 10, &data[..512]));
        assert!(!holds_tag(8, 2, 10, &data[..512]));
    }

    #[test]
    fn patterns_are_deterministic_and_seeded() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(1, 100)[..37], pattern(1, 37)[..]);
    }
}
