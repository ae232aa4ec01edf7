//! Mapping changes that block jobs need and the guest write path does not: filling a cluster
//! only if the layer does not hold it yet (stream, copy-on-read), and emptying a layer
//! (`img commit` without `-d`).
//!
//! Both take the same per-cluster stripe lock as guest writes, so a job racing a guest write
//! to the same cluster can never overwrite what the guest wrote.

use std::sync::atomic::Ordering;

use super::entry::{Mapping, OFLAG_COPIED, OFLAG_ZERO};
use super::image::Qcow2Image;
use crate::error::{Error, Result};

/// What [`Qcow2Image::populate_cluster`] stores in a cluster the layer does not map yet.
#[derive(Debug, Clone, Copy)]
pub enum Fill<'a> {
    /// These bytes: a whole cluster, or the part of the last cluster inside the disk.
    Data(&'a [u8]),
    /// Zeroes: the zero flag on version 3, zeroed data on version 2.
    Zeroes,
}

impl Qcow2Image {
    /// Stores `fill` as the guest cluster starting at `offset` if, and only if, this layer
    /// does not map that cluster yet; returns whether it did.
    ///
    /// This is the copy-on-read primitive of stream jobs: data read from the backing chain
    /// lands in the top layer unless a guest write got there first, decided under the
    /// cluster's exclusive stripe lock so the two cannot interleave. `offset` must be
    /// cluster aligned and `Fill::Data` exactly as long as the cluster's part of the disk.
    pub fn populate_cluster(&self, offset: u64, fill: Fill<'_>) -> Result<bool> {
        self.writable()?;
        let cs = self.cluster_size;
        if offset % cs != 0 || offset >= self.size {
            return Err(Error::InvalidArgument(format!(
                "{}: populate at {offset:#x}: not a cluster start inside the disk",
                self.path.display()
            )));
        }
        let len = cs.min(self.size - offset);
        if let Fill::Data(data) = fill {
            if data.len() as u64 != len {
                return Err(Error::InvalidArgument(format!(
                    "{}: populate at {offset:#x}: {} bytes for a {len}-byte cluster",
                    self.path.display(),
                    data.len()
                )));
            }
        }
        let guest_cluster = offset >> self.cluster_bits;
        {
            // Cheap shared check first: on a busy top most clusters are mapped already.
            let _shared = self.stripe(guest_cluster).read();
            if !matches!(self.lookup(guest_cluster)?, Mapping::Unallocated) {
                return Ok(false);
            }
        }
        let _exclusive = self.stripe(guest_cluster).write();
        if !matches!(self.lookup(guest_cluster)?, Mapping::Unallocated) {
            return Ok(false);
        }
        let (slice, index) = self.l2_for_write(guest_cluster)?;
        let newly = match fill {
            Fill::Zeroes if self.version >= 3 => slice.set(index, OFLAG_ZERO),
            _ => {
                let target = {
                    let mut meta = self.meta.lock();
                    self.allocate(&mut meta, 1)?
                };
                match fill {
                    Fill::Data(data) if data.len() as u64 == cs => {
                        self.file.write_at(data, target)?
                    }
                    Fill::Data(data) => {
                        // The last cluster of a disk whose size is not a cluster multiple:
                        // write it whole so the file ends on a cluster boundary.
                        let mut full = vec![0u8; cs as usize];
                        full[..data.len()].copy_from_slice(data);
                        self.file.write_at(&full, target)?
                    }
                    Fill::Zeroes => self.file.write_at(&vec![0u8; cs as usize], target)?,
                }
                let newly = slice.set(index, target | OFLAG_COPIED);
                // As in the write path: marked before the caller can rely on the fill, so
                // the next flush syncs it.
                self.unsynced.store(true, Ordering::Release);
                newly
            }
        };
        self.note_dirty(newly)?;
        Ok(true)
    }

    /// Unmaps every cluster of this layer, so that it reads entirely from its backing file
    /// (`qemu-img commit` empties the committed image this way), and writes the metadata
    /// back. Clusters shared with internal snapshots keep their snapshot references.
    pub fn make_empty(&self) -> Result<()> {
        self.writable()?;
        let clusters = self.size.div_ceil(self.cluster_size);
        let mut guest_cluster = 0;
        while guest_cluster < clusters {
            let (l2_offset, _) = self.l1_entry(guest_cluster)?;
            let table_end = ((guest_cluster / self.l2_entries) + 1) * self.l2_entries;
            if l2_offset == 0 {
                guest_cluster = table_end;
                continue;
            }
            for cluster in guest_cluster..table_end.min(clusters) {
                if !matches!(self.lookup(cluster)?, Mapping::Unallocated) {
                    self.unmap_cluster(cluster, 0)?;
                }
            }
            guest_cluster = table_end;
        }
        self.close()
    }
}
