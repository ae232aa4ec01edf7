//! Reverting to a snapshot: a fresh overlay on an external snapshot's frozen images, or an
//! internal snapshot applied in place or to a copy of its image.

use super::internal::{open_alone, reopen_top, VmStateReader};
use super::*;

/// Copies the qcow2 image `source` to `path` and applies its internal snapshot `name` there:
/// a plain image (no internal snapshots of its own) on `source`'s backing chain that reads
/// as the snapshot did, while `source` and its snapshot stay as they are.
fn copy_with_snapshot_applied(source: &Path, path: &Path, name: &str) -> Result<Qcow2Image> {
    copy_private(source, path).map_err(|e| {
        Error::InvalidArgument(format!(
            "copying {} to {}: {e}",
            source.display(),
            path.display()
        ))
    })?;
    let mut copy = Qcow2Image::open_with(path, false, &OpenOptions::default(), |backing, fmt| {
        // Named relative to the source's directory, as the header was written for it.
        storage::open(
            &storage::open::resolve_backing_path(source, backing),
            &OpenOptions {
                read_only: true,
                format: fmt,
                ..OpenOptions::default()
            },
        )
    })?;
    copy.apply_snapshot(name)?;
    let ids: Vec<String> = copy.snapshots().iter().map(|s| s.id.clone()).collect();
    for id in ids {
        copy.delete_snapshot(&id)?;
    }
    Ok(copy)
}

/// Copies `source` to a new file `path`, owner-only whatever the umask (a disk image holds
/// the guest's data), and syncs it.
fn copy_private(source: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = std::fs::File::open(source)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::copy(&mut from, &mut to)?;
    to.sync_all()
}

impl SnapshotTree {
    /// Reverts every disk (and, for a snapshot with memory, the VM) to snapshot `name`, which
    /// becomes current. The VM's vCPUs are paused while the disks switch; afterwards the VM
    /// runs or stays paused as it was when a snapshot with memory was taken, and as it was
    /// before the revert for a disk-only one. A snapshot with memory needs the tree's
    /// [`VmState`].
    pub fn revert(&self, name: &str) -> Result<SnapshotInfo> {
        let _op = self.op.lock();
        let snapshot = self.get(name)?;
        if snapshot.memory && self.vm_state.is_none() {
            // The disks alone would no longer match what the running guest has in memory.
            return Err(Error::InvalidArgument(format!(
                "snapshot {name:?} holds the VM's memory, which this VM cannot load"
            )));
        }
        self.register_live_chains();
        // Each commits the metadata (current snapshot, new images) before the vCPUs run.
        let reverted = if snapshot.kind == SnapshotKind::Internal {
            self.revert_internal(&snapshot)
        } else {
            self.revert_external(&snapshot)
        };
        self.clear_failed_intent();
        reverted?;
        // Housekeeping after the revert committed: a failure is not the revert failing.
        if let Err(e) = self.compact() {
            tracing::warn!(error = %e, "compacting the snapshot tree after a revert failed");
        }
        tracing::info!(snapshot = name, "reverted");
        Ok(snapshot)
    }

    /// Records the intent of a revert to `snapshot` whose disks switch to `files` (one per
    /// disk that gets a new file) with `records`; `tops` are the disks' tops afterwards.
    fn revert_intent(
        &self,
        snapshot: &SnapshotInfo,
        files: &[PathBuf],
        fresh_overlays: bool,
        records: &[ImageRecord],
        tops: Vec<PathBuf>,
    ) -> Result<()> {
        self.write_intent(Intent {
            op: IntentOp::Revert,
            snapshot: snapshot.name.clone(),
            files: files.iter().map(|p| abs(p)).collect(),
            fresh_overlays,
            info: None,
            records: records.to_vec(),
            tops,
        })
    }

    /// Commits a revert whose disks switched: the new images and the current snapshot, in
    /// memory and in the file. A failure to write is [`Error::AfterSwitch`].
    fn commit_revert(
        &self,
        snapshot: &SnapshotInfo,
        records: &[ImageRecord],
        left: &[Arc<dyn BlockDevice>],
    ) -> Result<()> {
        {
            let mut meta = self.meta.lock();
            for record in records {
                meta.images.retain(|r| r.path != record.path);
                meta.images.push(record.clone());
            }
            meta.current = Some(snapshot.name.clone());
            meta.pending = None;
        }
        self.save().map_err(|e| Error::AfterSwitch {
            operation: format!("revert to {:?}", snapshot.name),
            live: self.disks.iter().map(|d| abs(d.top().path())).collect(),
            left: left.iter().map(|t| t.path().to_path_buf()).collect(),
            cause: Box::new(e),
        })
    }

