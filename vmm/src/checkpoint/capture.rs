//! Capture and restore of the machine state (everything but memory's pages): the devices,
//! the VM's interrupt controllers and clocks, the vCPUs, each through its
//! [`Persist`] implementation; and the pause and device quiescing every save and load needs.
//!
//! Order (DESIGN §5): a save reads devices, then the VM (PIT, clock, irqchips), then the
//! vCPUs; a load writes the VM, devices, then vCPUs, after memory.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use snapshot::checkpoint::{CheckpointError, MemoryLayout};
use storage::BlockDevice;

use crate::devices::serial::persist::SerialSnapshot;
use crate::devices::serial::Serial;
use crate::devices::virtio::block::persist::{BlockDiskState, BlockSaveArgs};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::MmioTransportState;
use crate::devices::virtio::vsock::persist::VsockState;
use crate::devices::vmgenid::persist::{VmGenIdRestoreArgs, VmGenIdState};
use crate::devices::vmgenid::VmGenId;
use crate::error::{Error, Result};
use crate::machine::{AttachedVsock, Machine};
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::vcpu::persist::{VcpuRestoreArgs, VcpuSaveArgs, VcpuState};
use crate::vcpu::SharedVcpuFd;
use crate::vm::persist::VmKvmState;
use crate::vm::Vm;

/// How long a checkpoint waits for the vCPUs to park.
pub(super) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A virtio-blk disk's checkpoint: the disk and its transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// How the disk was presented and which files it was on.
    pub disk: BlockDiskState,
    /// The virtio-mmio transport and its queues.
    pub transport: MmioTransportState,
}

/// The vsock device's checkpoint: the device and its transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsockSnapshot {
    /// Its CID, host socket and window.
    pub device: VsockState,
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
    /// The VM generation ID device (absent in checkpoints older than it).
    #[serde(default)]
    pub vmgenid: Option<VmGenIdState>,
    /// The vsock device (absent from checkpoints of VMs without one, and older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSnapshot>,
}

/// The objects of a VM a machine state is restored into (a running VM's, or those of one
/// just built for a checkpoint).
pub(crate) struct RestoreTarget<'a> {
    /// The KVM VM.
    pub vm: &'a Vm,
    /// Every vCPU, by index.
    pub vcpus: &'a [SharedVcpuFd],
    /// The virtio-mmio transports: the disks' in disk order, then the vsock's.
    pub devices: &'a [Arc<Mutex<MmioTransport>>],
    /// The serial console.
    pub serial: &'a Mutex<Serial>,
    /// Guest RAM (loaded before the machine state).
    pub memory: &'a GuestMemoryMmap,
    /// The VM generation ID device.
    pub vmgenid: &'a VmGenId,
    /// The vsock device.
    pub vsock: Option<&'a AttachedVsock>,
}

impl MachineState {
    /// Restores VM, devices and vCPUs (memory already loaded); devices are left quiesced.
    /// `first_time` for vCPUs that never ran.
    pub(super) fn restore_into(&self, target: RestoreTarget<'_>, first_time: bool) -> Result<()> {
        target.vm.restore((), &self.vm)?;
        target.serial.restore((), &self.serial)?;
        for (device, saved) in target.devices.iter().zip(&self.disks) {
            device.restore((), &saved.transport)?;
        }
        // Its transport first: the device's reset event goes on the restored event queue.
        if let (Some(vsock), Some(saved)) = (target.vsock, &self.vsock) {
            vsock.transport.restore((), &saved.transport)?;
            vsock.restore((), &saved.device)?;
        }
        for (fd, saved) in target.vcpus.iter().zip(&self.vcpus) {
            fd.lock().restore(VcpuRestoreArgs { first_time }, saved)?;
        }
        // Last: memory came back with the saved generation; the guest gets a new one, and
        // its change interrupt lands on restored interrupt controllers.
        if let Some(saved) = &self.vmgenid {
            let args = VmGenIdRestoreArgs {
                vm: target.vm,
                memory: target.memory,
            };
            target.vmgenid.restore(args, saved)?;
        }
        Ok(())
    }
}

/// The running VM as the checkpoint code drives it: pausing, quiescing devices (also on
/// behalf of the snapshot layer), flushing disks, and capturing and checking state.
pub(super) struct VmHandle {
    /// The VM's parts.
    pub machine: Arc<Machine>,
    /// Set while [`snapshot::vm_state::VmState::pause_vcpus`] holds the devices quiesced
    /// and the disks flushed for the snapshot layer. Its saves run while every disk is
    /// quiesced: quiescing a device then (which waits for its in-flight requests) or
    /// flushing a disk would wait on the disks' locks for ever, so both happen at the
    /// pause instead, and the devices restart when the vCPUs do.
    held: AtomicBool,
    /// The disks' tops when the devices were held: what a save made under the snapshot
    /// layer's disk locks records (asking a quiesced disk for its top would wait for ever).
    held_tops: Mutex<Vec<Arc<dyn BlockDevice>>>,
}

impl VmHandle {
    /// The handle of `machine`, nothing held.
    pub fn new(machine: Arc<Machine>) -> Self {
        VmHandle {
            machine,
            held: AtomicBool::new(false),
            held_tops: Mutex::new(Vec::new()),
        }
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.machine.memory
    }

