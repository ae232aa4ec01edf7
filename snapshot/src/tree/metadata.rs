//! The snapshot tree's metadata file: what it holds, and how it is written (atomically) and
//! read back (checked against the images it names).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use storage::fault;

use crate::error::{Error, Result};

/// Version of the metadata file format; a file of another major version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Largest metadata file read: a bound on what an untrusted file can make us allocate.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// A step of writing the metadata file, where a [`FaultHook`] can inject a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStep {
    /// Creating the temporary file.
    CreateTemporary,
    /// Writing the temporary file.
    Write,
    /// Fsync of the temporary file.
    Fsync,
    /// Renaming it over the metadata file (the new metadata is in place after this).
    Rename,
    /// Fsync of the directory.
    FsyncDirectory,
}

/// Called before each step of every metadata write; an error fails the step as the
/// filesystem would. For tests, which inject ENOSPC or EIO at each step (see
/// [`SnapshotTree::set_fault_hook`](super::SnapshotTree::set_fault_hook)).
pub type FaultHook = Arc<dyn Fn(SaveStep) -> std::io::Result<()> + Send + Sync>;

/// The temporary file the metadata at `path` is written to before it is renamed into place.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshots.json".into());
    dir.join(format!(".{name}.tmp"))
}

/// Removes `path`; a missing file is no error.
pub(crate) fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// External: every disk's image frozen, the VM kept running on new overlays.
    ExternalDiskOnly,
    /// External with memory: the frozen images and a VM checkpoint taken at the same instant.
    ExternalWithMemory,
    /// Internal: a qcow2 internal snapshot in every disk's active image (with the VM state in
    /// the first disk's VM-state area when taken with memory).
    Internal,
}

impl SnapshotKind {
    /// The name used in listings and the API ("external-disk-only", ...).
    pub fn name(self) -> &'static str {
        match self {
            SnapshotKind::ExternalDiskOnly => "external-disk-only",
            SnapshotKind::ExternalWithMemory => "external-with-memory",
            SnapshotKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The VM's state when a snapshot was taken (virsh's `State` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// The vCPUs were running.
    Running,
    /// The vCPUs were paused.
    Paused,
    /// No VM was running the disks.
    Shutoff,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutoff => "shutoff",
        })
    }
}

/// One disk of a snapshot: the image whose contents the snapshot is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskImage {
    /// The disk's name (vda, ...).
    pub disk: String,
    /// External snapshots: the image frozen (read-only from then on). Internal snapshots:
    /// the qcow2 image holding the internal snapshot.
    pub image: PathBuf,
}

/// One snapshot of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// Its name, unique in the tree.
    pub name: String,
    /// Free-form description.
    #[serde(default)]
    pub description: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The snapshot that was current when this one was taken.
    #[serde(default)]
    pub parent: Option<String>,
    /// The VM's state when it was taken.
    pub state: RunState,
    /// What it holds.
    pub kind: SnapshotKind,
    /// Whether it holds the VM's memory and device state.
    pub memory: bool,
    /// The images, one per disk, in disk order.
    pub disks: Vec<DiskImage>,
    /// External with memory: the checkpoint directory.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Internal with memory: bytes of VM state in the first disk's VM-state area.
    #[serde(default)]
    pub vm_state_size: u64,
}

/// An image file the tree knows: a disk's original image or one it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// Absolute path.
    pub path: PathBuf,
    /// Its backing file (absolute), if any.
    #[serde(default)]
    pub backing: Option<PathBuf>,
    /// Created by the tree, hence deleted by it once nothing uses it.
    pub owned: bool,
}

/// What an interrupted operation was doing (see [`Intent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntentOp {
    /// Taking an external snapshot: `files` are its new overlays.
    Create,
    /// Reverting: `files` are the overlays or copies the disks switch to.
    Revert,
    /// Removing files the tree no longer names (compaction, snapshot delete).
    Remove,
}

