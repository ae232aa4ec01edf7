//! A vCPU's saved state, and the order it is read and written in (DESIGN §5).
//!
//! Save: MP_STATE first (it flushes pending events into the other state), REGS, SREGS,
//! XSAVE, XCRS, DEBUGREGS, LAPIC, TSC_KHZ, CPUID2, MSRS, VCPU_EVENTS last. Restore: CPUID2
//! first (it decides which MSRs and XSAVE features exist), MP_STATE, REGS, SREGS, XSAVE,
//! XCRS, DEBUGREGS, LAPIC, MSRS (TSC before TSC_DEADLINE), VCPU_EVENTS, then KVMCLOCK_CTRL
//! to tell a paravirtual guest its clock stood still.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::persist::Persist;

/// MSR ranges worth saving: those a guest or KVM's paravirtual features keep state in.
/// Anything else KVM lists (performance counters, machine-check banks) is reset state.
const MSR_RANGES: &[(u32, u32)] = &[
    (0x10, 0x10),               // TSC
    (0x11, 0x12),               // kvmclock (old)
    (0x1b, 0x1b),               // APIC base
    (0x3a, 0x3b),               // feature control, TSC_ADJUST
    (0x48, 0x48),               // SPEC_CTRL
    (0x174, 0x176),             // SYSENTER
    (0x1a0, 0x1a0),             // MISC_ENABLE
    (0x200, 0x26f),             // variable and fixed MTRRs
    (0x277, 0x277),             // PAT
    (0x2ff, 0x2ff),             // MTRR default type
    (0x6e0, 0x6e0),             // TSC_DEADLINE (after TSC: ascending order)
    (0xc000_0081, 0xc000_0084), // STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xc000_0102, 0xc000_0103), // KERNEL_GS_BASE, TSC_AUX
    (0x4b56_4d00, 0x4b56_4dff), // kvmclock and other KVM paravirtual MSRs
];

/// The MSRs to save on this host: KVM's index list filtered by an allowlist (the TSC,
/// SYSENTER/SYSCALL, MTRRs, PAT, TSC_DEADLINE, kvmclock and KVM's paravirtual range), ascending.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut msrs: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|index| {
            MSR_RANGES
                .iter()
                .any(|&(first, last)| (first..=last).contains(index))
        })
        .collect();
    msrs.sort_unstable();
    msrs.dedup();
    Ok(msrs)
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index.
    pub index: u8,
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The saved MSRs.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
}

/// Reads the MSRs in `indices`, skipping any this KVM refuses to read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut wanted: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    loop {
        let mut msrs =
            Msrs::from_entries(&wanted).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        if read >= wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // KVM stops at the first MSR it cannot read: drop it and read again.
        tracing::debug!("KVM_GET_MSRS: skipping MSR {:#x}", wanted[read].index);
        wanted.remove(read);
    }
}

/// What saving a vCPU needs besides its fd.
#[derive(Debug, Clone, Copy)]
pub struct VcpuSaveArgs<'a> {
    /// The vCPU's index (recorded, and named in errors).
    pub index: u8,
    /// The MSRs to read ([`msr_list`]).
    pub msrs: &'a [u32],
}

/// How a vCPU is being restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuRestoreArgs {
    /// A fresh vCPU that never ran: CPUID can only be set then, and must be; the TSC rate
    /// is set too.
    pub first_time: bool,
}

impl Persist for VcpuFd {
    type State = VcpuState;
    type SaveArgs<'a> = VcpuSaveArgs<'a>;
    type RestoreArgs<'a> = VcpuRestoreArgs;

    /// Saves the vCPU's state; it must be outside `KVM_RUN`.
    fn save(&self, args: VcpuSaveArgs<'_>) -> Result<VcpuState> {
        save(self, args.index, args.msrs)
    }

    /// The saved CPUID and MSR lists must fit KVM's arrays.
    fn check(&self, state: &VcpuState) -> Result<()> {
        let index = state.index;
        CpuId::from_entries(&state.cpuid)
            .map_err(|e| Error::Config(format!("vCPU {index}: saved CPUID: {e:?}")))?;
        Msrs::from_entries(&state.msrs)
            .map_err(|e| Error::Config(format!("vCPU {index}: saved MSRs: {e:?}")))?;
        Ok(())
    }

