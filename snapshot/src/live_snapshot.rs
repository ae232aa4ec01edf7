//! External snapshots of a set of live disks, all or none (virsh `snapshot-create-as
//! --disk-only --atomic`).
//!
//! 1. Outside the critical section: claim every disk, create each overlay file (qcow2,
//!    backing = the disk's current top, backing format recorded, synced), open it on top of
//!    the live top, and then flush every top.
//! 2. The switch. With a hook to run at the snapshot's instant (a memory checkpoint must
//!    see exactly the disks' contents), all disks are quiesced as one hold (new requests
//!    stopped on every disk, then the ones in flight drained, locks in a fixed order), the
//!    hook runs, every disk switches to its overlay. Without one, the disks switch without
//!    a drain (`LiveDisk::switch_all`): requests in flight finish on the old tops, a new
//!    write waits only for an old-top write in flight on the same cluster. Any failure up
//!    to here puts every disk back on its old top and removes every file step 1 created.
//! 3. Resume, then seal every old top: wait for the requests still running on it, flush it
//!    and make it read-only. Until that is done, a guest flush on the disk flushes the old
//!    top too, so a flush acknowledged after the switch still covers writes made before it.
//!
//! The stall the guest sees is step 2: pointer swaps (and the drain and the hook when
//! there is a hook), no I/O of ours. It does not depend on the size of the disks or of their
//! caches; without a hook, not on how slow the requests in flight are either.
//!
//! [`external_snapshot`] and [`external_snapshot_with`] run the three steps in a row. [`prepare`] returns them
//! separately ([`PreparedSnapshot`]) for a caller that owns the critical section: a live
//! fork switches the disks inside its checkpoint's final stop, with the files created
//! before the vCPUs stop and the old tops sealed after they run again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::live::{DiskClaim, LiveDisk, TopSwitch};
use storage::qcow2::{CreateOptions, Qcow2Image};
use storage::{BlockDevice, OpenOptions};

use crate::chain::{self, BackingPath};
use crate::error::{Error, HookError, Result};

/// One disk of a snapshot and where its new overlay goes.
#[derive(Debug, Clone)]
pub struct DiskOverlay {
    /// The disk to switch.
    pub disk: Arc<LiveDisk>,
    /// The overlay file to create; it must not exist.
    pub overlay: PathBuf,
    /// How the overlay names the disk's current top.
    pub backing_path: BackingPath,
    /// The overlay's cluster size; `None` takes the current top's (64 KiB for raw).
    pub cluster_size: Option<u64>,
}

impl DiskOverlay {
    /// An overlay at `overlay` for `disk`, naming its backing file by absolute path.
    pub fn new(disk: &Arc<LiveDisk>, overlay: impl Into<PathBuf>) -> Self {
        DiskOverlay {
            disk: disk.clone(),
            overlay: overlay.into(),
            backing_path: BackingPath::Absolute,
            cluster_size: None,
        }
    }

    /// The same, naming the backing file `how`.
    pub fn backing_path(mut self, how: BackingPath) -> Self {
        self.backing_path = how;
        self
    }
}

/// What a successful snapshot did.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// How long guest requests were held back: the switch, and for a snapshot with a hook
    /// the drain of the requests in flight and the hook too.
    pub quiesced_for: Duration,
    /// For each disk, in the order given: the old top, now read-only.
    pub old_tops: Vec<PathBuf>,
}

/// Takes an external snapshot of every disk in `overlays` at one instant.
///
/// ```no_run
/// # use std::sync::Arc;
/// # fn demo(vda: Arc<storage::LiveDisk>, vdb: Arc<storage::LiveDisk>) -> snapshot::Result<()> {
/// use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
/// external_snapshot(&[
///     DiskOverlay::new(&vda, "/vm/vda.snap1.qcow2"),
///     DiskOverlay::new(&vdb, "/vm/vdb.snap1.qcow2"),
/// ])?;
/// # Ok(()) }
/// ```
///
/// With no hook to run at the snapshot's instant, the disks switch without draining
/// ([`PreparedSnapshot::switch_in_flight`]): the guest's I/O is held only for the pointer
/// swaps, however slow the requests in flight are.
pub fn external_snapshot(overlays: &[DiskOverlay]) -> Result<SnapshotReport> {
    let mut prepared = prepare(overlays)?;
    prepared.switch_in_flight()?;
    prepared.seal()
}

