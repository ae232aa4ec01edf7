//! virtio-blk (virtio 1.2 §5.2) on a [`DiskBackend`], normally the storage layer's live disk.
//!
//! - [`request`]: parsing and executing one request from a descriptor chain. The guest is
//!   hostile: every length, range, segment count and status buffer is checked, and a bad
//!   request completes with IOERR or UNSUPP.
//! - [`device`]: the [`Block`] device: features, config space, and one worker thread per
//!   active queue.
//! - [`queue`]: draining one queue, shared with the vhost-user backend.
//! - [`backend`]: the disk trait and an in-memory disk for tests and fuzzing.

pub mod backend;
pub mod device;
pub mod persist;
pub mod queue;
pub mod request;

pub use backend::{DiskBackend, MemoryDisk};
pub use device::{Block, BlockConfig};
pub use request::{Completion, DescriptorInfo, RequestProcessor};

/// The virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request types.
pub mod request_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Read the device id string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Zero ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status codes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Feature bits.
pub mod features {
    /// `seg_max` in config is valid.
    pub const SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` in config is valid.
    pub const BLK_SIZE: u32 = 6;
    /// FLUSH is supported.
    pub const FLUSH: u32 = 9;
    /// Several queues (`num_queues` in config).
    pub const MQ: u32 = 12;
    /// DISCARD is supported.
    pub const DISCARD: u32 = 13;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u32 = 14;
}
