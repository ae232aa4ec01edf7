//! Commit and rebase on images no VM is using: the engines of `snapvmm img commit` and
//! `snapvmm img rebase`, with qemu-img's semantics.
//!
//! Both report progress through a callback taking (bytes done, bytes in all), so a CLI can
//! draw a bar and a library caller can ignore it.

use std::path::Path;
use std::sync::Arc;

use storage::{Allocation, BlockDevice, ImageFormat, OpenOptions};

use crate::chain;
use crate::error::{Error, Result};
use crate::pipeline::{self, Extents, FileRun};

/// Guest bytes handled per step.
const CHUNK: u64 = 2 << 20;

/// What [`commit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitSummary {
    /// The image committed into.
    pub base: std::path::PathBuf,
    /// Bytes of data copied.
    pub copied: u64,
    /// Whether the committed image was emptied.
    pub emptied: bool,
}

/// `qemu-img commit [-b BASE] [-d] FILE`: copies what the layers from `file` down to just
/// above `base` hold into `base` (default: `file`'s backing file). Without `base` and
/// without `keep`, `file` is emptied afterwards so it reads through to `base`; with `base`,
/// nothing is emptied (the intermediate layers no longer read correctly on their own, but
/// `file` does), as qemu-img does.
pub fn commit(
    file: &Path,
    base: Option<&Path>,
    keep: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitSummary> {
    let top = storage::open(
        file,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    let layers = chain::layers(&top);
    let name = file.display().to_string();
    let base_depth = match base {
        Some(b) => chain::depth_of(&layers, b, &name)?,
        None => 1,
    };
    if base_depth == 0 || base_depth >= layers.len() {
        return Err(Error::InvalidArgument(format!(
            "{}: has no backing file to commit into",
            file.display()
        )));
    }
    let base_layer = layers[base_depth].clone();
    if base_layer.size() < top.size() {
        return Err(Error::InvalidArgument(format!(
            "{}: backing file is smaller ({} bytes) than {} ({} bytes); resize it first",
            base_layer.path().display(),
            base_layer.size(),
            file.display(),
            top.size()
        )));
    }
    let writer = chain::reopen_writable(&base_layer)?;
    if let Some(image) = layers[base_depth - 1].as_qcow2() {
        image.replace_backing_device(Some(writer.clone()));
    }
    let size = top.size();
    let span = base_depth as u32;
    let mut copied = 0;
    progress(0, size);
    pipeline::overlapped(
        size,
        CHUNK,
        |start, end, extents: &mut Extents| extents.read_above(&layers, span, start, end),
        |_, end, extents| {
            copied += extents.write_to(&layers, &*writer)?;
            progress(end, size);
            Ok(())
        },
    )?;
    writer.flush()?;
    let emptied = base.is_none() && !keep;
    if emptied {
        let top_writer = chain::reopen_writable(&top)?;
        let image = top_writer.as_qcow2().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: only qcow2 images can be emptied",
                file.display()
            ))
        })?;
        image.make_empty()?;
    }
    Ok(CommitSummary {
        base: base_layer.path().to_path_buf(),
        copied,
        emptied,
    })
}

/// `qemu-img rebase [-u] -b BACKING [-F FMT] FILE`: makes `backing` (`None`: no backing file
/// at all) the backing file of `file`.
///
/// Safe mode (`unsafe_mode` false) first copies into `file` every cluster it does not hold
/// whose contents differ between the old chain and the new one, so `file` reads the same
/// afterwards. Unsafe mode only rewrites the header. Relative names are relative to `file`'s
/// directory, as in the header.
pub fn rebase(
    file: &Path,
    backing: Option<&str>,
    format: Option<ImageFormat>,
    unsafe_mode: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let resolved = backing.map(|name| storage::open::resolve_backing_path(file, name));
    if unsafe_mode {
        let top = storage::qcow2::Qcow2Image::open(
            file,
            &OpenOptions {
                open_backing: false,
                ..OpenOptions::default()
            },
        )?;
        let format = match (&resolved, format) {
            (Some(_), Some(f)) => Some(f),
            (Some(path), None) => storage::probe_format(path).ok(),
            (None, _) => None,
        };
        progress(0, 1);
        top.set_backing(backing, format, None)?;
        progress(1, 1);
        return Ok(());
    }
    let top = storage::open(file, &OpenOptions::default())?;
    let image = top.as_qcow2().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: only qcow2 images have a backing file",
            file.display()
        ))
    })?;
    let new_backing: Option<Arc<dyn BlockDevice>> = match &resolved {
        Some(path) => Some(storage::open(
            path,
            &OpenOptions {
                read_only: true,
                format,
                ..OpenOptions::default()
            },
        )?),
        None => None,
    };
    let size = top.size();
    let cs = image.cluster_size();
    progress(0, size);
    if top.backing().is_some() || new_backing.is_some() {
        let layers = chain::layers(&top);
        pipeline::overlapped(
            size,
            CHUNK.max(cs),
            |start, end, diff: &mut Differences| {
                diff.read(&layers, new_backing.as_deref(), cs, start, end)
            },
            |_, end, diff| {
                diff.write_to(&layers)?;
                progress(end, size);
                Ok(())
            },
        )?;
    }
    let new_format = match (&new_backing, format) {
        (None, _) => None,
        (Some(_), Some(f)) => Some(f),
        (Some(b), None) => Some(chain::format_of(&**b)),
    };
    image.set_backing(backing, new_format, new_backing)?;
    progress(size, size);
    Ok(())
}

