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
//! are built on (`STEM.NAME.qcow2`). The metadata, checkpoint files and directories are the
//! owner's only (0600 and 0700) whatever the umask: they hold guest memory.
//!
//! **Nothing is lost to a crash or a full disk.** Before an operation creates or removes a
//! file it records its [`Intent`] in the metadata; it commits (the new snapshot or current
//! state, intent cleared) right after the point of no return — for snapshots with memory and
//! reverts before the vCPUs run again. The next [`SnapshotTree::open`] completes an operation
//! whose disks had switched and undoes one whose had not, so the metadata always names every
//! file that holds guest data. A failure before the point of no return rolls back whole; one
//! after it ([`Error::AfterSwitch`]) keeps every file the disks now use. An image a snapshot
//! froze is never opened writable ([`Error::Frozen`]), compaction never deletes a file
//! another file is built on, and a chain never grows deeper than storage opens.
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

mod compact;
mod create;
mod delete;
mod internal;
pub mod metadata;
mod recovery;
mod revert;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use storage::live::{DiskClaim, LiveDisk};
use storage::qcow2::Qcow2Image;
use storage::{BlockDevice, OpenOptions};

use crate::chain;
use crate::error::{Error, Result};
use crate::job::{Job, JobInfo};
use crate::vm_state::VmState;

pub use metadata::{
    DiskImage, FaultHook, ImageRecord, Intent, IntentOp, RunState, SaveStep, SnapshotInfo,
    SnapshotKind, TreeFile,
};

/// Most layers a disk's chain may have: storage opens an image at most
/// [`storage::DEFAULT_MAX_CHAIN_DEPTH`] backing files deep, and reverts, restarts and every
/// `img` verb open the chain with that limit.
pub const MAX_CHAIN_LAYERS: usize = storage::DEFAULT_MAX_CHAIN_DEPTH + 1;

/// Longest snapshot name accepted.
pub const MAX_NAME: usize = 200;

