//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap};

pub mod persist;

/// Capabilities the VMM cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 5] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
];

/// Opens `/dev/kvm` and checks the capabilities the VMM needs.
pub fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| Error::KvmUnavailable(format!("/dev/kvm: {e}")))?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmUnavailable(format!("{name} missing")));
        }
    }
    Ok(kvm)
}

/// Whether this host can run VMs: `Ok`, or the reason it cannot (for tests that skip).
pub fn check_kvm() -> std::result::Result<(), String> {
    let kvm = open_kvm().map_err(|e| e.to_string())?;
    kvm.create_vm()
        .map(drop)
        .map_err(|e| format!("KVM_CREATE_VM: {e}"))
}

/// A KVM VM with its memory registered and its interrupt controllers created.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM and maps `memory` into it, one slot per region.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Self> {
        Self::with_dirty_logging(memory, false)
    }

    /// As [`Vm::new`], with KVM's dirty page log on from the start when `log_dirty` (cheaper
    /// than turning it on later, which rebuilds every memory slot).
    pub fn with_dirty_logging(memory: &GuestMemoryMmap, log_dirty: bool) -> Result<Self> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        set_memory_slots(&fd, memory, log_dirty)?;
        // Intel VMX needs three pages for the real-mode TSS; harmless elsewhere.
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        // The speaker port is not emulated: the dummy flag keeps the PIT from claiming it.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Turns KVM's dirty page logging on or off for every memory slot.
    pub fn set_dirty_logging(&self, memory: &GuestMemoryMmap, enabled: bool) -> Result<()> {
        set_memory_slots(&self.fd, memory, enabled)
    }

    /// The VM's file descriptor, for vCPUs, irqfds and ioeventfds.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID KVM can offer, before per-vCPU normalisation.
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
    }
}

/// Registers (or re-registers) one KVM memory slot per region of `memory`.
fn set_memory_slots(fd: &VmFd, memory: &GuestMemoryMmap, log_dirty: bool) -> Result<()> {
    for (slot, (host, guest, size)) in memory::regions(memory).into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: guest.0,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping of `size` bytes owned by `memory`, which the
        // VMM keeps alive (at the same address) for as long as the VM exists.
        unsafe { fd.set_user_memory_region(region) }.map_err(Error::kvm(format!(
            "KVM_SET_USER_MEMORY_REGION slot {slot}"
        )))?;
    }
    Ok(())
}