/// The clusters of one chunk that a safe rebase must copy into the top, with their data or
/// where it lies.
#[derive(Debug, Default)]
struct Differences {
    /// The chunk's first byte.
    start: u64,
    /// (guest offset, length) of each run of whole clusters to write from `old`.
    clusters: Vec<(u64, u64)>,
    /// Runs of whole clusters to copy file to file.
    extents: Vec<FileRun>,
    /// The chunk as the old chain reads it, from the chunk's first byte (only where read).
    old: Vec<u8>,
    /// The same bytes as the new backing chain reads them.
    new: Vec<u8>,
}

/// Bytes read from the start of a cluster to tell whether it differs from zeroes before
/// reading all of it: data that is not zero almost always shows it in its first page.
const PROBE: u64 = 4096;

impl Differences {
    /// Finds the clusters of `start..end` (cluster aligned) that the top (`layers[0]`) does
    /// not hold and whose old contents differ from what `new_backing` reads, and keeps their
    /// old data or, where it lies plainly in a layer's file, its place.
    fn read(
        &mut self,
        layers: &[Arc<dyn BlockDevice>],
        new_backing: Option<&dyn BlockDevice>,
        cs: u64,
        start: u64,
        end: u64,
    ) -> Result<()> {
        let top = &*layers[0];
        self.start = start;
        self.clusters.clear();
        self.extents.clear();
        let need = (end - start) as usize;
        for buf in [&mut self.old, &mut self.new] {
            if buf.len() < need {
                buf.resize(need, 0);
            }
        }
        let mut at = start;
        while at < end {
            let status = top.block_status(at, end - at)?;
            let run_end = at + status.len;
            if status.depth == 0 {
                at = run_end;
                continue;
            }
            // Whole clusters of a plain extent where the new chain reads zeroes: only probes
            // are read, and the clusters that differ are copied file to file.
            let whole_end = if run_end == top.size() {
                run_end
            } else {
                run_end / cs * cs
            };
            if at % cs == 0 && whole_end > at {
                if let Some(host) = pipeline::file_extent(layers, &status) {
                    let new_zero = match new_backing {
                        Some(b) => at >= b.size() || reads_zero(b, at, whole_end.min(b.size()))?,
                        None => true,
                    };
                    if new_zero {
                        self.probe(layers, status.depth, host, cs, at, whole_end)?;
                        at = whole_end;
                        continue;
                    }
                }
            }
            // Whole clusters, so writes into `top` never copy-on-write.
            let from = at / cs * cs;
            let stop = run_end.next_multiple_of(cs).min(end);
            self.compare(top, new_backing, cs, from - start, stop - start)?;
            at = stop.max(run_end);
        }
        Ok(())
    }

