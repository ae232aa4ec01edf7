//! The store crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong talking to a snapshot store or reading what it holds.
///
/// Messages name the object key, chunk hash, file or manifest field at fault. They never
/// carry credentials: the client is built from them, and nothing here formats them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A store location (`s3://BUCKET/PREFIX`), an option or a snapshot name is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The store configuration (endpoint, region, credentials) is missing or malformed.
    #[error("store configuration: {0}")]
    Config(String),
    /// A request to the object store failed (after its bounded retries).
    #[error("{key}: {op}: {message}")]
    Remote {
        /// The object key asked for (bucket-relative).
        key: String,
        /// What was being done ("get", "put", "list", ...).
        op: &'static str,
        /// The client's message.
        message: String,
    },
    /// The object asked for is not in the store.
    #[error("{key}: not found in the store")]
    NotFound {
        /// The object key.
        key: String,
    },
    /// A chunk's bytes do not hash to its name: corrupted in the store, in transit or in
    /// the local cache. Never used.
    #[error("chunk {hash}: content hash mismatch ({len} bytes fetched hash to {actual}): the stored chunk is corrupt")]
    Corrupt {
        /// The hash the chunk is stored under.
        hash: String,
        /// What its bytes hash to.
        actual: String,
        /// How many bytes were fetched.
        len: usize,
    },
    /// A store manifest or working-set list is malformed.
    #[error("{key}: invalid manifest: {reason}")]
    Manifest {
        /// The object key (or local path) of the manifest.
        key: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The storage engine failed on a local image.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// The snapshot layer failed (tree metadata, checkpoint files).
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// A checkpoint file is malformed.
    #[error(transparent)]
    Checkpoint(#[from] snapshot::checkpoint::CheckpointError),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op: op.into(),
            source,
        }
    }

    /// Builds an [`Error::Manifest`] for `key`.
    pub fn manifest(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Manifest {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
