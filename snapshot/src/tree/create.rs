//! Taking snapshots: external (disk-only or with memory) and internal.

use super::internal::{reopen_top, writable_qcow2, VmStateWriter};
use super::*;
use crate::live_snapshot::{external_snapshot_with, DiskOverlay};

impl SnapshotTree {
    /// Takes snapshot `name` of every disk and makes it current.
    pub fn create(&self, name: &str, options: &TakeOptions) -> Result<SnapshotInfo> {
        validate_name(name)?;
        let _op = self.op.lock();
        if self.get(name).is_ok() {
            return Err(Error::SnapshotExists { name: name.into() });
        }
        self.register_live_chains();
        let memory = !options.disk_only;
        if memory && self.vm_state.is_none() {
            return Err(Error::InvalidArgument(
                "this VM cannot save its memory: add --disk-only (disk_only) for a disk-only snapshot".into(),
            ));
        }
        let mut info = SnapshotInfo {
            name: name.to_string(),
            description: options.description.clone(),
            created: now(),
            parent: self.meta.lock().current.clone(),
            state: RunState::Running,
            kind: SnapshotKind::Internal,
            memory,
            disks: Vec::new(),
            checkpoint: None,
            vm_state_size: 0,
        };
        if !options.internal {
            let created = self.create_external(info);
            self.clear_failed_intent();
            return created;
        }
        self.create_internal(&mut info)?;
        let before = {
            let mut meta = self.meta.lock();
            let before = meta.clone();
            meta.snapshots.push(info.clone());
            meta.current = Some(name.to_string());
            before
        };
        if let Err(e) = self.save() {
            // Not recorded, so not created: an error must leave no snapshot behind.
            self.undo_internal_create(&info, before);
            return Err(e);
        }
        tracing::info!(snapshot = name, kind = %info.kind, "snapshot created");
        Ok(info)
    }

    /// Takes back an internal snapshot whose metadata could not be written: the tree as it
    /// was, the snapshot deleted from the images, and the metadata written again (a failed
    /// write may have renamed the new file into place before its directory sync failed).
    /// What cannot be undone is logged; the next open reports an internal snapshot the
    /// metadata does not name, or a listed one that is missing, never silently.
    fn undo_internal_create(&self, info: &SnapshotInfo, before: TreeFile) {
        let deleted = self.claim_all("snapshot").and_then(|claims| {
            let deleted = self.delete_internal(info);
            drop(claims);
            deleted
        });
        if let Err(e) = deleted {
            tracing::error!(snapshot = %info.name, error = %e,
                "rolling back an internal snapshot whose metadata write failed failed");
        }
        self.restore_metadata(before);
    }

