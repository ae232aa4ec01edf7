//! Positional I/O on an image file, buffered or with `O_DIRECT`.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use parking_lot::lock_api::RawMutex as _;
use parking_lot::RawMutex;

use crate::error::{Error, Result};
use crate::fault::{self, Op};
use crate::lock::{ImageLock, LockMode};

/// Memory and offset alignment used for `O_DIRECT` transfers. 4 KiB suits every logical block
/// size Linux file systems use.
pub const DIRECT_ALIGN: usize = 4096;

/// An open image file. All I/O is positional (`pread`/`pwrite`), so one `ImageFile` is shared
/// by every thread without a lock.
pub struct ImageFile {
    file: File,
    path: PathBuf,
    direct: bool,
    read_only: bool,
    /// With `O_DIRECT`, a write that does not cover whole 4 KiB blocks is a read-modify-write
    /// of the blocks around it; any write touching a block holds that block's stripe so an
    /// RMW never puts back stale bytes over a neighbour's concurrent write.
    block_locks: [RawMutex; BLOCK_STRIPES],
    /// This open's claim on the image (see [`crate::lock`]), when it took one.
    lock: Option<ImageLock>,
}

impl std::fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFile")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Stripes of `ImageFile::block_locks`: one bit each in a `u64` mask.
const BLOCK_STRIPES: usize = 64;

/// Holds the block stripes of one direct write, released on drop.
struct BlockGuard<'a> {
    locks: &'a [RawMutex; BLOCK_STRIPES],
    mask: u64,
}

