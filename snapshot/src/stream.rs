//! Stream (virsh `blockpull [--base]`): copy into the top layer what it lacks and the layers
//! above `base` hold, then make `base` the top's backing file.
//!
//! Data is read from the layers below the top, which are read-only while the job runs, and
//! lands in the top through [`Qcow2Image::populate_cluster`], which writes a cluster only
//! if the top does not map it yet, under the same lock as a guest write: a guest write that
//! got there first always wins. The backing pointer changes only after all data and the
//! metadata that finds it are flushed, so a crash or a cancel at any point leaves a chain
//! that reads the same as before.
//!
//! [`Qcow2Image::populate_cluster`]: storage::qcow2::Qcow2Image::populate_cluster

use std::path::PathBuf;
use std::sync::Arc;

use storage::live::{CopyOnRead, LiveDisk};
use storage::qcow2::Fill;
use storage::{Allocation, BlockDevice};

use crate::chain::{self, BackingPath};
use crate::error::{Error, Result};
use crate::job::{next_id, Job, JobContext, JobKind};
use crate::pipeline;

/// Guest bytes examined per step: a checkpoint and a throttle slice each.
const CHUNK: u64 = 1 << 20;

/// What [`stream`] does.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// The layer that becomes the top's backing file; `None` streams everything and leaves
    /// the top standalone.
    pub base: Option<PathBuf>,
    /// How the top names `base` in its header.
    pub backing_path: BackingPath,
    /// Speed limit in bytes per second (0: unlimited).
    pub speed: u64,
    /// Let guest reads populate the top too while the job runs.
    pub copy_on_read: bool,
    /// The job's id; one is made up when `None`.
    pub job_id: Option<String>,
}

/// Starts a stream job on `disk`.
///
/// ```no_run
/// # use std::sync::Arc;
/// # fn demo(disk: Arc<storage::LiveDisk>) -> snapshot::Result<()> {
/// use snapshot::stream::{stream, StreamOptions};
/// let job = stream(&disk, StreamOptions { base: Some("base.qcow2".into()), ..Default::default() })?;
/// job.wait()?; // the top now has base.qcow2 as its backing file
/// # Ok(()) }
/// ```
pub fn stream(disk: &Arc<LiveDisk>, options: StreamOptions) -> Result<Job> {
    let claim = disk.claim("stream")?;
    let top = disk.top();
    let layers = chain::layers(&top);
    if top.as_qcow2().is_none() || top.read_only() {
        return Err(Error::InvalidArgument(format!(
            "{}: stream needs a writable qcow2 top",
            top.path().display()
        )));
    }
    let base_depth = match &options.base {
        Some(path) => {
            let depth = chain::depth_of(&layers, path, disk.name())?;
            if depth == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{}: the base of a stream must lie below the top",
                    path.display()
                )));
            }
            depth
        }
        None => layers.len(),
    };
    let base = layers.get(base_depth).cloned();
    let base_name = match &base {
        Some(b) => Some(options.backing_path.name_for(top.path(), b.path())?),
        None => None,
    };
    if options.copy_on_read {
        disk.quiesce().set_copy_on_read(Some(CopyOnRead {
            base_depth: base_depth as u32,
        }));
    }
    let id = options
        .job_id
        .clone()
        .unwrap_or_else(|| next_id(JobKind::Stream));
    let live = disk.clone();
    Job::spawn(
        id,
        JobKind::Stream,
        disk.name().to_string(),
        options.speed,
        move |ctx| {
            let _claim = claim;
            let result = copy_up(ctx, &top, base_depth as u32);
            // Off before the chain shrinks: its base depth would be stale afterwards.
            if options.copy_on_read {
                live.quiesce().set_copy_on_read(None);
            }
            result?;
            let image = top.as_qcow2().ok_or_else(|| {
                Error::InvalidArgument(format!("{}: not qcow2", top.path().display()))
            })?;
            let format = base.as_ref().map(|b| chain::format_of(&**b));
            // set_backing flushes data and metadata before the header, and syncs after.
            image.set_backing(base_name.as_deref(), format, base)?;
            tracing::info!(job = ctx.id(), top = %top.path().display(), "stream finished");
            Ok(())
        },
    )
}

