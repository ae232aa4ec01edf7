//! What a store holds per snapshot: a manifest (`snapshots/NAME.json`) naming the chunks of
//! its memory and disks and its checkpoint state, and optionally the working set a first
//! restore recorded (`snapshots/NAME.workingset.json`).
//!
//! Both come from the store, so both are untrusted: read with a size bound, and checked
//! (version, chunk size, hash syntax, chunk counts against sizes) before anything uses them.

use serde::{Deserialize, Serialize};
use snapshot::checkpoint::{MemoryLayout, PAGE_SIZE};

use crate::chunk::{ChunkHash, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::client::MAX_OBJECT_BYTES;
use crate::error::{Error, Result};
use crate::location::check_snapshot_name;

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest or working-set list read (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Largest disk a manifest may describe (1 PiB), so chunk counts stay bounded.
const MAX_DISK_BYTES: u64 = 1 << 50;

/// The key of snapshot `name`'s manifest, relative to the store prefix.
pub fn manifest_key(name: &str) -> String {
    format!("snapshots/{name}.json")
}

/// The key of snapshot `name`'s working-set list.
pub fn working_set_key(name: &str) -> String {
    format!("snapshots/{name}.workingset.json")
}

/// The snapshot name a manifest key names, if it is one.
pub fn name_of_manifest_key(key: &str) -> Option<&str> {
    let name = key.strip_prefix("snapshots/")?.strip_suffix(".json")?;
    (!name.ends_with(".workingset") && check_snapshot_name(name).is_ok()).then_some(name)
}

/// A blob stored as one chunk (the checkpoint state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// Its hash (and so its key).
    pub hash: ChunkHash,
    /// Its length in bytes.
    pub len: u64,
}

/// A run of data cut into chunks: chunk `i` covers bytes `i * chunk_size ..`, the last one
/// possibly shorter; `None` is a chunk of zeroes, which is not stored.
pub type ChunkList = Vec<Option<ChunkHash>>;

/// Guest memory: its layout and the chunks of its linear bytes (regions back to back, as
/// a checkpoint memory file holds them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryImage {
    /// The regions.
    pub layout: MemoryLayout,
    /// The chunks of the linear bytes.
    pub chunks: ChunkList,
}

/// One disk's data at the snapshot: its frozen image chain, flattened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskData {
    /// The disk's name (vda, ...).
    pub name: String,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
    /// The format of the flattened data: always "raw" (byte N is guest byte N).
    pub format: String,
    /// Format of the top image of the chain that was flattened ("qcow2", "raw").
    pub source_format: String,
    /// The chunks.
    pub chunks: ChunkList,
}

/// A snapshot in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreManifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The snapshot's name.
    pub name: String,
    /// When it was pushed, seconds since the Unix epoch.
    pub pushed_unix: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The checkpoint's state file (a full checkpoint's: the chain was flattened), when
    /// the snapshot holds memory.
    #[serde(default)]
    pub state: Option<Blob>,
    /// Guest memory, when the snapshot holds it.
    #[serde(default)]
    pub memory: Option<MemoryImage>,
    /// The disks, in device order.
    pub disks: Vec<DiskData>,
}

fn chunk_count(len: u64, chunk_size: u64) -> u64 {
    len.div_ceil(chunk_size)
}

impl StoreManifest {
    /// Parses and checks a manifest read from `key`.
    pub fn decode(bytes: &[u8], key: &str) -> Result<Self> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::manifest(key, format!("{} bytes", bytes.len())));
        }
        let manifest: StoreManifest =
            serde_json::from_slice(bytes).map_err(|e| Error::manifest(key, e.to_string()))?;
        manifest
            .validate()
            .map_err(|reason| Error::manifest(key, reason))?;
        Ok(manifest)
    }

    /// The manifest as stored.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialising cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "version {} (this build reads {MANIFEST_VERSION})",
                self.version
            ));
        }
        check_snapshot_name(&self.name).map_err(|e| format!("name: {e}"))?;
        let size = self.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size)
            || !size.is_power_of_two()
            || size % PAGE_SIZE != 0
        {
            return Err(format!(
                "chunk_size {size} (a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE})"
            ));
        }
        if let Some(state) = &self.state {
            if state.len == 0 || state.len > MAX_OBJECT_BYTES {
                return Err(format!("state.len {}", state.len));
            }
        }
        if self.memory.is_some() != self.state.is_some() {
            return Err("memory and state must both be present or both absent".into());
        }
        if let Some(memory) = &self.memory {
            memory
                .layout
                .validate()
                .map_err(|e| format!("memory.layout: {e}"))?;
            let want = chunk_count(memory.layout.total_bytes(), size);
            if memory.chunks.len() as u64 != want {
                return Err(format!(
                    "memory.chunks has {} entries, {} bytes need {want}",
                    memory.chunks.len(),
                    memory.layout.total_bytes()
                ));
            }
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if disk.format != "raw" {
                return Err(format!("disks[{index}].format '{}'", disk.format));
            }
            check_snapshot_name(&disk.name).map_err(|e| format!("disks[{index}].name: {e}"))?;
            if disk.virtual_size == 0 || disk.virtual_size > MAX_DISK_BYTES {
                return Err(format!("disks[{index}].virtual_size {}", disk.virtual_size));
            }
            let want = chunk_count(disk.virtual_size, size);
            if disk.chunks.len() as u64 != want {
                return Err(format!(
                    "disks[{index}].chunks has {} entries, {} bytes need {want}",
                    disk.chunks.len(),
                    disk.virtual_size
                ));
            }
        }
        Ok(())
    }

    /// Every chunk the snapshot references (state, memory, disks), with repeats.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkHash> {
        self.state
            .iter()
            .map(|b| &b.hash)
            .chain(self.memory.iter().flat_map(|m| m.chunks.iter().flatten()))
            .chain(self.disks.iter().flat_map(|d| d.chunks.iter().flatten()))
    }

    /// Bytes of non-zero chunk data the snapshot references (with repeats).
    pub fn stored_bytes(&self) -> u64 {
        let size = self.chunk_size;
        let sum = |len: u64, chunks: &ChunkList| -> u64 {
            chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_some())
                .map(|(i, _)| size.min(len - i as u64 * size))
                .sum()
        };
        self.memory
            .iter()
            .map(|m| sum(m.layout.total_bytes(), &m.chunks))
            .chain(self.disks.iter().map(|d| sum(d.virtual_size, &d.chunks)))
            .sum()
    }
}

