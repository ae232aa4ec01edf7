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
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    let mut offset = 0;
    progress(0, size);
    while offset < size {
        let end = (offset + CHUNK).min(size);
        let mut at = offset;
        while at < end {
            let status = top.block_status(at, end - at)?;
            if (status.depth as usize) < base_depth {
                match status.allocation {
                    Allocation::Zero => writer.write_zeroes(at, status.len)?,
                    Allocation::Data => {
                        let data = &mut buf[..status.len as usize];
                        top.read_at(data, at)?;
                        writer.write_at(data, at)?;
                        copied += status.len;
                    }
                    Allocation::Unallocated => {}
                }
            }
            at += status.len;
        }
        offset = end;
        progress(offset, size);
    }
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
    let chunk = CHUNK.max(cs);
    let mut old_buf = vec![0u8; chunk as usize];
    let mut new_buf = vec![0u8; chunk as usize];
    let mut offset = 0;
    progress(0, size);
    if top.backing().is_some() || new_backing.is_some() {
        while offset < size {
            let end = (offset + chunk).min(size);
            let mut at = offset;
            while at < end {
                let status = top.block_status(at, end - at)?;
                let run_end = at + status.len;
                if status.depth > 0 {
                    // Whole clusters, so writes into `file` never copy-on-write.
                    let start = at / cs * cs;
                    let stop = run_end.next_multiple_of(cs).min(size);
                    rebase_range(
                        &*top,
                        new_backing.as_deref(),
                        start,
                        stop,
                        cs,
                        &mut old_buf,
                        &mut new_buf,
                    )?;
                    at = stop.max(run_end);
                } else {
                    at = run_end;
                }
            }
            offset = end;
            progress(offset, size);
        }
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

/// Copies into `top` the clusters of `start..stop` that `top` does not hold and whose old
/// contents differ from what `new_backing` reads.
fn rebase_range(
    top: &dyn BlockDevice,
    new_backing: Option<&dyn BlockDevice>,
    start: u64,
    stop: u64,
    cs: u64,
    old_buf: &mut [u8],
    new_buf: &mut [u8],
) -> Result<()> {
    let len = (stop - start) as usize;
    // Ranges that read as zeroes in both chains need no reading at all.
    let old_zero = reads_zero(top, start, stop)?;
    let new_zero = match new_backing {
        Some(b) => start >= b.size() || reads_zero(b, start, stop.min(b.size()))?,
        None => true,
    };
    if old_zero && new_zero {
        return Ok(());
    }
    let old = &mut old_buf[..len];
    top.read_at(old, start)?;
    let new = &mut new_buf[..len];
    match new_backing {
        Some(b) if start < b.size() => {
            let n = (b.size() - start).min(len as u64) as usize;
            b.read_at(&mut new[..n], start)?;
            new[n..].fill(0);
        }
        _ => new.fill(0),
    }
    let mut cluster = start;
    while cluster < stop {
        let n = cs.min(stop - cluster) as usize;
        let i = (cluster - start) as usize;
        if old[i..i + n] != new[i..i + n] {
            let status = top.block_status(cluster, n as u64)?;
            // Never overwrite a cluster `top` holds itself.
            if status.depth > 0 {
                top.write_at(&old[i..i + n], cluster)?;
            }
        }
        cluster += n as u64;
    }
    Ok(())
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