    fn revert_external(&self, snapshot: &SnapshotInfo) -> Result<()> {
        let paths: Vec<PathBuf> = self
            .disks
            .iter()
            .zip(&snapshot.disks)
            .map(|(disk, d)| self.fresh_path(&d.image, disk.name(), &snapshot.name, ".revert"))
            .collect();
        let records: Vec<ImageRecord> = paths
            .iter()
            .zip(&snapshot.disks)
            .map(|(path, d)| ImageRecord {
                path: abs(path),
                backing: Some(d.image.clone()),
                owned: true,
            })
            .collect();
        let live: Vec<PathBuf> = records.iter().map(|r| r.path.clone()).collect();
        self.revert_intent(snapshot, &paths, true, &records, live)?;
        let mut created = Created::default();
        let prepared = self
            .prepare_revert_overlays(snapshot, &paths, &mut created.paths)
            .and_then(|tops| Ok((tops, self.claim_all("snapshot-revert")?)));
        let (tops, claims) = match prepared {
            Ok(p) => p,
            Err(e) => {
                drop(created);
                self.clear_intent();
                return Err(e);
            }
        };
        let was_running = self.pause()?;
        let old_tops = match self.switch(&tops) {
            Ok(old) => old,
            Err(e) => {
                drop(claims);
                drop(tops);
                drop(created);
                self.clear_intent();
                self.resume_if(was_running)?;
                return Err(e);
            }
        };
        if let (Some(vm), Some(dir)) = (&self.vm_state, &snapshot.checkpoint) {
            if let Err(e) = vm.load_checkpoint(dir) {
                // Back to where the VM was: its memory still matches the old disks.
                let back = self.switch(&old_tops);
                drop(claims);
                if back.is_ok() {
                    drop(tops);
                    drop(created);
                    self.clear_intent();
                    self.resume_if(was_running)?;
                } else {
                    // Some disk stays on the snapshot's overlay: keep the files it uses.
                    created.keep = true;
                    {
                        let mut meta = self.meta.lock();
                        meta.images.extend(records);
                        meta.pending = None;
                    }
                    self.save()?;
                }
                return Err(Error::Hook(e));
            }
        }
        drop(claims);
        created.keep = true;
        let committed = self.commit_revert(snapshot, &records, &old_tops);
        self.seal_left(&old_tops);
        let resumed = self.resume_after_revert(snapshot, was_running);
        committed?;
        resumed
    }

    /// Resumes the vCPUs after a revert: as the snapshot had them when it holds memory,
    /// as they were before the revert otherwise.
    fn resume_after_revert(&self, snapshot: &SnapshotInfo, was_running: bool) -> Result<()> {
        let run = match snapshot.memory {
            true => snapshot.state == RunState::Running,
            false => was_running,
        };
        self.resume_if(run)
    }

