//! Image locking as QEMU does it: open file description (OFD) byte-range locks on the image
//! file, with QEMU's byte layout, so that snapvmm and QEMU processes see each other's claims.
//!
//! QEMU's `block/file-posix.c` describes a user of an image by two sets of permissions:
//! those it holds and those it lets others hold ("shared"). For each permission bit `i`
//! (consistent read 0, write 1, write unchanged 2, resize 3) a holder takes a shared read lock
//! on byte `100 + i`, and a user that does *not* share bit `i` takes one on byte `200 + i`.
//! Before it may hold bit `i`, a user tests that nobody locked `200 + i`; before it may refuse
//! bit `i` to others, it tests that nobody locked `100 + i`. Tests use `F_OFD_GETLK`; locks
//! are only ever taken shared (`F_RDLCK`), so taking one never fails because of another user.
//!
//! OFD locks belong to an open file description, so two opens of one image in this process
//! would conflict with each other. Inside one process the block layer is trusted to know what
//! it does (a live snapshot reopens its old top read-only while the top is still open, a
//! commit reopens a backing file writable): every open of an inode shares one lock
//! description, which holds the union of what its users need, and only other processes are
//! tested against. The last user to go unlocks and closes it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// First byte of the "holds permission" locks.
const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" locks.
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, in bit order.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const WRITE_UNCHANGED: u8 = 1 << 2;
const RESIZE: u8 = 1 << 3;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// How a user of an image claims it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A writable image: holds write and resize, and lets nobody else write or resize it.
    Write,
    /// A read-only image (a backing file, an inspection): lets nobody else write or resize
    /// it, so what it reads stays what it read.
    Read,
    /// Read-only and sharing everything, like `qemu-img -U`: inspection of an image that
    /// another process may be writing.
    SharedRead,
}

impl LockMode {
    /// Permissions held.
    fn perm(self) -> u8 {
        match self {
            LockMode::Write => ALL,
            LockMode::Read | LockMode::SharedRead => CONSISTENT_READ,
        }
    }

    /// Permissions left to others.
    fn shared(self) -> u8 {
        match self {
            LockMode::Write | LockMode::Read => CONSISTENT_READ | WRITE_UNCHANGED,
            LockMode::SharedRead => ALL,
        }
    }
}

/// The lock description of one inode, shared by every open of it in this process.
struct Entry {
    /// A duplicate of the first opener's descriptor: its open file description holds the
    /// locks for as long as this entry lives.
    file: File,
    /// Users and their modes.
    holders: BTreeMap<u64, LockMode>,
    /// Bits whose `PERM_BASE` byte is locked.
    locked_perm: u8,
    /// Bits whose `SHARED_BASE` byte is locked.
    locked_unshared: u8,
}

/// Inode (device, number) -> lock description.
static REGISTRY: Mutex<BTreeMap<(u64, u64), Entry>> = parking_lot::const_mutex(BTreeMap::new());
/// Source of holder ids.
static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

/// One user's claim on an image, released on drop.
#[derive(Debug)]
pub struct ImageLock {
    key: (u64, u64),
    id: u64,
    path: PathBuf,
}

fn fcntl_lock(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_short,
    byte: i64,
) -> std::io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl on a descriptor this process owns, with a pointer to a live `flock`;
    // OFD commands require `l_pid` 0, which the zeroed struct has.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(file: &File, byte: i64) -> std::io::Result<bool> {
    let fl = fcntl_lock(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK as libc::c_short,
        byte,
    )?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

impl Entry {
    /// What the users need together: held bits and bits not shared.
    fn union(&self) -> (u8, u8) {
        self.holders
            .values()
            .fold((0, 0), |(perm, unshared), mode| {
                (perm | mode.perm(), unshared | (ALL & !mode.shared()))
            })
    }

    /// Locks the bytes of `perm` and `unshared`; with `unlock`, also releases the others.
    fn apply(&mut self, perm: u8, unshared: u8, unlock: bool) -> std::io::Result<()> {
        for (base, want, locked) in [
            (PERM_BASE, perm, &mut self.locked_perm),
            (SHARED_BASE, unshared, &mut self.locked_unshared),
        ] {
            for i in 0..PERM_NAMES.len() {
                let bit = 1u8 << i;
                let byte = base + i as i64;
                if want & bit != 0 && *locked & bit == 0 {
                    fcntl_lock(
                        &self.file,
                        libc::F_OFD_SETLK,
                        libc::F_RDLCK as libc::c_short,
                        byte,
                    )?;
                    *locked |= bit;
                } else if unlock && want & bit == 0 && *locked & bit != 0 {
                    fcntl_lock(
                        &self.file,
                        libc::F_OFD_SETLK,
                        libc::F_UNLCK as libc::c_short,
                        byte,
                    )?;
                    *locked &= !bit;
                }
            }
        }
        Ok(())
    }

