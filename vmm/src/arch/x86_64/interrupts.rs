//! Local APIC setup: LINT0 delivers the legacy PIC's ExtINT, LINT1 delivers NMIs, as a PC's
//! firmware programs them (the guest relies on it for the timer check and NMI watchdog).

use kvm_bindings::kvm_lapic_state;

use crate::error::{Error, Result};

/// Offset of the LVT LINT0 register in the LAPIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC page.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

fn get_register(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_register(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = byte as _;
    }
}

/// Replaces the delivery-mode field (bits 8-10) of an LVT entry.
fn with_delivery_mode(register: u32, mode: u32) -> u32 {
    (register & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT and LINT1 as NMI in `state`.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = get_register(state, APIC_LVT0);
    set_register(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_register(state, APIC_LVT1);
    set_register(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Programs the vCPU's LAPIC LINT0/LINT1 (needs the in-kernel irqchip).
pub fn setup(vcpu: &kvm_ioctls::VcpuFd) -> Result<()> {
    let mut state = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    set_lint(&mut state);
    vcpu.set_lapic(&state).map_err(Error::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut state = kvm_lapic_state::default();
        set_register(&mut state, APIC_LVT0, 0x0001_0700);
        set_lint(&mut state);
        assert_eq!(get_register(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_register(&state, APIC_LVT1), 0x400);
    }
}
