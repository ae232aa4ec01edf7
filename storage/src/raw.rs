//! Raw images: the file is the disk.

use std::path::Path;
use std::sync::Arc;

use crate::device::{check_range, Allocation, BlockDevice, BlockStatus, ImageInfo};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::format::{foreign_magic, ImageFormat};
use crate::lock::LockMode;

/// Bytes a format probe looks at (QEMU's `BLOCK_PROBE_BUF_SIZE`): the first sector.
const PROBE_BYTES: u64 = 512;

/// A raw image file. Its virtual size is the file's length at open.
#[derive(Debug)]
pub struct RawImage {
    file: ImageFile,
    size: u64,
    /// The format was guessed, not given: guest writes must not change what a probe sees.
    probed: bool,
}

impl RawImage {
    /// Opens a raw image.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        let file = ImageFile::open(path, read_only, direct)?;
        let size = file.len()?;
        Ok(RawImage {
            file,
            size,
            probed: false,
        })
    }

    /// Claims the image (see [`crate::lock`]), as [`crate::open()`] does.
    pub fn lock(&mut self, mode: LockMode) -> Result<()> {
        self.file.lock(mode)
    }

    /// Marks the image as opened with a probed format (no format given), so that guest writes
    /// to its first sector that would make it probe as another format are refused, as QEMU
    /// refuses them.
    pub(crate) fn set_format_probed(&mut self) {
        self.probed = true;
    }

    /// On a probed image, refuses a write that would make the first sector look like another
    /// format (say a qcow2 header naming a host file as its backing file).
    fn check_probe_safe(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed || offset >= PROBE_BYTES || buf.is_empty() {
            return Ok(());
        }
        let mut head = vec![0u8; PROBE_BYTES.min(self.size) as usize];
        self.file.read_at(&mut head, 0)?;
        let at = offset as usize;
        let n = buf.len().min(head.len().saturating_sub(at));
        head[at..at + n].copy_from_slice(&buf[..n]);
        match foreign_magic(&head) {
            None => Ok(()),
            Some(format) => Err(Error::io(
                self.file.path(),
                format!(
                    "guest write at {offset:#x}: the image's format was probed as raw, and this write would make it probe as {format} (give the format explicitly to allow it)"
                ),
                std::io::Error::from_raw_os_error(libc::EPERM),
            )),
        }
    }

    /// Creates a raw image of `size` bytes (sparse).
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let file = ImageFile::create(path)?;
        file.set_len(size)
    }

    fn writable(&self) -> Result<()> {
        if self.file.read_only() {
            return Err(Error::ReadOnly {
                path: self.file.path().to_path_buf(),
            });
        }
        Ok(())
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.check_probe_safe(buf, offset)?;
        self.file.write_at(buf, offset)
    }

    fn write_from_file(
        &self,
        offset: u64,
        len: u64,
        src: &ImageFile,
        src_offset: u64,
    ) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        if self.probed && offset < PROBE_BYTES {
            // The first sector of a probed image goes through `write_at`'s probe check.
            let head = (PROBE_BYTES - offset).min(len);
            let mut buf = vec![0u8; head as usize];
            src.read_at(&mut buf, src_offset)?;
            self.write_at(&buf, offset)?;
            if head == len {
                return Ok(());
            }
            self.file
                .copy_from(src, src_offset + head, len - head, offset + head)?;
            return Ok(());
        }
        self.file.copy_from(src, src_offset, len, offset)?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        // Punching keeps the file sparse; fall back to writing zeroes where the file system
        // cannot punch.
        if self.file.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        // A raw file has no clusters: discard leaves data as it is, which the trait allows
        // for partial ranges and keeps the contract "discard never changes what is read" on
        // file systems without hole punching.
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.file.read_only() {
            return Ok(());
        }
        self.file.sync()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        Ok(BlockStatus {
            len,
            allocation: Allocation::Data,
            depth: 0,
            offset: Some(offset),
            compressed: false,
        })
    }

    fn read_only(&self) -> bool {
        self.file.read_only()
    }

    fn format_probed(&self) -> bool {
        self.probed
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: Some(ImageFormat::Raw),
            filename: self.file.path().display().to_string(),
            virtual_size: self.size,
            ..ImageInfo::default()
        }
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn data_file(&self) -> Option<&ImageFile> {
        Some(&self.file)
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}
