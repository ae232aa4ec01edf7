//! qcow2 images: header, tables, caches, allocator, checker and creation.

pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod entry;
pub mod header;
mod image;
mod live_ops;
mod offset_map;
pub mod overlap;
pub mod refcount;
pub mod snapshot;
mod snapshot_ops;

pub use check::{check, CheckReport, RepairMode};
pub use create::{create, CreateOptions};
pub use header::{CompressionType, Header};
pub use image::Qcow2Image;
pub use live_ops::Fill;
