//! Reading a local snapshot for a push: the guest memory of its checkpoint chain flattened
//! (the full checkpoint with every diff's pages on top), and each disk's frozen image chain
//! read through the storage engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::checkpoint::{
    memory_path, resolve_chain, state_file, Manifest, MemoryFile, MemoryLayout, PageSet, PAGE_SIZE,
};
use snapshot::tree::{SnapshotInfo, SnapshotKind, TreeFile};
use storage::{Allocation, BlockDevice};

use crate::error::{Error, Result};

/// A local snapshot to push: its checkpoint (when it holds memory) and each disk's frozen
/// image, in device order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSource {
    /// The snapshot's name.
    pub name: String,
    /// The checkpoint directory (the top of its chain).
    pub checkpoint: Option<PathBuf>,
    /// (disk name, image) per disk.
    pub disks: Vec<(String, PathBuf)>,
}

impl SnapshotSource {
    /// The snapshot `name` of the tree whose metadata file is `metadata`, read without
    /// opening the tree (nothing is changed, no lock is taken).
    pub fn from_metadata(metadata: &Path, name: &str) -> Result<Self> {
        let tree = TreeFile::load(metadata)?;
        let info = tree
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: no snapshot named '{name}'",
                    metadata.display()
                ))
            })?;
        let base = metadata.parent().unwrap_or(Path::new("."));
        Self::from_info(info, base)
    }

    /// The source of a tree snapshot; relative paths are relative to `base`.
    pub fn from_info(info: &SnapshotInfo, base: &Path) -> Result<Self> {
        if info.kind == SnapshotKind::Internal {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{}' is {}: only external snapshots can be pushed (their images \
                 are frozen)",
                info.name,
                info.kind.name()
            )));
        }
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        Ok(SnapshotSource {
            name: info.name.clone(),
            checkpoint: info.checkpoint.as_deref().map(resolve),
            disks: info
                .disks
                .iter()
                .map(|d| (d.disk.clone(), resolve(&d.image)))
                .collect(),
        })
    }
}

/// A checkpoint chain's memory as its top sees it.
#[derive(Debug)]
pub struct FlatMemory {
    /// The top's manifest turned into a full checkpoint's (no base, no page list, no
    /// digest): what a restore of the flattened memory needs.
    pub manifest: Manifest,
    layers: Vec<(MemoryFile, Option<PageSet>)>,
}

impl FlatMemory {
    /// Opens the chain ending at checkpoint directory `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let chain = resolve_chain(dir)?;
        let top = chain
            .last()
            .ok_or_else(|| Error::InvalidArgument(format!("{}: empty chain", dir.display())))?;
        let total = top.manifest.memory.total_bytes();
        let mut layers = Vec::new();
        for (index, link) in chain.iter().enumerate() {
            let file = MemoryFile::open(&memory_path(&link.dir), link.manifest.id, total)?;
            let pages = if index == 0 {
                None
            } else {
                link.manifest.pages.clone()
            };
            layers.push((file, pages));
        }
        let mut manifest = top.manifest.clone();
        manifest.base = None;
        manifest.pages = None;
        manifest.data = None;
        Ok(FlatMemory { manifest, layers })
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.manifest.memory
    }

    /// The state file bytes of the flattened checkpoint.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        Ok(state_file::encode(&self.manifest)?)
    }

    /// Reads linear bytes `offset..offset + buf.len()` (page-aligned offset).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(((full, _), diffs)) = self.layers.split_first() else {
            return Ok(());
        };
        full.read_at(buf, offset)?;
        let first = offset / PAGE_SIZE;
        let count = (buf.len() as u64).div_ceil(PAGE_SIZE);
        for (file, pages) in diffs {
            let Some(pages) = pages else { continue };
            for page in first..first + count {
                if pages.contains(page) {
                    let start = ((page - first) * PAGE_SIZE) as usize;
                    let end = (start + PAGE_SIZE as usize).min(buf.len());
                    file.read_at(&mut buf[start..end], page * PAGE_SIZE)?;
                }
            }
        }
        Ok(())
    }
}

/// Opens a frozen image with its backing chain, read-only.
pub fn open_image(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    let options = storage::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    Ok(storage::open(path, &options)?)
}

/// Whether `offset..offset + len` of `disk` is known to read as zeroes without reading it
/// (unallocated in the whole chain, or zero-flagged).
pub fn range_is_hole(disk: &dyn BlockDevice, offset: u64, len: u64) -> Result<bool> {
    let mut done = 0;
    while done < len {
        let status = disk.block_status(offset + done, len - done)?;
        if status.allocation == Allocation::Data {
            return Ok(false);
        }
        done += status.len.max(1);
    }
    Ok(true)
}
