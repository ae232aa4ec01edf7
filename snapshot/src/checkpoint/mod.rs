//! Checkpoint files: the on-disk format of a VM's saved memory, vCPU and device state.
//!
//! This module has no KVM in it. A checkpoint is a directory holding two files:
//!
//! - [`STATE_FILE`]: a framed, versioned, CRC-checked [`Manifest`] ([`state_file`]): the
//!   memory layout, which pages a diff holds, the link to its base, and the machine state
//!   (vCPUs, VM, devices) as an opaque JSON value the VMM fills in;
//! - [`MEMORY_FILE`]: a sparse file ([`memory_file`]): a one-page header, then guest memory at
//!   its linear offset. Pages the guest never touched are holes, so a save writes only what
//!   the guest used.
//!
//! A **full** checkpoint's holes read as zero. A **diff** checkpoint names its base and lists
//! the pages it holds ([`PageSet`]): a page outside that list falls through to the base,
//! whatever the file holds there, so a hole is never mistaken for a zeroed page.
//! [`merge::merge_chain`] folds a diff chain into one full checkpoint.
//!
//! ```
//! use snapshot::checkpoint::{state_file, Manifest, MemoryLayout, MemoryRegion};
//! let dir = tempfile::tempdir().unwrap();
//! let manifest = Manifest::new_full(
//!     MemoryLayout::new(vec![MemoryRegion { guest_addr: 0, size: 1 << 20 }]),
//!     serde_json::json!({"vcpus": 1}),
//! );
//! let path = dir.path().join("state");
//! state_file::write(&path, &manifest).unwrap();
//! assert_eq!(state_file::read(&path).unwrap(), manifest);
//! ```

pub mod error;
pub mod manifest;
pub mod memory_file;
pub mod merge;
pub mod page_set;
pub mod state_file;

pub use error::{CheckpointError, CheckpointResult};
pub use manifest::{BaseRef, DataDigest, Manifest, MemoryLayout, MemoryRegion};
pub use memory_file::MemoryFile;
pub use page_set::PageSet;

use std::path::{Path, PathBuf};

/// Name of the state file inside a checkpoint directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file inside a checkpoint directory.
pub const MEMORY_FILE: &str = "memory";
/// Size of a guest page, the unit of memory tracking.
pub const PAGE_SIZE: u64 = 4096;

/// The state file of checkpoint directory `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// The memory file of checkpoint directory `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// Creates directory `dir` (and missing parents) with mode 0700 whatever the umask: a
/// checkpoint holds guest memory. An existing `dir` is made 0700 too.
pub fn create_private_dir(dir: &Path) -> CheckpointResult<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(CheckpointError::io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(CheckpointError::io(dir))
}

/// One checkpoint of a chain: its directory and manifest (its machine state as `M`, see
/// [`Manifest`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainLink<M = serde_json::Value> {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest<M>,
}

/// Most diffs a chain may stack on its full checkpoint.
pub const MAX_CHAIN_LENGTH: usize = 1024;

/// Reads the checkpoint in `dir` and every base below it: the full checkpoint first, `dir`
/// last. Each link must carry the id its child names and the same memory layout.
pub fn resolve_chain(dir: &Path) -> CheckpointResult<Vec<ChainLink>> {
    resolve_chain_as(dir)
}

/// As [`resolve_chain`], with every link's machine state parsed as `M` ([`Manifest`]).
pub fn resolve_chain_as<M: serde::de::DeserializeOwned>(
    dir: &Path,
) -> CheckpointResult<Vec<ChainLink<M>>> {
    let mut chain = Vec::new();
    let mut current = dir.to_path_buf();
    let mut expected_id = None;
    let mut layout: Option<MemoryLayout> = None;
    loop {
        if chain.len() > MAX_CHAIN_LENGTH {
            return Err(CheckpointError::Chain(format!(
                "{}: more than {MAX_CHAIN_LENGTH} diffs below it",
                dir.display()
            )));
        }
        let manifest = state_file::read_as::<M>(&state_path(&current))?;
        if let Some(id) = expected_id {
            if manifest.id != id {
                return Err(CheckpointError::Chain(format!(
                    "{} has id {:016x} but its child names base id {id:016x} (the base was \
                     replaced or rewritten)",
                    current.display(),
                    manifest.id
                )));
            }
        }
        if let Some(layout) = &layout {
            if layout.regions != manifest.memory.regions {
                return Err(CheckpointError::Chain(format!(
                    "{}: memory layout differs from its child's",
                    current.display()
                )));
            }
        }
        layout = Some(manifest.memory.clone());
        let base = manifest.base.clone();
        chain.push(ChainLink {
            dir: current.clone(),
            manifest,
        });
        match base {
            None => break,
            Some(base) => {
                expected_id = Some(base.id);
                current = if base.dir.is_absolute() {
                    base.dir
                } else {
                    current.join(base.dir)
                };
            }
        }
    }
    chain.reverse();
    Ok(chain)
}

/// Checks every memory file of the chain ending at `dir` against its manifest's data CRC;
/// returns the number of pages read. A checkpoint without a digest (format 1.0) is skipped.
pub fn verify_chain(dir: &Path) -> CheckpointResult<u64> {
    let chain = resolve_chain(dir)?;
    let mut pages = 0;
    for link in &chain {
        let Some(data) = &link.manifest.data else {
            continue;
        };
        let path = memory_path(&link.dir);
        let file = MemoryFile::open(&path, link.manifest.id, link.manifest.memory.total_bytes())?;
        let crc = file.crc_of(&data.pages)?;
        if crc != data.crc {
            return Err(CheckpointError::MemoryFile {
                path,
                message: format!(
                    "data CRC mismatch (stored {:08x}, computed {crc:08x}): guest memory in the file is corrupt",
                    data.crc
                ),
            });
        }
        pages += data.pages.count();
    }
    Ok(pages)
}
