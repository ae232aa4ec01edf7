//! A vhost-user-blk backend: our live disk under another VMM's guest (QEMU, Cloud
//! Hypervisor), out of that VMM's process.
//!
//! - [`backend`]: the device model for `vhost-user-backend`, reusing the VMM's virtio-blk
//!   request parser and queue loop over the frontend's shared memory.
//! - [`poll`]: how long a queue worker watches its ring before sleeping, sized on how
//!   soon the driver's requests follow each other.
//! - [`BlkDaemon`] (here): listens on the vhost-user socket and serves one frontend at a time;
//!   when it disconnects the disk stays open and the next frontend (a restarted QEMU) finds
//!   it again.
//! - [`DaemonMachine`]: the daemon as a [`vmm::Machine`] under a [`vmm::Control`] (no vCPUs,
//!   one disk), so a program, or `snapvmm ctl` through the REST API, snapshots, streams and
//!   commits the disk while a guest uses it.
//!
//! The frontend is not trusted: its memory table is checked against the files it sends,
//! every ring and descriptor is bounds-checked by virtio-queue and the request parser, and a
//! protocol error ends that connection only.

pub mod backend;
pub mod error;
pub mod poll;

#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use storage::LiveDisk;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use vmm::builder::open_disk;
use vmm::config::DiskConfig;
use vmm::control::types::VmState;
use vmm::control::{ControlError, Disk, Machine};
use vmm::devices::virtio::block::device::{DEFAULT_QUEUE_SIZE, MAX_NUM_QUEUES};
use vmm::devices::virtio::block::BlockConfig;
use vmm::Control;

pub use backend::BlockBackend;
pub use error::{Error, Result};

/// How long the daemon waits for each block job it cancels on the way out.
const JOB_CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The vhost-user socket to listen on (a stale socket there is replaced).
    pub socket: PathBuf,
    /// The disk to serve; its `id` names it in the API (`vda` by default).
    pub disk: DiskConfig,
    /// Request queues offered (1..=16).
    pub num_queues: u16,
    /// The Unix socket of the frontend's chardev for the guest's qemu-ga port
    /// (`org.qemu.guest_agent.0`), so snapshots can quiesce the guest; the daemon connects
    /// to it for each freeze.
    pub guest_agent: Option<PathBuf>,
}

impl DaemonConfig {
    /// The disk's name in the API and its GET_ID string.
    pub fn disk_name(&self) -> String {
        self.disk.id.clone().unwrap_or_else(|| "vda".to_string())
    }
}

/// Shared between the serving loop and [`DaemonMachine`]: how to stop.
struct StopSignal {
    requested: AtomicBool,
    /// The connection being served, to cut it on shutdown.
    connection: Mutex<Option<ShutdownHandle>>,
    /// Wakes the loop while it waits for the next frontend.
    wake: EventFd,
}

impl StopSignal {
    fn new() -> Result<Self> {
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            connection: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                Error::Io {
                    what: "creating the daemon's wake-up eventfd",
                    source,
                }
            })?,
        })
    }

    /// Waits until a frontend is waiting to be accepted (true) or a stop is requested
    /// (false).
    fn wait_for_frontend(&self, listener: &Listener) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.requested.load(Ordering::Acquire) {
                return false;
            }
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("vhost-user-blk: waiting for a frontend: {error}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                continue;
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
                continue;
            }
            if fds[0].revents != 0 {
                return !self.requested.load(Ordering::Acquire);
            }
        }
    }
}

impl std::fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignal")
            .field("requested", &self.requested)
            .field("connected", &self.connection.lock().is_some())
            .finish()
    }
}

/// The vhost-user-blk daemon: a live disk and the socket frontends connect to.
pub struct BlkDaemon {
    socket: PathBuf,
    listener: Listener,
    backend: Arc<BlockBackend>,
    disk: Arc<LiveDisk>,
    stop: Arc<StopSignal>,
    control: Arc<Control>,
}

