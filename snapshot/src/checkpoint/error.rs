//! The checkpoint format's error type.

use std::path::PathBuf;

/// What can be wrong with a checkpoint's files; messages name the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is damaged or not a state file.
    #[error("state file {path}: {message}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The state file was written by an incompatible version of the format.
    #[error("state file {path}: format version {found_major}.{found_minor}; this snapvmm reads {supported}.x")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its major version.
        found_major: u16,
        /// Its minor version.
        found_minor: u16,
        /// The major version this build reads.
        supported: u16,
    },
    /// The memory file is damaged, truncated or belongs to another checkpoint.
    #[error("memory file {path}: {message}")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A diff chain is broken.
    #[error("checkpoint chain: {0}")]
    Chain(String),
    /// The checkpoint does not fit what it is loaded into.
    #[error("{0}")]
    Mismatch(String),
}

impl CheckpointError {
    /// Wraps an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = path.into();
        move |source| CheckpointError::Io { path, source }
    }
}

/// Result of checkpoint file operations.
pub type CheckpointResult<T> = std::result::Result<T, CheckpointError>;
