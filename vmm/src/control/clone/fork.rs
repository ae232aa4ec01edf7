//! Live fork: a running VM becomes a parent and `count` children, all from one instant.
//!
//! A live checkpoint copies memory while the guest runs; in its final stop (vCPUs paused,
//! queues drained) the parent's writable disks move onto fresh overlays, so the images they
//! were on are frozen at exactly the checkpoint's instant. The parent runs on; each child is
//! a clone of that checkpoint with its own overlays on the frozen images.
//!
//! The disk snapshot is split around the stop ([`snapshot::live_snapshot::prepare`]): the
//! overlays are created, synced and opened, and the old tops flushed, before the live
//! checkpoint starts; the stop itself only swaps pointers; the old tops are sealed
//! (read-only, flushed) once the parent runs again. Nothing slow happens while its vCPUs
//! are stopped.

use std::path::{Path, PathBuf};

use snapshot::live_snapshot::{prepare, DiskOverlay, PreparedSnapshot};

use super::super::disk::Disk;
use super::super::error::{ControlError, Result};
use super::super::machine::Machine;
use super::super::types::{CloneRequest, ForkRequest, ForkResult};
use super::{check_request, make_parent_dir, spawn, CloneLauncher, CloneSource, Registry};

/// The parent's new overlay for `disk`: beside its active image, `STEM.fork-SECS[-N].qcow2`
/// (STEM without the suffix of an earlier fork).
fn parent_overlay(disk: &Disk, stamp: u64) -> PathBuf {
    let top = disk.disk.top();
    let image = std::path::absolute(top.path()).unwrap_or_else(|_| top.path().to_path_buf());
    // One fork suffix, not one more per fork: `base.fork-1.fork-2...` would outgrow a name.
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .map(|s| s.split(".fork-").next().unwrap_or_default().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| disk.name.clone());
    (1u64..)
        .map(|n| match n {
            1 => image.with_file_name(format!("{stem}.fork-{stamp}.qcow2")),
            n => image.with_file_name(format!("{stem}.fork-{stamp}-{n}.qcow2")),
        })
        .find(|p| p.symlink_metadata().is_err())
        .unwrap_or_else(|| image.with_file_name(format!("{stem}.fork-{stamp}.qcow2")))
}

/// The overlays' paths, for messages.
fn overlay_list(overlays: &[DiskOverlay]) -> String {
    overlays
        .iter()
        .map(|o| o.overlay.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first free `DIR/fork-K` for the fork's checkpoint.
fn checkpoint_dir(dir: &Path) -> PathBuf {
    (0u64..)
        .map(|k| dir.join(format!("fork-{k}")))
        .find(|p| p.symlink_metadata().is_err())
        .unwrap_or_else(|| dir.join("fork"))
}

/// Forks the running `machine` (its writable `disks` move to fresh overlays) into
/// `request.count` children in `request.dir`, recorded in `registry`.
pub fn fork(
    machine: &dyn Machine,
    disks: &[Disk],
    request: &ForkRequest,
    launcher: &CloneLauncher,
    registry: &Registry,
) -> Result<ForkResult> {
    check_request(request.count, &request.dir)?;
    let writable: Vec<&Disk> = disks.iter().filter(|d| !d.read_only).collect();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let overlays: Vec<DiskOverlay> = writable
        .iter()
        .map(|d| DiskOverlay::new(&d.disk, parent_overlay(d, stamp)))
        .collect();
    let created_parent = make_parent_dir(&request.dir)?;
    let checkpoint = checkpoint_dir(&request.dir);

    // Step 1 of the disk snapshot, while the parent runs: a failure here leaves nothing.
    let mut disks_snapshot: Option<PreparedSnapshot> = if overlays.is_empty() {
        None
    } else {
        match prepare(&overlays) {
            Ok(prepared) => Some(prepared),
            Err(e) => {
                if let Some(parent) = created_parent {
                    let _ = std::fs::remove_dir_all(parent);
                }
                return Err(ControlError::from(e));
            }
        }
    };

    // Step 2, once, in the checkpoint's final stop: pointer swaps only. Its own error is
    // kept whole.
    let mut switch_error = None;
    let mut at_stop = || -> crate::Result<()> {
        let Some(prepared) = disks_snapshot.as_mut() else {
            return Ok(());
        };
        if prepared.is_switched() {
            return Ok(());
        }
        prepared.switch(|| Ok(())).map(|_| ()).map_err(|e| {
            let message = e.to_string();
            switch_error = Some(e);
            crate::Error::Device {
                device: "fork".into(),
                message,
            }
        })
    };
    let checkpointed = machine.live_checkpoint_with(&checkpoint, &mut at_stop);
    // Step 3, the parent running again: seal the old tops. A prepared snapshot that never
    // switched removes its overlays when dropped; a switched one never does.
    let switched = disks_snapshot.as_ref().is_some_and(|p| p.is_switched());
    let sealed = match disks_snapshot.take() {
        Some(prepared) if prepared.is_switched() => prepared.seal().map(|r| r.old_tops),
        Some(prepared) => {
            drop(prepared);
            Ok(Vec::new())
        }
        None => Ok(Vec::new()),
    };
    let report = match checkpointed {
        Ok(report) => report,
        Err(e) => {
            if let Some(parent) = created_parent {
                let _ = std::fs::remove_dir_all(parent);
            }
            if switched {
                // The parent's disks moved although the checkpoint failed: say where they are.
                return Err(ControlError::Failed(format!(
                    "the fork's checkpoint failed after the VM's disks moved to {}: {e}",
                    overlay_list(&overlays)
                )));
            }
            return Err(match switch_error {
                Some(e) => ControlError::from(e),
                None => e,
            });
        }
    };
    let old_tops = sealed.map_err(ControlError::from)?;
    // Past the switch: the parent runs on its new overlays whatever happens to the children.
    let source = CloneSource {
        snapshot: None,
        checkpoint: report.dir.clone(),
        disks: writable
            .iter()
            .zip(&old_tops)
            .map(|(d, top)| (d.name.clone(), top.clone()))
            .collect(),
    };
    let clone_request = CloneRequest {
        count: request.count,
        dir: request.dir.clone(),
    };
    let clones = spawn(&source, &clone_request, launcher, registry).map_err(|e| {
        ControlError::Failed(format!(
            "the VM forked (checkpoint {}, its disks now on {}) but its children did not start: {e}",
            report.dir.display(),
            overlay_list(&overlays)
        ))
    })?;
    tracing::info!(
        checkpoint = %report.dir.display(),
        pause_us = report.pause_us,
        children = clones.len(),
        "VM forked"
    );
    Ok(ForkResult {
        checkpoint: report.dir,
        pause_us: report.pause_us,
        parent_overlays: overlays.into_iter().map(|o| o.overlay).collect(),
        clones,
    })
}
