//! Why a [`super::Control`] call failed, as kinds a caller can act on (no transport codes:
//! the REST API maps each kind onto one HTTP status).

/// Why a control call failed. The message names the disk, job, snapshot or file at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request cannot work as given: a bad name, path, field or combination.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such disk, job or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the machine's, a disk's, a job's or a snapshot's state.
    #[error("{0}")]
    Conflict(String),
    /// This machine cannot do that (a daemon has no vCPUs, a VM keeps no snapshot tree).
    #[error("{0}")]
    Unsupported(String),
    /// The operation failed on the host side.
    #[error("{0}")]
    Failed(String),
}

impl From<snapshot::Error> for ControlError {
    fn from(e: snapshot::Error) -> Self {
        match e {
            snapshot::Error::Busy(_)
            | snapshot::Error::JobState { .. }
            | snapshot::Error::SnapshotExists { .. } => ControlError::Conflict(e.to_string()),
            snapshot::Error::NoSnapshot { .. } => ControlError::NotFound(e.to_string()),
            snapshot::Error::Exists { .. }
            | snapshot::Error::NotInChain { .. }
            | snapshot::Error::InvalidArgument(_) => ControlError::InvalidArgument(e.to_string()),
            other => ControlError::Failed(other.to_string()),
        }
    }
}

impl From<crate::Error> for ControlError {
    /// Checkpoint files that are damaged or do not match the VM, and configurations that
    /// cannot work, are the caller's to fix; everything else failed on the host side.
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Checkpoint(_) | crate::Error::Config(_) => {
                ControlError::InvalidArgument(e.to_string())
            }
            // The directory holds a checkpoint the caller did not ask to replace, or one
            // something still depends on: the request conflicts with what is on disk.
            crate::Error::CheckpointExists { .. } | crate::Error::CheckpointInUse { .. } => {
                ControlError::Conflict(e.to_string())
            }
            other => ControlError::Failed(other.to_string()),
        }
    }
}

/// Shorthand for results carrying [`ControlError`].
pub type Result<T, E = ControlError> = std::result::Result<T, E>;
