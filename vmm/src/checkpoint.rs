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
//! a kick. Order (DESIGN §5): devices, then the VM (PIT, clock, irqchips), then the vCPUs;
//! a load goes memory, VM, devices, vCPUs, then restarts the devices.
//!
//! [`Checkpointer`] is also the [`VmState`] the snapshot tree drives: pause, save or load a
//! checkpoint directory or a stream (a qcow2 VM-state area), resume.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use snapshot::checkpoint::manifest::new_id;
use snapshot::checkpoint::{
    memory_path, resolve_chain, state_file, state_path, BaseRef, ChainLink, CheckpointError,
    DataDigest, Manifest, MemoryFile, MemoryLayout, PageSet,
};
use snapshot::vm_state::{VmState, VmStateError};
use storage::BlockDevice;

use crate::builder::{AttachedDisk, Machine};
use crate::config::{default_disk_name, BootSource, DiskConfig, SerialOutput, VmConfig};
use crate::devices::serial::persist::SerialSnapshot;
use crate::devices::serial::Serial;
use crate::devices::virtio::block::persist::BlockDiskState;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::MmioTransportState;
use crate::error::{Error, Result};
use crate::memory::persist as memory_persist;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::persist::{self as vcpu_persist, VcpuState};
use crate::vcpu::SharedVcpuFd;
use crate::vm::persist::{self as vm_persist, VmKvmState};
use crate::vm::Vm;

/// How long a checkpoint waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Live rounds stop once a round leaves at most this many dirty pages (4 MiB) for the pause.
const LIVE_FINAL_PAGES: u64 = 1024;
/// Most copy rounds of a live checkpoint before it stops the guest anyway.
const LIVE_MAX_ROUNDS: usize = 8;
/// Largest page list a stream may announce (bytes of JSON).
const MAX_STREAM_PAGE_LIST: u64 = 64 << 20;

/// A virtio-blk disk's checkpoint: the disk and its transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// How the disk was presented and which files it was on.
    pub disk: BlockDiskState,
    /// The virtio-mmio transport and its queues.
    pub transport: MmioTransportState,
}

/// Everything but memory: what goes into the manifest's `machine` field.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The VM's interrupt controllers and timers.
    pub vm: VmKvmState,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The serial console.
    pub serial: SerialSnapshot,
    /// Each disk, in device order.
    pub disks: Vec<DiskSnapshot>,
}

/// How to take a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// Copy memory while the guest runs; stop it only for the last pages and the vCPU and
    /// device state.
    pub live: bool,
    /// Save only what changed since this VM's last checkpoint (or the one it was restored
    /// or reverted from), as a diff naming it as base.
    pub incremental: bool,
}

/// What a checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Its id.
    pub id: u64,
    /// Its base, for a diff.
    pub base: Option<PathBuf>,
    /// Pages written to the memory file (counting pages a live round rewrote).
    pub pages_written: u64,
    /// Touched pages left as holes because they held only zeroes.
    pub zero_pages: u64,
    /// Memory copy rounds while the guest ran (live only).
    pub live_rounds: usize,
    /// How long the vCPUs were stopped, in microseconds.
    pub pause_us: u64,
    /// How long the whole checkpoint took, in microseconds.
    pub total_us: u64,
}

/// Where the next full save finds pages the pagemap does not show: a memory file the RAM
/// is mapped from, and which of its pages hold data.
#[derive(Debug)]
struct Backing {
    file: Arc<MemoryFile>,
    /// Found on first need (a restore must not wait for it).
    data_pages: std::sync::OnceLock<PageSet>,
}

impl Backing {
    fn new(file: Arc<MemoryFile>) -> Self {
        Backing {
            file,
            data_pages: std::sync::OnceLock::new(),
        }
    }

    fn data_pages(&self) -> Result<&PageSet> {
        if let Some(pages) = self.data_pages.get() {
            return Ok(pages);
        }
        let pages = self.file.data_pages(0, self.file.data_len())?;
        Ok(self.data_pages.get_or_init(|| pages))
    }
}

