//! The snapshot tree's metadata file: what it holds, and how it is written (atomically) and
//! read back (checked against the images it names).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the metadata file format; a file of another major version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Largest metadata file read: a bound on what an untrusted file can make us allocate.
const MAX_FILE_BYTES: u64 = 64 << 20;

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

    /// Structural checks: unique names, parents and current exist, one image per disk.
    fn validate(&self) -> std::result::Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for s in &self.snapshots {
            if !names.insert(s.name.as_str()) {
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
        for s in &self.snapshots {
            if let Some(parent) = &s.parent {
                if !names.contains(parent.as_str()) {
                    return Err(format!(
                        "snapshot {:?}: parent {parent:?} does not exist",
                        s.name
                    ));
                }
            }
        }
        if let Some(current) = &self.current {
            if !names.contains(current.as_str()) {
                return Err(format!("current snapshot {current:?} does not exist"));
            }
        }
        // Parent links must not loop.
        for s in &self.snapshots {
            let mut at = s.parent.as_deref();
            let mut steps = 0;
            while let Some(name) = at {
                steps += 1;
                if steps > self.snapshots.len() {
                    return Err(format!("snapshot {:?}: parent links loop", s.name));
                }
                at = self
                    .snapshots
                    .iter()
                    .find(|p| p.name == name)
                    .and_then(|p| p.parent.as_deref());
            }
        }
        Ok(())
    }

    /// Writes the file atomically: a temporary file beside it, fsync, rename over it, fsync
    /// of the directory. A crash leaves either the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            Error::InvalidArgument(format!("{}: {what}: {e}", path.display()))
        };
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("encoding snapshot metadata: {e}")))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshots.json".into());
        let temp = dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&temp).map_err(|e| io("create temporary file", e))?;
        file.write_all(&text)
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|e| io("write temporary file", e))?;
        drop(file);
        std::fs::rename(&temp, path).map_err(|e| io("rename into place", e))?;
        storage::file::sync_parent_dir(path).map_err(|e| io("fsync directory", e))?;
        Ok(())
    }

    /// Checks the files the metadata names: every snapshot image and checkpoint exists,
    /// every internal snapshot is in its image. Returns one message per problem.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
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
                    match internal_names(&d.image) {
                        Ok(names) if names.iter().any(|n| n == &s.name) => {}
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
}
