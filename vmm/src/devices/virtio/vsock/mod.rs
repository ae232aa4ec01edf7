//! virtio-vsock (device type 19), the channel in-guest agents use to talk to the host, with
//! Firecracker's host side (a Unix socket; see [`host`]).
//!
//! What is here is the device's protocol core, each part tested against a hostile guest:
//! - [`packet`]: header parsing (every field checked: type, op, CIDs, lengths against the
//!   limit and against the buffers carrying them) and encoding;
//! - [`connection`]: one stream's state machine and credit flow control (data beyond the
//!   announced credit resets the connection; a lying `fwd_cnt` grants nothing);
//! - [`host`]: the host socket's `CONNECT <port>` / `OK <port>` lines and the `<uds>_<port>`
//!   targets of guest-initiated connections.
//!
//! Not yet here (see docs/DESIGN.md, "Guest agent and vsock"): the [`super::VirtioDevice`]
//! with its three queues and worker, the connection table over host sockets, `persist.rs`
//! (a restore drops every connection and queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), the
//! `--vsock cid=N,uds=PATH` option and its ACPI entry, and the micro-guest's driver.

pub mod connection;
pub mod device;
pub mod host;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockConfig};

/// The virtio device type of vsock.
pub const DEVICE_TYPE: u32 = 19;