    /// Tests `mode` against the locks of other processes: a message naming the permission
    /// in conflict, as QEMU words it.
    fn conflict(&self, mode: LockMode) -> std::io::Result<Option<String>> {
        for (i, name) in PERM_NAMES.iter().enumerate() {
            let bit = 1u8 << i;
            if mode.perm() & bit != 0 && byte_taken(&self.file, SHARED_BASE + i as i64)? {
                return Ok(Some(format!("Failed to get \"{name}\" lock")));
            }
        }
        for (i, name) in PERM_NAMES.iter().enumerate() {
            let bit = 1u8 << i;
            if mode.shared() & bit == 0 && byte_taken(&self.file, PERM_BASE + i as i64)? {
                return Ok(Some(format!("Failed to get shared \"{name}\" lock")));
            }
        }
        Ok(None)
    }

    /// Releases what no user needs any more; a failure here only leaves a lock too many.
    fn settle(&mut self, path: &Path) {
        let (perm, unshared) = self.union();
        if let Err(e) = self.apply(perm, unshared, true) {
            tracing::warn!(path = %path.display(), error = %e, "releasing image lock bytes failed");
        }
    }
}

/// Whether `e` says the file system cannot do OFD locks (then the image is used unlocked,
/// as QEMU's `locking=auto` does).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK) | Some(libc::ENOSYS)
    )
}

impl ImageLock {
    /// Claims the image open as `file` (at `path`, for messages) in `mode`, refusing when
    /// another process's claim conflicts. `Ok(None)`: the file system has no OFD locks.
    pub fn acquire(path: &Path, file: &File, mode: LockMode) -> Result<Option<Self>> {
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let key = (meta.dev(), meta.ino());
        let id = NEXT_HOLDER.fetch_add(1, Ordering::Relaxed);
        let mut registry = REGISTRY.lock();
        if let std::collections::btree_map::Entry::Vacant(slot) = registry.entry(key) {
            let dup = file
                .try_clone()
                .map_err(|e| Error::io(path, "dup for locking", e))?;
            slot.insert(Entry {
                file: dup,
                holders: BTreeMap::new(),
                locked_perm: 0,
                locked_unshared: 0,
            });
        }
        let lock = ImageLock {
            key,
            id,
            path: path.to_path_buf(),
        };
        let claimed = lock.claim(&mut registry, mode);
        if claimed.is_err() {
            lock.forget(&mut registry);
        }
        // Released before `lock` can be dropped: its drop takes the registry again.
        drop(registry);
        match claimed {
            Ok(()) => Ok(Some(lock)),
            Err(Claim::Unsupported(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "file system cannot lock the image: opening it unlocked");
                Ok(None)
            }
            Err(Claim::Refused(e)) => Err(e),
        }
    }

    /// Changes this user's claim (a writable layer sealed read-only, or the reverse).
    pub fn set_mode(&self, mode: LockMode) -> Result<()> {
        let mut registry = REGISTRY.lock();
        match self.claim(&mut registry, mode) {
            Ok(()) => Ok(()),
            Err(Claim::Unsupported(e)) => {
                tracing::warn!(path = %self.path.display(), error = %e, "file system cannot lock the image");
                Ok(())
            }
            Err(Claim::Refused(e)) => Err(e),
        }
    }

    /// QEMU's prepare / check / commit-or-abort: lock the union of old and new needs, test
    /// the new ones against other processes, then settle on exactly what is needed.
    fn claim(
        &self,
        registry: &mut BTreeMap<(u64, u64), Entry>,
        mode: LockMode,
    ) -> Result<(), Claim> {
        let Some(entry) = registry.get_mut(&self.key) else {
            return Ok(());
        };
        let old = entry.holders.insert(self.id, mode);
        let (perm, unshared) = entry.union();
        let outcome = entry
            .apply(
                entry.locked_perm | perm,
                entry.locked_unshared | unshared,
                false,
            )
            .and_then(|()| entry.conflict(mode));
        let failure = match outcome {
            Ok(None) => {
                entry.settle(&self.path);
                return Ok(());
            }
            Ok(Some(reason)) => Claim::Refused(Error::Locked {
                path: self.path.clone(),
                reason: format!("{reason}: is another process using the image?"),
            }),
            Err(e) if unsupported(&e) => Claim::Unsupported(e),
            Err(e) => Claim::Refused(Error::io(&self.path, "lock", e)),
        };
        match old {
            Some(previous) => entry.holders.insert(self.id, previous),
            None => entry.holders.remove(&self.id),
        };
        entry.settle(&self.path);
        Err(failure)
    }

    /// Removes this user from the registry, closing the lock description if it was the last.
    fn forget(&self, registry: &mut BTreeMap<(u64, u64), Entry>) {
        let Some(entry) = registry.get_mut(&self.key) else {
            return;
        };
        entry.holders.remove(&self.id);
        // Unlocked explicitly, not by closing: a child forked by another thread (before its
        // exec closes the descriptors) can keep the open file description, and its locks,
        // alive after this process closed every descriptor of it.
        entry.settle(&self.path);
        if entry.holders.is_empty() {
            registry.remove(&self.key);
        }
    }
}

/// Why a claim failed.
enum Claim {
    /// The file system has no OFD locks.
    Unsupported(std::io::Error),
    /// Another process's claim conflicts, or locking failed.
    Refused(Error),
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let mut registry = REGISTRY.lock();
        self.forget(&mut registry);
    }
}
