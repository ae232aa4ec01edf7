//! Checkpoints of a running VM: memory, vCPUs, VM and devices, saved into a directory
//! ([`snapshot::checkpoint`] holds the file format) and loaded back, in place or in a new
//! process ([`crate::Vmm::restore`]).
//!
//! - **Full**: every page the guest touched (pagemap, plus the memory file the RAM maps, if
//!   any), zero pages left as holes.
//! - **Incremental** (`incremental`): only the pages changed since the last checkpoint this
//!   VM took or loaded (its *base*), from KVM's dirty log OR'ed with vm-memory's bitmap.
//! - **Live** (`live`): memory is copied while the guest runs, in rounds that recopy what the
//!   dirty log says changed, until little is left; then a short stop copies the rest and
//!   saves vCPUs and devices.
//!
//! Every save drains the virtio queues first (in-flight requests complete, their queues
//! come back to the transport with their ring positions) and restarts them afterwards with
//! a kick. A save is written into a private temporary directory and renamed into place once
//! durable; only then does it become the next diff's base, and a save that fails gives the
//! pages it took out of the dirty log back for the next diff.
//!
//! Layers, each module using only those listed after it:
//! - this module: [`Checkpointer`], the public entry points and the [`VmState`] the
//!   snapshot tree drives (pause, save or load a checkpoint directory or a stream, resume);
//! - `save`: paused, live and stream saves; `load`: reading a chain and loading it;
//! - `destination`: the temporary directory, the refusal to overwrite, the final rename;
//! - `capture`: capture, check and restore of the machine state through
//!   [`crate::persist::Persist`], pausing and quiescing; `tracking`: dirty pages and base.

mod capture;
mod destination;
mod load;
mod save;
mod tracking;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use snapshot::vm_state::{VmState, VmStateError};

use self::capture::VmHandle;
use self::destination::Staging;
use self::save::Saved;
use crate::error::{Error, Result};
use crate::machine::Machine;

pub(crate) use self::capture::RestoreTarget;
pub use self::capture::{DiskSnapshot, MachineState, VsockSnapshot};
pub(crate) use self::load::LoadedCheckpoint;
pub use self::load::{MemorySource, RestoreOptions};
pub use self::save::{CheckpointOptions, CheckpointReport};
pub(crate) use self::tracking::Tracking;

/// Saves and loads checkpoints of one running VM; get it from [`crate::Vmm::checkpointer`].
pub struct Checkpointer {
    vm: VmHandle,
    tracking: Mutex<Tracking>,
    /// One checkpoint operation at a time.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("tracking", &*self.tracking.lock())
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    pub(crate) fn new(machine: Arc<Machine>, tracking: Tracking) -> Self {
        Checkpointer {
            vm: VmHandle::new(machine),
            tracking: Mutex::new(tracking),
            busy: Mutex::new(()),
        }
    }

    /// Restarts devices [`VmState::pause_vcpus`] left quiesced; call before the vCPUs run
    /// again (the API's resume does). A no-op when nothing is held.
    pub fn release_devices(&self) -> Result<()> {
        self.vm.release_devices()
    }

    /// Takes a checkpoint into `dir`, pausing the VM as needed; a VM that was running runs
    /// again afterwards. `dir` must be absent or empty, or hold a checkpoint nothing depends
    /// on and `options.replace` be set; it appears only once the checkpoint is complete.
    pub fn checkpoint(&self, dir: &Path, options: CheckpointOptions) -> Result<CheckpointReport> {
        self.checkpoint_with(dir, options, &mut || Ok(()))
    }

