//! The storage crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while opening, reading, writing or checking an image.
///
/// Messages name the file, the offset or the header field at fault, so that a CLI can print
/// them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on an image file failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file the call was made on.
        path: PathBuf,
        /// What was being done ("read at 0x10000", "open", ...).
        op: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image's header, a table or a table entry is malformed.
    #[error("{path}: invalid image: {reason}")]
    Invalid {
        /// The image file.
        path: PathBuf,
        /// What is wrong, naming the field or offset.
        reason: String,
    },
    /// The image uses a feature this engine refuses to touch.
    #[error("{path}: unsupported: {feature}")]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The feature, as the qcow2 spec names it.
        feature: String,
    },
    /// A write, discard or flush on an image opened read-only.
    #[error("{path}: image is read-only")]
    ReadOnly {
        /// The image file.
        path: PathBuf,
    },
    /// A request reaching past the end of the device.
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The device's virtual size.
        size: u64,
    },
    /// A backing chain loops or is deeper than allowed.
    #[error("backing chain: {0}")]
    Chain(String),
    /// A caller passed an argument that cannot work (bad cluster size, bad option value ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Another process holds the image in a way that excludes this use (image locking).
    #[error("{path}: {reason}")]
    Locked {
        /// The image file.
        path: PathBuf,
        /// The conflict, in QEMU's words ("Failed to get \"write\" lock").
        reason: String,
    },
    /// The image filled the address space the format can describe, or the host ran out of space.
    #[error("{path}: no space: {reason}")]
    NoSpace {
        /// The image file.
        path: PathBuf,
        /// What could not be allocated.
        reason: String,
    },
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Invalid`] for `path`.
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Unsupported`] for `path`.
    pub fn unsupported(path: impl Into<PathBuf>, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            feature: feature.into(),
        }
    }

    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op: op.into(),
            source,
        }
    }
}
