//! The snapshot tree of one VM (virsh `snapshot-*`): named snapshots with a parent each, one
//! of them *current*, revert to any of them while the VM runs, delete any of them, and the
//! metadata persisted beside the VM.
//!
//! Three kinds of snapshot, all taken of every disk at one quiesced instant:
//! - **external disk-only**: each disk's active image is frozen (read-only) and the VM goes
//!   on writing to a new overlay on top of it;
//! - **external with memory**: the same, plus a VM checkpoint written (through
//!   [`VmState::save_checkpoint`]) into a directory beside the metadata while the disks are
//!   quiesced;
//! - **internal**: a qcow2 internal snapshot in each disk's active image, with the VM state
//!   (through [`VmState::save_stream`]) in the first disk's VM-state area, as QEMU's savevm.
//!
//! **Revert** points each disk at the snapshot: for an external snapshot a *fresh* overlay on
//! its frozen images (so the snapshot stays reusable); for an internal one the snapshot is
//! applied in place when its image is still the disk's active image, or to a copy of the
//! image when the image has since become a backing file. The state left behind is dropped
//! unless a snapshot still needs it.
//!
//! **Delete** forgets the snapshot and then *compacts*: an image the tree created that no
//! snapshot names and no disk writes to is deleted when nothing is built on it, and merged
//! into the one image built on it when there is exactly one (a live stream into the disk's
//! active image, a live commit of an intermediate image, or an offline rebase of an image off
//! the disks' chains), so no other snapshot's contents change. An image two branches share
//! stays until one of them goes.
//!
//! The metadata (see [`metadata`]) lives in one JSON file, rewritten atomically after every
//! change; checkpoints are created in a directory beside it, overlays beside the image they
//! are built on (`STEM.NAME.qcow2`).
//!
//! ```
//! use std::sync::Arc;
//! use storage::{LiveDisk, OpenOptions};
//! use storage::qcow2::{create, CreateOptions};
//! use snapshot::tree::{SnapshotTree, TakeOptions, DeleteOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let path = dir.path().join("vda.qcow2");
//! create(&path, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
//! let disk = LiveDisk::new("vda", storage::open(&path, &OpenOptions::default())?);
//! let tree = SnapshotTree::open(dir.path().join("snapshots.json"), vec![disk.clone()], None)?;
//!
//! disk.write_at(b"one", 0)?;
//! tree.create("s1", &TakeOptions::disk_only())?;
//! disk.write_at(b"two", 0)?;
//! tree.revert("s1")?;
//! let mut back = [0u8; 3];
//! disk.read_at(&mut back, 0)?;
//! assert_eq!(&back, b"one");
//! tree.delete("s1", &DeleteOptions::default())?;
//! assert!(tree.list().is_empty());
//! # Ok(()) }
//! ```

pub mod internal;
pub mod metadata;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use storage::live::{DiskClaim, LiveDisk};
use storage::qcow2::Qcow2Image;
use storage::{BlockDevice, OpenOptions};

use crate::chain;
use crate::commit::{commit, CommitOptions};
use crate::error::{Error, Result};
use crate::job::{Job, JobInfo};
use crate::live_snapshot::{external_snapshot_with, DiskOverlay};
use crate::stream::{stream, StreamOptions};
use crate::vm_state::VmState;

pub use metadata::{DiskImage, ImageRecord, RunState, SnapshotInfo, SnapshotKind, TreeFile};

use internal::{open_alone, reopen_top, writable_qcow2, VmStateReader, VmStateWriter};

/// Longest snapshot name accepted.
pub const MAX_NAME: usize = 200;

/// How [`SnapshotTree::create`] takes a snapshot (virsh `snapshot-create-as` flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeOptions {
    /// Free-form description.
    pub description: Option<String>,
    /// Disks only, no memory (`--disk-only`).
    pub disk_only: bool,
    /// A qcow2 internal snapshot (`--internal`), with the VM state unless `disk_only`.
    pub internal: bool,
}

impl TakeOptions {
    /// An external disk-only snapshot.
    pub fn disk_only() -> Self {
        TakeOptions {
            disk_only: true,
            ..Default::default()
        }
    }

    /// An external snapshot with memory.
    pub fn with_memory() -> Self {
        TakeOptions::default()
    }

    /// An internal snapshot, with memory when `memory`.
    pub fn internal(memory: bool) -> Self {
        TakeOptions {
            disk_only: !memory,
            internal: true,
            ..Default::default()
        }
    }
}

/// How [`SnapshotTree::delete`] deletes (virsh `snapshot-delete` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Delete the snapshot's descendants too (`--children`).
    pub children: bool,
    /// Only forget the snapshots; leave every image and checkpoint as it is (`--metadata`).
    pub metadata_only: bool,
}

