//! Block jobs on the controlled disks (virsh `blockpull`, `blockcommit`, `blockjob`): at most
//! one running per disk, the last one kept for `job` queries after it concluded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use snapshot::commit::{commit, CommitOptions};
use snapshot::stream::{stream, StreamOptions};
use snapshot::tree::{SnapshotInfo, SnapshotKind};
use snapshot::{Job, JobStatus};

use super::disk::Disk;
use super::error::{ControlError, Result};
use super::types::{CommitRequest, JobInfo, StreamRequest};

/// The block jobs of a machine's disks, by disk name.
#[derive(Default)]
pub struct BlockJobs {
    jobs: Mutex<HashMap<String, Job>>,
}

impl std::fmt::Debug for BlockJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockJobs")
            .field("disks", &self.jobs.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl BlockJobs {
    /// The id of the job still running on `disk`, if one is.
    pub fn running(&self, disk: &str) -> Option<String> {
        self.jobs
            .lock()
            .get(disk)
            .filter(|job| job.status() != JobStatus::Concluded)
            .map(|job| job.id().to_string())
    }

    /// The last job started on `disk` (running or concluded).
    pub fn get(&self, disk: &str) -> Result<Job> {
        self.jobs
            .lock()
            .get(disk)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("disk {disk} has no block job")))
    }

    /// Starts a job on `disk` with `start` unless one is still running there, and records
    /// it. The registry stays locked meanwhile, so two requests cannot both start one.
    pub fn start(&self, disk: &Disk, start: impl FnOnce() -> Result<Job>) -> Result<JobInfo> {
        if disk.read_only {
            return Err(ControlError::Conflict(format!(
                "disk {} is read-only",
                disk.name
            )));
        }
        let mut jobs = self.jobs.lock();
        if let Some(job) = jobs.get(&disk.name) {
            if job.status() != JobStatus::Concluded {
                return Err(ControlError::Conflict(format!(
                    "disk {} already has job {} ({})",
                    disk.name,
                    job.id(),
                    job.status()
                )));
            }
        }
        let job = start()?;
        tracing::info!("started {} job {} on {}", job.kind(), job.id(), disk.name);
        let info = JobInfo::from(job.info());
        jobs.insert(disk.name.clone(), job);
        Ok(info)
    }

    /// Cancels every job still running and waits up to `timeout` for each to conclude, so
    /// that none is cut off mid-copy when the machine goes away.
    pub fn cancel_all(&self, timeout: Duration) {
        let jobs: Vec<Job> = self.jobs.lock().values().cloned().collect();
        for job in jobs {
            if job.status() == JobStatus::Concluded {
                continue;
            }
            tracing::info!("cancelling job {} as the machine stops", job.id());
            job.cancel();
            if !job.wait_for(timeout, |status| status == JobStatus::Concluded) {
                tracing::warn!("job {} did not conclude in {timeout:?}", job.id());
            }
        }
    }
}

/// Starts a stream (blockpull) on `disk`.
pub fn start_stream(disk: &Disk, request: &StreamRequest) -> Result<Job> {
    let options = StreamOptions {
        base: request.base.as_ref().map(PathBuf::from),
        speed: request.speed,
        ..Default::default()
    };
    Ok(stream(&disk.disk, options)?)
}

/// Checks a commit request's shape: `top` or `active`, not both, not neither.
pub fn check_commit(request: &CommitRequest) -> Result<()> {
    match (&request.top, request.active) {
        (None, false) => Err(ControlError::InvalidArgument(
            "committing the active layer needs \"active\": true (or give \"top\")".into(),
        )),
        (Some(_), true) => Err(ControlError::InvalidArgument(
            "\"top\" and \"active\" exclude each other".into(),
        )),
        _ => Ok(()),
    }
}

/// Starts a commit (blockcommit) on `disk`. `snapshots` is the snapshot tree's listing: a
/// commit never writes into an image one of them froze, since that would change what
/// reverting to it brings back (the snapshot would silently hold other data).
pub fn start_commit(
    disk: &Disk,
    request: &CommitRequest,
    snapshots: &[SnapshotInfo],
) -> Result<Job> {
    check_commit(request)?;
    let top = request.top.as_ref().map(PathBuf::from);
    if let Some(top) = &top {
        if disk.disk.top().path() == top.as_path() {
            return Err(ControlError::InvalidArgument(format!(
                "{} is the active layer of {}: use \"active\": true",
                top.display(),
                disk.name
            )));
        }
    }
    let base = request.base.as_ref().map(PathBuf::from);
    if let Some(target) = commit_target(disk, top.as_deref(), base.as_deref()) {
        refuse_frozen(disk, &target, snapshots)?;
    }
    let options = CommitOptions {
        top,
        base,
        speed: request.speed,
        ..Default::default()
    };
    Ok(commit(&disk.disk, options)?)
}

/// The canonical path of the image a commit of `top` (the active layer when `None`) into
/// `base` (`top`'s backing file when `None`) would write into; `None` when the layers named
/// are not in the chain (the commit itself then reports which one).
fn commit_target(disk: &Disk, top: Option<&Path>, base: Option<&Path>) -> Option<PathBuf> {
    let layers = snapshot::chain::layers(&disk.disk.top());
    let target = match base {
        Some(base) => {
            let depth = snapshot::chain::depth_of(&layers, base, &disk.name).ok()?;
            layers.get(depth)?.path().to_path_buf()
        }
        None => {
            let top_depth = match top {
                Some(top) => snapshot::chain::depth_of(&layers, top, &disk.name).ok()?,
                None => 0,
            };
            layers.get(top_depth + 1)?.path().to_path_buf()
        }
    };
    std::fs::canonicalize(&target).ok()
}

/// Refuses a write into `target` when an external snapshot froze it.
fn refuse_frozen(disk: &Disk, target: &Path, snapshots: &[SnapshotInfo]) -> Result<()> {
    for snapshot in snapshots {
        // An internal snapshot lives inside its image, which stays writable: the image's
        // refcounts keep the snapshot's clusters apart from new writes.
        if snapshot.kind == SnapshotKind::Internal {
            continue;
        }
        for image in &snapshot.disks {
            let frozen = std::fs::canonicalize(&image.image).unwrap_or(image.image.clone());
            if frozen == target {
                return Err(ControlError::Conflict(format!(
                    "disk {}: committing into {} would change snapshot {:?}, which froze \
                     that image; delete the snapshot first or commit into another layer",
                    disk.name,
                    target.display(),
                    snapshot.name
                )));
            }
        }
    }
    Ok(())
}
