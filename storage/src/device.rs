//! The one trait every image layer and every chain implements.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::file::ImageFile;
use crate::format::ImageFormat;

/// Where the data of a guest range lives, as reported by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in the layer at `depth`.
    Data,
    /// The layer at `depth` says the range reads as zeroes (a zero-flagged cluster).
    Zero,
    /// No layer of the chain holds the range: it reads as zeroes.
    Unallocated,
}

/// The state of a run of guest bytes that share one [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes (at least 1, at most the length asked for).
    pub len: u64,
    /// What holds the run.
    pub allocation: Allocation,
    /// The layer that answered: 0 is the device asked, 1 its backing file, and so on. For
    /// [`Allocation::Unallocated`] it is the number of layers in the chain.
    pub depth: u32,
    /// Host offset of the run's first byte in that layer's file, when it is stored plainly
    /// (not for compressed clusters or holes).
    pub offset: Option<u64>,
    /// The run is stored compressed.
    pub compressed: bool,
}

/// Static facts about an image layer, shown by `snapvmm img info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's format.
    pub format: Option<ImageFormat>,
    /// Path the layer was opened from.
    pub filename: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
    /// Backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// Backing format as stored in the image (backing-format extension).
    pub backing_format: Option<String>,
    /// qcow2 compatibility level: "0.10" or "1.1".
    pub compat: Option<String>,
    /// qcow2 lazy_refcounts feature.
    pub lazy_refcounts: bool,
    /// qcow2 refcount width.
    pub refcount_bits: Option<u32>,
    /// qcow2 corrupt bit.
    pub corrupt: bool,
    /// qcow2 compression type: "zlib" or "zstd".
    pub compression_type: Option<String>,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
}

/// A virtual block device: a raw file, one qcow2 layer with its backing chain, or a chain.
///
/// Every method takes `&self` and may be called from several threads at once. Offsets and
/// lengths are in bytes and need no alignment.
pub trait BlockDevice: Send + Sync {
    /// The virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from guest offset `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at guest offset `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Writes `len` guest bytes at `offset` taken from `src` at host offset `src_offset` (an
    /// extent of another layer's [`data_file`](BlockDevice::data_file), as its
    /// [`BlockStatus::offset`] names it): the same as reading them and calling
    /// [`write_at`](BlockDevice::write_at), which is what this default does. Layers kept in
    /// a local file copy file to file in the kernel instead, without passing the bytes
    /// through memory (see [`ImageFile::copy_from`]), in the same order as a write: the
    /// data is in place before any mapping names it.
    fn write_from_file(
        &self,
        offset: u64,
        len: u64,
        src: &ImageFile,
        src_offset: u64,
    ) -> Result<()> {
        const STEP: u64 = 1 << 20;
        let mut buf = vec![0u8; len.min(STEP) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP) as usize;
            src.read_at(&mut buf[..n], src_offset + done)?;
            self.write_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes, unmapping whole clusters where the format
    /// can record zeroes without storing them.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tells the device the range's contents are no longer needed. Whole clusters are unmapped
    /// (and read as zeroes where the format allows); parts of clusters are left unchanged.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// A durability barrier: every write acknowledged before the call is on stable storage,
    /// with the metadata that finds it, when it returns.
    fn flush(&self) -> Result<()>;

    /// Describes the run of bytes starting at `offset`, at most `len` long, that share one
    /// state.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// Whether this layer's format was guessed from its first bytes because none was given.
    /// A writable probed raw image refuses guest writes that would make it probe as another
    /// format; a VMM should warn and ask for an explicit format.
    fn format_probed(&self) -> bool {
        false
    }

    /// Static facts about this layer.
    fn info(&self) -> ImageInfo;

    /// The layer below this one, if any.
    fn backing(&self) -> Option<Arc<dyn BlockDevice>>;

    /// The file this layer lives in.
    fn path(&self) -> &Path;

    /// The local file that this layer's own data lives in, which the host offsets of its
    /// [`block_status`](BlockDevice::block_status) runs (depth 0) point into; `None` for
    /// layers without one (remote disks, wrappers). Lets a job copy this layer's data file
    /// to file ([`write_from_file`](BlockDevice::write_from_file)). Only ever read (as a
    /// copy source): writes go through the layer, which keeps its metadata in step.
    fn data_file(&self) -> Option<&ImageFile> {
        None
    }

    /// This layer as `Any`, for downcasts to a format's own type (see
    /// `as_qcow2` on `dyn BlockDevice`, defined with the qcow2 layer so that this trait does
    /// not depend on any format). Layers without format-specific operations keep `None`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Checks that `offset..offset+len` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}
