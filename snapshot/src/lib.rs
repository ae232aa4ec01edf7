//! Disk snapshots, block jobs and checkpoints for snapvmm.
//!
//! This crate stands on [`storage`] and will hold live overlay switching, stream and commit
//! jobs and the checkpoint file format. It has no KVM dependency: everything here is testable
//! with threads.

pub use storage;
