//! Guest memory in and out of checkpoint memory files.
//!
//! - which pages the guest has touched: `/proc/self/pagemap` (present or swapped) plus the
//!   data extents of a memory file the RAM is mapped from, so an idle guest's save costs
//!   what it used, not its size;
//! - which pages changed since the last checkpoint: KVM's dirty log OR'ed with vm-memory's
//!   bitmap (the VMM's own writes, such as disk reads into guest buffers, are invisible to
//!   KVM);
//! - loading: the memory file mapped `MAP_PRIVATE | MAP_FIXED` over the guest RAM (lazy:
//!   pages come in on first touch), or pages copied in for diffs and streams.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use snapshot::checkpoint::memory_file::{self, MemoryFile};
use snapshot::checkpoint::{MemoryLayout, MemoryRegion, PageSet, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::GuestMemoryMmap;
use crate::error::{Error, Result};
use crate::persist::Persist;
use crate::vm::Vm;

/// One region of guest RAM as a run of linear pages.
#[derive(Debug, Clone, Copy)]
struct LinearRegion {
    first_page: u64,
    pages: u64,
    host: *mut u8,
}

fn linear_regions(memory: &GuestMemoryMmap) -> Vec<LinearRegion> {
    let mut first_page = 0;
    memory
        .iter()
        .map(|region| {
            let pages = region.len() / PAGE_SIZE;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap_or(std::ptr::null_mut());
            let linear = LinearRegion {
                first_page,
                pages,
                host,
            };
            first_page += pages;
            linear
        })
        .collect()
}

/// The layout of `memory` as a memory file stores it.
pub fn layout(memory: &GuestMemoryMmap) -> MemoryLayout {
    MemoryLayout::new(
        memory
            .iter()
            .map(|region| MemoryRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
            })
            .collect(),
    )
}

/// Checks `saved` describes the same RAM as `memory`.
pub fn check_layout(
    memory: &GuestMemoryMmap,
    saved: &MemoryLayout,
) -> std::result::Result<(), String> {
    let ours = layout(memory);
    if ours.regions != saved.regions {
        return Err(format!(
            "the checkpoint has {} MiB of memory in {} region(s), this VM {} MiB in {}",
            saved.total_bytes() >> 20,
            saved.regions.len(),
            ours.total_bytes() >> 20,
            ours.regions.len()
        ));
    }
    Ok(())
}

/// One memory file of a checkpoint chain, as loading it into RAM needs it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLayer<'a> {
    /// The memory file, opened (and its size checked) with [`MemoryFile::open`].
    pub file: &'a MemoryFile,
    /// For a diff, the pages it holds; `None` for the full checkpoint at the bottom.
    pub pages: Option<&'a PageSet>,
}