/// Like [`external_snapshot`], and runs `hook` while every disk is quiesced (no request in
/// flight), before any is switched: what the hook records (a memory checkpoint) matches the disks'
/// contents exactly. A failing hook rolls the snapshot back.
///
/// A failure after the disks switched (sealing an old top) is [`Error::AfterSwitch`]: the
/// snapshot happened, the overlays are the disks' tops and are kept.
pub fn external_snapshot_with(
    overlays: &[DiskOverlay],
    hook: impl FnOnce() -> std::result::Result<(), HookError>,
) -> Result<SnapshotReport> {
    let mut prepared = prepare(overlays)?;
    prepared.switch(hook)?;
    prepared.seal()
}

/// Step 1 of a snapshot split in three, for callers whose critical section is their own (a
/// live fork switches the disks inside a checkpoint's final stop): claims every disk,
/// creates, syncs and opens every overlay on top of the disk's current top, and flushes
/// every top, all while the guest runs. Then [`PreparedSnapshot::switch`] (the pointer
/// swaps) and [`PreparedSnapshot::seal`] (after the guest resumes).
///
/// On failure nothing is left behind: the files created so far are removed and the disks
/// released. A prepared snapshot dropped before its switch does the same.
pub fn prepare(overlays: &[DiskOverlay]) -> Result<PreparedSnapshot> {
    check_overlays(overlays)?;
    let claims = overlays
        .iter()
        .map(|o| o.disk.claim("snapshot"))
        .collect::<std::result::Result<Vec<DiskClaim>, _>>()?;
    let mut snapshot = PreparedSnapshot {
        specs: overlays.to_vec(),
        created: Vec::with_capacity(overlays.len()),
        overlays: Vec::with_capacity(overlays.len()),
        old_tops: Vec::with_capacity(overlays.len()),
        quiesced_for: None,
        _claims: claims,
    };
    // On error `snapshot` is dropped unswitched, which removes what was created.
    snapshot.create_overlays()?;
    Ok(snapshot)
}

fn check_overlays(overlays: &[DiskOverlay]) -> Result<()> {
    if overlays.is_empty() {
        return Err(Error::InvalidArgument(
            "a snapshot needs at least one disk".into(),
        ));
    }
    for (i, a) in overlays.iter().enumerate() {
        for b in &overlays[i + 1..] {
            if Arc::ptr_eq(&a.disk, &b.disk) {
                return Err(Error::InvalidArgument(format!(
                    "disk {} appears twice in one snapshot",
                    a.disk.name()
                )));
            }
            if a.overlay == b.overlay {
                return Err(Error::InvalidArgument(format!(
                    "{}: two disks would share this overlay",
                    a.overlay.display()
                )));
            }
        }
    }
    Ok(())
}

/// A snapshot whose overlays exist and are open, not yet switched to (see [`prepare`]).
/// It holds the disks' claims until it is sealed or dropped.
///
/// Dropped before [`PreparedSnapshot::switch`] succeeded, it removes every overlay it
/// created. Once switched, the overlays are the disks' tops and hold the guest's writes:
/// nothing ever removes them, whatever fails afterwards.
pub struct PreparedSnapshot {
    specs: Vec<DiskOverlay>,
    created: Vec<PathBuf>,
    overlays: Vec<Arc<dyn BlockDevice>>,
    old_tops: Vec<Arc<dyn BlockDevice>>,
    /// Set by a successful switch: how long the disks were quiesced.
    quiesced_for: Option<Duration>,
    _claims: Vec<DiskClaim>,
}

impl std::fmt::Debug for PreparedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSnapshot")
            .field("overlays", &self.created)
            .field("switched", &self.quiesced_for.is_some())
            .finish_non_exhaustive()
    }
}

