//! What a checkpoint records about the vsock device, and what loading one does to it.
//!
//! The device holds no guest-visible state beyond its queues (saved with its virtio-mmio
//! transport) and its CID: its connections are to host programs, which do not follow a
//! checkpoint. So, as in Firecracker, a load drops every connection and owes the guest a
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET ([`super::Vsock::reset_transport`]); the guest's
//! driver then forgets its connections and its listeners take new ones.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::machine::AttachedVsock;
use crate::persist::Persist;

/// The vsock device at checkpoint time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID (the guest's driver read it once: a load must not change it).
    pub guest_cid: u64,
    /// The host-side Unix socket the device listened on (a restore in a new process binds
    /// it again unless told another).
    pub uds: PathBuf,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt.
    pub gsi: u32,
}

impl VsockState {
    fn of(vsock: &AttachedVsock) -> Self {
        VsockState {
            guest_cid: vsock.config.guest_cid,
            uds: vsock.config.uds.clone(),
            mmio_base: vsock.mmio_base,
            gsi: vsock.gsi,
        }
    }
}

/// Saving records the CID and the window; loading checks they match (the host socket may
/// differ: it is the host's business) and resets the transport. The device's queues are
/// its transport's, saved and loaded with it; load the transport first.
impl Persist for AttachedVsock {
    type State = VsockState;
    type SaveArgs<'a> = ();
    type RestoreArgs<'a> = ();

    fn save(&self, _args: ()) -> Result<VsockState> {
        Ok(VsockState::of(self))
    }

    fn check(&self, state: &VsockState) -> Result<()> {
        let current = VsockState::of(self);
        let mismatch = |what: &str, saved: String, now: String| Error::Device {
            device: format!("virtio-vsock cid {}", current.guest_cid),
            message: format!("the checkpoint's {what} is {saved}, this device's is {now}"),
        };
        if state.guest_cid != current.guest_cid {
            return Err(mismatch(
                "guest CID",
                state.guest_cid.to_string(),
                current.guest_cid.to_string(),
            ));
        }
        if (state.mmio_base, state.gsi) != (current.mmio_base, current.gsi) {
            return Err(mismatch(
                "window",
                format!("{:#x} (GSI {})", state.mmio_base, state.gsi),
                format!("{:#x} (GSI {})", current.mmio_base, current.gsi),
            ));
        }
        Ok(())
    }

    /// Drops every host connection and queues the transport reset event for the guest; the
    /// device must be quiesced (the checkpoint code loads into quiesced devices).
    fn restore(&self, _args: (), state: &VsockState) -> Result<()> {
        self.check(state)?;
        self.device.lock().reset_transport();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::vsock::device::{SharedVsock, Vsock, VsockConfig};

    /// A vsock device behind its transport, as the builder attaches it.
    fn attached(dir: &std::path::Path, cid: u64) -> AttachedVsock {
        let config = VsockConfig {
            guest_cid: cid,
            uds: dir.join(format!("v{cid}.sock")),
        };
        let (shared, device) = SharedVsock::new(Vsock::new(config.clone()).unwrap());
        let memory = crate::memory::create(4 << 20).unwrap();
        let transport = MmioTransport::new("virtio-vsock", Box::new(shared), memory).unwrap();
        AttachedVsock {
            config,
            device,
            transport: Arc::new(parking_lot::Mutex::new(transport)),
            mmio_base: 0xd000_1000,
            gsi: 6,
        }
    }

    #[test]
    fn state_round_trips_and_a_load_resets_the_transport() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = attached(dir.path(), 3);
        let state = vsock.save(()).unwrap();
        assert_eq!(state.guest_cid, 3);
        assert_eq!(state.uds, dir.path().join("v3.sock"));
        let json = serde_json::to_string(&state).unwrap();
        let back: VsockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        // The transport's state goes through its own Persist.
        let transport_state = vsock.transport.save(()).unwrap();
        assert_eq!(
            transport_state.device_type,
            crate::devices::virtio::vsock::DEVICE_TYPE
        );
        assert_eq!(transport_state.queues.len(), 3);
        vsock.transport.restore((), &transport_state).unwrap();
        vsock.restore((), &back).unwrap();
        vsock.transport.lock().resume().unwrap();
        // The config space still shows the CID.
        let mut cid = [0u8; 8];
        vsock.transport.lock().read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
    }

    #[test]
    fn refuses_another_cid_or_window_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = attached(dir.path(), 5);
        let good = vsock.save(()).unwrap();
        let mut other = good.clone();
        other.guest_cid = 6;
        let message = vsock.restore((), &other).unwrap_err().to_string();
        assert!(message.contains("guest CID is 6"), "{message}");
        let mut moved = good.clone();
        moved.mmio_base = 0xd000_2000;
        let message = vsock.check(&moved).unwrap_err().to_string();
        assert!(message.contains("window"), "{message}");
        // Another host socket is the host's business.
        let mut elsewhere = good.clone();
        elsewhere.uds = dir.path().join("elsewhere.sock");
        vsock.check(&elsewhere).unwrap();
        assert_eq!(vsock.save(()).unwrap(), good);
    }
}
