//! Commit (virsh `blockcommit`): merge the layers from `top` down to just above `base` into
//! `base`, then drop them from the chain.
//!
//! - **Intermediate commit** (`top` below the active layer): every layer involved is
//!   read-only, so the data is copied straight into a writable handle on `base`; then the
//!   layer above `top` gets `base` as its backing file.
//! - **Active commit** (`top` is the active layer): the guest keeps writing into `top`. A
//!   [`DirtyBitmap`] installed on the live disk records those writes, and a
//!   [mirror] copies everything marked into `base`. When nothing is marked
//!   the job is *ready*; on [`Job::complete`] the disk is quiesced, the last marked granules
//!   are copied, and the live disk pivots onto `base`. On cancel it stays on `top`.
//!
//! Either way, `base` changes only where layers above it hide its contents, so the guest's
//! view never changes and a crash at any point leaves a valid chain. The writable handle on
//! `base` becomes the backing device of the layer above it for the job's duration, so reads
//! never see a stale cache of `base`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use storage::live::{DirtyBitmap, LiveDisk};
use storage::BlockDevice;

use crate::chain::{self, BackingPath};
use crate::error::{Error, Result};
use crate::job::{next_id, Job, JobContext, JobKind, ReadyEvent};
use crate::mirror;
use crate::pipeline::{self, Extents};

/// Granule of the dirty bitmap: the guest's usual write size, so a 4 KiB write costs the
/// mirror 4 KiB and not a whole cluster (neighbouring granules are copied together).
const GRANULE: u64 = 4 << 10;
/// How long a ready job sleeps when there is nothing to copy.
const IDLE_WAIT: Duration = Duration::from_millis(5);

/// What [`commit`] does.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The top of the range to commit; `None` is the active layer (an active commit).
    pub top: Option<PathBuf>,
    /// The layer to commit into; `None` is `top`'s backing file.
    pub base: Option<PathBuf>,
    /// How the layer above `top` names `base` afterwards (intermediate commit).
    pub backing_path: BackingPath,
    /// Speed limit in bytes per second (0: unlimited).
    pub speed: u64,
    /// The job's id; one is made up when `None`.
    pub job_id: Option<String>,
}

/// Starts a commit job on `disk`. An active commit becomes [ready](crate::job::JobStatus)
/// when `base` is in sync and pivots on [`Job::complete`].
///
/// ```no_run
/// # use std::sync::Arc;
/// # fn demo(disk: Arc<storage::LiveDisk>) -> snapshot::Result<()> {
/// use std::time::Duration;
/// use snapshot::commit::{commit, CommitOptions};
/// use snapshot::job::JobStatus;
/// let job = commit(&disk, CommitOptions::default())?; // active layer into its backing file
/// job.wait_for(Duration::from_secs(60), |s| s == JobStatus::Ready);
/// job.complete()?;
/// job.wait()?; // the disk now runs on the former backing file
/// # Ok(()) }
/// ```
pub fn commit(disk: &Arc<LiveDisk>, options: CommitOptions) -> Result<Job> {
    let claim = disk.claim("commit")?;
    let active = disk.top();
    let layers = chain::layers(&active);
    let top_depth = match &options.top {
        Some(path) => chain::depth_of(&layers, path, disk.name())?,
        None => 0,
    };
    let base_depth = match &options.base {
        Some(path) => chain::depth_of(&layers, path, disk.name())?,
        None => top_depth + 1,
    };
    if base_depth <= top_depth || base_depth >= layers.len() {
        return Err(Error::InvalidArgument(format!(
            "disk {}: commit needs a base below the top ({} has {} layers)",
            disk.name(),
            active.path().display(),
            layers.len()
        )));
    }
    let base = layers[base_depth].clone();
    let overlay_name = match top_depth {
        0 => None,
        _ => Some(
            options
                .backing_path
                .name_for(layers[top_depth - 1].path(), base.path())?,
        ),
    };
    let base_writer = chain::reopen_writable(&base)?;
    // From here on the chain reads `base` through the writer, which never has stale caches.
    if let Some(image) = layers[base_depth - 1].as_qcow2() {
        image.replace_backing_device(Some(base_writer.clone()));
    }
    let id = options.job_id.clone().unwrap_or_else(|| {
        next_id(if top_depth == 0 {
            JobKind::ActiveCommit
        } else {
            JobKind::Commit
        })
    });
    if let Some(name) = overlay_name {
        let overlay = layers[top_depth - 1].clone();
        let top = layers[top_depth].clone();
        return Job::spawn(
            id,
            JobKind::Commit,
            disk.name().to_string(),
            options.speed,
            move |ctx| {
                let _claim = claim;
                let span = (base_depth - top_depth) as u32;
                let copied = copy_down(ctx, &top, &base_writer, span);
                let sealed = chain::seal(&base_writer);
                copied?;
                let sealed = sealed?;
                let format = chain::format_of(&*sealed);
                chain::rewrite_backing(&overlay, Some(&name), Some(format), Some(sealed))?;
                tracing::info!(job = ctx.id(), base = %base.path().display(), "commit finished");
                Ok(())
            },
        );
    }
    let bitmap = Arc::new(DirtyBitmap::new(disk.size(), GRANULE)?);
    // Installed before the scan below, so no write can fall between the two.
    disk.quiesce().set_dirty_bitmap(Some(bitmap.clone()));
    let live = disk.clone();
    Job::spawn(
        id,
        JobKind::ActiveCommit,
        disk.name().to_string(),
        options.speed,
        move |ctx| {
            let _claim = claim;
            let result = mirror_and_pivot(ctx, &live, &active, &base_writer, &bitmap, base_depth);
            if result.is_err() {
                // Stay on top: stop recording, and seal base back as a backing file.
                live.quiesce().set_dirty_bitmap(None);
                if let Err(e) = chain::seal(&base_writer) {
                    tracing::error!(job = ctx.id(), error = %e, "sealing the commit base failed");
                }
            }
            result
        },
    )
}