impl PreparedSnapshot {
    /// The overlay files, in the order the disks were given.
    pub fn overlay_paths(&self) -> Vec<PathBuf> {
        self.specs.iter().map(|o| o.overlay.clone()).collect()
    }

    /// Whether [`PreparedSnapshot::switch`] succeeded.
    pub fn is_switched(&self) -> bool {
        self.quiesced_for.is_some()
    }

    /// Creates and opens every overlay, and flushes every top.
    fn create_overlays(&mut self) -> Result<()> {
        for spec in &self.specs {
            let old_top = spec.disk.top();
            let path = &spec.overlay;
            if path.symlink_metadata().is_ok() {
                return Err(Error::Exists { path: path.clone() });
            }
            let format = chain::format_of(&*old_top);
            let options = CreateOptions {
                size: Some(spec.disk.size()),
                cluster_size: spec
                    .cluster_size
                    .or_else(|| old_top.as_qcow2().map(|i| i.cluster_size()))
                    .unwrap_or(CreateOptions::default().cluster_size),
                backing_file: Some(spec.backing_path.name_for(path, old_top.path())?),
                backing_format: Some(format),
                ..CreateOptions::default()
            };
            // Recorded before creating: a half-written file is removed on rollback too.
            self.created.push(path.clone());
            storage::qcow2::create(path, &options)?;
            if let Err(e) = storage::file::sync_parent_dir(path) {
                tracing::warn!(path = %path.display(), error = %e, "fsync of the overlay's directory failed");
            }
            let backing = old_top.clone();
            let overlay = Qcow2Image::open_with(path, false, &OpenOptions::default(), |_, _| {
                Ok(backing.clone())
            })?;
            if overlay.size() != spec.disk.size() {
                return Err(Error::InvalidArgument(format!(
                    "{}: overlay size {} differs from disk {}'s {}",
                    path.display(),
                    overlay.size(),
                    spec.disk.name(),
                    spec.disk.size()
                )));
            }
            self.overlays.push(Arc::new(overlay));
            self.old_tops.push(old_top);
        }
        // Flushed last, after every file is made and synced, so as close to the switch as
        // `prepare` gets: the requests in flight when the switch drains them then rarely have
        // metadata write-back of their own to finish, and no later sync of ours holds up the
        // filesystem's journal while they run.
        for old_top in &self.old_tops {
            old_top.flush()?;
        }
        Ok(())
    }

