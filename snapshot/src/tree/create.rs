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
        if options.internal {
            self.create_internal(&mut info)?;
        } else {
            self.create_external(&mut info)?;
        }
        {
            let mut meta = self.meta.lock();
            meta.snapshots.push(info.clone());
            meta.current = Some(name.to_string());
        }
        self.save()?;
        tracing::info!(snapshot = name, kind = %info.kind, "snapshot created");
        Ok(info)
    }

    fn create_external(&self, info: &mut SnapshotInfo) -> Result<()> {
        info.kind = if info.memory {
            SnapshotKind::ExternalWithMemory
        } else {
            SnapshotKind::ExternalDiskOnly
        };
        let overlays: Vec<DiskOverlay> = self
            .disks
            .iter()
            .map(|d| {
                DiskOverlay::new(
                    d,
                    self.fresh_path(&abs(d.top().path()), d.name(), &info.name, ""),
                )
            })
            .collect();
        let checkpoint = info.memory.then(|| self.checkpoint_dir(&info.name));
        if let Some(dir) = &checkpoint {
            if dir.exists() {
                return Err(Error::Exists { path: dir.clone() });
            }
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::InvalidArgument(format!("{}: {e}", parent.display())))?;
            }
        }
        let was_running = self.pause_for(info)?;
        let vm = self.vm_state.clone();
        let result = external_snapshot_with(&overlays, || match (&vm, &checkpoint) {
            (Some(vm), Some(dir)) => vm.save_checkpoint(dir),
            _ => Ok(()),
        });
        let resumed = self.resume_if(was_running);
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                if let Some(dir) = &checkpoint {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        {
            let mut meta = self.meta.lock();
            for (overlay, old) in overlays.iter().zip(&report.old_tops) {
                let old = abs(old);
                meta.images.push(ImageRecord {
                    path: abs(&overlay.overlay),
                    backing: Some(old.clone()),
                    owned: true,
                });
                info.disks.push(DiskImage {
                    disk: overlay.disk.name().to_string(),
                    image: old,
                });
            }
        }
        info.checkpoint = checkpoint;
        if let Err(e) = resumed {
            // The snapshot exists: record it before reporting that the VM stayed paused.
            {
                let mut meta = self.meta.lock();
                meta.snapshots.push(info.clone());
                meta.current = Some(info.name.clone());
            }
            self.save()?;
            return Err(e);
        }
        Ok(())
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
