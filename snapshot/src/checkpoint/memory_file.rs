//! The memory file: a one-page header, then guest memory at its linear offset, sparse.
//!
//! ```text
//! 0   8  magic "SNAPVMMF"        8  4  version (1)         12 4 reserved
//! 16  8  checkpoint id          24  8  data length (guest memory bytes)
//! 32  4  CRC-32 of bytes 0..32; the rest of the 4 KiB header page is zero
//! 4096 ...  guest memory, regions back to back; untouched pages are holes
//! ```
//!
//! The header page keeps the data page-aligned, so a restore can `mmap(MAP_PRIVATE)` the
//! file straight into the guest. The id ties the file to its state file: a memory file from
//! another checkpoint is refused rather than loaded.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::{CheckpointError, CheckpointResult};
use super::page_set::PageSet;
use super::PAGE_SIZE;
use storage::fault;

/// Size of the header; guest memory starts here.
pub const HEADER_SIZE: u64 = 4096;
/// First bytes of every memory file.
pub const MAGIC: [u8; 8] = *b"SNAPVMMF";
/// The version of the header written and read.
pub const VERSION: u32 = 1;

/// An open memory file.
#[derive(Debug)]
pub struct MemoryFile {
    file: File,
    path: PathBuf,
    id: u64,
    data_len: u64,
}

fn header_bytes(id: u64, data_len: u64) -> [u8; 36] {
    let mut header = [0u8; 36];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&id.to_le_bytes());
    header[24..32].copy_from_slice(&data_len.to_le_bytes());
    let crc = crc32fast::hash(&header[..32]);
    header[32..36].copy_from_slice(&crc.to_le_bytes());
    header
}