/// Copies into `top` every cluster it does not map whose data comes from a layer above
/// `base_depth`, reading ahead on a helper thread.
fn copy_up(ctx: &JobContext, top: &Arc<dyn BlockDevice>, base_depth: u32) -> Result<()> {
    let Some(image) = top.as_qcow2() else {
        return Ok(());
    };
    let Some(below) = top.backing() else {
        return Ok(());
    };
    let size = top.size();
    let cs = image.cluster_size();
    ctx.set_total(size);
    pipeline::overlapped(
        size,
        CHUNK.max(cs),
        |start, end, fills: &mut Fills| fills.read(&**top, &*below, base_depth, cs, start, end),
        |start, end, fills| {
            ctx.checkpoint()?;
            let mut copied = 0;
            for &(cluster, zero) in &fills.clusters {
                let len = cs.min(size - cluster);
                let fill = match zero {
                    true => Fill::Zeroes,
                    false => Fill::Data(&fills.data[(cluster - start) as usize..][..len as usize]),
                };
                image.populate_cluster(cluster, fill)?;
                copied += len;
            }
            ctx.advance(end - start);
            if copied > 0 {
                ctx.throttle(copied)?;
            }
            Ok(())
        },
    )
}

/// The clusters of one chunk that the top lacks, with the data to fill them.
#[derive(Debug, Default)]
struct Fills {
    /// (guest offset of the cluster, whether it reads as zeroes).
    clusters: Vec<(u64, bool)>,
    /// The chunk's bytes as the chain below reads them, from the chunk's first byte.
    data: Vec<u8>,
}

impl Fills {
    /// Finds the clusters of `start..end` (cluster aligned) that `top` does not map and a
    /// layer above `base_depth` holds, and reads their data from `below`.
    fn read(
        &mut self,
        top: &dyn BlockDevice,
        below: &dyn BlockDevice,
        base_depth: u32,
        cs: u64,
        start: u64,
        end: u64,
    ) -> Result<()> {
        self.clusters.clear();
        let need = (end - start) as usize;
        if self.data.len() < need {
            self.data.resize(need, 0);
        }
        let mut at = start;
        while at < end {
            let status = top.block_status(at, end - at)?;
            let copy = status.depth > 0
                && status.depth < base_depth
                && status.allocation != Allocation::Unallocated;
            if copy {
                let mut cluster = at / cs * cs;
                while cluster < at + status.len {
                    // The zero shortcut only holds when this run covers the whole cluster.
                    let zero = status.allocation == Allocation::Zero
                        && at <= cluster
                        && at + status.len >= (cluster + cs).min(end);
                    match self.clusters.last_mut() {
                        Some((c, z)) if *c == cluster => *z &= zero,
                        _ => self.clusters.push((cluster, zero)),
                    }
                    cluster += cs;
                }
            }
            at += status.len;
        }
        let mut i = 0;
        while i < self.clusters.len() {
            // A run of neighbouring clusters is read from the chain below in one request.
            let mut j = i + 1;
            while j < self.clusters.len() && self.clusters[j].0 == self.clusters[j - 1].0 + cs {
                j += 1;
            }
            if self.clusters[i..j].iter().any(|&(_, zero)| !zero) {
                let run_start = self.clusters[i].0;
                let run_end = (self.clusters[j - 1].0 + cs).min(end);
                let data = &mut self.data[(run_start - start) as usize..(run_end - start) as usize];
                read_below(below, data, run_start)?;
                for (cluster, zero) in &mut self.clusters[i..j] {
                    let from = (*cluster - run_start) as usize;
                    let to = (from + cs as usize).min(data.len());
                    // Data that happens to be all zeroes is stored as a zero cluster.
                    *zero = *zero || data[from..to].iter().all(|&b| b == 0);
                }
            }
            i = j;
        }
        Ok(())
    }
}

/// Reads guest bytes from the chain below the top; a shorter backing file reads as zeroes
/// past its end.
fn read_below(below: &dyn BlockDevice, buf: &mut [u8], offset: u64) -> Result<()> {
    let size = below.size();
    if offset >= size {
        buf.fill(0);
        return Ok(());
    }
    let n = (size - offset).min(buf.len() as u64) as usize;
    below.read_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}
