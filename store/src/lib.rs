//! Snapshots across a fleet: a deduplicated snapshot store on any S3-compatible object
//! store (AWS S3, SeaweedFS, MinIO, Ceph RGW), and the pieces of a lazy restore from it.
//!
//! A store is an `s3://BUCKET/PREFIX`. Under the prefix:
//!
//! ```text
//! chunks/ab/abcd...            content-addressed chunks (SHA-256 of the bytes)
//! snapshots/NAME.json          a snapshot's manifest: state blob, memory and disk chunk lists
//! snapshots/NAME.workingset.json   chunks a first restore touched early (prefetched later)
//! ```
//!
//! [`push::push`] uploads a local snapshot (its checkpoint chain flattened, each disk's
//! frozen chain flattened), skipping zero chunks and chunks already present;
//! [`pull::pull`] writes one back as local files; [`lazy::prepare`] readies a restore that
//! fetches data on first use: disks as [`remote::RemoteDisk`] under local qcow2 overlays,
//! memory as [`remote::RemoteMemory`] for the VMM's userfaultfd pager. Everything fetched
//! is checked against its hash. [`origin`] lets a reader (a push) of a lazily restored
//! VM's snapshot attach the remote layer its overlays' files do not name. The crate has no KVM; it talks to the store through the
//! `object_store` crate with a small tokio runtime of its own, behind a blocking API.

pub mod catalog;
pub mod chunk;
pub mod client;
pub mod error;
pub mod lazy;
pub mod location;
pub mod manifest;
pub mod origin;
pub mod pull;
pub mod push;
pub mod remote;
pub mod source;

#[cfg(test)]
mod tests;

pub use client::Store;
pub use error::{Error, Result};
pub use location::{Location, StoreConfig};