/// What a VM's checkpointer knows about its memory: whether KVM logs dirty pages, the base
/// of the next diff, and the memory file RAM is mapped from.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    dirty_logging: bool,
    /// RAM was mapped from the base's memory file and dirty logging is not on yet: what
    /// changed since the base is what the pagemap shows as written since the mapping.
    changes_in_pagemap: bool,
    base: Option<BaseRef>,
    backing: Option<Backing>,
}

/// Saves and loads checkpoints of one running VM; get it from [`crate::Vmm::checkpointer`].
pub struct Checkpointer {
    machine: Arc<Machine>,
    tracking: Mutex<Tracking>,
    /// One checkpoint operation at a time.
    busy: Mutex<()>,
    /// Set while [`VmState::pause_vcpus`] holds the devices quiesced and the disks flushed
    /// for the snapshot layer. Its saves run while every disk is quiesced: quiescing a
    /// device then (which waits for its in-flight requests) or flushing a disk would wait
    /// on the disks' locks for ever, so both happen at the pause instead, and the devices
    /// restart when the vCPUs do.
    held: AtomicBool,
    /// The disks' tops when the devices were held: what a save made under the snapshot
    /// layer's disk locks records (asking a quiesced disk for its top would wait for ever).
    held_tops: Mutex<Vec<Arc<dyn BlockDevice>>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("tracking", &*self.tracking.lock())
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    dir.canonicalize()
        .map_err(Error::io(format!("resolving {}", dir.display())))
}

impl Checkpointer {
    pub(crate) fn new(machine: Arc<Machine>, tracking: Tracking) -> Self {
        Checkpointer {
            machine,
            tracking: Mutex::new(tracking),
            busy: Mutex::new(()),
            held: AtomicBool::new(false),
            held_tops: Mutex::new(Vec::new()),
        }
    }

    /// Quiesces every device and flushes the disks for the snapshot layer's hook, until
    /// [`Checkpointer::release_devices`].
    fn hold_devices(&self) -> Result<()> {
        *self.held_tops.lock() = self.machine.disks.iter().map(|d| d.disk.top()).collect();
        for device in &self.machine.devices {
            device.lock().quiesce();
        }
        self.held.store(true, Ordering::Release);
        self.flush_disks_now()
    }

    /// Restarts devices [`VmState::pause_vcpus`] left quiesced; call before the vCPUs run
    /// again (the API's resume does). A no-op when nothing is held.
    pub fn release_devices(&self) -> Result<()> {
        if !self.held.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut resumed = Ok(());
        for device in &self.machine.devices {
            if let Err(e) = device.lock().resume() {
                resumed = Err(e);
            }
        }
        resumed
    }

