//! Walking an image's backing chain range by range, with what qemu-img map reports for each
//! range: which layer holds it, whether it reads as zeroes, where it lives in that layer's
//! file.
//!
//! [`BlockDevice::block_status`] answers for qcow2 layers directly. Raw layers report every
//! byte as data, so for them this module asks the file system where its holes are
//! (`SEEK_DATA`/`SEEK_HOLE`), as QEMU's file driver does: a hole in a raw file is a zero
//! range, which `map` must show and `convert` need not copy.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use storage::{Allocation, BlockDevice, ImageFormat};

use super::error::CliError;

/// One run of guest bytes with a single state, in qemu-img map's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer holding the run (0 = the image opened); for unallocated runs, the layer
    /// where the lookup ended.
    pub depth: u32,
    /// Some layer of the chain allocates the run.
    pub present: bool,
    /// The run reads as zeroes.
    pub zero: bool,
    /// The run is stored as data.
    pub data: bool,
    /// The run is stored compressed.
    pub compressed: bool,
    /// Host offset in the holding layer's file, when stored plainly.
    pub offset: Option<u64>,
    /// The holding layer's file name, when `offset` is known.
    pub filename: Option<String>,
}

/// A layer of the chain, with a handle for hole queries when it is raw.
struct Layer {
    device: Arc<dyn BlockDevice>,
    raw_file: Option<File>,
}

/// An opened image and every layer below it, indexed by depth.
pub struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    /// Collects the layers below `top`.
    pub fn new(top: Arc<dyn BlockDevice>) -> Self {
        let mut layers = Vec::new();
        let mut next = Some(top);
        while let Some(device) = next {
            next = device.backing();
            let raw_file = if device.info().format == Some(ImageFormat::Raw) {
                // Only used for hole queries: when it cannot be opened, the layer is
                // treated as all data, which is what the engine says anyway.
                File::open(device.path()).ok()
            } else {
                None
            };
            layers.push(Layer { device, raw_file });
        }
        Chain { layers }
    }

    /// The image that was opened (depth 0).
    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.layers[0].device
    }

    /// The state of the run starting at `offset`, at most `len` bytes long.
    pub fn extent(&self, offset: u64, len: u64) -> Result<Extent, CliError> {
        let status = self.top().block_status(offset, len).map_err(|e| {
            CliError::new(format!(
                "could not read metadata of '{}' at offset {offset}: {e}",
                self.top().path().display()
            ))
        })?;
        let depth = status.depth;
        let mut extent = Extent {
            start: offset,
            length: status.len.clamp(1, len.max(1)),
            depth,
            present: true,
            zero: false,
            data: false,
            compressed: status.compressed,
            offset: None,
            filename: None,
        };
        match status.allocation {
            Allocation::Data => {
                extent.data = true;
                extent.offset = status.offset;
                if let Some(file) = self
                    .layers
                    .get(depth as usize)
                    .and_then(|l| l.raw_file.as_ref())
                {
                    let (is_data, run) = raw_run(file, offset, extent.length);
                    extent.length = run;
                    extent.data = is_data;
                    extent.zero = !is_data;
                    extent.offset = Some(offset);
                }
            }
            Allocation::Zero => {
                extent.zero = true;
                extent.offset = status.offset;
            }
            Allocation::Unallocated => {
                extent.present = false;
                extent.zero = true;
                extent.depth = self.unallocated_depth(offset);
            }
        }
        if extent.offset.is_some() {
            extent.filename = self
                .layers
                .get(extent.depth as usize)
                .map(|l| l.device.path().display().to_string());
        }
        Ok(extent)
    }

    /// Where QEMU's lookup of an unallocated guest offset stops: at the first layer without
    /// a backing file, or whose backing file ends before `offset` (QEMU reports those
    /// bytes as zeroes of that layer, depth and all).
    fn unallocated_depth(&self, offset: u64) -> u32 {
        let mut depth = 0;
        while depth + 1 < self.layers.len() && offset < self.layers[depth + 1].device.size() {
            depth += 1;
        }
        depth as u32
    }
}

/// Whether `offset` of a raw file is data or a hole, and for how many bytes (at most `len`).
fn raw_run(file: &File, offset: u64, len: u64) -> (bool, u64) {
    let fd = file.as_raw_fd();
    let Ok(at) = libc::off_t::try_from(offset) else {
        return (true, len);
    };
    // SAFETY: lseek on a file descriptor owned by `file`, which outlives the call; it only
    // moves the file position, which nothing else in this process uses.
    let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if data < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // ENXIO: no data at or after `offset`, the rest is a hole. Anything else (a file
        // system without SEEK_DATA): assume data, which is never wrong.
        return (errno != Some(libc::ENXIO), len);
    }
    let data = data as u64;
    if data > offset {
        return (false, (data - offset).min(len));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
    if hole < 0 || (hole as u64) <= offset {
        return (true, len);
    }
    (true, (hole as u64 - offset).min(len))
}
