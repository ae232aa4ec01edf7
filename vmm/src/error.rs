//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while building or running a VM.
///
/// Messages name the ioctl, file, register or field at fault, so a failure reads on its own
/// in a log line or on the command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened or lacks a capability the VMM needs.
    #[error("KVM unavailable: {0}")]
    KvmUnavailable(String),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The ioctl or step that failed ("KVM_CREATE_VCPU 1", "KVM_SET_SREGS", ...).
        what: String,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A disk image could not be opened.
    #[error("disk {name} ({path}): {source}")]
    Disk {
        /// The disk's name (vda, vdb, ... or its id).
        name: String,
        /// The image file.
        path: PathBuf,
        /// The storage layer's error.
        #[source]
        source: storage::Error,
    },
    /// The guest kernel, initrd or micro-guest could not be loaded.
    #[error("loading the guest: {0}")]
    Load(String),
    /// A device could not be set up.
    #[error("device {device}: {message}")]
    Device {
        /// The device ("serial", "virtio-blk vda", ...).
        device: String,
        /// What went wrong.
        message: String,
    },
    /// An I/O error outside the disks (event fds, threads, the serial output file).
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint's files are damaged, mismatched or could not be written.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] snapshot::checkpoint::CheckpointError),
    /// A checkpoint would be saved into a directory that already holds something, and
    /// replacing it was not asked for.
    #[error("checkpoint directory {dir} exists and is not empty (ask to replace it)")]
    CheckpointExists {
        /// The directory.
        dir: PathBuf,
    },
    /// Replacing the checkpoint in a directory was asked for and refused: something
    /// depends on it, or it is not a checkpoint.
    #[error("checkpoint {dir} cannot be replaced: {reason}")]
    CheckpointInUse {
        /// The directory.
        dir: PathBuf,
        /// What depends on it (or why it is not replaceable).
        reason: String,
    },
    /// A virtqueue's driver published an available index more than the queue size ahead
    /// of the device's: the ring is broken and the device stops serving it.
    #[error("{queue}: broken ring: available index {avail}, next to serve {next}, size {size}")]
    BrokenRing {
        /// The queue ("vda-q0").
        queue: String,
        /// The available index the driver published.
        avail: u16,
        /// The next entry the device would take.
        next: u16,
        /// The queue's size.
        size: u16,
    },
    /// A vCPU stopped on an exit the VMM cannot handle.
    #[error("vCPU {index}: {message}")]
    Vcpu {
        /// The vCPU's index.
        index: usize,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// Wraps a failed KVM ioctl with what was being done.
    pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let what = what.into();
        move |source| Error::Kvm { what, source }
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