impl std::fmt::Debug for BlkDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDaemon")
            .field("socket", &self.socket)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl BlkDaemon {
    /// Opens the disk and listens on the socket.
    pub fn new(config: &DaemonConfig) -> Result<Self> {
        if config.num_queues == 0 || config.num_queues > MAX_NUM_QUEUES {
            return Err(Error::Config(format!(
                "--num-queues {}: 1 to {MAX_NUM_QUEUES}",
                config.num_queues
            )));
        }
        let name = config.disk_name();
        let disk = open_disk(&name, &config.disk)?;
        let block = BlockConfig {
            id: name.clone(),
            read_only: config.disk.read_only,
            num_queues: config.num_queues,
            queue_size: DEFAULT_QUEUE_SIZE,
        };
        let backend = Arc::new(BlockBackend::new(block, disk.clone())?);
        let listener = Listener::new(&config.socket, true).map_err(|e| {
            Error::Config(format!(
                "vhost-user socket {}: {e}",
                config.socket.display()
            ))
        })?;
        tracing::info!(
            "vhost-user-blk: serving {} on {}",
            config.disk.path.display(),
            config.socket.display()
        );
        let stop = Arc::new(StopSignal::new()?);
        let cut = Arc::downgrade(&stop);
        backend.set_broken_ring_handler(move || {
            if let Some(stop) = cut.upgrade() {
                if let Some(connection) = stop.connection.lock().as_ref() {
                    connection.shutdown();
                }
            }
        });
        let machine = Arc::new(DaemonMachine {
            socket: config.socket.clone(),
            num_queues: config.num_queues,
            stop: stop.clone(),
        });
        let disks = vec![Disk::new(name, disk.clone(), config.disk.read_only)];
        let mut control = Control::new(machine, disks, None);
        if let Some(path) = &config.guest_agent {
            let endpoint = vmm::agent::AgentEndpoint::Unix(path.clone());
            control = control.with_guest_agent(Arc::new(vmm::agent::GuestAgent::new(endpoint)));
        }
        Ok(BlkDaemon {
            socket: config.socket.clone(),
            listener,
            backend,
            disk,
            stop,
            control: Arc::new(control),
        })
    }

    /// The socket frontends connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The control handle on this daemon: its disk, block jobs and disk-only snapshots;
    /// [`Control::shutdown`] ends [`BlkDaemon::run`].
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Serves frontends one after the other until [`Control::shutdown`]. Then runs
    /// `before_flush` (stop an API server there, so no request is still in flight), cancels
    /// the block jobs (each leaves a valid chain), flushes the disk after the jobs' last
    /// writes, and removes the socket.
    pub fn run(mut self, before_flush: impl FnOnce()) -> Result<()> {
        let name = format!("vhost-user-blk-{}", self.backend.config().id);
        while !self.stop.requested.load(Ordering::Acquire) {
            let mut daemon = VhostUserDaemon::new(
                name.clone(),
                self.backend.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .map_err(|e| Error::Device {
                device: name.clone(),
                message: e.to_string(),
            })?;
            // Polled first, so a shutdown needs no connection to end the wait: accept()
            // then returns at once.
            if !self.stop.wait_for_frontend(&self.listener) {
                break;
            }
            if let Err(e) = daemon.start(&mut self.listener) {
                // A failed accept or handshake set-up: nothing is served yet; try again.
                tracing::warn!("{name}: accepting a frontend: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            *self.stop.connection.lock() = daemon.shutdown_handle();
            if self.stop.requested.load(Ordering::Acquire) {
                daemon.request_shutdown();
            } else {
                tracing::info!("{name}: frontend connected");
            }
            let result = daemon.wait();
            *self.stop.connection.lock() = None;
            // End this connection's queue workers; the next frontend gets fresh ones.
            for handler in daemon.get_epoll_handlers() {
                handler.send_exit_event();
            }
            self.backend.disconnected();
            match result {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => tracing::info!("{name}: frontend disconnected"),
                Err(e) => tracing::warn!("{name}: frontend connection ended: {e}"),
            }
        }
        before_flush();
        self.control.cancel_jobs(JOB_CANCEL_TIMEOUT);
        let flushed = self.disk.flush();
        let _ = std::fs::remove_file(&self.socket);
        flushed.map_err(|source| Error::Disk {
            name: self.backend.config().id.clone(),
            socket: self.socket.clone(),
            source,
        })
    }
}

/// The daemon as a [`Machine`]: no vCPUs and no memory of its own (the guest's belong to the
/// frontend's VMM); shutting it down ends [`BlkDaemon::run`].
#[derive(Debug)]
pub struct DaemonMachine {
    socket: PathBuf,
    num_queues: u16,
    stop: Arc<StopSignal>,
}

impl Machine for DaemonMachine {
    fn state(&self) -> VmState {
        if self.stop.requested.load(Ordering::Acquire) {
            VmState::ShuttingDown
        } else {
            VmState::Running
        }
    }

    fn pause(&self) -> std::result::Result<(), ControlError> {
        Err(ControlError::Unsupported(format!(
            "a vhost-user-blk daemon has no vCPUs to pause ({} queue(s) on {}): pause the \
             frontend's VM",
            self.num_queues,
            self.socket.display()
        )))
    }

    fn resume(&self) -> std::result::Result<(), ControlError> {
        Err(ControlError::Unsupported(
            "a vhost-user-blk daemon has no vCPUs to resume".into(),
        ))
    }

    fn shutdown(&self) -> std::result::Result<(), ControlError> {
        tracing::info!("vhost-user-blk: shutdown requested");
        self.stop.requested.store(true, Ordering::Release);
        if let Some(connection) = self.stop.connection.lock().as_ref() {
            connection.shutdown();
        }
        // Wake the loop if it is waiting for the next frontend.
        if let Err(e) = self.stop.wake.write(1) {
            tracing::warn!("vhost-user-blk: waking the daemon: {e}");
        }
        Ok(())
    }
}
