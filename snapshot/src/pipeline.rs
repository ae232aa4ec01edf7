//! Overlapped copying for block jobs: the next chunk is read on a helper thread while the
//! job's own thread writes the previous one.
//!
//! A copy loop that reads a chunk and then writes it leaves one core idle half the time (QEMU's
//! commit and stream jobs are such loops). With reads running one or two chunks ahead, a
//! copy costs about what its writes cost. Only reads move to the helper thread: checkpoints
//! (pause, cancel), throttling and progress stay with the writer, so a paused or cancelled
//! job stops writing at once, and the reader stops as soon as the writer does. The active
//! commit's mirror uses the same [`read_ahead`] on runs taken from its dirty bitmap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use std::sync::Arc;

use storage::file::ImageFile;
use storage::{Allocation, BlockDevice, BlockStatus};

use crate::error::{Error, Result};

/// Items the reader may have ready before the writer takes them.
const READ_AHEAD: usize = 2;

/// Runs `read` on a helper thread and `write` on the calling thread, on the same items in
/// the same order, the reader up to [`READ_AHEAD`] items ahead.
///
/// `read` fills an item and returns `Ok(true)`, or `Ok(false)` when there is nothing left;
/// `write` returns `Ok(false)` to stop early. The first error from either ends the run and
/// is returned. Items read but never written (an early stop, an error) go to `unwritten`,
/// so a caller that took work from somewhere (a dirty bitmap) can put it back.
///
/// `T` is the state handed from `read` to `write` (runs and their data): a few of them
/// circulate between the two threads, so their buffers are allocated once.
pub(crate) fn read_ahead<T, R, W, U>(read: R, mut write: W, mut unwritten: U) -> Result<()>
where
    T: Default + Send,
    R: FnMut(&mut T) -> Result<bool> + Send,
    W: FnMut(&mut T) -> Result<bool>,
    U: FnMut(T),
{
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<T>>(READ_AHEAD);
        let (empty_tx, empty_rx) = mpsc::channel::<T>();
        for _ in 0..=READ_AHEAD {
            // Cannot fail: the receiver is alive until the reader ends.
            let _ = empty_tx.send(T::default());
        }
        let stop = &stop;
        scope.spawn(move || {
            let mut read = read;
            // Ends when the writer stops (no buffer comes back), at the end, or on an error.
            while let Ok(mut item) = empty_rx.recv() {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let result = match read(&mut item) {
                    Ok(false) => return,
                    Ok(true) => Ok(item),
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                if full_tx.send(result).is_err() || failed {
                    return;
                }
            }
        });
        let mut run = || -> Result<()> {
            while let Ok(item) = full_rx.recv() {
                let mut item = item?;
                let go_on = write(&mut item)?;
                let _ = empty_tx.send(item);
                if !go_on {
                    break;
                }
            }
            Ok(())
        };
        let outcome = run();
        // The reader reads nothing more, and ends once it finds no buffer coming back; what
        // it read and did not hand over yet is passed back unwritten.
        stop.store(true, Ordering::Release);
        drop(empty_tx);
        for item in full_rx.iter().flatten() {
            unwritten(item);
        }
        outcome
    })
}

/// One chunk of [`overlapped`]: its byte range and the caller's state.
#[derive(Debug, Default)]
struct Chunk<T> {
    start: u64,
    end: u64,
    state: T,
}

/// Splits `0..size` into `chunk`-sized pieces, calls `read` on each on a helper thread and
/// `write` on each, in order, on the calling thread (see [`read_ahead`]).
pub(crate) fn overlapped<T, R, W>(size: u64, chunk: u64, mut read: R, mut write: W) -> Result<()>
where
    T: Default + Send,
    R: FnMut(u64, u64, &mut T) -> Result<()> + Send,
    W: FnMut(u64, u64, &mut T) -> Result<()>,
{
    assert!(chunk > 0, "overlapped: zero chunk size");
    let mut next = 0;
    read_ahead(
        move |item: &mut Chunk<T>| {
            if next >= size {
                return Ok(false);
            }
            item.start = next;
            item.end = next.saturating_add(chunk).min(size);
            read(item.start, item.end, &mut item.state)?;
            next = item.end;
            Ok(true)
        },
        |item| {
            write(item.start, item.end, &mut item.state)?;
            Ok(true)
        },
        drop,
    )
}