    /// Refuses a snapshot that would make some disk's chain deeper than storage opens.
    fn check_depth(&self) -> Result<()> {
        for disk in &self.disks {
            let layers = chain::layers(&disk.top()).len();
            if layers >= MAX_CHAIN_LAYERS {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: its chain has {layers} layers, and an external snapshot adds one: \
                     more than the {MAX_CHAIN_LAYERS} layers (a backing chain {} deep, \
                     storage::DEFAULT_MAX_CHAIN_DEPTH) that can be opened again; delete \
                     snapshots (which merges their layers) or take an internal snapshot",
                    disk.name(),
                    storage::DEFAULT_MAX_CHAIN_DEPTH
                )));
            }
        }
        Ok(())
    }

    fn create_external(&self, mut info: SnapshotInfo) -> Result<SnapshotInfo> {
        info.kind = if info.memory {
            SnapshotKind::ExternalWithMemory
        } else {
            SnapshotKind::ExternalDiskOnly
        };
        self.check_depth()?;
        let frozen: Vec<PathBuf> = self.disks.iter().map(|d| abs(d.top().path())).collect();
        let overlays: Vec<DiskOverlay> = self
            .disks
            .iter()
            .zip(&frozen)
            .map(|(d, top)| DiskOverlay::new(d, self.fresh_path(top, d.name(), &info.name, "")))
            .collect();
        let live: Vec<PathBuf> = overlays.iter().map(|o| abs(&o.overlay)).collect();
        let checkpoint = info.memory.then(|| self.checkpoint_dir(&info.name));
        if let Some(dir) = &checkpoint {
            if dir.symlink_metadata().is_ok() {
                return Err(Error::Exists { path: dir.clone() });
            }
            self.make_checkpoints_dir(dir)?;
        }
        info.checkpoint = checkpoint.clone();
        info.disks = self
            .disks
            .iter()
            .zip(&frozen)
            .map(|(d, image)| DiskImage {
                disk: d.name().to_string(),
                image: image.clone(),
            })
            .collect();
        let records: Vec<ImageRecord> = live
            .iter()
            .zip(&frozen)
            .map(|(path, below)| ImageRecord {
                path: path.clone(),
                backing: Some(below.clone()),
                owned: true,
            })
            .collect();
        let was_running = self.pause_for(&mut info)?;
        let intent = Intent {
            op: IntentOp::Create,
            snapshot: info.name.clone(),
            files: live.clone(),
            fresh_overlays: true,
            info: Some(info.clone()),
            records: records.clone(),
            tops: live.clone(),
        };
        if let Err(e) = self.write_intent(intent) {
            self.resume_or_log(was_running);
            return Err(e);
        }
        let vm = self.vm_state.clone();
        let result = external_snapshot_with(&overlays, || match (&vm, &checkpoint) {
            (Some(vm), Some(dir)) => vm.save_checkpoint(dir),
            _ => Ok(()),
        });
        let late = match result {
            Ok(_) => None,
            Err(Error::AfterSwitch { cause, .. }) => Some(*cause),
            Err(e) => {
                // Nothing switched; the overlays are gone, and so goes the checkpoint.
                if let Some(dir) = &checkpoint {
                    recovery::remove_path(dir);
                }
                self.clear_intent();
                self.resume_or_log(was_running);
                return Err(e);
            }
        };
        // Past the point of no return: the snapshot exists. Committed before the vCPUs of a
        // snapshot with memory run again; a disk-only snapshot's guest may already write to
        // the overlays, which the intent names until this lands.
        if let Some(dir) = &checkpoint {
            if let Err(e) = crate::checkpoint::create_private_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "making a checkpoint owner-only failed");
            }
        }
        {
            let mut meta = self.meta.lock();
            meta.images.retain(|r| !live.contains(&r.path));
            meta.images.extend(records);
            meta.snapshots.push(info.clone());
            meta.current = Some(info.name.clone());
            meta.pending = None;
        }
        let saved = self.save();
        let resumed = self.resume_if(was_running);
        let after = |cause: Error| Error::AfterSwitch {
            operation: format!("snapshot {:?}", info.name),
            live: live.clone(),
            left: frozen.clone(),
            cause: Box::new(cause),
        };
        if let Err(e) = saved {
            return Err(after(e));
        }
        if let Some(cause) = late {
            return Err(after(cause));
        }
        resumed?;
        tracing::info!(snapshot = %info.name, kind = %info.kind, "snapshot created");
        Ok(info)
    }

    /// Resumes the vCPUs after a failure, which is what gets reported.
    fn resume_or_log(&self, run: bool) {
        if let Err(e) = self.resume_if(run) {
            tracing::error!(error = %e, "resuming the vCPUs after a failed snapshot failed");
        }
    }

    /// Records the VM's state in `info` and, for a snapshot with memory, pauses the vCPUs
    /// (then the state is what they were in); returns whether to resume them afterwards.
    fn pause_for(&self, info: &mut SnapshotInfo) -> Result<bool> {
        info.state = self.probe_state();
        if !info.memory {
            return Ok(false);
        }
        let running = self.pause()?;
        info.state = match running {
            true => RunState::Running,
            false => RunState::Paused,
        };
        Ok(running)
    }

    fn create_internal(&self, info: &mut SnapshotInfo) -> Result<()> {
        info.kind = SnapshotKind::Internal;
        for disk in &self.disks {
            let top = disk.top();
            let image = writable_qcow2(&top, disk.name())?;
            if image.find_snapshot(&info.name).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: {} already has an internal snapshot {:?}",
                    disk.name(),
                    top.path().display(),
                    info.name
                )));
            }
        }
        let claims = self.claim_all("snapshot")?;
        let was_running = self.pause_for(info)?;
        let result = self.take_internal(info);
        drop(claims);
        let resumed = self.resume_if(was_running);
        result?;
        resumed
    }

    /// The critical section of an internal snapshot: every disk quiesced.
    fn take_internal(&self, info: &mut SnapshotInfo) -> Result<()> {
        let disks: Vec<&LiveDisk> = self.disks.iter().map(|d| &**d).collect();
        let mut guards = LiveDisk::quiesce_all(&disks);
        let mut reopened: Vec<Qcow2Image> = Vec::new();
        let mut failure = None;
        for guard in &guards {
            match reopen_top(guard) {
                Ok(image) => reopened.push(image),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut taken = 0;
        if failure.is_none() {
            for (index, image) in reopened.iter_mut().enumerate() {
                let mut state_size = 0;
                if index == 0 && info.memory {
                    if let Some(vm) = &self.vm_state {
                        let mut writer = VmStateWriter { image, position: 0 };
                        match vm.save_stream(&mut writer) {
                            Ok(n) => state_size = n.max(writer.position),
                            Err(e) => {
                                failure = Some(Error::Hook(e));
                                break;
                            }
                        }
                    }
                }
                match image.create_snapshot(&info.name, 0, state_size) {
                    Ok(_) => {
                        taken += 1;
                        if index == 0 {
                            info.vm_state_size = state_size;
                        }
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        break;
                    }
                }
            }
        }
        if failure.is_some() {
            for image in reopened.iter_mut().take(taken) {
                if let Err(e) = image.delete_snapshot(&info.name) {
                    tracing::error!(path = %image.file().path().display(), error = %e,
                        "rolling back an internal snapshot failed");
                }
            }
        }
        // The reopened handles replace the sealed ones whatever happened.
        let mut installed = Ok(());
        for (guard, image) in guards.iter_mut().zip(reopened) {
            let path = image.file().path().to_path_buf();
            if let Err(e) = guard.replace_top(Arc::new(image)) {
                installed = installed.and(Err(e));
            }
            info.disks.push(DiskImage {
                disk: guard.disk().name().to_string(),
                image: abs(&path),
            });
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(installed?)
    }
}
