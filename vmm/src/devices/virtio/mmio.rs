//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! The register file is driven by vCPU threads through the MMIO bus. Queue notifications do
//! not come this way: each queue's `QueueNotify` write is an ioeventfd (registered by the
//! VMM with a data match on the queue index), so KVM signals the device's worker without a
//! trip to user space. A notify that does reach the register file (no ioeventfd) is
//! forwarded to the same eventfd.
//!
//! The guest is not trusted: out-of-range selectors, writes in the wrong device state and
//! odd access widths are ignored with a log line, never acted upon.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version implemented.
pub const MMIO_VERSION: u32 = 2;
/// Offset of the `QueueNotify` register, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

/// Register offsets.
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and must be reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The transport's registers as a checkpoint saves them (the `persist` module beside this one
/// converts them to and from its saved form).
#[derive(Debug, Clone, Copy)]
pub(super) struct PersistRegisters {
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub quiesced: bool,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    name: String,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    /// The device's queues are back in `queues` for a checkpoint; [`MmioTransport::resume`]
    /// hands them to the device again.
    quiesced: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; `name` appears in log lines ("virtio-blk vda").
    pub fn new(
        name: impl Into<String>,
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
    ) -> Result<Self> {
        let name = name.into();
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|e| Error::Device {
                device: name.clone(),
                message: format!("queue of size {size}: {e}"),
            })?);
            notify.push(
                EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating a queue eventfd"))?,
            );
        }
        Ok(MmioTransport {
            name,
            device,
            memory,
            interrupt: Interrupt::new()?,
            queues,
            notify,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            quiesced: false,
        })
    }

    /// The device's interrupt line (register its irqfd with KVM).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Each queue's notify eventfd, by queue index (register them as ioeventfds).
    pub fn notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device status register, with DEVICE_NEEDS_RESET if the device reported an
    /// error it cannot recover from.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The transport's name ("virtio-blk vda").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Whether the driver has started the device.
    fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Stops the device once its in-flight requests complete and takes its queues back, so
    /// their state can be saved. Idempotent.
    pub fn quiesce(&mut self) {
        if self.quiesced || !self.is_active() {
            return;
        }
        for (index, queue) in self.device.quiesce() {
            if let Some(slot) = self.queues.get_mut(usize::from(index)) {
                *slot = queue;
            }
        }
        self.quiesced = true;
    }

    /// Restarts a quiesced device on its queues and kicks every queue, so requests the
    /// guest posted meanwhile are served.
    pub fn resume(&mut self) -> Result<()> {
        if !self.quiesced {
            return Ok(());
        }
        self.quiesced = false;
        if !self.is_active() {
            return Ok(());
        }
        self.activate()?;
        for event in &self.notify {
            event
                .write(1)
                .map_err(Error::io("kicking a queue after a checkpoint"))?;
        }
        Ok(())
    }

    /// Shuts the device down for good (the VM is ending): waits for in-flight requests.
    pub fn shutdown(&mut self) {
        if self.is_active() && !self.quiesced {
            self.device.reset();
        }
        self.quiesced = false;
    }

    /// Registers and queues as the persist module reads them.
    pub(super) fn persist_parts(&self) -> (PersistRegisters, &[Queue]) {
        (
            PersistRegisters {
                device_features_select: self.device_features_select,
                driver_features_select: self.driver_features_select,
                driver_features: self.driver_features,
                queue_select: self.queue_select,
                // A device that needs a reset still does after a restore.
                status: self.status(),
                interrupt_status: self.interrupt.status(),
                active: self.is_active(),
                quiesced: self.quiesced,
            },
            &self.queues,
        )
    }

    /// Replaces registers and queues from a checkpoint, stopping the device first.
    /// `regs.active` and `regs.quiesced` are ignored: they follow from the status.
    pub(super) fn restore_parts(&mut self, regs: &PersistRegisters, queues: Vec<Queue>) {
        if self.is_active() && !self.quiesced {
            self.device.reset();
        }
        self.device_features_select = regs.device_features_select;
        self.driver_features_select = regs.driver_features_select;
        self.driver_features = regs.driver_features;
        self.queue_select = regs.queue_select;
        self.status = regs.status;
        self.interrupt.set_status(regs.interrupt_status);
        self.queues = queues;
        // Resume activates the device on the restored queues if the driver had started it.
        self.quiesced = true;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Whether the status has all of `set` and none of `clear`.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.reset();
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (§2.1.1); anything else is ignored.
        if value & self.status != self.status {
            tracing::warn!(
                "{}: status {value:#x} drops bits of {:#x}",
                self.name,
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut value = value;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            tracing::warn!(
                "{}: refusing driver features {:#x}",
                self.name,
                self.driver_features
            );
            value &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                tracing::warn!("{}: DRIVER_OK before FEATURES_OK", self.name);
                return;
            }
            self.status = value;
            if let Err(e) = self.activate() {
                tracing::error!("{}: activation failed: {e}", self.name);
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
            return;
        }
        self.status = value;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<()> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.memory) {
                return Err(Error::Device {
                    device: self.name.clone(),
                    message: format!("queue {index} lies outside guest memory"),
                });
            }
            queue.set_event_idx(event_idx);
            let notify = self.notify[index]
                .try_clone()
                .map_err(Error::io("duplicating a queue eventfd"))?;
            let max_size = queue.max_size();
            let queue = std::mem::replace(
                queue,
                Queue::new(max_size).map_err(|e| Error::Device {
                    device: self.name.clone(),
                    message: e.to_string(),
                })?,
            );
            active.push(ActiveQueue {
                index: index as u16,
                queue,
                notify,
            });
        }
        if active.is_empty() {
            return Err(Error::Device {
                device: self.name.clone(),
                message: "DRIVER_OK with no queue ready".into(),
            });
        }
        self.device.activate(Activation {
            memory: self.memory.clone(),
            interrupt: self.interrupt.clone(),
            queues: active,
            acked_features: self.driver_features,
        })
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => 0,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .selected_queue()
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            reg::QUEUE_READY => self
                .selected_queue()
                .map(|q| u32::from(q.ready()))
                .unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // The configuration space never changes under the driver.
            reg::CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("{}: read of register {offset:#x}", self.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
        let queue_writable = self.status_is(FEATURES_OK, DRIVER_OK | FAILED);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                if !self.status_is(ACKNOWLEDGE | DRIVER, FEATURES_OK | FAILED) {
                    tracing::warn!(
                        "{}: features written in status {:#x}",
                        self.name,
                        self.status
                    );
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NOTIFY => match self.notify.get(value as usize) {
                Some(event) => {
                    if let Err(e) = event.write(1) {
                        tracing::warn!("{}: queue notify: {e}", self.name);
                    }
                }
                None => tracing::debug!("{}: notify of queue {value}", self.name),
            },
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !queue_writable {
                    tracing::warn!("{}: queue written in status {:#x}", self.name, self.status);
                    return;
                }
                let name = self.name.clone();
                let Some(queue) = self.selected_queue() else {
                    tracing::warn!("{name}: write to a queue that does not exist");
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => match u16::try_from(value) {
                        Ok(size) => queue.set_size(size),
                        Err(_) => tracing::warn!("{name}: queue size {value}"),
                    },
                    reg::QUEUE_READY => queue.set_ready(value == 1),
                    reg::QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
                    reg::QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
                    reg::QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
                    reg::QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
                    reg::QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
                    _ => queue.set_used_ring_address(None, Some(value)),
                }
            }
            _ => tracing::debug!("{}: write of register {offset:#x}", self.name),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and naturally aligned (§4.2.2.2).
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!("{}: {}-byte read at {offset:#x}", self.name, data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!("{}: {}-byte write at {offset:#x}", self.name, data.len());
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
