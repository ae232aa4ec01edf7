//! Reading a snapshot in the store lazily: chunks fetched on first use through the local
//! [`ChunkCache`], a disk as a read-only [`BlockDevice`], memory chunk by chunk for a pager.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use storage::{Allocation, BlockDevice, BlockStatus, ImageFormat, ImageInfo};

use crate::chunk::{ChunkCache, ChunkHash};
use crate::client::Store;
use crate::error::{Error, Result};
use crate::manifest::{ChunkList, DiskData, MemoryImage, StoreManifest};

/// Chunks of one store read through a local cache.
#[derive(Debug)]
pub struct RemoteChunks {
    store: Arc<Store>,
    cache: ChunkCache,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
}

impl RemoteChunks {
    /// Reads `store`'s chunks through the cache in `cache_dir`.
    pub fn new(store: Arc<Store>, cache_dir: &Path) -> Result<Self> {
        Ok(RemoteChunks {
            store,
            cache: ChunkCache::open(cache_dir)?,
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The chunk, from the cache or fetched (and checked) from the store.
    pub fn get(&self, hash: &ChunkHash) -> Result<Arc<[u8]>> {
        if let Some(bytes) = self.cache.get(hash)? {
            return Ok(bytes);
        }
        let bytes = self.store.get_chunk(hash)?;
        self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.cache.insert(hash, &bytes)
    }

    /// Fetches the chunks not cached yet, in parallel and in the order given (a working
    /// set lists chunks in first-touch order: what the guest needs first comes first).
    pub fn prefetch(&self, hashes: &[ChunkHash]) -> Result<u64> {
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<ChunkHash> = hashes
            .iter()
            .filter(|h| seen.insert(*h) && !self.cache.contains(h))
            .cloned()
            .collect();
        let count = missing.len() as u64;
        self.store.get_chunks(&missing, &mut |hash, bytes| {
            self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
            self.fetched_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.cache.insert(hash, &bytes).map(|_| ())
        })?;
        Ok(count)
    }

    /// Chunks fetched from the store so far (not served by the cache).
    pub fn fetched_chunks(&self) -> u64 {
        self.fetched_chunks.load(Ordering::Relaxed)
    }

    /// Bytes fetched from the store so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.load(Ordering::Relaxed)
    }
}

/// Which chunks of a run were touched, in first-touch order (for the working set).
#[derive(Debug, Default)]
pub struct TouchLog {
    seen: Mutex<(Vec<bool>, Vec<u64>)>,
}

impl TouchLog {
    fn new(chunks: usize) -> Self {
        TouchLog {
            seen: Mutex::new((vec![false; chunks], Vec::new())),
        }
    }

    fn touch(&self, index: u64) {
        let mut seen = self.seen.lock();
        let (flags, order) = &mut *seen;
        if let Some(flag) = flags.get_mut(index as usize) {
            if !*flag {
                *flag = true;
                order.push(index);
            }
        }
    }

    /// The chunk indices touched, in order.
    pub fn touched(&self) -> Vec<u64> {
        self.seen.lock().1.clone()
    }
}

/// Reads `len` bytes of chunked data at `offset` into `buf`.
fn read_chunked(
    chunks: &RemoteChunks,
    list: &ChunkList,
    chunk_size: u64,
    total: u64,
    buf: &mut [u8],
    offset: u64,
    touch: Option<&TouchLog>,
) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let position = offset + done as u64;
        let index = position / chunk_size;
        let within = (position % chunk_size) as usize;
        let chunk_len = chunk_size.min(total - index * chunk_size) as usize;
        let n = (chunk_len - within).min(buf.len() - done);
        if let Some(touch) = touch {
            touch.touch(index);
        }
        match list.get(index as usize).and_then(Option::as_ref) {
            None => buf[done..done + n].fill(0),
            Some(hash) => {
                let bytes = chunks.get(hash)?;
                let part = bytes.get(within..within + n).ok_or_else(|| {
                    Error::manifest(
                        hash.as_str(),
                        format!("chunk of {} bytes, {} expected", bytes.len(), chunk_len),
                    )
                })?;
                buf[done..done + n].copy_from_slice(part);
            }
        }
        done += n;
    }
    Ok(())
}

/// One disk of a snapshot in the store, as a read-only block device: clusters come from
/// chunks fetched on first read. A chunk that cannot be fetched or fails its hash is an
/// I/O error of that read (the guest sees an I/O error; nothing is made up).
#[derive(Debug)]
pub struct RemoteDisk {
    chunks: Arc<RemoteChunks>,
    data: DiskData,
    chunk_size: u64,
    path: PathBuf,
    touched: TouchLog,
}

