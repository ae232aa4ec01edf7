//! Positional I/O on an image file, buffered or with `O_DIRECT`.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Memory and offset alignment used for `O_DIRECT` transfers. 4 KiB suits every logical block
/// size Linux file systems use.
pub const DIRECT_ALIGN: usize = 4096;

/// An open image file. All I/O is positional (`pread`/`pwrite`), so one `ImageFile` is shared
/// by every thread without a lock.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    direct: bool,
    read_only: bool,
}

/// A zeroed heap buffer aligned for `O_DIRECT`: I/O from one goes straight to the device
/// without a bounce copy.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes (rounded up to [`DIRECT_ALIGN`]).
    pub fn new(len: usize) -> Self {
        let len = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let len = len.max(DIRECT_ALIGN);
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("layout");
        // SAFETY: the layout has a non-zero size; a null return is handled below.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN).expect("layout");
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

fn is_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize) % DIRECT_ALIGN == 0
        && buf.len() % DIRECT_ALIGN == 0
        && offset % DIRECT_ALIGN as u64 == 0
}

impl ImageFile {
    /// Opens `path`, read-only or read-write, with `O_DIRECT` when `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        let mut options = FsOpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| Error::io(path, "open", e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            direct,
            read_only,
        })
    }

    /// Creates (or truncates) `path` for writing.
    pub fn create(path: &Path) -> Result<Self> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            direct: false,
            read_only: false,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Current length of the file in bytes.
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, "stat", e))
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.direct && !is_aligned(buf, offset) {
            return self.read_bounced(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("read {} bytes at {:#x}", buf.len(), offset),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, growing the file as needed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.direct && !is_aligned(buf, offset) {
            return self.write_bounced(buf, offset);
        }
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("write {} bytes at {:#x}", buf.len(), offset),
                e,
            )
        })
    }

    fn aligned_span(buf_len: usize, offset: u64) -> (u64, usize) {
        let align = DIRECT_ALIGN as u64;
        let start = offset / align * align;
        let end = (offset + buf_len as u64).div_ceil(align) * align;
        (start, (end - start) as usize)
    }

    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (start, span) = Self::aligned_span(buf.len(), offset);
        let mut bounce = AlignedBuf::new(span);
        let bounce = &mut bounce.as_mut_slice()[..span];
        self.read_at(bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Read-modify-write of the aligned blocks around an unaligned write. Callers never issue
    /// two unaligned writes that share a 4 KiB block concurrently: metadata writes are
    /// serialised by the image's metadata lock and data writes cover whole clusters or are
    /// serialised by the cluster lock.
    fn write_bounced(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (start, span) = Self::aligned_span(buf.len(), offset);
        let mut bounce = AlignedBuf::new(span);
        let bounce = &mut bounce.as_mut_slice()[..span];
        let skip = (offset - start) as usize;
        if skip != 0 || buf.len() != span {
            self.read_at(bounce, start)?;
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_at(bounce, start)
    }

    /// `fdatasync`: every completed write is durable when this returns.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }

    /// Sets the file's length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, "truncate", e))
    }

    /// Deallocates `len` bytes at `offset` (they read as zero afterwards). Errors are ignored
    /// by callers that use this only to save space.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                &self.path,
                format!("punch hole at {offset:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}