/// The chunks a restore touched early, by position (memory chunk indices, and per disk
/// in device order its chunk indices), in the order first touched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSet {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Memory chunk indices.
    pub memory: Vec<u64>,
    /// Per disk, chunk indices.
    #[serde(default)]
    pub disks: Vec<Vec<u64>>,
}

impl WorkingSet {
    /// Parses a list read from `key` and checks it against `manifest`.
    pub fn decode(bytes: &[u8], key: &str, manifest: &StoreManifest) -> Result<Self> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::manifest(key, format!("{} bytes", bytes.len())));
        }
        let set: WorkingSet =
            serde_json::from_slice(bytes).map_err(|e| Error::manifest(key, e.to_string()))?;
        if set.version != MANIFEST_VERSION {
            return Err(Error::manifest(key, format!("version {}", set.version)));
        }
        let memory_chunks = manifest.memory.as_ref().map_or(0, |m| m.chunks.len()) as u64;
        if let Some(bad) = set.memory.iter().find(|&&i| i >= memory_chunks) {
            return Err(Error::manifest(
                key,
                format!("memory chunk {bad} of {memory_chunks}"),
            ));
        }
        if set.disks.len() > manifest.disks.len() {
            return Err(Error::manifest(key, "more disks than the snapshot has"));
        }
        for (disk, indices) in manifest.disks.iter().zip(&set.disks) {
            if let Some(bad) = indices.iter().find(|&&i| i >= disk.chunks.len() as u64) {
                return Err(Error::manifest(key, format!("{} chunk {bad}", disk.name)));
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::checkpoint::MemoryRegion;

    fn sample() -> StoreManifest {
        let hash = ChunkHash::of(b"x");
        StoreManifest {
            version: MANIFEST_VERSION,
            name: "s1".into(),
            pushed_unix: 1,
            chunk_size: 1 << 19,
            state: Some(Blob {
                hash: hash.clone(),
                len: 10,
            }),
            memory: Some(MemoryImage {
                layout: MemoryLayout::new(vec![MemoryRegion {
                    guest_addr: 0,
                    size: 1 << 20,
                }]),
                chunks: vec![Some(hash.clone()), None],
            }),
            disks: vec![DiskData {
                name: "vda".into(),
                virtual_size: (1 << 19) + 1,
                format: "raw".into(),
                source_format: "qcow2".into(),
                chunks: vec![None, Some(hash)],
            }],
        }
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_are_refused() {
        let manifest = sample();
        let bytes = manifest.encode();
        assert_eq!(StoreManifest::decode(&bytes, "k").unwrap(), manifest);
        assert_eq!(manifest.chunks().count(), 3);
        assert_eq!(manifest.stored_bytes(), (1 << 19) + 1);

        let mut bad = manifest.clone();
        bad.disks[0].chunks.pop();
        let err = StoreManifest::decode(&bad.encode(), "snapshots/s1.json").unwrap_err();
        assert!(err.to_string().contains("disks[0].chunks"), "{err}");
        let mut bad = manifest.clone();
        bad.chunk_size = 1000;
        assert!(StoreManifest::decode(&bad.encode(), "k").is_err());
        let mut bad = manifest.clone();
        bad.name = "../x".into();
        assert!(StoreManifest::decode(&bad.encode(), "k").is_err());
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace(&ChunkHash::of(b"x").to_string(), "../../etc/passwd");
        assert!(StoreManifest::decode(text.as_bytes(), "k").is_err());
        assert!(StoreManifest::decode(b"{", "k").is_err());
    }

    #[test]
    fn working_sets_are_checked_against_their_manifest() {
        let manifest = sample();
        let set = WorkingSet {
            version: MANIFEST_VERSION,
            memory: vec![1, 0],
            disks: vec![vec![1]],
        };
        let bytes = serde_json::to_vec(&set).unwrap();
        assert_eq!(WorkingSet::decode(&bytes, "k", &manifest).unwrap(), set);
        let bad = WorkingSet {
            memory: vec![2],
            ..set
        };
        let bytes = serde_json::to_vec(&bad).unwrap();
        assert!(WorkingSet::decode(&bytes, "k", &manifest).is_err());
    }

    #[test]
    fn manifest_keys_name_snapshots() {
        assert_eq!(name_of_manifest_key(&manifest_key("a1")), Some("a1"));
        assert_eq!(name_of_manifest_key(&working_set_key("a1")), None);
        assert_eq!(name_of_manifest_key("chunks/ab/x"), None);
    }
}
