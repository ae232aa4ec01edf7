//! Making a layer's metadata durable in crash-safe order, and the header rewrites that must
//! follow a full writeback (sealing a layer read-only, changing its backing file).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Meta, Qcow2Image};
use crate::device::BlockDevice;
use crate::error::Result;
use crate::format::ImageFormat;
use crate::lock::LockMode;
use crate::qcow2::header::write_header;

impl Qcow2Image {
    /// Flushes and then refuses every further write: the layer is becoming the backing file
    /// of a new overlay (a live external snapshot). Cannot be undone on this handle.
    pub fn make_read_only(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.close()?;
        self.read_only.store(true, Ordering::Release);
        // Other processes may read it now, and may no longer write it.
        self.file.set_lock_mode(LockMode::Read)
    }

    /// Rewrites the backing file pointer in the header (name and backing-format extension;
    /// `None` makes the image standalone) and, when `device` is given, serves reads of
    /// unallocated clusters from it from now on. The caller guarantees the new backing
    /// chain reads the same data where this layer is unallocated (stream and commit do);
    /// metadata and data are flushed before the header changes, and the header is synced.
    pub fn set_backing(
        &self,
        name: Option<&str>,
        format: Option<ImageFormat>,
        device: Option<Arc<dyn BlockDevice>>,
    ) -> Result<()> {
        self.writable()?;
        self.writeback()?;
        {
            let mut meta = self.meta.lock();
            meta.header.backing_file = name.map(str::to_string);
            meta.header.backing_format = name.and(format).map(|f| f.name().to_string());
            write_header(&self.file, &mut meta.header)?;
            self.file.sync()?;
        }
        *self.backing.write() = device;
        Ok(())
    }

    /// Writes dirty metadata back in crash-safe order, then applies deferred frees.
    ///
    /// A failure leaves everything that was not made durable still pending: data stays
    /// marked unsynced, L2 slices and L1 sectors stay dirty (also those written but not
    /// synced: after a failed fsync the kernel may have dropped them), refcount slices
    /// likewise, and unapplied frees stay queued. A retried flush therefore writes and
    /// syncs again instead of reporting success over a lost write.
    pub(in crate::qcow2) fn writeback(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut meta = self.meta.lock();
        self.dirtied.store(0, Ordering::Relaxed);
        // Cleared before the syncs so that writes acknowledged meanwhile set it again; put
        // back on any failure below.
        let data_written = self.unsynced.swap(false, Ordering::AcqRel);
        if !data_written
            && !self.l2_cache.has_dirty()
            && meta.l1_dirty.is_empty()
            && meta.pending_frees.is_empty()
            && !meta.refcounts.is_dirty()
        {
            // Nothing since the last barrier: skip the fsyncs.
            return Ok(());
        }
        let result = self.writeback_locked(&mut meta);
        if result.is_err() {
            self.unsynced.store(true, Ordering::Release);
        }
        result
    }

    fn writeback_locked(&self, meta: &mut Meta) -> Result<()> {
        // 1. Refcount blocks (covering every cluster any dirty L2 entry can point at), and
        //    the data written so far, reach the disk.
        meta.refcounts.flush(&self.file)?;
        if let Err(e) = self.file.sync() {
            meta.refcounts.mark_cached_dirty();
            return Err(e);
        }
        // 2. L2 slices.
        let dirty = self.l2_cache.dirty_slices();
        for (k, slice) in dirty.iter().enumerate() {
            let raw = slice.take_for_writeback();
            if let Err(e) = self.file.write_at(&raw, slice.offset) {
                dirty[..=k].iter().for_each(|s| s.mark_dirty());
                return Err(e);
            }
        }
        if !dirty.is_empty() {
            if let Err(e) = self.file.sync() {
                dirty.iter().for_each(|s| s.mark_dirty());
                return Err(e);
            }
        }
        // 3. L1 sectors, forgotten only once synced.
        if !meta.l1_dirty.is_empty() {
            for &sector in meta.l1_dirty.iter() {
                let first = (sector * 64) as usize;
                let last = (first + 64).min(self.l1.len());
                let mut raw = Vec::with_capacity(512);
                for e in &self.l1[first..last] {
                    raw.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
                }
                self.file.write_at(&raw, self.l1_offset + sector * 512)?;
            }
            self.file.sync()?;
            meta.l1_dirty.clear();
        }
        // 4. Only now may references dropped by those mappings be released. A free that
        //    fails is dropped, not retried: it may have been applied in part, and a leak is
        //    safe where a second decrement is not.
        while let Some((offset, len)) = meta.pending_frees.pop() {
            meta.refcounts.update_range(&self.file, offset, len, -1)?;
        }
        Ok(())
    }

    /// Flushes until nothing is pending, so the file on disk has no leaks (used on close).
    pub fn close(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.writeback()?;
        // Frees applied by the first pass are written by the second.
        self.writeback()
    }
}