/// Reports the VM's run state for snapshots that do not pause it (disk-only ones).
pub type StateProbe = Arc<dyn Fn() -> RunState + Send + Sync>;

/// The snapshot tree of one VM's disks. See the [module documentation](self).
pub struct SnapshotTree {
    path: PathBuf,
    dir: PathBuf,
    disks: Vec<Arc<LiveDisk>>,
    vm_state: Option<Arc<dyn VmState>>,
    state_probe: Mutex<Option<StateProbe>>,
    /// Serialises operations; `meta` is only held briefly so listings never wait for a merge.
    op: Mutex<()>,
    meta: Mutex<TreeFile>,
    jobs: Mutex<Vec<Job>>,
    problems: Vec<String>,
}

impl std::fmt::Debug for SnapshotTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotTree")
            .field("path", &self.path)
            .field("snapshots", &self.meta.lock().snapshots.len())
            .finish_non_exhaustive()
    }
}

/// Checks a snapshot name: 1 to [`MAX_NAME`] bytes, usable in a file name.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "snapshot name must be 1 to {MAX_NAME} bytes"
        )));
    }
    if name.chars().any(|c| c == '/' || c.is_control()) || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!(
            "snapshot name {name:?} must not contain '/' or control characters"
        )));
    }
    Ok(())
}

/// `path` made absolute and, when it exists, canonical: how every path is compared.
fn abs(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed image no snapshot uses"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing an image failed"),
    }
}

fn path_text(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument(format!("{}: path is not UTF-8", path.display())))
}

/// Files an operation created, removed when it fails (on drop unless `keep`).
#[derive(Default)]
struct Created {
    paths: Vec<PathBuf>,
    keep: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.keep {
            self.paths.iter().for_each(|p| remove_file(p));
        }
    }
}

/// Copies the qcow2 image `source` to `path` and applies its internal snapshot `name` there:
/// a plain image (no internal snapshots of its own) on `source`'s backing chain that reads
/// as the snapshot did, while `source` and its snapshot stay as they are.
fn copy_with_snapshot_applied(source: &Path, path: &Path, name: &str) -> Result<Qcow2Image> {
    std::fs::copy(source, path).map_err(|e| {
        Error::InvalidArgument(format!(
            "copying {} to {}: {e}",
            source.display(),
            path.display()
        ))
    })?;
    let mut copy = Qcow2Image::open_with(path, false, &OpenOptions::default(), |backing, fmt| {
        // Named relative to the source's directory, as the header was written for it.
        storage::open(
            &storage::open::resolve_backing_path(source, backing),
            &OpenOptions {
                read_only: true,
                format: fmt,
                ..OpenOptions::default()
            },
        )
    })?;
    copy.apply_snapshot(name)?;
    let ids: Vec<String> = copy.snapshots().iter().map(|s| s.id.clone()).collect();
    for id in ids {
        copy.delete_snapshot(&id)?;
    }
    Ok(copy)
}

/// One step of compaction.
enum Merge {
    /// Nothing is built on the image: delete it.
    Delete(PathBuf),
    /// Pull `image` into the disk's active image, which is built on it.
    Stream { disk: usize, image: PathBuf },
    /// Commit `top`, an intermediate image of the disk's chain, into `image` below it.
    Commit {
        disk: usize,
        top: PathBuf,
        image: PathBuf,
    },
    /// Rebase `top`, on no disk's chain, off `image` onto `image`'s backing file.
    Rebase { top: PathBuf, image: PathBuf },
}

impl SnapshotTree {
    /// Opens the tree whose metadata is at `path` (created on the first snapshot if absent)
    /// for `disks`, in device order. `vm_state` is the running VM, for snapshots with memory
    /// and for pausing the vCPUs around reverts; `None` allows disk-only snapshots only.
    ///
    /// Files the metadata names are checked: what is missing is listed by
    /// [`SnapshotTree::problems`] (and logged), and the tree still opens so the remaining
    /// snapshots can be used or deleted.
    pub fn open(
        path: impl Into<PathBuf>,
        disks: Vec<Arc<LiveDisk>>,
        vm_state: Option<Arc<dyn VmState>>,
    ) -> Result<Self> {
        let path = abs(&path.into());
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let names: Vec<String> = disks.iter().map(|d| d.name().to_string()).collect();
        let (meta, mut problems) = if path.exists() {
            let file = TreeFile::load(&path)?;
            if file.disks != names {
                return Err(Error::InvalidArgument(format!(
                    "{}: snapshots of disks {:?}, but the VM has {:?}",
                    path.display(),
                    file.disks,
                    names
                )));
            }
            let problems = file.check_files();
            (file, problems)
        } else {
            (TreeFile::new(names), Vec::new())
        };
        let mut meta = meta;
        let recorded_active = meta.active.clone();
        for (disk, recorded) in disks.iter().zip(&recorded_active) {
            let actual = abs(disk.top().path());
            if &actual != recorded {
                problems.push(format!(
                    "disk {}: the snapshot metadata last saw it on {}, the VM opened {} \
                     (the former is kept, no longer managed by the tree)",
                    disk.name(),
                    recorded.display(),
                    actual.display()
                ));
                // The state the VM last ran on is the user's to keep: never merged or
                // removed as an image nothing uses.
                if let Some(record) = meta.images.iter_mut().find(|r| &r.path == recorded) {
                    record.owned = false;
                }
            }
        }
        for problem in &problems {
            tracing::warn!(metadata = %path.display(), "{problem}");
        }
        let tree = SnapshotTree {
            path,
            dir,
            disks,
            vm_state,
            state_probe: Mutex::new(None),
            op: Mutex::new(()),
            meta: Mutex::new(meta),
            jobs: Mutex::new(Vec::new()),
            problems,
        };
        tree.register_live_chains();
        Ok(tree)
    }