impl<'a> BlockGuard<'a> {
    /// Locks the stripes of every 4 KiB block in `offset..offset+len`, in ascending stripe
    /// order so two writers can never wait on each other in a cycle.
    fn lock(locks: &'a [RawMutex; BLOCK_STRIPES], offset: u64, len: usize) -> Self {
        let align = DIRECT_ALIGN as u64;
        let first = offset / align;
        let last = (offset + len.max(1) as u64 - 1) / align;
        let mask = if last - first >= BLOCK_STRIPES as u64 {
            u64::MAX
        } else {
            (first..=last).fold(0u64, |m, b| m | 1 << (b % BLOCK_STRIPES as u64))
        };
        for (i, lock) in locks.iter().enumerate() {
            if mask & (1 << i) != 0 {
                lock.lock();
            }
        }
        BlockGuard { locks, mask }
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        for (i, lock) in self.locks.iter().enumerate() {
            if self.mask & (1 << i) != 0 {
                // SAFETY: this guard locked exactly the stripes in `mask`, once each.
                unsafe { lock.unlock() };
            }
        }
    }
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
            block_locks: [const { RawMutex::INIT }; BLOCK_STRIPES],
            lock: None,
        })
    }

    /// Creates (or truncates) `path` for writing; a new file is private (see
    /// [`create_private_file`]).
    pub fn create(path: &Path) -> Result<Self> {
        let file = create_private_file(path).map_err(|e| Error::io(path, "create", e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            direct: false,
            read_only: false,
            block_locks: [const { RawMutex::INIT }; BLOCK_STRIPES],
            lock: None,
        })
    }

    /// Claims the image in `mode` (see [`crate::lock`]): refused with [`Error::Locked`] when
    /// another process's claim conflicts. Held until the file is closed.
    pub fn lock(&mut self, mode: LockMode) -> Result<()> {
        if mode == LockMode::Write && self.read_only {
            return Err(Error::InvalidArgument(format!(
                "{}: a read-only open cannot take a write lock",
                self.path.display()
            )));
        }
        let lock = ImageLock::acquire(&self.path, &self.file, mode)?;
        self.lock = lock;
        Ok(())
    }

    /// Changes the claim taken by [`ImageFile::lock`] (nothing when none was taken).
    pub fn set_lock_mode(&self, mode: LockMode) -> Result<()> {
        match &self.lock {
            Some(lock) => lock.set_mode(mode),
            None => Ok(()),
        }
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
        fault::check(Op::Read, &self.path).map_err(|e| {
            Error::io(
                &self.path,
                format!("read {} bytes at {:#x}", buf.len(), offset),
                e,
            )
        })?;
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
        if self.direct {
            let _blocks = BlockGuard::lock(&self.block_locks, offset, buf.len());
            if !is_aligned(buf, offset) {
                return self.write_bounced(buf, offset);
            }
            return self.write_plain(buf, offset);
        }
        self.write_plain(buf, offset)
    }

    fn write_plain(&self, buf: &[u8], offset: u64) -> Result<()> {
        fault::check(Op::Write, &self.path)
            .and_then(|()| self.file.write_all_at(buf, offset))
            .map_err(|e| {
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

    /// Read-modify-write of the aligned blocks around an unaligned write; the caller holds
    /// the blocks' stripes.
    fn write_bounced(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (start, span) = Self::aligned_span(buf.len(), offset);
        let mut bounce = AlignedBuf::new(span);
        let bounce = &mut bounce.as_mut_slice()[..span];
        let skip = (offset - start) as usize;
        if skip != 0 || buf.len() != span {
            self.read_at(bounce, start)?;
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_plain(bounce, start)
    }

    /// Copies `len` bytes of `src` at `src_offset` into this file at `offset`, growing it as
    /// needed; bytes past the end of `src` arrive as zeroes, as [`ImageFile::read_at`] reads
    /// them. Returns how the bytes travelled.
    ///
    /// The copy runs in the kernel (`copy_file_range(2)`): a reflink where the file system
    /// shares extents, otherwise one page-cache-to-page-cache copy, instead of a `pread`
    /// into a buffer and a `pwrite` out of it. When the kernel cannot copy between these
    /// two files (EXDEV across file systems, EOPNOTSUPP, EINVAL, ENOSYS), with `O_DIRECT`
    /// on either side, and for whatever the kernel left short (the end of `src`), the rest
    /// goes through memory. Either way the data is in this file (not yet durable) when it
    /// returns, as after [`ImageFile::write_at`]; write-back of the range is started at
    /// once, so a copy job's final flush finds little left to write.
    ///
    /// Fault injection sees the in-kernel copy as one [`Op::Copy`] on this file (and the
    /// fallback as reads and writes); an injected [`fault::Fault::Unsupported`] stands for
    /// a kernel that cannot copy, so the fallback can be tested.
    pub fn copy_from(
        &self,
        src: &ImageFile,
        src_offset: u64,
        len: u64,
        offset: u64,
    ) -> Result<CopyPath> {
        let what = || {
            format!(
                "copy {len} bytes from {} at {offset:#x}",
                src.path.display()
            )
        };
        let copied = if self.direct || src.direct {
            0
        } else {
            match fault::check(Op::Copy, &self.path) {
                Ok(()) => self
                    .copy_in_kernel(src, src_offset, len, offset)
                    .map_err(|e| Error::io(&self.path, what(), e))?,
                Err(e) if kernel_cannot_copy(&e) => 0,
                Err(e) => return Err(Error::io(&self.path, what(), e)),
            }
        };
        if copied < len {
            self.copy_through_memory(src, src_offset + copied, len - copied, offset + copied)?;
        }
        self.start_writeback(offset, len);
        Ok(match copied {
            0 => CopyPath::Memory,
            n if n == len => CopyPath::Kernel,
            _ => CopyPath::Mixed,
        })
    }

    /// `copy_file_range` until `len` bytes are copied, the source ends, or the kernel says
    /// it cannot copy these files; returns the bytes copied. Errors are real I/O errors.
    fn copy_in_kernel(
        &self,
        src: &ImageFile,
        src_offset: u64,
        len: u64,
        offset: u64,
    ) -> std::io::Result<u64> {
        use std::os::fd::AsRawFd;
        let mut done = 0u64;
        while done < len {
            let (Ok(mut from), Ok(mut to)) = (
                libc::loff_t::try_from(src_offset + done),
                libc::loff_t::try_from(offset + done),
            ) else {
                break;
            };
            // At most 1 GiB per call: the kernel caps a call below 2 GiB anyway.
            let n = (len - done).min(1 << 30) as usize;
            // SAFETY: both descriptors are open files owned by `src` and `self`; the offsets
            // are plain integers the kernel reads and updates, and no buffer is passed.
            let rc = unsafe {
                libc::copy_file_range(
                    src.file.as_raw_fd(),
                    &mut from,
                    self.file.as_raw_fd(),
                    &mut to,
                    n,
                    0,
                )
            };
            match rc {
                // The end of the source: the rest reads as zeroes, through memory.
                0 => break,
                n if n > 0 => done += n as u64,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if kernel_cannot_copy(&e) {
                        break;
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// The fallback of [`ImageFile::copy_from`]: `pread` into a buffer, `pwrite` out of it.
    fn copy_through_memory(
        &self,
        src: &ImageFile,
        src_offset: u64,
        len: u64,
        offset: u64,
    ) -> Result<()> {
        const STEP: u64 = 1 << 20;
        // Aligned, so that O_DIRECT on either side needs no bounce buffer.
        let mut buf = AlignedBuf::new(len.min(STEP) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP) as usize;
            let buf = &mut buf.as_mut_slice()[..n];
            src.read_at(buf, src_offset + done)?;
            self.write_at(buf, offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Starts write-back of the dirty pages of `offset..offset+len` without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while the caller copies
    /// on. Only a hint: durability still comes from [`ImageFile::sync`], which also reports
    /// any write error of this write-back, so errors here are ignored.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        if self.direct || len == 0 {
            return;
        }
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor we own; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    /// `fdatasync`: every completed write is durable when this returns.
    pub fn sync(&self) -> Result<()> {
        fault::check(Op::Sync, &self.path)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }

    /// Sets the file's length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        fault::check(Op::Truncate, &self.path)
            .and_then(|()| self.file.set_len(len))
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

/// How [`ImageFile::copy_from`] moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPath {
    /// All of them in the kernel, file to file.
    Kernel,
    /// All of them through a buffer in memory (the kernel could not copy, or `O_DIRECT`).
    Memory,
    /// The kernel copied a first part and stopped short (the end of the source); the rest
    /// went through memory.
    Mixed,
}

/// Whether `copy_file_range` failed because the kernel cannot copy between these two files
/// (rather than because I/O failed): then the copy goes through memory instead.
fn kernel_cannot_copy(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::EBADF)
    )
}

/// Makes a new or renamed directory entry for `path` durable (power loss, not just a crash of
/// this process) by syncing the directory holding it.
pub fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fault::check(Op::Sync, dir)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Permissions of every file the engine creates: guest disks and memory are nobody else's
/// business, whatever the umask says.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Permissions of every directory the engine creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `path` for reading and writing with mode 0600 whatever the umask, or opens and
/// truncates it if it exists (an existing file keeps the mode its owner gave it).
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    fault::check(Op::Create, path)?;
    let mut options = FsOpenOptions::new();
    options.read(true).write(true).mode(PRIVATE_FILE_MODE);
    match options.clone().create_new(true).open(path) {
        Ok(file) => {
            // The umask may have taken bits away; never added any, but say exactly 0600.
            file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            options.truncate(true).open(path)
        }
        Err(e) => Err(e),
    }
}

/// Creates directory `path` and any missing parents with mode 0700 whatever the umask;
/// directories that exist are left as they are.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    fault::check(Op::Create, path)?;
    match std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(path)
    {
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE)),
        // Created meanwhile by someone else: theirs to keep.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to` (replacing `to`), through the fault-injection layer so tests can
/// fail it. The caller syncs the directory (see [`sync_parent_dir`]) when it must be durable.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    fault::check(Op::Rename, to)?;
    std::fs::rename(from, to)
}
