//! A disk under control: its name, its live handle, whether it is writable; and how it is
//! described to callers (virsh `domblklist`).

use std::sync::Arc;

use storage::{BlockDevice, LiveDisk};

use super::types::DiskInfo;

/// One disk of a controlled machine. How the guest reaches it (a virtio-mmio window, a
/// vhost-user socket) is the machine's business, not the control layer's.
#[derive(Debug, Clone)]
pub struct Disk {
    /// vda, vdb, ... or the disk's id: how requests name it.
    pub name: String,
    /// The live handle the guest's I/O goes through; snapshots and jobs re-point it.
    pub disk: Arc<LiveDisk>,
    /// Presented read-only: no snapshot or job may change it.
    pub read_only: bool,
}

impl Disk {
    /// Disk `name` over `disk`.
    pub fn new(name: impl Into<String>, disk: Arc<LiveDisk>, read_only: bool) -> Self {
        Disk {
            name: name.into(),
            disk,
            read_only,
        }
    }

    /// Its description, with `job` the id of the block job running on it, if any.
    pub fn info(&self, job: Option<String>) -> DiskInfo {
        let top = self.disk.top();
        let info = top.info();
        DiskInfo {
            name: self.name.clone(),
            source: info.filename.clone(),
            format: info
                .format
                .map(|f| format!("{f:?}").to_lowercase())
                .unwrap_or_else(|| "unknown".into()),
            size: info.virtual_size,
            read_only: self.read_only,
            backing_chain: backing_chain(&top),
            job,
        }
    }
}

/// The files of `top`'s backing chain, below it, top first.
fn backing_chain(top: &Arc<dyn BlockDevice>) -> Vec<String> {
    let mut chain = Vec::new();
    let mut layer = top.backing();
    while let Some(current) = layer {
        chain.push(current.info().filename);
        layer = current.backing();
    }
    chain
}