/// Copies into `base` every run of `top` held by one of the `span` layers from `top` down,
/// reading ahead on a helper thread.
fn copy_down(
    ctx: &JobContext,
    top: &Arc<dyn BlockDevice>,
    base: &Arc<dyn BlockDevice>,
    span: u32,
) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let layers = chain::layers(top);
    ctx.set_total(top.size());
    pipeline::overlapped(
        top.size(),
        CHUNK,
        |start, end, extents: &mut Extents| extents.read_above(&layers, span, start, end),
        |start, end, extents| {
            ctx.checkpoint()?;
            let copied = extents.write_to(&layers, &**base)?;
            ctx.advance(end - start);
            if copied > 0 {
                ctx.throttle(copied)?;
            }
            Ok(())
        },
    )?;
    base.flush()?;
    Ok(())
}

/// The body of an active commit: mirror until ready, then until complete or cancel.
fn mirror_and_pivot(
    ctx: &JobContext,
    live: &Arc<LiveDisk>,
    active: &Arc<dyn BlockDevice>,
    base: &Arc<dyn BlockDevice>,
    bitmap: &DirtyBitmap,
    base_depth: usize,
) -> Result<()> {
    mirror::mark_allocated(&**active, base_depth as u32, bitmap)?;
    let mut cursor = 0;
    let mut ready = false;
    loop {
        ctx.checkpoint()?;
        ctx.set_total(ctx.current() + bitmap.dirty_bytes());
        if ready && ctx.complete_requested() {
            return pivot(ctx, live, active, base, bitmap);
        }
        let copied = mirror::drain_dirty(&**active, base, bitmap, &mut cursor, |len| {
            ctx.advance(len);
            ctx.throttle(len)?;
            ctx.checkpoint()?;
            ctx.set_total(ctx.current() + bitmap.dirty_bytes());
            // Once in sync, a complete request ends the pass so the pivot is prompt.
            Ok(!(ready && ctx.complete_requested()))
        })?;
        if copied > 0 {
            continue;
        }
        if !ready {
            // In sync once: what is copied so far reaches the disk before we say so.
            base.flush()?;
            ready = true;
            ctx.set_total(ctx.current());
            ctx.set_ready();
            tracing::info!(job = ctx.id(), "active commit ready");
        }
        if ctx.wait_ready_event(IDLE_WAIT) == ReadyEvent::Complete {
            return pivot(ctx, live, active, base, bitmap);
        }
    }
}

/// Quiesces the disk, copies what is still dirty, and makes `base` the disk's top.
fn pivot(
    ctx: &JobContext,
    live: &Arc<LiveDisk>,
    active: &Arc<dyn BlockDevice>,
    base: &Arc<dyn BlockDevice>,
    bitmap: &DirtyBitmap,
) -> Result<()> {
    let mut quiesced = live.quiesce();
    let mut cursor = 0;
    loop {
        let copied = mirror::copy_dirty(&**active, base, bitmap, &mut cursor, u64::MAX)?;
        ctx.advance(copied);
        if copied == 0 {
            break;
        }
    }
    base.flush()?;
    quiesced.set_dirty_bitmap(None);
    let old = quiesced.replace_top(base.clone())?;
    drop(quiesced);
    // The old top is out of the disk; seal it so no one writes it behind base's back.
    if let Some(image) = old.as_qcow2() {
        if let Err(e) = image.make_read_only() {
            tracing::warn!(path = %old.path().display(), error = %e, "sealing the old top failed");
        }
    }
    ctx.set_total(ctx.current());
    tracing::info!(job = ctx.id(), top = %base.path().display(), "active commit pivoted");
    Ok(())
}
