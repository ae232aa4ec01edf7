//! The snapshot crate's one error type.

use std::path::PathBuf;

/// A boxed error returned by a caller's hook (see
/// [`crate::live_snapshot::external_snapshot_with`]).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong while snapshotting disks or running a block job.
///
/// Messages name the disk, file or job at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage layer failed (its message names the file and offset).
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// Another job or snapshot owns the disk's chain.
    #[error(transparent)]
    Busy(#[from] storage::live::Busy),
    /// A snapshot would overwrite an existing file.
    #[error("{path}: file exists: refusing to overwrite it with an overlay")]
    Exists {
        /// The overlay path asked for.
        path: PathBuf,
    },
    /// A layer named by a job is not part of the disk's backing chain.
    #[error("{path} is not in the backing chain of disk {disk}")]
    NotInChain {
        /// The path given.
        path: PathBuf,
        /// The disk.
        disk: String,
    },
    /// No snapshot of the tree has this name.
    #[error("no snapshot named {name:?}")]
    NoSnapshot {
        /// The name asked for.
        name: String,
    },
    /// A snapshot of this name already exists in the tree.
    #[error("a snapshot named {name:?} already exists")]
    SnapshotExists {
        /// The name asked for.
        name: String,
    },
    /// A caller passed something that cannot work.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's hook failed while the disks were quiesced; every disk was rolled back.
    #[error("snapshot hook failed: {0}")]
    Hook(#[source] HookError),
    /// A verb is not allowed in the job's present state.
    #[error("job {id}: cannot {verb} while {status}")]
    JobState {
        /// The job.
        id: String,
        /// What was asked ("complete", "pause").
        verb: &'static str,
        /// The job's status at the time.
        status: crate::job_status::JobStatus,
    },
    /// The job was cancelled before it finished.
    #[error("job {id} was cancelled")]
    Cancelled {
        /// The job.
        id: String,
    },
    /// The job stopped on an error (the same error stays on the job).
    #[error("job {id} failed: {source}")]
    JobFailed {
        /// The job.
        id: String,
        /// What stopped it.
        #[source]
        source: std::sync::Arc<Error>,
    },
    /// A job's thread panicked: a bug, reported rather than propagated.
    #[error("job {id}: worker thread panicked")]
    Panicked {
        /// The job.
        id: String,
    },
    /// An operation failed, and undoing its first steps failed too: the disk is left on
    /// the chain named in the message, which is valid but not the one asked for.
    #[error("{operation} failed ({cause}) and rollback of disk {disk} failed too ({rollback})")]
    RollbackFailed {
        /// What was attempted.
        operation: &'static str,
        /// The disk left in an unexpected state.
        disk: String,
        /// Why the operation failed.
        cause: Box<Error>,
        /// Why the rollback failed.
        rollback: Box<Error>,
    },
    /// The disks switched to their new images (the point of no return), then a later step
    /// failed: nothing was undone, the new images stay the disks' tops and nothing was
    /// deleted.
    #[error(
        "{operation}: the disks switched and now run on {} (kept), but then: {cause}",
        list(live)
    )]
    AfterSwitch {
        /// What was done ("snapshot \"s1\"", "external snapshot").
        operation: String,
        /// Each disk's top now, in disk order.
        live: Vec<PathBuf>,
        /// The images the disks left, in disk order.
        left: Vec<PathBuf>,
        /// What failed after the switch.
        cause: Box<Error>,
    },
    /// A disk was opened writable on an image a snapshot froze: writing it would change
    /// the snapshot (and every image built on it).
    #[error(
        "disk {disk}: {image} is frozen ({why}) and must not be opened writable; the disk's \
         current top, recorded in {metadata}, is {current}: start the VM on that image (or \
         open {image} read-only)"
    )]
    Frozen {
        /// The disk.
        disk: String,
        /// The image it was opened on.
        image: PathBuf,
        /// Why the image is frozen.
        why: String,
        /// The tree's metadata file.
        metadata: PathBuf,
        /// The disk's current top as the metadata records it.
        current: PathBuf,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
