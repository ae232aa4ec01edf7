//! The REST API: HTTP/1.1 with JSON bodies on a Unix socket, Firecracker-style paths.
//!
//! | method | path | does |
//! | --- | --- | --- |
//! | GET | `/vm` | [`types::VmInfo`] |
//! | PUT | `/vm/pause`, `/vm/resume`, `/vm/shutdown` | the VM's life |
//! | GET | `/disks`, `/disks/{disk}` | [`types::DiskInfo`] (virsh `domblklist`) |
//! | PUT | `/vm/checkpoint` | memory + vCPU + device checkpoint, [`types::CheckpointRequest`] |
//! | PUT | `/vm/checkpoint/revert` | back to a checkpoint in place, [`types::RevertRequest`] |
//! | PUT | `/snapshot/disk` | external disk-only snapshot, [`types::SnapshotCreate`] |
//! | PUT | `/disks/{disk}/stream` | blockpull, [`types::StreamRequest`] |
//! | PUT | `/disks/{disk}/commit` | blockcommit, [`types::CommitRequest`] |
//! | GET | `/disks/{disk}/job` | [`types::JobInfo`] |
//! | PUT | `/disks/{disk}/job/{pause,resume,cancel,complete}` | job verbs |
//! | PUT | `/disks/{disk}/job/speed` | [`types::SpeedRequest`] |
//! | GET | `/snapshots` | the snapshot tree, [`types::SnapshotInfo`] each (virsh `snapshot-list`) |
//! | PUT | `/snapshots` | take a snapshot, [`types::TreeSnapshotCreate`] (`snapshot-create-as`) |
//! | GET | `/snapshots/{name}` | one snapshot (`snapshot-info`) |
//! | PUT | `/snapshots/{name}/revert` | revert to it (`snapshot-revert`) |
//! | PUT | `/snapshots/{name}/delete` | delete it, [`types::SnapshotDeleteRequest`] (`snapshot-delete`) |
//! | GET | `/current-snapshot` | the current snapshot (`snapshot-current`) |
//! | GET | `/snapshot-jobs` | merge jobs a delete is running, [`types::JobInfo`] each |
//!
//! `docs/openapi.json` documents the same set; a test holds the two together. Errors are
//! 4xx/5xx with a [`types::Fault`] body; no request can stop the VM except `/vm/shutdown`.
//!
//! The server talks to the VM only through [`VmControl`], so it is tested against a fake VM;
//! [`VmmControl`] is the implementation over a running [`crate::Vmm`], and
//! [`crate::vhost_user_blk::DaemonControl`] the one over a vhost-user-blk daemon's disk.

pub mod client;
pub mod routes;
pub mod server;
pub mod types;

#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use snapshot::tree::SnapshotTree;

use crate::builder::AttachedDisk;
use crate::exit::{ExitHandle, ExitReason};
use crate::vcpu::PauseGate;

/// How long `/vm/pause` waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub use client::ApiClient;
pub use server::ApiServer;
pub use types::{VmInfo, VmState};

/// Why a request failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: bad JSON, a missing or invalid field (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such path, disk or job (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path asked for.
        path: String,
    },
    /// The request conflicts with the VM's or a job's state (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is too large (413).
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// This VM cannot do that (501).
    #[error("{0}")]
    NotImplemented(String),
    /// The operation failed on the host side (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status code of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::NotImplemented(_) => 501,
            ApiError::Internal(_) => 500,
        }
    }
}

