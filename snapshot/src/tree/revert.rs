//! Reverting to a snapshot: a fresh overlay on an external snapshot's frozen images, or an
//! internal snapshot applied in place or to a copy of its image.

use super::internal::{open_alone, reopen_top, VmStateReader};
use super::*;

/// Copies the qcow2 image `source` to `path` and applies its internal snapshot `name` there:
/// a plain image (no internal snapshots of its own) on `source`'s backing chain that reads
/// as the snapshot did, while `source` and its snapshot stay as they are.
fn copy_with_snapshot_applied(source: &Path, path: &Path, name: &str) -> Result<Qcow2Image> {
    std::fs::copy(source, path).map_err(|e| {
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
        if snapshot.kind == SnapshotKind::Internal {
            self.revert_internal(&snapshot)?;
        } else {
            self.revert_external(&snapshot)?;
        }
        self.meta.lock().current = Some(name.to_string());
        self.save()?;
        self.compact()?;
        tracing::info!(snapshot = name, "reverted");
        Ok(snapshot)
    }

    fn revert_external(&self, snapshot: &SnapshotInfo) -> Result<()> {
        let mut created = Created::default();
        let tops = self.prepare_revert_overlays(snapshot, &mut created.paths)?;
        let claims = self.claim_all("snapshot-revert")?;
        let was_running = self.pause()?;
        let old_tops = match self.switch(&tops) {
            Ok(old) => old,
            Err(e) => {
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
                    self.resume_if(was_running)?;
                } else {
                    // Some disk stays on the snapshot's overlay: keep the files it uses.
                    created.keep = true;
                    self.record_created(&created.paths, snapshot);
                }
                return Err(Error::Hook(e));
            }
        }
        drop(claims);
        created.keep = true;
        self.record_created(&created.paths, snapshot);
        self.seal_left(&old_tops);
        self.resume_after_revert(snapshot, was_running)
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

    /// Records the overlays a revert made on the snapshot's frozen images.
    fn record_created(&self, paths: &[PathBuf], snapshot: &SnapshotInfo) {
        let mut meta = self.meta.lock();
        for (path, d) in paths.iter().zip(&snapshot.disks) {
            meta.images.push(ImageRecord {
                path: abs(path),
                backing: Some(d.image.clone()),
                owned: true,
            });
        }
    }

    /// Creates and opens a fresh overlay on each of the snapshot's frozen images.
    fn prepare_revert_overlays(
        &self,
        snapshot: &SnapshotInfo,
        created: &mut Vec<PathBuf>,
    ) -> Result<Vec<Arc<dyn BlockDevice>>> {
        let mut tops = Vec::new();
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            let frozen = storage::open(
                &d.image,
                &OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                },
            )?;
            let path = self.fresh_path(&d.image, disk.name(), &snapshot.name, ".revert");
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
            storage::qcow2::create(&path, &options)?;
            let overlay =
                Qcow2Image::open_with(&path, false, &OpenOptions::default(), |_, _| Ok(frozen))?;
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
        // The image each copy copies, for the records.
        let mut sources: Vec<PathBuf> = Vec::new();
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            if abs(disk.top().path()) == d.image {
                copies.push(None);
                continue;
            }
            let path = self.fresh_path(&d.image, disk.name(), &snapshot.name, ".copy");
            created.paths.push(path.clone());
            sources.push(d.image.clone());
            copies.push(Some(Arc::new(copy_with_snapshot_applied(
                &d.image,
                &path,
                &snapshot.name,
            )?)));
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
        let claims = self.claim_all("snapshot-revert")?;
        let was_running = self.pause()?;
        let switched = self.switch_internal(snapshot, &copies);
        drop(claims);
        // From here some disk may use a copy: the copies are the tree's to manage.
        created.keep = true;
        {
            let mut meta = self.meta.lock();
            for (path, source) in created.paths.iter().zip(&sources) {
                let backing = meta
                    .images
                    .iter()
                    .find(|r| &r.path == source)
                    .and_then(|r| r.backing.clone());
                meta.images.push(ImageRecord {
                    path: abs(path),
                    backing,
                    owned: true,
                });
            }
        }
        let old_tops = match switched {
            Ok(old) => old,
            Err(e) => {
                self.resume_if(was_running)?;
                return Err(e);
            }
        };
        if let (Some(vm), Some(reader)) = (&self.vm_state, reader.as_mut()) {
            if let Err(e) = vm.load_stream(reader) {
                // The disks are the snapshot's now; the VM stays paused rather than run
                // memory that does not match them.
                return Err(Error::Hook(e));
            }
        }
        self.seal_left(&old_tops);
        self.resume_after_revert(snapshot, was_running)
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