/// Guest RAM: a checkpoint stores its layout in the manifest and its pages in memory files.
impl Persist for GuestMemoryMmap {
    type State = MemoryLayout;
    type SaveArgs<'a> = ();
    /// The chain's memory files, full checkpoint first.
    type RestoreArgs<'a> = &'a [MemoryLayer<'a>];

    /// The layout (the pages go to the memory file separately: [`write_pages`]).
    fn save(&self, _args: ()) -> Result<MemoryLayout> {
        Ok(layout(self))
    }

    /// The saved layout must describe this RAM.
    fn check(&self, state: &MemoryLayout) -> Result<()> {
        check_layout(self, state).map_err(Error::Memory)
    }

    /// Loads the chain: the full checkpoint mapped (lazily, `MAP_PRIVATE`), then each diff's
    /// pages copied in, in order.
    fn restore(&self, layers: &[MemoryLayer<'_>], state: &MemoryLayout) -> Result<()> {
        self.check(state)?;
        let Some((full, diffs)) = layers.split_first() else {
            return Err(Error::Memory("no memory file to load".into()));
        };
        if full.pages.is_some() {
            return Err(Error::Memory(format!(
                "{} is a diff, not the full checkpoint of its chain",
                full.file.path().display()
            )));
        }
        map_file(self, full.file)?;
        for layer in diffs {
            match layer.pages {
                Some(pages) => read_pages(self, layer.file, pages)?,
                None => {
                    return Err(Error::Memory(format!(
                        "{} is a full checkpoint above the bottom of its chain",
                        layer.file.path().display()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// `/proc/self/pagemap` bits.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

/// Pages the process has faulted in (present or swapped out), from `/proc/self/pagemap`.
pub fn resident_pages(memory: &GuestMemoryMmap) -> Result<PageSet> {
    pagemap_pages(memory, |entry| {
        entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
    })
}

/// Pages written since guest RAM was mapped from a memory file ([`map_file`]): a write to a
/// `MAP_PRIVATE` file page replaces it with an anonymous copy, which the pagemap tells apart
/// from a file page. Lets a restored VM run without KVM's dirty log (costly to turn on)
/// until its first incremental checkpoint.
pub fn written_since_mapped(memory: &GuestMemoryMmap) -> Result<PageSet> {
    pagemap_pages(memory, |entry| {
        entry & PAGEMAP_SWAPPED != 0
            || (entry & PAGEMAP_PRESENT != 0 && entry & PAGEMAP_FILE_OR_SHARED == 0)
    })
}

fn pagemap_pages(memory: &GuestMemoryMmap, keep: impl Fn(u64) -> bool) -> Result<PageSet> {
    const BATCH: u64 = 65536;
    let regions = linear_regions(memory);
    let total: u64 = regions.iter().map(|r| r.pages).sum();
    let mut pages = PageSet::new(total);
    let pagemap =
        File::open("/proc/self/pagemap").map_err(Error::io("opening /proc/self/pagemap"))?;
    let mut entries = vec![0u8; (BATCH * 8) as usize];
    for region in regions {
        let first_virtual_page = region.host as u64 / PAGE_SIZE;
        let mut done = 0;
        while done < region.pages {
            let n = (region.pages - done).min(BATCH);
            let bytes = &mut entries[..(n * 8) as usize];
            pagemap
                .read_exact_at(bytes, (first_virtual_page + done) * 8)
                .map_err(Error::io("reading /proc/self/pagemap"))?;
            for (i, entry) in bytes.chunks_exact(8).enumerate() {
                let mut word = [0u8; 8];
                word.copy_from_slice(entry);
                if keep(u64::from_le_bytes(word)) {
                    pages.insert(region.first_page + done + i as u64);
                }
            }
            done += n;
        }
    }
    Ok(pages)
}

/// Pages changed since the last call: KVM's dirty log of every slot (which it clears) OR'ed
/// with vm-memory's bitmap of the VMM's own writes (cleared too). Needs dirty logging on.
pub fn collect_dirty(vm: &Vm, memory: &GuestMemoryMmap) -> Result<PageSet> {
    let regions = linear_regions(memory);
    let total: u64 = regions.iter().map(|r| r.pages).sum();
    let mut pages = PageSet::new(total);
    for (slot, (region, linear)) in memory.iter().zip(&regions).enumerate() {
        let log = vm
            .fd()
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(Error::kvm(format!("KVM_GET_DIRTY_LOG slot {slot}")))?;
        pages.union_words_at(linear.first_page, &log);
        let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
        let ours = mapping.bitmap().get_and_reset();
        pages.union_words_at(linear.first_page, &ours);
    }
    Ok(pages)
}

/// Whether the page at `ptr` holds only zero bytes.
///
/// # Safety
/// `ptr` must point to `PAGE_SIZE` readable, 8-byte-aligned bytes.
unsafe fn page_is_zero(ptr: *const u8) -> bool {
    let words = ptr.cast::<u64>();
    for i in 0..(PAGE_SIZE / 8) as usize {
        // Volatile: the guest may be writing this page (live rounds); a torn answer only
        // decides whether the page is written now, and any later change is dirty-logged.
        // SAFETY: in bounds of the page the caller vouches for.
        if unsafe { words.add(i).read_volatile() } != 0 {
            return false;
        }
    }
    true
}

/// Writes `len` bytes at host `ptr` into `file` at byte `offset`.
fn pwrite_all(
    file: &File,
    mut ptr: *const u8,
    mut len: usize,
    mut offset: u64,
) -> std::io::Result<()> {
    while len > 0 {
        // SAFETY: `ptr..ptr + len` is guest RAM mapped for the VM's lifetime; the kernel
        // copies out of it and tolerates concurrent guest writes.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), len, offset as libc::off_t) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let n = n as usize;
        // SAFETY: `n <= len`, so still within the range above.
        ptr = unsafe { ptr.add(n) };
        len -= n;
        offset += n as u64;
    }
    Ok(())
}

/// Reads `len` bytes from `file` at byte `offset` into host `ptr`.
fn pread_all(file: &File, ptr: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    // SAFETY: `ptr..ptr + len` is guest RAM mapped for the VM's lifetime, and the caller
    // holds it still (vCPUs paused, devices quiesced), so nothing else touches it meanwhile.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Splits linear page runs of `pages` at region boundaries: (host pointer, first linear
/// page, page count).
fn host_runs<'a>(
    regions: &'a [LinearRegion],
    pages: &'a PageSet,
) -> impl Iterator<Item = (*mut u8, u64, u64)> + 'a {
    pages.runs().flat_map(move |(first, count)| {
        regions.iter().filter_map(move |region| {
            let start = first.max(region.first_page);
            let end = (first + count).min(region.first_page + region.pages);
            (start < end).then(|| {
                // SAFETY (of the later use): within the region's mapping.
                let host = region
                    .host
                    .wrapping_add(((start - region.first_page) * PAGE_SIZE) as usize);
                (host, start, end - start)
            })
        })
    })
}

/// Longest single `pwrite` of a run of pages: short enough that the bytes the CRC just read
/// are still in cache when the kernel copies them (one pass over RAM, not two), long enough
/// that the call costs nothing next to the copy.
const WRITE_CHUNK: u64 = 1 << 20;

/// Bytes written between two writeback starts (`sync_file_range`): the disk writes what
/// was copied while the next chunks are copied, so the final fsync waits only for the tail
/// instead of the whole file (a plain write then fsync does one after the other).
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Starts writeback of a file's dirty pages as they are written, without waiting for it.
struct Writeback<'a> {
    file: &'a File,
    /// Byte range written since writeback was last started.
    pending: Option<(u64, u64)>,
    /// Off after the first `EINVAL`/`ENOSYS`/`ESPIPE`: a file system without it (the final
    /// fsync still makes everything durable, only later).
    enabled: bool,
}

impl<'a> Writeback<'a> {
    fn new(file: &'a File) -> Self {
        Writeback {
            file,
            pending: None,
            enabled: true,
        }
    }

    /// Records `offset..offset + len` written; starts its writeback once enough is pending.
    fn wrote(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let (start, end) = match self.pending {
            Some((start, end)) => (start.min(offset), end.max(offset + len)),
            None => (offset, offset + len),
        };
        self.pending = Some((start, end));
        if end - start >= WRITEBACK_EVERY {
            self.start()?;
        }
        Ok(())
    }

    /// Starts writeback of everything pending.
    fn start(&mut self) -> std::io::Result<()> {
        let Some((start, end)) = self.pending.take() else {
            return Ok(());
        };
        if !self.enabled {
            return Ok(());
        }
        // SAFETY: a syscall on an fd we hold open; no memory is passed.
        let done = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as libc::off64_t,
                (end - start) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if done != 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINVAL | libc::ENOSYS | libc::ESPIPE) => self.enabled = false,
                _ => return Err(error),
            }
        }
        Ok(())
    }
}

/// What a memory write did.
#[derive(Debug, Clone)]
pub struct WriteStats {
    /// Pages written.
    pub pages: u64,
    /// Pages skipped because they held only zeroes (left as holes).
    pub zero_pages: u64,
    /// The pages written.
    pub written: PageSet,
    /// CRC-32 of the written bytes in page order, when asked for (`digest`).
    pub crc: Option<u32>,
}

/// Writes `pages` of `memory` into `file`. With `skip_zero`, all-zero pages stay holes (for
/// a full checkpoint's first pass, where a hole reads as zero). With `digest`, also the
/// CRC-32 of what was written; only while the guest is stopped, so the bytes hold still.
pub fn write_pages(
    memory: &GuestMemoryMmap,
    file: &MemoryFile,
    pages: &PageSet,
    skip_zero: bool,
    digest: bool,
) -> Result<WriteStats> {
    let regions = linear_regions(memory);
    let mut stats = WriteStats {
        pages: 0,
        zero_pages: 0,
        written: PageSet::new(pages.len()),
        crc: None,
    };
    let mut crc = digest.then(crc32fast::Hasher::new);
    let io = |e| Error::io(format!("writing {}", file.path().display()))(e);
    let mut writeback = Writeback::new(file.file());
    let mut write = |ptr: *const u8, first: u64, count: u64, stats: &mut WriteStats| {
        let pages_per_chunk = WRITE_CHUNK / PAGE_SIZE;
        let mut done = 0;
        while done < count {
            let pages = pages_per_chunk.min(count - done);
            let len = (pages * PAGE_SIZE) as usize;
            // SAFETY: pages `done..done + pages` of the run lie in guest RAM.
            let chunk = unsafe { ptr.add((done * PAGE_SIZE) as usize) };
            if let Some(crc) = &mut crc {
                // SAFETY: `chunk..chunk + len` lies in guest RAM, and `digest` is only asked
                // for while the vCPUs are paused and the devices quiesced.
                crc.update(unsafe { std::slice::from_raw_parts(chunk, len) });
            }
            let offset = memory_file::HEADER_SIZE + (first + done) * PAGE_SIZE;
            pwrite_all(file.file(), chunk, len, offset).map_err(io)?;
            writeback.wrote(offset, len as u64).map_err(io)?;
            done += pages;
        }
        stats.pages += count;
        stats.written.insert_range(first, count);
        Ok::<(), Error>(())
    };
    for (host, first, count) in host_runs(&regions, pages) {
        if !skip_zero {
            write(host, first, count, &mut stats)?;
            continue;
        }
        // Coalesce non-zero pages into as few writes as possible.
        let mut run_start: Option<u64> = None;
        for i in 0..=count {
            let zero = i == count || {
                // SAFETY: page `i` of this run lies in the region's mapping.
                unsafe { page_is_zero(host.add((i * PAGE_SIZE) as usize)) }
            };
            match (zero, run_start) {
                (false, None) => run_start = Some(i),
                (true, Some(start)) => {
                    // SAFETY: pages start..i of this run lie in the mapping.
                    let ptr = unsafe { host.add((start * PAGE_SIZE) as usize) };
                    write(ptr, first + start, i - start, &mut stats)?;
                    run_start = None;
                }
                _ => {}
            }
            if zero && i < count {
                stats.zero_pages += 1;
            }
        }
    }
    // The tail: the caller's fsync waits for it, already on its way to disk.
    writeback.start().map_err(io)?;
    stats.crc = crc.map(crc32fast::Hasher::finalize);
    Ok(stats)
}

/// Copies `pages` out of guest RAM, ascending, into `bytes` (cleared first): a live
/// checkpoint's stop copies its last dirty pages into memory and writes them once the guest
/// runs again, so no file I/O (which can block on writeback) happens while the guest waits.
/// It passes a buffer allocated and faulted in beforehand, so the copy does not allocate
/// either while the vCPUs are stopped.
pub fn copy_out(memory: &GuestMemoryMmap, pages: &PageSet, bytes: &mut Vec<u8>) {
    bytes.clear();
    let regions = linear_regions(memory);
    for (host, _, count) in host_runs(&regions, pages) {
        // SAFETY: the run lies in guest RAM; the caller has stopped the vCPUs and devices.
        bytes.extend_from_slice(unsafe {
            std::slice::from_raw_parts(host, (count * PAGE_SIZE) as usize)
        });
    }
}

/// Writes pages [`copy_out`] copied (`bytes`, ascending) to `file`.
pub fn write_copied(file: &MemoryFile, pages: &PageSet, bytes: &[u8]) -> Result<()> {
    let mut offset = 0usize;
    for (first, count) in pages.runs() {
        let len = (count * PAGE_SIZE) as usize;
        let chunk = bytes.get(offset..offset + len).ok_or_else(|| {
            Error::Memory(format!(
                "{} copied bytes for {} pages",
                bytes.len(),
                pages.count()
            ))
        })?;
        file.write_at(chunk, first * PAGE_SIZE)?;
        offset += len;
    }
    Ok(())
}

/// Reads `pages` of `file` into `memory` (vCPUs paused, devices quiesced).
pub fn read_pages(memory: &GuestMemoryMmap, file: &MemoryFile, pages: &PageSet) -> Result<()> {
    let regions = linear_regions(memory);
    for (host, first, count) in host_runs(&regions, pages) {
        pread_all(
            file.file(),
            host,
            (count * PAGE_SIZE) as usize,
            memory_file::HEADER_SIZE + first * PAGE_SIZE,
        )
        .map_err(Error::io(format!("reading {}", file.path().display())))?;
    }
    Ok(())
}

/// Maps `file` over guest RAM, `MAP_PRIVATE | MAP_FIXED`: every page now reads as the
/// file's (holes as zero) until the guest writes it, and nothing is read until touched.
/// The file must have been opened with [`MemoryFile::open`], which checked its size.
pub fn map_file(memory: &GuestMemoryMmap, file: &MemoryFile) -> Result<()> {
    for region in linear_regions(memory) {
        let offset = memory_file::HEADER_SIZE + region.first_page * PAGE_SIZE;
        let len = (region.pages * PAGE_SIZE) as usize;
        // SAFETY: replaces the VMM's own mapping of guest RAM, same address and length, while
        // the vCPUs are paused and the devices quiesced, so nothing holds a reference into
        // it; KVM follows the change through its MMU notifier.
        let mapped = unsafe {
            libc::mmap(
                region.host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.file().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED || mapped.cast::<u8>() != region.host {
            return Err(Error::Memory(format!(
                "mapping {}: {}",
                file.path().display(),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Replaces guest RAM with fresh zero pages (before a stream load writes what it holds).
pub fn map_anonymous(memory: &GuestMemoryMmap) -> Result<()> {
    for region in linear_regions(memory) {
        let len = (region.pages * PAGE_SIZE) as usize;
        // SAFETY: as in `map_file`.
        let mapped = unsafe {
            libc::mmap(
                region.host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED || mapped.cast::<u8>() != region.host {
            return Err(Error::Memory(format!(
                "remapping guest RAM: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Writes `pages` of `memory` to a stream, in page order; returns the CRC-32 of the bytes.
pub fn write_stream(memory: &GuestMemoryMmap, pages: &PageSet, out: &mut dyn Write) -> Result<u32> {
    let regions = linear_regions(memory);
    let mut crc = crc32fast::Hasher::new();
    for (host, _, count) in host_runs(&regions, pages) {
        // SAFETY: the run lies in guest RAM; the vCPUs are paused, so it is not changing.
        let bytes = unsafe { std::slice::from_raw_parts(host, (count * PAGE_SIZE) as usize) };
        crc.update(bytes);
        out.write_all(bytes)
            .map_err(Error::io("writing the VM state stream"))?;
    }
    Ok(crc.finalize())
}

/// A zeroed copy of guest RAM's shape, outside the guest: a stream is read into it and
/// checked, and only then moved over guest RAM ([`StagedMemory::commit`]), so a corrupt
/// stream leaves the VM as it was.
#[derive(Debug)]
pub struct StagedMemory {
    regions: Vec<LinearRegion>,
}

impl StagedMemory {
    /// Anonymous mappings the size of each region of `memory` (no RAM used until written).
    pub fn new(memory: &GuestMemoryMmap) -> Result<Self> {
        let mut staged = StagedMemory {
            regions: Vec::new(),
        };
        for region in linear_regions(memory) {
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let host = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    (region.pages * PAGE_SIZE) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if host == libc::MAP_FAILED {
                return Err(Error::Memory(format!(
                    "staging memory: {}",
                    std::io::Error::last_os_error()
                )));
            }
            staged.regions.push(LinearRegion {
                host: host.cast(),
                ..region
            });
        }
        Ok(staged)
    }

    /// Reads `pages` from a stream written by [`write_stream`]; returns the CRC-32 of the
    /// bytes read.
    pub fn read_stream(&self, pages: &PageSet, input: &mut dyn Read) -> Result<u32> {
        let mut crc = crc32fast::Hasher::new();
        for (host, _, count) in host_runs(&self.regions, pages) {
            // SAFETY: the run lies in a staging mapping this value owns; nothing else
            // references it.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(host, (count * PAGE_SIZE) as usize) };
            input
                .read_exact(bytes)
                .map_err(Error::io("reading the VM state stream"))?;
            crc.update(bytes);
        }
        Ok(crc.finalize())
    }

    /// Moves the staged pages over guest RAM (vCPUs paused, devices quiesced).
    pub fn commit(mut self, memory: &GuestMemoryMmap) -> Result<()> {
        let targets = linear_regions(memory);
        for (staged, target) in self.regions.drain(..).zip(targets) {
            let len = (staged.pages * PAGE_SIZE) as usize;
            // SAFETY: moves our staging mapping onto guest RAM of the same length, replacing
            // it (as `map_file` does); the staging range is not used afterwards.
            let moved = unsafe {
                libc::mremap(
                    staged.host.cast(),
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    target.host.cast::<libc::c_void>(),
                )
            };
            if moved == libc::MAP_FAILED {
                return Err(Error::Memory(format!(
                    "moving staged memory into place: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }
}

impl Drop for StagedMemory {
    fn drop(&mut self) {
        for region in &self.regions {
            // SAFETY: a mapping this value created and never handed out.
            unsafe { libc::munmap(region.host.cast(), (region.pages * PAGE_SIZE) as usize) };
        }
    }
}

/// The pages of `candidates` holding a non-zero byte.
pub fn nonzero_pages(memory: &GuestMemoryMmap, candidates: &PageSet) -> PageSet {
    let regions = linear_regions(memory);
    let mut pages = PageSet::new(candidates.len());
    for (host, first, count) in host_runs(&regions, candidates) {
        for i in 0..count {
            // SAFETY: page `i` of the run lies in guest RAM.
            if !unsafe { page_is_zero(host.add((i * PAGE_SIZE) as usize)) } {
                pages.insert(first + i);
            }
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn touched_pages_are_found_and_written_sparsely() {
        let memory = crate::memory::create(8 << 20).unwrap();
        memory
            .write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        memory.write_obj(0u8, GuestAddress(9 * PAGE_SIZE)).unwrap();
        let resident = resident_pages(&memory).unwrap();
        assert!(resident.contains(5) && resident.contains(9));
        assert!(written_since_mapped(&memory).unwrap().contains(5));
        assert!(
            resident.count() < 2048 / 2,
            "{} pages resident",
            resident.count()
        );

        let dir = tempfile::tempdir().unwrap();
        let file = MemoryFile::create(&dir.path().join("m"), 1, 8 << 20).unwrap();
        let stats = write_pages(&memory, &file, &resident, true, true).unwrap();
        assert_eq!(stats.pages, 1, "{stats:?}");
        assert!(stats.written.contains(5) && stats.written.count() == 1);
        assert_eq!(stats.crc, Some(file.crc_of(&stats.written).unwrap()));

        let other = crate::memory::create(8 << 20).unwrap();
        other
            .write_obj(0x77u8, GuestAddress(100 * PAGE_SIZE))
            .unwrap();
        map_file(&other, &file).unwrap();
        assert_eq!(
            other.read_obj::<u8>(GuestAddress(5 * PAGE_SIZE)).unwrap(),
            0xab
        );
        // The page the file does not hold reads as zero again.
        assert_eq!(
            other.read_obj::<u8>(GuestAddress(100 * PAGE_SIZE)).unwrap(),
            0
        );
        // Reads leave file pages; a write makes the page the process's own.
        assert_eq!(written_since_mapped(&other).unwrap().count(), 0);
        other.write_obj(1u8, GuestAddress(5 * PAGE_SIZE)).unwrap();
        let written = written_since_mapped(&other).unwrap();
        assert!(
            written.contains(5) && written.count() == 1,
            "{}",
            written.count()
        );
        // Writes stay private to the mapping.
        let mut byte = [0u8];
        file.read_at(&mut byte, 5 * PAGE_SIZE).unwrap();
        assert_eq!(byte[0], 0xab);
    }
}
