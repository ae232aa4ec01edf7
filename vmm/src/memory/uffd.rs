//! Guest memory served on first touch by a userfaultfd pager (a lazy restore from a
//! snapshot store).
//!
//! Guest RAM stays the VMM's anonymous mapping, registered with a userfaultfd in MISSING
//! mode: the first access to a page, by a vCPU (through KVM) or by a VMM thread (a device
//! reading a ring), blocks until the pager thread installs it. The pager works in chunks of
//! its [`PageSource`]: one fault fetches the whole chunk and installs every page of it
//! (`UFFDIO_COPY`; zero chunks with `UFFDIO_ZEROPAGE`, nothing fetched), so neighbours do
//! not fault again. Between faults it installs the chunks it was asked to prefetch.
//!
//! A chunk the source cannot deliver (missing, corrupt) is never replaced by anything: the
//! pager asks the VM to stop with an error naming the chunk and leaves the fault pending,
//! so the guest never runs on made-up memory.
//!
//! The kernel interface (`linux/userfaultfd.h`) is a handful of ioctls on plain structs,
//! written out here; the fd comes from `userfaultfd(2)`, or `/dev/userfaultfd` where the
//! syscall is restricted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use snapshot::checkpoint::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::GuestMemoryMmap;
use crate::error::{Error, Result};
use crate::exit::{ExitHandle, ExitReason};

/// Where a pager gets guest memory: linear guest RAM (regions back to back, as a checkpoint
/// memory file holds it) in fixed-size chunks.
pub trait PageSource: Send + Sync {
    /// Bytes per chunk: a multiple of the page size.
    fn chunk_size(&self) -> u64;
    /// Whether chunk `index` reads as zeroes (installed without a read).
    fn is_zero_chunk(&self, index: u64) -> bool;
    /// Fills `buf` with chunk `index` (its length: the chunk size, shorter at the end of
    /// memory). The error says which chunk failed and why.
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> std::result::Result<(), String>;
    /// Chunk `index` is being installed because the guest or the VMM touched it.
    fn touched(&self, _index: u64) {}
    /// A chunk could not be delivered: the VM was asked to stop with `message`. Threads
    /// waiting on that chunk's pages stay blocked (nothing is made up for them): vCPUs
    /// leave when kicked, but a VMM thread (a device, or a restore still loading state)
    /// does not, so a process that cannot wait for those ends itself here.
    fn failed(&self, _message: &str) {}
}

