//! Clones: many VMs started from one snapshot with memory, and the live fork of a running
//! VM.
//!
//! A clone is a new `snapvmm restore` process ([`CloneLauncher`]) of the snapshot's
//! checkpoint: guest RAM maps the checkpoint's memory file `MAP_PRIVATE` (pages no clone
//! writes stay shared through the page cache), and each disk the snapshot froze gets a fresh
//! qcow2 overlay in the clone's directory `DIR/clone-K/`, built on the frozen image, which
//! nobody writes again. Each clone has its own API socket, console log, log and snapshot
//! tree there, and a new VM generation ID (the restore writes one).
//!
//! All or nothing: a request that fails part-way kills the clones it started and removes
//! every file and directory it made. Clones are recorded in a [`Registry`], so they can be
//! listed and destroyed, and a snapshot they stand on is not deleted under them.

mod fork;
pub mod process;
pub mod registry;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use snapshot::tree::{SnapshotInfo, SnapshotKind, TreeFile};
use storage::qcow2::CreateOptions;
use storage::{ImageFormat, OpenOptions};

use super::error::{ControlError, Result};
use super::types::{CloneDestroyRequest, CloneInfo, CloneRecord, CloneRequest, MAX_CLONES};

pub use fork::fork;
pub use process::CloneLauncher;
pub use registry::Registry;

/// The registry of a fork's children when the VM keeps no snapshot tree: in the fork's
/// directory.
pub const FORK_REGISTRY: &str = "forks.clones.json";

/// What clones start from: a checkpoint and, per disk, the frozen image their overlays are
/// built on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSource {
    /// The snapshot's name (`None` for a fork).
    pub snapshot: Option<String>,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// (disk name, frozen image), in disk order.
    pub disks: Vec<(String, PathBuf)>,
}

impl CloneSource {
    /// The clone source of a snapshot of the tree: it must be external and hold memory.
    pub fn of_snapshot(info: &SnapshotInfo) -> Result<Self> {
        let checkpoint = match (info.kind, &info.checkpoint) {
            (SnapshotKind::ExternalWithMemory, Some(dir)) => dir.clone(),
            (SnapshotKind::ExternalDiskOnly, _) => {
                return Err(ControlError::InvalidArgument(format!(
                    "snapshot {:?} has no memory (disk-only): clones start from a snapshot \
                     taken with memory",
                    info.name
                )))
            }
            _ => {
                return Err(ControlError::InvalidArgument(format!(
                    "snapshot {:?} is {} : clones start from an external snapshot with memory",
                    info.name, info.kind
                )))
            }
        };
        Ok(CloneSource {
            snapshot: Some(info.name.clone()),
            checkpoint,
            disks: info
                .disks
                .iter()
                .map(|d| (d.disk.clone(), d.image.clone()))
                .collect(),
        })
    }
}

/// Checks a clone or fork request's count and directory (absolute).
pub(crate) fn check_request(count: u32, dir: &Path) -> Result<()> {
    if count == 0 || count > MAX_CLONES {
        return Err(ControlError::InvalidArgument(format!(
            "count {count}: from 1 to {MAX_CLONES} clones per request"
        )));
    }
    if !dir.is_absolute() {
        return Err(ControlError::InvalidArgument(format!(
            "clone directory {}: give an absolute path",
            dir.display()
        )));
    }
    Ok(())
}

/// One frozen image as each overlay on it must be created.
struct Base {
    disk: String,
    path: PathBuf,
    size: u64,
    format: ImageFormat,
    cluster_size: u64,
}

impl Base {
    fn open(disk: &str, path: &Path) -> Result<Self> {
        let options = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let image = storage::open(path, &options).map_err(|e| {
            ControlError::Failed(format!(
                "disk {disk}: opening frozen image {}: {e}",
                path.display()
            ))
        })?;
        Ok(Base {
            disk: disk.to_string(),
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            size: image.size(),
            format: image.info().format.unwrap_or(ImageFormat::Raw),
            cluster_size: image
                .as_qcow2()
                .map(|i| i.cluster_size())
                .unwrap_or(CreateOptions::default().cluster_size),
        })
    }

