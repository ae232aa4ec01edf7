//! External disk-only snapshots of a set of disks, outside the snapshot tree (the REST API's
//! `PUT /snapshot/disk`): each disk moves onto a new overlay, all at once or one by one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapshot::live_snapshot::{external_snapshot, DiskOverlay};

use super::disk::Disk;
use super::error::{ControlError, Result};
use super::types::{SnapshotCreate, SnapshotDiskResult, SnapshotResult};

/// The default overlay of snapshot `name` for a disk whose active layer is `top`:
/// `DIR/STEM.NAME.qcow2` beside it.
fn default_overlay(top: &Path, name: &str) -> PathBuf {
    let stem = top
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    top.with_file_name(format!("{stem}.{name}.qcow2"))
}

/// The disks `request` names (every writable one when it names none), each with the
/// overlay asked for.
fn wanted<'a>(
    disks: &'a [Disk],
    request: &'a SnapshotCreate,
) -> Result<Vec<(&'a Disk, Option<&'a str>)>> {
    let Some(list) = &request.disks else {
        return Ok(disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| (d, None))
            .collect());
    };
    if list.is_empty() {
        return Err(ControlError::InvalidArgument("\"disks\" is empty".into()));
    }
    let mut seen = HashSet::new();
    let mut wanted = Vec::new();
    for entry in list {
        if !seen.insert(entry.disk.as_str()) {
            return Err(ControlError::InvalidArgument(format!(
                "disk {} is listed twice",
                entry.disk
            )));
        }
        let disk = disks
            .iter()
            .find(|d| d.name == entry.disk)
            .ok_or_else(|| ControlError::NotFound(format!("no disk named {:?}", entry.disk)))?;
        if disk.read_only {
            return Err(ControlError::Conflict(format!(
                "disk {} is read-only",
                disk.name
            )));
        }
        wanted.push((disk, entry.overlay.as_deref()));
    }
    Ok(wanted)
}

/// Takes the snapshot `request` describes of `disks`.
pub fn take(disks: &[Disk], request: &SnapshotCreate) -> Result<SnapshotResult> {
    snapshot::tree::validate_name(&request.name)?;
    let wanted = wanted(disks, request)?;
    if wanted.is_empty() {
        return Err(ControlError::Conflict("the VM has no writable disk".into()));
    }
    let mut overlays = Vec::new();
    for (disk, overlay) in wanted {
        let path = match overlay {
            Some(path) => {
                let path = PathBuf::from(path);
                if !path.is_absolute() {
                    return Err(ControlError::InvalidArgument(format!(
                        "overlay {path:?} of disk {}: give an absolute path",
                        disk.name
                    )));
                }
                path
            }
            None => default_overlay(disk.disk.top().path(), &request.name),
        };
        overlays.push(DiskOverlay::new(&disk.disk, path));
    }
    let mut results: Vec<SnapshotDiskResult> = Vec::new();
    let mut quiesced = Duration::ZERO;
    let groups: Vec<&[DiskOverlay]> = if request.atomic {
        vec![&overlays[..]]
    } else {
        overlays.chunks(1).collect()
    };
    for group in groups {
        let report = external_snapshot(group).map_err(|e| {
            let error = ControlError::from(e);
            if results.is_empty() {
                return error;
            }
            // Disks already moved stay moved: say which, so the caller knows the state.
            let done: Vec<&str> = results.iter().map(|r| r.disk.as_str()).collect();
            ControlError::Failed(format!(
                "{error} (disks already switched: {})",
                done.join(", ")
            ))
        })?;
        quiesced = quiesced.max(report.quiesced_for);
        for (overlay, previous) in group.iter().zip(report.old_tops) {
            results.push(SnapshotDiskResult {
                disk: overlay.disk.name().to_string(),
                overlay: overlay.overlay.display().to_string(),
                previous: previous.display().to_string(),
            });
        }
    }
    tracing::info!(
        "snapshot {} ({}) of {} disk(s); I/O held {quiesced:?}",
        request.name,
        request.description.as_deref().unwrap_or(""),
        results.len()
    );
    Ok(SnapshotResult {
        name: request.name.clone(),
        disks: results,
        quiesced_us: u64::try_from(quiesced.as_micros()).unwrap_or(u64::MAX),
        frozen_us: None,
    })
}
