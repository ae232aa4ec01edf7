//! The hook through which the snapshot layer captures and restores a running guest's
//! non-disk state (memory, vCPUs, devices) at the same instant as its disks.
//!
//! This crate has no KVM in it: the VMM implements [`VmState`] and hands it to the snapshot
//! tree, which calls it in this order when it takes a snapshot with memory:
//! [`VmState::pause_vcpus`] → (disks quiesced) → [`VmState::save_checkpoint`] or
//! [`VmState::save_stream`] → (overlays switched) → [`VmState::resume_vcpus`];
//! and when it reverts: pause → (disks pointed at the snapshot's images) →
//! [`VmState::load_checkpoint`] or [`VmState::load_stream`] → resume.

use std::io::{Read, Write};
use std::path::Path;

/// An error from the VM side; its message is shown to the user as it is.
pub type VmStateError = Box<dyn std::error::Error + Send + Sync>;

/// A running VM whose memory, vCPU and device state can be saved and loaded in place.
///
/// Implementations never change which images the disks use: the caller has already pointed
/// every disk at the right chain before a load, and drains and flushes the disks around a save.
pub trait VmState: Send + Sync {
    /// Holds every vCPU outside guest mode, and lets the VM's in-flight disk requests finish
    /// and flushes its disks: the saves that follow run while every disk is quiesced, so
    /// they must neither issue disk I/O nor wait for a device that does. Returns `true` if
    /// the VM was running (so the caller knows whether to resume it afterwards) and `false`
    /// if it was already paused (its devices then restart when it is resumed by other means).
    fn pause_vcpus(&self) -> Result<bool, VmStateError>;

    /// Lets the vCPUs run again after [`VmState::pause_vcpus`].
    fn resume_vcpus(&self) -> Result<(), VmStateError>;

    /// Writes a full checkpoint of the paused VM into `dir` (created if absent): a versioned,
    /// CRC-checked state file and a sparse memory file.
    fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError>;

    /// Loads the checkpoint in `dir` into the paused VM: memory, vCPUs, and device transport
    /// and queue state. Refuses (with a message naming the problem) a checkpoint of a VM of
    /// another shape or a corrupt one, leaving the VM as it was.
    fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError>;

    /// Writes the paused VM's whole state as one byte stream, as stored in a qcow2 VM-state
    /// area by an internal snapshot; returns the number of bytes written.
    fn save_stream(&self, out: &mut dyn Write) -> Result<u64, VmStateError>;

    /// Loads a stream written by [`VmState::save_stream`] into the paused VM, with the same
    /// checks as [`VmState::load_checkpoint`].
    fn load_stream(&self, input: &mut dyn Read) -> Result<(), VmStateError>;
}
