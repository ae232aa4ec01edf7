//! The virtio-blk device: features, config space, and one worker thread per active queue.
//!
//! Each worker owns its queue and sleeps on two eventfds: the queue's notify (an ioeventfd
//! KVM signals when the guest writes `QueueNotify`) and the device's stop event. Queues never
//! share state, so requests on different queues run in parallel on the disk, which is itself
//! safe for concurrent use.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskBackend;
use super::queue::serve_queue;
use super::request::{DiskLimits, RequestProcessor, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::{features, ID_BYTES, SECTOR_SHIFT, VIRTIO_ID_BLOCK};
use crate::devices::virtio::{
    Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Default number of queues per disk.
pub const DEFAULT_NUM_QUEUES: u16 = 1;
/// Default (and maximum) size of each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most queues a disk may have.
pub const MAX_NUM_QUEUES: u16 = 16;
/// Size of the config space we expose (`virtio_blk_config` up to `write_zeroes_may_unmap`).
pub const CONFIG_SIZE: usize = 60;

/// How a block device presents its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The name the guest reads with GET_ID (truncated to 20 bytes) and logs show.
    pub id: String,
    /// Refuse writes (offers VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Number of request queues (1..=16).
    pub num_queues: u16,
    /// Maximum size of each queue (a power of two, at most 32768).
    pub queue_size: u16,
}

impl BlockConfig {
    /// A writable single-queue disk named `id`.
    pub fn new(id: impl Into<String>) -> Self {
        BlockConfig {
            id: id.into(),
            read_only: false,
            num_queues: DEFAULT_NUM_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// A virtio-blk device on a [`DiskBackend`].
pub struct Block {
    config: BlockConfig,
    disk: Arc<dyn DiskBackend>,
    id: [u8; ID_BYTES],
    features: u64,
    config_space: [u8; CONFIG_SIZE],
    queue_sizes: Vec<u16>,
    stop: EventFd,
    workers: Vec<(u16, JoinHandle<Queue>)>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device presenting `disk` as `config` describes.
    pub fn new(config: BlockConfig, disk: Arc<dyn DiskBackend>) -> Result<Self> {
        config.check()?;
        Ok(Block {
            queue_sizes: vec![config.queue_size; usize::from(config.num_queues)],
            id: config.id_bytes(),
            features: config.features(),
            config_space: config.config_space(disk.size()),
            config,
            disk,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating a stop eventfd"))?,
            workers: Vec::new(),
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The disk it presents.
    pub fn disk(&self) -> &Arc<dyn DiskBackend> {
        &self.disk
    }

    /// Stops the workers and waits for the requests they are running; returns each
    /// worker's queue by index.
    fn stop_workers(&mut self) -> Vec<(u16, Queue)> {
        let mut queues = Vec::new();
        if self.workers.is_empty() {
            return queues;
        }
        if let Err(e) = self.stop.write(1) {
            tracing::error!("virtio-blk {}: stopping workers: {e}", self.config.id);
        }
        for (index, worker) in self.workers.drain(..) {
            match worker.join() {
                Ok(queue) => queues.push((index, queue)),
                Err(_) => {
                    tracing::error!("virtio-blk {}: a queue worker panicked", self.config.id)
                }
            }
        }
        // Consume the stop signal so the next activation starts clean.
        let _ = self.stop.read();
        queues
    }
}

impl BlockConfig {
    /// Checks the queue shape: 1..=16 queues of a power-of-two size in 4..=32768.
    pub fn check(&self) -> Result<()> {
        let invalid = |message: String| Error::Device {
            device: format!("virtio-blk {}", self.id),
            message,
        };
        if self.num_queues == 0 || self.num_queues > MAX_NUM_QUEUES {
            return Err(invalid(format!(
                "{} queues (1 to {MAX_NUM_QUEUES})",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > 32768 || self.queue_size < 4 {
            return Err(invalid(format!(
                "queue size {} is not a power of two in 4..=32768",
                self.queue_size
            )));
        }
        Ok(())
    }

    /// The GET_ID answer: the id's first 20 bytes, zero-padded.
    pub fn id_bytes(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let name = self.id.as_bytes();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name[..n]);
        id
    }

    /// The virtio feature bits offered for this disk, whatever the transport.
    pub fn features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << features::SEG_MAX)
            | (1 << features::BLK_SIZE)
            | (1 << features::FLUSH);
        if self.num_queues > 1 {
            features |= 1 << features::MQ;
        }
        if self.read_only {
            features |= 1 << features::RO;
        } else {
            features |= (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
        }
        features
    }

    /// Lays out `virtio_blk_config` (virtio 1.2 §5.2.4), little-endian, for a disk of
    /// `disk_size` bytes.
    pub fn config_space(&self, disk_size: u64) -> [u8; CONFIG_SIZE] {
        let mut space = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(disk_size >> SECTOR_SHIFT).to_le_bytes()); // capacity in sectors
                                                            // seg_max: the header and the status take two descriptors of a queue-sized chain.
        put(12, &u32::from(self.queue_size - 2).to_le_bytes());
        put(20, &512u32.to_le_bytes()); // blk_size
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        space
    }
}

/// Copies `config_space[offset..]` into `data`; bytes past its end read as zero.
pub fn read_config_space(config_space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config_space.get(start..) {
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // `writeback` is the only writable field and needs VIRTIO_BLK_F_CONFIG_WCE, which is
        // not offered: the cache mode is always write-back with FLUSH.
        tracing::debug!(
            "virtio-blk {}: config write at {offset:#x} ignored",
            self.config.id
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        self.stop_workers();
        let Activation {
            memory,
            interrupt,
            queues,
            acked_features: _,
        } = activation;
        for ActiveQueue {
            index,
            queue,
            notify,
        } in queues
        {
            let stop = self
                .stop
                .try_clone()
                .map_err(Error::io("duplicating the stop eventfd"))?;
            let worker = QueueWorker {
                name: format!("{}-q{index}", self.config.id),
                queue,
                notify,
                stop,
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                disk: self.disk.clone(),
                processor: RequestProcessor::new(),
                read_only: self.config.read_only,
                id: self.id,
                broken: false,
            };
            let handle = std::thread::Builder::new()
                .name(worker.name.clone())
                .spawn(move || {
                    crate::confine::enter_or_abort(crate::confine::ThreadKind::BlockWorker);
                    worker.run()
                })
                .map_err(Error::io("spawning a virtio-blk queue worker"))?;
            self.workers.push((index, handle));
        }
        tracing::debug!(
            "virtio-blk {}: activated with {} queue(s)",
            self.config.id,
            self.workers.len()
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
    }

    fn quiesce(&mut self) -> Vec<(u16, Queue)> {
        self.stop_workers()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Serves one queue until told to stop.
struct QueueWorker {
    name: String,
    queue: Queue,
    notify: EventFd,
    stop: EventFd,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    disk: Arc<dyn DiskBackend>,
    processor: RequestProcessor,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// The driver broke the ring: the queue is no longer served until a reset.
    broken: bool,
}

impl QueueWorker {
    /// The worker's loop; returns the queue (with its ring positions) when stopped.
    fn run(mut self) -> Queue {
        let mut fds = [
            libc::pollfd {
                fd: self.notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Requests posted before activation (the driver may notify early) are served first.
        self.process_queue();
        loop {
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("{}: poll: {error}", self.name);
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[0].revents != 0 {
                // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
                let _ = self.notify.read();
                self.process_queue();
            }
        }
        self.queue
    }

    /// Runs every available request, then interrupts the guest if it asked to be. A broken
    /// ring stops the queue for good and reports DEVICE_NEEDS_RESET.
    fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let limits = DiskLimits {
            read_only: self.read_only,
            id: &self.id,
        };
        match serve_queue(
            &self.name,
            &mut self.queue,
            &self.memory,
            &mut self.processor,
            &*self.disk,
            limits,
        ) {
            Ok(true) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("{e}; the device needs a reset");
                self.broken = true;
                self.interrupt.signal_needs_reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::MemoryDisk;
    use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;

    #[test]
    fn config_space_layout() {
        let disk = Arc::new(MemoryDisk::new(1 << 20));
        let mut config = BlockConfig::new("vda");
        config.num_queues = 2;
        let block = Block::new(config, disk).unwrap();
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
        let mut queues = [0u8; 2];
        block.read_config(34, &mut queues);
        assert_eq!(u16::from_le_bytes(queues), 2);
        assert_ne!(block.features() & (1 << features::MQ), 0);
        assert_ne!(block.features() & (1 << features::DISCARD), 0);
        // Reads past the end are zero, never out of bounds.
        let mut tail = [0xffu8; 8];
        block.read_config(58, &mut tail);
        assert_eq!(tail, [0; 8]);
        block.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 8]);
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let disk = Arc::new(MemoryDisk::new(4096));
        let mut config = BlockConfig::new("vdb");
        config.read_only = true;
        let block = Block::new(config, disk).unwrap();
        assert_ne!(block.features() & (1 << features::RO), 0);
        assert_eq!(block.features() & (1 << features::DISCARD), 0);
        assert_eq!(block.features() & (1 << features::WRITE_ZEROES), 0);
    }

    /// Finding 11 (issue 13): a driver that publishes an available index far ahead gets
    /// DEVICE_NEEDS_RESET (and a configuration interrupt), and its queue is no longer
    /// served; a device reset clears it.
    #[test]
    fn a_broken_ring_needs_a_reset() {
        use crate::devices::bus::BusDevice;
        use crate::devices::virtio::mmio::{status, MmioTransport};
        use vm_memory::{Bytes, GuestAddress};

        let memory = crate::memory::create(2 << 20).unwrap();
        let block = Block::new(BlockConfig::new("vda"), Arc::new(MemoryDisk::new(4096))).unwrap();
        let mut transport =
            MmioTransport::new("virtio-blk vda", Box::new(block), memory.clone()).unwrap();
        let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
        write(0x070, status::ACKNOWLEDGE | status::DRIVER);
        write(0x024, 1);
        write(0x020, 1); // VIRTIO_F_VERSION_1
        write(
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        write(0x038, 16); // QueueNum
        write(0x080, 0x1000); // descriptors
        write(0x090, 0x2000); // available ring
        write(0x0a0, 0x3000); // used ring
        write(0x044, 1); // QueueReady
        memory.write_obj(100u16, GuestAddress(0x2002)).unwrap();
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(0x070, ok);
        write(0x050, 0); // QueueNotify
        let read_status = |transport: &mut MmioTransport| {
            let mut bytes = [0u8; 4];
            transport.read(0x070, &mut bytes);
            u32::from_le_bytes(bytes)
        };
        // The worker reports it; wait for it (bounded, so a regression fails, not hangs).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while read_status(&mut transport) & status::DEVICE_NEEDS_RESET == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no DEVICE_NEEDS_RESET"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read_status(&mut transport), ok | status::DEVICE_NEEDS_RESET);
        assert_ne!(transport.interrupt().status() & VIRTIO_MMIO_INT_CONFIG, 0);
        // The ring was not consumed.
        let used: u16 = memory.read_obj(GuestAddress(0x3002)).unwrap();
        assert_eq!(used, 0);
        transport.write(0x070, &0u32.to_le_bytes());
        assert_eq!(read_status(&mut transport), 0);
    }

    #[test]
    fn refuses_bad_queue_shapes() {
        let disk: Arc<dyn DiskBackend> = Arc::new(MemoryDisk::new(4096));
        let mut config = BlockConfig::new("vda");
        config.queue_size = 100;
        assert!(Block::new(config.clone(), disk.clone()).is_err());
        config.queue_size = 128;
        config.num_queues = 0;
        assert!(Block::new(config, disk).is_err());
    }
}
