//! What a store holds: listing snapshots, reading a manifest and its working set,
//! removing a snapshot, and collecting chunks no manifest references.

use std::collections::HashSet;

use bytes::Bytes;
use serde::Serialize;

use crate::chunk::ChunkHash;
use crate::client::Store;
use crate::error::{Error, Result};
use crate::location::check_snapshot_name;
use crate::manifest::{
    manifest_key, name_of_manifest_key, working_set_key, StoreManifest, WorkingSet,
    MANIFEST_VERSION, MAX_MANIFEST_BYTES,
};

/// One snapshot as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotEntry {
    /// Its name.
    pub name: String,
    /// When it was pushed (seconds since the Unix epoch).
    pub pushed_unix: u64,
    /// Whether it holds memory (restorable).
    pub memory: bool,
    /// Its disks.
    pub disks: Vec<String>,
    /// Bytes of non-zero data it references.
    pub data_bytes: u64,
    /// Non-zero chunks it references.
    pub chunks: u64,
    /// Whether a working set was recorded.
    pub working_set: bool,
}

/// What a garbage collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcSummary {
    /// Manifests read.
    pub manifests: u64,
    /// Chunks in the store.
    pub chunks: u64,
    /// Chunks referenced by some manifest.
    pub referenced: u64,
    /// Unreferenced chunks deleted.
    pub deleted: u64,
    /// Bytes they held.
    pub deleted_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace period (a push
    /// under way may be about to reference them).
    pub kept_young: u64,
}

/// Reads snapshot `name`'s manifest.
pub fn read_manifest(store: &Store, name: &str) -> Result<StoreManifest> {
    check_snapshot_name(name)?;
    let key = manifest_key(name);
    let bytes = store.get(&key, MAX_MANIFEST_BYTES)?;
    let manifest = StoreManifest::decode(&bytes, &store.location().key(&key))?;
    if manifest.name != name {
        return Err(Error::manifest(
            store.location().key(&key),
            format!("names snapshot '{}'", manifest.name),
        ));
    }
    Ok(manifest)
}

/// Reads the working set recorded for `manifest`'s snapshot, if any.
pub fn read_working_set(store: &Store, manifest: &StoreManifest) -> Result<Option<WorkingSet>> {
    let key = working_set_key(&manifest.name);
    match store.get(&key, MAX_MANIFEST_BYTES) {
        Ok(bytes) => Ok(Some(WorkingSet::decode(
            &bytes,
            &store.location().key(&key),
            manifest,
        )?)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stores the working set of snapshot `name`.
pub fn write_working_set(
    store: &Store,
    name: &str,
    memory: Vec<u64>,
    disks: Vec<Vec<u64>>,
) -> Result<()> {
    check_snapshot_name(name)?;
    let set = WorkingSet {
        version: MANIFEST_VERSION,
        memory,
        disks,
    };
    let bytes = serde_json::to_vec(&set).unwrap_or_default();
    store.put(&working_set_key(name), Bytes::from(bytes))
}

/// The snapshots in the store, by name.
pub fn list(store: &Store) -> Result<Vec<SnapshotEntry>> {
    let objects = store.list("snapshots")?;
    let keys: HashSet<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    let mut entries = Vec::new();
    for object in &objects {
        let Some(name) = name_of_manifest_key(&object.key) else {
            continue;
        };
        let manifest = read_manifest(store, name)?;
        entries.push(SnapshotEntry {
            name: name.to_string(),
            pushed_unix: manifest.pushed_unix,
            memory: manifest.memory.is_some(),
            disks: manifest.disks.iter().map(|d| d.name.clone()).collect(),
            data_bytes: manifest.stored_bytes(),
            chunks: manifest.chunks().count() as u64,
            working_set: keys.contains(working_set_key(name).as_str()),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Removes snapshot `name` (its manifest and working set); its chunks stay until a
/// [`gc`] finds nothing else references them.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    check_snapshot_name(name)?;
    let key = manifest_key(name);
    if !store.exists(&key)? {
        return Err(Error::NotFound {
            key: store.location().key(&key),
        });
    }
    store.delete(&working_set_key(name))?;
    store.delete(&key)
}

/// Deletes every chunk no manifest references and older than `grace_secs`.
pub fn gc(store: &Store, grace_secs: u64) -> Result<GcSummary> {
    let mut summary = GcSummary::default();
    let mut referenced = HashSet::new();
    for object in store.list("snapshots")? {
        let Some(name) = name_of_manifest_key(&object.key) else {
            continue;
        };
        let manifest = read_manifest(store, name)?;
        summary.manifests += 1;
        referenced.extend(manifest.chunks().cloned());
    }
    summary.referenced = referenced.len() as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    for object in store.list("chunks")? {
        let Some(hash) = object
            .key
            .rsplit('/')
            .next()
            .and_then(|h| ChunkHash::parse(h).ok())
        else {
            continue;
        };
        summary.chunks += 1;
        if referenced.contains(&hash) {
            continue;
        }
        if now.saturating_sub(object.modified_unix) < grace_secs as i64 {
            summary.kept_young += 1;
            continue;
        }
        store.delete(&object.key)?;
        summary.deleted += 1;
        summary.deleted_bytes += object.size;
    }
    Ok(summary)
}
