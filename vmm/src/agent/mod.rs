//! The host side of a guest agent: a qemu-ga client, used to freeze the guest's filesystems
//! around a snapshot so the snapshot holds a clean filesystem rather than one needing journal
//! recovery (libvirt's `snapshot-create-as --quiesce`).
//!
//! - [`protocol`]: the wire protocol over any byte stream with read timeouts
//!   (`guest-sync-delimited`, `guest-ping`, `guest-fsfreeze-*`), bounded against a hostile
//!   agent;
//! - [`GuestAgent`] (here): where the agent is ([`AgentEndpoint`]: a Unix socket such as
//!   QEMU's chardev for the `org.qemu.guest_agent.0` port, or a vsock port reached through a
//!   Firecracker-style vsock host socket), the timeouts, and [`FrozenGuest`], a freeze that
//!   thaws when dropped, so no path out of a snapshot (error, panic) leaves the guest frozen.
//!
//! One session at a time: a second freeze waits for the first to thaw.

pub mod protocol;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

pub use protocol::{AgentClient, FreezeStatus, Transport};

/// Why talking to the agent failed, below the endpoint it was about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentFailure {
    /// The endpoint could not be reached (no socket, nobody listening, vsock refused).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The agent did not answer in time.
    #[error("the agent did not answer in time")]
    Timeout,
    /// The agent closed the channel.
    #[error("the agent closed the connection")]
    Closed,
    /// The channel failed.
    #[error("{what}: {message}")]
    Io {
        /// The step ("reading an answer", ...).
        what: &'static str,
        /// The operating system's error.
        message: String,
    },
    /// The agent answered something that is not the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The agent answered the command with an error.
    #[error("{command} failed in the guest: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// qemu-ga's error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

impl AgentFailure {
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> AgentFailure {
        move |e| AgentFailure::Io {
            what,
            message: e.to_string(),
        }
    }

    /// Whether the agent is absent or unresponsive (rather than misbehaving).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AgentFailure::Connect(_) | AgentFailure::Timeout | AgentFailure::Closed
        )
    }
}

/// Where the guest agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket carrying the agent's byte stream (QEMU's
    /// `-chardev socket,path=PATH,server=on,wait=off` behind a virtserialport).
    Unix(PathBuf),
    /// A vsock port in the guest, reached through a Firecracker-style host socket `uds`:
    /// connect, send `CONNECT <port>\n`, read `OK <host port>\n`.
    Vsock {
        /// The vsock device's host-side Unix socket.
        uds: PathBuf,
        /// The guest port the agent listens on.
        port: u32,
    },
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::Unix(path) => write!(f, "{}", path.display()),
            AgentEndpoint::Vsock { uds, port } => write!(f, "vsock:{port} via {}", uds.display()),
        }
    }
}

impl AgentEndpoint {
    /// Parses `--guest-agent`'s value: `vsock:PORT` (through the vsock host socket `uds`,
    /// which must then be given), or `unix:PATH` / `PATH`.
    pub fn parse(spec: &str, vsock_uds: Option<&Path>) -> Result<Self, String> {
        if let Some(port) = spec.strip_prefix("vsock:") {
            let port: u32 = port
                .parse()
                .map_err(|_| format!("--guest-agent {spec:?}: the vsock port is not a number"))?;
            let uds = vsock_uds.ok_or_else(|| {
                format!("--guest-agent {spec:?}: the VM has no vsock device (--vsock)")
            })?;
            return Ok(AgentEndpoint::Vsock {
                uds: uds.to_path_buf(),
                port,
            });
        }
        let path = spec.strip_prefix("unix:").unwrap_or(spec);
        if path.is_empty() {
            return Err("--guest-agent: empty path".into());
        }
        Ok(AgentEndpoint::Unix(PathBuf::from(path)))
    }

    /// Opens the byte stream to the agent (for vsock, through the host socket's handshake).
    pub fn connect(&self, timeout: Duration) -> Result<UnixStream, AgentFailure> {
        let path = match self {
            AgentEndpoint::Unix(path) | AgentEndpoint::Vsock { uds: path, .. } => path,
        };
        let mut stream = UnixStream::connect(path)
            .map_err(|e| AgentFailure::Connect(format!("{}: {e}", path.display())))?;
        if let AgentEndpoint::Vsock { port, .. } = self {
            vsock_handshake(&mut stream, *port, timeout)?;
        }
        Ok(stream)
    }
}

/// Longest `OK <port>` line a vsock host socket sends.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Firecracker's host-initiated connection: `CONNECT <port>\n`, answered by
/// `OK <host port>\n`; anything else (or nothing in time) means no connection.
fn vsock_handshake(
    stream: &mut UnixStream,
    port: u32,
    timeout: Duration,
) -> Result<(), AgentFailure> {
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(AgentFailure::io("setting handshake timeouts"))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| AgentFailure::Connect(format!("vsock port {port}: {e}")))?;
    // Byte by byte: whatever follows the line belongs to the agent's stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(AgentFailure::Connect(format!(
                    "vsock port {port}: the host socket closed the connection (nothing listens?)"
                )))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(AgentFailure::Connect(format!("vsock port {port}: {e}")));
            }
        }
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(AgentFailure::Connect(format!(
                "vsock port {port}: handshake answer longer than {MAX_HANDSHAKE_LINE} bytes"
            )));
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ").map(|p| p.trim().parse::<u32>()) {
        Some(Ok(_)) => Ok(()),
        _ => Err(AgentFailure::Connect(format!(
            "vsock port {port}: handshake answered {text:?}"
        ))),
    }
}

