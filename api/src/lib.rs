//! The snapvmm REST API: HTTP/1.1 with JSON bodies on a Unix socket, Firecracker-style paths,
//! each route mapped onto one method of [`vmm::Control`].
//!
//! | method | path | does |
//! | --- | --- | --- |
//! | GET | `/vm` | [`types::VmInfo`] |
//! | PUT | `/vm/pause`, `/vm/resume`, `/vm/shutdown` | the VM's life |
//! | GET | `/vm/agent` | the guest agent's freeze state, last quiesce, [`types::AgentStatus`] |
//! | GET | `/disks`, `/disks/{disk}` | [`types::DiskInfo`] (virsh `domblklist`) |
//! | PUT | `/vm/checkpoint` | memory + vCPU + device checkpoint, [`types::CheckpointRequest`] |
//! | PUT | `/vm/checkpoint/revert` | back to a checkpoint in place, [`types::RevertRequest`] |
//! | PUT | `/snapshot/disk` | external disk-only snapshot, [`types::SnapshotCreate`] |
//! | PUT | `/disks/{disk}/stream` | blockpull, [`types::StreamRequest`] |
//! | PUT | `/disks/{disk}/commit` | blockcommit, [`types::CommitRequest`] |
//! | GET | `/disks/{disk}/job` | [`types::JobInfo`] |
//! | PUT | `/disks/{disk}/job/{pause,resume,cancel,complete}` | job verbs |
//! | PUT | `/disks/{disk}/job/speed` | [`types::SpeedRequest`] |
//! | GET | `/snapshots` | the snapshot tree, [`types::SnapshotInfo`] each (virsh `snapshot-list`) |
//! | PUT | `/snapshots` | take a snapshot, [`types::TreeSnapshotCreate`] (`snapshot-create-as`) |
//! | GET | `/snapshots/{name}` | one snapshot (`snapshot-info`) |
//! | PUT | `/snapshots/{name}/revert` | revert to it (`snapshot-revert`) |
//! | PUT | `/snapshots/{name}/delete` | delete it, [`types::SnapshotDeleteRequest`] (`snapshot-delete`) |
//! | GET | `/current-snapshot` | the current snapshot (`snapshot-current`) |
//! | GET | `/snapshot-jobs` | merge jobs a delete is running, [`types::JobInfo`] each |
//!
//! `docs/openapi.json` documents the same set; a test holds the two together. Errors are
//! 4xx/5xx with a [`types::Fault`] body; no request can stop the VM except `/vm/shutdown`.
//!
//! - [`routes`]: path and body parsing, one [`vmm::Control`] call per route, errors mapped
//!   onto statuses (no business logic: that is the control layer's);
//! - [`server`]: hyper on its own thread, on a socket only its owner may use;
//! - [`client`]: the client `snapvmm ctl` and the tests use.

pub mod client;
pub mod error;
pub mod routes;
pub mod server;
pub mod types;

#[cfg(test)]
mod tests;

pub use client::ApiClient;
pub use error::{Error, Result};
pub use server::ApiServer;
pub use types::{VmInfo, VmState};
