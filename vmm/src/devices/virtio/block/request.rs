//! One virtio-blk request: parse a descriptor chain, check it, run it on the disk, report.
//!
//! A request is a byte stream split over descriptors: device-readable bytes first (a 16-byte
//! header, then data for OUT/DISCARD/WRITE_ZEROES), device-writable bytes after (data for
//! IN/GET_ID, then one status byte, the chain's last writable byte). The framing is not
//! fixed (§2.7.4: "the device MUST NOT make assumptions about the particular arrangement of
//! descriptors"), so the header and the discard ranges may straddle descriptors.
//!
//! The driver is not trusted. Every check happens before the disk is touched:
//! - each data descriptor must lie inside one guest memory region;
//! - the chain has at most [`MAX_DESCRIPTORS`] non-empty descriptors, readable ones first;
//! - data lengths are whole sectors and `sector * 512 + length` stays within the disk, with
//!   checked arithmetic;
//! - DISCARD/WRITE_ZEROES carry 1..=[`MAX_DISCARD_SEGMENTS`] whole 16-byte ranges, each within
//!   the disk and [`MAX_DISCARD_SECTORS`] long at most, flags known;
//! - writes to a read-only disk fail.
//!
//! A failed check completes the request with IOERR (malformed) or UNSUPP (unknown type or
//! flags). A chain without a writable byte, or whose status byte lies outside guest memory,
//! cannot carry a status: it is returned to the driver with a used length of 0.
//!
//! Guest memory is only ever touched with volatile copies (vm-memory's [`VolatileSlice`]):
//! the guest can change its buffers while a request runs, so they are never handed to the
//! disk as Rust slices; data goes through the processor's bounce buffer instead.
//! [`RequestProcessor`] keeps its segment lists and bounce buffer between requests, so the
//! steady state does no allocation. It works on any vm-memory guest memory: the VMM's own (with a dirty bitmap) and
//! the frontend's shared memory a vhost-user backend maps.

use parking_lot::Mutex;
use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::backend::DiskBackend;
use super::{request_type, status, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};

/// Most non-empty descriptors accepted in one chain (indirect tables can hold 65535).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Most ranges in one DISCARD or WRITE_ZEROES request (the `max_discard_seg` advertised).
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Longest range of one DISCARD or WRITE_ZEROES segment, in sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Size of the request header.
const HEADER_SIZE: u64 = 16;
/// Size of one DISCARD/WRITE_ZEROES range.
const RANGE_SIZE: u64 = 16;
/// WRITE_ZEROES flag: the device may unmap the range.
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// A descriptor as the parser sees it: the virtio-queue type without the ring plumbing, so
/// tests and fuzzers can feed arbitrary chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorInfo {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// The device writes this buffer (VIRTQ_DESC_F_WRITE).
    pub device_writes: bool,
}

impl From<virtio_queue::desc::split::Descriptor> for DescriptorInfo {
    fn from(d: virtio_queue::desc::split::Descriptor) -> Self {
        DescriptorInfo {
            addr: d.addr().0,
            len: d.len(),
            device_writes: d.is_write_only(),
        }
    }
}

/// How a request ended: what goes into the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The status written to the guest, or `None` when the chain had no place for one.
    pub status: Option<u8>,
    /// Bytes written into the chain's buffers (data and status), for the used element.
    pub used_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Per-device facts a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits<'a> {
    /// Refuse OUT, DISCARD and WRITE_ZEROES.
    pub read_only: bool,
    /// The GET_ID answer, zero-padded.
    pub id: &'a [u8; ID_BYTES],
}

/// Largest chunk of a request's data the bounce buffer holds (see [`RequestProcessor`]).
pub const MAX_BOUNCE: u64 = 4 << 20;
/// Smallest part of a chunk given to a thread of its own (see [`RequestProcessor`]).
pub const PARALLEL_PART: usize = 256 << 10;
/// Most threads one chunk's copy and disk call are split over.
pub const MAX_PARTS: usize = 4;

