//! What is under control besides its disks: a VM's vCPUs and memory, or a daemon with none.

use super::error::{ControlError, Result};
use super::types::{CheckpointReport, CheckpointRequest, RevertRequest, RevertResult, VmState};

/// The machine a [`super::Control`] drives: its life (state, pause, resume, shutdown) and its
/// memory checkpoints. Disks, block jobs and the snapshot tree are the control's own.
///
/// A running VM ([`super::VmMachine`]) implements every method; a vhost-user-blk daemon only
/// the life cycle. What a machine cannot do answers [`ControlError::Unsupported`], which is
/// what the default methods do.
pub trait Machine: Send + Sync {
    /// Whether it runs, is paused, or is going away.
    fn state(&self) -> VmState;

    /// Number of vCPUs (0 for a machine without any).
    fn vcpus(&self) -> u8 {
        0
    }

    /// Guest RAM in MiB (0 for a machine without any).
    fn memory_mib(&self) -> u64 {
        0
    }

    /// Holds every vCPU outside the guest.
    fn pause(&self) -> Result<()> {
        Err(ControlError::Unsupported(
            "this machine has no vCPUs to pause".into(),
        ))
    }

    /// Lets paused vCPUs run again.
    fn resume(&self) -> Result<()> {
        Err(ControlError::Unsupported(
            "this machine has no vCPUs to resume".into(),
        ))
    }

    /// Asks the machine to stop; it ends once it has (see [`crate::Sandbox::wait`]).
    fn shutdown(&self) -> Result<()>;

    /// Saves the machine's memory, vCPU and device state into a checkpoint directory.
    fn checkpoint_save(&self, _request: &CheckpointRequest) -> Result<CheckpointReport> {
        Err(ControlError::Unsupported(
            "this VM cannot take checkpoints".into(),
        ))
    }

    /// Takes a live checkpoint into `dir`, running `at_stop` in its final stop (vCPUs
    /// paused, queues drained, disks flushed): how a fork switches the disks at the
    /// checkpoint's instant.
    fn live_checkpoint_with(
        &self,
        _dir: &std::path::Path,
        _at_stop: &mut dyn FnMut() -> crate::Result<()>,
    ) -> Result<CheckpointReport> {
        Err(ControlError::Unsupported(
            "this VM cannot take checkpoints".into(),
        ))
    }

    /// Returns the machine to a checkpoint, in place.
    fn checkpoint_revert(&self, _request: &RevertRequest) -> Result<RevertResult> {
        Err(ControlError::Unsupported(
            "this VM cannot load checkpoints".into(),
        ))
    }
}