/// The runs of one chunk that a commit copies down, and the data of those that cannot be
/// copied file to file, back to back.
#[derive(Debug, Default)]
pub(crate) struct Extents {
    runs: Vec<Run>,
    data: Vec<u8>,
}

/// One run of [`Extents`].
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Guest offset.
    offset: u64,
    /// Length in bytes.
    len: u64,
    /// Where its bytes come from.
    source: Source,
}

/// Where the bytes of a [`Run`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The run reads as zeroes.
    Zero,
    /// Read into [`Extents::data`] (compressed clusters, layers without a local file).
    Memory,
    /// Stored plainly in the data file of the layer `depth` below the top, from host
    /// offset `host` on: copied file to file without being read here.
    File { depth: u32, host: u64 },
}

/// A run of guest bytes stored plainly in a layer's local file, to be copied file to file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileRun {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The layer (0 is the top) whose [`BlockDevice::data_file`] holds the bytes.
    pub depth: u32,
    /// Host offset of the first byte in that file.
    pub host: u64,
}

impl FileRun {
    /// The data file holding the run, in `layers`.
    pub(crate) fn file<'a>(&self, layers: &'a [Arc<dyn BlockDevice>]) -> Result<&'a ImageFile> {
        let layer = layers.get(self.depth as usize).ok_or_else(|| {
            Error::InvalidArgument(format!("layer {} is not in the chain", self.depth))
        })?;
        layer.data_file().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: the layer has no local file",
                layer.path().display()
            ))
        })
    }
}

impl Extents {
    /// Fills `self` with the runs of `start..end` that one of the `span` layers from
    /// `layers[0]` (the top) down holds. Data stored plainly in a layer's file is only
    /// located; other data (compressed, remote) is read.
    pub(crate) fn read_above(
        &mut self,
        layers: &[Arc<dyn BlockDevice>],
        span: u32,
        start: u64,
        end: u64,
    ) -> Result<()> {
        self.runs.clear();
        let top = &layers[0];
        let mut used = 0;
        let mut at = start;
        while at < end {
            let status = top.block_status(at, end - at)?;
            if status.depth < span {
                let source = match status.allocation {
                    Allocation::Data => match file_extent(layers, &status) {
                        Some(host) => Source::File {
                            depth: status.depth,
                            host,
                        },
                        None => {
                            let len = status.len as usize;
                            if self.data.len() < used + len {
                                self.data.resize(used + len, 0);
                            }
                            top.read_at(&mut self.data[used..used + len], at)?;
                            used += len;
                            Source::Memory
                        }
                    },
                    Allocation::Zero => Source::Zero,
                    Allocation::Unallocated => {
                        at += status.len;
                        continue;
                    }
                };
                self.runs.push(Run {
                    offset: at,
                    len: status.len,
                    source,
                });
            }
            at += status.len;
        }
        Ok(())
    }

    /// Writes the runs into `base`; returns the bytes of data written (zero runs not counted).
    pub(crate) fn write_to(
        &self,
        layers: &[Arc<dyn BlockDevice>],
        base: &dyn BlockDevice,
    ) -> Result<u64> {
        let mut used = 0;
        let mut copied = 0;
        for run in &self.runs {
            match run.source {
                Source::Zero => {
                    base.write_zeroes(run.offset, run.len)?;
                    continue;
                }
                Source::Memory => {
                    base.write_at(&self.data[used..used + run.len as usize], run.offset)?;
                    used += run.len as usize;
                }
                Source::File { depth, host } => {
                    let run = FileRun {
                        offset: run.offset,
                        len: run.len,
                        depth,
                        host,
                    };
                    base.write_from_file(run.offset, run.len, run.file(layers)?, run.host)?;
                }
            }
            copied += run.len;
        }
        Ok(copied)
    }
}

/// The host offset of a data run that `status` describes in `layers`, when its bytes lie
/// plainly in a layer's local file and can be copied file to file.
pub(crate) fn file_extent(layers: &[Arc<dyn BlockDevice>], status: &BlockStatus) -> Option<u64> {
    let layer = layers.get(status.depth as usize)?;
    match (status.allocation, status.offset, status.compressed) {
        (Allocation::Data, Some(host), false) if layer.data_file().is_some() => Some(host),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