/// An operation in progress, recorded in the metadata *before* it creates or removes any
/// file, so that a crash at any moment leaves metadata naming every file the operation
/// touched. The next [`open`](super::SnapshotTree::open) finishes or undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// What the operation does.
    pub op: IntentOp,
    /// The snapshot created or reverted to (empty for [`IntentOp::Remove`]).
    #[serde(default)]
    pub snapshot: String,
    /// Files (or checkpoint directories) the operation creates or removes.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Whether `files` are fresh, empty overlays: one holding data was written to by the
    /// guest, so the disks had switched to it.
    #[serde(default)]
    pub fresh_overlays: bool,
    /// [`IntentOp::Create`]: the snapshot recorded when the operation completes.
    #[serde(default)]
    pub info: Option<SnapshotInfo>,
    /// Image records added when the operation completes.
    #[serde(default)]
    pub records: Vec<ImageRecord>,
    /// Each disk's active image once the operation completes, in disk order.
    #[serde(default)]
    pub tops: Vec<PathBuf>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeFile {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The disks, in order, as they were named when the tree was made.
    pub disks: Vec<String>,
    /// The current snapshot (last created or reverted to).
    #[serde(default)]
    pub current: Option<String>,
    /// Every snapshot, in creation order.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// Every image the tree knows.
    #[serde(default)]
    pub images: Vec<ImageRecord>,
    /// Each disk's active image when the file was written, in disk order.
    #[serde(default)]
    pub active: Vec<PathBuf>,
    /// An operation that had not finished when the file was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Intent>,
}