    /// Creates the clone's overlay on this image in `dir`.
    fn overlay_in(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.qcow2", self.disk));
        let options = CreateOptions {
            size: Some(self.size),
            cluster_size: self.cluster_size,
            backing_file: Some(self.path.to_string_lossy().into_owned()),
            backing_format: Some(self.format),
            ..CreateOptions::default()
        };
        storage::qcow2::create(&path, &options).map_err(|e| {
            ControlError::Failed(format!(
                "creating overlay {} on {}: {e}",
                path.display(),
                self.path.display()
            ))
        })?;
        Ok(path)
    }
}

/// What a failed request made, removed on drop unless disarmed.
struct Undo {
    parent: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for dir in self.dirs.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a failed clone's directory");
            }
        }
        if let Some(parent) = self.parent.take() {
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Creates `dir` (and its parents) if absent, mode 0700; returns the topmost directory it
/// created, for a rollback to remove.
pub(crate) fn make_parent_dir(dir: &Path) -> Result<Option<PathBuf>> {
    if dir.is_dir() {
        return Ok(None);
    }
    let mut first_missing = dir.to_path_buf();
    while let Some(parent) = first_missing.parent() {
        if parent.exists() {
            break;
        }
        first_missing = parent.to_path_buf();
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            ControlError::InvalidArgument(format!(
                "cannot create clone directory {}: {e}",
                dir.display()
            ))
        })?;
    Ok(Some(first_missing))
}

/// Starts `request.count` clones of `source` in `request.dir`, records them in `registry`
/// and returns them once each serves its API. On failure nothing is left behind.
pub fn spawn(
    source: &CloneSource,
    request: &CloneRequest,
    launcher: &CloneLauncher,
    registry: &Registry,
) -> Result<Vec<CloneInfo>> {
    check_request(request.count, &request.dir)?;
    if !snapshot::checkpoint::state_path(&source.checkpoint).exists() {
        return Err(ControlError::InvalidArgument(format!(
            "checkpoint {} is missing: the snapshot cannot be cloned",
            source.checkpoint.display()
        )));
    }
    let bases = source
        .disks
        .iter()
        .map(|(disk, path)| Base::open(disk, path))
        .collect::<Result<Vec<_>>>()?;
    let mut undo = Undo {
        parent: make_parent_dir(&request.dir)?,
        dirs: Vec::new(),
        armed: true,
    };
    let mut starting = Vec::new();
    let result = (|| {
        let mut next = 0u32;
        for _ in 0..request.count {
            // The first free clone-K: an existing directory is never reused.
            let (id, dir) = loop {
                let id = format!("clone-{next}");
                let dir = request.dir.join(&id);
                next += 1;
                match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                    Ok(()) => break (id, dir),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(ControlError::InvalidArgument(format!(
                            "cannot create clone directory {}: {e}",
                            dir.display()
                        )))
                    }
                }
            };
            undo.dirs.push(dir.clone());
            let mut tops = Vec::new();
            for base in &bases {
                tops.push((base.disk.clone(), base.overlay_in(&dir)?));
            }
            starting.push(launcher.spawn(&id, &dir, &source.checkpoint, &tops)?);
        }
        launcher.wait_ready(&mut starting)?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let records: Vec<CloneRecord> = starting
            .iter()
            .map(|s| CloneRecord {
                snapshot: source.snapshot.clone(),
                checkpoint: source.checkpoint.clone(),
                backing: bases.iter().map(|b| b.path.clone()).collect(),
                clone: s.info.clone(),
                created,
                running: true,
            })
            .collect();
        registry.add(&records)
    })();
    match result {
        Ok(()) => {
            undo.armed = false;
            let infos = starting.iter().map(|s| s.info.clone()).collect();
            for clone in starting {
                clone.detach();
            }
            tracing::info!(
                source = %source.checkpoint.display(),
                count = request.count,
                "clones started"
            );
            Ok(infos)
        }
        Err(e) => {
            for clone in starting {
                clone.kill();
            }
            Err(e)
        }
    }
}

