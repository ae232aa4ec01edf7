//! The daemon crate's one error type.

use std::path::PathBuf;

/// Everything that can stop the vhost-user-blk daemon from starting or ending cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's settings cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The disk or the device model could not be set up (from the VMM's shared code).
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// The vhost-user framework failed to set up a connection's daemon.
    #[error("device {device}: {message}")]
    Device {
        /// The device ("vhost-user-blk-vda").
        device: String,
        /// What went wrong.
        message: String,
    },
    /// An operating-system call outside the disk failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The final flush of the disk failed: the frontend's last writes may not be durable.
    #[error("disk {name} (served on {socket}): {source}")]
    Disk {
        /// The disk's name.
        name: String,
        /// The daemon's socket.
        socket: PathBuf,
        /// The storage layer's error.
        #[source]
        source: storage::Error,
    },
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
