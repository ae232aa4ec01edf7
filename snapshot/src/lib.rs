//! Disk snapshots and block jobs for snapvmm, on top of [`storage`]'s live disks.
//!
//! - [`live_snapshot`]: external snapshots of a set of disks, all or none, with a hook that
//!   runs while every disk is quiesced (virsh `snapshot-create-as --disk-only --atomic`).
//! - [`stream`]: pull data from the backing chain into the top (virsh `blockpull`).
//! - [`commit`]: merge layers into a base, including the active layer with a pivot
//!   (virsh `blockcommit [--active --pivot]`).
//! - [`job`]: the job model those two run under (pause, resume, cancel, complete,
//!   set-speed, progress, errors).
//! - [`vm_state`]: the hook a VMM implements so snapshots can hold memory and vCPU state.
//! - [`tree`]: the snapshot tree of a VM: create, revert, delete, list, persisted metadata.
//! - [`offline`]: the same merges on images no VM is using (`img commit`, `img rebase`).
//!
//! The crate has no KVM dependency: every algorithm here runs, and is tested, with threads.
//!
//! ```
//! use std::sync::Arc;
//! use storage::{LiveDisk, OpenOptions};
//! use storage::qcow2::{create, CreateOptions};
//! use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
//! use snapshot::stream::{stream, StreamOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("snapshot-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let base = dir.join("base.qcow2");
//! create(&base, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
//! let disk = LiveDisk::new("vda", storage::open(&base, &OpenOptions::default())?);
//! disk.write_at(b"before", 0)?;
//!
//! // The guest keeps running on overlay.qcow2; base.qcow2 is now read-only and can be
//! // backed up.
//! external_snapshot(&[DiskOverlay::new(&disk, dir.join("overlay.qcow2"))])?;
//! disk.write_at(b"after!", 0)?;
//!
//! // Pull base.qcow2's data into the overlay and make it standalone.
//! stream(&disk, StreamOptions::default())?.wait()?;
//! assert!(disk.top().backing().is_none());
//! let mut back = [0u8; 6];
//! disk.read_at(&mut back, 0)?;
//! assert_eq!(&back, b"after!");
//! # drop(disk); std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

pub mod chain;
pub mod checkpoint;
pub mod commit;
pub mod error;
pub mod job;
pub mod job_status;
pub mod live_snapshot;
pub mod mirror;
pub mod offline;
mod pipeline;
pub mod stream;
pub mod throttle;
pub mod tree;
pub mod vm_state;

pub use error::{Error, HookError, Result};
pub use job::{Job, JobInfo, JobKind, JobOutcome, JobStatus, Progress};
pub use storage;
