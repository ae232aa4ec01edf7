//! The JSON bodies of the REST API (see `docs/openapi.json`): the control layer's request and
//! answer types, and [`Fault`], the body of every error response.

use serde::{Deserialize, Serialize};

pub use vmm::control::types::*;

/// The body of every error response (Firecracker's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What was wrong.
    pub fault_message: String,
}