impl TreeFile {
    /// An empty tree over `disks`.
    pub fn new(disks: Vec<String>) -> Self {
        TreeFile {
            version: FORMAT_VERSION,
            disks,
            current: None,
            snapshots: Vec::new(),
            images: Vec::new(),
            active: Vec::new(),
            pending: None,
        }
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::InvalidArgument(format!("{}: {what}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(format!(
                "{} bytes is larger than the {MAX_FILE_BYTES} accepted",
                meta.len()
            )));
        }
        let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let file: TreeFile =
            serde_json::from_slice(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if file.version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not the supported {FORMAT_VERSION}",
                file.version
            )));
        }
        file.validate().map_err(bad)?;
        Ok(file)
    }

    /// Structural checks: unique names, parents and current exist, one image per disk, no
    /// parent loops.
    fn validate(&self) -> std::result::Result<(), String> {
        self.validate_counting(&mut 0)
    }

    /// [`TreeFile::validate`], adding to `steps` one per map lookup or link followed: linear
    /// in the number of snapshots (a file of thousands must not delay a VM's start).
    fn validate_counting(&self, steps: &mut u64) -> std::result::Result<(), String> {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(self.snapshots.len());
        for (i, s) in self.snapshots.iter().enumerate() {
            *steps += 1;
            if index.insert(s.name.as_str(), i).is_some() {
                return Err(format!("snapshot {:?} appears twice", s.name));
            }
            if s.disks.len() != self.disks.len()
                || s.disks.iter().zip(&self.disks).any(|(d, n)| &d.disk != n)
            {
                return Err(format!(
                    "snapshot {:?}: its disks do not match the tree's {:?}",
                    s.name, self.disks
                ));
            }
            if (s.kind == SnapshotKind::ExternalWithMemory) != s.checkpoint.is_some() {
                return Err(format!(
                    "snapshot {:?}: a checkpoint goes with kind external-with-memory only",
                    s.name
                ));
            }
        }
        let mut parents = Vec::with_capacity(self.snapshots.len());
        for s in &self.snapshots {
            *steps += 1;
            parents.push(match &s.parent {
                None => None,
                Some(parent) => Some(*index.get(parent.as_str()).ok_or_else(|| {
                    format!("snapshot {:?}: parent {parent:?} does not exist", s.name)
                })?),
            });
        }
        if let Some(current) = &self.current {
            if !index.contains_key(current.as_str()) {
                return Err(format!("current snapshot {current:?} does not exist"));
            }
        }
        // Parent links must not loop. Each walk stops at a snapshot an earlier walk already
        // showed to reach a root, so every link is followed once in all.
        const UNSEEN: u8 = 0;
        const ON_WALK: u8 = 1;
        const REACHES_ROOT: u8 = 2;
        let mut state = vec![UNSEEN; self.snapshots.len()];
        let mut walk = Vec::new();
        for start in 0..self.snapshots.len() {
            walk.clear();
            let mut at = Some(start);
            while let Some(i) = at {
                *steps += 1;
                match state[i] {
                    REACHES_ROOT => break,
                    ON_WALK => {
                        return Err(format!(
                            "snapshot {:?}: parent links loop",
                            self.snapshots[i].name
                        ))
                    }
                    _ => {}
                }
                state[i] = ON_WALK;
                walk.push(i);
                at = parents[i];
            }
            for &i in &walk {
                state[i] = REACHES_ROOT;
            }
        }
        if let Some(intent) = &self.pending {
            if !intent.tops.is_empty() && intent.tops.len() != self.disks.len() {
                return Err(format!(
                    "pending {:?} of snapshot {:?}: {} tops for {} disks",
                    intent.op,
                    intent.snapshot,
                    intent.tops.len(),
                    self.disks.len()
                ));
            }
            if let Some(info) = &intent.info {
                if info.disks.len() != self.disks.len() || index.contains_key(info.name.as_str()) {
                    return Err(format!(
                        "pending snapshot {:?}: its disks do not match the tree's, or the name is taken",
                        info.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Writes the file atomically: a temporary file beside it (mode 0600 whatever the
    /// umask: it names every image of the VM), fsync, rename over it, fsync of the
    /// directory. A crash leaves either the old file or the new one; a failure leaves no
    /// temporary behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, None)
    }

    /// [`TreeFile::save`], calling `faults` before each step.
    pub(crate) fn save_with(&self, path: &Path, faults: Option<&FaultHook>) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            Error::InvalidArgument(format!("{}: {what}: {e}", path.display()))
        };
        // The test hook first, then the engine-wide fault layer, so one storage fault plan
        // counts the metadata steps of an operation with its image steps.
        let step = |s: SaveStep| {
            faults.map_or(Ok(()), |f| f(s)).and_then(|()| match s {
                SaveStep::CreateTemporary => fault::check(fault::Op::Create, path),
                SaveStep::Write => fault::check(fault::Op::Write, path),
                SaveStep::Fsync => fault::check(fault::Op::Sync, path),
                SaveStep::Rename => fault::check(fault::Op::Rename, path),
                // `sync_parent_dir` checks it.
                SaveStep::FsyncDirectory => Ok(()),
            })
        };
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("encoding snapshot metadata: {e}")))?;
        let temp = temp_path(path);
        // A temporary a crash left would keep its old mode: start from a new file.
        remove_if_present(&temp).map_err(|e| io("remove stale temporary file", e))?;
        let mut file = step(SaveStep::CreateTemporary)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&temp)
            })
            .map_err(|e| io("create temporary file", e))?;
        let written = step(SaveStep::Write)
            .and_then(|()| file.write_all(&text))
            .and_then(|()| file.write_all(b"\n"))
            .map_err(|e| io("write temporary file", e))
            .and_then(|()| {
                step(SaveStep::Fsync)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io("fsync temporary file", e))
            })
            .and_then(|()| {
                drop(file);
                step(SaveStep::Rename)
                    .and_then(|()| std::fs::rename(&temp, path))
                    .map_err(|e| io("rename into place", e))
            });
        if let Err(e) = written {
            if let Err(removing) = remove_if_present(&temp) {
                tracing::warn!(path = %temp.display(), error = %removing, "removing the metadata temporary failed");
            }
            return Err(e);
        }
        step(SaveStep::FsyncDirectory)
            .and_then(|()| storage::file::sync_parent_dir(path))
            .map_err(|e| io("fsync directory", e))?;
        Ok(())
    }

    /// Checks the files the metadata names: every snapshot image and checkpoint exists,
    /// every internal snapshot is in its image. Returns one message per problem.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // Each image's snapshot table is read once, however many snapshots it holds.
        let mut tables: HashMap<&Path, std::result::Result<HashSet<String>, String>> =
            HashMap::new();
        for s in &self.snapshots {
            for d in &s.disks {
                if !d.image.exists() {
                    problems.push(format!(
                        "snapshot {:?}, disk {}: image {} is missing",
                        s.name,
                        d.disk,
                        d.image.display()
                    ));
                    continue;
                }
                if s.kind == SnapshotKind::Internal {
                    let table = tables.entry(d.image.as_path()).or_insert_with(|| {
                        internal_names(&d.image)
                            .map(|names| names.into_iter().collect())
                            .map_err(|e| e.to_string())
                    });
                    match table {
                        Ok(names) if names.contains(&s.name) => {}
                        Ok(_) => problems.push(format!(
                            "snapshot {:?}, disk {}: {} has no internal snapshot of that name",
                            s.name,
                            d.disk,
                            d.image.display()
                        )),
                        Err(e) => {
                            problems.push(format!("snapshot {:?}, disk {}: {e}", s.name, d.disk))
                        }
                    }
                }
            }
            if let Some(dir) = &s.checkpoint {
                if !dir.is_dir() {
                    problems.push(format!(
                        "snapshot {:?}: checkpoint {} is missing",
                        s.name,
                        dir.display()
                    ));
                }
            }
        }
        for image in &self.images {
            if !image.path.exists() {
                problems.push(format!("image {} is missing", image.path.display()));
            }
        }
        problems
    }
}