/// Parses and runs requests; one per queue worker, reused for every request.
///
/// A request's data is usually scattered over many guest pages (a 1 MiB write is 256
/// descriptors). Its data is copied through a bounce buffer (volatile copies from or to the
/// guest's pages) and reaches the disk as one call per [`MAX_BOUNCE`] bytes, which lets the
/// image layer map and transfer whole clusters at once. The buffer is kept between
/// requests. A chunk of at least twice [`PARALLEL_PART`] is split into up to [`MAX_PARTS`]
/// parts: the worker copies and sends the first to the disk itself and hands the others to
/// the processor's own small thread pool. A 1 MiB request's copy and write take a quarter
/// of the time on an idle host, and on a busy one the request gets the CPU share of several
/// threads, as a thread-pool backend's (QEMU's) does, rather than one. The request completes
/// when every part has.
///
/// The pool's threads are started by the first large request, on the worker's own thread,
/// so they inherit its seccomp filter, and live as long as the processor: starting threads
/// per request cost more than the parallel copy saved (a `clone3`, a stack mapping and a
/// wake-up each, three per request).
#[derive(Debug, Default)]
pub struct RequestProcessor {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    bounce: Vec<u8>,
    parts: PartPool,
}

/// The threads that run a large chunk's parts beside the worker; started on first use.
#[derive(Debug, Default)]
enum PartPool {
    /// No large request yet.
    #[default]
    Unstarted,
    /// `MAX_PARTS - 1` threads waiting for parts.
    Running(rayon_core::ThreadPool),
    /// The threads could not be started: every part runs on the worker.
    Unavailable,
}

impl PartPool {
    /// The pool, started on the first call.
    fn get(&mut self) -> Option<&rayon_core::ThreadPool> {
        if matches!(self, PartPool::Unstarted) {
            let built = rayon_core::ThreadPoolBuilder::new()
                .num_threads(MAX_PARTS - 1)
                .thread_name(|i| format!("blk-part{i}"))
                .build();
            *self = match built {
                Ok(pool) => PartPool::Running(pool),
                Err(e) => {
                    tracing::warn!(
                        "virtio-blk: starting the part threads: {e}; running parts on the worker"
                    );
                    PartPool::Unavailable
                }
            };
        }
        match self {
            PartPool::Running(pool) => Some(pool),
            PartPool::Unstarted | PartPool::Unavailable => None,
        }
    }
}

/// Why a request failed, mapped onto the status the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Malformed request or disk error: IOERR.
    Error,
    /// Unknown request type or flags: UNSUPP.
    Unsupported,
}

impl Failure {
    fn status(self) -> u8 {
        match self {
            Failure::Error => status::IOERR,
            Failure::Unsupported => status::UNSUPP,
        }
    }
}

type Outcome = Result<u64, Failure>;

impl RequestProcessor {
    /// A processor with room for a typical chain.
    pub fn new() -> Self {
        RequestProcessor {
            readable: Vec::with_capacity(64),
            writable: Vec::with_capacity(64),
            bounce: Vec::new(),
            parts: PartPool::Unstarted,
        }
    }

    /// Runs the request made of `chain` against `disk` and writes its status byte.
    pub fn process<M: GuestMemoryBackend + Sync, D: DiskBackend + ?Sized>(
        &mut self,
        chain: impl IntoIterator<Item = DescriptorInfo>,
        memory: &M,
        disk: &D,
        limits: DiskLimits<'_>,
    ) -> Completion {
        self.readable.clear();
        self.writable.clear();
        let mut last_writable: Option<Segment> = None;
        let mut malformed = false;
        let mut count = 0usize;
        for descriptor in chain {
            if descriptor.len == 0 {
                continue;
            }
            let segment = Segment {
                addr: GuestAddress(descriptor.addr),
                len: u64::from(descriptor.len),
            };
            count += 1;
            if descriptor.device_writes {
                last_writable = Some(segment);
            } else if last_writable.is_some() {
                // A readable descriptor after a writable one (§2.7.4.2).
                malformed = true;
            }
            // Keep scanning past the limit: the status byte is the chain's last writable byte.
            if count > MAX_DESCRIPTORS {
                malformed = true;
                continue;
            }
            if descriptor.device_writes {
                self.writable.push(segment);
            } else {
                self.readable.push(segment);
            }
        }

        let Some(last) = last_writable else {
            return Completion {
                status: None,
                used_len: 0,
            };
        };
        let Some(status_addr) = last.addr.0.checked_add(last.len - 1).map(GuestAddress) else {
            return Completion {
                status: None,
                used_len: 0,
            };
        };
        if !malformed {
            // The status byte is not data: drop it from the writable stream.
            if let Some(tail) = self.writable.last_mut() {
                tail.len -= 1;
                if tail.len == 0 {
                    self.writable.pop();
                }
            }
        }
        let outcome = if malformed {
            Err(Failure::Error)
        } else {
            self.execute(memory, disk, limits)
        };
        let (status, written) = match outcome {
            Ok(written) => (status::OK, written),
            Err(failure) => (failure.status(), 0),
        };
        if memory.write_obj(status, status_addr).is_err() {
            return Completion {
                status: None,
                used_len: 0,
            };
        }
        Completion {
            status: Some(status),
            // `written` is at most the writable bytes of the chain, which the caller's chain
            // bounds to u32 (a longer chain is invalid); saturate rather than trust that.
            used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
        }
    }