impl MemoryFile {
    /// Creates (or truncates) `path` as an all-hole memory file of `data_len` bytes.
    pub fn create(path: &Path, id: u64, data_len: u64) -> CheckpointResult<Self> {
        // Guest memory: readable by the owner only, whatever the umask (a file that
        // existed keeps its mode at open, hence the explicit chmod).
        fault::check(fault::Op::Create, path).map_err(CheckpointError::io(path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(CheckpointError::io(path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(CheckpointError::io(path))?;
        fault::check(fault::Op::Truncate, path)
            .and_then(|()| file.set_len(HEADER_SIZE + data_len))
            .map_err(CheckpointError::io(path))?;
        fault::check(fault::Op::Write, path)
            .and_then(|()| file.write_all_at(&header_bytes(id, data_len), 0))
            .map_err(CheckpointError::io(path))?;
        Ok(MemoryFile {
            file,
            path: path.to_path_buf(),
            id,
            data_len,
        })
    }

    /// Opens `path` read-only and checks it belongs to checkpoint `id` and holds `data_len`
    /// bytes of memory (a shorter file would fault the guest when mapped).
    pub fn open(path: &Path, id: u64, data_len: u64) -> CheckpointResult<Self> {
        let bad = |message: String| CheckpointError::MemoryFile {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(CheckpointError::io(path))?;
        let size = file.metadata().map_err(CheckpointError::io(path))?.len();
        let expected = HEADER_SIZE + data_len;
        if size != expected {
            return Err(bad(format!(
                "{size} bytes, expected {expected} ({HEADER_SIZE}-byte header + {data_len} bytes of guest memory): truncated or not this checkpoint's"
            )));
        }
        let mut header = [0u8; 36];
        file.read_exact_at(&mut header, 0)
            .map_err(CheckpointError::io(path))?;
        if header[..8] != MAGIC {
            return Err(bad(format!(
                "not a snapvmm memory file (magic {:02x?}, expected \"SNAPVMMF\")",
                &header[..8]
            )));
        }
        let stored = u32::from_le_bytes([header[32], header[33], header[34], header[35]]);
        if stored != crc32fast::hash(&header[..32]) {
            return Err(bad("header CRC mismatch: the header is corrupt".into()));
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != VERSION {
            return Err(bad(format!(
                "header version {version}; this snapvmm reads {VERSION}"
            )));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[16..24]);
        let file_id = u64::from_le_bytes(word);
        word.copy_from_slice(&header[24..32]);
        let file_len = u64::from_le_bytes(word);
        if file_id != id {
            return Err(bad(format!(
                "belongs to checkpoint {file_id:016x}, the state file is {id:016x}"
            )));
        }
        if file_len != data_len {
            return Err(bad(format!(
                "header says {file_len} bytes of memory, the state file {data_len}"
            )));
        }
        Ok(MemoryFile {
            file,
            path: path.to_path_buf(),
            id,
            data_len,
        })
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint id in its header.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes of guest memory it holds.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Writes `buf` at linear memory offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> CheckpointResult<()> {
        self.check(offset, buf.len() as u64)?;
        fault::check(fault::Op::Write, &self.path)
            .and_then(|()| self.file.write_all_at(buf, HEADER_SIZE + offset))
            .map_err(CheckpointError::io(&self.path))
    }

    /// Reads `buf` from linear memory offset `offset` (holes read as zero).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> CheckpointResult<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, HEADER_SIZE + offset)
            .map_err(CheckpointError::io(&self.path))
    }

    fn check(&self, offset: u64, len: u64) -> CheckpointResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.data_len => Ok(()),
            _ => Err(CheckpointError::MemoryFile {
                path: self.path.clone(),
                message: format!("access at {offset}+{len} past its {} bytes", self.data_len),
            }),
        }
    }

    /// Makes the data durable.
    pub fn sync(&self) -> CheckpointResult<()> {
        fault::check(fault::Op::Sync, &self.path)
            .and_then(|()| self.file.sync_all())
            .map_err(CheckpointError::io(&self.path))
    }

    /// The pages of linear range `offset..offset + len` that hold data (are not holes),
    /// as a set over the whole file's pages.
    pub fn data_pages(&self, offset: u64, len: u64) -> CheckpointResult<PageSet> {
        let mut pages = PageSet::new(self.data_len / PAGE_SIZE);
        let end = HEADER_SIZE + offset + len;
        let mut position = HEADER_SIZE + offset;
        let fd = self.file.as_raw_fd();
        while position < end {
            // SAFETY: lseek on an fd we own; no memory is passed.
            let data = unsafe { libc::lseek(fd, position as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::ENXIO) {
                    break; // No data past `position`.
                }
                return Err(CheckpointError::io(&self.path)(error));
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let first = (data - HEADER_SIZE) / PAGE_SIZE;
            let last = (hole - HEADER_SIZE).div_ceil(PAGE_SIZE);
            pages.insert_range(first, last - first);
            position = hole;
        }
        Ok(pages)
    }
}

impl MemoryFile {
    /// CRC-32 of the bytes of `pages`, ascending (what [`super::DataDigest`] holds).
    pub fn crc_of(&self, pages: &PageSet) -> CheckpointResult<u32> {
        const CHUNK_PAGES: u64 = 256;
        let mut buffer = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
        let mut crc = crc32fast::Hasher::new();
        for (first, count) in pages.runs() {
            let mut page = first;
            while page < first + count {
                let n = (first + count - page).min(CHUNK_PAGES);
                let bytes = &mut buffer[..(n * PAGE_SIZE) as usize];
                self.read_at(bytes, page * PAGE_SIZE)?;
                crc.update(bytes);
                page += n;
            }
        }
        Ok(crc.finalize())
    }
}

/// Copies pages `pages` (linear page numbers) from `from` to `to`, a megabyte at a time.
pub fn copy_pages(from: &MemoryFile, to: &MemoryFile, pages: &PageSet) -> CheckpointResult<u64> {
    const CHUNK_PAGES: u64 = 256;
    let mut buffer = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    let mut copied = 0;
    for (first, count) in pages.runs() {
        let mut page = first;
        while page < first + count {
            let n = (first + count - page).min(CHUNK_PAGES);
            let bytes = &mut buffer[..(n * PAGE_SIZE) as usize];
            from.read_at(bytes, page * PAGE_SIZE)?;
            to.write_at(bytes, page * PAGE_SIZE)?;
            copied += n;
            page += n;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = MemoryFile::create(&path, 42, 64 * PAGE_SIZE).unwrap();
        file.write_at(&[7u8; 4096], 3 * PAGE_SIZE).unwrap();
        file.write_at(&[9u8; 8192], 40 * PAGE_SIZE).unwrap();
        file.sync().unwrap();
        let data = file.data_pages(0, 64 * PAGE_SIZE).unwrap();
        // Filesystems may allocate more than written, never less.
        assert!(data.contains(3) && data.contains(40) && data.contains(41));
        drop(file);

        let file = MemoryFile::open(&path, 42, 64 * PAGE_SIZE).unwrap();
        let mut page = [0u8; 4096];
        file.read_at(&mut page, 3 * PAGE_SIZE).unwrap();
        assert_eq!(page, [7u8; 4096]);
        assert!(file.read_at(&mut page, 64 * PAGE_SIZE).is_err());

        let err = MemoryFile::open(&path, 43, 64 * PAGE_SIZE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to checkpoint"), "{err}");
        let err = MemoryFile::open(&path, 42, 65 * PAGE_SIZE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let raw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(b"X", 20).unwrap();
        let err = MemoryFile::open(&path, 42, 64 * PAGE_SIZE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("header CRC mismatch"), "{err}");
    }
}
