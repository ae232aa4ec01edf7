//! What virtio-blk needs from a disk, so the live disk, a test double and a fuzzer's
//! in-memory disk all slot in behind the device.

use parking_lot::RwLock;
use storage::LiveDisk;

/// A disk as virtio-blk drives it. Offsets and lengths are in bytes; every method may be
/// called from several queue workers at once.
pub trait DiskBackend: Send + Sync {
    /// The virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()>;
    /// Makes the range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()>;
    /// Drops the range's contents (they may read back as anything the format allows).
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> storage::Result<()>;
}

impl DiskBackend for LiveDisk {
    fn size(&self) -> u64 {
        LiveDisk::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        LiveDisk::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        LiveDisk::write_at(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        LiveDisk::write_zeroes(self, offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()> {
        LiveDisk::discard(self, offset, len)
    }
    fn flush(&self) -> storage::Result<()> {
        LiveDisk::flush(self)
    }
}

/// A disk held in host memory: for tests and fuzzing of the request path.
///
/// ```
/// use vmm::devices::virtio::block::{DiskBackend, MemoryDisk};
/// let disk = MemoryDisk::new(4096);
/// disk.write_at(b"abc", 10).unwrap();
/// let mut back = [0u8; 3];
/// disk.read_at(&mut back, 10).unwrap();
/// assert_eq!(&back, b"abc");
/// assert!(disk.read_at(&mut back, 4095).is_err());
/// ```
#[derive(Debug)]
pub struct MemoryDisk {
    data: RwLock<Vec<u8>>,
}

impl MemoryDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemoryDisk {
            data: RwLock::new(vec![0; size]),
        }
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    fn range(&self, offset: u64, len: u64) -> storage::Result<std::ops::Range<usize>> {
        storage::device::check_range(offset, len, self.size())?;
        // In range of a Vec, so both fit in usize.
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl DiskBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.data.read().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        let range = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.read()[range]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        let range = self.range(offset, buf.len() as u64)?;
        self.data.write()[range].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        let range = self.range(offset, len)?;
        self.data.write()[range].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn flush(&self) -> storage::Result<()> {
        Ok(())
    }
}
