//! The virtio-vsock device: three queues (RX, TX, event), the guest's CID in its config space,
//! and one worker thread that sleeps on the queues' notify eventfds, the stop event and the
//! host sockets ([`Muxer::poll_fds`]), and runs a [`Muxer`] pass whenever one is ready.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::DEVICE_TYPE;
use crate::devices::virtio::{
    Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;

/// How a vsock device is set up (`--vsock cid=N,uds=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The host-side Unix socket (Firecracker's `uds_path`).
    pub uds: PathBuf,
}

/// What the worker hands back when stopped.
type WorkerResult = (Muxer, Vec<(u16, Queue)>);

/// A virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    queue_sizes: [u16; 3],
    stop: EventFd,
    /// The connection table while no worker holds it.
    muxer: Option<Muxer>,
    worker: Option<JoinHandle<WorkerResult>>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("config", &self.config)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for `config`; binds the host socket now, so host programs may connect
    /// before the guest's driver is up (their REQUEST waits for it).
    pub fn new(config: VsockConfig) -> Result<Self> {
        let device = || format!("virtio-vsock cid {}", config.guest_cid);
        if config.guest_cid < MIN_GUEST_CID || config.guest_cid > u64::from(u32::MAX) {
            return Err(Error::Device {
                device: device(),
                message: format!("the guest CID must be in {MIN_GUEST_CID}..=4294967295"),
            });
        }
        let muxer =
            Muxer::new(config.guest_cid, config.uds.clone()).map_err(|e| Error::Device {
                device: device(),
                message: format!("host socket {}: {e}", config.uds.display()),
            })?;
        Ok(Vsock {
            config,
            queue_sizes: [QUEUE_SIZE; 3],
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating a stop eventfd"))?,
            muxer: Some(muxer),
            worker: None,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Drops every connection and owes the guest a transport reset event, as after a
    /// restore (the host programs' connections did not survive it). Call it on a device
    /// being restored, before its activation; an active device is left alone.
    pub fn reset_transport(&mut self) {
        match &mut self.muxer {
            Some(muxer) if self.worker.is_none() => muxer.reset_transport(),
            _ => tracing::warn!("virtio-vsock: transport reset asked of an active device"),
        }
    }

    fn stop_worker(&mut self) -> Vec<(u16, Queue)> {
        let Some(worker) = self.worker.take() else {
            return Vec::new();
        };
        if let Err(e) = self.stop.write(1) {
            tracing::error!("virtio-vsock: stopping the worker: {e}");
        }
        let queues = match worker.join() {
            Ok((muxer, queues)) => {
                self.muxer = Some(muxer);
                queues
            }
            Err(_) => {
                tracing::error!("virtio-vsock: the worker panicked");
                Vec::new()
            }
        };
        let _ = self.stop.read();
        queues
    }
}

/// The worker's state: queues by index (RX, TX, event), memory, interrupt.
struct Worker {
    muxer: Muxer,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    stop: EventFd,
}

impl Worker {
    /// Runs passes until the stop event; hands back the muxer and the queues.
    fn run(mut self) -> WorkerResult {
        loop {
            if self.muxer_pass() {
                self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
            }
            let mut fds: Vec<libc::pollfd> = Vec::new();
            fds.push(libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for notify in &self.notify {
                fds.push(libc::pollfd {
                    fd: notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for (fd, events) in self.muxer.poll_fds() {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("virtio-vsock: poll: {error}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            if fds[0].revents != 0 {
                break;
            }
            for notify in &self.notify {
                let _ = notify.read();
            }
        }
        let queues = self
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| (i as u16, q))
            .collect();
        (self.muxer, queues)
    }

    fn muxer_pass(&mut self) -> bool {
        self.muxer.process(&self.memory, &mut self.queues)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `struct virtio_vsock_config { le64 guest_cid; }`
        let space = self.config.guest_cid.to_le_bytes();
        crate::devices::virtio::block::device::read_config_space(&space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        self.stop_worker();
        let Activation {
            memory,
            interrupt,
            queues,
            acked_features: _,
        } = activation;
        if queues.len() != 3 {
            return Err(Error::Device {
                device: format!("virtio-vsock cid {}", self.config.guest_cid),
                message: format!("the driver made {} of 3 queues ready", queues.len()),
            });
        }
        let mut queues = queues;
        queues.sort_by_key(|q| q.index);
        let mut rings = Vec::new();
        let mut notify = Vec::new();
        for ActiveQueue {
            queue, notify: n, ..
        } in queues
        {
            rings.push(queue);
            notify.push(n);
        }
        let muxer = self.muxer.take().ok_or_else(|| Error::Device {
            device: format!("virtio-vsock cid {}", self.config.guest_cid),
            message: "the connection table was lost with a worker".into(),
        })?;
        let worker = Worker {
            muxer,
            memory,
            interrupt,
            queues: rings,
            notify,
            stop: self
                .stop
                .try_clone()
                .map_err(Error::io("duplicating the stop eventfd"))?,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vsock-{}", self.config.guest_cid))
            .spawn(move || {
                crate::confine::enter_or_abort(crate::confine::ThreadKind::Vsock);
                worker.run()
            })
            .map_err(Error::io("spawning the vsock worker"))?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        // A driver reset ends every connection; the host programs see them close.
        if let Some(muxer) = &mut self.muxer {
            muxer.close_all();
        }
    }

    fn quiesce(&mut self) -> Vec<(u16, Queue)> {
        self.stop_worker()
    }
}

/// A [`Vsock`] the VM keeps a handle on besides its transport: the transport drives it as
/// its [`VirtioDevice`], and a checkpoint load reaches it through the handle to reset its
/// transport ([`Vsock::reset_transport`]). Locks are taken transport first, then device;
/// the handle's users never hold the device while taking the transport.
pub struct SharedVsock {
    inner: Arc<Mutex<Vsock>>,
    /// A copy, so [`VirtioDevice::queue_max_sizes`] can hand out a reference.
    queue_sizes: [u16; 3],
}

impl std::fmt::Debug for SharedVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVsock").finish_non_exhaustive()
    }
}

impl SharedVsock {
    /// Wraps `device`; answers the transport's device and the VM's handle.
    pub fn new(device: Vsock) -> (SharedVsock, Arc<Mutex<Vsock>>) {
        let queue_sizes = device.queue_sizes;
        let inner = Arc::new(Mutex::new(device));
        (
            SharedVsock {
                inner: inner.clone(),
                queue_sizes,
            },
            inner,
        )
    }
}

impl VirtioDevice for SharedVsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.inner.lock().features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.lock().read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.lock().write_config(offset, data)
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        self.inner.lock().activate(activation)
    }

    fn reset(&mut self) {
        self.inner.lock().reset()
    }

    fn quiesce(&mut self) -> Vec<(u16, Queue)> {
        self.inner.lock().quiesce()
    }
}
