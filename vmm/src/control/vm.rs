//! [`Machine`] over a running [`crate::Vmm`]: its vCPUs' pause gate, its exit handle and its
//! checkpointer.

use std::sync::Arc;
use std::time::Duration;

use super::disk::Disk;
use super::error::{ControlError, Result};
use super::machine::Machine;
use super::types::{CheckpointReport, CheckpointRequest, RevertRequest, RevertResult, VmState};
use crate::builder::AttachedDisk;
use crate::checkpoint::{CheckpointOptions, Checkpointer};
use crate::exit::{ExitHandle, ExitReason};
use crate::vcpu::PauseGate;

/// How long a pause waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM side of a [`super::Control`] over a running [`crate::Vmm`].
#[derive(Debug, Clone)]
pub struct VmMachine {
    exit: ExitHandle,
    gate: Arc<PauseGate>,
    vcpus: u8,
    memory_mib: u64,
    checkpointer: Arc<Checkpointer>,
}

impl VmMachine {
    /// The machine of `vmm`, as its configuration describes it.
    pub fn new(vmm: &crate::Vmm) -> Self {
        VmMachine {
            exit: vmm.exit_handle(),
            gate: vmm.pause_gate(),
            vcpus: vmm.config().vcpus,
            memory_mib: vmm.config().memory_mib,
            checkpointer: vmm.checkpointer(),
        }
    }

    fn refuse_when_stopping(&self) -> Result<()> {
        if self.exit.is_requested() {
            return Err(ControlError::Conflict("the VM is shutting down".into()));
        }
        Ok(())
    }
}

impl From<&AttachedDisk> for Disk {
    /// The control layer's view of a device's disk: no MMIO window, no interrupt.
    fn from(attached: &AttachedDisk) -> Self {
        Disk::new(
            attached.name.clone(),
            attached.disk.clone(),
            attached.read_only,
        )
    }
}

impl Machine for VmMachine {
    fn state(&self) -> VmState {
        if self.exit.is_requested() {
            VmState::ShuttingDown
        } else if self.gate.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn vcpus(&self) -> u8 {
        self.vcpus
    }

    fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    fn pause(&self) -> Result<()> {
        self.refuse_when_stopping()?;
        if self.gate.is_paused() {
            return Err(ControlError::Conflict("the VM is already paused".into()));
        }
        self.gate
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        tracing::info!("VM paused");
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        if !self.gate.is_paused() {
            return Err(ControlError::Conflict("the VM is not paused".into()));
        }
        // Devices a snapshot left quiesced on a paused VM run again with the vCPUs.
        self.checkpointer
            .release_devices()
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        self.gate.resume();
        tracing::info!("VM resumed");
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        tracing::info!("VM shutdown requested");
        self.exit.request(ExitReason::Stopped);
        Ok(())
    }

    fn checkpoint_save(&self, request: &CheckpointRequest) -> Result<CheckpointReport> {
        self.refuse_when_stopping()?;
        let options = CheckpointOptions {
            live: request.live,
            incremental: request.incremental,
            replace: request.replace,
        };
        let report = self.checkpointer.checkpoint(&request.dir, options)?;
        tracing::info!(
            "checkpoint {} saved: {} pages, paused {} us",
            report.dir.display(),
            report.pages_written,
            report.pause_us
        );
        Ok(report)
    }

    fn live_checkpoint_with(
        &self,
        dir: &std::path::Path,
        at_stop: &mut dyn FnMut() -> crate::Result<()>,
    ) -> Result<CheckpointReport> {
        self.refuse_when_stopping()?;
        if self.gate.is_paused() {
            return Err(ControlError::Conflict(
                "the VM is paused: a live fork needs it running".into(),
            ));
        }
        let options = CheckpointOptions {
            live: true,
            ..Default::default()
        };
        Ok(self.checkpointer.checkpoint_with(dir, options, at_stop)?)
    }

    fn checkpoint_revert(&self, request: &RevertRequest) -> Result<RevertResult> {
        self.refuse_when_stopping()?;
        let pause = self.checkpointer.revert(&request.dir)?;
        tracing::info!("reverted to checkpoint {}", request.dir.display());
        Ok(RevertResult {
            dir: request.dir.clone(),
            pause_us: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
        })
    }
}