    /// Checks and runs the parsed request; returns the data bytes written to the guest.
    fn execute<M: GuestMemoryBackend + Sync, D: DiskBackend + ?Sized>(
        &mut self,
        memory: &M,
        disk: &D,
        limits: DiskLimits<'_>,
    ) -> Outcome {
        let mut header = [0u8; HEADER_SIZE as usize];
        if !gather(memory, &self.readable, 0, &mut header) {
            return Err(Failure::Error);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().map_err(|_| Failure::Error)?);
        let out_len = total(&self.readable) - HEADER_SIZE;
        let in_len = total(&self.writable);
        match kind {
            request_type::IN => {
                if out_len != 0 {
                    return Err(Failure::Error);
                }
                let offset = check_io(sector, in_len, disk.size())?;
                self.read_into_guest(memory, disk, offset)?;
                Ok(in_len)
            }
            request_type::OUT => {
                if limits.read_only || in_len != 0 {
                    return Err(Failure::Error);
                }
                let offset = check_io(sector, out_len, disk.size())?;
                self.write_from_guest(memory, disk, offset)?;
                Ok(0)
            }
            request_type::FLUSH => {
                if out_len != 0 || in_len != 0 {
                    return Err(Failure::Error);
                }
                disk.flush().map_err(|e| io_failure("flush", e))?;
                Ok(0)
            }
            request_type::GET_ID => {
                if out_len != 0 {
                    return Err(Failure::Error);
                }
                let len = in_len.min(ID_BYTES as u64) as usize;
                if !scatter(memory, &self.writable, &limits.id[..len]) {
                    return Err(Failure::Error);
                }
                Ok(len as u64)
            }
            request_type::DISCARD | request_type::WRITE_ZEROES => {
                if limits.read_only || in_len != 0 {
                    return Err(Failure::Error);
                }
                self.discard_or_zero(memory, disk, kind == request_type::DISCARD, out_len)?;
                Ok(0)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// Reads the disk into the guest's writable buffers, through the bounce buffer a
    /// [`MAX_BOUNCE`] chunk at a time: the disk never sees guest memory as a Rust slice
    /// (the guest may change it under us, which a `&mut [u8]` forbids), and the copy into
    /// the guest's pages is a volatile one.
    fn read_into_guest<M: GuestMemoryBackend + Sync, D: DiskBackend + ?Sized>(
        &mut self,
        memory: &M,
        disk: &D,
        offset: u64,
    ) -> Result<(), Failure> {
        // Check every buffer before touching any, so a bad one fails the request cleanly.
        for segment in &self.writable {
            guest_slice(memory, *segment)?;
        }
        let total = total(&self.writable);
        let mut done = 0u64;
        while done < total {
            let len = (total - done).min(MAX_BOUNCE) as usize;
            let chunk = bounce(&mut self.bounce, len);
            let writable = &self.writable;
            in_parts(&mut self.parts, chunk, |at, part| {
                disk.read_at(part, offset + done + at)
                    .map_err(|e| io_failure("read", e))?;
                scatter_at(memory, writable, done + at, part)
            })?;
            done += len as u64;
        }
        Ok(())
    }

    /// Writes the guest's data buffers to the disk, gathered (volatile copies) into the
    /// bounce buffer a [`MAX_BOUNCE`] chunk at a time.
    fn write_from_guest<M: GuestMemoryBackend + Sync, D: DiskBackend + ?Sized>(
        &mut self,
        memory: &M,
        disk: &D,
        offset: u64,
    ) -> Result<(), Failure> {
        let mut total = 0u64;
        for segment in DataSegments::new(&self.readable, HEADER_SIZE) {
            guest_slice(memory, segment)?;
            total += segment.len;
        }
        let mut done = 0u64;
        while done < total {
            let len = (total - done).min(MAX_BOUNCE) as usize;
            let chunk = bounce(&mut self.bounce, len);
            let readable = &self.readable;
            in_parts(&mut self.parts, chunk, |at, part| {
                if !gather(memory, readable, HEADER_SIZE + done + at, part) {
                    return Err(Failure::Error);
                }
                disk.write_at(part, offset + done + at)
                    .map_err(|e| io_failure("write", e))
            })?;
            done += len as u64;
        }
        Ok(())
    }

    fn discard_or_zero<M: GuestMemoryBackend, D: DiskBackend + ?Sized>(
        &self,
        memory: &M,
        disk: &D,
        discard: bool,
        out_len: u64,
    ) -> Result<(), Failure> {
        if out_len == 0 || out_len % RANGE_SIZE != 0 {
            return Err(Failure::Error);
        }
        let count = out_len / RANGE_SIZE;
        if count > u64::from(MAX_DISCARD_SEGMENTS) {
            return Err(Failure::Error);
        }
        // Read and check every range first: a bad one fails the request with no range done.
        let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for (i, range) in ranges.iter_mut().take(count as usize).enumerate() {
            let mut raw = [0u8; RANGE_SIZE as usize];
            if !gather(
                memory,
                &self.readable,
                HEADER_SIZE + i as u64 * RANGE_SIZE,
                &mut raw,
            ) {
                return Err(Failure::Error);
            }
            let sector = u64::from_le_bytes(raw[0..8].try_into().map_err(|_| Failure::Error)?);
            let sectors = u32::from_le_bytes(raw[8..12].try_into().map_err(|_| Failure::Error)?);
            let flags = u32::from_le_bytes(raw[12..16].try_into().map_err(|_| Failure::Error)?);
            let allowed_flags = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
            if flags & !allowed_flags != 0 {
                return Err(Failure::Unsupported);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Failure::Error);
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let offset = check_io(sector, len, disk.size())?;
            *range = (offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0);
        }
        for &(offset, len, _unmap) in ranges.iter().take(count as usize) {
            // The storage layer's write_zeroes already unmaps whole clusters where it can, so
            // the UNMAP hint needs no separate path.
            let result = if discard {
                disk.discard(offset, len)
            } else {
                disk.write_zeroes(offset, len)
            };
            result.map_err(|e| io_failure(if discard { "discard" } else { "write-zeroes" }, e))?;
        }
        Ok(())
    }
}

fn io_failure(what: &str, error: storage::Error) -> Failure {
    tracing::warn!("virtio-blk {what}: {error}");
    Failure::Error
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.len).sum()
}

/// The byte offset of `sector`, after checking that `len` bytes from it are whole sectors
/// inside a disk of `size` bytes.
fn check_io(sector: u64, len: u64, size: u64) -> Result<u64, Failure> {
    if len % SECTOR_SIZE != 0 {
        return Err(Failure::Error);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::Error)?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(Failure::Error),
    }
}

/// The guest memory behind `segment`, which must lie within one region.
fn guest_slice<M: GuestMemoryBackend>(
    memory: &M,
    segment: Segment,
) -> Result<VolatileSlice<'_, MS<'_, M>>, Failure> {
    let len = usize::try_from(segment.len).map_err(|_| Failure::Error)?;
    memory
        .get_slice(segment.addr, len)
        .map_err(|_| Failure::Error)
}

/// Runs `work(offset in chunk, part)` on the parts of `chunk`: the whole chunk on this
/// thread when it is small, else up to [`MAX_PARTS`] whole-sector parts of at least
/// [`PARALLEL_PART`] bytes, the first on this thread and the others on `pool`'s threads.
/// Every part runs to its end; the first failure is the result, and a part that panics
/// fails like one that returns an error.
fn in_parts<F>(pool: &mut PartPool, chunk: &mut [u8], work: F) -> Result<(), Failure>
where
    F: Fn(u64, &mut [u8]) -> Result<(), Failure> + Sync,
{
    let parts = (chunk.len() / PARALLEL_PART).min(MAX_PARTS);
    let pool = match parts {
        0 | 1 => None,
        _ => pool.get(),
    };
    let Some(pool) = pool else {
        return work(0, chunk);
    };
    let part_len = chunk
        .len()
        .div_ceil(parts)
        .next_multiple_of(SECTOR_SIZE as usize);
    let result = Mutex::new(Ok(()));
    let run = |at: usize, part: &mut [u8]| {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(at as u64, part)))
                .unwrap_or(Err(Failure::Error));
        let mut result = result.lock();
        *result = (*result).and(outcome);
    };
    let run = &run;
    let mut pieces = chunk.chunks_mut(part_len);
    let first = pieces.next();
    pool.in_place_scope(|scope| {
        for (i, piece) in pieces.enumerate() {
            scope.spawn(move |_| run((i + 1) * part_len, piece));
        }
        if let Some(first) = first {
            run(0, first);
        }
    });
    result.into_inner()
}

