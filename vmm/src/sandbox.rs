//! A running VM with its [`Control`]: the entry point for programs that embed the VMM.
//!
//! [`Sandbox::start`] boots a VM, opens its snapshot tree over the writable disks and builds
//! the control handle; [`Sandbox::restore`] does the same from a checkpoint. The metadata of
//! the tree lives in `snapvmm-snapshots.json` beside the first writable disk's image unless
//! [`SandboxOptions::snapshot_metadata`] names another file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snapshot::tree::SnapshotTree;
use snapshot::vm_state::VmState;

use crate::builder::Vmm;
use crate::config::VmConfig;
use crate::confine::Confinement;
use crate::control::{Control, Disk, VmMachine};
use crate::error::{Error, Result};
use crate::exit::{ExitHandle, ExitReason};

/// The tree's metadata file, beside the first writable disk, unless told otherwise.
pub const DEFAULT_METADATA: &str = "snapvmm-snapshots.json";

/// How long [`Sandbox::wait`] waits for each block job it cancels.
const JOB_CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a [`Sandbox`] is set up beyond the VM's own configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxOptions {
    /// The snapshot tree's metadata file [default: [`DEFAULT_METADATA`] beside the first
    /// writable disk's image].
    pub snapshot_metadata: Option<PathBuf>,
    /// The guest agent quiesced snapshots freeze the guest through (`--guest-agent`).
    pub guest_agent: Option<crate::agent::AgentEndpoint>,
    /// Seccomp confinement, applied by [`Sandbox::start`] and [`Sandbox::restore`] before the
    /// VM is built ([`crate::confine::confine_process`]): the process is configured and the
    /// calling thread becomes the confined control thread
    /// ([`crate::confine::ThreadKind::Main`]) for the rest of its life; every thread the VMM
    /// starts confines itself by kind. `None` leaves the process as it is (an embedder that
    /// confines itself, or none).
    pub confinement: Option<Confinement>,
}

/// A running VM and its [`Control`].
#[derive(Debug)]
pub struct Sandbox {
    vmm: Vmm,
    control: Arc<Control>,
    warnings: Vec<String>,
}

impl Sandbox {
    /// Boots a VM as `config` describes and takes control of it.
    ///
    /// The vCPUs start held and run only once the snapshot tree has opened: a tree that
    /// refuses a disk (an image a snapshot froze, given as writable) stops the VM before the
    /// guest could write a byte into it.
    pub fn start(config: &VmConfig, options: &SandboxOptions) -> Result<Self> {
        confine(options)?;
        let sandbox = Sandbox::with_vmm(Vmm::start_paused(config)?, options)?;
        sandbox.vmm.pause_gate().resume();
        Ok(sandbox)
    }

    /// Starts a VM from the checkpoint in `dir` (a full checkpoint or the top of a diff
    /// chain), its console going to `serial`, and takes control of it. With `paused` its
    /// vCPUs wait for [`Control::resume`].
    pub fn restore(
        dir: &Path,
        serial: Box<dyn Write + Send>,
        paused: bool,
        options: &SandboxOptions,
    ) -> Result<Self> {
        Sandbox::restore_with(dir, serial, paused, options, Default::default())
    }

    /// As [`Sandbox::restore`], with memory and disks from where `restore` says (a clone's
    /// disks on its own overlays, a lazy restore from a snapshot store).
    pub fn restore_with(
        dir: &Path,
        serial: Box<dyn Write + Send>,
        paused: bool,
        options: &SandboxOptions,
        restore: crate::checkpoint::RestoreOptions,
    ) -> Result<Self> {
        confine(options)?;
        // Held until the tree has opened, as in `start`: a refused disk never sees a write.
        let sandbox = Sandbox::with_vmm(Vmm::restore_with(dir, serial, true, restore)?, options)?;
        if !paused {
            sandbox.vmm.pause_gate().resume();
        }
        Ok(sandbox)
    }

    /// Takes control of an already running `vmm`. On error the VM is stopped.
    pub fn with_vmm(vmm: Vmm, options: &SandboxOptions) -> Result<Self> {
        let tree = match open_snapshot_tree(&vmm, options.snapshot_metadata.as_deref()) {
            Ok(tree) => tree,
            Err(message) => {
                let _ = vmm.stop();
                return Err(Error::Config(format!("snapshot metadata: {message}")));
            }
        };
        let warnings = tree
            .as_ref()
            .map(|t| t.problems().to_vec())
            .unwrap_or_default();
        let disks = vmm.disks().iter().map(Disk::from).collect();
        let machine = Arc::new(VmMachine::new(&vmm));
        let mut control = Control::new(machine, disks, tree);
        if let Some(endpoint) = &options.guest_agent {
            let agent = crate::agent::GuestAgent::new(endpoint.clone());
            control = control.with_guest_agent(Arc::new(agent));
        }
        let control = Arc::new(control);
        Ok(Sandbox {
            vmm,
            control,
            warnings,
        })
    }

    /// The control handle; clone it to use from other threads.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// What was wrong with the snapshot metadata's files when it was opened (missing
    /// images, a disk opened on another image than the one last recorded), for the caller
    /// to report. The tree still opened: the remaining snapshots can be used or deleted.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The VM.
    pub fn vmm(&self) -> &Vmm {
        &self.vmm
    }

    /// Signals and waits for the VM's end (from a guest reset, a shutdown request, ...).
    pub fn exit_handle(&self) -> ExitHandle {
        self.vmm.exit_handle()
    }

    /// Waits until the VM is asked to stop, cancels the block jobs still running (each
    /// leaves a valid chain), then waits for the VM to end and its disks to be flushed.
    pub fn wait(self) -> Result<ExitReason> {
        self.vmm.exit_handle().wait();
        self.control.cancel_jobs(JOB_CANCEL_TIMEOUT);
        self.vmm.wait()
    }

    /// Stops the VM now: block jobs are cancelled first, then the VM ends and its disks are
    /// flushed.
    pub fn stop(self) -> Result<ExitReason> {
        self.vmm.exit_handle().request(ExitReason::Stopped);
        self.wait()
    }
}

/// Applies `options.confinement` to the process and the calling thread.
fn confine(options: &SandboxOptions) -> Result<()> {
    let Some(confinement) = options.confinement else {
        return Ok(());
    };
    crate::confine::confine_process(confinement)
        .map_err(|e| Error::Config(format!("confinement: {e}")))
}

/// Opens the snapshot tree over `vmm`'s writable disks (none without one): metadata in
/// `metadata`, or [`DEFAULT_METADATA`] beside the first writable disk's image.
fn open_snapshot_tree(
    vmm: &Vmm,
    metadata: Option<&Path>,
) -> std::result::Result<Option<Arc<SnapshotTree>>, String> {
    let disks: Vec<_> = vmm
        .disks()
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.disk.clone())
        .collect();
    let Some(first) = disks.first() else {
        return Ok(None);
    };
    let path = match metadata {
        Some(path) => path.to_path_buf(),
        None => first.top().path().with_file_name(DEFAULT_METADATA),
    };
    // The VM's memory, vCPU and device state, for snapshots with memory.
    let vm_state: Option<Arc<dyn VmState>> = Some(vmm.checkpointer());
    let tree = SnapshotTree::open(&path, disks, vm_state).map_err(|e| e.to_string())?;
    Ok(Some(Arc::new(tree)))
}