impl RemoteDisk {
    /// Disk `index` of `manifest`, read through `chunks`.
    pub fn new(chunks: Arc<RemoteChunks>, manifest: &StoreManifest, index: usize) -> Result<Self> {
        let data = manifest.disks.get(index).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!("snapshot '{}' has no disk {index}", manifest.name))
        })?;
        let path = PathBuf::from(format!(
            "{}/{}#{}",
            chunks.store().location(),
            manifest.name,
            data.name
        ));
        Ok(RemoteDisk {
            touched: TouchLog::new(data.chunks.len()),
            chunks,
            chunk_size: manifest.chunk_size,
            data,
            path,
        })
    }

    /// Chunk indices read so far, in first-read order.
    pub fn touched(&self) -> Vec<u64> {
        self.touched.touched()
    }

    fn io_error(&self, op: String, error: Error) -> storage::Error {
        storage::Error::io(&self.path, op, std::io::Error::other(error.to_string()))
    }
}

impl BlockDevice for RemoteDisk {
    fn size(&self) -> u64 {
        self.data.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        storage::device::check_range(offset, buf.len() as u64, self.size())?;
        read_chunked(
            &self.chunks,
            &self.data.chunks,
            self.chunk_size,
            self.data.virtual_size,
            buf,
            offset,
            Some(&self.touched),
        )
        .map_err(|e| self.io_error(format!("read at {offset:#x}"), e))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> storage::Result<()> {
        Err(storage::Error::ReadOnly {
            path: self.path.clone(),
        })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> storage::Result<()> {
        Err(storage::Error::ReadOnly {
            path: self.path.clone(),
        })
    }

    fn discard(&self, _offset: u64, _len: u64) -> storage::Result<()> {
        Err(storage::Error::ReadOnly {
            path: self.path.clone(),
        })
    }

    fn flush(&self) -> storage::Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> storage::Result<BlockStatus> {
        storage::device::check_range(offset, len.max(1), self.size())?;
        let size = self.chunk_size;
        let index = offset / size;
        let zero = self
            .data
            .chunks
            .get(index as usize)
            .is_none_or(Option::is_none);
        // Extend over following chunks of the same kind.
        let mut end = ((index + 1) * size).min(self.size());
        let mut next = index + 1;
        while end < offset + len {
            let next_zero = self
                .data
                .chunks
                .get(next as usize)
                .is_none_or(Option::is_none);
            if next_zero != zero {
                break;
            }
            end = ((next + 1) * size).min(self.size());
            next += 1;
        }
        Ok(BlockStatus {
            len: (end.min(offset + len) - offset).max(1),
            allocation: if zero {
                Allocation::Zero
            } else {
                Allocation::Data
            },
            depth: 0,
            offset: None,
            compressed: false,
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: Some(ImageFormat::Raw),
            filename: self.path.display().to_string(),
            virtual_size: self.data.virtual_size,
            ..Default::default()
        }
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A snapshot's guest memory in the store, read a chunk at a time (what a userfaultfd
/// pager installs on a fault).
#[derive(Debug)]
pub struct RemoteMemory {
    chunks: Arc<RemoteChunks>,
    image: MemoryImage,
    chunk_size: u64,
    touched: TouchLog,
}

impl RemoteMemory {
    /// The memory of `manifest`, read through `chunks`.
    pub fn new(chunks: Arc<RemoteChunks>, manifest: &StoreManifest) -> Result<Self> {
        let image = manifest.memory.clone().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "snapshot '{}' holds no memory: it cannot be restored",
                manifest.name
            ))
        })?;
        Ok(RemoteMemory {
            touched: TouchLog::new(image.chunks.len()),
            chunks,
            image,
            chunk_size: manifest.chunk_size,
        })
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.image.chunks.len() as u64
    }

    /// The memory's total size.
    pub fn total_bytes(&self) -> u64 {
        self.image.layout.total_bytes()
    }

    /// Whether chunk `index` reads as zeroes (nothing to fetch).
    pub fn is_zero_chunk(&self, index: u64) -> bool {
        self.image
            .chunks
            .get(index as usize)
            .is_none_or(Option::is_none)
    }

    /// The hash of chunk `index`, if it is stored.
    pub fn chunk_hash(&self, index: u64) -> Option<&ChunkHash> {
        self.image
            .chunks
            .get(index as usize)
            .and_then(Option::as_ref)
    }

    /// Fills `buf` with chunk `index` (its full length, shorter at the end of memory).
    /// The error names the chunk. Not counted as touched (a prefetch reads too): the pager
    /// says which chunks the guest needed through [`RemoteMemory::touch`].
    pub fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        let offset = index * self.chunk_size;
        read_chunked(
            &self.chunks,
            &self.image.chunks,
            self.chunk_size,
            self.total_bytes(),
            buf,
            offset,
            None,
        )
    }

    /// Records that chunk `index` was needed (zero chunks are installed without a read).
    pub fn touch(&self, index: u64) {
        self.touched.touch(index);
    }

    /// Chunk indices touched so far, in first-touch order.
    pub fn touched(&self) -> Vec<u64> {
        self.touched.touched()
    }
}