/// How long each step may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTimeouts {
    /// Connecting and `guest-sync-delimited` (libvirt waits 5 s).
    pub sync: Duration,
    /// `guest-fsfreeze-freeze` (it flushes every filesystem first, which takes a while under
    /// write load).
    pub freeze: Duration,
    /// `guest-fsfreeze-thaw`, and `guest-ping`/`guest-fsfreeze-status`.
    pub command: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        AgentTimeouts {
            sync: Duration::from_secs(5),
            freeze: Duration::from_secs(60),
            command: Duration::from_secs(10),
        }
    }
}

/// A guest agent: where it is and how long to wait for it.
#[derive(Debug)]
pub struct GuestAgent {
    endpoint: AgentEndpoint,
    timeouts: AgentTimeouts,
    /// One session at a time: the agent's channel carries one conversation.
    session: Mutex<()>,
}

impl GuestAgent {
    /// The agent at `endpoint`, with the default timeouts.
    pub fn new(endpoint: AgentEndpoint) -> Self {
        Self::with_timeouts(endpoint, AgentTimeouts::default())
    }

    /// The agent at `endpoint` with `timeouts`.
    pub fn with_timeouts(endpoint: AgentEndpoint, timeouts: AgentTimeouts) -> Self {
        GuestAgent {
            endpoint,
            timeouts,
            session: Mutex::new(()),
        }
    }

    /// Where it is.
    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    /// A synced session.
    fn open(&self) -> Result<AgentClient<UnixStream>, AgentFailure> {
        let stream = self.endpoint.connect(self.timeouts.sync)?;
        let mut client = AgentClient::new(stream);
        client.sync(self.timeouts.sync)?;
        Ok(client)
    }

    /// `guest-ping`.
    pub fn ping(&self) -> Result<(), AgentFailure> {
        let _session = self.session.lock();
        self.open()?.ping(self.timeouts.command)
    }

    /// `guest-fsfreeze-status`.
    pub fn status(&self) -> Result<FreezeStatus, AgentFailure> {
        let _session = self.session.lock();
        self.open()?.status(self.timeouts.command)
    }

    /// Freezes the guest's filesystems. The answer thaws them when dropped (or through
    /// [`FrozenGuest::thaw`], which reports how long they stayed frozen).
    ///
    /// A freeze that was sent but failed or timed out is followed by a thaw before the
    /// error returns: the agent may have frozen some filesystems, or all of them late.
    pub fn freeze(&self) -> Result<FrozenGuest<'_>, AgentFailure> {
        let session = self.session.lock();
        let mut client = self.open()?;
        let started = Instant::now();
        match client.freeze(self.timeouts.freeze) {
            Ok(filesystems) => Ok(FrozenGuest {
                agent: self,
                client: Some(client),
                started,
                filesystems,
                thawed: false,
                _session: session,
            }),
            Err(failure) => {
                if let Err(thaw) = self.thaw_with(Some(client)) {
                    tracing::error!(
                        "guest agent {}: thaw after a failed freeze failed: {thaw}",
                        self.endpoint
                    );
                }
                Err(failure)
            }
        }
    }

    /// Thaws over `client` if it still works, else over a new session; syncs first so a
    /// late answer to the freeze is not taken for the thaw's.
    fn thaw_with(&self, client: Option<AgentClient<UnixStream>>) -> Result<u64, AgentFailure> {
        // The freeze may still be running in the agent, which answers one command at a
        // time: the sync waits as long as a freeze may take.
        let patient = self.timeouts.freeze.max(self.timeouts.sync);
        if let Some(mut client) = client {
            match client
                .sync(patient)
                .and_then(|()| client.thaw(self.timeouts.command))
            {
                Ok(n) => return Ok(n),
                Err(e) => tracing::warn!(
                    "guest agent {}: thaw on the freeze's connection failed ({e}); retrying",
                    self.endpoint
                ),
            }
        }
        let stream = self.endpoint.connect(self.timeouts.sync)?;
        let mut client = AgentClient::new(stream);
        client.sync(patient)?;
        client.thaw(self.timeouts.command)
    }
}

/// The guest's filesystems, frozen; dropping this thaws them.
pub struct FrozenGuest<'a> {
    agent: &'a GuestAgent,
    client: Option<AgentClient<UnixStream>>,
    started: Instant,
    filesystems: u64,
    thawed: bool,
    _session: MutexGuard<'a, ()>,
}

impl std::fmt::Debug for FrozenGuest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenGuest")
            .field("endpoint", &self.agent.endpoint)
            .field("filesystems", &self.filesystems)
            .field("thawed", &self.thawed)
            .finish()
    }
}

impl FrozenGuest<'_> {
    /// How many filesystems the agent froze.
    pub fn filesystems(&self) -> u64 {
        self.filesystems
    }

    /// Thaws now; answers how long the filesystems stayed frozen (from the freeze request
    /// to the thaw's answer).
    pub fn thaw(mut self) -> Result<Duration, AgentFailure> {
        self.thawed = true;
        let result = self.agent.thaw_with(self.client.take());
        let frozen = self.started.elapsed();
        result.map(|_| frozen)
    }
}

impl Drop for FrozenGuest<'_> {
    fn drop(&mut self) {
        if self.thawed {
            return;
        }
        if let Err(e) = self.agent.thaw_with(self.client.take()) {
            tracing::error!(
                "guest agent {}: thawing the guest failed: {e}; it may stay frozen",
                self.agent.endpoint
            );
        }
    }
}