    /// Writes the state into the vCPU, outside `KVM_RUN`.
    fn restore(&self, args: VcpuRestoreArgs, state: &VcpuState) -> Result<()> {
        restore(self, state, args.first_time)
    }
}

fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState> {
    let what = |ioctl: &str| format!("{ioctl} (vCPU {index})");
    let mp_state = fd
        .get_mp_state()
        .map_err(Error::kvm(what("KVM_GET_MP_STATE")))?;
    let regs = fd.get_regs().map_err(Error::kvm(what("KVM_GET_REGS")))?;
    let sregs = fd.get_sregs().map_err(Error::kvm(what("KVM_GET_SREGS")))?;
    let xsave = fd.get_xsave().map_err(Error::kvm(what("KVM_GET_XSAVE")))?;
    let xcrs = fd.get_xcrs().map_err(Error::kvm(what("KVM_GET_XCRS")))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(Error::kvm(what("KVM_GET_DEBUGREGS")))?;
    let lapic = fd.get_lapic().map_err(Error::kvm(what("KVM_GET_LAPIC")))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm(what("KVM_GET_CPUID2")))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, msr_indices)?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(Error::kvm(what("KVM_GET_VCPU_EVENTS")))?;
    Ok(VcpuState {
        index,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        cpuid,
        msrs,
        vcpu_events,
    })
}

/// Writes `state` into a vCPU outside `KVM_RUN`; `first_time` for a fresh vCPU (CPUID can
/// only be set before the vCPU first runs, and must be then).
fn restore(fd: &VcpuFd, state: &VcpuState, first_time: bool) -> Result<()> {
    let index = state.index;
    let what = |ioctl: &str| format!("{ioctl} (vCPU {index})");
    // A VM shell's vCPU may already have exactly the saved CPUID (`Vcpu::create_with_cpuid`):
    // setting it again would cost as much as the first time (KVM recomputes the vCPU's
    // derived state), so it is compared first; a fresh vCPU has none and gets it.
    let already_set = || {
        fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .is_ok_and(|current| current.as_slice() == state.cpuid.as_slice())
    };
    if first_time && !already_set() {
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|e| Error::Config(format!("vCPU {index}: saved CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm(what("KVM_SET_CPUID2")))?;
    }
    fd.set_mp_state(state.mp_state)
        .map_err(Error::kvm(what("KVM_SET_MP_STATE")))?;
    fd.set_regs(&state.regs)
        .map_err(Error::kvm(what("KVM_SET_REGS")))?;
    fd.set_sregs(&state.sregs)
        .map_err(Error::kvm(what("KVM_SET_SREGS")))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE returned it; KVM checks
    // the features it enables against the CPUID just set.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(Error::kvm(what("KVM_SET_XSAVE")))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(Error::kvm(what("KVM_SET_XCRS")))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(Error::kvm(what("KVM_SET_DEBUGREGS")))?;
    fd.set_lapic(&state.lapic)
        .map_err(Error::kvm(what("KVM_SET_LAPIC")))?;
    if first_time {
        if let Some(khz) = state.tsc_khz {
            // Scaling may be unsupported; the guest then sees the host's rate.
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::debug!("vCPU {index}: KVM_SET_TSC_KHZ {khz}: {e}");
            }
        }
    }
    let msrs = Msrs::from_entries(&state.msrs)
        .map_err(|e| Error::Config(format!("vCPU {index}: saved MSRs: {e:?}")))?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(Error::kvm(what("KVM_SET_MSRS")))?;
    if written != state.msrs.len() {
        let msr = state.msrs.get(written).map(|e| e.index).unwrap_or_default();
        return Err(Error::Kvm {
            what: format!("KVM_SET_MSRS (vCPU {index}, MSR {msr:#x} refused)"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(Error::kvm(what("KVM_SET_VCPU_EVENTS")))?;
    // Only meaningful for a guest using kvmclock; EINVAL otherwise.
    if let Err(e) = fd.kvmclock_ctrl() {
        tracing::trace!("vCPU {index}: KVM_KVMCLOCK_CTRL: {e}");
    }
    Ok(())
}