/// The names of the internal snapshots in the qcow2 image at `path`.
pub fn internal_names(path: &Path) -> Result<Vec<String>> {
    let image = storage::qcow2::Qcow2Image::open(
        path,
        &storage::OpenOptions {
            read_only: true,
            open_backing: false,
            ..Default::default()
        },
    )?;
    Ok(image.snapshots().iter().map(|s| s.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TreeFile {
        let mut file = TreeFile::new(vec!["vda".into()]);
        file.snapshots.push(SnapshotInfo {
            name: "s1".into(),
            description: Some("first".into()),
            created: 1,
            parent: None,
            state: RunState::Running,
            kind: SnapshotKind::ExternalDiskOnly,
            memory: false,
            disks: vec![DiskImage {
                disk: "vda".into(),
                image: "/nonexistent/base.qcow2".into(),
            }],
            checkpoint: None,
            vm_state_size: 0,
        });
        file.current = Some("s1".into());
        file
    }

    #[test]
    fn saves_and_loads_the_same_and_reports_missing_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.json");
        let file = sample();
        file.save(&path).unwrap();
        assert_eq!(TreeFile::load(&path).unwrap(), file);
        let problems = file.check_files();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("/nonexistent/base.qcow2 is missing"));
        assert!(!dir.path().join(".snapshots.json.tmp").exists());
    }

    #[test]
    fn refuses_broken_files_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.json");
        type Spoil = Box<dyn Fn(&mut TreeFile)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|f| f.version = 9), "format version 9"),
            (
                Box::new(|f| f.current = Some("nope".into())),
                "current snapshot",
            ),
            (
                Box::new(|f| f.snapshots[0].parent = Some("ghost".into())),
                "parent \"ghost\"",
            ),
            (
                Box::new(|f| f.snapshots[0].parent = Some("s1".into())),
                "loop",
            ),
            (
                Box::new(|f| {
                    let s = f.snapshots[0].clone();
                    f.snapshots.push(s)
                }),
                "appears twice",
            ),
            (Box::new(|f| f.disks.push("vdb".into())), "do not match"),
        ];
        for (spoil, message) in cases {
            let mut file = sample();
            spoil(&mut file);
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let error = TreeFile::load(&path).unwrap_err().to_string();
            assert!(error.contains(message), "{error} lacks {message}");
        }
        std::fs::write(&path, b"{\"version\":1,").unwrap();
        assert!(TreeFile::load(&path)
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
    }

    #[test]
    fn validating_thousands_of_snapshots_takes_linear_work() {
        // The worst case for loop detection: one long line of parents.
        let n = 4000u64;
        let mut file = TreeFile::new(vec!["vda".into()]);
        let template = sample().snapshots[0].clone();
        for i in 0..n {
            let mut s = template.clone();
            s.name = format!("s{i}");
            s.parent = i.checked_sub(1).map(|p| format!("s{p}"));
            file.snapshots.push(s);
        }
        file.current = Some(format!("s{}", n - 1));
        let mut steps = 0;
        file.validate_counting(&mut steps).unwrap();
        // Cubic validation took ~n^3 / 2 lookups (75 s for this file).
        assert!(steps <= 4 * n, "{steps} steps for {n} snapshots");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.json");
        file.save(&path).unwrap();
        assert_eq!(TreeFile::load(&path).unwrap().snapshots.len(), n as usize);
        // A loop at the end of the line is still found.
        file.snapshots[0].parent = Some(format!("s{}", n - 1));
        let error = file.validate().unwrap_err();
        assert!(error.contains("loop"), "{error}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.json");
        // SAFETY: umask only changes the mode of files created later; other tests' files
        // get more permissive modes for a moment, which they do not check.
        let old = unsafe { libc::umask(0) };
        let first = sample();
        first.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert_eq!(mode, 0o600);
        let mut second = sample();
        second.current = None;
        for failing in [
            SaveStep::CreateTemporary,
            SaveStep::Write,
            SaveStep::Fsync,
            SaveStep::Rename,
        ] {
            let hook: FaultHook = Arc::new(move |step| {
                if step == failing {
                    Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
                } else {
                    Ok(())
                }
            });
            let error = second
                .save_with(&path, Some(&hook))
                .unwrap_err()
                .to_string();
            assert!(error.contains("No space left"), "{failing:?}: {error}");
            assert_eq!(TreeFile::load(&path).unwrap(), first, "{failing:?}");
            assert!(!temp_path(&path).exists(), "{failing:?} left a temporary");
        }
    }
}
