//! The clone registry: one small JSON file (beside the snapshot tree's metadata, or in a
//! fork's directory) listing the clones started from its snapshots, so that they can be
//! listed, a snapshot they use is not deleted, and a destroyed clone's files go.
//!
//! The snapshot tree's own metadata is not touched: clones are the control layer's. The
//! file is rewritten whole (temporary file, fsync, rename, directory fsync) under an
//! exclusive `flock` on a sibling lock file, so an offline `snapvmm clone` and a running
//! VM's API never lose each other's records.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::error::{ControlError, Result};
use super::super::types::CloneRecord;

/// Version of the registry file.
const FORMAT_VERSION: u32 = 1;
/// Largest registry file read: a bound on what a damaged file can make us allocate.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The registry file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: u32,
    #[serde(default)]
    clones: Vec<CloneRecord>,
}

/// A clone registry file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    path: PathBuf,
}

/// An exclusive lock on the registry, released when dropped (the file closes).
struct Locked(#[allow(dead_code)] std::fs::File);

impl Registry {
    /// The registry of the snapshot tree whose metadata is `metadata`: `STEM.clones.json`
    /// beside it.
    pub fn beside(metadata: &Path) -> Self {
        let stem = metadata
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapvmm-snapshots".into());
        Registry {
            path: metadata.with_file_name(format!("{stem}.clones.json")),
        }
    }

    /// The registry at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Registry { path: path.into() }
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> ControlError {
        ControlError::Failed(format!(
            "clone registry {}: {what}: {e}",
            self.path.display()
        ))
    }

    fn lock(&self) -> Result<Locked> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(name))
            .map_err(|e| self.failed("opening its lock file", e))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.failed("locking", std::io::Error::last_os_error()));
        }
        Ok(Locked(file))
    }

    fn read(&self) -> Result<Vec<CloneRecord>> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.failed("reading", e)),
        };
        if meta.len() > MAX_FILE_BYTES {
            return Err(self.failed(
                "reading",
                format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len()),
            ));
        }
        let text = std::fs::read(&self.path).map_err(|e| self.failed("reading", e))?;
        let file: RegistryFile =
            serde_json::from_slice(&text).map_err(|e| self.failed("parsing", e))?;
        if file.version != FORMAT_VERSION {
            return Err(self.failed("reading", format!("format version {}", file.version)));
        }
        Ok(file.clones)
    }

    fn write(&self, clones: Vec<CloneRecord>) -> Result<()> {
        let file = RegistryFile {
            version: FORMAT_VERSION,
            clones,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| self.failed("encoding", e))?;
        let mut name = self.path.as_os_str().to_owned();
        name.push(".tmp");
        let temporary = PathBuf::from(name);
        let written = (|| -> std::io::Result<()> {
            let mut out = std::fs::File::create(&temporary)?;
            out.write_all(&text)?;
            out.sync_all()?;
            std::fs::rename(&temporary, &self.path)?;
            storage::file::sync_parent_dir(&self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(self.failed("writing", e));
        }
        Ok(())
    }

    /// Every clone recorded whose directory still exists, with `running` filled in.
    pub fn list(&self) -> Result<Vec<CloneRecord>> {
        let _lock = self.lock()?;
        let mut clones = self.read()?;
        clones.retain(|c| c.clone.dir.exists());
        for record in &mut clones {
            record.running = super::process::is_clone_process(&record.clone);
        }
        Ok(clones)
    }

    /// Records new clones.
    pub fn add(&self, new: &[CloneRecord]) -> Result<()> {
        let _lock = self.lock()?;
        let mut clones = self.read()?;
        // Records of clones whose directories are gone are forgotten on the way.
        clones.retain(|c| c.clone.dir.exists());
        clones.extend(new.iter().cloned());
        self.write(clones)
    }

    /// Forgets the clone whose directory is `dir`; returns its record.
    pub fn remove(&self, dir: &Path) -> Result<Option<CloneRecord>> {
        let _lock = self.lock()?;
        let mut clones = self.read()?;
        let found = clones.iter().position(|c| c.clone.dir == dir);
        let record = found.map(|i| clones.remove(i));
        if record.is_some() {
            self.write(clones)?;
        }
        Ok(record)
    }

    /// The clone whose directory is `dir`.
    pub fn find(&self, dir: &Path) -> Result<Option<CloneRecord>> {
        let _lock = self.lock()?;
        Ok(self.read()?.into_iter().find(|c| c.clone.dir == dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::CloneInfo;

    fn record(dir: &Path, snapshot: &str) -> CloneRecord {
        CloneRecord {
            snapshot: Some(snapshot.into()),
            checkpoint: dir.join("ckpt"),
            backing: vec![dir.join("base.qcow2")],
            clone: CloneInfo {
                id: "clone-0".into(),
                api_socket: dir.join("api.sock"),
                serial: dir.join("serial.log"),
                pid: u32::MAX,
                dir: dir.to_path_buf(),
            },
            created: 1,
            running: false,
        }
    }

    #[test]
    fn records_survive_and_vanish_with_their_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::beside(&tmp.path().join("snaps.json"));
        assert_eq!(registry.path(), tmp.path().join("snaps.clones.json"));
        assert!(registry.list().unwrap().is_empty());
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        registry.add(&[record(&a, "s1"), record(&b, "s2")]).unwrap();
        let listed = registry.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(!listed[0].running, "no such process");
        std::fs::remove_dir(&b).unwrap();
        assert_eq!(registry.list().unwrap().len(), 1);
        assert_eq!(
            registry.remove(&a).unwrap().unwrap().snapshot.as_deref(),
            Some("s1")
        );
        assert!(registry.remove(&a).unwrap().is_none());
        assert!(registry.list().unwrap().is_empty());
    }

    #[test]
    fn refuses_a_damaged_file() {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::at(tmp.path().join("r.json"));
        std::fs::write(registry.path(), b"{\"version\": 1, \"colour\": 2}").unwrap();
        let e = registry.list().unwrap_err().to_string();
        assert!(e.contains("r.json") && e.contains("parsing"), "{e}");
    }
}