    /// Sets how disk-only snapshots learn whether the VM runs (the default says running).
    pub fn set_state_probe(&self, probe: StateProbe) {
        *self.state_probe.lock() = Some(probe);
    }

    /// The metadata file.
    pub fn metadata_path(&self) -> &Path {
        &self.path
    }

    /// What was wrong with the files when the tree was opened.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Every snapshot, in creation order.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.meta.lock().snapshots.clone()
    }

    /// The snapshot named `name`.
    pub fn get(&self, name: &str) -> Result<SnapshotInfo> {
        self.meta
            .lock()
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSnapshot { name: name.into() })
    }

    /// The current snapshot: the last created or reverted to.
    pub fn current(&self) -> Option<SnapshotInfo> {
        let meta = self.meta.lock();
        let name = meta.current.as_ref()?;
        meta.snapshots.iter().find(|s| &s.name == name).cloned()
    }

    /// The merge jobs a delete is running right now.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.jobs.lock().iter().map(Job::info).collect()
    }

    /// Cancels the merge jobs a delete is running and waits up to `timeout` for each to
    /// stop (the VM is going away); the delete then fails, leaving every chain valid.
    pub fn cancel_jobs(&self, timeout: std::time::Duration) {
        let jobs: Vec<Job> = self.jobs.lock().clone();
        for job in jobs {
            job.cancel();
            if !job.wait_for(timeout, |s| s == crate::job::JobStatus::Concluded) {
                tracing::warn!("merge job {} did not stop in {timeout:?}", job.id());
            }
        }
    }

    /// Every image file the tree knows (disks' chains included).
    pub fn images(&self) -> Vec<PathBuf> {
        self.meta
            .lock()
            .images
            .iter()
            .map(|r| r.path.clone())
            .collect()
    }

    /// Takes snapshot `name` of every disk and makes it current.
    pub fn create(&self, name: &str, options: &TakeOptions) -> Result<SnapshotInfo> {
        validate_name(name)?;
        let _op = self.op.lock();
        if self.get(name).is_ok() {
            return Err(Error::SnapshotExists { name: name.into() });
        }
        self.register_live_chains();
        let memory = !options.disk_only;
        if memory && self.vm_state.is_none() {
            return Err(Error::InvalidArgument(
                "this VM cannot save its memory: add --disk-only (disk_only) for a disk-only snapshot".into(),
            ));
        }
        let mut info = SnapshotInfo {
            name: name.to_string(),
            description: options.description.clone(),
            created: now(),
            parent: self.meta.lock().current.clone(),
            state: RunState::Running,
            kind: SnapshotKind::Internal,
            memory,
            disks: Vec::new(),
            checkpoint: None,
            vm_state_size: 0,
        };
        if options.internal {
            self.create_internal(&mut info)?;
        } else {
            self.create_external(&mut info)?;
        }
        {
            let mut meta = self.meta.lock();
            meta.snapshots.push(info.clone());
            meta.current = Some(name.to_string());
        }
        self.save()?;
        tracing::info!(snapshot = name, kind = %info.kind, "snapshot created");
        Ok(info)
    }

    fn probe_state(&self) -> RunState {
        self.state_probe
            .lock()
            .as_ref()
            .map_or(RunState::Running, |probe| probe())
    }

    /// Pauses the vCPUs when the tree has a VM; returns whether they were running.
    fn pause(&self) -> Result<bool> {
        match &self.vm_state {
            Some(vm) => vm.pause_vcpus().map_err(Error::Hook),
            None => Ok(false),
        }
    }

    fn resume_if(&self, run: bool) -> Result<()> {
        match &self.vm_state {
            Some(vm) if run => vm.resume_vcpus().map_err(Error::Hook),
            _ => Ok(()),
        }
    }

    fn create_external(&self, info: &mut SnapshotInfo) -> Result<()> {
        info.kind = if info.memory {
            SnapshotKind::ExternalWithMemory
        } else {
            SnapshotKind::ExternalDiskOnly
        };
        let overlays: Vec<DiskOverlay> = self
            .disks
            .iter()
            .map(|d| DiskOverlay::new(d, self.fresh_path(&abs(d.top().path()), &info.name, "")))
            .collect();
        let checkpoint = info.memory.then(|| self.checkpoint_dir(&info.name));
        if let Some(dir) = &checkpoint {
            if dir.exists() {
                return Err(Error::Exists { path: dir.clone() });
            }
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::InvalidArgument(format!("{}: {e}", parent.display())))?;
            }
        }
        info.state = self.probe_state();
        let was_running = if info.memory {
            let running = self.pause()?;
            info.state = if running {
                RunState::Running
            } else {
                RunState::Paused
            };
            running
        } else {
            false
        };
        let vm = self.vm_state.clone();
        let result = external_snapshot_with(&overlays, || match (&vm, &checkpoint) {
            (Some(vm), Some(dir)) => vm.save_checkpoint(dir),
            _ => Ok(()),
        });
        let resumed = self.resume_if(was_running);
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                if let Some(dir) = &checkpoint {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        {
            let mut meta = self.meta.lock();
            for (overlay, old) in overlays.iter().zip(&report.old_tops) {
                let old = abs(old);
                meta.images.push(ImageRecord {
                    path: abs(&overlay.overlay),
                    backing: Some(old.clone()),
                    owned: true,
                });
                info.disks.push(DiskImage {
                    disk: overlay.disk.name().to_string(),
                    image: old,
                });
            }
        }
        info.checkpoint = checkpoint;
        if let Err(e) = resumed {
            // The snapshot exists: record it before reporting that the VM stayed paused.
            {
                let mut meta = self.meta.lock();
                meta.snapshots.push(info.clone());
                meta.current = Some(info.name.clone());
            }
            self.save()?;
            return Err(e);
        }
        Ok(())
    }

    fn claim_all(&self, owner: &'static str) -> Result<Vec<DiskClaim>> {
        Ok(self
            .disks
            .iter()
            .map(|d| d.claim(owner))
            .collect::<std::result::Result<Vec<_>, _>>()?)
    }

    fn create_internal(&self, info: &mut SnapshotInfo) -> Result<()> {
        info.kind = SnapshotKind::Internal;
        for disk in &self.disks {
            let top = disk.top();
            let image = writable_qcow2(&top, disk.name())?;
            if image.find_snapshot(&info.name).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: {} already has an internal snapshot {:?}",
                    disk.name(),
                    top.path().display(),
                    info.name
                )));
            }
        }
        let claims = self.claim_all("snapshot")?;
        info.state = self.probe_state();
        let was_running = if info.memory {
            let running = self.pause()?;
            info.state = if running {
                RunState::Running
            } else {
                RunState::Paused
            };
            running
        } else {
            false
        };
        let result = self.take_internal(info);
        drop(claims);
        let resumed = self.resume_if(was_running);
        result?;
        resumed
    }

    /// The critical section of an internal snapshot: every disk quiesced.
    fn take_internal(&self, info: &mut SnapshotInfo) -> Result<()> {
        let disks: Vec<&LiveDisk> = self.disks.iter().map(|d| &**d).collect();
        let mut guards = LiveDisk::quiesce_all(&disks);
        let mut reopened: Vec<Qcow2Image> = Vec::new();
        let mut failure = None;
        for guard in &guards {
            match reopen_top(guard) {
                Ok(image) => reopened.push(image),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut taken = 0;
        if failure.is_none() {
            for (index, image) in reopened.iter_mut().enumerate() {
                let mut state_size = 0;
                if index == 0 && info.memory {
                    if let Some(vm) = &self.vm_state {
                        let mut writer = VmStateWriter { image, position: 0 };
                        match vm.save_stream(&mut writer) {
                            Ok(n) => state_size = n.max(writer.position),
                            Err(e) => {
                                failure = Some(Error::Hook(e));
                                break;
                            }
                        }
                    }
                }
                match image.create_snapshot(&info.name, 0, state_size) {
                    Ok(_) => {
                        taken += 1;
                        if index == 0 {
                            info.vm_state_size = state_size;
                        }
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        break;
                    }
                }
            }
        }
        if failure.is_some() {
            for image in reopened.iter_mut().take(taken) {
                if let Err(e) = image.delete_snapshot(&info.name) {
                    tracing::error!(path = %image.file().path().display(), error = %e,
                        "rolling back an internal snapshot failed");
                }
            }
        }
        // The reopened handles replace the sealed ones whatever happened.
        let mut installed = Ok(());
        for (guard, image) in guards.iter_mut().zip(reopened) {
            let path = image.file().path().to_path_buf();
            if let Err(e) = guard.replace_top(Arc::new(image)) {
                installed = installed.and(Err(e));
            }
            info.disks.push(DiskImage {
                disk: guard.disk().name().to_string(),
                image: abs(&path),
            });
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(installed?)
    }

    /// Reverts every disk (and, for a snapshot with memory, the VM) to snapshot `name`, which
    /// becomes current.
    pub fn revert(&self, name: &str) -> Result<SnapshotInfo> {
        let _op = self.op.lock();
        let snapshot = self.get(name)?;
        self.register_live_chains();
        if snapshot.kind == SnapshotKind::Internal {
            self.revert_internal(&snapshot)?;
        } else {
            self.revert_external(&snapshot)?;
        }
        self.meta.lock().current = Some(name.to_string());
        self.save()?;
        self.compact()?;
        tracing::info!(snapshot = name, "reverted");
        Ok(snapshot)
    }

    fn revert_external(&self, snapshot: &SnapshotInfo) -> Result<()> {
        let mut created = Created::default();
        let tops = self.prepare_revert_overlays(snapshot, &mut created.paths)?;
        let claims = self.claim_all("snapshot-revert")?;
        let was_running = self.pause()?;
        let old_tops = match self.switch(&tops) {
            Ok(old) => old,
            Err(e) => {
                self.resume_if(was_running)?;
                return Err(e);
            }
        };
        if let (Some(vm), Some(dir)) = (&self.vm_state, &snapshot.checkpoint) {
            if let Err(e) = vm.load_checkpoint(dir) {
                // Back to where the VM was: its memory still matches the old disks.
                let back = self.switch(&old_tops);
                drop(claims);
                if back.is_ok() {
                    self.resume_if(was_running)?;
                } else {
                    // Some disk stays on the snapshot's overlay: keep the files it uses.
                    created.keep = true;
                    self.record_created(&created.paths, snapshot);
                }
                return Err(Error::Hook(e));
            }
        }
        drop(claims);
        created.keep = true;
        self.record_created(&created.paths, snapshot);
        self.seal_left(&old_tops);
        let run = if snapshot.memory {
            snapshot.state == RunState::Running
        } else {
            was_running
        };
        self.resume_if(run)
    }

    /// Records the overlays a revert made on the snapshot's frozen images.
    fn record_created(&self, paths: &[PathBuf], snapshot: &SnapshotInfo) {
        let mut meta = self.meta.lock();
        for (path, d) in paths.iter().zip(&snapshot.disks) {
            meta.images.push(ImageRecord {
                path: abs(path),
                backing: Some(d.image.clone()),
                owned: true,
            });
        }
    }

    /// Creates and opens a fresh overlay on each of the snapshot's frozen images.
    fn prepare_revert_overlays(
        &self,
        snapshot: &SnapshotInfo,
        created: &mut Vec<PathBuf>,
    ) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let mut tops = Vec::new();
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            let frozen = storage::open(
                &d.image,
                &OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                },
            )?;
            let path = self.fresh_path(&d.image, &snapshot.name, ".revert");
            let options = storage::qcow2::CreateOptions {
                size: Some(disk.size()),
                cluster_size: frozen
                    .as_qcow2()
                    .map(|i| i.cluster_size())
                    .unwrap_or(storage::qcow2::CreateOptions::default().cluster_size),
                backing_file: Some(path_text(&d.image)?),
                backing_format: Some(chain::format_of(&*frozen)),
                ..Default::default()
            };
            created.push(path.clone());
            storage::qcow2::create(&path, &options)?;
            let overlay =
                Qcow2Image::open_with(&path, false, &OpenOptions::default(), |_, _| Ok(frozen))?;
            tops.push(Arc::new(overlay) as Arc<dyn BlockDevice>);
        }
        Ok(tops)
    }

    /// Points every disk at its new top at one instant; returns the old tops.
    fn switch(&self, tops: &[Arc<dyn BlockDevice>]) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let disks: Vec<&LiveDisk> = self.disks.iter().map(|d| &**d).collect();
        let mut guards = LiveDisk::quiesce_all(&disks);
        for (guard, top) in guards.iter().zip(tops) {
            if top.size() != guard.disk().size() {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: {} has size {}, the disk {}",
                    guard.disk().name(),
                    top.path().display(),
                    top.size(),
                    guard.disk().size()
                )));
            }
        }
        let mut old = Vec::new();
        for (guard, top) in guards.iter_mut().zip(tops) {
            old.push(guard.replace_top(top.clone())?);
        }
        Ok(old)
    }

    /// Flushes and seals the images a revert left: kept if a snapshot needs them, otherwise
    /// deleted by the compaction that follows.
    fn seal_left(&self, old_tops: &[Arc<dyn BlockDevice>]) {
        for old in old_tops {
            let sealed = match old.as_qcow2() {
                Some(image) => image.make_read_only(),
                None => old.flush(),
            };
            if let Err(e) = sealed {
                tracing::warn!(path = %old.path().display(), error = %e, "flushing the image left by a revert failed");
            }
        }
    }

    fn revert_internal(&self, snapshot: &SnapshotInfo) -> Result<()> {
        // Per disk: None = apply in place (its image is the active one), Some = a copy of
        // the image with the snapshot applied, prepared before the VM is paused.
        // Declared first, dropped last: the copies' handles close before a failure removes
        // their files.
        let mut created = Created::default();
        let mut copies: Vec<Option<Arc<dyn BlockDevice>>> = Vec::new();
        // The image each copy copies, for the records.
        let mut sources: Vec<PathBuf> = Vec::new();
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            if abs(disk.top().path()) == d.image {
                copies.push(None);
                continue;
            }
            let path = self.fresh_path(&d.image, &snapshot.name, ".copy");
            created.paths.push(path.clone());
            sources.push(d.image.clone());
            copies.push(Some(Arc::new(copy_with_snapshot_applied(
                &d.image,
                &path,
                &snapshot.name,
            )?)));
        }
        let mut reader = match (snapshot.memory, &self.vm_state) {
            (true, Some(_)) => {
                let image = open_alone(&snapshot.disks[0].image, true)?;
                // The image's own table says how much state there is, not the metadata.
                let size = image
                    .find_snapshot(&snapshot.name)
                    .map(|i| image.snapshots()[i].vm_state_size)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "{}: internal snapshot {:?} is missing",
                            snapshot.disks[0].image.display(),
                            snapshot.name
                        ))
                    })?;
                Some(VmStateReader {
                    image,
                    snapshot: snapshot.name.clone(),
                    position: 0,
                    size,
                })
            }
            _ => None,
        };
        let claims = self.claim_all("snapshot-revert")?;
        let was_running = self.pause()?;
        let switched = self.switch_internal(snapshot, &copies);
        drop(claims);
        // From here some disk may use a copy: the copies are the tree's to manage.
        created.keep = true;
        {
            let mut meta = self.meta.lock();
            for (path, source) in created.paths.iter().zip(&sources) {
                let backing = meta
                    .images
                    .iter()
                    .find(|r| &r.path == source)
                    .and_then(|r| r.backing.clone());
                meta.images.push(ImageRecord {
                    path: abs(path),
                    backing,
                    owned: true,
                });
            }
        }
        let old_tops = match switched {
            Ok(old) => old,
            Err(e) => {
                self.resume_if(was_running)?;
                return Err(e);
            }
        };
        if let (Some(vm), Some(reader)) = (&self.vm_state, reader.as_mut()) {
            if let Err(e) = vm.load_stream(reader) {
                // The disks are the snapshot's now; the VM stays paused rather than run
                // memory that does not match them.
                return Err(Error::Hook(e));
            }
        }
        self.seal_left(&old_tops);
        let run = if snapshot.memory {
            snapshot.state == RunState::Running
        } else {
            was_running
        };
        self.resume_if(run)
    }

    /// The critical section of an internal revert; returns the tops left (in-place disks'
    /// are their sealed former handles).
    fn switch_internal(
        &self,
        snapshot: &SnapshotInfo,
        copies: &[Option<Arc<dyn BlockDevice>>],
    ) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let disks: Vec<&LiveDisk> = self.disks.iter().map(|d| &**d).collect();
        let mut guards = LiveDisk::quiesce_all(&disks);
        let mut old = Vec::new();
        for (guard, copy) in guards.iter_mut().zip(copies) {
            match copy {
                Some(top) => old.push(guard.replace_top(top.clone())?),
                None => {
                    let mut image = reopen_top(guard)?;
                    let applied = image.apply_snapshot(&snapshot.name);
                    // Installed even when applying failed: the former handle is sealed.
                    guard.replace_top(Arc::new(image))?;
                    applied?;
                }
            }
        }
        Ok(old)
    }

    /// Deletes snapshot `name` (and its descendants with `children`). Unless
    /// `metadata_only`, images are merged so every other snapshot keeps its contents, and
    /// every image nothing uses any more is removed. Returns the names deleted.
    pub fn delete(&self, name: &str, options: &DeleteOptions) -> Result<Vec<String>> {
        let _op = self.op.lock();
        self.get(name)?;
        self.register_live_chains();
        let targets = if options.children {
            self.subtree(name)
        } else {
            vec![name.to_string()]
        };
        let mut deleted = Vec::new();
        for target in targets {
            self.delete_one(&target, options.metadata_only)?;
            deleted.push(target);
            self.save()?;
        }
        if !options.metadata_only {
            self.compact()?;
        }
        Ok(deleted)
    }

    /// `name` and its descendants, children before parents.
    fn subtree(&self, name: &str) -> Vec<String> {
        let meta = self.meta.lock();
        let mut out = Vec::new();
        fn visit(meta: &TreeFile, name: &str, out: &mut Vec<String>) {
            for child in meta
                .snapshots
                .iter()
                .filter(|s| s.parent.as_deref() == Some(name))
            {
                visit(meta, &child.name, out);
            }
            out.push(name.to_string());
        }
        visit(&meta, name, &mut out);
        out
    }

    fn delete_one(&self, name: &str, metadata_only: bool) -> Result<()> {
        let snapshot = self.get(name)?;
        if !metadata_only {
            if snapshot.kind == SnapshotKind::Internal {
                self.delete_internal(&snapshot)?;
            }
            if let Some(dir) = &snapshot.checkpoint {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing a checkpoint failed");
                }
            }
        }
        let mut meta = self.meta.lock();
        meta.snapshots.retain(|s| s.name != name);
        for child in meta.snapshots.iter_mut() {
            if child.parent.as_deref() == Some(name) {
                child.parent = snapshot.parent.clone();
            }
        }
        if meta.current.as_deref() == Some(name) {
            meta.current = snapshot.parent.clone();
        }
        if metadata_only {
            // Forgotten, not deleted: its images (and the internal snapshot in them) are the
            // user's now, never merged or removed by the tree.
            for d in &snapshot.disks {
                if let Some(record) = meta.images.iter_mut().find(|r| r.path == d.image) {
                    record.owned = false;
                }
            }
        }
        tracing::info!(snapshot = name, metadata_only, "snapshot deleted");
        Ok(())
    }

    fn delete_internal(&self, snapshot: &SnapshotInfo) -> Result<()> {
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            if abs(disk.top().path()) == d.image {
                let _claim = disk.claim("snapshot-delete")?;
                let mut guard = disk.quiesce();
                let mut image = reopen_top(&guard)?;
                let deleted = image.delete_snapshot(&snapshot.name);
                guard.replace_top(Arc::new(image))?;
                deleted?;
            } else if d.image.exists() {
                // A backing file now: its table and refcounts change, never its active
                // mappings, which the disk's read-only handle may hold in its caches.
                let mut image = open_alone(&d.image, false)?;
                if image.find_snapshot(&snapshot.name).is_some() {
                    image.delete_snapshot(&snapshot.name)?;
                }
                image.close()?;
            }
        }
        Ok(())
    }

    /// Merges and removes images until every image the tree created is named by a snapshot,
    /// is a disk's active image, or is shared by two images built on it.
    fn compact(&self) -> Result<()> {
        while let Some(step) = self.next_merge() {
            self.run_merge(step)?;
            self.save()?;
        }
        Ok(())
    }

    fn live_chains(&self) -> Vec<Vec<PathBuf>> {
        self.disks
            .iter()
            .map(|d| {
                chain::layers(&d.top())
                    .iter()
                    .map(|l| abs(l.path()))
                    .collect()
            })
            .collect()
    }

    fn next_merge(&self) -> Option<Merge> {
        let chains = self.live_chains();
        let meta = self.meta.lock();
        let mut named: HashSet<&Path> = HashSet::new();
        let mut internal_hosts: HashSet<&Path> = HashSet::new();
        for s in &meta.snapshots {
            for d in &s.disks {
                named.insert(&d.image);
                if s.kind == SnapshotKind::Internal {
                    internal_hosts.insert(&d.image);
                }
            }
        }
        for chain in &chains {
            if let Some(top) = chain.first() {
                named.insert(top);
            }
        }
        let users = |path: &Path| -> Vec<&ImageRecord> {
            meta.images
                .iter()
                .filter(|r| r.backing.as_deref() == Some(path))
                .collect()
        };
        for record in &meta.images {
            if !record.owned || named.contains(record.path.as_path()) {
                continue;
            }
            let on = users(&record.path);
            match on.as_slice() {
                [] => return Some(Merge::Delete(record.path.clone())),
                [user] => {
                    // An image holding internal snapshots must keep its backing file as it
                    // is: its snapshots read through it.
                    if internal_hosts.contains(user.path.as_path()) {
                        continue;
                    }
                    let live = chains.iter().enumerate().find_map(|(disk, chain)| {
                        chain
                            .iter()
                            .position(|p| p == &user.path)
                            .map(|depth| (disk, depth))
                    });
                    match live {
                        Some((disk, 0)) => {
                            return Some(Merge::Stream {
                                disk,
                                image: record.path.clone(),
                            })
                        }
                        Some((disk, _)) => {
                            if user.owned && users(&user.path).len() == 1 {
                                return Some(Merge::Commit {
                                    disk,
                                    top: user.path.clone(),
                                    image: record.path.clone(),
                                });
                            }
                        }
                        None => {
                            return Some(Merge::Rebase {
                                top: user.path.clone(),
                                image: record.path.clone(),
                            })
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn run_job(&self, job: Job) -> Result<()> {
        self.jobs.lock().push(job.clone());
        let result = job.wait();
        self.jobs.lock().retain(|j| j.id() != job.id());
        match result? {
            crate::job::JobOutcome::Completed => Ok(()),
            other => Err(Error::InvalidArgument(format!(
                "merge job {} ended {other:?}",
                job.id()
            ))),
        }
    }

    fn run_merge(&self, step: Merge) -> Result<()> {
        let backing_of = |path: &Path| -> Option<PathBuf> {
            self.meta
                .lock()
                .images
                .iter()
                .find(|r| r.path == path)
                .and_then(|r| r.backing.clone())
        };
        match step {
            Merge::Delete(image) => {
                remove_file(&image);
                self.meta.lock().images.retain(|r| r.path != image);
            }
            Merge::Stream { disk, image } => {
                let below = backing_of(&image);
                let top = abs(self.disks[disk].top().path());
                tracing::info!(image = %image.display(), into = %top.display(), "merging by stream");
                self.run_job(stream(
                    &self.disks[disk],
                    StreamOptions {
                        base: below.clone(),
                        ..Default::default()
                    },
                )?)?;
                let mut meta = self.meta.lock();
                if let Some(r) = meta.images.iter_mut().find(|r| r.path == top) {
                    r.backing = below;
                }
                meta.images.retain(|r| r.path != image);
                drop(meta);
                remove_file(&image);
            }
            Merge::Commit { disk, top, image } => {
                tracing::info!(image = %top.display(), into = %image.display(), "merging by commit");
                self.run_job(commit(
                    &self.disks[disk],
                    CommitOptions {
                        top: Some(top.clone()),
                        base: Some(image.clone()),
                        ..Default::default()
                    },
                )?)?;
                let mut meta = self.meta.lock();
                for r in meta.images.iter_mut() {
                    if r.backing.as_deref() == Some(top.as_path()) {
                        r.backing = Some(image.clone());
                    }
                }
                for s in meta.snapshots.iter_mut() {
                    for d in s.disks.iter_mut() {
                        if d.image == top {
                            d.image = image.clone();
                        }
                    }
                }
                meta.images.retain(|r| r.path != top);
                drop(meta);
                remove_file(&top);
            }
            Merge::Rebase { top, image } => {
                let below = backing_of(&image);
                tracing::info!(image = %image.display(), into = %top.display(), "merging by rebase");
                let name = below.as_deref().map(path_text).transpose()?;
                let format = match &below {
                    Some(p) => Some(storage::probe_format(p)?),
                    None => None,
                };
                crate::offline::rebase(&top, name.as_deref(), format, false, &mut |_, _| {})?;
                let mut meta = self.meta.lock();
                if let Some(r) = meta.images.iter_mut().find(|r| r.path == top) {
                    r.backing = below;
                }
                meta.images.retain(|r| r.path != image);
                drop(meta);
                remove_file(&image);
            }
        }
        Ok(())
    }

    /// Adds every layer of every disk's chain to the image records (the disks' own images
    /// are not the tree's: never deleted by it), and records each layer's actual backing.
    fn register_live_chains(&self) {
        let chains = self.live_chains();
        let mut meta = self.meta.lock();
        for chain in chains {
            for (i, path) in chain.iter().enumerate() {
                let backing = chain.get(i + 1).cloned();
                match meta.images.iter_mut().find(|r| &r.path == path) {
                    // The live chain is the truth: block jobs run through the API may have
                    // changed it since the tree last looked.
                    Some(record) => record.backing = backing,
                    None => meta.images.push(ImageRecord {
                        path: path.clone(),
                        backing,
                        owned: false,
                    }),
                }
            }
        }
    }

    /// Writes the metadata file, recording each disk's active image.
    fn save(&self) -> Result<()> {
        let active: Vec<PathBuf> = self.disks.iter().map(|d| abs(d.top().path())).collect();
        let mut meta = self.meta.lock();
        meta.active = active;
        meta.save(&self.path)
    }

    /// A new file beside `image` for snapshot `name`: `STEM.NAME[TAG].qcow2`, numbered when
    /// taken (the naming `PUT /snapshot/disk` uses too).
    fn fresh_path(&self, image: &Path, name: &str, tag: &str) -> PathBuf {
        let stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let first = image.with_file_name(format!("{stem}.{name}{tag}.qcow2"));
        if first.symlink_metadata().is_err() {
            return first;
        }
        (2u64..)
            .map(|n| image.with_file_name(format!("{stem}.{name}{tag}-{n}.qcow2")))
            .find(|p| p.symlink_metadata().is_err())
            .unwrap_or(first)
    }

    fn checkpoint_dir(&self, name: &str) -> PathBuf {
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshots".into());
        self.dir.join(format!("{stem}.checkpoints")).join(name)
    }
}
