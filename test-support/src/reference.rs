//! A byte-for-byte reference of a disk ([`Model`]) and the operation sequences ([`Op`],
//! [`mixed_ops`]) that the storage tests apply alike to it and to a device under test.

use std::path::Path;
use std::sync::Arc;

use storage::BlockDevice;

use crate::image::open_rw;
use crate::pattern::pattern;

/// The raw reference of a disk: applies the same operations as the device under test to a
/// byte vector, with snapvmm's documented semantics for whole-cluster unmapping.
#[derive(Debug, Clone)]
pub struct Model {
    /// What every guest byte must read.
    pub data: Vec<u8>,
    /// What the backing chain reads (zeroes without one, zero-padded to the disk size).
    pub below: Vec<u8>,
    /// Cluster size of the top qcow2 layer.
    pub cluster_size: u64,
    /// Whether a discarded whole cluster reads zero (no backing file, or qcow2 v3) rather
    /// than the backing file's data (v2 over a backing file).
    pub discard_reads_zero: bool,
}

impl Model {
    /// A model of a fresh overlay over `below` (all zeroes when there is no backing file).
    pub fn new(below: Vec<u8>, cluster_size: u64, discard_reads_zero: bool) -> Self {
        Model {
            data: below.clone(),
            below,
            cluster_size,
            discard_reads_zero,
        }
    }

    /// A write of `buf` at `offset`.
    pub fn write(&mut self, buf: &[u8], offset: u64) {
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
    }

    /// `write_zeroes`: always reads back zero.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        self.data[offset as usize..(offset + len) as usize].fill(0);
    }

    /// `discard`: whole clusters (the last one may end at the disk's end) are unmapped;
    /// parts of clusters keep their data.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let size = self.data.len() as u64;
        let cs = self.cluster_size;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let whole = at % cs == 0 && (n == cs || at + n == size);
            if whole {
                let range = at as usize..(at + n) as usize;
                if self.discard_reads_zero {
                    self.data[range].fill(0);
                } else {
                    let below = self.below[range.clone()].to_vec();
                    self.data[range].copy_from_slice(&below);
                }
            }
            at += n;
        }
    }
}

/// One operation of a test sequence, applied alike to a device and to a [`Model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at` of `pattern(seed, len)` at `offset`.
    Write {
        /// Guest byte offset.
        offset: u64,
        /// Bytes written.
        len: u64,
        /// Seed of the written [`pattern`].
        seed: u64,
    },
    /// `write_zeroes`.
    Zeroes {
        /// Guest byte offset.
        offset: u64,
        /// Bytes zeroed.
        len: u64,
    },
    /// `discard`.
    Discard {
        /// Guest byte offset.
        offset: u64,
        /// Bytes discarded.
        len: u64,
    },
    /// `flush`.
    Flush,
    /// Close the device (dropping it flushes) and open it again.
    Reopen,
}

impl Model {
    /// Applies `op` to the model (`Flush` and `Reopen` change nothing visible).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { offset, len, seed } => self.write(&pattern(seed, len as usize), offset),
            Op::Zeroes { offset, len } => self.write_zeroes(offset, len),
            Op::Discard { offset, len } => self.discard(offset, len),
            Op::Flush | Op::Reopen => {}
        }
    }
}

/// Applies `op` to the device, reopening it from `path` (read-write) for `Op::Reopen`.
pub fn apply(disk: &mut Arc<dyn BlockDevice>, path: &Path, op: &Op) {
    let result = match *op {
        Op::Write { offset, len, seed } => disk.write_at(&pattern(seed, len as usize), offset),
        Op::Zeroes { offset, len } => disk.write_zeroes(offset, len),
        Op::Discard { offset, len } => disk.discard(offset, len),
        Op::Flush => disk.flush(),
        Op::Reopen => {
            // Replace first so the old handle is dropped (and flushed) before the new open.
            *disk = Arc::new(NullDevice);
            *disk = open_rw(path);
            Ok(())
        }
    };
    if let Err(e) = result {
        panic!("{op:?} on {}: {e}", path.display());
    }
}

/// A placeholder device used only while a real one is being reopened.
pub struct NullDevice;

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn write_at(&self, _: &[u8], _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn write_zeroes(&self, _: u64, _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn discard(&self, _: u64, _: u64) -> storage::Result<()> {
        unreachable!("placeholder device")
    }
    fn flush(&self) -> storage::Result<()> {
        Ok(())
    }
    fn block_status(&self, _: u64, _: u64) -> storage::Result<storage::BlockStatus> {
        unreachable!("placeholder device")
    }
    fn read_only(&self) -> bool {
        true
    }
    fn info(&self) -> storage::ImageInfo {
        storage::ImageInfo::default()
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn path(&self) -> &Path {
        Path::new("")
    }
}

/// A deterministic mix of writes (aligned and not, inside one cluster and across clusters
/// and L2 tables), zeroes, discards and flushes over a disk of `size` bytes.
pub fn mixed_ops(size: u64, cluster_size: u64, seed: u64, count: usize) -> Vec<Op> {
    let mut rng = pattern(seed, count * 40).into_iter();
    let mut next = move || {
        let mut v = 0u64;
        for _ in 0..5 {
            v = (v << 8) | rng.next().unwrap_or(0x5a) as u64;
        }
        v
    };
    let l2_span = cluster_size * (cluster_size / 8);
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let kind = next() % 16;
        let aligned = next() % 3 != 0;
        let mut offset = next() % size;
        // Aim some requests at cluster and L2-table boundaries.
        match next() % 4 {
            0 => offset = (offset / cluster_size * cluster_size).saturating_sub(next() % 1024),
            1 if l2_span < size => {
                offset = (offset / l2_span * l2_span).saturating_sub(cluster_size / 2)
            }
            _ => {}
        }
        let max_len = match next() % 4 {
            0 => 512,
            1 => cluster_size,
            2 => 3 * cluster_size,
            _ => (size / 8).clamp(1, 512 << 10),
        };
        let mut len = 1 + next() % max_len;
        if aligned {
            offset = offset / 512 * 512;
            len = len.div_ceil(512) * 512;
        }
        offset = offset.min(size - 1);
        len = len.min(size - offset).max(1);
        let op = match kind {
            0..=8 => Op::Write {
                offset,
                len,
                seed: seed.wrapping_mul(1000).wrapping_add(i as u64),
            },
            9..=11 => Op::Zeroes { offset, len },
            12..=14 => Op::Discard { offset, len },
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}
