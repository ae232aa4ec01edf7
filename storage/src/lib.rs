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
pub mod fault;
pub mod file;
pub mod format;
pub mod live;
pub mod lock;
pub mod open;
pub mod options;
pub mod qcow2;
pub mod raw;

pub use device::{Allocation, BlockDevice, BlockStatus, ImageInfo};
pub use error::{Error, Result};
pub use format::ImageFormat;
pub use live::LiveDisk;
pub use open::{open, probe_format};
pub use options::{OpenOptions, DEFAULT_MAX_CHAIN_DEPTH};
