//! The typed control layer: one handle, [`Control`], over a machine, its disks, its snapshot
//! tree and its block jobs, with a method for everything the REST API can do. No transport:
//! a program embedding the VMM calls it directly, and the `snapvmm-api` crate maps HTTP onto
//! it one route per method.
//!
//! - [`types`]: what the methods take and answer (serde types, the API's JSON bodies);
//! - [`ControlError`]: why a call failed, as kinds (invalid, not found, conflict,
//!   unsupported, failed) rather than transport codes;
//! - [`Machine`]: what is controlled besides the disks; [`VmMachine`] is a running VM, and
//!   the vhost-user-blk daemon has its own;
//! - [`Disk`]: a disk under control; block jobs, one per disk, and disk-only snapshots of a
//!   disk set are kept here.
//!
//! [`crate::Sandbox`] starts a VM with its `Control`, which is the usual way to get one.
//!
//! ```no_run
//! use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
//! use vmm::control::types::TreeSnapshotCreate;
//! use vmm::{Sandbox, SandboxOptions};
//! let mut config = VmConfig::new(BootSource::MicroGuest { workload: Workload::Counter, seed: 1 });
//! config.disks.push(DiskConfig::new("disk.qcow2"));
//! let sandbox = Sandbox::start(&config, &SandboxOptions::default())?;
//! let control = sandbox.control();
//! control.snapshot_create(&TreeSnapshotCreate { name: "s1".into(), ..Default::default() })?;
//! control.snapshot_revert("s1")?;
//! control.shutdown()?;
//! sandbox.wait()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod clone;
mod disk;
mod disk_snapshot;
mod error;
pub mod export;
mod jobs;
mod machine;
mod quiesce;
pub mod types;
mod vm;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use snapshot::tree::{DeleteOptions, RunState, SnapshotTree, TakeOptions};
use snapshot::{Job, JobStatus};

pub use disk::Disk;
pub use error::{ControlError, Result};
pub use machine::Machine;
pub use vm::VmMachine;

use crate::agent::GuestAgent;
use jobs::BlockJobs;
use quiesce::QuiesceRequest;
use types::{
    AgentStatus, CheckpointReport, CheckpointRequest, CloneDestroyRequest, CloneInfo, CloneRecord,
    CloneRequest, CommitRequest, DiskInfo, ForkRequest, ForkResult, JobInfo, QuiesceReport,
    RevertRequest, RevertResult, SnapshotCreate, SnapshotDeleteRequest, SnapshotDeleteResult,
    SnapshotInfo, SnapshotPush, SnapshotPushResult, SnapshotResult, StreamRequest,
    TreeSnapshotCreate, VmInfo, VmState,
};

/// A machine under control: its life, its disks, its snapshot tree and its block jobs.
///
/// Every method may be called from any thread; methods that change disks (snapshots, job
/// starts, reverts) block for as long as that takes, so call them off latency-sensitive
/// threads.
pub struct Control {
    machine: Arc<dyn Machine>,
    disks: Vec<Disk>,
    tree: Option<Arc<SnapshotTree>>,
    jobs: BlockJobs,
    /// The guest agent that quiesces snapshots, when one is configured.
    agent: Option<Arc<GuestAgent>>,
    /// The last snapshot asked to quiesce.
    last_quiesce: parking_lot::Mutex<Option<QuiesceReport>>,
    /// How clones and fork children are started.
    launcher: parking_lot::Mutex<clone::CloneLauncher>,
    /// What [`Control::snapshot_push`] uploads with, once installed.
    exporter: parking_lot::RwLock<Option<Arc<dyn export::SnapshotExporter>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("disks", &self.disks)
            .field("tree", &self.tree)
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Control of `machine` and its `disks` (in device order), with its snapshot `tree` if
    /// it keeps one (the `snapshot_*` methods answer [`ControlError::Unsupported`] without).
    /// The tree learns from `machine` whether it runs, for the snapshots it takes.
    pub fn new(
        machine: Arc<dyn Machine>,
        disks: Vec<Disk>,
        tree: Option<Arc<SnapshotTree>>,
    ) -> Self {
        if let Some(tree) = &tree {
            let probe = machine.clone();
            tree.set_state_probe(Arc::new(move || match probe.state() {
                VmState::Paused => RunState::Paused,
                _ => RunState::Running,
            }));
        }
        Control {
            machine,
            disks,
            tree,
            jobs: BlockJobs::default(),
            agent: None,
            last_quiesce: parking_lot::Mutex::new(None),
            launcher: parking_lot::Mutex::new(clone::CloneLauncher::default()),
            exporter: parking_lot::RwLock::new(None),
        }
    }

