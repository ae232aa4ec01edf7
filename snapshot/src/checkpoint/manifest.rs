//! What a checkpoint's state file holds.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::page_set::PageSet;
use super::PAGE_SIZE;

/// One guest memory region, in the order regions sit in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub size: u64,
}

/// Guest memory as the memory file lays it out: regions back to back after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Page size of tracking and of the file's holes.
    pub page_size: u64,
    /// The regions, in file order.
    pub regions: Vec<MemoryRegion>,
}

impl MemoryLayout {
    /// A layout of `regions` with 4 KiB pages.
    pub fn new(regions: Vec<MemoryRegion>) -> Self {
        MemoryLayout {
            page_size: PAGE_SIZE,
            regions,
        }
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// Offset of region `index` in the linear memory image (after the file header).
    pub fn region_offset(&self, index: usize) -> u64 {
        self.regions[..index.min(self.regions.len())]
            .iter()
            .map(|r| r.size)
            .sum()
    }

    /// Checks the layout is well formed: 4 KiB pages, page-aligned non-empty regions.
    pub fn validate(&self) -> Result<(), String> {
        if self.page_size != PAGE_SIZE {
            return Err(format!(
                "page size {} (expected {PAGE_SIZE})",
                self.page_size
            ));
        }
        let mut total = 0u64;
        for (i, region) in self.regions.iter().enumerate() {
            if region.size == 0
                || region.size % PAGE_SIZE != 0
                || region.guest_addr % PAGE_SIZE != 0
            {
                return Err(format!(
                    "memory region {i} ({:#x}+{:#x}) is not page aligned",
                    region.guest_addr, region.size
                ));
            }
            total = total
                .checked_add(region.size)
                .ok_or_else(|| "memory regions overflow".to_string())?;
        }
        if self.regions.is_empty() {
            return Err("no memory regions".into());
        }
        Ok(())
    }
}

/// The base a diff checkpoint sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The base's directory (relative paths are relative to the diff's directory).
    pub dir: PathBuf,
    /// The base's id, checked when the chain is resolved.
    pub id: u64,
}

/// Everything a state file holds. `M` is the machine state: an opaque JSON value for this
/// crate, which knows no VMM type; a VMM restoring a checkpoint reads it as its own type
/// ([`super::state_file::read_as`]), parsed straight from the file with no JSON tree in
/// between. The bytes on disk are the same either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest<M = serde_json::Value> {
    /// Random id of this checkpoint; its memory file carries the same id.
    pub id: u64,
    /// For a diff: its base. `None` for a full checkpoint.
    pub base: Option<BaseRef>,
    /// Seconds since the Unix epoch when it was taken.
    pub created_unix: u64,
    /// The memory layout.
    pub memory: MemoryLayout,
    /// For a diff: the pages it holds (linear page numbers); everything else falls through
    /// to the base. For a full checkpoint: `None` (holes read as zero).
    pub pages: Option<PageSet>,
    /// The machine state (vCPUs, VM, devices), as the VMM wrote it.
    pub machine: M,
    /// Which pages of the memory file hold data and their CRC, for `verify` (format 1.1;
    /// absent in 1.0 files).
    #[serde(default)]
    pub data: Option<DataDigest>,
}

/// The pages a memory file was written with, and the CRC-32 of their bytes in page order.
///
/// Checked on demand (`snapvmm checkpoint verify`, `snapvmm restore --verify`), not on every
/// load: a restore maps the file lazily and must not read it all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDigest {
    /// The pages written (for a full checkpoint, every other page is a hole reading zero).
    pub pages: PageSet,
    /// CRC-32 (IEEE) of those pages' bytes, ascending.
    pub crc: u32,
}

/// A fresh random id (not cryptographic: it only tells checkpoints apart).
pub fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Manifest {
    /// A full checkpoint's manifest with a new id.
    pub fn new_full(memory: MemoryLayout, machine: serde_json::Value) -> Self {
        Manifest {
            id: new_id(),
            base: None,
            created_unix: now_unix(),
            memory,
            pages: None,
            machine,
            data: None,
        }
    }

    /// A diff's manifest with a new id, holding `pages` on top of `base`.
    pub fn new_diff(
        memory: MemoryLayout,
        machine: serde_json::Value,
        base: BaseRef,
        pages: PageSet,
    ) -> Self {
        Manifest {
            id: new_id(),
            base: Some(base),
            created_unix: now_unix(),
            memory,
            pages: Some(pages),
            machine,
            data: None,
        }
    }
}

impl<M> Manifest<M> {
    /// Whether this is a diff.
    pub fn is_diff(&self) -> bool {
        self.base.is_some()
    }

    /// Checks internal consistency: a valid layout, and a page set (exactly for diffs) that
    /// covers the layout's pages.
    pub fn validate(&self) -> Result<(), String> {
        self.memory.validate()?;
        match (&self.base, &self.pages) {
            (Some(_), None) => return Err("a diff checkpoint without its page list".into()),
            (None, Some(_)) => return Err("a full checkpoint with a page list".into()),
            _ => {}
        }
        if let Some(data) = &self.data {
            if data.pages.len() != self.memory.total_pages() {
                return Err(format!(
                    "data page list covers {} pages, memory has {}",
                    data.pages.len(),
                    self.memory.total_pages()
                ));
            }
        }
        if let Some(pages) = &self.pages {
            if pages.len() != self.memory.total_pages() {
                return Err(format!(
                    "page list covers {} pages, memory has {}",
                    pages.len(),
                    self.memory.total_pages()
                ));
            }
        }
        Ok(())
    }
}
