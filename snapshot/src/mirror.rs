//! The mirror under an active commit: copies the granules a [`DirtyBitmap`] marks from the
//! guest's view of the disk into a target, until the two are in sync.
//!
//! Correct under concurrent guest writes by ordering alone: the request path marks a
//! granule *after* writing it, and the mirror clears the mark *before* reading it. A write
//! that races a copy therefore always leaves the granule marked, and it is copied again.

use std::sync::Arc;

use storage::live::DirtyBitmap;
use storage::{Allocation, BlockDevice};

use crate::error::Result;

/// Marks every granule of `source` whose data comes from a layer above `base_depth`: what a
/// commit into the layer at `base_depth` must copy.
pub fn mark_allocated(
    source: &dyn BlockDevice,
    base_depth: u32,
    bitmap: &DirtyBitmap,
) -> Result<()> {
    let size = source.size();
    let mut at = 0;
    while at < size {
        let status = source.block_status(at, size - at)?;
        if status.depth < base_depth && status.allocation != Allocation::Unallocated {
            bitmap.mark(at, status.len);
        }
        at += status.len;
    }
    Ok(())
}

/// Copies one granule of the guest's view (`source`) into `target`: zeroes as a zero write
/// (a flag, not data, on qcow2 v3), data as data.
pub fn copy_granule(
    source: &dyn BlockDevice,
    target: &Arc<dyn BlockDevice>,
    buf: &mut Vec<u8>,
    offset: u64,
    len: u64,
) -> Result<()> {
    buf.resize(len as usize, 0);
    source.read_at(buf, offset)?;
    if buf.iter().all(|&b| b == 0) {
        target.write_zeroes(offset, len)?;
    } else {
        target.write_at(buf, offset)?;
    }
    Ok(())
}

/// Longest run of neighbouring dirty granules copied in one request.
pub const MAX_RUN: u64 = 1 << 20;

/// Copies runs of dirty granules until the bitmap is empty or `budget` bytes were copied;
/// returns the bytes copied. A run whose copy fails is marked dirty again.
pub fn copy_dirty(
    source: &dyn BlockDevice,
    target: &Arc<dyn BlockDevice>,
    bitmap: &DirtyBitmap,
    cursor: &mut u64,
    budget: u64,
) -> Result<u64> {
    let mut buf = Vec::new();
    let mut copied = 0;
    while copied < budget {
        let Some((offset, len)) = bitmap.take_run(*cursor, MAX_RUN) else {
            break;
        };
        if let Err(e) = copy_granule(source, target, &mut buf, offset, len) {
            bitmap.mark(offset, len);
            return Err(e);
        }
        *cursor = (offset + len) / bitmap.granule();
        copied += len;
    }
    Ok(copied)
}