    /// Step 2, the critical section: quiesces every disk (in a fixed order), runs `hook`,
    /// and makes every overlay its disk's top. No I/O, no allocation beyond a guard per
    /// disk: pointer swaps. Returns how long the disks were quiesced (draining the requests
    /// in flight included).
    ///
    /// A failure (a disk's top changed since [`prepare`], the hook failed) switches nothing;
    /// dropping the prepared snapshot then removes its overlays. Switching twice is refused.
    pub fn switch(
        &mut self,
        hook: impl FnOnce() -> std::result::Result<(), HookError>,
    ) -> Result<Duration> {
        if self.is_switched() {
            return Err(Error::InvalidArgument(
                "the snapshot's disks are switched already".into(),
            ));
        }
        let disks: Vec<&LiveDisk> = self.specs.iter().map(|o| &*o.disk).collect();
        // The stall starts when new requests begin to wait: draining is part of it.
        let started = Instant::now();
        let mut guards = LiveDisk::quiesce_all(&disks);
        for (guard, old_top) in guards.iter().zip(&self.old_tops) {
            if !Arc::ptr_eq(guard.top(), old_top) {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: its top changed while the snapshot was prepared",
                    guard.disk().name()
                )));
            }
        }
        hook().map_err(Error::Hook)?;
        // Nothing below can fail (sizes were checked in `prepare`): the switch is pointer
        // swaps. The old tops' flush happens after the guest resumes; until then a guest
        // flush covers them too (`retire`).
        for (i, ((guard, overlay), old_top)) in guards
            .iter_mut()
            .zip(&self.overlays)
            .zip(&self.old_tops)
            .enumerate()
        {
            if let Err(e) = guard.replace_top(overlay.clone()) {
                // Unreachable (sizes were checked), but should it happen after a first disk
                // switched, that disk writes its overlay now: keep every file.
                if i > 0 {
                    self.quiesced_for = Some(started.elapsed());
                }
                return Err(e.into());
            }
            guard.retire(old_top.clone());
        }
        let quiesced_for = started.elapsed();
        drop(guards);
        self.quiesced_for = Some(quiesced_for);
        Ok(quiesced_for)
    }

    /// Step 2 without a drain, for a snapshot with nothing to record at its instant: every
    /// disk switches to its overlay while the requests in flight finish on the old tops
    /// ([`LiveDisk::switch_all`]). Returns how long new requests were held: the pointer
    /// swaps. A write to an overlay that touches a cluster an old-top write in flight
    /// changes waits for that write; [`PreparedSnapshot::seal`] waits for all of them.
    ///
    /// A failure (a disk's top changed since [`prepare`]) switches nothing.
    pub fn switch_in_flight(&mut self) -> Result<Duration> {
        if self.is_switched() {
            return Err(Error::InvalidArgument(
                "the snapshot's disks are switched already".into(),
            ));
        }
        let switches: Vec<TopSwitch<'_>> = self
            .specs
            .iter()
            .zip(&self.overlays)
            .zip(&self.old_tops)
            .map(|((spec, overlay), old_top)| TopSwitch {
                disk: &spec.disk,
                from: old_top,
                to: overlay.clone(),
            })
            .collect();
        let started = Instant::now();
        LiveDisk::switch_all(&switches)?;
        let held = started.elapsed();
        self.quiesced_for = Some(held);
        Ok(held)
    }

    /// Step 3, with the guest running again: seals every old top (flushed and read-only, as
    /// a backing file must be) and releases the disks. A failure here cannot be rolled back
    /// (the guest has written to the overlays): it is [`Error::AfterSwitch`], the overlays
    /// stay, and the disk keeps flushing the old top on every guest flush.
    ///
    /// Called before a successful switch, it refuses and the overlays are removed.
    pub fn seal(self) -> Result<SnapshotReport> {
        let Some(quiesced_for) = self.quiesced_for else {
            return Err(Error::InvalidArgument(
                "a snapshot is sealed after its switch".into(),
            ));
        };
        let mut sealed = Ok(());
        for (spec, old_top) in self.specs.iter().zip(&self.old_tops) {
            // After a switch without a drain, writes may still land on the old top.
            spec.disk.settle();
            if let Err(e) = seal_in_place(old_top) {
                tracing::error!(disk = spec.disk.name(), error = %e, "flushing the old top failed");
                sealed = sealed.and(Err(e));
            }
            spec.disk.prune_retired();
        }
        let old_tops: Vec<PathBuf> = self
            .old_tops
            .iter()
            .map(|t| t.path().to_path_buf())
            .collect();
        if let Err(cause) = sealed {
            return Err(Error::AfterSwitch {
                operation: "external snapshot".into(),
                live: self.overlay_paths(),
                left: old_tops,
                cause: Box::new(cause),
            });
        }
        Ok(SnapshotReport {
            quiesced_for,
            old_tops,
        })
    }
}

impl Drop for PreparedSnapshot {
    fn drop(&mut self) {
        // Past the switch the overlays are the disks' tops, holding the guest's writes:
        // never removed.
        if self.is_switched() {
            return;
        }
        // Handles first: dropping an overlay flushes it, which must not recreate the file.
        self.overlays.clear();
        for path in self.created.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing a rolled-back overlay failed");
            }
        }
    }
}

/// Makes the old top read-only in place. Raw tops have no read-only switch: nothing writes
/// them once the overlay is the top, and they were flushed above.
fn seal_in_place(old_top: &Arc<dyn BlockDevice>) -> Result<()> {
    match old_top.as_qcow2() {
        Some(image) => Ok(image.make_read_only()?),
        None => Ok(old_top.flush()?),
    }
}
