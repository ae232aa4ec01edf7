//! The block-job model of QEMU's `qapi/job.json`: a job runs on its own thread and is
//! driven through a [`Job`] handle.
//!
//! ```text
//!  created ──▶ running ◀──▶ paused
//!                 │  ▲
//!                 ▼  │ (writes keep being mirrored)
//!               ready ◀──▶ standby
//!                 │
//!   cancel/error ─┴──▶ aborting ──▶ concluded      complete/finish ──▶ concluded
//! ```
//!
//! Verbs: [`Job::pause`], [`Job::resume`], [`Job::cancel`], [`Job::complete`] (only when
//! ready) and [`Job::set_speed`] (bytes per second, 0 = unlimited). Progress is reported
//! as current/total bytes; the error that ended a job stays on it ([`Job::error`]).
//!
//! The worker sees the same state through a [`JobContext`]: it calls
//! [`JobContext::checkpoint`] between chunks (where pause and cancel take effect) and
//! [`JobContext::throttle`] before each chunk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::throttle::Throttle;

/// Longest a throttled or idle job sleeps before looking at its verbs again.
const POLL: Duration = Duration::from_millis(20);

pub use crate::job_status::JobStatus;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Copies data from the backing chain into the top (blockpull).
    Stream,
    /// Commits an intermediate layer range into its base (blockcommit).
    Commit,
    /// Commits the active layer into its base, mirroring guest writes, pivoting on complete.
    ActiveCommit,
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobKind::Stream => "stream",
            JobKind::Commit => "commit",
            JobKind::ActiveCommit => "active-commit",
        })
    }
}

/// How a concluded job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Did everything it was asked to (stream: backing rewritten; active commit: pivoted).
    Completed,
    /// Stopped by [`Job::cancel`]; the chain is valid and unchanged in shape.
    Cancelled,
    /// Stopped by an error, kept in [`Job::error`]; the chain is valid.
    Failed,
}

/// Bytes done and bytes to do. `total` may grow while a mirror sees new guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes processed so far.
    pub current: u64,
    /// Bytes to process in all, as currently known.
    pub total: u64,
}

/// A point-in-time view of a job, as `query-jobs` would report it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The disk it works on.
    pub disk: String,
    /// Its status.
    pub status: JobStatus,
    /// Its progress.
    pub progress: Progress,
    /// Its speed limit in bytes per second (0: unlimited).
    pub speed: u64,
    /// How it ended, once concluded.
    pub outcome: Option<JobOutcome>,
    /// The error that ended it, if one did.
    pub error: Option<String>,
}

struct Control {
    status: JobStatus,
    pause_requested: bool,
    cancel_requested: bool,
    complete_requested: bool,
    ready: bool,
    outcome: Option<JobOutcome>,
    error: Option<Arc<Error>>,
}

struct Shared {
    id: String,
    kind: JobKind,
    disk: String,
    control: Mutex<Control>,
    changed: Condvar,
    current: AtomicU64,
    total: AtomicU64,
    throttle: Throttle,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on a running or finished block job; cheap to clone.
#[derive(Clone)]
pub struct Job {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.shared.id)
            .field("kind", &self.shared.kind)
            .field("status", &self.status())
            .finish()
    }
}