    /// Pauses the vCPUs; `true` if they were running.
    pub fn pause(&self) -> Result<bool> {
        if self.machine.gate.is_paused() {
            return Ok(false);
        }
        self.machine.gate.pause(PAUSE_TIMEOUT)?;
        Ok(true)
    }

    /// Refuses to go on while the vCPUs run.
    pub fn require_paused(&self) -> Result<()> {
        if self.machine.gate.is_paused() {
            Ok(())
        } else {
            Err(Error::Config(
                "the VM is running: pause its vCPUs first".into(),
            ))
        }
    }

    /// Quiesces every device and flushes the disks for the snapshot layer's hook, until
    /// [`VmHandle::release_devices`].
    pub fn hold_devices(&self) -> Result<()> {
        *self.held_tops.lock() = self.machine.disks.iter().map(|d| d.disk.top()).collect();
        for device in &self.machine.devices {
            device.lock().quiesce();
        }
        self.held.store(true, Ordering::Release);
        self.flush_disks_now()
    }

    /// Restarts devices [`VmHandle::hold_devices`] left quiesced. A no-op when nothing is
    /// held.
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

    /// Runs `work` with every device quiesced, restarting them afterwards whatever happens.
    pub fn with_devices_quiesced<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
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
    pub fn flush_disks(&self) -> Result<()> {
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

    /// The queue shape disk `index` was configured with.
    fn disk_args<'a>(&self, index: usize, top: &'a Arc<dyn BlockDevice>) -> BlockSaveArgs<'a> {
        let (num_queues, queue_size) = self
            .machine
            .config
            .disks
            .get(index)
            .map(|d| (d.num_queues, d.queue_size))
            .unwrap_or_default();
        BlockSaveArgs {
            top,
            num_queues,
            queue_size,
        }
    }

    /// Reads devices, then the VM, then the vCPUs (devices quiesced, vCPUs paused).
    pub fn capture(&self) -> Result<MachineState> {
        let machine = &self.machine;
        let tops = self.disk_tops();
        let mut disks = Vec::new();
        for (index, ((device, disk), top)) in machine
            .devices
            .iter()
            .zip(&machine.disks)
            .zip(&tops)
            .enumerate()
        {
            disks.push(DiskSnapshot {
                disk: disk.save(self.disk_args(index, top))?,
                transport: device.save(())?,
            });
        }
        let vsock = match &machine.vsock {
            Some(vsock) => Some(VsockSnapshot {
                device: vsock.save(())?,
                transport: vsock.transport.save(())?,
            }),
            None => None,
        };
        let serial = machine.serial.save(())?;
        let vm = machine.vm.save(())?;
        let mut vcpus = Vec::new();
        for (index, fd) in machine.vcpus.iter().enumerate() {
            let args = VcpuSaveArgs {
                index: index as u8,
                msrs: &machine.msr_list,
            };
            vcpus.push(fd.lock().save(args)?);
        }
        let vmgenid = Some(machine.vmgenid.save(&machine.memory)?);
        Ok(MachineState {
            vcpu_count: machine.vcpus.len() as u8,
            memory_mib: machine.config.memory_mib,
            vm,
            vcpus,
            serial,
            disks,
            vmgenid,
            vsock,
        })
    }

    /// Checks the checkpoint in `dir` (its machine state and memory layout) fits this VM
    /// before anything is changed.
    pub fn check_fits(
        &self,
        dir: &Path,
        state: &MachineState,
        layout: &MemoryLayout,
    ) -> Result<()> {
        let machine = &self.machine;
        let mismatch = |message: String| {
            Error::Checkpoint(CheckpointError::Mismatch(format!(
                "checkpoint {} does not fit this VM: {message}",
                dir.display()
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
        let fits = |result: Result<()>| result.map_err(|e| mismatch(e.to_string()));
        fits(machine.memory.check(layout))?;
        fits(machine.vm.check(&state.vm))?;
        fits(machine.serial.check(&state.serial))?;
        if let Some(saved) = &state.vmgenid {
            fits(machine.vmgenid.check(saved))?;
        }
        for (fd, saved) in machine.vcpus.iter().zip(&state.vcpus) {
            fits(fd.lock().check(saved))?;
        }
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
            let top = disk.disk.top();
            // A disk's restore into a running VM only checks it can take the state.
            fits(disk.restore(self.disk_args(index, &top), &saved.disk))?;
            fits(device.check(&saved.transport))?;
        }
        match (&state.vsock, &machine.vsock) {
            (Some(saved), Some(vsock)) => {
                fits(vsock.check(&saved.device))?;
                fits(vsock.transport.check(&saved.transport))?;
            }
            (None, None) => {}
            (saved, _) => {
                return Err(mismatch(format!(
                    "the checkpoint {} a vsock device, this VM {}",
                    if saved.is_some() { "has" } else { "has no" },
                    if saved.is_some() {
                        "has none"
                    } else {
                        "has one"
                    },
                )))
            }
        }
        Ok(())
    }

    /// The objects a load restores into.
    pub fn target(&self) -> RestoreTarget<'_> {
        RestoreTarget {
            vm: &self.machine.vm,
            vcpus: &self.machine.vcpus,
            devices: &self.machine.devices,
            serial: &self.machine.serial,
            memory: &self.machine.memory,
            vmgenid: &self.machine.vmgenid,
            vsock: self.machine.vsock.as_ref(),
        }
    }
}
