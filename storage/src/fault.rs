//! Fault injection, a test aid: make the Nth file operation of the engine fail with EIO or
//! ENOSPC, to prove that every multi-step operation survives a failure at every step.
//!
//! Every operation that changes an image file on disk goes through this module (and reads,
//! which only plans naming [`Op::Read`] see): positioned writes, in-kernel copies, `fdatasync`/`fsync` (of files and of directories), `rename`, `truncate`/`set_len`
//! and file creation, including the helpers of [`crate::file`] that other crates use for
//! their own files, and every step of the files other crates write themselves (tree
//! metadata, checkpoints), which call [`check`]. Disarmed (always, outside tests) a check costs one relaxed atomic load.
//!
//! ```
//! use storage::fault::{self, FaultPlan, Op};
//! # let dir = tempfile::tempdir().unwrap();
//! // Count what an operation does, then fail each of its steps in turn.
//! let counting = fault::inject(FaultPlan::count_only().under(dir.path()));
//! storage::file::create_private_file(&dir.path().join("a")).unwrap();
//! let steps = counting.count();
//! drop(counting);
//! for n in 1..=steps {
//!     let _armed = fault::inject(FaultPlan::fail_nth(n, None, fault::Fault::Enospc).under(dir.path()));
//!     assert!(storage::file::create_private_file(&dir.path().join(format!("b{n}"))).is_err());
//! }
//! # let _ = Op::Write;
//! ```
//!
//! One plan is armed at a time in a process: [`inject`] waits for the previous guard to be
//! dropped, so fault tests in one test binary run one after the other. A plan limited to a
//! directory with [`FaultPlan::under`] leaves every other file alone, so other tests running
//! in the same process at the same time are not disturbed (and not counted).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, MutexGuard};

/// The kinds of file operation a plan can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A positioned read (`pread`) from an image file: counted and failed only by plans
    /// that name it, never by "any kind" (tests count reads to bound the work of an open).
    Read,
    /// A positioned write (`pwrite`) into a file.
    Write,
    /// An in-kernel copy from one file into another (`copy_file_range`, see
    /// [`crate::file::ImageFile::copy_from`]), counted on the file written. An injected
    /// [`Fault::Unsupported`] stands for a kernel that cannot copy between the two files:
    /// the copy then goes through memory (as reads and writes).
    Copy,
    /// `fdatasync` or `fsync` of a file or of a directory.
    Sync,
    /// `rename` of a file into place.
    Rename,
    /// `ftruncate` (setting a file's length).
    Truncate,
    /// Creating (or truncating while opening) a file or a directory.
    Create,
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: the file system is full.
    Enospc,
    /// `EOPNOTSUPP`: what a kernel answers when it cannot copy between two files in the
    /// kernel; [`crate::file::ImageFile::copy_from`] then copies through memory.
    Unsupported,
}

impl Fault {
    fn errno(self) -> i32 {
        match self {
            Fault::Eio => libc::EIO,
            Fault::Enospc => libc::ENOSPC,
            Fault::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

/// What to fail: see [`inject`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPlan {
    /// The kind of operation counted and failed; `None` counts and fails any kind.
    pub op: Option<Op>,
    /// Which counted operation fails, from 1; 0 never fails (count only).
    pub nth: u64,
    /// The error returned.
    pub error: Fault,
    /// Keep failing every counted operation after the Nth too (a full disk stays full).
    pub sticky: bool,
    /// Only files under this path are counted and failed.
    pub under: Option<PathBuf>,
}

impl FaultPlan {
    /// Fails the `nth` (from 1) operation of kind `op` (`None`: of any kind) with `error`.
    pub fn fail_nth(nth: u64, op: Option<Op>, error: Fault) -> Self {
        FaultPlan {
            op,
            nth,
            error,
            sticky: false,
            under: None,
        }
    }

    /// Fails nothing; only counts operations (of any kind).
    pub fn count_only() -> Self {
        FaultPlan::fail_nth(0, None, Fault::Eio)
    }

    /// Limits the plan to files whose path, as the engine was given it, starts with `dir`.
    pub fn under(mut self, dir: impl Into<PathBuf>) -> Self {
        self.under = Some(dir.into());
        self
    }

    /// Makes every counted operation from the Nth on fail, not only the Nth.
    pub fn sticky(mut self) -> Self {
        self.sticky = true;
        self
    }
}

/// The armed plan and what it has seen.
struct Armed {
    plan: FaultPlan,
    count: u64,
    fired: u64,
}

/// Fast path: false whenever no plan is armed.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The armed plan, if any.
static STATE: Mutex<Option<Armed>> = parking_lot::const_mutex(None);
/// Held by the live guard: one plan at a time.
static EXCLUSIVE: Mutex<()> = parking_lot::const_mutex(());

/// Disarms the plan when dropped. See [`inject`].
pub struct FaultGuard {
    _exclusive: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for FaultGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultGuard")
            .field("count", &self.count())
            .field("fired", &self.fired())
            .finish()
    }
}

impl FaultGuard {
    /// Operations counted so far (those the plan's kind and directory select).
    pub fn count(&self) -> u64 {
        count()
    }

