//! virtio-vsock (device type 19), the channel in-guest agents use to talk to the host, with
//! Firecracker's host side (a Unix socket; see [`host`]).
//!
//! - [`packet`]: header parsing (every field checked: type, op, CIDs, lengths against the
//!   limit and against the buffers carrying them) and encoding;
//! - [`connection`]: one stream's state machine and credit flow control (data beyond the
//!   announced credit resets the connection; a lying `fwd_cnt` grants nothing);
//! - [`host`]: the host socket's `CONNECT <port>` / `OK <port>` lines and the `<uds>_<port>`
//!   targets of guest-initiated connections;
//! - [`muxer`]: the connection table between the queues and the host sockets, bounded
//!   (connections, half-open host connections, control backlog, read-ahead);
//! - [`device`]: the [`super::VirtioDevice`] (RX, TX and event queues, the CID in config
//!   space) and its worker thread; [`Vsock::reset_transport`] queues
//!   VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for a restored guest; [`SharedVsock`], the device
//!   as its transport drives it while the VM keeps a handle for checkpoint loads;
//! - [`persist`]: what a checkpoint records (CID, window) and what a load does (drop the
//!   host connections, owe the guest the transport reset), as Firecracker does.
//!
//! The builder attaches it after the disks (`--vsock cid=N,uds=PATH`, DESIGN.md §11).

pub mod connection;
pub mod device;
pub mod host;
pub mod muxer;
pub mod packet;
pub mod persist;

#[cfg(test)]
mod tests;

pub use device::{SharedVsock, Vsock, VsockConfig};

/// The virtio device type of vsock.
pub const DEVICE_TYPE: u32 = 19;