    /// Creates and opens a fresh overlay on each of the snapshot's frozen images.
    fn prepare_revert_overlays(
        &self,
        snapshot: &SnapshotInfo,
        paths: &[PathBuf],
        created: &mut Vec<PathBuf>,
    ) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let mut tops = Vec::new();
        for ((disk, d), path) in self.disks.iter().zip(&snapshot.disks).zip(paths) {
            let frozen = storage::open(
                &d.image,
                &OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                },
            )?;
            let options = storage::qcow2::CreateOptions {
                size: Some(disk.size()),
                cluster_size: frozen
                    .as_qcow2()
                    .map(|i| i.cluster_size())
                    .unwrap_or(storage::qcow2::CreateOptions::default().cluster_size),
                backing_file: Some(path_text(&d.image)?),
                backing_format: Some(chain::format_of(&*frozen)),
                ..Default::default()
            };
            created.push(path.clone());
            storage::qcow2::create(path, &options)?;
            let overlay =
                Qcow2Image::open_with(path, false, &OpenOptions::default(), |_, _| Ok(frozen))?;
            tops.push(Arc::new(overlay) as Arc<dyn BlockDevice>);
        }
        Ok(tops)
    }

    fn revert_internal(&self, snapshot: &SnapshotInfo) -> Result<()> {
        // Per disk: None = apply in place (its image is the active one), Some = a copy of
        // the image with the snapshot applied, prepared before the VM is paused.
        // Declared first, dropped last: the copies' handles close before a failure removes
        // their files.
        let mut created = Created::default();
        let mut copies: Vec<Option<Arc<dyn BlockDevice>>> = Vec::new();
        // Per disk: the copy's path when it gets one, and its record.
        let mut plan: Vec<Option<PathBuf>> = Vec::new();
        let mut records = Vec::new();
        let mut tops = Vec::new();
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            if abs(disk.top().path()) == d.image {
                plan.push(None);
                tops.push(d.image.clone());
                continue;
            }
            let path = self.fresh_path(&d.image, disk.name(), &snapshot.name, ".copy");
            let backing = self
                .meta
                .lock()
                .images
                .iter()
                .find(|r| r.path == d.image)
                .and_then(|r| r.backing.clone());
            records.push(ImageRecord {
                path: abs(&path),
                backing,
                owned: true,
            });
            tops.push(abs(&path));
            plan.push(Some(path));
        }
        let files: Vec<PathBuf> = plan.iter().flatten().cloned().collect();
        // Copies are not empty when made: only a disk running on one shows a switch.
        self.revert_intent(snapshot, &files, false, &records, tops)?;
        for (disk_image, path) in snapshot.disks.iter().zip(&plan) {
            let Some(path) = path else {
                copies.push(None);
                continue;
            };
            created.paths.push(path.clone());
            match copy_with_snapshot_applied(&disk_image.image, path, &snapshot.name) {
                Ok(copy) => copies.push(Some(Arc::new(copy))),
                Err(e) => {
                    drop(copies);
                    drop(created);
                    self.clear_intent();
                    return Err(e);
                }
            }
        }
        let mut reader = match (snapshot.memory, &self.vm_state) {
            (true, Some(_)) => {
                let image = open_alone(&snapshot.disks[0].image, true)?;
                // The image's own table says how much state there is, not the metadata.
                let size = image
                    .find_snapshot(&snapshot.name)
                    .map(|i| image.snapshots()[i].vm_state_size)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "{}: internal snapshot {:?} is missing",
                            snapshot.disks[0].image.display(),
                            snapshot.name
                        ))
                    })?;
                Some(VmStateReader {
                    image,
                    snapshot: snapshot.name.clone(),
                    position: 0,
                    size,
                })
            }
            _ => None,
        };
        let claimed = self.claim_all("snapshot-revert");
        let claims = match claimed {
            Ok(c) => c,
            Err(e) => {
                drop(copies);
                drop(created);
                self.clear_intent();
                return Err(e);
            }
        };
        let was_running = self.pause()?;
        let switched = self.switch_internal(snapshot, &copies);
        drop(claims);
        // From here some disk may use a copy: the copies are the tree's to manage.
        created.keep = true;
        let old_tops = match switched {
            Ok(old) => old,
            Err(e) => {
                {
                    let mut meta = self.meta.lock();
                    meta.images.extend(records);
                    meta.pending = None;
                }
                self.save()?;
                self.resume_if(was_running)?;
                return Err(e);
            }
        };
        let committed = self.commit_revert(snapshot, &records, &old_tops);
        if let (Some(vm), Some(reader)) = (&self.vm_state, reader.as_mut()) {
            if let Err(e) = vm.load_stream(reader) {
                // The disks are the snapshot's now; the VM stays paused rather than run
                // memory that does not match them.
                committed?;
                return Err(Error::Hook(e));
            }
        }
        self.seal_left(&old_tops);
        let resumed = self.resume_after_revert(snapshot, was_running);
        committed?;
        resumed
    }

    /// The critical section of an internal revert; returns the tops left (in-place disks'
    /// are their sealed former handles).
    fn switch_internal(
        &self,
        snapshot: &SnapshotInfo,
        copies: &[Option<Arc<dyn BlockDevice>>],
    ) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let disks: Vec<&LiveDisk> = self.disks.iter().map(|d| &**d).collect();
        let mut guards = LiveDisk::quiesce_all(&disks);
        let mut old = Vec::new();
        for (guard, copy) in guards.iter_mut().zip(copies) {
            match copy {
                Some(top) => old.push(guard.replace_top(top.clone())?),
                None => {
                    let mut image = reopen_top(guard)?;
                    let applied = image.apply_snapshot(&snapshot.name);
                    // Installed even when applying failed: the former handle is sealed.
                    guard.replace_top(Arc::new(image))?;
                    applied?;
                }
            }
        }
        Ok(old)
    }
}