    /// Installs what [`Control::snapshot_push`] uploads with (the `snapvmm` binary installs
    /// its snapshot-store client).
    pub fn set_exporter(&self, exporter: Arc<dyn export::SnapshotExporter>) {
        *self.exporter.write() = Some(exporter);
    }

    /// This control with `agent` as the guest's agent, which freezes its filesystems for
    /// snapshots asked to quiesce.
    pub fn with_guest_agent(mut self, agent: Arc<GuestAgent>) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The guest agent as it answers now (`guest-fsfreeze-status`), with the last quiesced
    /// snapshot's report.
    pub fn agent_status(&self) -> Result<AgentStatus> {
        let agent = self.agent.as_deref().ok_or_else(|| {
            ControlError::Unsupported("no guest agent is configured (--guest-agent)".into())
        })?;
        let status = agent
            .status()
            .map_err(|f| quiesce::agent_error(agent, "guest-fsfreeze-status", f))?;
        Ok(AgentStatus {
            endpoint: agent.endpoint().to_string(),
            fsfreeze: match status {
                crate::agent::FreezeStatus::Thawed => "thawed",
                crate::agent::FreezeStatus::Frozen => "frozen",
            }
            .to_string(),
            last_quiesce: self.last_quiesce.lock().clone(),
        })
    }

    /// Runs `take` quiesced as asked, keeping the report for [`Control::agent_status`].
    fn quiesced<T>(
        &self,
        request: QuiesceRequest<'_>,
        take: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<u64>)> {
        let (value, report) = quiesce::around(self.agent.as_deref(), request, take)?;
        let frozen_us = report.as_ref().and_then(|r| r.frozen_us);
        if report.is_some() {
            *self.last_quiesce.lock() = report;
        }
        Ok((value, frozen_us))
    }

    /// The machine's state and shape.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.machine.state(),
            vcpus: self.machine.vcpus(),
            memory_mib: self.machine.memory_mib(),
            disks: self.disks.len(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Holds the guest's vCPUs.
    pub fn pause(&self) -> Result<()> {
        self.machine.pause()
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) -> Result<()> {
        self.machine.resume()
    }

    /// Asks the machine to stop.
    pub fn shutdown(&self) -> Result<()> {
        self.machine.shutdown()
    }

    /// The disks, in device order, with their live handles (for programs that do I/O on
    /// them or snapshot them with the `snapshot` crate directly).
    pub fn disk_handles(&self) -> &[Disk] {
        &self.disks
    }

    /// The disk named `name`.
    fn find_disk(&self, name: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| ControlError::NotFound(format!("no disk named {name:?}")))
    }

