//! What a checkpoint records about a virtio-blk disk: how it was presented and which image
//! chain it was on, so a restore in a new process reopens the same files and can tell a
//! disk that changed size.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use storage::BlockDevice;

use crate::error::{Error, Result};
use crate::machine::AttachedDisk;
use crate::persist::Persist;

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

/// What saving a disk needs besides the disk.
#[derive(Clone, Copy)]
pub struct BlockSaveArgs<'a> {
    /// The top of its chain. Passed in because the disk may be quiesced (its lock held)
    /// while a snapshot saves this state.
    pub top: &'a Arc<dyn BlockDevice>,
    /// Number of request queues it is presented with.
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
}

impl std::fmt::Debug for BlockSaveArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockSaveArgs")
            .field("top", &self.top.path())
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

/// A disk's checkpoint records how it was presented and which files it was on. Loading
/// one into a running VM changes nothing on the disk (the caller points the disk at
/// matching images first); it checks the disk can take the state. A new VM is built on the
/// saved images instead (the checkpoint's `config`).
impl Persist for AttachedDisk {
    type State = BlockDiskState;
    type SaveArgs<'a> = BlockSaveArgs<'a>;
    type RestoreArgs<'a> = BlockSaveArgs<'a>;

    fn save(&self, args: BlockSaveArgs<'_>) -> Result<BlockDiskState> {
        Ok(BlockDiskState::of(self, args))
    }

    /// Checks the saved disk's name and size; the queue shape and window are the
    /// transport's and the builder's, checked by [`Persist::restore`] against `args`.
    fn check(&self, state: &BlockDiskState) -> Result<()> {
        if state.name != self.name {
            return Err(state.mismatch("disk", &state.name, &self.name));
        }
        let size = self.disk.size();
        if state.size != size {
            return Err(state.mismatch("size", &state.size, &size));
        }
        Ok(())
    }

    fn restore(&self, args: BlockSaveArgs<'_>, state: &BlockDiskState) -> Result<()> {
        state.check(&BlockDiskState::of(self, args))
    }
}

impl BlockDiskState {
    /// The state of `disk` as presented by `args`.
    fn of(disk: &AttachedDisk, args: BlockSaveArgs<'_>) -> Self {
        let top = args.top;
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
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            size: disk.disk.size(),
            mmio_base: disk.mmio_base,
            gsi: disk.gsi,
        }
    }

    fn mismatch(
        &self,
        what: &str,
        saved: &dyn std::fmt::Display,
        now: &dyn std::fmt::Display,
    ) -> Error {
        Error::Device {
            device: format!("virtio-blk {}", self.name),
            message: format!("the checkpoint has {what} {saved}, this VM {now}"),
        }
    }

    /// Checks a running disk can take this state: same name, size, queues and window.
    fn check(&self, current: &BlockDiskState) -> Result<()> {
        if self.name != current.name {
            return Err(self.mismatch("disk", &self.name, &current.name));
        }
        if self.size != current.size {
            return Err(self.mismatch("size", &self.size, &current.size));
        }
        if (self.num_queues, self.queue_size) != (current.num_queues, current.queue_size) {
            return Err(self.mismatch(
                "queues",
                &format!("{}x{}", self.num_queues, self.queue_size),
                &format!("{}x{}", current.num_queues, current.queue_size),
            ));
        }
        if (self.mmio_base, self.gsi, self.read_only)
            != (current.mmio_base, current.gsi, current.read_only)
        {
            return Err(self.mismatch(
                "window/GSI/read-only",
                &format!("{:#x}/{}/{}", self.mmio_base, self.gsi, self.read_only),
                &format!(
                    "{:#x}/{}/{}",
                    current.mmio_base, current.gsi, current.read_only
                ),
            ));
        }
        Ok(())
    }
}