// linux/userfaultfd.h
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE` bits of a registration's ioctl mask.
const NEEDED_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, the faulting address at byte 16.
const UFFD_MSG_SIZE: usize = 32;

/// Counters of a pager's work.
#[derive(Debug, Default)]
pub struct PagerStats {
    /// Page faults handled.
    pub faults: AtomicU64,
    /// Chunks installed with data.
    pub chunks: AtomicU64,
    /// Chunks installed as zeroes.
    pub zero_chunks: AtomicU64,
    /// Chunks installed ahead of any fault (prefetch).
    pub prefetched: AtomicU64,
}

/// One region of guest RAM: its first linear byte, length and host address.
#[derive(Debug, Clone, Copy)]
struct Region {
    linear: u64,
    len: u64,
    host: u64,
}

/// A running pager; dropping it stops the thread and closes the userfaultfd (do that only
/// once nothing touches guest memory any more: the VM has stopped).
pub struct Pager {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<PagerStats>,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the struct the request is defined with (layouts above mirror
    // linux/userfaultfd.h), valid for reads and writes for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_userfaultfd() -> Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: a plain syscall with integer flags; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: just created, owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_error = std::io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| {
            Error::Memory(format!(
                "userfaultfd: the syscall failed ({syscall_error}) and /dev/userfaultfd \
                 cannot be opened ({e})"
            ))
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "USERFAULTFD_IOC_NEW: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Pager {
    /// Registers all of `memory` (which must hold no page yet: freshly created) and starts
    /// the pager thread. Chunks in `prefetch` are installed, in order, whenever no fault
    /// waits. A chunk that cannot be read stops the VM through `exit`.
    pub fn start(
        memory: &GuestMemoryMmap,
        source: Arc<dyn PageSource>,
        prefetch: Vec<u64>,
        exit: ExitHandle,
    ) -> Result<Self> {
        let chunk_size = source.chunk_size();
        if chunk_size == 0 || chunk_size % PAGE_SIZE != 0 {
            return Err(Error::Memory(format!(
                "page source chunk size {chunk_size} is not a multiple of the page size"
            )));
        }
        let uffd = open_userfaultfd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        ioctl(&uffd, UFFDIO_API, &mut api)
            .map_err(|e| Error::Memory(format!("UFFDIO_API: {e}")))?;
        let mut regions = Vec::new();
        let mut linear = 0;
        for region in memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(format!("guest RAM host address: {e}")))?
                as u64;
            let len = region.len();
            let mut register = UffdioRegister {
                range: UffdioRange { start: host, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            ioctl(&uffd, UFFDIO_REGISTER, &mut register)
                .map_err(|e| Error::Memory(format!("UFFDIO_REGISTER of {len} bytes: {e}")))?;
            if register.ioctls & NEEDED_IOCTLS != NEEDED_IOCTLS {
                return Err(Error::Memory(
                    "userfaultfd: the kernel offers no UFFDIO_COPY/ZEROPAGE here".into(),
                ));
            }
            regions.push(Region { linear, len, host });
            linear += len;
        }
        let stop = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Memory(format!("eventfd: {e}")))?,
        );
        let stats = Arc::new(PagerStats::default());
        let failed = Arc::new(AtomicBool::new(false));
        let chunks = linear.div_ceil(chunk_size);
        let mut worker = Worker {
            uffd,
            regions,
            total: linear,
            chunk_size,
            installed: vec![false; chunks as usize],
            bad: vec![false; chunks as usize],
            buf: vec![0u8; chunk_size as usize],
            source,
            stats: stats.clone(),
            failed: failed.clone(),
            exit,
        };
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-pager".into())
            .spawn(move || {
                crate::confine::enter_or_abort(crate::confine::ThreadKind::Pager);
                worker.run(&thread_stop, prefetch)
            })
            .map_err(|e| Error::Memory(format!("starting the pager thread: {e}")))?;
        Ok(Pager {
            stop,
            thread: Some(thread),
            stats,
            failed,
        })
    }

    /// What the pager has done so far.
    pub fn stats(&self) -> &PagerStats {
        &self.stats
    }

    /// Whether a chunk could not be delivered (the VM was asked to stop).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    uffd: OwnedFd,
    regions: Vec<Region>,
    total: u64,
    chunk_size: u64,
    installed: Vec<bool>,
    bad: Vec<bool>,
    buf: Vec<u8>,
    source: Arc<dyn PageSource>,
    stats: Arc<PagerStats>,
    failed: Arc<AtomicBool>,
    exit: ExitHandle,
}

impl Worker {
    fn run(&mut self, stop: &EventFd, prefetch: Vec<u64>) {
        let mut prefetch = prefetch.into_iter();
        let mut prefetching = true;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = if prefetching { 0 } else { -1 };
            // SAFETY: two valid pollfd structs for the call's duration.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.fail("poll on the userfaultfd failed".into());
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.drain_faults();
                continue;
            }
            if n == 0 && prefetching {
                match prefetch.next() {
                    Some(index) if (index as usize) < self.installed.len() => {
                        if !self.installed[index as usize] && self.install(index, false) {
                            self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(_) => {}
                    None => prefetching = false,
                }
            }
        }
    }

    fn drain_faults(&mut self) {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        loop {
            // SAFETY: reads at most UFFD_MSG_SIZE bytes into `msg`.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msg.as_mut_ptr().cast(),
                    UFFD_MSG_SIZE,
                )
            };
            if n != UFFD_MSG_SIZE as isize {
                return; // EAGAIN: nothing more queued.
            }
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let mut word = [0u8; 8];
            word.copy_from_slice(&msg[16..24]);
            let address = u64::from_ne_bytes(word);
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            self.fault(address);
        }
    }

    fn linear_of(&self, address: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| address >= r.host && address < r.host + r.len)
            .map(|r| r.linear + (address - r.host))
    }

    fn fault(&mut self, address: u64) {
        let Some(linear) = self.linear_of(address) else {
            return;
        };
        let index = linear / self.chunk_size;
        let slot = index as usize;
        if self.bad[slot] {
            return; // Left pending: the VM is stopping.
        }
        if self.installed[slot] {
            // Raced with our own install: wake whoever waits on that page.
            let page = address & !(PAGE_SIZE - 1);
            let mut range = UffdioRange {
                start: page,
                len: PAGE_SIZE,
            };
            let _ = ioctl(&self.uffd, UFFDIO_WAKE, &mut range);
            return;
        }
        self.source.touched(index);
        self.install(index, true);
    }

    /// Installs chunk `index` whole; false if it could not be read (the VM is stopped).
    fn install(&mut self, index: u64, demanded: bool) -> bool {
        let start = index * self.chunk_size;
        let len = self.chunk_size.min(self.total - start);
        let zero = self.source.is_zero_chunk(index);
        if !zero {
            if let Err(message) = self.source.read_chunk(index, &mut self.buf[..len as usize]) {
                self.bad[index as usize] = true;
                if demanded {
                    self.fail(format!("guest memory chunk {index}: {message}"));
                }
                return false;
            }
        }
        // Split the chunk's linear range over the regions it spans.
        for region in self.regions.clone() {
            let from = start.max(region.linear);
            let to = (start + len).min(region.linear + region.len);
            if from >= to {
                continue;
            }
            let host = region.host + (from - region.linear);
            let src = (!zero).then_some((from - start) as usize);
            if let Err(e) = self.place(host, to - from, src) {
                self.fail(format!("guest memory chunk {index}: installing pages: {e}"));
                return false;
            }
        }
        self.installed[index as usize] = true;
        if zero {
            self.stats.zero_chunks.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Installs `len` bytes at `host`: from `buf[src..]`, or zero pages when `src` is None.
    /// Pages already present (EEXIST) are skipped page by page.
    fn place(&self, host: u64, len: u64, src: Option<usize>) -> std::io::Result<()> {
        match self.place_range(host, len, src) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                for page in 0..len / PAGE_SIZE {
                    let offset = page * PAGE_SIZE;
                    match self.place_range(
                        host + offset,
                        PAGE_SIZE,
                        src.map(|s| s + offset as usize),
                    ) {
                        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            }
            other => other,
        }
    }

    fn place_range(&self, host: u64, len: u64, src: Option<usize>) -> std::io::Result<()> {
        loop {
            let result = match src {
                Some(src) => {
                    let mut copy = UffdioCopy {
                        dst: host,
                        src: self.buf[src..].as_ptr() as u64,
                        len,
                        mode: 0,
                        copy: 0,
                    };
                    ioctl(&self.uffd, UFFDIO_COPY, &mut copy)
                }
                None => {
                    let mut zero = UffdioZeropage {
                        range: UffdioRange { start: host, len },
                        mode: 0,
                        zeropage: 0,
                    };
                    ioctl(&self.uffd, UFFDIO_ZEROPAGE, &mut zero)
                }
            };
            match result {
                // The address space changed under the call: try again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                other => return other,
            }
        }
    }

    fn fail(&self, message: String) {
        tracing::error!("{message}");
        self.failed.store(true, Ordering::Release);
        self.exit.request(ExitReason::Error(message.clone()));
        self.source.failed(&message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Chunks of 64 KiB whose bytes are `index + offset / 4096`; chunk 2 is zero, chunk 3
    /// cannot be read.
    struct Pattern;

    const CHUNK: u64 = 64 << 10;

    impl PageSource for Pattern {
        fn chunk_size(&self) -> u64 {
            CHUNK
        }
        fn is_zero_chunk(&self, index: u64) -> bool {
            index == 2
        }
        fn read_chunk(&self, index: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
            if index == 3 {
                return Err("chunk 3 is corrupt".into());
            }
            for (page, bytes) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                bytes.fill((index as u8).wrapping_add(page as u8));
            }
            Ok(())
        }
    }

    #[test]
    fn pages_arrive_on_first_touch_chunk_by_chunk_and_a_bad_chunk_stops_the_vm() {
        let memory = crate::memory::create(4 << 20).unwrap();
        let exit = ExitHandle::new().unwrap();
        let pager = Pager::start(&memory, Arc::new(Pattern), vec![5], exit.clone()).unwrap();
        let read = |addr: u64| memory.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(read(CHUNK + 3 * PAGE_SIZE), 4);
        // Its neighbours came with it: one fault for the chunk.
        assert_eq!(read(CHUNK), 1);
        assert_eq!(read(2 * CHUNK - 1), 1 + 15);
        assert_eq!(read(2 * CHUNK + 100), 0);
        memory.write_obj(0xaau8, GuestAddress(7 * CHUNK)).unwrap();
        assert_eq!(read(7 * CHUNK), 0xaa);
        assert_eq!(read(7 * CHUNK + PAGE_SIZE), 8);
        // Chunks 1 and 7 on demand, and chunk 5 if the prefetch got to it already. The pager
        // counts a chunk after the copy that woke the reader, so the count may lag a little.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (pager.stats().chunks.load(Ordering::Relaxed) < 2
            || pager.stats().zero_chunks.load(Ordering::Relaxed) < 1)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let chunks = pager.stats().chunks.load(Ordering::Relaxed);
        assert!((2..=3).contains(&chunks), "{chunks}");
        assert_eq!(pager.stats().zero_chunks.load(Ordering::Relaxed), 1);
        assert!(!exit.is_requested());

        // A thread touching the unreadable chunk waits; the VM is asked to stop, naming it.
        let reader = {
            let memory = memory.clone();
            std::thread::spawn(move || memory.read_obj::<u8>(GuestAddress(3 * CHUNK)).unwrap())
        };
        exit.wait();
        match exit.reason() {
            Some(ExitReason::Error(message)) => {
                assert!(message.contains("chunk 3"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(pager.failed());
        // Closing the userfaultfd releases the waiter (the VM is gone by then).
        drop(pager);
        reader.join().unwrap();
    }
}