    /// Every disk, in device order (virsh `domblklist`).
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.disks
            .iter()
            .map(|d| d.info(self.jobs.running(&d.name)))
            .collect()
    }

    /// The disk named `name`.
    pub fn disk(&self, name: &str) -> Result<DiskInfo> {
        let disk = self.find_disk(name)?;
        Ok(disk.info(self.jobs.running(name)))
    }

    /// An external disk-only snapshot of a set of disks, outside the snapshot tree: each
    /// disk moves onto a new overlay (all at once when `atomic`), with the guest's
    /// filesystems frozen around it when asked to `quiesce`.
    pub fn disk_snapshot(&self, request: &SnapshotCreate) -> Result<SnapshotResult> {
        snapshot::tree::validate_name(&request.name)?;
        let quiesce = QuiesceRequest {
            snapshot: &request.name,
            quiesce: request.quiesce,
            best_effort: request.quiesce_best_effort,
        };
        let (mut result, frozen_us) =
            self.quiesced(quiesce, || disk_snapshot::take(&self.disks, request))?;
        result.frozen_us = frozen_us;
        Ok(result)
    }

    /// Starts pulling `disk`'s backing chain into its active layer (virsh `blockpull`).
    pub fn stream(&self, disk: &str, request: &StreamRequest) -> Result<JobInfo> {
        let disk = self.find_disk(disk)?;
        self.jobs.start(disk, || jobs::start_stream(disk, request))
    }

    /// Starts committing layers of `disk` into a layer below them (virsh `blockcommit`).
    /// An image a snapshot of the tree froze is never written into: that is a
    /// [`ControlError::Conflict`] naming the snapshot.
    pub fn commit(&self, disk: &str, request: &CommitRequest) -> Result<JobInfo> {
        jobs::check_commit(request)?;
        let disk = self.find_disk(disk)?;
        let snapshots = self.tree.as_ref().map(|t| t.list()).unwrap_or_default();
        self.jobs
            .start(disk, || jobs::start_commit(disk, request, &snapshots))
    }

    /// The last block job started on `disk`.
    pub fn job(&self, disk: &str) -> Result<JobInfo> {
        Ok(JobInfo::from(self.disk_job(disk)?.info()))
    }

    fn disk_job(&self, disk: &str) -> Result<Job> {
        self.find_disk(disk)?;
        self.jobs.get(disk)
    }

    /// Pauses `disk`'s job.
    pub fn job_pause(&self, disk: &str) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        job.pause()?;
        Ok(JobInfo::from(job.info()))
    }

    /// Resumes `disk`'s paused job.
    pub fn job_resume(&self, disk: &str) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        job.resume()?;
        Ok(JobInfo::from(job.info()))
    }

    /// Cancels `disk`'s job; the chain stays as it was before the job.
    pub fn job_cancel(&self, disk: &str) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        if job.status() == JobStatus::Concluded {
            return Err(ControlError::Conflict(format!(
                "job {} has already concluded",
                job.id()
            )));
        }
        job.cancel();
        Ok(JobInfo::from(job.info()))
    }

    /// Completes `disk`'s ready active commit: the disk pivots onto the base.
    pub fn job_complete(&self, disk: &str) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        job.complete()?;
        Ok(JobInfo::from(job.info()))
    }

    /// Sets `disk`'s job's speed limit in bytes per second (0: unlimited).
    pub fn job_set_speed(&self, disk: &str, speed: u64) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        job.set_speed(speed);
        Ok(JobInfo::from(job.info()))
    }

    /// Waits up to `timeout` until `disk`'s job reaches a status `until` accepts; returns
    /// the job as it then is (check its status: the wait may have timed out).
    pub fn job_wait(
        &self,
        disk: &str,
        timeout: Duration,
        until: impl Fn(JobStatus) -> bool,
    ) -> Result<JobInfo> {
        let job = self.disk_job(disk)?;
        job.wait_for(timeout, until);
        Ok(JobInfo::from(job.info()))
    }

    /// Saves the machine's memory, vCPU and device state into a checkpoint directory.
    pub fn checkpoint_save(&self, request: &CheckpointRequest) -> Result<CheckpointReport> {
        self.machine.checkpoint_save(request)
    }

    /// Returns the machine to a checkpoint, in place.
    pub fn checkpoint_revert(&self, request: &RevertRequest) -> Result<RevertResult> {
        self.machine.checkpoint_revert(request)
    }

    fn tree(&self) -> Result<&SnapshotTree> {
        self.tree
            .as_deref()
            .ok_or_else(|| ControlError::Unsupported("this VM keeps no snapshot tree".into()))
    }

    /// The snapshot tree, when the machine keeps one.
    pub fn snapshot_tree(&self) -> Option<&Arc<SnapshotTree>> {
        self.tree.as_ref()
    }

    /// Takes a snapshot of every writable disk into the tree (virsh `snapshot-create-as`):
    /// external with memory unless `disk_only` or `internal` say otherwise. With `quiesce`
    /// the guest's filesystems are frozen around it (the frozen time is in
    /// [`Control::agent_status`]).
    pub fn snapshot_create(&self, request: &TreeSnapshotCreate) -> Result<SnapshotInfo> {
        snapshot::tree::validate_name(&request.name)?;
        let tree = self.tree()?;
        if request.quiesce && !request.disk_only {
            // The memory image would hold frozen filesystems, and a revert to it a guest
            // that nothing thaws; memory needs no quiescing anyway (it holds the caches).
            return Err(ControlError::InvalidArgument(format!(
                "snapshot {}: quiesce needs disk_only",
                request.name
            )));
        }
        let quiesce = QuiesceRequest {
            snapshot: &request.name,
            quiesce: request.quiesce,
            best_effort: request.quiesce_best_effort,
        };
        let (info, _) = self.quiesced(quiesce, || {
            Ok(tree.create(
                &request.name,
                &TakeOptions {
                    description: request.description.clone(),
                    disk_only: request.disk_only,
                    internal: request.internal,
                },
            )?)
        })?;
        Ok(info)
    }

    /// Every snapshot of the tree, in creation order.
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.tree()?.list())
    }

    /// The snapshot named `name`.
    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        Ok(self.tree()?.get(name)?)
    }

    /// Reverts the machine (disks, and memory when the snapshot holds it) to `name`.
    pub fn snapshot_revert(&self, name: &str) -> Result<SnapshotInfo> {
        Ok(self.tree()?.revert(name)?)
    }

    /// Deletes snapshot `name` (and its descendants when asked); returns what was deleted,
    /// children before parents.
    pub fn snapshot_delete(
        &self,
        name: &str,
        request: &SnapshotDeleteRequest,
    ) -> Result<SnapshotDeleteResult> {
        let tree = self.tree()?;
        if !request.metadata {
            let snapshots = tree.list();
            let mut names = vec![name.to_string()];
            if request.children {
                names.extend(snapshots.iter().map(|s| s.name.clone()));
            }
            let registry = clone::Registry::beside(tree.metadata_path());
            for candidate in &names {
                clone::check_delete(&registry, &snapshots, candidate)?;
            }
        }
        let deleted = tree.delete(
            name,
            &DeleteOptions {
                children: request.children,
                metadata_only: request.metadata,
            },
        )?;
        Ok(SnapshotDeleteResult { deleted })
    }

    /// The current snapshot: the last taken or reverted to.
    pub fn snapshot_current(&self) -> Result<SnapshotInfo> {
        self.tree()?
            .current()
            .ok_or_else(|| ControlError::NotFound("the VM has no current snapshot".into()))
    }

    /// Uploads snapshot `name` (its memory and frozen disk images) into a snapshot store,
    /// through the installed exporter; the VM runs on meanwhile.
    pub fn snapshot_push(&self, name: &str, request: &SnapshotPush) -> Result<SnapshotPushResult> {
        let tree = self.tree()?;
        let info = tree.get(name)?;
        let exporter = self.exporter.read().clone().ok_or_else(|| {
            ControlError::Unsupported("this VM has no snapshot store client".into())
        })?;
        if request.store.is_empty() {
            return Err(ControlError::InvalidArgument(
                "store: empty location".into(),
            ));
        }
        exporter
            .push(&info, tree.metadata_path(), request)
            .map_err(ControlError::Failed)
    }

    /// The merge jobs a snapshot delete is running.
    pub fn snapshot_jobs(&self) -> Result<Vec<JobInfo>> {
        Ok(self.tree()?.jobs().into_iter().map(JobInfo::from).collect())
    }

    /// Sets how clones and fork children are started (by default this process's own
    /// executable, which is right for the `snapvmm` binary; an embedding program names the
    /// `snapvmm` it ships).
    pub fn set_clone_launcher(&self, launcher: clone::CloneLauncher) {
        *self.launcher.lock() = launcher;
    }

    /// The clone registry of this machine's snapshot tree.
    fn clone_registry(&self) -> Result<clone::Registry> {
        Ok(clone::Registry::beside(self.tree()?.metadata_path()))
    }

    /// Starts `request.count` VMs from snapshot `name` (external, with memory), each in its
    /// own process on its own overlays in `request.dir/clone-K/`; returns them once each
    /// serves its API.
    pub fn snapshot_clone(&self, name: &str, request: &CloneRequest) -> Result<Vec<CloneInfo>> {
        clone::check_request(request.count, &request.dir)?;
        let info = self.tree()?.get(name)?;
        let source = clone::CloneSource::of_snapshot(&info)?;
        let launcher = self.launcher.lock().clone();
        clone::spawn(&source, request, &launcher, &self.clone_registry()?)
    }

    /// The clones of snapshot `name` whose directories still exist.
    pub fn snapshot_clones(&self, name: &str) -> Result<Vec<CloneRecord>> {
        self.tree()?.get(name)?;
        clone::list(&self.clone_registry()?, name)
    }

    /// Live fork: the running VM moves onto fresh overlays in the final stop of a live
    /// checkpoint, and `request.count` children start from that instant in `request.dir`.
    pub fn fork(&self, request: &ForkRequest) -> Result<ForkResult> {
        let registry = match &self.tree {
            Some(tree) => clone::Registry::beside(tree.metadata_path()),
            None => clone::Registry::at(request.dir.join(clone::FORK_REGISTRY)),
        };
        let launcher = self.launcher.lock().clone();
        clone::fork(&*self.machine, &self.disks, request, &launcher, &registry)
    }

    /// Stops the clone (or fork child) in `request.dir` and removes its files.
    pub fn clone_destroy(&self, request: &CloneDestroyRequest) -> Result<CloneRecord> {
        let mut registries = Vec::new();
        if let Some(tree) = &self.tree {
            registries.push(clone::Registry::beside(tree.metadata_path()));
        }
        if let Some(parent) = request.dir.parent() {
            registries.push(clone::Registry::at(parent.join(clone::FORK_REGISTRY)));
        }
        for registry in &registries {
            if registry.find(&request.dir)?.is_some() {
                return clone::destroy(registry, request);
            }
        }
        Err(ControlError::NotFound(format!(
            "no clone recorded in {}",
            request.dir.display()
        )))
    }

    /// Cancels every block job still running (the tree's merges too) and waits up to
    /// `timeout` for each, so none is cut off mid-copy when the machine goes away; each
    /// leaves a valid chain.
    pub fn cancel_jobs(&self, timeout: Duration) {
        if let Some(tree) = &self.tree {
            tree.cancel_jobs(timeout);
        }
        self.jobs.cancel_all(timeout);
    }
}
