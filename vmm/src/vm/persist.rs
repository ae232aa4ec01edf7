//! The VM-wide state KVM holds: the PIT, the kvmclock, and the irqchip (two PICs and the
//! IOAPIC). Saved before the vCPUs, restored before them.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::Vm;
use crate::error::{Error, Result};

/// The VM's interrupt controllers and timers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock's value.
    pub clock: kvm_clock_data,
    /// The master PIC, the slave PIC and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
}

const IRQCHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

/// Saves the VM-wide state.
pub fn save(vm: &Vm) -> Result<VmKvmState> {
    let pit = vm.fd().get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?;
    let clock = vm.fd().get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
    let mut irqchips = Vec::new();
    for (chip_id, name) in IRQCHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.fd()
            .get_irqchip(&mut chip)
            .map_err(Error::kvm(format!("KVM_GET_IRQCHIP ({name})")))?;
        irqchips.push(chip);
    }
    Ok(VmKvmState {
        pit,
        clock,
        irqchips,
    })
}

/// Restores the VM-wide state.
pub fn restore(vm: &Vm, state: &VmKvmState) -> Result<()> {
    if state.irqchips.len() != IRQCHIPS.len() {
        return Err(Error::Config(format!(
            "saved VM state has {} irqchips, expected {}",
            state.irqchips.len(),
            IRQCHIPS.len()
        )));
    }
    vm.fd()
        .set_pit2(&state.pit)
        .map_err(Error::kvm("KVM_SET_PIT2"))?;
    // Only the clock value is settable; the flags describe the host it was read on.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.fd()
        .set_clock(&clock)
        .map_err(Error::kvm("KVM_SET_CLOCK"))?;
    for (chip, (chip_id, name)) in state.irqchips.iter().zip(IRQCHIPS) {
        if chip.chip_id != chip_id {
            return Err(Error::Config(format!(
                "saved irqchip {} where the {name} belongs",
                chip.chip_id
            )));
        }
        vm.fd()
            .set_irqchip(chip)
            .map_err(Error::kvm(format!("KVM_SET_IRQCHIP ({name})")))?;
    }
    Ok(())
}
