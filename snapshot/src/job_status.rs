//! The states of a block job, apart from the job itself so that errors can name a state
//! without the error module and the job module depending on each other.

/// Where a job is in its life (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Made, its thread not started yet.
    Created,
    /// Copying.
    Running,
    /// Paused before becoming ready.
    Paused,
    /// In sync: waiting for [`crate::Job::complete`] (active commit), still mirroring writes.
    Ready,
    /// Paused while ready.
    Standby,
    /// Cancelled or failed: undoing what it must before it concludes.
    Aborting,
    /// Finished; [`crate::Job::outcome`] says how.
    Concluded,
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
        })
    }
}
