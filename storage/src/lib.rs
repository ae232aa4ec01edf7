//! snapvmm's storage layer: qcow2-compatible copy-on-write images, raw images and backing
//! chains behind one [`BlockDevice`] trait.
//!
//! ```no_run
//! use storage::{open, OpenOptions, BlockDevice};
//! # fn main() -> storage::Result<()> {
//! let disk = open("disk.qcow2".as_ref(), &OpenOptions::default())?;
//! let mut sector = [0u8; 512];
//! disk.read_at(&mut sector, 0)?;
//! disk.write_at(&sector, 4096)?;
//! disk.flush()?;
//! # Ok(()) }
//! ```
//!
//! The layer has no threads of its own and no KVM: every call runs on the caller's thread,
//! and every method may be called from several threads at once.

pub mod device;
pub mod error;
pub mod file;
pub mod live;
pub mod open;
pub mod qcow2;
pub mod raw;

pub use device::{Allocation, BlockDevice, BlockStatus, ImageInfo};
pub use error::{Error, Result};
pub use live::LiveDisk;
pub use open::{open, probe_format, OpenOptions, DEFAULT_MAX_CHAIN_DEPTH};

/// The image formats snapvmm reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A plain file: byte N of the disk is byte N of the file.
    Raw,
    /// QEMU's copy-on-write format, versions 2 and 3.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img uses ("raw", "qcow2").
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::InvalidArgument(format!(
                "unknown image format '{other}' (expected raw or qcow2)"
            ))),
        }
    }
}
