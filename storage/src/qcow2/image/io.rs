//! Guest data in and out of one qcow2 layer: batched reads, in-place and copy-on-write
//! writes, zeroing and discard, and the [`BlockDevice`] implementation on top of them.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Qcow2Image, MAX_BATCH_CLUSTERS, STRIPES};
use crate::device::{check_range, Allocation, BlockDevice, BlockStatus, ImageInfo};
use crate::error::Result;
use crate::file::{AlignedBuf, ImageFile};
use crate::qcow2::cache::Slice;
use crate::qcow2::compress::decompress;
use crate::qcow2::entry::{CompressedExtent, Mapping, OFLAG_COPIED, OFLAG_ZERO};

/// The bytes of a run of whole clusters being written: in memory, or an extent of another
/// file copied in the kernel.
#[derive(Clone, Copy)]
enum Payload<'a> {
    /// The bytes themselves.
    Buf(&'a [u8]),
    /// `len` bytes of `src` from host offset `offset` on.
    File {
        src: &'a ImageFile,
        offset: u64,
        len: u64,
    },
}

impl Payload<'_> {
    /// Bytes in the payload.
    fn len(&self) -> u64 {
        match self {
            Payload::Buf(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }
}

impl Qcow2Image {
    /// Reads guest bytes that this layer does not hold: from the backing chain, zeroes past
    /// its end or without one.
    pub(in crate::qcow2) fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let backing = self.backing.read();
        match &*backing {
            Some(b) if offset < b.size() => {
                let n = (b.size() - offset).min(buf.len() as u64) as usize;
                b.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub(in crate::qcow2) fn read_compressed(&self, extent: CompressedExtent) -> Result<Vec<u8>> {
        let file_len = self.file.len()?;
        if extent.offset >= file_len {
            return Err(self.invalid(format!(
                "compressed cluster at {:#x} lies past the end of the file",
                extent.offset
            )));
        }
        let len = extent.len.min(file_len - extent.offset) as usize;
        let mut packed = vec![0u8; len];
        self.file.read_at(&mut packed, extent.offset)?;
        let mut out = vec![0u8; self.cluster_size as usize];
        if !decompress(self.compression, &packed, &mut out) {
            return Err(self.invalid(format!(
                "compressed cluster at {:#x} does not decompress",
                extent.offset
            )));
        }
        Ok(out)
    }

    /// Reads part of one guest cluster.
    pub(in crate::qcow2) fn read_in_cluster(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let guest_cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (self.cluster_size - 1);
        let _shared = self.stripe(guest_cluster).read();
        match self.lookup(guest_cluster)? {
            Mapping::Data { host, .. } => self.file.read_at(buf, host + in_cluster),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_below(buf, offset),
            Mapping::Compressed(extent) => {
                let data = self.read_compressed(extent)?;
                let start = in_cluster as usize;
                buf.copy_from_slice(&data[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    /// Reads up to [`MAX_BATCH_CLUSTERS`] clusters, merging neighbouring clusters that are
    /// contiguous in the file (or all in the backing file) into one request each.
    pub(in crate::qcow2) fn read_batch(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let last = (offset + buf.len() as u64 - 1) >> self.cluster_bits;
        if first == last {
            return self.read_in_cluster(buf, offset);
        }
        // Shared stripe locks taken in ascending order: writers hold at most one stripe at a
        // time, so this cannot deadlock.
        let mut stripes: Vec<usize> = (first..=last).map(|c| c as usize & (STRIPES - 1)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _shared: Vec<_> = stripes.iter().map(|&i| self.stripes[i].read()).collect();

        /// A run of buffer bytes served by one request.
        enum Run {
            Host { host: u64 },
            Below { guest: u64 },
        }
        let mut pending: Option<(Run, usize, usize)> = None;
        let flush = |pending: &mut Option<(Run, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            match pending.take() {
                Some((Run::Host { host }, start, len)) => {
                    self.file.read_at(&mut buf[start..start + len], host)
                }
                Some((Run::Below { guest }, start, len)) => {
                    self.read_below(&mut buf[start..start + len], guest)
                }
                None => Ok(()),
            }
        };
        let mut done = 0usize;
        for (at, n) in self.clusters(offset, buf.len() as u64) {
            let n = n as usize;
            let in_cluster = at & (self.cluster_size - 1);
            match self.lookup(at >> self.cluster_bits)? {
                Mapping::Data { host, .. } => {
                    let host = host + in_cluster;
                    let extends = matches!(
                        &pending,
                        Some((Run::Host { host: h }, start, len)) if h + *len as u64 == host && start + len == done
                    );
                    if extends {
                        if let Some((_, _, len)) = pending.as_mut() {
                            *len += n;
                        }
                    } else {
                        flush(&mut pending, buf)?;
                        pending = Some((Run::Host { host }, done, n));
                    }
                }
                Mapping::Unallocated => {
                    let extends = matches!(&pending, Some((Run::Below { .. }, _, _)));
                    if extends {
                        if let Some((_, _, len)) = pending.as_mut() {
                            *len += n;
                        }
                    } else {
                        flush(&mut pending, buf)?;
                        pending = Some((Run::Below { guest: at }, done, n));
                    }
                }
                Mapping::Zero { .. } => {
                    flush(&mut pending, buf)?;
                    buf[done..done + n].fill(0);
                }
                Mapping::Compressed(extent) => {
                    flush(&mut pending, buf)?;
                    let data = self.read_compressed(extent)?;
                    let start = in_cluster as usize;
                    buf[done..done + n].copy_from_slice(&data[start..start + n]);
                }
            }
            done += n;
        }
        flush(&mut pending, buf)
    }

    /// Writes part of one guest cluster.
    pub(in crate::qcow2) fn write_in_cluster(&self, data: &[u8], offset: u64) -> Result<()> {
        self.write_in_cluster_unsynced(data, offset)?;
        // Marked after the data is written and before the write is acknowledged, so a
        // flush that starts after the acknowledgement always syncs it.
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    fn write_in_cluster_unsynced(&self, data: &[u8], offset: u64) -> Result<()> {
        let guest_cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (self.cluster_size - 1);
        {
            let _shared = self.stripe(guest_cluster).read();
            if let Mapping::Data { host, copied: true } = self.lookup(guest_cluster)? {
                self.check_data_target(host)?;
                return self.file.write_at(data, host + in_cluster);
            }
        }
        let _exclusive = self.stripe(guest_cluster).write();
        let (slice, index) = self.l2_for_write(guest_cluster)?;
        let old = self.decode(slice.get(index), guest_cluster)?;
        if let Mapping::Data { host, copied: true } = old {
            self.check_data_target(host)?;
            return self.file.write_at(data, host + in_cluster);
        }
        if matches!(old, Mapping::Unallocated) && data.len() as u64 != self.cluster_size {
            // The copy from below may share its allocation, read and write with
            // neighbouring clusters' copy-on-writes in flight (see `cow_batch`).
            let target = self.cow_from_below(guest_cluster, in_cluster as usize, data)?;
            let newly = slice.set(index, target | OFLAG_COPIED);
            return self.note_dirty(newly);
        }
        // A preallocated zero cluster we own can take the data in place of a new one.
        let (target, reuse) = match old {
            Mapping::Zero {
                host: Some(h),
                copied: true,
            } => {
                self.check_data_target(h)?;
                (h, true)
            }
            _ => {
                let mut meta = self.meta.lock();
                (self.allocate(&mut meta, 1)?, false)
            }
        };
        if data.len() as u64 == self.cluster_size {
            self.file.write_at(data, target)?;
        } else {
            let cs = self.cluster_size as usize;
            // Aligned, so that with O_DIRECT the reads and the write go straight to the
            // device instead of through bounce buffers and copies.
            let mut aligned = AlignedBuf::new(cs);
            let full = &mut aligned[..cs];
            let head = in_cluster as usize;
            let tail = head + data.len();
            // Copy-on-write reads only the parts the write does not cover.
            match old {
                Mapping::Data { host, .. } => {
                    self.file.read_at(&mut full[..head], host)?;
                    self.file.read_at(&mut full[tail..], host + tail as u64)?;
                }
                Mapping::Compressed(extent) => {
                    full.copy_from_slice(&self.read_compressed(extent)?);
                }
                Mapping::Zero { .. } => {}
                // Partial writes take `cow_from_below` above; kept for completeness.
                Mapping::Unallocated => {
                    let cluster_start = guest_cluster << self.cluster_bits;
                    if self.backing.read().is_some() {
                        self.read_below(&mut full[..head], cluster_start)?;
                        self.read_below(&mut full[tail..], cluster_start + tail as u64)?;
                    }
                }
            }
            full[head..tail].copy_from_slice(data);
            self.file.write_at(full, target)?;
        }
        let newly = slice.set(index, target | OFLAG_COPIED);
        if !reuse {
            self.defer_free(old);
        }
        self.note_dirty(newly)
    }

    /// Writes `data`, whole clusters starting at cluster-aligned `offset`: the clusters that
    /// need new space get it from one allocation, and every run contiguous in the file is
    /// written with one call (as QEMU does for multi-cluster writes), or copied with one
    /// in-kernel copy when the data is another file's extent, which is what makes
    /// sequential writes, stream and commit fast. Mappings are published only after all
    /// the data is in place.
    fn write_whole_clusters(&self, data: Payload<'_>, offset: u64) -> Result<()> {
        /// Where one cluster of the request goes.
        enum Target {
            /// Owned cluster, written in place.
            InPlace(u64),
            /// Needs a fresh cluster; the old mapping is released afterwards.
            Fresh(Arc<Slice>, usize, Mapping),
        }
        let cs = self.cluster_size;
        let first = offset >> self.cluster_bits;
        let count = data.len() >> self.cluster_bits;
        // Exclusive stripes in ascending order (see `read_batch` for why that is safe).
        let mut stripes: Vec<usize> = (first..first + count)
            .map(|c| c as usize & (STRIPES - 1))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _exclusive: Vec<_> = stripes.iter().map(|&i| self.stripes[i].write()).collect();

        let mut plan = Vec::with_capacity(count as usize);
        let mut fresh = 0u64;
        for guest_cluster in first..first + count {
            if let Mapping::Data { host, copied: true } = self.lookup(guest_cluster)? {
                self.check_data_target(host)?;
                plan.push(Target::InPlace(host));
                continue;
            }
            let (slice, index) = self.l2_for_write(guest_cluster)?;
            let old = self.decode(slice.get(index), guest_cluster)?;
            if let Mapping::Data { host, copied: true } = old {
                self.check_data_target(host)?;
                plan.push(Target::InPlace(host));
            } else {
                fresh += 1;
                plan.push(Target::Fresh(slice, index, old));
            }
        }
        let mut next = if fresh > 0 {
            let mut meta = self.meta.lock();
            self.allocate(&mut meta, fresh)?
        } else {
            0
        };
        let hosts: Vec<u64> = plan
            .iter()
            .map(|t| match t {
                Target::InPlace(host) => *host,
                Target::Fresh(..) => {
                    next += cs;
                    next - cs
                }
            })
            .collect();
        let mut run_start = 0usize;
        for i in 1..=hosts.len() {
            if i == hosts.len() || hosts[i] != hosts[i - 1] + cs {
                let (from, to) = (run_start as u64 * cs, i as u64 * cs);
                match data {
                    Payload::Buf(bytes) => self
                        .file
                        .write_at(&bytes[from as usize..to as usize], hosts[run_start])?,
                    Payload::File { src, offset, .. } => {
                        self.file
                            .copy_from(src, offset + from, to - from, hosts[run_start])?;
                    }
                }
                run_start = i;
            }
        }
        // The data is in place: publish the new mappings.
        for (target, host) in plan.into_iter().zip(hosts) {
            if let Target::Fresh(slice, index, old) = target {
                let newly = slice.set(index, host | OFLAG_COPIED);
                self.defer_free(old);
                self.note_dirty(newly)?;
            }
        }
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// Shared body of `write_zeroes` and `discard`.
    pub(in crate::qcow2) fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        // What a whole unmapped cluster becomes: unallocated reads as zero without a backing
        // file; with one, version 3 has the zero flag; version 2 can only fall through to
        // the backing file (allowed for discard) or store zeroes.
        let unmapped_entry = if self.backing.read().is_none() {
            Some(0)
        } else if self.version >= 3 {
            Some(OFLAG_ZERO)
        } else if discard {
            Some(0)
        } else {
            None
        };
        let ranges: Vec<(u64, u64)> = self.clusters(offset, len).collect();
        let mut zeroes: Vec<u8> = Vec::new();
        for (at, n) in ranges {
            let in_cluster = at & (self.cluster_size - 1);
            let whole = in_cluster == 0 && (n == self.cluster_size || at + n == self.size);
            match (whole, unmapped_entry) {
                (true, Some(entry)) => self.unmap_cluster(at >> self.cluster_bits, entry)?,
                _ if discard => {}
                _ => {
                    zeroes.resize(n as usize, 0);
                    self.write_in_cluster(&zeroes[..n as usize], at)?;
                }
            }
        }
        Ok(())
    }
    fn status_of(&self, mapping: &Mapping) -> (Allocation, bool) {
        match mapping {
            Mapping::Data { .. } => (Allocation::Data, false),
            Mapping::Compressed(_) => (Allocation::Data, true),
            Mapping::Zero { .. } => (Allocation::Zero, false),
            Mapping::Unallocated => (Allocation::Unallocated, false),
        }
    }
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let batch = MAX_BATCH_CLUSTERS * self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            // Batches end on cluster boundaries so each covers whole clusters but the ends.
            let limit = batch - (at & (self.cluster_size - 1));
            let n = (buf.len() - done).min(limit as usize);
            self.read_batch(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let remaining = (buf.len() - done) as u64;
            if at & (cs - 1) == 0 && remaining >= 2 * cs {
                // Runs of whole clusters: one allocation and one write per contiguous run.
                let n = ((remaining / cs).min(MAX_BATCH_CLUSTERS) * cs) as usize;
                self.write_whole_clusters(Payload::Buf(&buf[done..done + n]), at)?;
                done += n;
            } else {
                let n = (cs - (at & (cs - 1))).min(remaining) as usize;
                self.write_in_cluster(&buf[done..done + n], at)?;
                done += n;
            }
        }
        Ok(())
    }

    fn write_from_file(
        &self,
        offset: u64,
        len: u64,
        src: &ImageFile,
        src_offset: u64,
    ) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        let cs = self.cluster_size;
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let remaining = len - done;
            if at & (cs - 1) == 0 && remaining >= cs {
                // Whole clusters: copied file to file, one allocation and one copy per
                // contiguous run, published after the copy as any write is.
                let n = (remaining / cs).min(MAX_BATCH_CLUSTERS) * cs;
                let payload = Payload::File {
                    src,
                    offset: src_offset + done,
                    len: n,
                };
                self.write_whole_clusters(payload, at)?;
                done += n;
            } else {
                // A part of a cluster is a copy-on-write of its own, through memory.
                let n = (cs - (at & (cs - 1))).min(remaining);
                let mut buf = vec![0u8; n as usize];
                src.read_at(&mut buf, src_offset + done)?;
                self.write_in_cluster(&buf, at)?;
                done += n;
            }
        }
        Ok(())
    }

    fn data_file(&self) -> Option<&ImageFile> {
        Some(&self.file)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        self.writeback()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        let mut status = BlockStatus {
            len: 0,
            allocation: Allocation::Unallocated,
            depth: 0,
            offset: None,
            compressed: false,
        };
        if len == 0 {
            return Ok(status);
        }
        let mut first: Option<Mapping> = None;
        let per_table = self.cluster_size * self.l2_entries;
        let mut skip_until = 0u64;
        for (at, n) in self.clusters(offset, len) {
            if at < skip_until {
                status.len += n;
                continue;
            }
            let mapping = self.lookup(at >> self.cluster_bits)?;
            if self.l1_entry(at >> self.cluster_bits)?.0 == 0
                && matches!(first, None | Some(Mapping::Unallocated))
            {
                // No L2 table: the whole range it would map is unallocated here.
                skip_until = (at / per_table + 1) * per_table;
            }
            let in_cluster = at & (self.cluster_size - 1);
            match first {
                None => {
                    let (allocation, compressed) = self.status_of(&mapping);
                    status.allocation = allocation;
                    status.compressed = compressed;
                    status.depth = 0;
                    status.offset = match mapping {
                        Mapping::Data { host, .. } => Some(host + in_cluster),
                        Mapping::Zero { host: Some(h), .. } => Some(h + in_cluster),
                        _ => None,
                    };
                    first = Some(mapping);
                }
                Some(prev) => {
                    let same = match (prev, mapping) {
                        (Mapping::Data { .. }, Mapping::Data { host, .. })
                        | (
                            Mapping::Zero { host: Some(_), .. },
                            Mapping::Zero {
                                host: Some(host), ..
                            },
                        ) => status.offset.map(|o| o + status.len) == Some(host + in_cluster),
                        (Mapping::Zero { host: Some(_), .. }, _)
                        | (_, Mapping::Zero { host: Some(_), .. }) => false,
                        (a, b) => {
                            self.status_of(&a) == self.status_of(&b)
                                && !matches!(a, Mapping::Data { .. })
                        }
                    };
                    if !same {
                        break;
                    }
                }
            }
            status.len += n;
        }
        if status.allocation == Allocation::Unallocated {
            match &*self.backing.read() {
                Some(b) if offset < b.size() => {
                    let n = status.len.min(b.size() - offset);
                    let mut below = b.block_status(offset, n)?;
                    below.depth += 1;
                    return Ok(below);
                }
                _ => status.depth = self.bottom_depth(),
            }
        }
        Ok(status)
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    fn format_probed(&self) -> bool {
        self.format_probed
    }

    fn info(&self) -> ImageInfo {
        self.info.clone()
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing.read().clone()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl dyn BlockDevice + '_ {
    /// This layer as a qcow2 image, for operations only qcow2 has (snapshots, backing
    /// pointer changes).
    pub fn as_qcow2(&self) -> Option<&Qcow2Image> {
        self.as_any()?.downcast_ref()
    }
}
