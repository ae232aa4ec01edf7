//! Overlapped copying for block jobs: the next chunk is read on a helper thread while the
//! job's own thread writes the previous one.
//!
//! A copy loop that reads a chunk and then writes it leaves one core idle half the time (QEMU's
//! commit and stream jobs are such loops). With reads running one or two chunks ahead, a
//! copy costs about what its writes cost. Only reads move to the helper thread: checkpoints
//! (pause, cancel), throttling and progress stay with the writer, so a paused or cancelled
//! job stops writing at once, and the reader stops as soon as its buffers are not returned.

use std::sync::mpsc;

use storage::{Allocation, BlockDevice};

use crate::error::Result;

/// Chunks the reader may have ready before the writer takes them.
const READ_AHEAD: usize = 2;

/// Splits `0..size` into `chunk`-sized pieces, calls `read` on each on a helper thread and
/// `write` on each, in order, on the calling thread; the first error from either ends the
/// copy and is returned.
///
/// `T` is the per-chunk state handed from `read` to `write` (runs and their data): a few
/// of them circulate between the two threads, so their buffers are allocated once.
pub(crate) fn overlapped<T, R, W>(size: u64, chunk: u64, read: R, mut write: W) -> Result<()>
where
    T: Default + Send,
    R: FnMut(u64, u64, &mut T) -> Result<()> + Send,
    W: FnMut(u64, u64, &mut T) -> Result<()>,
{
    assert!(chunk > 0, "overlapped: zero chunk size");
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<(u64, u64, Result<T>)>(READ_AHEAD);
        let (empty_tx, empty_rx) = mpsc::channel::<T>();
        for _ in 0..=READ_AHEAD {
            // Cannot fail: the receiver is alive until the reader ends.
            let _ = empty_tx.send(T::default());
        }
        scope.spawn(move || {
            let mut read = read;
            let mut start = 0;
            while start < size {
                // The writer stopped (error, cancel) and dropped its end: stop reading.
                let Ok(mut state) = empty_rx.recv() else {
                    return;
                };
                let end = start.saturating_add(chunk).min(size);
                let result = read(start, end, &mut state).map(|()| state);
                let failed = result.is_err();
                if full_tx.send((start, end, result)).is_err() || failed {
                    return;
                }
                start = end;
            }
        });
        let mut run = || -> Result<()> {
            while let Ok((start, end, state)) = full_rx.recv() {
                let mut state = state?;
                write(start, end, &mut state)?;
                let _ = empty_tx.send(state);
            }
            Ok(())
        };
        let outcome = run();
        // Both ends dropped here, so a reader waiting for a buffer or a slot wakes and ends
        // before the scope joins it.
        drop(full_rx);
        drop(empty_tx);
        outcome
    })
}

/// The runs of one chunk that a commit copies down, and their data back to back.
#[derive(Debug, Default)]
pub(crate) struct Extents {
    /// (guest offset, length, what the run holds); only `Data` and `Zero` runs are kept.
    runs: Vec<(u64, u64, Allocation)>,
    data: Vec<u8>,
}

impl Extents {
    /// Fills `self` with the runs of `start..end` that one of the `span` layers from `top`
    /// down holds, reading their data.
    pub(crate) fn read_above(
        &mut self,
        top: &dyn BlockDevice,
        span: u32,
        start: u64,
        end: u64,
    ) -> Result<()> {
        self.runs.clear();
        let need = (end - start) as usize;
        if self.data.len() < need {
            self.data.resize(need, 0);
        }
        let mut used = 0;
        let mut at = start;
        while at < end {
            let status = top.block_status(at, end - at)?;
            if status.depth < span {
                match status.allocation {
                    Allocation::Data => {
                        let len = status.len as usize;
                        top.read_at(&mut self.data[used..used + len], at)?;
                        used += len;
                        self.runs.push((at, status.len, Allocation::Data));
                    }
                    Allocation::Zero => self.runs.push((at, status.len, Allocation::Zero)),
                    Allocation::Unallocated => {}
                }
            }
            at += status.len;
        }
        Ok(())
    }

    /// Writes the runs into `base`; returns the bytes of data written (zero runs not counted).
    pub(crate) fn write_to(&self, base: &dyn BlockDevice) -> Result<u64> {
        let mut used = 0;
        let mut copied = 0;
        for &(offset, len, allocation) in &self.runs {
            if allocation == Allocation::Zero {
                base.write_zeroes(offset, len)?;
                continue;
            }
            base.write_at(&self.data[used..used + len as usize], offset)?;
            used += len as usize;
            copied += len;
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn every_chunk_is_written_once_in_order() {
        let mut seen = Vec::new();
        overlapped::<Vec<u64>, _, _>(
            10_000,
            3_000,
            |start, end, state| {
                state.clear();
                state.extend([start, end]);
                Ok(())
            },
            |start, end, state| {
                assert_eq!(state.as_slice(), &[start, end]);
                seen.push((start, end));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            [(0, 3000), (3000, 6000), (6000, 9000), (9000, 10_000)]
        );
    }

    #[test]
    fn a_read_error_ends_the_copy_after_the_chunks_before_it() {
        let mut written = Vec::new();
        let result = overlapped::<(), _, _>(
            100,
            10,
            |start, _, _| match start {
                50 => Err(Error::InvalidArgument("bad read at 50".into())),
                _ => Ok(()),
            },
            |start, _, _| {
                written.push(start);
                Ok(())
            },
        );
        assert!(result.unwrap_err().to_string().contains("bad read at 50"));
        assert_eq!(written, [0, 10, 20, 30, 40]);
    }

    #[test]
    fn a_write_error_stops_the_reader_early() {
        let reads = AtomicU64::new(0);
        let result = overlapped::<(), _, _>(
            1 << 30,
            1,
            |_, _, _| {
                reads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            |start, _, _| match start {
                3 => Err(Error::InvalidArgument("cancelled".into())),
                _ => Ok(()),
            },
        );
        assert!(result.is_err());
        // The writer took 4 chunks; the reader can be at most its read-ahead beyond that.
        assert!(reads.load(Ordering::Relaxed) <= 4 + READ_AHEAD as u64 + 1);
    }
}
