//! Where a new checkpoint is written: a private temporary directory beside its final name,
//! renamed into place only once it is complete and durable, so a failed or interrupted save
//! never leaves a half checkpoint under the final name, and never damages what was there.
//!
//! An existing non-empty directory is refused unless the caller asks to replace it, and
//! even then only if it is a checkpoint nothing depends on: not this VM's next diff base
//! (or any checkpoint below it), not the base of another checkpoint beside it, not a
//! snapshot tree's own checkpoint. A replacement swaps the two directories atomically
//! (`renameat2(RENAME_EXCHANGE)`) before removing the old one.
//!
//! Checkpoints hold guest memory: directories are 0700 and files 0600, whatever the umask.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use snapshot::checkpoint::manifest::new_id;
use snapshot::checkpoint::{resolve_chain, state_file, state_path, STATE_FILE};

use super::tracking::Tracking;
use crate::error::{Error, Result};

/// Mode of a checkpoint directory.
pub(super) const DIR_MODE: u32 = 0o700;
/// Mode of a checkpoint's files.
pub(super) const FILE_MODE: u32 = 0o600;
/// Most directory entries beside a checkpoint looked at for dependents before a replace.
const MAX_SIBLINGS: usize = 4096;
/// Suffix of the directory a snapshot tree keeps its checkpoints in.
const TREE_CHECKPOINTS_SUFFIX: &str = ".checkpoints";

/// A checkpoint being written: its temporary directory and final name. Dropped without
/// [`Staging::commit`], the temporary directory is removed.
#[derive(Debug)]
pub(super) struct Staging {
    tmp: PathBuf,
    target: PathBuf,
    /// The target holds a checkpoint to swap out.
    replace_existing: bool,
    committed: bool,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(what)
}

/// Sets `path`'s mode, whatever the umask did at creation.
pub(super) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", path.display())))
}

fn sync_dir(dir: &Path) -> Result<()> {
    storage::fault::check(storage::fault::Op::Sync, dir)
        .and_then(|()| std::fs::File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

impl Staging {
    /// Checks `dir` may receive a new checkpoint (absent, empty, or, with `replace`, a
    /// checkpoint nothing depends on) and creates the temporary directory beside it.
    pub fn prepare(dir: &Path, replace: bool, tracking: &Tracking) -> Result<Staging> {
        let name = dir.file_name().ok_or_else(|| {
            Error::Config(format!(
                "{} does not name a checkpoint directory",
                dir.display()
            ))
        })?;
        let mut replace_existing = false;
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("checking {}", dir.display()))(e)),
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::CheckpointInUse {
                    dir: dir.to_path_buf(),
                    reason: "it exists and is not a directory".into(),
                })
            }
            Ok(_) => {
                let empty = std::fs::read_dir(dir)
                    .map_err(io(format!("reading {}", dir.display())))?
                    .next()
                    .is_none();
                if !empty {
                    if !replace {
                        return Err(Error::CheckpointExists {
                            dir: dir.to_path_buf(),
                        });
                    }
                    check_replaceable(dir, tracking)?;
                    replace_existing = true;
                }
            }
        }
        let parent = parent_of(dir);
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{:016x}", new_id()));
        let tmp = parent.join(tmp_name);
        std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        let staging = Staging {
            tmp,
            target: dir.to_path_buf(),
            replace_existing,
            committed: false,
        };
        set_mode(&staging.tmp, DIR_MODE)?;
        Ok(staging)
    }

    /// The directory to write the checkpoint's files into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Makes the complete checkpoint (files written and synced) durable under its final
    /// name; returns that name, absolute. The commit point is the rename.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        if self.replace_existing {
            exchange(&self.tmp, &self.target)?;
        } else {
            // Onto nothing or an empty directory; anything that appeared there meanwhile
            // makes the rename fail rather than be overwritten.
            storage::file::rename(&self.tmp, &self.target).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.raw_os_error() == Some(libc::EEXIST)
                {
                    Error::CheckpointExists {
                        dir: self.target.clone(),
                    }
                } else {
                    io(format!(
                        "renaming {} to {}",
                        self.tmp.display(),
                        self.target.display()
                    ))(e)
                }
            })?;
        }
        self.committed = true;
        if let Err(e) = sync_dir(parent_of(&self.target)) {
            // Whether the new name is durable is in doubt: take it back, so that the
            // error leaves nothing under the name (the VM's diff base does not move
            // either). If even that fails the checkpoint stays, complete, and is logged.
            if !self.replace_existing {
                match std::fs::rename(&self.target, &self.tmp) {
                    Ok(()) => self.committed = false,
                    Err(back) => tracing::warn!(
                        "{}: syncing its directory failed and taking it back too: {back}",
                        self.target.display()
                    ),
                }
            }
            return Err(e);
        }
        if self.replace_existing {
            // The old checkpoint now sits at the temporary name.
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                tracing::warn!(
                    "removing the replaced checkpoint {}: {e}",
                    self.tmp.display()
                );
            }
        }
        self.target
            .canonicalize()
            .map_err(io(format!("resolving {}", self.target.display())))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(
                        "removing the unfinished checkpoint {}: {e}",
                        self.tmp.display()
                    );
                }
            }
        }
    }
}

/// Swaps directories `a` and `b` atomically.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::Config(format!("{} contains a NUL byte", p.display())))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io(format!(
            "swapping {} into place of {}",
            a.display(),
            b.display()
        ))(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Refuses to replace `dir` unless it is a checkpoint nothing depends on.
fn check_replaceable(dir: &Path, tracking: &Tracking) -> Result<()> {
    let refuse = |reason: String| Error::CheckpointInUse {
        dir: dir.to_path_buf(),
        reason,
    };
    let canonical = dir
        .canonicalize()
        .map_err(io(format!("resolving {}", dir.display())))?;
    if !state_path(&canonical).exists() {
        return Err(refuse(format!(
            "it holds no checkpoint (no {STATE_FILE} file): only a checkpoint is replaced"
        )));
    }
    let parent = parent_of(&canonical);
    if parent
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(TREE_CHECKPOINTS_SUFFIX))
    {
        return Err(refuse(format!(
            "it belongs to the snapshot tree in {}: delete the snapshot instead",
            parent.display()
        )));
    }
    if let Some(base) = &tracking.base {
        let below = match resolve_chain(&base.dir) {
            Ok(chain) => chain.into_iter().map(|link| link.dir).collect(),
            Err(_) => vec![base.dir.clone()],
        };
        for link in below {
            if link.canonicalize().is_ok_and(|l| l == canonical) {
                return Err(refuse(
                    "this VM's next incremental checkpoint is based on it".into(),
                ));
            }
        }
    }
    let entries = std::fs::read_dir(parent).map_err(io(format!("reading {}", parent.display())))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_SIBLINGS {
            return Err(refuse(format!(
                "{} holds more than {MAX_SIBLINGS} entries to check for checkpoints based on it",
                parent.display()
            )));
        }
        let Ok(entry) = entry else { continue };
        let sibling = entry.path();
        if sibling == canonical || !state_path(&sibling).is_file() {
            continue;
        }
        // A sibling that cannot be read is not a checkpoint anything can load.
        let Ok(manifest) = state_file::read(&state_path(&sibling)) else {
            continue;
        };
        let Some(base) = manifest.base else { continue };
        let base_dir = if base.dir.is_absolute() {
            base.dir
        } else {
            sibling.join(base.dir)
        };
        if base_dir.canonicalize().is_ok_and(|b| b == canonical) {
            return Err(refuse(format!(
                "checkpoint {} is based on it",
                sibling.display()
            )));
        }
    }
    Ok(())
}