impl Job {
    /// Starts `body` on a new thread as job `id` of `kind` on `disk`.
    pub(crate) fn spawn(
        id: String,
        kind: JobKind,
        disk: String,
        speed: u64,
        body: impl FnOnce(&JobContext) -> Result<()> + Send + 'static,
    ) -> Result<Job> {
        let shared = Arc::new(Shared {
            id: id.clone(),
            kind,
            disk,
            control: Mutex::new(Control {
                status: JobStatus::Created,
                pause_requested: false,
                cancel_requested: false,
                complete_requested: false,
                ready: false,
                outcome: None,
                error: None,
            }),
            changed: Condvar::new(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            throttle: Throttle::new(speed),
            thread: Mutex::new(None),
        });
        let worker = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let ctx = JobContext { shared: worker };
                ctx.set_status(JobStatus::Running);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&ctx)));
                let (outcome, error) = match result {
                    Ok(Ok(())) => (JobOutcome::Completed, None),
                    Ok(Err(Error::Cancelled { .. })) => (JobOutcome::Cancelled, None),
                    Ok(Err(e)) => {
                        tracing::warn!(job = %ctx.shared.id, error = %e, "job failed");
                        (JobOutcome::Failed, Some(Arc::new(e)))
                    }
                    Err(_) => (
                        JobOutcome::Failed,
                        Some(Arc::new(Error::Panicked {
                            id: ctx.shared.id.clone(),
                        })),
                    ),
                };
                let mut control = ctx.shared.control.lock();
                control.status = JobStatus::Concluded;
                control.outcome = Some(outcome);
                control.error = error;
                ctx.shared.changed.notify_all();
            })
            .map_err(|e| Error::InvalidArgument(format!("job {id}: cannot start thread: {e}")))?;
        *shared.thread.lock() = Some(handle);
        Ok(Job { shared })
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// What the job does.
    pub fn kind(&self) -> JobKind {
        self.shared.kind
    }

    /// Its current status.
    pub fn status(&self) -> JobStatus {
        self.shared.control.lock().status
    }

    /// Its progress in bytes.
    pub fn progress(&self) -> Progress {
        Progress {
            current: self.shared.current.load(Ordering::Relaxed),
            total: self.shared.total.load(Ordering::Relaxed),
        }
    }

    /// How it ended, once concluded.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.shared.control.lock().outcome
    }

    /// The error that ended it, if one did.
    pub fn error(&self) -> Option<Arc<Error>> {
        self.shared.control.lock().error.clone()
    }

    /// Everything at once.
    pub fn info(&self) -> JobInfo {
        let control = self.shared.control.lock();
        JobInfo {
            id: self.shared.id.clone(),
            kind: self.shared.kind,
            disk: self.shared.disk.clone(),
            status: control.status,
            progress: self.progress(),
            speed: self.shared.throttle.speed(),
            outcome: control.outcome,
            error: control.error.as_ref().map(|e| e.to_string()),
        }
    }

    fn refuse(&self, verb: &'static str, status: JobStatus) -> Error {
        Error::JobState {
            id: self.shared.id.clone(),
            verb,
            status,
        }
    }

    /// Asks the job to pause at its next checkpoint (within one chunk of I/O). Its status
    /// becomes paused (or standby when ready) once it has.
    pub fn pause(&self) -> Result<()> {
        let mut control = self.shared.control.lock();
        match control.status {
            JobStatus::Aborting | JobStatus::Concluded => Err(self.refuse("pause", control.status)),
            _ => {
                control.pause_requested = true;
                self.shared.changed.notify_all();
                Ok(())
            }
        }
    }

    /// Lets a paused job continue.
    pub fn resume(&self) -> Result<()> {
        let mut control = self.shared.control.lock();
        if !control.pause_requested {
            return Err(self.refuse("resume", control.status));
        }
        control.pause_requested = false;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Asks the job to stop; it leaves a valid chain (an active commit stays on its top).
    /// Cancelling a concluded job does nothing.
    pub fn cancel(&self) {
        let mut control = self.shared.control.lock();
        if control.status != JobStatus::Concluded {
            control.cancel_requested = true;
            self.shared.changed.notify_all();
        }
    }

    /// Finishes a ready job: an active commit pivots the disk onto its base.
    pub fn complete(&self) -> Result<()> {
        let mut control = self.shared.control.lock();
        if !control.ready || control.cancel_requested || control.status == JobStatus::Concluded {
            return Err(self.refuse("complete", control.status));
        }
        control.complete_requested = true;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Limits the job to `bytes_per_second` (0: unlimited), from its next chunk on.
    pub fn set_speed(&self, bytes_per_second: u64) {
        self.shared.throttle.set_speed(bytes_per_second);
        self.shared.changed.notify_all();
    }

    /// Waits until `predicate` holds for the job's status, or `timeout` passes; returns
    /// whether it held.
    pub fn wait_for(&self, timeout: Duration, predicate: impl Fn(JobStatus) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.control.lock();
        while !predicate(control.status) {
            if self
                .shared
                .changed
                .wait_until(&mut control, deadline)
                .timed_out()
            {
                return predicate(control.status);
            }
        }
        true
    }

    /// Waits for the job to conclude and returns its outcome: `Ok(Completed)`, an
    /// [`Error::Cancelled`], or the error that ended it.
    pub fn wait(&self) -> Result<JobOutcome> {
        {
            let mut control = self.shared.control.lock();
            while control.status != JobStatus::Concluded {
                self.shared.changed.wait(&mut control);
            }
        }
        if let Some(handle) = self.shared.thread.lock().take() {
            // The thread has published its outcome; joining only reaps it.
            let _ = handle.join();
        }
        let control = self.shared.control.lock();
        match (control.outcome, &control.error) {
            (Some(JobOutcome::Cancelled), _) => Err(Error::Cancelled {
                id: self.shared.id.clone(),
            }),
            (_, Some(e)) => Err(Error::JobFailed {
                id: self.shared.id.clone(),
                source: e.clone(),
            }),
            _ => Ok(JobOutcome::Completed),
        }
    }
}

/// The worker's side of a job.
pub struct JobContext {
    shared: Arc<Shared>,
}

/// What a ready job's worker is asked to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadyEvent {
    /// Nothing yet: look for new work.
    Idle,
    /// [`Job::complete`] was called.
    Complete,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    fn set_status(&self, status: JobStatus) {
        let mut control = self.shared.control.lock();
        control.status = status;
        self.shared.changed.notify_all();
    }

    /// Where pause and cancel take effect: blocks while the job is paused, and returns
    /// [`Error::Cancelled`] once it is cancelled (the worker then cleans up and returns).
    pub fn checkpoint(&self) -> Result<()> {
        let mut control = self.shared.control.lock();
        loop {
            if control.cancel_requested {
                control.status = JobStatus::Aborting;
                self.shared.changed.notify_all();
                return Err(Error::Cancelled {
                    id: self.shared.id.clone(),
                });
            }
            let (paused, active) = if control.ready {
                (JobStatus::Standby, JobStatus::Ready)
            } else {
                (JobStatus::Paused, JobStatus::Running)
            };
            let wanted = if control.pause_requested {
                paused
            } else {
                active
            };
            if control.status != wanted {
                control.status = wanted;
                self.shared.changed.notify_all();
            }
            if !control.pause_requested {
                return Ok(());
            }
            self.shared.changed.wait(&mut control);
        }
    }

    /// Waits as long as the speed limit asks before `bytes` are copied, waking early for
    /// cancel, pause or a new speed.
    pub fn throttle(&self, bytes: u64) -> Result<()> {
        let wait = self.shared.throttle.delay_for(bytes);
        if wait.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + wait;
        let mut control = self.shared.control.lock();
        while !control.cancel_requested && !control.pause_requested {
            let step = (Instant::now() + POLL).min(deadline);
            let _ = self.shared.changed.wait_until(&mut control, step);
            if Instant::now() >= deadline {
                break;
            }
            if self.shared.throttle.speed() == 0 {
                break;
            }
        }
        drop(control);
        self.checkpoint()
    }

    /// Adds `bytes` to the progress done.
    pub fn advance(&self, bytes: u64) {
        self.shared.current.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets the total of the progress.
    pub fn set_total(&self, total: u64) {
        self.shared.total.store(total, Ordering::Relaxed);
    }

    /// Bytes done so far.
    pub fn current(&self) -> u64 {
        self.shared.current.load(Ordering::Relaxed)
    }

    /// Declares the job ready (in sync): [`Job::complete`] is allowed from now on.
    pub(crate) fn set_ready(&self) {
        let mut control = self.shared.control.lock();
        control.ready = true;
        if control.status == JobStatus::Running {
            control.status = JobStatus::Ready;
        }
        self.shared.changed.notify_all();
    }

    /// Whether [`Job::complete`] has been called.
    pub(crate) fn complete_requested(&self) -> bool {
        self.shared.control.lock().complete_requested
    }

    /// Waits up to `timeout` for a verb while ready.
    pub(crate) fn wait_ready_event(&self, timeout: Duration) -> ReadyEvent {
        let mut control = self.shared.control.lock();
        if !control.complete_requested && !control.cancel_requested && !control.pause_requested {
            let _ = self.shared.changed.wait_for(&mut control, timeout);
        }
        if control.complete_requested {
            ReadyEvent::Complete
        } else {
            ReadyEvent::Idle
        }
    }
}

/// A fresh job id of the form `KIND-N`.
pub(crate) fn next_id(kind: JobKind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{kind}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
