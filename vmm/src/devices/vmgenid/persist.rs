//! What a checkpoint records of the VM generation ID device, and the load that changes the
//! ID: memory comes back holding the generation that was saved, and every load (restore,
//! revert, stream, clone) must leave the guest a new one.

use serde::{Deserialize, Serialize};

use super::{hex, VmGenId};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::vm::Vm;

/// The device at checkpoint time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGenIdState {
    /// Guest-physical address of the ID.
    pub addr: u64,
    /// The GSI a change is announced on.
    pub gsi: u32,
    /// The generation the guest saw when the checkpoint was taken, 32 hex digits (for
    /// information: a load always writes a new one).
    pub generation: String,
}

/// What a load needs: the VM (to raise the change interrupt) and guest memory (to write
/// the new ID into, after the checkpoint's memory is in place).
#[derive(Clone, Copy)]
pub struct VmGenIdRestoreArgs<'a> {
    /// The KVM VM.
    pub vm: &'a Vm,
    /// Guest RAM, already loaded from the checkpoint.
    pub memory: &'a GuestMemoryMmap,
}

impl std::fmt::Debug for VmGenIdRestoreArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGenIdRestoreArgs").finish_non_exhaustive()
    }
}

impl Persist for VmGenId {
    type State = VmGenIdState;
    type SaveArgs<'a> = &'a GuestMemoryMmap;
    type RestoreArgs<'a> = VmGenIdRestoreArgs<'a>;

    fn save(&self, memory: &GuestMemoryMmap) -> Result<VmGenIdState> {
        Ok(VmGenIdState {
            addr: self.addr,
            gsi: self.gsi,
            generation: hex(&self.read(memory)?),
        })
    }

    /// The ID must sit where this VM's tables say it does: a guest that learned another
    /// address at boot would never see the change.
    fn check(&self, state: &VmGenIdState) -> Result<()> {
        if state.addr != self.addr || state.gsi != self.gsi {
            return Err(Error::Device {
                device: "vmgenid".into(),
                message: format!(
                    "saved at {:#x} (GSI {}), this VM has it at {:#x} (GSI {})",
                    state.addr, state.gsi, self.addr, self.gsi
                ),
            });
        }
        Ok(())
    }

    /// Writes a new generation over the one memory came back with and announces it.
    fn restore(&self, args: VmGenIdRestoreArgs<'_>, state: &VmGenIdState) -> Result<()> {
        self.check(state)?;
        let id = self.change(args.vm, args.memory)?;
        tracing::info!(saved = %state.generation, now = %hex(&id), "new VM generation ID");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_another_address() {
        let device = VmGenId::default();
        let mut state = VmGenIdState {
            addr: device.addr,
            gsi: device.gsi,
            generation: "00".repeat(16),
        };
        device.check(&state).unwrap();
        state.addr += 0x1000;
        assert!(device
            .check(&state)
            .unwrap_err()
            .to_string()
            .contains("vmgenid"));
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = VmGenIdState {
            addr: 0xff000,
            gsi: 3,
            generation: "ab".repeat(16),
        };
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<VmGenIdState>(&text).unwrap(), state);
    }
}