    /// Notes the clusters of `from..to`, stored from `host` on in the file of the layer at
    /// `depth`, that are not all zeroes: a cluster whose first [`PROBE`] bytes are not all
    /// zero differs; only the others are read whole.
    fn probe(
        &mut self,
        layers: &[Arc<dyn BlockDevice>],
        depth: u32,
        host: u64,
        cs: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let file = FileRun {
            offset: from,
            len: to - from,
            depth,
            host,
        }
        .file(layers)?;
        let mut probe = [0u8; PROBE as usize];
        let mut cluster = from;
        while cluster < to {
            let n = cs.min(to - cluster);
            let at = host + (cluster - from);
            let head = &mut probe[..PROBE.min(n) as usize];
            file.read_at(head, at)?;
            let mut differs = head.iter().any(|&b| b != 0);
            if !differs && n > PROBE {
                let i = (cluster + PROBE - self.start) as usize;
                let rest = &mut self.old[i..i + (n - PROBE) as usize];
                file.read_at(rest, at + PROBE)?;
                differs = rest.iter().any(|&b| b != 0);
            }
            if differs {
                // Neighbouring clusters, neighbours in the file too, join into one copy.
                match self.extents.last_mut() {
                    Some(run)
                        if run.offset + run.len == cluster
                            && run.depth == depth
                            && run.host + run.len == at =>
                    {
                        run.len += n
                    }
                    _ => self.extents.push(FileRun {
                        offset: cluster,
                        len: n,
                        depth,
                        host: at,
                    }),
                }
            }
            cluster += n;
        }
        Ok(())
    }

    /// Compares the chunk's bytes `from..to` in the two chains and notes the clusters that
    /// differ.
    fn compare(
        &mut self,
        top: &dyn BlockDevice,
        new_backing: Option<&dyn BlockDevice>,
        cs: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let (first, stop) = (self.start + from, self.start + to);
        // Ranges that read as zeroes in both chains need no reading at all.
        let old_zero = reads_zero(top, first, stop)?;
        let new_zero = match new_backing {
            Some(b) => first >= b.size() || reads_zero(b, first, stop.min(b.size()))?,
            None => true,
        };
        if old_zero && new_zero {
            return Ok(());
        }
        let old = &mut self.old[from as usize..to as usize];
        top.read_at(old, first)?;
        // Where the new chain reads as zeroes (no backing file at all, most often), the old
        // data is checked for zeroes instead of compared with a zeroed buffer.
        let new = match new_backing {
            _ if new_zero => None,
            Some(b) => {
                let new = &mut self.new[from as usize..to as usize];
                let n = (b.size() - first).min(to - from) as usize;
                b.read_at(&mut new[..n], first)?;
                new[n..].fill(0);
                Some(&*new)
            }
            None => None,
        };
        let mut cluster = first;
        while cluster < stop {
            let n = cs.min(stop - cluster);
            let i = (cluster - first) as usize;
            let old = &old[i..i + n as usize];
            let differs = match new {
                Some(new) => old != &new[i..i + n as usize],
                None => old.iter().any(|&b| b != 0),
            };
            if differs {
                // Neighbouring clusters join into one run: one write, one allocation.
                match self.clusters.last_mut() {
                    Some((at, len)) if *at + *len == cluster => *len += n,
                    _ => self.clusters.push((cluster, n)),
                }
            }
            cluster += n;
        }
        Ok(())
    }

    /// Writes the differing runs into the top (`layers[0]`), skipping any part it holds
    /// itself by now.
    fn write_to(&self, layers: &[Arc<dyn BlockDevice>]) -> Result<()> {
        let top = &*layers[0];
        for &(run, run_len) in &self.clusters {
            let mut at = run;
            while at < run + run_len {
                let status = top.block_status(at, run + run_len - at)?;
                // Never overwrite what `top` holds itself.
                if status.depth > 0 {
                    let from = (at - self.start) as usize;
                    top.write_at(&self.old[from..from + status.len as usize], at)?;
                }
                at += status.len;
            }
        }
        for run in &self.extents {
            let file = run.file(layers)?;
            let end = run.offset + run.len;
            let mut at = run.offset;
            while at < end {
                let status = top.block_status(at, end - at)?;
                // Never overwrite what `top` holds itself.
                if status.depth > 0 {
                    top.write_from_file(at, status.len, file, run.host + (at - run.offset))?;
                }
                at += status.len;
            }
        }
        Ok(())
    }
}

/// Whether every byte of `start..stop` reads as zero according to block status alone.
fn reads_zero(device: &dyn BlockDevice, start: u64, stop: u64) -> Result<bool> {
    let mut at = start;
    while at < stop {
        let status = device.block_status(at, stop - at)?;
        if status.allocation == Allocation::Data {
            return Ok(false);
        }
        at += status.len;
    }
    Ok(true)
}
