//! Where the data below a lazily restored disk comes from, so that a snapshot of a lazily
//! restored VM can be pushed (or read) in another process.
//!
//! A lazy restore attaches each disk's remote layer to its local overlay in memory only: the
//! overlay's header names no backing file (nothing local could open one). Beside the overlay
//! `DISK.qcow2` it writes `DISK.origin.json` (store, snapshot, disk, chunk cache). A reader
//! of a frozen image whose chain ends on such an overlay attaches the same remote layer
//! again ([`open_with_origin`]); without it, the clusters the overlay never wrote would read
//! as zeroes (silently wrong data).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use storage::BlockDevice;

use crate::catalog::read_manifest;
use crate::client::Store;
use crate::error::{Error, Result};
use crate::location::{Location, StoreConfig};
use crate::manifest::DiskData;
use crate::remote::{RemoteChunks, RemoteDisk};

/// Largest origin file read (they hold a few short strings).
const MAX_ORIGIN_BYTES: u64 = 64 << 10;

/// The remote layer under a lazily restored disk's overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The store, `s3://BUCKET/PREFIX` (never credentials or an endpoint with a password).
    pub store: String,
    /// The snapshot's name in the store.
    pub snapshot: String,
    /// The disk's name in the snapshot.
    pub disk: String,
    /// The chunk cache directory the restore used (chunks fetched once serve again).
    pub cache: PathBuf,
}

/// The origin file of overlay `image` (`DISK.qcow2` → `DISK.origin.json`).
pub fn origin_path(image: &Path) -> PathBuf {
    image.with_extension("origin.json")
}

impl Origin {
    /// Writes the origin file of overlay `image`.
    pub fn write(&self, image: &Path) -> Result<()> {
        let path = origin_path(image);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("encoding an origin: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, "write", e))
    }

    /// Reads the origin file of `image`, if there is one. The file is untrusted: bounded in
    /// size, no unknown fields.
    pub fn read(image: &Path) -> Result<Option<Origin>> {
        let path = origin_path(image);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "stat", e)),
        };
        if meta.len() > MAX_ORIGIN_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{}: {} bytes, more than an origin file holds",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, "read", e))?;
        let origin = serde_json::from_slice(&text).map_err(|e| {
            Error::InvalidArgument(format!("{}: not an origin file: {e}", path.display()))
        })?;
        Ok(Some(origin))
    }
}

/// A remote layer attached under a frozen chain by [`open_with_origin`].
#[derive(Debug)]
pub struct RemoteBase {
    /// The layer.
    pub disk: Arc<RemoteDisk>,
    /// Its depth in the chain (what `block_status` reports for data it answers).
    pub depth: u32,
    /// Its data in the store: chunk size and chunk list.
    pub data: DiskData,
    /// The store's chunk size.
    pub chunk_size: u64,
    /// Whether it lives in the store `open_with_origin` was given (its chunks can be
    /// referenced without being read).
    pub same_store: bool,
}

/// Opens frozen image `path` read-only with its backing chain; when the chain ends on a
/// lazily restored disk's overlay (an origin file beside it), attaches that disk's remote
/// layer below it, read through the restore's chunk cache. `store` is used when the origin
/// names it; another store is opened with the configuration from the environment.
pub fn open_with_origin(
    path: &Path,
    store: &Arc<Store>,
) -> Result<(Arc<dyn BlockDevice>, Option<RemoteBase>)> {
    let options = storage::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let top = storage::open(path, &options)?;
    let mut bottom = top.clone();
    let mut depth = 0u32;
    while let Some(below) = bottom.backing() {
        bottom = below;
        depth += 1;
    }
    let Some(origin) = Origin::read(bottom.path())? else {
        return Ok((top, None));
    };
    let qcow2 = bottom.as_qcow2().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: an origin file beside an image that is not qcow2",
            bottom.path().display()
        ))
    })?;
    let location = Location::parse(&origin.store)?;
    let same_store = location == *store.location();
    let remote_store = if same_store {
        store.clone()
    } else {
        Arc::new(Store::open(&location, &StoreConfig::from_env(None)?)?)
    };
    let manifest = read_manifest(&remote_store, &origin.snapshot)?;
    let index = manifest
        .disks
        .iter()
        .position(|d| d.name == origin.disk)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: snapshot '{}' of {location} has no disk '{}'",
                origin_path(bottom.path()).display(),
                origin.snapshot,
                origin.disk
            ))
        })?;
    if manifest.disks[index].virtual_size != bottom.size() {
        return Err(Error::InvalidArgument(format!(
            "{}: disk '{}' of '{}' is {} bytes, the overlay {}",
            origin_path(bottom.path()).display(),
            origin.disk,
            origin.snapshot,
            manifest.disks[index].virtual_size,
            bottom.size()
        )));
    }
    let chunks = Arc::new(RemoteChunks::new(remote_store, &origin.cache)?);
    let disk = Arc::new(RemoteDisk::new(chunks, &manifest, index)?);
    qcow2.replace_backing_device(Some(disk.clone() as Arc<dyn BlockDevice>));
    Ok((
        top,
        Some(RemoteBase {
            disk,
            depth: depth + 1,
            data: manifest.disks[index].clone(),
            chunk_size: manifest.chunk_size,
            same_store,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_files_round_trip_and_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vda.qcow2");
        assert_eq!(Origin::read(&image).unwrap(), None);
        let origin = Origin {
            store: "s3://snaps/fleet".into(),
            snapshot: "s1".into(),
            disk: "vda".into(),
            cache: dir.path().to_path_buf(),
        };
        origin.write(&image).unwrap();
        assert_eq!(origin_path(&image), dir.path().join("vda.origin.json"));
        assert_eq!(Origin::read(&image).unwrap(), Some(origin));
        // Unknown fields (a secret someone added, say) and oversized files are refused.
        std::fs::write(
            origin_path(&image),
            r#"{"store":"s3://a/b","snapshot":"s","disk":"d","cache":"/c","secret":"x"}"#,
        )
        .unwrap();
        assert!(Origin::read(&image).is_err());
        std::fs::write(
            origin_path(&image),
            vec![b' '; MAX_ORIGIN_BYTES as usize + 1],
        )
        .unwrap();
        assert!(Origin::read(&image).is_err());
    }
}
