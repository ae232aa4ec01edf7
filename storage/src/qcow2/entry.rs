//! L1 and L2 table entries: what the bits mean and what a guest cluster maps to.

/// Host-offset bits of L1 and standard L2 entries (bits 9–55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster's refcount is exactly 1: it may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is stored compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (version 3).
pub const OFLAG_ZERO: u64 = 1;
/// Bits that must be clear in an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits that must be clear in a standard L2 entry (the zero flag is handled separately).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What one guest cluster maps to in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing here: read the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes; `host` is a cluster kept allocated for it (preallocated zero cluster).
    Zero {
        /// Host offset of the reserved cluster, if any.
        host: Option<u64>,
        /// COPIED flag of the entry.
        copied: bool,
    },
    /// Plain data at `host`.
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// COPIED flag: refcount is exactly 1.
        copied: bool,
    },
    /// Compressed data.
    Compressed(CompressedExtent),
}

/// Where a compressed cluster's bytes lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedExtent {
    /// Byte offset of the first compressed byte.
    pub offset: u64,
    /// Upper bound on the compressed length in bytes.
    pub len: u64,
    /// The 512-byte sectors the extent occupies, for refcounting: first sector's byte offset.
    pub sectors_start: u64,
    /// Number of 512-byte sectors occupied.
    pub sectors: u64,
}

impl Mapping {
    /// The host clusters this mapping holds a reference on, as (first byte, byte length).
    pub fn host_extent(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Mapping::Data { host, .. } => Some((host, cluster_size)),
            Mapping::Zero { host: Some(h), .. } => Some((h, cluster_size)),
            Mapping::Compressed(c) => Some((c.sectors_start, c.sectors * 512)),
            _ => None,
        }
    }
}

/// Why an entry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError(pub String);

/// Decodes an L1 entry into the L2 table offset (0 for none) and its COPIED flag.
pub fn decode_l1(entry: u64, cluster_size: u64) -> Result<(u64, bool), EntryError> {
    if entry & L1_RESERVED != 0 {
        return Err(EntryError(format!(
            "L1 entry {entry:#x} has reserved bits set"
        )));
    }
    let offset = entry & OFFSET_MASK;
    if offset % cluster_size != 0 {
        return Err(EntryError(format!(
            "L2 table offset {offset:#x} is not cluster aligned"
        )));
    }
    Ok((offset, entry & OFLAG_COPIED != 0))
}

/// Decodes an L2 entry of an image with `cluster_bits` and the given version.
pub fn decode_l2(entry: u64, cluster_bits: u32, version: u32) -> Result<Mapping, EntryError> {
    let cluster_size = 1u64 << cluster_bits;
    if entry & OFLAG_COMPRESSED != 0 {
        // x = 62 - (cluster_bits - 8): low x bits are the byte offset, the next
        // (cluster_bits - 8) bits the number of additional 512-byte sectors.
        let shift = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let extra = (entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1);
        let sectors = extra + 1;
        let sectors_start = offset & !511;
        let len = sectors * 512 - (offset & 511);
        if entry & OFLAG_COPIED != 0 {
            return Err(EntryError(format!(
                "compressed L2 entry {entry:#x} has the COPIED flag"
            )));
        }
        return Ok(Mapping::Compressed(CompressedExtent {
            offset,
            len,
            sectors_start,
            sectors,
        }));
    }
    if entry & L2_RESERVED != 0 {
        return Err(EntryError(format!(
            "L2 entry {entry:#x} has reserved bits set"
        )));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & OFLAG_COPIED != 0;
    if host % cluster_size != 0 {
        return Err(EntryError(format!(
            "data cluster offset {host:#x} is not cluster aligned"
        )));
    }
    if entry & OFLAG_ZERO != 0 {
        if version < 3 {
            return Err(EntryError(format!(
                "L2 entry {entry:#x} has the zero flag in a version 2 image"
            )));
        }
        return Ok(Mapping::Zero {
            host: (host != 0).then_some(host),
            copied,
        });
    }
    if host == 0 {
        if copied {
            return Err(EntryError(format!(
                "L2 entry {entry:#x} is COPIED but maps no cluster"
            )));
        }
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data { host, copied })
}

/// Encodes a compressed L2 entry.
pub fn encode_compressed(offset: u64, compressed_len: u64, cluster_bits: u32) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    let end = offset + compressed_len - 1;
    let extra_sectors = (end >> 9) - (offset >> 9);
    OFLAG_COMPRESSED | (extra_sectors << shift) | offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_round_trip() {
        let e = encode_compressed(0x50123, 3000, 16);
        match decode_l2(e, 16, 3).unwrap() {
            Mapping::Compressed(c) => {
                assert_eq!(c.offset, 0x50123);
                assert!(c.len >= 3000);
                assert_eq!(c.sectors_start, 0x50000);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn zero_flag_needs_v3() {
        assert!(decode_l2(OFLAG_ZERO, 16, 2).is_err());
        assert_eq!(
            decode_l2(OFLAG_ZERO, 16, 3).unwrap(),
            Mapping::Zero {
                host: None,
                copied: false
            }
        );
    }

    #[test]
    fn unaligned_offsets_refused() {
        assert!(decode_l2(0x10200 | OFLAG_COPIED, 16, 3).is_err());
        assert!(decode_l1(0x10200, 1 << 16).is_err());
    }
}