impl From<snapshot::Error> for ApiError {
    fn from(e: snapshot::Error) -> Self {
        match e {
            snapshot::Error::Busy(_)
            | snapshot::Error::JobState { .. }
            | snapshot::Error::SnapshotExists { .. } => ApiError::Conflict(e.to_string()),
            snapshot::Error::NoSnapshot { .. } => ApiError::NotFound(e.to_string()),
            snapshot::Error::Exists { .. }
            | snapshot::Error::NotInChain { .. }
            | snapshot::Error::InvalidArgument(_) => ApiError::BadRequest(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// What the API server needs from a VM.
pub trait VmControl: Send + Sync {
    /// The VM's state and shape.
    fn info(&self) -> VmInfo;
    /// Holds every vCPU outside `KVM_RUN`.
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets paused vCPUs run again.
    fn resume(&self) -> Result<(), ApiError>;
    /// Asks the VM to stop; the process ends once it has.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// The VM's disks, in device order.
    fn disks(&self) -> Vec<AttachedDisk>;
    /// The VM's snapshot tree, if it keeps one (the `/snapshots` routes answer 501 without).
    fn snapshot_tree(&self) -> Option<Arc<SnapshotTree>> {
        None
    }
    /// Saves a checkpoint (`/vm/checkpoint`).
    fn checkpoint(
        &self,
        _request: &types::CheckpointRequest,
    ) -> Result<crate::CheckpointReport, ApiError> {
        Err(ApiError::NotImplemented(
            "this VM cannot take checkpoints".into(),
        ))
    }
    /// Returns the VM to a checkpoint in place (`/vm/checkpoint/revert`).
    fn revert_checkpoint(
        &self,
        _request: &types::RevertRequest,
    ) -> Result<types::RevertResult, ApiError> {
        Err(ApiError::NotImplemented(
            "this VM cannot load checkpoints".into(),
        ))
    }
}

/// [`VmControl`] over a running [`crate::Vmm`].
#[derive(Debug, Clone)]
pub struct VmmControl {
    exit: ExitHandle,
    gate: Arc<PauseGate>,
    vcpus: u8,
    memory_mib: u64,
    disks: Vec<AttachedDisk>,
    tree: OnceLock<Arc<SnapshotTree>>,
    checkpointer: Arc<crate::Checkpointer>,
}

/// Maps a checkpoint failure onto HTTP: bad or mismatched files are the request's fault.
fn checkpoint_error(e: crate::Error) -> ApiError {
    match e {
        crate::Error::Checkpoint(_) | crate::Error::Config(_) => {
            ApiError::BadRequest(e.to_string())
        }
        other => ApiError::Internal(other.to_string()),
    }
}

impl VmmControl {
    /// Control of `vmm`, which was started with `vcpus` vCPUs and `memory_mib` MiB.
    pub fn new(vmm: &crate::Vmm, vcpus: u8, memory_mib: u64) -> Arc<Self> {
        Arc::new(VmmControl {
            exit: vmm.exit_handle(),
            gate: vmm.pause_gate(),
            vcpus,
            memory_mib,
            disks: vmm.disks().to_vec(),
            tree: OnceLock::new(),
            checkpointer: vmm.checkpointer(),
        })
    }

    /// Serves `tree` on the `/snapshots` routes; a second call is refused.
    pub fn set_snapshot_tree(&self, tree: Arc<SnapshotTree>) -> Result<(), ApiError> {
        self.tree
            .set(tree)
            .map_err(|_| ApiError::Conflict("the VM already has a snapshot tree".into()))
    }
}

impl VmControl for VmmControl {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.exit.is_requested() {
                VmState::ShuttingDown
            } else if self.gate.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disks: self.disks.len(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        if self.exit.is_requested() {
            return Err(ApiError::Conflict("the VM is shutting down".into()));
        }
        if self.gate.is_paused() {
            return Err(ApiError::Conflict("the VM is already paused".into()));
        }
        self.gate
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        tracing::info!("VM paused through the API");
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        if !self.gate.is_paused() {
            return Err(ApiError::Conflict("the VM is not paused".into()));
        }
        // Devices a snapshot left quiesced on a paused VM run again with the vCPUs.
        self.checkpointer
            .release_devices()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.gate.resume();
        tracing::info!("VM resumed through the API");
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        tracing::info!("shutdown requested through the API");
        self.exit.request(ExitReason::Stopped);
        Ok(())
    }

    fn disks(&self) -> Vec<AttachedDisk> {
        self.disks.clone()
    }

    fn snapshot_tree(&self) -> Option<Arc<SnapshotTree>> {
        self.tree.get().cloned()
    }

    fn checkpoint(
        &self,
        request: &types::CheckpointRequest,
    ) -> Result<crate::CheckpointReport, ApiError> {
        if self.exit.is_requested() {
            return Err(ApiError::Conflict("the VM is shutting down".into()));
        }
        let options = crate::CheckpointOptions {
            live: request.live,
            incremental: request.incremental,
            ..Default::default()
        };
        let report = self
            .checkpointer
            .checkpoint(&request.dir, options)
            .map_err(checkpoint_error)?;
        tracing::info!(
            "checkpoint {} saved: {} pages, paused {} us",
            report.dir.display(),
            report.pages_written,
            report.pause_us
        );
        Ok(report)
    }

    fn revert_checkpoint(
        &self,
        request: &types::RevertRequest,
    ) -> Result<types::RevertResult, ApiError> {
        if self.exit.is_requested() {
            return Err(ApiError::Conflict("the VM is shutting down".into()));
        }
        let pause = self
            .checkpointer
            .revert(&request.dir)
            .map_err(checkpoint_error)?;
        tracing::info!("reverted to checkpoint {}", request.dir.display());
        Ok(types::RevertResult {
            dir: request.dir.clone(),
            pause_us: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
        })
    }
}