    /// Takes a checkpoint into `dir` (created if absent), pausing the VM as needed; a VM
    /// that was running runs again afterwards.
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
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        if options.live && !self.machine.gate.is_paused() {
            return self.save_live(dir, options.incremental, started, at_stop);
        }
        let was_running = self.pause()?;
        let result = self.save_paused(dir, options.incremental, at_stop);
        if was_running {
            self.machine.gate.resume();
        }
        let pause = started.elapsed();
        let (manifest, pages_written, zero_pages) = result?;
        self.finish_save(dir, manifest, pages_written, zero_pages, 0, pause, started)
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
        self.check_fits(&loaded)?;
        let was_running = self.pause()?;
        let result = self.load_paused(&loaded, before_load);
        if was_running {
            self.machine.gate.resume();
        }
        result?;
        Ok(started.elapsed())
    }

    /// Pauses the vCPUs; `true` if they were running.
    fn pause(&self) -> Result<bool> {
        if self.machine.gate.is_paused() {
            return Ok(false);
        }
        self.machine.gate.pause(PAUSE_TIMEOUT)?;
        Ok(true)
    }

    fn require_paused(&self) -> Result<()> {
        if self.machine.gate.is_paused() {
            Ok(())
        } else {
            Err(Error::Config(
                "the VM is running: pause its vCPUs first".into(),
            ))
        }
    }

    /// Runs `work` with every device quiesced, restarting them afterwards whatever happens.
    fn with_devices_quiesced<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.held.load(Ordering::Acquire) {
            // Quiesced already, and restarted by `release_devices`.
            return work();
        }
        for device in &self.machine.devices {
            device.lock().quiesce();
        }
        let result = work();
        let mut resumed = Ok(());
        for device in &self.machine.devices {
            if let Err(e) = device.lock().resume() {
                resumed = Err(e);
            }
        }
        let value = result?;
        resumed?;
        Ok(value)
    }

    /// Flushes every writable disk, unless the devices are held for the snapshot layer (the
    /// disks were flushed then, no request has run since, and they may be quiesced now).
    fn flush_disks(&self) -> Result<()> {
        if self.held.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_disks_now()
    }

    fn flush_disks_now(&self) -> Result<()> {
        for disk in &self.machine.disks {
            if !disk.read_only {
                disk.disk.flush().map_err(|source| Error::Disk {
                    name: disk.name.clone(),
                    path: disk.disk.top().path().to_path_buf(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Each disk's top: as it was when the devices were held, or as it is now.
    fn disk_tops(&self) -> Vec<Arc<dyn BlockDevice>> {
        if self.held.load(Ordering::Acquire) {
            return self.held_tops.lock().clone();
        }
        self.machine.disks.iter().map(|d| d.disk.top()).collect()
    }

    /// Reads devices, then the VM, then the vCPUs (devices quiesced, vCPUs paused).
    fn capture(&self) -> Result<MachineState> {
        let machine = &self.machine;
        let tops = self.disk_tops();
        let mut disks = Vec::new();
        for (index, (device, disk)) in machine.devices.iter().zip(&machine.disks).enumerate() {
            let (queues, size) = machine
                .config
                .disks
                .get(index)
                .map(|d| (d.num_queues, d.queue_size))
                .unwrap_or_default();
            disks.push(DiskSnapshot {
                disk: BlockDiskState::of(disk, &tops[index], queues, size),
                transport: device.lock().save_state()?,
            });
        }
        let serial = machine.serial.lock().save_state();
        let vm = vm_persist::save(&machine.vm)?;
        let mut vcpus = Vec::new();
        for (index, fd) in machine.vcpus.iter().enumerate() {
            vcpus.push(vcpu_persist::save(
                &fd.lock(),
                index as u8,
                &machine.msr_list,
            )?);
        }
        Ok(MachineState {
            vcpu_count: machine.vcpus.len() as u8,
            memory_mib: machine.config.memory_mib,
            vm,
            vcpus,
            serial,
            disks,
        })
    }

    fn enable_dirty_logging(&self, tracking: &mut Tracking) -> Result<()> {
        if !tracking.dirty_logging {
            self.machine
                .vm
                .set_dirty_logging(&self.machine.memory, true)?;
            tracking.dirty_logging = true;
        }
        Ok(())
    }

    /// Pages changed since the base (and resets the window): KVM's dirty log and the VMM's
    /// bitmap; right after a restore, before dirty logging was on, also every page written
    /// since RAM was mapped from the base (read after logging starts, so nothing falls
    /// between the two).
    fn changes_since_base(&self, tracking: &mut Tracking) -> Result<PageSet> {
        let memory = &self.machine.memory;
        self.enable_dirty_logging(tracking)?;
        let mut pages = memory_persist::collect_dirty(&self.machine.vm, memory)?;
        if tracking.changes_in_pagemap {
            pages.union(&memory_persist::written_since_mapped(memory)?);
            tracking.changes_in_pagemap = false;
        }
        Ok(pages)
    }

    /// Pages a full save must look at: those faulted in, and those of a backing memory file.
    fn touched_pages(&self, tracking: &Tracking) -> Result<PageSet> {
        let mut pages = memory_persist::resident_pages(&self.machine.memory)?;
        if let Some(backing) = &tracking.backing {
            pages.union(backing.data_pages()?);
        }
        Ok(pages)
    }

    fn incremental_base(&self, tracking: &Tracking) -> Result<BaseRef> {
        match (
            &tracking.base,
            tracking.dirty_logging || tracking.changes_in_pagemap,
        ) {
            (Some(base), true) => Ok(base.clone()),
            _ => Err(Error::Config(
                "an incremental checkpoint needs a base: take a full checkpoint (or restore \
                 or revert to one) first"
                    .into(),
            )),
        }
    }

    /// Saves the paused VM; returns the manifest (not yet written), pages written, zero pages.
    fn save_paused(
        &self,
        dir: &Path,
        incremental: bool,
        at_stop: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(Manifest, u64, u64)> {
        self.require_paused()?;
        let mut tracking = self.tracking.lock();
        let base = if incremental {
            Some(self.incremental_base(&tracking)?)
        } else {
            None
        };
        let memory = &self.machine.memory;
        let layout = memory_persist::layout(memory);
        let id = new_id();
        let file = MemoryFile::create(&temporary_memory_path(dir), id, layout.total_bytes())?;
        let (machine, pages, stats) = self.with_devices_quiesced(|| {
            self.flush_disks()?;
            at_stop()?;
            let machine = self.capture()?;
            let (pages, stats) = if base.is_some() {
                let dirty = self.changes_since_base(&mut tracking)?;
                let stats = memory_persist::write_pages(memory, &file, &dirty, false, true)?;
                (Some(dirty), stats)
            } else {
                // Start the next diff's window here.
                self.enable_dirty_logging(&mut tracking)?;
                memory_persist::collect_dirty(&self.machine.vm, memory)?;
                tracking.changes_in_pagemap = false;
                let touched = self.touched_pages(&tracking)?;
                let stats = memory_persist::write_pages(memory, &file, &touched, true, true)?;
                (None, stats)
            };
            Ok((machine, pages, stats))
        })?;
        let digest = stats.crc.map(|crc| DataDigest {
            pages: stats.written.clone(),
            crc,
        });
        let manifest = build_manifest(id, layout, machine, base, pages, digest)?;
        file.sync()?;
        tracking.base = Some(BaseRef {
            dir: PathBuf::new(), // Filled in by finish_save once the directory is final.
            id,
        });
        Ok((manifest, stats.pages, stats.zero_pages))
    }

    /// The live path: rounds while the guest runs, then a short pause.
    fn save_live(
        &self,
        dir: &Path,
        incremental: bool,
        started: Instant,
        at_stop: &mut dyn FnMut() -> Result<()>,
    ) -> Result<CheckpointReport> {
        let mut tracking = self.tracking.lock();
        let base = if incremental {
            Some(self.incremental_base(&tracking)?)
        } else {
            None
        };
        let memory = &self.machine.memory;
        let vm = &self.machine.vm;
        let layout = memory_persist::layout(memory);
        let id = new_id();
        let file = MemoryFile::create(&temporary_memory_path(dir), id, layout.total_bytes())?;
        self.enable_dirty_logging(&mut tracking)?;

        // Round 0: everything a full checkpoint holds, or what changed since the base.
        let changed_since_base = self.changes_since_base(&mut tracking)?;
        let mut all_pages = changed_since_base.clone();
        let mut written = 0;
        let mut zero_pages = 0;
        let first = if base.is_some() {
            memory_persist::write_pages(memory, &file, &changed_since_base, false, false)?
        } else {
            let touched = self.touched_pages(&tracking)?;
            memory_persist::write_pages(memory, &file, &touched, true, false)?
        };
        written += first.pages;
        zero_pages += first.zero_pages;
        let mut written_pages = first.written;
        let mut rounds = 1;
        let mut pending = memory_persist::collect_dirty(vm, memory)?;
        while pending.count() > LIVE_FINAL_PAGES && rounds < LIVE_MAX_ROUNDS {
            let round = memory_persist::write_pages(memory, &file, &pending, false, false)?;
            written += round.pages;
            written_pages.union(&round.written);
            all_pages.union(&pending);
            rounds += 1;
            pending = memory_persist::collect_dirty(vm, memory)?;
        }

        // The stop: the last dirty pages, then devices, VM and vCPUs.
        let pause_started = Instant::now();
        self.machine.gate.pause(PAUSE_TIMEOUT)?;
        let result = self.with_devices_quiesced(|| {
            pending.union(&memory_persist::collect_dirty(vm, memory)?);
            let copied = memory_persist::copy_out(memory, &pending);
            at_stop()?;
            let machine = self.capture()?;
            Ok((copied, machine))
        });
        self.machine.gate.resume();
        let pause = pause_started.elapsed();
        let (copied, machine) = result?;
        memory_persist::write_copied(&file, &pending, &copied)?;
        written += pending.count();
        written_pages.union(&pending);
        all_pages.union(&pending);

        // Durability after the guest runs again: the disks, then the files. Pages were
        // rewritten round after round: the digest is of what the file ends up holding.
        self.flush_disks()?;
        file.sync()?;
        let digest = DataDigest {
            crc: file.crc_of(&written_pages)?,
            pages: written_pages,
        };
        let pages = base.as_ref().map(|_| all_pages);
        let manifest = build_manifest(id, layout, machine, base, pages, Some(digest))?;
        tracking.base = Some(BaseRef {
            dir: PathBuf::new(),
            id,
        });
        drop(tracking);
        self.finish_save(dir, manifest, written, zero_pages, rounds, pause, started)
    }

    /// Renames the memory file into place, writes the state file (the commit point) and
    /// records the directory as the next diff's base.
    #[allow(clippy::too_many_arguments)]
    fn finish_save(
        &self,
        dir: &Path,
        manifest: Manifest,
        pages_written: u64,
        zero_pages: u64,
        live_rounds: usize,
        pause: Duration,
        started: Instant,
    ) -> Result<CheckpointReport> {
        std::fs::rename(temporary_memory_path(dir), memory_path(dir)).map_err(Error::io(
            format!("renaming the memory file in {}", dir.display()),
        ))?;
        state_file::write(&state_path(dir), &manifest)?;
        let dir = absolute(dir)?;
        let mut tracking = self.tracking.lock();
        if let Some(base) = &mut tracking.base {
            if base.id == manifest.id {
                base.dir = dir.clone();
            }
        }
        Ok(CheckpointReport {
            dir,
            id: manifest.id,
            base: manifest.base.map(|b| b.dir),
            pages_written,
            zero_pages,
            live_rounds,
            pause_us: micros(pause),
            total_us: micros(started.elapsed()),
        })
    }

    /// Checks a checkpoint fits this VM before anything is changed.
    fn check_fits(&self, loaded: &LoadedCheckpoint) -> Result<()> {
        let machine = &self.machine;
        let state = &loaded.machine;
        let mismatch = |message: String| {
            Error::Checkpoint(CheckpointError::Mismatch(format!(
                "checkpoint {} does not fit this VM: {message}",
                loaded.dir.display()
            )))
        };
        if usize::from(state.vcpu_count) != machine.vcpus.len()
            || state.vcpus.len() != machine.vcpus.len()
        {
            return Err(mismatch(format!(
                "{} vCPUs saved, this VM has {}",
                state.vcpus.len(),
                machine.vcpus.len()
            )));
        }
        memory_persist::check_layout(&machine.memory, &loaded.layout()).map_err(mismatch)?;
        if state.disks.len() != machine.disks.len() {
            return Err(mismatch(format!(
                "{} disks saved, this VM has {}",
                state.disks.len(),
                machine.disks.len()
            )));
        }
        for (index, (saved, (device, disk))) in state
            .disks
            .iter()
            .zip(machine.devices.iter().zip(&machine.disks))
            .enumerate()
        {
            let (queues, size) = machine
                .config
                .disks
                .get(index)
                .map(|d| (d.num_queues, d.queue_size))
                .unwrap_or_default();
            saved
                .disk
                .check(&BlockDiskState::of(disk, &disk.disk.top(), queues, size))
                .map_err(mismatch)?;
            device
                .lock()
                .check_state(&saved.transport)
                .map_err(mismatch)?;
        }
        Ok(())
    }

    /// Loads a checked checkpoint into the paused VM.
    fn load_paused(
        &self,
        loaded: &LoadedCheckpoint,
        before_load: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        self.require_paused()?;
        let machine = &self.machine;
        self.with_devices_quiesced(|| {
            before_load()?;
            loaded.load_memory(&machine.memory)?;
            loaded.restore_state(
                &machine.vm,
                &machine.vcpus,
                &machine.devices,
                &machine.serial,
                false,
            )
        })?;
        self.adopt(loaded)
    }

    /// Makes `loaded` (just loaded into RAM) the base of the next incremental checkpoint.
    fn adopt(&self, loaded: &LoadedCheckpoint) -> Result<()> {
        let mut tracking = self.tracking.lock();
        self.enable_dirty_logging(&mut tracking)?;
        memory_persist::collect_dirty(&self.machine.vm, &self.machine.memory)?;
        tracking.changes_in_pagemap = false;
        tracking.base = Some(BaseRef {
            dir: absolute(&loaded.dir)?,
            id: loaded.top().manifest.id,
        });
        tracking.backing = Some(Backing::new(loaded.full_file()));
        Ok(())
    }

    /// Writes the paused VM as one stream: a state frame, the list of non-zero pages, the
    /// pages, and a CRC-32 of them. Returns the bytes written.
    fn save_stream_paused(&self, out: &mut dyn Write) -> Result<u64> {
        self.require_paused()?;
        let memory = &self.machine.memory;
        let mut out = CountingWriter {
            inner: out,
            count: 0,
        };
        let tracking = self.tracking.lock();
        self.with_devices_quiesced(|| {
            self.flush_disks()?;
            let machine = self.capture()?;
            let touched = self.touched_pages(&tracking)?;
            let pages = memory_persist::nonzero_pages(memory, &touched);
            let manifest = build_manifest(
                new_id(),
                memory_persist::layout(memory),
                machine,
                None,
                None,
                None,
            )?;
            let io = Error::io("writing the VM state stream");
            out.write_all(&state_file::encode(&manifest)?).map_err(io)?;
            let list = serde_json::to_vec(&pages)
                .map_err(|e| Error::Config(format!("encoding the page list: {e}")))?;
            out.write_all(&(list.len() as u64).to_le_bytes())
                .and_then(|_| out.write_all(&list))
                .map_err(Error::io("writing the VM state stream"))?;
            let crc = memory_persist::write_stream(memory, &pages, &mut out)?;
            out.write_all(&crc.to_le_bytes())
                .map_err(Error::io("writing the VM state stream"))?;
            Ok(())
        })?;
        Ok(out.count)
    }

    /// Loads a stream from [`Checkpointer::save_stream_paused`] into the paused VM; memory is
    /// staged and its CRC checked before anything changes.
    fn load_stream_paused(&self, input: &mut dyn Read) -> Result<()> {
        self.require_paused()?;
        let source = Path::new("VM state stream");
        let manifest = state_file::read_from(input, source)?;
        let machine_state: MachineState = serde_json::from_value(manifest.machine.clone())
            .map_err(|e| CheckpointError::StateFile {
                path: source.into(),
                message: format!("machine state: {e}"),
            })?;
        let loaded = LoadedCheckpoint {
            dir: source.to_path_buf(),
            chain: vec![ChainLink {
                dir: source.to_path_buf(),
                manifest,
            }],
            machine: machine_state,
            files: Vec::new(),
        };
        self.check_fits(&loaded)?;
        let bad = |message: String| {
            Error::Checkpoint(CheckpointError::StateFile {
                path: source.into(),
                message,
            })
        };
        let mut len = [0u8; 8];
        input
            .read_exact(&mut len)
            .map_err(|e| bad(format!("reading the page list length: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_STREAM_PAGE_LIST {
            return Err(bad(format!("page list of {len} bytes")));
        }
        let mut list = vec![0u8; len as usize];
        input
            .read_exact(&mut list)
            .map_err(|e| bad(format!("reading the page list: {e}")))?;
        let pages: PageSet =
            serde_json::from_slice(&list).map_err(|e| bad(format!("page list: {e}")))?;
        let memory = &self.machine.memory;
        if pages.len() != loaded.layout().total_pages() {
            return Err(bad(format!(
                "page list covers {} pages, memory has {}",
                pages.len(),
                loaded.layout().total_pages()
            )));
        }
        let staged = memory_persist::StagedMemory::new(memory)?;
        let computed = staged.read_stream(&pages, input)?;
        let mut crc = [0u8; 4];
        input
            .read_exact(&mut crc)
            .map_err(|e| bad(format!("reading the memory CRC: {e}")))?;
        let stored = u32::from_le_bytes(crc);
        if stored != computed {
            return Err(bad(format!(
                "memory CRC mismatch (stored {stored:08x}, computed {computed:08x}): the stream is corrupt"
            )));
        }
        let machine = &self.machine;
        self.with_devices_quiesced(|| {
            staged.commit(memory)?;
            loaded.restore_state(
                &machine.vm,
                &machine.vcpus,
                &machine.devices,
                &machine.serial,
                false,
            )
        })?;
        // RAM is anonymous again; the next incremental checkpoint needs a new base.
        let mut tracking = self.tracking.lock();
        tracking.backing = None;
        tracking.base = None;
        tracking.changes_in_pagemap = false;
        Ok(())
    }
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn temporary_memory_path(dir: &Path) -> PathBuf {
    memory_path(dir).with_extension("tmp")
}

fn build_manifest(
    id: u64,
    layout: MemoryLayout,
    machine: MachineState,
    base: Option<BaseRef>,
    pages: Option<PageSet>,
    data: Option<DataDigest>,
) -> Result<Manifest> {
    let machine = serde_json::to_value(&machine)
        .map_err(|e| Error::Config(format!("encoding the machine state: {e}")))?;
    let mut manifest = match (base, pages) {
        (Some(base), Some(pages)) => Manifest::new_diff(layout, machine, base, pages),
        _ => Manifest::new_full(layout, machine),
    };
    manifest.id = id;
    manifest.data = data;
    Ok(manifest)
}

/// A checkpoint read and checked from disk: its chain, machine state and open memory files.
#[derive(Debug)]
pub(crate) struct LoadedCheckpoint {
    dir: PathBuf,
    chain: Vec<ChainLink>,
    machine: MachineState,
    /// One per link, full checkpoint first.
    files: Vec<Arc<MemoryFile>>,
}

impl LoadedCheckpoint {
    /// Reads the chain ending at `dir`, its machine state, and opens (and checks) every
    /// memory file.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let chain = resolve_chain(dir)?;
        let top = chain
            .last()
            .ok_or_else(|| Error::Checkpoint(CheckpointError::Chain("empty chain".into())))?;
        let machine: MachineState =
            serde_json::from_value(top.manifest.machine.clone()).map_err(|e| {
                CheckpointError::StateFile {
                    path: state_path(dir),
                    message: format!("machine state: {e}"),
                }
            })?;
        if machine.vcpus.len() != usize::from(machine.vcpu_count) || machine.vcpus.is_empty() {
            return Err(Error::Checkpoint(CheckpointError::StateFile {
                path: state_path(dir),
                message: format!(
                    "{} vCPU states for {} vCPUs",
                    machine.vcpus.len(),
                    machine.vcpu_count
                ),
            }));
        }
        let total = top.manifest.memory.total_bytes();
        let mut files = Vec::new();
        for link in &chain {
            files.push(Arc::new(MemoryFile::open(
                &memory_path(&link.dir),
                link.manifest.id,
                total,
            )?));
        }
        Ok(LoadedCheckpoint {
            dir: dir.to_path_buf(),
            chain,
            machine,
            files,
        })
    }

    fn top(&self) -> &ChainLink {
        // `open` and the stream path build a non-empty chain.
        &self.chain[self.chain.len() - 1]
    }

    fn full_file(&self) -> Arc<MemoryFile> {
        self.files[0].clone()
    }

    /// The tracking of a VM built by [`crate::Vmm::restore`] from this checkpoint: no dirty
    /// log yet (turning it on would double the restore time), changes found in the pagemap.
    pub(crate) fn tracking(&self) -> Result<Tracking> {
        Ok(Tracking {
            dirty_logging: false,
            changes_in_pagemap: true,
            base: Some(BaseRef {
                dir: absolute(&self.dir)?,
                id: self.top().manifest.id,
            }),
            backing: Some(Backing::new(self.full_file())),
        })
    }

    /// The memory layout saved.
    pub(crate) fn layout(&self) -> MemoryLayout {
        self.top().manifest.memory.clone()
    }

    /// The configuration to rebuild the saved VM: its shape and the disks' images at
    /// checkpoint time.
    pub(crate) fn config(&self) -> Result<VmConfig> {
        let state = &self.machine;
        let mut config = VmConfig::new(BootSource::Checkpoint(self.dir.clone()));
        config.vcpus = state.vcpu_count;
        config.memory_mib = state.memory_mib;
        config.serial = SerialOutput::Null;
        for (index, saved) in state.disks.iter().enumerate() {
            let disk = &saved.disk;
            let mut entry = DiskConfig::new(disk.top.clone());
            entry.read_only = disk.read_only;
            entry.num_queues = disk.num_queues;
            entry.queue_size = disk.queue_size;
            if disk.name != default_disk_name(index) {
                entry.id = Some(disk.name.clone());
            }
            config.disks.push(entry);
        }
        Ok(config)
    }

    /// Loads memory: the full checkpoint mapped, then each diff's pages copied in.
    fn load_memory(&self, memory: &GuestMemoryMmap) -> Result<()> {
        memory_persist::map_file(memory, &self.files[0])?;
        for (link, file) in self.chain.iter().zip(&self.files).skip(1) {
            if let Some(pages) = &link.manifest.pages {
                memory_persist::read_pages(memory, file, pages)?;
            }
        }
        Ok(())
    }

    /// Restores VM, devices and vCPUs (memory already loaded); devices are left quiesced.
    fn restore_state(
        &self,
        vm: &Vm,
        vcpus: &[SharedVcpuFd],
        devices: &[Arc<parking_lot::Mutex<MmioTransport>>],
        serial: &Arc<parking_lot::Mutex<Serial>>,
        first_time: bool,
    ) -> Result<()> {
        let state = &self.machine;
        vm_persist::restore(vm, &state.vm)?;
        serial.lock().restore_state(&state.serial)?;
        for (device, saved) in devices.iter().zip(&state.disks) {
            device.lock().restore_state(&saved.transport)?;
        }
        for (fd, saved) in vcpus.iter().zip(&state.vcpus) {
            vcpu_persist::restore(&fd.lock(), saved, first_time)?;
        }
        Ok(())
    }

    /// Loads everything into a VM just built for it ([`crate::Vmm::restore`]); the devices
    /// are left quiesced for the caller to resume once the vCPUs exist.
    pub(crate) fn apply_new(
        &self,
        vm: &Vm,
        memory: &GuestMemoryMmap,
        vcpus: &[SharedVcpuFd],
        devices: &[Arc<parking_lot::Mutex<MmioTransport>>],
        serial: &Arc<parking_lot::Mutex<Serial>>,
        disks: &[AttachedDisk],
    ) -> Result<()> {
        for (saved, disk) in self.machine.disks.iter().zip(disks) {
            if saved.disk.size != disk.disk.size() {
                return Err(Error::Checkpoint(CheckpointError::Mismatch(format!(
                    "disk {} ({}) is {} bytes, the checkpoint saw {}",
                    disk.name,
                    saved.disk.top.display(),
                    disk.disk.size(),
                    saved.disk.size
                ))));
            }
        }
        self.load_memory(memory)?;
        self.restore_state(vm, vcpus, devices, serial, true)
    }
}

fn boxed(e: Error) -> VmStateError {
    Box::new(e)
}

impl VmState for Checkpointer {
    fn pause_vcpus(&self) -> std::result::Result<bool, VmStateError> {
        let was_running = self.pause().map_err(boxed)?;
        if let Err(e) = self.hold_devices() {
            let _ = self.release_devices();
            if was_running {
                self.machine.gate.resume();
            }
            return Err(boxed(e));
        }
        Ok(was_running)
    }

    fn resume_vcpus(&self) -> std::result::Result<(), VmStateError> {
        let released = self.release_devices();
        self.machine.gate.resume();
        released.map_err(boxed)
    }

    fn save_checkpoint(&self, dir: &Path) -> std::result::Result<(), VmStateError> {
        self.require_paused().map_err(boxed)?;
        self.checkpoint(dir, CheckpointOptions::default())
            .map(drop)
            .map_err(boxed)
    }

    fn load_checkpoint(&self, dir: &Path) -> std::result::Result<(), VmStateError> {
        self.require_paused().map_err(boxed)?;
        self.revert(dir).map(drop).map_err(boxed)
    }

    fn save_stream(&self, out: &mut dyn Write) -> std::result::Result<u64, VmStateError> {
        let _busy = self.busy.lock();
        self.save_stream_paused(out).map_err(boxed)
    }

    fn load_stream(&self, input: &mut dyn Read) -> std::result::Result<(), VmStateError> {
        let _busy = self.busy.lock();
        self.load_stream_paused(input).map_err(boxed)
    }
}
