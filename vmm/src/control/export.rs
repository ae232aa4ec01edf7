//! Pushing a tree snapshot out of the machine (into a snapshot store): the control layer
//! holds an exporter the embedding program installs, since the store client (S3, tokio)
//! stays out of the VMM.

use std::path::Path;

use snapshot::tree::SnapshotInfo;

use super::types::{SnapshotPush, SnapshotPushResult};

/// Uploads a snapshot of the tree whose metadata file is `metadata` elsewhere. Runs on the
/// caller's thread for as long as the upload takes; the snapshot's images are frozen and
/// its checkpoint complete, so the VM may run meanwhile.
pub trait SnapshotExporter: Send + Sync {
    /// Pushes `snapshot` as `request` says; the error text is the client's to read.
    fn push(
        &self,
        snapshot: &SnapshotInfo,
        metadata: &Path,
        request: &SnapshotPush,
    ) -> std::result::Result<SnapshotPushResult, String>;
}
