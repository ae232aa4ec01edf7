//! virtio devices over the virtio-mmio (version 2) transport.
//!
//! A device implements [`VirtioDevice`]: it describes its queues, features and config space,
//! and on [`VirtioDevice::activate`] takes ownership of the guest-configured queues, each with
//! the eventfd KVM signals on a notify (ioeventfd), and raises interrupts through
//! [`Interrupt`] (an irqfd on the device's GSI).

pub mod block;
pub mod mmio;
pub mod persist;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Feature bit: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event indexes suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// A device's interrupt line: the status the guest reads from `InterruptStatus`, and the irqfd
/// KVM turns into an edge on the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// The device hit an error it cannot recover from (a broken ring) and needs a reset:
    /// the transport shows DEVICE_NEEDS_RESET until the driver resets the device.
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt line with no pending cause.
    pub fn new() -> Result<Arc<Self>> {
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating a virtio irqfd"))?;
        Ok(Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }))
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The pending causes (`InterruptStatus`).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the causes the guest acknowledged (`InterruptACK`).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Signals `cause` (one of the `VIRTIO_MMIO_INT_*` bits).
    pub fn trigger(&self, cause: u32) {
        self.status.fetch_or(cause, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    /// Sets the pending causes (restoring a checkpoint, whose status register carries any
    /// reset the device needed); raises no interrupt.
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Forgets every pending cause and a needed reset (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Reports that the device needs a reset (virtio 1.2 §2.1.2): the transport shows
    /// DEVICE_NEEDS_RESET, and the driver gets a configuration change interrupt.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Whether the device reported that it needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}

/// A queue handed to a device on activation: the queue and the eventfd signalled when the
/// guest notifies it.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index in the device.
    pub index: u16,
    /// The guest-configured queue.
    pub queue: Queue,
    /// Becomes readable on every `QueueNotify` for this queue (a duplicate of the
    /// transport's ioeventfd).
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory, for the queues and buffers.
    pub memory: GuestMemoryMmap,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The queues the driver made ready.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 for block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device's configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the guest's queues.
    fn activate(&mut self, activation: Activation) -> Result<()>;
    /// Stops serving and waits for in-flight work to finish; the device can be activated
    /// again afterwards.
    fn reset(&mut self);
    /// Stops serving once in-flight requests complete and hands back every active queue,
    /// with its ring positions, by index: for a checkpoint. Requests the guest posted but
    /// the device had not taken stay in the rings. [`VirtioDevice::activate`] resumes.
    fn quiesce(&mut self) -> Vec<(u16, Queue)>;
}
