//! The parts of a built VM that outlive any one call, shared by the running [`crate::Vmm`]
//! and its [`crate::Checkpointer`]: what checkpoints save and load.
//!
//! It sits below both the builder (which assembles it) and the checkpoint code (which
//! saves and loads it), so neither has to reach into the other.

use std::sync::Arc;

use parking_lot::Mutex;
use storage::LiveDisk;

use crate::config::VmConfig;
use crate::devices::serial::Serial;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::vmgenid::VmGenId;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::{PauseGate, SharedVcpuFd};
use crate::vm::Vm;

/// A disk attached to a running VM.
#[derive(Debug, Clone)]
pub struct AttachedDisk {
    /// vda, vdb, ... or the disk's id.
    pub name: String,
    /// The live handle the device does I/O through; snapshots re-point it.
    pub disk: Arc<LiveDisk>,
    /// Presented read-only.
    pub read_only: bool,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt.
    pub gsi: u32,
}

/// The vsock device of a running VM.
#[derive(Debug, Clone)]
pub struct AttachedVsock {
    /// Its CID and host socket.
    pub config: VsockConfig,
    /// The device, for a checkpoint load's transport reset.
    pub device: Arc<Mutex<Vsock>>,
    /// Its virtio-mmio transport (also the last of the machine's devices).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt.
    pub gsi: u32,
}

/// The parts of a built VM that outlive any one call: what checkpoints save and load.
pub(crate) struct Machine {
    /// The KVM VM.
    pub vm: Vm,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// Every vCPU's fd, by index.
    pub vcpus: Vec<SharedVcpuFd>,
    /// The virtio-mmio transports: the disks' in disk order, then the vsock's if any.
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// The serial console.
    pub serial: Arc<Mutex<Serial>>,
    /// The disks, in device order.
    pub disks: Vec<AttachedDisk>,
    /// The vsock device.
    pub vsock: Option<AttachedVsock>,
    /// What the VM was built from (disk paths as first opened).
    pub config: VmConfig,
    /// Pauses and resumes the vCPUs.
    pub gate: Arc<PauseGate>,
    /// The MSRs a vCPU save reads.
    pub msr_list: Vec<u32>,
    /// The VM generation ID, changed on every load of a checkpoint.
    pub vmgenid: VmGenId,
}
