//! Model-specific registers a vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};

use crate::error::{Error, Result};

/// SYSENTER code segment.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER stack pointer.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER entry point.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// Miscellaneous feature enables.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `MISC_ENABLE` bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// Default memory type and MTRR enable.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// SYSCALL segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS mask applied on SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// GS base swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MTRRs enabled (bit 11), default type write-back (6): all RAM cacheable, as firmware
/// leaves it.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// The MSRs every vCPU is reset to before its first run, as a PC's firmware would leave them.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes the boot MSRs into `vcpu`; fails naming the first MSR KVM refused.
pub fn setup(vcpu: &kvm_ioctls::VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("boot MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        // KVM stops at the first MSR it refuses: name it.
        let index = entries.get(written).map(|e| e.index).unwrap_or_default();
        return Err(Error::Kvm {
            what: format!("KVM_SET_MSRS (MSR {index:#x} refused)"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}
