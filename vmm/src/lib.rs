//! The snapvmm KVM micro-VMM: vCPUs, guest memory, devices and the API server.
//!
//! The VMM is built in a later step; for now this crate only ties the layers together so the
//! workspace's dependency direction (storage ← snapshot ← vmm ← binary) is fixed from the start.

pub use snapshot;