    /// As [`Checkpointer::checkpoint`], running `at_stop` at the checkpoint's instant: vCPUs
    /// paused, every queue drained, disks flushed (for a live checkpoint, in its final stop).
    /// Use it to capture the disks at the same instant (copy them, snapshot them).
    pub fn checkpoint_with(
        &self,
        dir: &Path,
        options: CheckpointOptions,
        at_stop: &mut dyn FnMut() -> Result<()>,
    ) -> Result<CheckpointReport> {
        let _busy = self.busy.lock();
        let started = Instant::now();
        // Held for the whole save: what it takes out of the dirty log goes back on failure,
        // and the base moves only once the checkpoint is durable.
        let mut tracking = self.tracking.lock();
        let staging = Staging::prepare(dir, options.replace, &tracking)?;
        tracking.begin_save();
        let result = self
            .save_into(&mut tracking, staging.dir(), options, started, at_stop)
            .and_then(|saved| {
                saved.write_state(staging.dir())?;
                let dir = staging.commit()?;
                Ok((saved, dir))
            });
        match result {
            Ok((saved, dir)) => {
                tracking.commit(snapshot::checkpoint::BaseRef {
                    dir: dir.clone(),
                    id: saved.manifest.id,
                });
                Ok(saved.report(dir, started))
            }
            Err(e) => {
                tracking.roll_back();
                Err(e)
            }
        }
    }

    /// Writes the checkpoint's memory file into `staging` and returns its manifest.
    fn save_into(
        &self,
        tracking: &mut Tracking,
        staging: &Path,
        options: CheckpointOptions,
        started: Instant,
        at_stop: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Saved> {
        if options.live && !self.vm.machine.gate.is_paused() {
            return save::save_live(&self.vm, tracking, staging, options.incremental, at_stop);
        }
        let was_running = self.vm.pause()?;
        let result = save::save_paused(&self.vm, tracking, staging, options.incremental, at_stop);
        if was_running {
            self.vm.machine.gate.resume();
        }
        let mut saved = result?;
        saved.pause = started.elapsed();
        Ok(saved)
    }

    /// Returns the VM to the checkpoint in `dir` (full, or the top of a diff chain), in place;
    /// a VM that was running runs again afterwards. Returns how long the vCPUs were stopped.
    /// The disks are not touched: point them at matching images first.
    pub fn revert(&self, dir: &Path) -> Result<Duration> {
        self.revert_with(dir, &mut || Ok(()))
    }

    /// As [`Checkpointer::revert`], running `before_load` once the checkpoint is checked, the
    /// vCPUs paused and every queue drained, before anything is loaded: the moment to put
    /// the disks back to what they held at the checkpoint.
    pub fn revert_with(
        &self,
        dir: &Path,
        before_load: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Duration> {
        let _busy = self.busy.lock();
        let started = Instant::now();
        let loaded = LoadedCheckpoint::open(dir)?;
        load::check_fits(&self.vm, &loaded)?;
        let was_running = self.vm.pause()?;
        let result = load::load_paused(&self.vm, &self.tracking, &loaded, before_load);
        if was_running {
            self.vm.machine.gate.resume();
        }
        result?;
        Ok(started.elapsed())
    }
}

fn boxed(e: Error) -> VmStateError {
    Box::new(e)
}

impl VmState for Checkpointer {
    fn pause_vcpus(&self) -> std::result::Result<bool, VmStateError> {
        let was_running = self.vm.pause().map_err(boxed)?;
        if let Err(e) = self.vm.hold_devices() {
            let _ = self.vm.release_devices();
            if was_running {
                self.vm.machine.gate.resume();
            }
            return Err(boxed(e));
        }
        Ok(was_running)
    }

    fn resume_vcpus(&self) -> std::result::Result<(), VmStateError> {
        let released = self.vm.release_devices();
        self.vm.machine.gate.resume();
        released.map_err(boxed)
    }

    fn save_checkpoint(&self, dir: &Path) -> std::result::Result<(), VmStateError> {
        self.vm.require_paused().map_err(boxed)?;
        self.checkpoint(dir, CheckpointOptions::default())
            .map(drop)
            .map_err(boxed)
    }

    fn load_checkpoint(&self, dir: &Path) -> std::result::Result<(), VmStateError> {
        self.vm.require_paused().map_err(boxed)?;
        self.revert(dir).map(drop).map_err(boxed)
    }

    fn save_stream(&self, out: &mut dyn Write) -> std::result::Result<u64, VmStateError> {
        let _busy = self.busy.lock();
        let tracking = self.tracking.lock();
        save::save_stream(&self.vm, &tracking, out).map_err(boxed)
    }

    fn load_stream(&self, input: &mut dyn Read) -> std::result::Result<(), VmStateError> {
        let _busy = self.busy.lock();
        load::load_stream(&self.vm, &self.tracking, input).map_err(boxed)
    }
}
