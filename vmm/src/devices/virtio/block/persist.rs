//! What a checkpoint records about a virtio-blk disk: how it was presented and which image
//! chain it was on, so a restore in a new process reopens the same files and can tell a
//! disk that changed size.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use storage::BlockDevice;

use crate::builder::AttachedDisk;

/// A virtio-blk disk at checkpoint time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDiskState {
    /// vda, vdb, ... or its id.
    pub name: String,
    /// The active image (top of the chain) when the checkpoint was taken.
    pub top: PathBuf,
    /// The backing files below it, top first (for information and checks).
    pub backing_chain: Vec<String>,
    /// Presented read-only.
    pub read_only: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// Virtual size in bytes.
    pub size: u64,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt.
    pub gsi: u32,
}

impl BlockDiskState {
    /// The state of `disk`, whose chain starts at `top`, presented with `num_queues` queues
    /// of `queue_size`. The top is passed in because the disk may be quiesced (its lock
    /// held) while a snapshot saves this state.
    pub fn of(
        disk: &AttachedDisk,
        top: &Arc<dyn BlockDevice>,
        num_queues: u16,
        queue_size: u16,
    ) -> Self {
        let mut backing_chain = Vec::new();
        let mut layer = top.backing();
        while let Some(current) = layer {
            backing_chain.push(current.info().filename);
            layer = current.backing();
        }
        // Absolute, so a restore from another working directory opens the same file.
        let path = top.path();
        BlockDiskState {
            name: disk.name.clone(),
            top: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            backing_chain,
            read_only: disk.read_only,
            num_queues,
            queue_size,
            size: disk.disk.size(),
            mmio_base: disk.mmio_base,
            gsi: disk.gsi,
        }
    }

    /// Checks a running disk can take this state: same name, size, queues and window.
    pub fn check(&self, current: &BlockDiskState) -> Result<(), String> {
        let mismatch = |what: &str, saved: String, now: String| {
            Err(format!(
                "disk {}: the checkpoint has {what} {saved}, this VM {now}",
                self.name
            ))
        };
        if self.name != current.name {
            return mismatch("disk", self.name.clone(), current.name.clone());
        }
        if self.size != current.size {
            return mismatch("size", self.size.to_string(), current.size.to_string());
        }
        if (self.num_queues, self.queue_size) != (current.num_queues, current.queue_size) {
            return mismatch(
                "queues",
                format!("{}x{}", self.num_queues, self.queue_size),
                format!("{}x{}", current.num_queues, current.queue_size),
            );
        }
        if (self.mmio_base, self.gsi, self.read_only)
            != (current.mmio_base, current.gsi, current.read_only)
        {
            return mismatch(
                "window/GSI/read-only",
                format!("{:#x}/{}/{}", self.mmio_base, self.gsi, self.read_only),
                format!(
                    "{:#x}/{}/{}",
                    current.mmio_base, current.gsi, current.read_only
                ),
            );
        }
        Ok(())
    }
}
