//! qcow2 internal snapshot operations on a disk the guest is using, and the adapters that
//! stream VM state into and out of a qcow2 VM-state area.
//!
//! The storage layer's internal snapshot operations need the image exclusively (`&mut`),
//! while a live disk shares its top. Under the disk's quiesce guard the top is flushed and
//! sealed, a second, owned handle is opened on the same file (with the same in-memory backing
//! chain), the operation runs on it, and it becomes the disk's top.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use storage::live::Quiesced;
use storage::qcow2::Qcow2Image;
use storage::{BlockDevice, OpenOptions};

use crate::error::{Error, Result};

/// Seals the quiesced disk's qcow2 top and returns an owned, writable handle on its file.
pub(super) fn reopen_top(guard: &Quiesced<'_>) -> Result<Qcow2Image> {
    let old = guard.top().clone();
    let image = writable_qcow2(&old, guard.disk().name())?;
    let backing = old.backing();
    // Flushes every pending metadata write: the new handle reads a settled file.
    image.make_read_only()?;
    let path = old.path().to_path_buf();
    Ok(Qcow2Image::open_with(
        &path,
        false,
        &OpenOptions::default(),
        |name, _| {
            backing.clone().ok_or_else(|| {
                storage::Error::Chain(format!(
                    "{}: names backing file '{name}' but was open without one",
                    path.display()
                ))
            })
        },
    )?)
}

/// `layer` as a writable qcow2 image, or an error naming the disk.
pub(super) fn writable_qcow2<'a>(
    layer: &'a Arc<dyn BlockDevice>,
    disk: &str,
) -> Result<&'a Qcow2Image> {
    match layer.as_qcow2() {
        Some(image) if !image.is_read_only() => Ok(image),
        Some(_) => Err(Error::InvalidArgument(format!(
            "disk {disk}: active image {} is read-only",
            layer.path().display()
        ))),
        None => Err(Error::InvalidArgument(format!(
            "disk {disk}: internal snapshots need a qcow2 image, and {} is not one",
            layer.path().display()
        ))),
    }
}

/// Opens the qcow2 file at `path` alone (no backing chain), writable or not: for table
/// operations on an image no disk writes to.
pub(super) fn open_alone(path: &Path, read_only: bool) -> Result<Qcow2Image> {
    Ok(Qcow2Image::open(
        path,
        &OpenOptions {
            read_only,
            open_backing: false,
            ..OpenOptions::default()
        },
    )?)
}

/// A [`Write`] into the VM-state area of an image's active layer (savevm).
pub(super) struct VmStateWriter<'a> {
    /// The image written.
    pub image: &'a mut Qcow2Image,
    /// Bytes written so far.
    pub position: u64,
}

impl Write for VmStateWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.image
            .write_vm_state(buf, self.position)
            .map_err(std::io::Error::other)?;
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`Read`] of an internal snapshot's VM state (loadvm).
pub(super) struct VmStateReader {
    /// The image holding the snapshot.
    pub image: Qcow2Image,
    /// The snapshot's name.
    pub snapshot: String,
    /// Bytes read so far.
    pub position: u64,
    /// Bytes of state in all.
    pub size: u64,
}

impl Read for VmStateReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.position).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.image
            .read_vm_state(&self.snapshot, &mut buf[..n], self.position)
            .map_err(std::io::Error::other)?;
        self.position += n as u64;
        Ok(n)
    }
}