/// Clones snapshot `name` of the tree whose metadata file is `metadata`, without a running
/// VM (`snapvmm clone --snapshot-metadata`): the metadata is only read.
pub fn clone_offline(
    metadata: &Path,
    name: &str,
    request: &CloneRequest,
    launcher: &CloneLauncher,
) -> Result<Vec<CloneInfo>> {
    let tree = TreeFile::load(metadata).map_err(ControlError::from)?;
    let info = tree
        .snapshots
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            ControlError::NotFound(format!(
                "no snapshot named {name:?} in {}",
                metadata.display()
            ))
        })?;
    let source = CloneSource::of_snapshot(info)?;
    spawn(&source, request, launcher, &Registry::beside(metadata))
}

/// Stops the clone in `request.dir` and removes its directory and its record.
pub fn destroy(registry: &Registry, request: &CloneDestroyRequest) -> Result<CloneRecord> {
    let record = registry.find(&request.dir)?.ok_or_else(|| {
        ControlError::NotFound(format!(
            "no clone in {} (registry {})",
            request.dir.display(),
            registry.path().display()
        ))
    })?;
    process::stop(&record.clone)?;
    if record.clone.dir.exists() {
        std::fs::remove_dir_all(&record.clone.dir).map_err(|e| {
            ControlError::Failed(format!(
                "removing clone {}: {e}",
                record.clone.dir.display()
            ))
        })?;
    }
    registry.remove(&request.dir)?;
    tracing::info!(dir = %record.clone.dir.display(), "clone destroyed");
    Ok(record)
}

/// Refuses deleting `name` while clones stand on it, on a snapshot built on it (whose images
/// have `name`'s below them), or on one it is built on (deleting `name` would merge its
/// images into that snapshot's frozen ones, which clones have open).
pub fn check_delete(registry: &Registry, snapshots: &[SnapshotInfo], name: &str) -> Result<()> {
    // `name` and every descendant first, then its ancestors (not their other branches).
    let mut family = vec![name.to_string()];
    let mut index = 0;
    while index < family.len() {
        let parent = family[index].clone();
        for s in snapshots {
            if s.parent.as_deref() == Some(parent.as_str()) && !family.contains(&s.name) {
                family.push(s.name.clone());
            }
        }
        index += 1;
    }
    let parent_of = |n: &str| {
        snapshots
            .iter()
            .find(|s| s.name == n)
            .and_then(|s| s.parent.clone())
    };
    let mut ancestor = parent_of(name);
    while let Some(parent) = ancestor {
        if family.contains(&parent) {
            break;
        }
        ancestor = parent_of(&parent);
        family.push(parent);
    }
    let users: Vec<CloneRecord> = registry
        .list()?
        .into_iter()
        .filter(|c| c.snapshot.as_ref().is_some_and(|s| family.contains(s)))
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let dirs: Vec<String> = users
        .iter()
        .take(4)
        .map(|c| c.clone.dir.display().to_string())
        .collect();
    Err(ControlError::Conflict(format!(
        "snapshot {name:?} is used by {} clone(s) ({}{}): destroy them first",
        users.len(),
        dirs.join(", "),
        if users.len() > dirs.len() {
            ", ..."
        } else {
            ""
        }
    )))
}

/// The clones of snapshot `name` recorded in `registry`.
pub fn list(registry: &Registry, name: &str) -> Result<Vec<CloneRecord>> {
    Ok(registry
        .list()?
        .into_iter()
        .filter(|c| c.snapshot.as_deref() == Some(name))
        .collect())
}
