//! The VM-wide state KVM holds: the PIT, the kvmclock, and the irqchip (two PICs and the
//! IOAPIC). Saved before the vCPUs, restored before them.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::Vm;
use crate::error::{Error, Result};
use crate::persist::Persist;

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

impl Persist for Vm {
    type State = VmKvmState;
    type SaveArgs<'a> = ();
    type RestoreArgs<'a> = ();

    /// Reads the PIT, the clock and the three irqchips.
    fn save(&self, _args: ()) -> Result<VmKvmState> {
        let pit = self.fd().get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?;
        let clock = self.fd().get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
        let mut irqchips = Vec::new();
        for (chip_id, name) in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd()
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

    /// The saved irqchips must be the PIC master, PIC slave and IOAPIC, in that order.
    fn check(&self, state: &VmKvmState) -> Result<()> {
        if state.irqchips.len() != IRQCHIPS.len() {
            return Err(Error::Config(format!(
                "saved VM state has {} irqchips, expected {}",
                state.irqchips.len(),
                IRQCHIPS.len()
            )));
        }
        for (chip, (chip_id, name)) in state.irqchips.iter().zip(IRQCHIPS) {
            if chip.chip_id != chip_id {
                return Err(Error::Config(format!(
                    "saved irqchip {} where the {name} belongs",
                    chip.chip_id
                )));
            }
        }
        Ok(())
    }

    /// Writes the PIT, the clock value and the irqchips.
    fn restore(&self, _args: (), state: &VmKvmState) -> Result<()> {
        self.check(state)?;
        self.fd()
            .set_pit2(&state.pit)
            .map_err(Error::kvm("KVM_SET_PIT2"))?;
        // Only the clock value is settable; the flags describe the host it was read on.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd()
            .set_clock(&clock)
            .map_err(Error::kvm("KVM_SET_CLOCK"))?;
        for (chip, (_, name)) in state.irqchips.iter().zip(IRQCHIPS) {
            self.fd()
                .set_irqchip(chip)
                .map_err(Error::kvm(format!("KVM_SET_IRQCHIP ({name})")))?;
        }
        Ok(())
    }
}
