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
use crate::pipeline;

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

/// One run taken from the bitmap and read by [`drain_dirty`].
#[derive(Debug, Default)]
struct ReadRun {
    offset: u64,
    len: u64,
    /// Reads as zeroes: written as a zero write.
    zero: bool,
    data: Vec<u8>,
}

/// Copies runs of dirty granules, reading ahead on a helper thread, until the bitmap is
/// empty or `step` says stop; returns the bytes copied.
///
/// `step` runs on the calling thread after each run is written, with the run's length
/// (progress, throttling, pause and cancel checks); it returns `Ok(false)` to end the pass
/// early, or an error that ends it and is returned. Runs that were taken from the bitmap
/// but not written when the pass ends, for whatever reason, are marked dirty again, so
/// nothing is lost to a cancel or an I/O error.
pub fn drain_dirty(
    source: &dyn BlockDevice,
    target: &Arc<dyn BlockDevice>,
    bitmap: &DirtyBitmap,
    cursor: &mut u64,
    mut step: impl FnMut(u64) -> Result<bool>,
) -> Result<u64> {
    let mut copied = 0;
    let mut at = *cursor;
    let outcome = pipeline::read_ahead(
        |run: &mut ReadRun| {
            let Some((offset, len)) = bitmap.take_run(at, MAX_RUN) else {
                return Ok(false);
            };
            at = (offset + len) / bitmap.granule();
            run.data.resize(len as usize, 0);
            if let Err(e) = source.read_at(&mut run.data, offset) {
                bitmap.mark(offset, len);
                return Err(e.into());
            }
            run.offset = offset;
            run.len = len;
            run.zero = run.data.iter().all(|&b| b == 0);
            Ok(true)
        },
        |run| {
            let written = match run.zero {
                true => target.write_zeroes(run.offset, run.len),
                false => target.write_at(&run.data, run.offset),
            };
            if let Err(e) = written {
                bitmap.mark(run.offset, run.len);
                return Err(e.into());
            }
            copied += run.len;
            step(run.len)
        },
        |run| bitmap.mark(run.offset, run.len),
    );
    *cursor = at;
    outcome.map(|()| copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{ImageFormat, OpenOptions};

    fn raw(dir: &std::path::Path, name: &str, size: u64) -> Arc<dyn BlockDevice> {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let options = OpenOptions {
            format: Some(ImageFormat::Raw),
            ..OpenOptions::default()
        };
        storage::open(&path, &options).unwrap()
    }

    #[test]
    fn a_pass_stopped_early_leaves_the_rest_dirty_and_a_later_pass_finishes() {
        const SIZE: u64 = 8 << 20;
        let dir = tempfile::tempdir().unwrap();
        let source = raw(dir.path(), "source", SIZE);
        let target = raw(dir.path(), "target", SIZE);
        let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8).collect();
        source.write_at(&data, 0).unwrap();
        let bitmap = DirtyBitmap::new(SIZE, 4096).unwrap();
        bitmap.mark(0, SIZE);
        let mut cursor = 0;
        let mut runs = 0;
        let copied = drain_dirty(&*source, &target, &bitmap, &mut cursor, |_| {
            runs += 1;
            Ok(runs < 2)
        })
        .unwrap();
        assert_eq!(copied, 2 * MAX_RUN);
        // Runs the reader had taken ahead went back into the bitmap.
        assert_eq!(bitmap.dirty_bytes(), SIZE - copied);
        let copied = drain_dirty(&*source, &target, &bitmap, &mut cursor, |_| Ok(true)).unwrap();
        assert_eq!(copied, SIZE - 2 * MAX_RUN);
        assert_eq!(bitmap.dirty_bytes(), 0);
        let mut back = vec![0u8; SIZE as usize];
        target.read_at(&mut back, 0).unwrap();
        assert!(back == data, "target differs from source");
    }

    #[test]
    fn an_error_from_the_step_is_returned_and_loses_nothing() {
        const SIZE: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let source = raw(dir.path(), "source", SIZE);
        let target = raw(dir.path(), "target", SIZE);
        let bitmap = DirtyBitmap::new(SIZE, 4096).unwrap();
        bitmap.mark(0, SIZE);
        let mut cursor = 0;
        let result = drain_dirty(&*source, &target, &bitmap, &mut cursor, |_| {
            Err(crate::Error::InvalidArgument("cancelled".into()))
        });
        assert!(result.is_err());
        assert_eq!(bitmap.dirty_bytes(), SIZE - MAX_RUN);
    }
}
