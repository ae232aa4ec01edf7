//! The saved state of a virtio-mmio transport: its registers and each queue's addresses and
//! ring positions.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::mmio::{MmioTransport, PersistRegisters};
use crate::error::{Error, Result};
use crate::persist::Persist;

/// One virtqueue: what the driver configured and how far the device got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked it ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl QueueSnapshot {
    /// The snapshot of `queue`.
    pub fn of(queue: &Queue) -> Self {
        let state = queue.state();
        QueueSnapshot {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx: state.event_idx_enabled,
        }
    }

    /// A queue in this state; refuses sizes the device never offered.
    pub fn to_queue(&self, device_max: u16) -> std::result::Result<Queue, String> {
        if self.max_size != device_max || self.size > device_max {
            return Err(format!(
                "queue sizes {}/{} do not fit the device's maximum {device_max}",
                self.size, self.max_size
            ));
        }
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("queue state: {e}"))
    }
}

/// A virtio-mmio transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device type behind it (checked on restore).
    pub device_type: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// The device status.
    pub status: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
}

/// The transport is shared with the MMIO bus the vCPUs drive: it is saved and restored
/// through its lock.
impl Persist for parking_lot::Mutex<MmioTransport> {
    type State = MmioTransportState;
    type SaveArgs<'a> = ();
    type RestoreArgs<'a> = ();

    /// The transport's state; quiesce it first, or an active device's queues are missing.
    fn save(&self, _args: ()) -> Result<MmioTransportState> {
        save(&self.lock())
    }

    /// Checks `state` fits this transport's device without changing anything.
    fn check(&self, state: &MmioTransportState) -> Result<()> {
        let transport = self.lock();
        queues_of(&transport, state).map(drop)
    }

    /// Loads `state`: the device stops (waiting for its requests), the registers and queues
    /// take the saved values, and the transport is left quiesced: [`MmioTransport::resume`]
    /// restarts the device once guest memory holds the checkpoint too.
    fn restore(&self, _args: (), state: &MmioTransportState) -> Result<()> {
        let mut transport = self.lock();
        let queues = queues_of(&transport, state)?;
        let regs = PersistRegisters {
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            status: state.status,
            interrupt_status: state.interrupt_status,
            active: false,
            quiesced: true,
        };
        transport.restore_parts(&regs, queues);
        Ok(())
    }
}

fn save(transport: &MmioTransport) -> Result<MmioTransportState> {
    let (regs, queues) = transport.persist_parts();
    if regs.active && !regs.quiesced {
        return Err(Error::Device {
            device: transport.name().to_string(),
            message: "saved while its queues are running (not quiesced)".into(),
        });
    }
    Ok(MmioTransportState {
        device_type: transport.device().device_type(),
        device_features_select: regs.device_features_select,
        driver_features_select: regs.driver_features_select,
        driver_features: regs.driver_features,
        queue_select: regs.queue_select,
        status: regs.status,
        interrupt_status: regs.interrupt_status,
        queues: queues.iter().map(QueueSnapshot::of).collect(),
    })
}

/// The queues `state` describes, after checking it fits the transport's device.
fn queues_of(transport: &MmioTransport, state: &MmioTransportState) -> Result<Vec<Queue>> {
    let invalid = |message: String| Error::Device {
        device: transport.name().to_string(),
        message,
    };
    let device = transport.device();
    if state.device_type != device.device_type() {
        return Err(invalid(format!(
            "saved device type {}, this device is type {}",
            state.device_type,
            device.device_type()
        )));
    }
    let max_sizes = device.queue_max_sizes();
    if state.queues.len() != max_sizes.len() {
        return Err(invalid(format!(
            "saved {} queues, the device has {}",
            state.queues.len(),
            max_sizes.len()
        )));
    }
    let mut queues = Vec::with_capacity(max_sizes.len());
    for (index, (queue, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
        queues.push(
            queue
                .to_queue(max)
                .map_err(|e| invalid(format!("queue {index}: {e}")))?,
        );
    }
    Ok(queues)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::block::{Block, BlockConfig, MemoryDisk};

    fn transport() -> parking_lot::Mutex<MmioTransport> {
        let memory = crate::memory::create(4 << 20).unwrap();
        let block = Block::new(BlockConfig::new("vda"), Arc::new(MemoryDisk::new(4096))).unwrap();
        parking_lot::Mutex::new(
            MmioTransport::new("virtio-blk vda", Box::new(block), memory).unwrap(),
        )
    }

    fn check_error(
        transport: &parking_lot::Mutex<MmioTransport>,
        state: &MmioTransportState,
    ) -> String {
        transport.check(state).unwrap_err().to_string()
    }

    #[test]
    fn registers_and_queues_round_trip() {
        let source = transport();
        {
            let mut source = source.lock();
            // ACKNOWLEDGE | DRIVER | FEATURES_OK (features 0 are refused: VERSION_1
            // missing), then a queue configured but the device not started.
            source.write(0x070, &3u32.to_le_bytes());
            source.write(0x024, &1u32.to_le_bytes());
            source.write(0x020, &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
            source.write(0x070, &11u32.to_le_bytes());
            source.write(0x038, &64u32.to_le_bytes());
            source.write(0x080, &0x10000u32.to_le_bytes());
        }
        let state = source.save(()).unwrap();
        assert_eq!(state.status, 11);
        assert_eq!(state.queues[0].size, 64);
        assert_eq!(state.queues[0].desc_table, 0x10000);

        let target = transport();
        target.restore((), &state).unwrap();
        target.lock().resume().unwrap();
        assert_eq!(target.save(()).unwrap(), state);
    }

    #[test]
    fn refuses_states_of_another_device() {
        let target = transport();
        let good = target.save(()).unwrap();
        let mut other_type = good.clone();
        other_type.device_type = 1;
        assert!(check_error(&target, &other_type).contains("device type"));
        let mut more_queues = good.clone();
        more_queues.queues.push(more_queues.queues[0]);
        assert!(check_error(&target, &more_queues).contains("2 queues"));
        let mut bigger = good.clone();
        bigger.queues[0].max_size = 1024;
        bigger.queues[0].size = 1024;
        assert!(check_error(&target, &bigger).contains("maximum"));
        // A refused restore changes nothing.
        assert!(target.restore((), &bigger).is_err());
        assert_eq!(target.save(()).unwrap(), good);
    }
}