/// Longest image file name the tree makes (Linux allows 255 bytes).
const MAX_FILE_NAME: usize = 240;

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
    faults: Mutex<Option<FaultHook>>,
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
        // A crash while the metadata was written leaves its temporary: never a valid file.
        if let Err(e) = metadata::remove_if_present(&metadata::temp_path(&path)) {
            tracing::warn!(metadata = %path.display(), error = %e, "removing a stale temporary failed");
        }
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
        let tops: Vec<PathBuf> = disks.iter().map(|d| abs(d.top().path())).collect();
        let resolved = meta.pending.is_some();
        problems.extend(recovery::resolve(&mut meta, &tops));
        recovery::refuse_frozen(&path, &meta, &disks)?;
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
            faults: Mutex::new(None),
        };
        tree.register_live_chains();
        if resolved {
            // Written now so the operation is not resolved again against other files.
            if let Err(e) = tree.save() {
                tracing::warn!(metadata = %tree.path.display(), error = %e,
                    "recording the resolved interrupted operation failed; the next open resolves it again");
            }
        }
        Ok(tree)
    }

    /// The image each disk should be opened on to go on from the tree at `path` after the
    /// VM stopped (or crashed): the active images it records, or the new images of an
    /// interrupted create or revert the guest had already written to. Empty when there is
    /// no metadata yet.
    pub fn resume_tops(path: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let path = abs(path.as_ref());
        if !path.exists() {
            return Ok(Vec::new());
        }
        let mut meta = TreeFile::load(&path)?;
        // Resolved in memory only, as if no disk ran on the new files: what remains is
        // where the guest's data is.
        let active = meta.active.clone();
        recovery::resolve_dry(&mut meta, &active);
        Ok(meta.active)
    }

    /// Installs `hook`, called before each step of every metadata write (tests use it to
    /// fail a step with ENOSPC or EIO, or to stop the process there).
    pub fn set_fault_hook(&self, hook: FaultHook) {
        *self.faults.lock() = Some(hook);
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

    fn claim_all(&self, owner: &'static str) -> Result<Vec<DiskClaim>> {
        Ok(self
            .disks
            .iter()
            .map(|d| d.claim(owner))
            .collect::<std::result::Result<Vec<_>, _>>()?)
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
        let faults = self.faults.lock().clone();
        let mut meta = self.meta.lock();
        meta.active = active;
        meta.save_with(&self.path, faults.as_ref())
    }

    /// Records `intent` in the metadata file before the operation touches any file; on
    /// failure nothing is recorded and the operation must not start.
    fn write_intent(&self, intent: Intent) -> Result<()> {
        self.meta.lock().pending = Some(intent);
        let saved = self.save();
        if saved.is_err() {
            self.meta.lock().pending = None;
        }
        saved
    }

    /// Forgets the intent of an operation that rolled back (its files are gone). If the
    /// write fails the file still names the intent, which the next open resolves the same
    /// way.
    fn clear_intent(&self) {
        self.meta.lock().pending = None;
        if let Err(e) = self.save() {
            tracing::warn!(metadata = %self.path.display(), error = %e,
                "recording a rolled-back operation failed; the next open finishes the rollback");
        }
    }

    /// After an operation returned: an intent still pending belongs to a failure that
    /// removed its files on the way out (a committed operation clears it).
    fn clear_failed_intent(&self) {
        if self.meta.lock().pending.is_some() {
            self.clear_intent();
        }
    }

    /// Removes files (or checkpoint directories) the in-memory metadata no longer names:
    /// first the metadata is written naming them as to be removed, so a crash in between
    /// leaves no file unaccounted for; then they go.
    fn remove_unnamed(&self, files: Vec<PathBuf>) -> Result<()> {
        self.record_removal(&files)?;
        self.finish_removal(&files)
    }

    /// The first half of [`SnapshotTree::remove_unnamed`]: writes the in-memory metadata,
    /// naming `files` as to be removed. Once this returns `Ok` the change is committed.
    fn record_removal(&self, files: &[PathBuf]) -> Result<()> {
        if files.is_empty() {
            return self.save();
        }
        self.write_intent(Intent {
            op: IntentOp::Remove,
            snapshot: String::new(),
            files: files.to_vec(),
            fresh_overlays: false,
            info: None,
            records: Vec::new(),
            tops: Vec::new(),
        })
    }

    /// The second half: removes `files` and records that they are gone (a failure leaves
    /// the intent in the file, which the next open finishes).
    fn finish_removal(&self, files: &[PathBuf]) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        files.iter().for_each(|f| recovery::remove_path(f));
        self.meta.lock().pending = None;
        self.save()
    }

    /// Puts the in-memory metadata back to `before` after its write failed, and writes it
    /// again: the failed write may have renamed the new file into place before its
    /// directory sync failed. A failure of that write too is logged (the next open reads
    /// whichever file is in place, both consistent with the images).
    fn restore_metadata(&self, before: TreeFile) {
        *self.meta.lock() = before;
        if let Err(e) = self.save() {
            tracing::error!(metadata = %self.path.display(), error = %e,
                "rewriting the metadata after a failed operation failed");
        }
    }

    /// Creates the directory holding the tree's checkpoints, owner-only.
    fn make_checkpoints_dir(&self, checkpoint: &Path) -> Result<()> {
        match checkpoint.parent() {
            Some(parent) => crate::checkpoint::create_private_dir(parent)
                .map_err(|e| Error::InvalidArgument(e.to_string())),
            None => Ok(()),
        }
    }

    /// A new file beside `image` for disk `disk`'s image of snapshot `name`:
    /// `STEM.NAME[TAG].qcow2` (the naming `PUT /snapshot/disk` uses too), numbered when taken.
    /// Stems grow with each snapshot of a chain; past [`MAX_FILE_NAME`] bytes the name starts
    /// again from the disk's name.
    fn fresh_path(&self, image: &Path, disk: &str, name: &str, tag: &str) -> PathBuf {
        let stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| disk.to_string());
        // Room for "-NNNNNNNNNN.qcow2".
        let fits = |prefix: &str| prefix.len() + name.len() + tag.len() + 18 <= MAX_FILE_NAME;
        let prefix = [stem.as_str(), disk, "disk"]
            .into_iter()
            .find(|p| fits(p))
            .unwrap_or("disk");
        let first = image.with_file_name(format!("{prefix}.{name}{tag}.qcow2"));
        if first.symlink_metadata().is_err() {
            return first;
        }
        (2u64..)
            .map(|n| image.with_file_name(format!("{prefix}.{name}{tag}-{n}.qcow2")))
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
