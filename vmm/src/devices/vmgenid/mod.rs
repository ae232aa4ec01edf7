//! VM generation ID (Microsoft's "Virtual Machine Generation ID", as QEMU and Firecracker
//! expose it): 16 bytes in guest memory that change whenever the VM may have been
//! duplicated or moved back in time, so a guest can reseed its RNGs and regenerate
//! identities.
//!
//! The ID lives at [`VMGENID_ADDR`], a page of the reserved BIOS area (E820 reserved, so
//! Linux never uses it as RAM; the micro-guest reads it at the address its boot info names).
//! A Linux guest finds it through the DSDT (`_HID "QEMUVGID"`, `_CID "VM_Gen_Counter"`, an
//! `ADDR` method answering the address package, see [`crate::arch::x86_64::acpi`]) and is
//! told of a change by a Generic Event Device interrupt on [`VMGENID_GSI`] whose `_EVT`
//! notifies the device (0x80), as Firecracker does.
//!
//! A fresh ID is written at boot, and again after every load of a checkpoint (restore in a
//! new process, revert in place, a VM-state stream, hence every clone and fork child):
//! memory comes back with the saved ID, and the load replaces it
//! ([`crate::persist::Persist`] in `persist`).

pub mod persist;

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{VMGENID_ADDR, VMGENID_GSI};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;
use crate::vm::Vm;

/// Bytes of the generation ID.
pub const VMGENID_LEN: usize = 16;

/// The generation ID device: where the ID sits and which interrupt announces a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGenId {
    /// Guest-physical address of the 16-byte ID.
    pub addr: u64,
    /// The GSI a change is announced on.
    pub gsi: u32,
}

impl Default for VmGenId {
    fn default() -> Self {
        VmGenId {
            addr: VMGENID_ADDR,
            gsi: VMGENID_GSI,
        }
    }
}

impl VmGenId {
    /// The ID the guest currently sees.
    pub fn read(&self, memory: &GuestMemoryMmap) -> Result<[u8; VMGENID_LEN]> {
        let mut id = [0u8; VMGENID_LEN];
        memory
            .read_slice(&mut id, GuestAddress(self.addr))
            .map_err(|e| {
                Error::Memory(format!(
                    "reading the VM generation ID at {:#x}: {e}",
                    self.addr
                ))
            })?;
        Ok(id)
    }

    /// Writes a fresh random ID into guest memory and returns it. No interrupt: at boot
    /// nothing listens yet.
    pub fn regenerate(&self, memory: &GuestMemoryMmap) -> Result<[u8; VMGENID_LEN]> {
        let id = random_id()?;
        memory
            .write_slice(&id, GuestAddress(self.addr))
            .map_err(|e| {
                Error::Memory(format!(
                    "writing the VM generation ID at {:#x}: {e}",
                    self.addr
                ))
            })?;
        Ok(id)
    }

    /// Writes a fresh ID and pulses the change interrupt (edge: raised then lowered), for a
    /// guest that has already read the old one.
    pub fn change(&self, vm: &Vm, memory: &GuestMemoryMmap) -> Result<[u8; VMGENID_LEN]> {
        let id = self.regenerate(memory)?;
        for level in [true, false] {
            vm.fd()
                .set_irq_line(self.gsi, level)
                .map_err(Error::kvm(format!(
                    "KVM_IRQ_LINE (vmgenid GSI {})",
                    self.gsi
                )))?;
        }
        tracing::debug!(generation = %hex(&id), "VM generation ID changed");
        Ok(id)
    }
}

/// 16 random bytes from the kernel's CSPRNG; never all zero (a guest reads zero as "no ID").
fn random_id() -> Result<[u8; VMGENID_LEN]> {
    let mut id = [0u8; VMGENID_LEN];
    let mut filled = 0;
    while filled < id.len() || id.iter().all(|b| *b == 0) {
        if filled == id.len() {
            filled = 0;
        }
        let rest = &mut id[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("getrandom for the VM generation ID")(e));
        }
        filled += n as usize;
    }
    Ok(id)
}

/// The ID as 32 lowercase hex digits, byte 0 first (how the micro-guest prints it).
pub fn hex(id: &[u8; VMGENID_LEN]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regenerate_writes_a_fresh_id() {
        let memory = crate::memory::create(2 << 20).unwrap();
        let device = VmGenId::default();
        assert_eq!(device.read(&memory).unwrap(), [0; VMGENID_LEN]);
        let first = device.regenerate(&memory).unwrap();
        assert_eq!(device.read(&memory).unwrap(), first);
        let second = device.regenerate(&memory).unwrap();
        assert_ne!(first, second);
        assert_eq!(hex(&second).len(), 32);
    }
}
