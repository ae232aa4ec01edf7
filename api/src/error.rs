//! The API crate's one error type: why a request failed (each kind one HTTP status), why the
//! server could not start, and why a client call failed.

use std::path::PathBuf;

use vmm::ControlError;

/// Everything that can go wrong serving or calling the API. Messages name the path, socket
/// or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: bad JSON, a missing or invalid field (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such path, disk, job or snapshot (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path asked for.
        path: String,
    },
    /// The request conflicts with the VM's or a job's state (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is too large (413).
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// This VM cannot do that (501).
    #[error("{0}")]
    NotImplemented(String),
    /// The operation failed on the host side (500).
    #[error("{0}")]
    Internal(String),
    /// The server's socket could not be set up.
    #[error("API socket {path}: {what}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The step that failed ("binding", "setting its mode", ...).
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Something else is at the socket's path.
    #[error("API socket {path}: {reason}")]
    SocketInUse {
        /// The socket's path.
        path: PathBuf,
        /// What is in the way.
        reason: &'static str,
    },
    /// A client could not reach the socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed on a client's connection.
    #[error("HTTP: {0}")]
    Http(String),
    /// The server answered a client with an error status.
    #[error("{status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The server's `fault_message`, or the body.
        message: String,
    },
    /// The server's answer is not the JSON expected.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl Error {
    /// The HTTP status code a request failing with this error gets.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::NotFound(_) => 404,
            Error::MethodNotAllowed { .. } => 405,
            Error::Conflict(_) => 409,
            Error::PayloadTooLarge(_) => 413,
            Error::NotImplemented(_) => 501,
            Error::Status { status, .. } => *status,
            _ => 500,
        }
    }
}

impl From<ControlError> for Error {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::InvalidArgument(m) => Error::BadRequest(m),
            ControlError::NotFound(m) => Error::NotFound(m),
            ControlError::Conflict(m) => Error::Conflict(m),
            ControlError::Unsupported(m) => Error::NotImplemented(m),
            ControlError::Failed(m) => Error::Internal(m),
        }
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
