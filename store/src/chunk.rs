//! Content-addressed chunks: their names (SHA-256 of the bytes, lowercase hex), how zero
//! chunks are recognised, and the local chunk cache a lazy restore reads through.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bytes per chunk of memory or disk data (a multiple of the guest page size). 512 KiB:
/// big enough that a restore fetches few objects, small enough that a second snapshot
/// re-uploads little of what did not change.
pub const DEFAULT_CHUNK_SIZE: u64 = 512 << 10;
/// Smallest chunk size a manifest may name.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk size a manifest may name (bounds one fetch's memory).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Chunks kept decoded in memory by a [`ChunkCache`] (at 512 KiB: 16 MiB).
const MEMORY_CACHE_CHUNKS: usize = 32;

/// A chunk's name: the SHA-256 of its bytes, 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(String);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkHash(hex::encode(Sha256::digest(bytes)))
    }

    /// Parses a stored name: exactly 64 lowercase hex digits (so it is safe as a key and a
    /// file name).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(ChunkHash(text.to_string()))
        } else {
            Err(format!("'{text}' is not a SHA-256 chunk hash"))
        }
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The chunk's key relative to the store prefix: `chunks/ab/abcd...`.
    pub fn key(&self) -> String {
        format!("chunks/{}/{}", &self.0[..2], self.0)
    }

    /// Checks `bytes` hash to this name.
    pub fn verify(&self, bytes: &[u8]) -> Result<()> {
        let actual = ChunkHash::of(bytes);
        if actual == *self {
            Ok(())
        } else {
            Err(Error::Corrupt {
                hash: self.0.clone(),
                actual: actual.0,
                len: bytes.len(),
            })
        }
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ChunkHash::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `bytes` are all zero (such chunks are not stored: they cost nothing).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets the middle.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A local directory of verified chunks (`DIR/chunks/<hash>`), shared by every restore
/// (and clone) that uses it, with the most recently used chunks also held in memory.
///
/// A chunk enters the directory only after its hash was checked, through a temporary file
/// renamed into place, so a crash never leaves a partial chunk under its name. A file found
/// there is checked again when first read into memory (the directory is not trusted more
/// than the store).
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    memory: Mutex<MemoryCache>,
}

#[derive(Debug, Default)]
struct MemoryCache {
    chunks: HashMap<ChunkHash, Arc<[u8]>>,
    order: VecDeque<ChunkHash>,
}

/// A number no other call in this process gets: the pager, block workers and a prefetch
/// may insert the same chunk at once, each through its own temporary file.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let chunks = dir.join("chunks");
        std::fs::create_dir_all(&chunks).map_err(|e| Error::io(&chunks, "create directory", e))?;
        Ok(ChunkCache {
            dir: chunks,
            memory: Mutex::new(MemoryCache::default()),
        })
    }

    fn path(&self, hash: &ChunkHash) -> PathBuf {
        self.dir.join(hash.as_str())
    }

    /// Whether the chunk's file is in the directory.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.memory.lock().chunks.contains_key(hash) || self.path(hash).exists()
    }

    /// The chunk from memory or the directory (checked), if held.
    pub fn get(&self, hash: &ChunkHash) -> Result<Option<Arc<[u8]>>> {
        if let Some(bytes) = self.memory.lock().chunks.get(hash) {
            return Ok(Some(bytes.clone()));
        }
        let path = self.path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "read", e)),
        };
        if hash.verify(&bytes).is_err() {
            // A damaged cache file: drop it and fetch again.
            tracing::warn!(path = %path.display(), "cached chunk is corrupt: refetching");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let bytes: Arc<[u8]> = bytes.into();
        self.remember(hash, bytes.clone());
        Ok(Some(bytes))
    }

    /// Stores a chunk whose hash the caller has checked.
    pub fn insert(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<Arc<[u8]>> {
        let path = self.path(hash);
        if !path.exists() {
            let tmp = self.dir.join(format!(
                ".{}.{}.{}.tmp",
                hash.as_str(),
                std::process::id(),
                unique()
            ));
            let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
            file.write_all(bytes)
                .map_err(|e| Error::io(&tmp, "write", e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "rename into place", e))?;
        }
        let bytes: Arc<[u8]> = bytes.into();
        self.remember(hash, bytes.clone());
        Ok(bytes)
    }

    fn remember(&self, hash: &ChunkHash, bytes: Arc<[u8]>) {
        let mut memory = self.memory.lock();
        if memory.chunks.insert(hash.clone(), bytes).is_none() {
            memory.order.push_back(hash.clone());
        }
        while memory.order.len() > MEMORY_CACHE_CHUNKS {
            if let Some(old) = memory.order.pop_front() {
                memory.chunks.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_checked_and_parsed_strictly() {
        let hash = ChunkHash::of(b"abc");
        assert_eq!(
            hash.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hash.verify(b"abc").is_ok());
        let err = hash.verify(b"abd").unwrap_err().to_string();
        assert!(
            err.contains(hash.as_str()) && err.contains("corrupt"),
            "{err}"
        );
        assert_eq!(ChunkHash::parse(hash.as_str()).unwrap(), hash);
        assert!(ChunkHash::parse("../etc/passwd").is_err());
        assert!(ChunkHash::parse(&hash.as_str().to_uppercase()).is_err());
        assert!(hash.key().starts_with("chunks/ba/ba7816"));
    }

    #[test]
    fn zero_detection_handles_unaligned_tails() {
        let mut bytes = vec![0u8; 4099];
        assert!(is_zero(&bytes));
        assert!(is_zero(&bytes[1..]));
        bytes[4098] = 1;
        assert!(!is_zero(&bytes[3..]));
    }

    #[test]
    fn cache_keeps_verified_chunks_and_drops_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let data = vec![7u8; 1000];
        let hash = ChunkHash::of(&data);
        assert!(cache.get(&hash).unwrap().is_none());
        cache.insert(&hash, &data).unwrap();
        assert_eq!(&*cache.get(&hash).unwrap().unwrap(), &data[..]);
        // A second cache on the same directory (another restore) finds it on disk.
        let other = ChunkCache::open(dir.path()).unwrap();
        assert!(other.contains(&hash));
        std::fs::write(dir.path().join("chunks").join(hash.as_str()), b"garbage").unwrap();
        assert!(other.get(&hash).unwrap().is_none());
        assert!(!dir.path().join("chunks").join(hash.as_str()).exists());
    }
}