/// The first `len` bytes of the reused bounce buffer, growing it (once) if needed: the
/// steady state allocates nothing.
fn bounce(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// Copies `data` into the stream of `segments` from `skip` bytes in, with volatile
/// stores, marking the pages dirty (the VMM's stores are invisible to KVM's dirty log).
fn scatter_at<M: GuestMemoryBackend>(
    memory: &M,
    segments: &[Segment],
    skip: u64,
    data: &[u8],
) -> Result<(), Failure> {
    let mut done = 0usize;
    for segment in DataSegments::new(segments, skip) {
        if done == data.len() {
            break;
        }
        let take = (data.len() - done).min(usize::try_from(segment.len).unwrap_or(usize::MAX));
        let slice = guest_slice(
            memory,
            Segment {
                addr: segment.addr,
                len: take as u64,
            },
        )?;
        slice.copy_from(&data[done..done + take]);
        slice.bitmap().mark_dirty(0, take);
        done += take;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(Failure::Error)
    }
}

/// Copies `out.len()` bytes starting `skip` bytes into the stream of `segments`.
fn gather<M: GuestMemoryBackend>(
    memory: &M,
    segments: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> bool {
    let mut done = 0usize;
    for segment in DataSegments::new(segments, skip) {
        if done == out.len() {
            break;
        }
        let take = (out.len() - done).min(usize::try_from(segment.len).unwrap_or(usize::MAX));
        if memory
            .read_slice(&mut out[done..done + take], segment.addr)
            .is_err()
        {
            return false;
        }
        done += take;
    }
    done == out.len()
}

/// Copies `data` to the start of the stream of `segments`.
fn scatter<M: GuestMemoryBackend>(memory: &M, segments: &[Segment], data: &[u8]) -> bool {
    let mut done = 0usize;
    for segment in segments {
        if done == data.len() {
            break;
        }
        let take = (data.len() - done).min(usize::try_from(segment.len).unwrap_or(usize::MAX));
        if memory
            .write_slice(&data[done..done + take], segment.addr)
            .is_err()
        {
            return false;
        }
        done += take;
    }
    done == data.len()
}

/// The segments of a byte stream after its first `skip` bytes.
#[derive(Clone)]
struct DataSegments<'a> {
    segments: std::slice::Iter<'a, Segment>,
    skip: u64,
}

impl<'a> DataSegments<'a> {
    fn new(segments: &'a [Segment], skip: u64) -> Self {
        DataSegments {
            segments: segments.iter(),
            skip,
        }
    }
}

impl Iterator for DataSegments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        loop {
            let segment = *self.segments.next()?;
            if self.skip >= segment.len {
                self.skip -= segment.len;
                continue;
            }
            // `skip < len`, so the address stays within the descriptor's own range; a
            // descriptor whose range wraps is caught by get_slice/read_slice.
            let addr = GuestAddress(segment.addr.0.wrapping_add(self.skip));
            let len = segment.len - self.skip;
            self.skip = 0;
            return Some(Segment { addr, len });
        }
    }
}

#[cfg(test)]
mod tests;
