//! The vhost-user-blk device model: what `vhost-user-backend` asks of a block device, served
//! by the same request parser and queue loop as the VMM's own virtio-blk.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use vmm::devices::virtio::block::device::{read_config_space, CONFIG_SIZE};
use vmm::devices::virtio::block::queue::serve_queue;
use vmm::devices::virtio::block::request::{DiskLimits, RequestProcessor};
use vmm::devices::virtio::block::{BlockConfig, DiskBackend, ID_BYTES};

use crate::poll::PollWindow;

/// The frontend's guest memory as the backend maps it (no dirty log: the frontend's VMM
/// tracks its own guest's memory).
pub type FrontendMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest config read answered; the vhost-user message size bounds requests anyway.
const MAX_CONFIG_READ: u32 = 4096;

/// A block device for the vhost-user-backend framework: one worker thread per queue.
pub struct BlockBackend {
    config: BlockConfig,
    disk: Arc<dyn DiskBackend>,
    id: [u8; ID_BYTES],
    features: u64,
    config_space: [u8; CONFIG_SIZE],
    /// The frontend's memory once it sent a table that checked out; `None` before, and after
    /// a table that did not (queues are then left alone).
    memory: RwLock<Option<FrontendMemory>>,
    workers: Vec<Mutex<Worker>>,
    /// Ends the frontend's connection: called when its ring is broken, so a hostile or
    /// buggy frontend costs one error, not a worker spinning on its queue for ever.
    on_broken_ring: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BlockBackend {
    /// A backend presenting `disk` as `config` describes.
    pub fn new(config: BlockConfig, disk: Arc<dyn DiskBackend>) -> crate::error::Result<Self> {
        config.check()?;
        Ok(BlockBackend {
            id: config.id_bytes(),
            features: config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            config_space: config.config_space(disk.size()),
            workers: (0..config.num_queues)
                .map(|_| Mutex::new(Worker::default()))
                .collect(),
            memory: RwLock::new(None),
            on_broken_ring: std::sync::OnceLock::new(),
            config,
            disk,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Sets what ends the frontend's connection when one of its rings turns out broken
    /// (an avail index further ahead than the queue is long): the daemon cuts the
    /// connection, and [`BlockBackend::disconnected`] then flushes the disk. Only the first
    /// call takes effect.
    pub fn set_broken_ring_handler(&self, handler: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_broken_ring.set(Box::new(handler));
    }

    /// Forgets the frontend's memory when it goes away, and makes its writes durable.
    pub fn disconnected(&self) {
        *self.memory.write() = None;
        if let Err(e) = self.disk.flush() {
            tracing::warn!(
                "vhost-user-blk {}: flush after disconnect: {e}",
                self.config.id
            );
        }
    }

    fn serve(&self, queue_index: usize, vring: &VringRwLock<FrontendMemory>) {
        let name = format!("{}-q{queue_index}", self.config.id);
        let Some(atomic) = self.memory.read().clone() else {
            tracing::warn!("{name}: kicked without a valid memory table; ignored");
            return;
        };
        let Some(worker) = self.workers.get(queue_index) else {
            tracing::warn!("{name}: no such queue");
            return;
        };
        let memory = atomic.memory();
        let limits = DiskLimits {
            read_only: self.config.read_only,
            id: &self.id,
        };
        let mut worker = worker.lock();
        let Worker { processor, poll } = &mut *worker;
        poll.woken(Instant::now());
        loop {
            {
                // The vring lock is taken per pass (and its read side for at most
                // poll::POLL_MAX while polling), so the frontend's messages
                // (GET_VRING_BASE on stop) are never held up for long.
                let mut state = vring.get_mut();
                if !state.is_enabled() || !state.get_queue().ready() {
                    return;
                }
                let notify = match serve_queue(
                    &name,
                    state.get_queue_mut(),
                    &*memory,
                    processor,
                    &*self.disk,
                    limits,
                ) {
                    Ok(notify) => notify,
                    Err(e) => {
                        // A broken ring: stop serving it rather than poll it for ever, and
                        // end the connection; what was written so far is flushed when the
                        // daemon sees the disconnect.
                        tracing::error!("{e}: disconnecting the frontend");
                        if let Some(disconnect) = self.on_broken_ring.get() {
                            disconnect();
                        }
                        return;
                    }
                };
                if notify {
                    if let Err(e) = state.signal_used_queue() {
                        tracing::warn!("{name}: signalling the frontend: {e}");
                    }
                }
            }
            // Watch the ring a little before sleeping, for as long as watching has been
            // paying (`poll`): the driver's next request often follows its completion
            // closely, and catching it here saves the kick's wake-up. A kick that arrives
            // meanwhile only finds the ring served.
            if !poll_avail(vring, &*memory, poll.window()) {
                poll.sleeping(Instant::now());
                return;
            }
        }
    }
}

/// Spins up to `window` until the driver makes a request available.
fn poll_avail<M: GuestMemoryBackend>(
    vring: &VringRwLock<FrontendMemory>,
    memory: &M,
    window: std::time::Duration,
) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    let deadline = Instant::now() + window;
    loop {
        match queue.avail_idx(memory, Ordering::Acquire) {
            Ok(idx) if idx.0 != queue.next_avail() => return true,
            Ok(_) if Instant::now() < deadline => std::hint::spin_loop(),
            _ => return false,
        }
    }
}

/// What a queue's worker thread keeps between wake-ups.
#[derive(Debug)]
struct Worker {
    processor: RequestProcessor,
    poll: PollWindow,
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            processor: RequestProcessor::new(),
            poll: PollWindow::default(),
        }
    }
}

/// Checks that every region of `memory` lies inside its file: a frontend that maps past the
/// end of its memfd would make the first access to those pages kill the daemon with SIGBUS.
pub fn check_regions(memory: &GuestMemoryMmap<()>) -> Result<(), String> {
    for region in memory.iter() {
        let start = region.start_addr().0;
        let Some(file_offset) = region.file_offset() else {
            return Err(format!("region at {start:#x} has no file"));
        };
        // SAFETY: `stat` is plain old data, for which all-zero bytes are a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a descriptor the region owns, into a stat buffer it may fill.
        if unsafe { libc::fstat(file_offset.file().as_raw_fd(), &mut stat) } != 0 {
            return Err(format!(
                "region at {start:#x}: fstat: {}",
                std::io::Error::last_os_error()
            ));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!(
                "region at {start:#x} is not backed by a regular file or memfd"
            ));
        }
        let end = file_offset.start().checked_add(region.len());
        if end.is_none_or(|end| end > stat.st_size as u64) {
            return Err(format!(
                "region at {start:#x} ({} bytes at file offset {}) runs past the end of its \
                 {}-byte file",
                region.len(),
                file_offset.start(),
                stat.st_size
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock<FrontendMemory>;

    fn num_queues(&self) -> usize {
        usize::from(self.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The framework sets it on each vring; the queue loop follows the queue's setting.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        read_config_space(&self.config_space, u64::from(offset), &mut data);
        data
    }

    fn set_config(&self, offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // `writeback` needs VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!(
            "vhost-user-blk {}: config write at {offset:#x} ignored",
            self.config.id
        );
        Ok(())
    }

    fn update_memory(&self, memory: FrontendMemory) -> std::io::Result<()> {
        let checked = check_regions(&memory.memory());
        let mut current = self.memory.write();
        match checked {
            Ok(()) => {
                *current = Some(memory);
                Ok(())
            }
            Err(message) => {
                *current = None;
                tracing::warn!(
                    "vhost-user-blk {}: memory table refused: {message}",
                    self.config.id
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    message,
                ))
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue: queues run in parallel on the disk, as in the VMM.
        (0..self.config.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per worker thread, so each connection's workers can be told to end.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("vhost-user-blk {}: exit event: {e}", self.config.id);
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // An error here would end the queue's worker thread: report problems, never return
        // them.
        if evset != EventSet::IN {
            tracing::warn!(
                "vhost-user-blk {}: unexpected events {evset:?} on queue {thread_id}",
                self.config.id
            );
        }
        match vrings.get(usize::from(device_event)) {
            // Each thread serves exactly one queue, its index the thread's.
            Some(vring) => self.serve(thread_id, vring),
            None => tracing::warn!(
                "vhost-user-blk {}: event {device_event} for no queue",
                self.config.id
            ),
        }
        Ok(())
    }
}