    /// How many operations the plan has failed so far.
    pub fn fired(&self) -> u64 {
        STATE.lock().as_ref().map_or(0, |a| a.fired)
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        ARMED.store(false, Ordering::Relaxed);
        *STATE.lock() = None;
    }
}

/// Arms `plan` until the returned guard is dropped, waiting first for any other armed plan
/// of this process to be disarmed. Counting starts at 0.
pub fn inject(plan: FaultPlan) -> FaultGuard {
    let exclusive = EXCLUSIVE.lock();
    *STATE.lock() = Some(Armed {
        plan,
        count: 0,
        fired: 0,
    });
    ARMED.store(true, Ordering::Relaxed);
    FaultGuard {
        _exclusive: exclusive,
    }
}

/// Operations the armed plan has counted (0 when none is armed).
pub fn count() -> u64 {
    STATE.lock().as_ref().map_or(0, |a| a.count)
}

/// Called before operation `op` on `path`: the injected error when the armed plan says this
/// one fails. The file layer calls it for image files; other crates call it before each step
/// of writing their own files (the snapshot tree's metadata, checkpoint state and memory
/// files), so one plan counts and fails the steps of a whole operation.
pub fn check(op: Op, path: &Path) -> std::io::Result<()> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut state = STATE.lock();
    let Some(armed) = state.as_mut() else {
        return Ok(());
    };
    if armed.plan.op.is_some_and(|k| k != op) || (armed.plan.op.is_none() && op == Op::Read) {
        return Ok(());
    }
    if armed
        .plan
        .under
        .as_ref()
        .is_some_and(|dir| !path.starts_with(dir))
    {
        return Ok(());
    }
    armed.count += 1;
    let nth = armed.plan.nth;
    let hit = nth != 0 && (armed.count == nth || (armed.plan.sticky && armed.count > nth));
    if hit {
        armed.fired += 1;
        tracing::debug!(?op, path = %path.display(), count = armed.count, "injected fault");
        return Err(std::io::Error::from_raw_os_error(armed.plan.error.errno()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_only_the_nth_matching_operation_under_the_directory() {
        let dir = Path::new("/fault-test/a");
        let guard = inject(FaultPlan::fail_nth(2, Some(Op::Sync), Fault::Enospc).under(dir));
        assert!(check(Op::Sync, Path::new("/elsewhere/x")).is_ok());
        assert!(check(Op::Write, &dir.join("x")).is_ok());
        assert!(check(Op::Sync, &dir.join("x")).is_ok());
        let err = check(Op::Sync, &dir.join("y")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert!(check(Op::Sync, &dir.join("x")).is_ok());
        assert_eq!((guard.count(), guard.fired()), (3, 1));
        drop(guard);
        assert_eq!(count(), 0);
        assert!(check(Op::Sync, &dir.join("x")).is_ok());
    }

    #[test]
    fn sticky_plans_keep_failing() {
        let dir = Path::new("/fault-test/b");
        let guard = inject(FaultPlan::fail_nth(1, None, Fault::Eio).under(dir).sticky());
        for op in [Op::Write, Op::Rename, Op::Truncate, Op::Create] {
            let err = check(op, &dir.join("x")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
        }
        assert_eq!(guard.fired(), 4);
    }
}
