//! The request parser against well-formed and hostile descriptor chains.

use super::*;
use crate::devices::virtio::block::MemoryDisk;
use crate::memory::GuestMemoryMmap;
use proptest::prelude::*;

const MEMORY: u64 = 1 << 20;
const DISK: usize = 64 * 1024;
const ID: [u8; ID_BYTES] = *b"vda\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn memory() -> GuestMemoryMmap {
    crate::memory::create(2 << 20).unwrap()
}

fn limits(read_only: bool) -> DiskLimits<'static> {
    DiskLimits { read_only, id: &ID }
}

fn header(memory: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) -> DescriptorInfo {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    memory.write_slice(&bytes, GuestAddress(addr)).unwrap();
    readable(addr, 16)
}

fn readable(addr: u64, len: u32) -> DescriptorInfo {
    DescriptorInfo {
        addr,
        len,
        device_writes: false,
    }
}

fn writable(addr: u64, len: u32) -> DescriptorInfo {
    DescriptorInfo {
        addr,
        len,
        device_writes: true,
    }
}

fn status_at(memory: &GuestMemoryMmap, addr: u64) -> u8 {
    memory.read_obj(GuestAddress(addr)).unwrap()
}

fn run(
    chain: &[DescriptorInfo],
    memory: &GuestMemoryMmap,
    disk: &MemoryDisk,
    read_only: bool,
) -> Completion {
    RequestProcessor::new().process(chain.iter().copied(), memory, disk, limits(read_only))
}

#[test]
fn write_then_read_through_split_segments() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    memory
        .write_slice(&[0xab; 1024], GuestAddress(0x1000))
        .unwrap();
    let chain = [
        header(&memory, 0x100, request_type::OUT, 2),
        readable(0x1000, 512),
        readable(0x1200, 512),
        writable(0x200, 1),
    ];
    let done = run(&chain, &memory, &disk, false);
    assert_eq!(
        done,
        Completion {
            status: Some(status::OK),
            used_len: 1
        }
    );
    assert_eq!(&disk.contents()[1024..2048], &[0xab; 1024][..]);

    let chain = [
        header(&memory, 0x100, request_type::IN, 2),
        writable(0x3000, 1000),
        // Data and status share the last descriptor.
        writable(0x4000, 25),
    ];
    let done = run(&chain, &memory, &disk, false);
    assert_eq!(
        done,
        Completion {
            status: Some(status::OK),
            used_len: 1025
        }
    );
    let mut back = [0u8; 24];
    memory.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
    assert_eq!(back, [0xab; 24]);
    assert_eq!(status_at(&memory, 0x4000 + 24), status::OK);
}

#[test]
fn header_may_straddle_descriptors() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    header(&memory, 0x100, request_type::FLUSH, 0);
    let chain = [readable(0x100, 5), readable(0x105, 11), writable(0x200, 1)];
    assert_eq!(run(&chain, &memory, &disk, false).status, Some(status::OK));
}

#[test]
fn out_of_range_and_partial_sectors_fail() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    let last_sector = (DISK as u64) / 512;
    for (sector, len) in [
        (last_sector, 512),
        (last_sector - 1, 1024),
        (u64::MAX / 256, 512),
        (0, 100),
    ] {
        let chain = [
            header(&memory, 0x100, request_type::IN, sector),
            writable(0x1000, len),
            writable(0x200, 1),
        ];
        let done = run(&chain, &memory, &disk, false);
        assert_eq!(
            done,
            Completion {
                status: Some(status::IOERR),
                used_len: 1
            },
            "{sector} {len}"
        );
    }
}

#[test]
fn read_only_disks_refuse_writes() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    memory.write_slice(&[1; 512], GuestAddress(0x1000)).unwrap();
    for kind in [
        request_type::OUT,
        request_type::DISCARD,
        request_type::WRITE_ZEROES,
    ] {
        let chain = [
            header(&memory, 0x100, kind, 0),
            readable(0x1000, 512),
            writable(0x200, 1),
        ];
        assert_eq!(
            run(&chain, &memory, &disk, true).status,
            Some(status::IOERR)
        );
    }
    assert!(disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn unknown_types_and_flags_are_unsupported() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    let chain = [header(&memory, 0x100, 0x7777, 0), writable(0x200, 1)];
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::UNSUPP)
    );
    // A discard range with the UNMAP flag (only valid for WRITE_ZEROES).
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&1u32.to_le_bytes());
    range[12..].copy_from_slice(&1u32.to_le_bytes());
    memory.write_slice(&range, GuestAddress(0x1000)).unwrap();
    let chain = [
        header(&memory, 0x100, request_type::DISCARD, 0),
        readable(0x1000, 16),
        writable(0x200, 1),
    ];
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::UNSUPP)
    );
    let chain = [
        header(&memory, 0x100, request_type::WRITE_ZEROES, 0),
        readable(0x1000, 16),
        writable(0x200, 1),
    ];
    assert_eq!(run(&chain, &memory, &disk, false).status, Some(status::OK));
}

#[test]
fn write_zeroes_checks_every_range_before_acting() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    disk.write_at(&[9; 1024], 0).unwrap();
    let mut ranges = [0u8; 32];
    ranges[8..12].copy_from_slice(&1u32.to_le_bytes()); // sector 0, 1 sector: fine
    ranges[16..24].copy_from_slice(&(DISK as u64 / 512).to_le_bytes()); // past the end
    ranges[24..28].copy_from_slice(&1u32.to_le_bytes());
    memory.write_slice(&ranges, GuestAddress(0x1000)).unwrap();
    let chain = [
        header(&memory, 0x100, request_type::WRITE_ZEROES, 0),
        readable(0x1000, 32),
        writable(0x200, 1),
    ];
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::IOERR)
    );
    assert_eq!(
        &disk.contents()[..512],
        &[9; 512][..],
        "no range may be done"
    );
}

#[test]
fn get_id_truncates_to_the_buffer() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    let chain = [
        header(&memory, 0x100, request_type::GET_ID, 0),
        writable(0x1000, 2),
        writable(0x200, 1),
    ];
    let done = run(&chain, &memory, &disk, false);
    assert_eq!(
        done,
        Completion {
            status: Some(status::OK),
            used_len: 3
        }
    );
    let mut id = [0u8; 3];
    memory.read_slice(&mut id, GuestAddress(0x1000)).unwrap();
    assert_eq!(&id[..2], b"vd");
}

#[test]
fn chains_without_a_status_byte_complete_empty() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    let chain = [header(&memory, 0x100, request_type::FLUSH, 0)];
    assert_eq!(
        run(&chain, &memory, &disk, false),
        Completion {
            status: None,
            used_len: 0
        }
    );
    // Status byte outside guest memory.
    let chain = [
        header(&memory, 0x100, request_type::FLUSH, 0),
        writable(u64::MAX, 1),
    ];
    assert_eq!(run(&chain, &memory, &disk, false).status, None);
    let chain = [
        header(&memory, 0x100, request_type::FLUSH, 0),
        writable(64 << 20, 1),
    ];
    assert_eq!(run(&chain, &memory, &disk, false).status, None);
}

#[test]
fn misordered_overlong_and_unmapped_chains_fail() {
    let memory = memory();
    let disk = MemoryDisk::new(DISK);
    // Readable after writable.
    let chain = [
        header(&memory, 0x100, request_type::OUT, 0),
        writable(0x200, 1),
        readable(0x1000, 512),
        writable(0x300, 1),
    ];
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::IOERR)
    );
    // Too many descriptors.
    let mut chain = vec![header(&memory, 0x100, request_type::OUT, 0)];
    chain.extend(std::iter::repeat_n(
        readable(0x1000, 512),
        MAX_DESCRIPTORS + 1,
    ));
    chain.push(writable(0x200, 1));
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::IOERR)
    );
    // A data buffer past the end of guest memory: nothing is written to the disk.
    let chain = [
        header(&memory, 0x100, request_type::OUT, 0),
        readable(0x1000, 512),
        readable((2 << 20) - 256, 512),
        writable(0x200, 1),
    ];
    memory.write_slice(&[7; 512], GuestAddress(0x1000)).unwrap();
    assert_eq!(
        run(&chain, &memory, &disk, false).status,
        Some(status::IOERR)
    );
    assert!(disk.contents().iter().all(|&b| b == 0));
}

/// A disk that records every buffer it is handed, to check none lies in guest memory.
struct RecordingDisk {
    inner: MemoryDisk,
    buffers: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl RecordingDisk {
    fn new(size: usize) -> Self {
        RecordingDisk {
            inner: MemoryDisk::new(size),
            buffers: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn record(&self, ptr: *const u8, len: usize) {
        self.buffers.lock().unwrap().push((ptr as usize, len));
    }

    /// Asserts no buffer handed to the disk overlaps a region of `memory`.
    fn assert_no_guest_buffers(&self, memory: &GuestMemoryMmap) {
        use vm_memory::GuestMemoryRegion;
        let buffers = self.buffers.lock().unwrap();
        assert!(!buffers.is_empty());
        for region in memory.iter() {
            let start = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap() as usize;
            let end = start + region.len() as usize;
            for &(ptr, len) in buffers.iter() {
                assert!(
                    ptr + len <= start || ptr >= end,
                    "the disk was handed guest memory {ptr:#x}+{len:#x} as a slice"
                );
            }
        }
    }
}

impl DiskBackend for RecordingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.record(buf.as_ptr(), buf.len());
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        self.record(buf.as_ptr(), buf.len());
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> storage::Result<()> {
        self.inner.flush()
    }
}

/// Finding 16 (issue 13): guest memory is never handed to the disk as a Rust slice (the
/// guest may change it concurrently); single-segment requests, which used to be, and
/// requests larger than the bounce buffer go through it a chunk at a time, and the buffer
/// is reused, not reallocated, from one request to the next.
#[test]
fn guest_memory_never_reaches_the_disk_as_a_slice() {
    let memory = crate::memory::create(16 << 20).unwrap();
    let disk = RecordingDisk::new(8 << 20);
    let big = (MAX_BOUNCE + (1 << 20)) as u32; // 5 MiB in one descriptor
    let pattern: Vec<u8> = (0..big).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    memory
        .write_slice(&pattern, GuestAddress(0x10_0000))
        .unwrap();
    let mut processor = RequestProcessor::new();
    let mut go = |chain: &[DescriptorInfo]| {
        processor.process(chain.iter().copied(), &memory, &disk, limits(false))
    };
    // One segment, written then read back elsewhere.
    let done = go(&[
        header(&memory, 0x100, request_type::OUT, 0),
        readable(0x10_0000, 4096),
        writable(0x200, 1),
    ]);
    assert_eq!(done.status, Some(status::OK));
    // One segment bigger than the bounce buffer.
    let done = go(&[
        header(&memory, 0x100, request_type::OUT, 8),
        readable(0x10_0000, big),
        writable(0x200, 1),
    ]);
    assert_eq!(done.status, Some(status::OK));
    let done = go(&[
        header(&memory, 0x100, request_type::IN, 8),
        writable(0x80_0000, big),
        writable(0x200, 1),
    ]);
    assert_eq!(done.status, Some(status::OK));
    assert_eq!(done.used_len, big + 1);
    let mut back = vec![0u8; big as usize];
    memory
        .read_slice(&mut back, GuestAddress(0x80_0000))
        .unwrap();
    assert!(back == pattern, "the data read back differs");
    // The VMM's stores into guest pages are marked dirty for incremental checkpoints.
    let region = memory.find_region(GuestAddress(0x80_0000)).unwrap();
    assert!(region.bitmap().dirty_at(0x80_0000 + big as usize - 1));
    disk.assert_no_guest_buffers(&memory);

    // The bounce buffer is not reallocated for the next requests.
    let before = processor.bounce.as_ptr();
    let done = processor.process(
        [
            header(&memory, 0x100, request_type::IN, 0),
            writable(0x9000, 512),
            writable(0xa000, 512),
            writable(0x200, 1),
        ],
        &memory,
        &disk,
        limits(false),
    );
    assert_eq!(done.status, Some(status::OK));
    assert_eq!(processor.bounce.as_ptr(), before);
    let mut first = [0u8; 1024];
    memory
        .read_slice(&mut first[..512], GuestAddress(0x9000))
        .unwrap();
    memory
        .read_slice(&mut first[512..], GuestAddress(0xa000))
        .unwrap();
    assert_eq!(&first[..], &pattern[..1024]);
}

/// A disk that fails every write reaching past `fail_from`.
struct FailingDisk {
    inner: MemoryDisk,
    fail_from: u64,
}

impl DiskBackend for FailingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(storage::Error::Io {
                path: "failing-disk".into(),
                op: format!("write at {offset:#x}"),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> storage::Result<()> {
        self.inner.flush()
    }
}

/// `len`-byte descriptors from `addr` on with 96-byte gaps, covering `total` bytes.
fn scattered(addr: u64, total: usize, len: usize, device_writes: bool) -> Vec<DescriptorInfo> {
    let (mut out, mut at, mut addr) = (Vec::new(), 0usize, addr);
    while at < total {
        let n = len.min(total - at);
        out.push(DescriptorInfo {
            addr,
            len: n as u32,
            device_writes,
        });
        at += n;
        addr += n as u64 + 96;
    }
    out
}

/// A 1 MiB request is split over threads (`in_parts`): descriptors of odd sizes, whose
/// boundaries fall anywhere within a part, land at the right disk offsets and come back to
/// the right guest bytes; a failure in a part other than the first fails the request.
#[test]
fn requests_split_over_threads_keep_every_byte_in_place() {
    let memory = crate::memory::create(8 << 20).unwrap();
    let disk = MemoryDisk::new(2 << 20);
    let total = 1usize << 20;
    let pattern: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4099) as u8).collect();
    let out = scattered(0x10_0000, total, 3000, false);
    let mut at = 0usize;
    for d in &out {
        let n = d.len as usize;
        memory
            .write_slice(&pattern[at..at + n], GuestAddress(d.addr))
            .unwrap();
        at += n;
    }
    let mut chain = vec![header(&memory, 0x100, request_type::OUT, 1)];
    chain.extend(&out);
    chain.push(writable(0x200, 1));
    assert_eq!(run(&chain, &memory, &disk, false).status, Some(status::OK));
    assert!(disk.contents()[512..512 + total] == pattern[..]);

    let back = scattered(0x40_0000, total, 5000, true);
    let mut chain = vec![header(&memory, 0x100, request_type::IN, 1)];
    chain.extend(&back);
    chain.push(writable(0x200, 1));
    let done = run(&chain, &memory, &disk, false);
    assert_eq!(done.status, Some(status::OK));
    assert_eq!(done.used_len as usize, total + 1);
    let mut at = 0usize;
    for d in &back {
        let mut bytes = vec![0u8; d.len as usize];
        memory.read_slice(&mut bytes, GuestAddress(d.addr)).unwrap();
        assert!(bytes[..] == pattern[at..at + bytes.len()], "at {at}");
        at += bytes.len();
    }

    // The last part's write fails: so does the request.
    let failing = FailingDisk {
        inner: MemoryDisk::new(2 << 20),
        fail_from: 512 + (total as u64) * 3 / 4 + 1,
    };
    let mut chain = vec![header(&memory, 0x100, request_type::OUT, 1)];
    chain.extend(&out);
    chain.push(writable(0x200, 1));
    let done = RequestProcessor::new().process(chain, &memory, &failing, limits(false));
    assert_eq!(done.status, Some(status::IOERR));
}

/// How `in_parts` cuts a chunk: small ones whole, large ones into whole-sector parts of at
/// least PARALLEL_PART, at most MAX_PARTS of them, covering the chunk exactly once; with
/// the pool's threads or, when they could not start, all on the calling thread.
#[test]
fn parts_cover_the_chunk_in_whole_sectors() {
    cover_the_chunk(&mut PartPool::Unstarted, true);
    cover_the_chunk(&mut PartPool::Unavailable, false);
}

fn cover_the_chunk(pool: &mut PartPool, split: bool) {
    for (len, parts) in [
        (PARALLEL_PART * 2 - 512, 1),
        (PARALLEL_PART * 2, 2),
        (600 << 10, 2),
        (1 << 20, 4),
        (MAX_BOUNCE as usize, 4),
    ] {
        let mut chunk = vec![0u8; len];
        let seen = std::sync::Mutex::new(Vec::new());
        in_parts(pool, &mut chunk, |at, part| {
            seen.lock().unwrap().push((at, part.len()));
            part.fill(1);
            Ok(())
        })
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen.len(), if split { parts } else { 1 }, "{len}");
        let mut next = 0u64;
        for (at, n) in seen {
            assert_eq!(at, next);
            assert_eq!(at % 512, 0);
            next += n as u64;
        }
        assert_eq!(next as usize, len);
        assert!(chunk.iter().all(|&b| b == 1));
    }
    let mut chunk = vec![0u8; 1 << 20];
    // The part holding byte 900 KiB fails: with a split, that is the last one.
    let failed = in_parts(pool, &mut chunk, |at, part| {
        if at + part.len() as u64 > 900 << 10 {
            Err(Failure::Error)
        } else {
            Ok(())
        }
    });
    assert_eq!(failed, Err(Failure::Error));
}

/// The part threads start once, on the first large chunk, and serve every later one; a
/// part that panics fails the chunk without taking the worker or the pool down.
#[test]
fn part_threads_are_kept_and_survive_a_panicking_part() {
    let mut pool = PartPool::Unstarted;
    let mut chunk = vec![0u8; 1 << 20];
    let threads = std::sync::Mutex::new(std::collections::HashSet::new());
    for _ in 0..50 {
        in_parts(&mut pool, &mut chunk, |_, _| {
            threads.lock().unwrap().insert(std::thread::current().id());
            Ok(())
        })
        .unwrap();
    }
    assert!(matches!(pool, PartPool::Running(_)));
    let threads = threads.into_inner().unwrap();
    // The caller and at most MAX_PARTS - 1 pool threads, whatever the number of chunks.
    assert!(threads.len() <= MAX_PARTS, "{} threads", threads.len());
    let panicked = in_parts(&mut pool, &mut chunk, |at, _| {
        assert!(at == 0, "injected panic in a pool part");
        Ok(())
    });
    assert_eq!(panicked, Err(Failure::Error));
    assert_eq!(in_parts(&mut pool, &mut chunk, |_, _| Ok(())), Ok(()));
}

fn descriptor() -> impl Strategy<Value = DescriptorInfo> {
    let addr = prop_oneof![
        0..MEMORY + 0x2000,
        Just(u64::MAX - 8),
        (2u64 << 20) - 600..(2u64 << 20) + 16,
        any::<u64>(),
    ];
    let len = prop_oneof![0u32..1100, Just(16), Just(512), Just(1), any::<u32>()];
    (addr, len, any::<bool>()).prop_map(|(addr, len, device_writes)| DescriptorInfo {
        addr,
        len,
        device_writes,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever the chain, the processor neither panics nor touches the disk out of range,
    /// reports a known status, and never claims more bytes than the chain can hold.
    #[test]
    fn hostile_chains_are_contained(
        kind in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in prop_oneof![0u64..200, any::<u64>()],
        header_bytes in proptest::collection::vec(any::<u8>(), 0..48),
        chain in proptest::collection::vec(descriptor(), 0..12),
        read_only in any::<bool>(),
    ) {
        let memory = memory();
        let disk = MemoryDisk::new(DISK);
        // Give the chain something header-shaped to read at its first readable buffer.
        let mut bytes = header_bytes;
        bytes.resize(16.max(bytes.len()), 0);
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        if let Some(first) = chain.iter().find(|d| !d.device_writes) {
            let _ = memory.write_slice(&bytes, GuestAddress(first.addr));
        }
        let before = disk.contents();
        let done = run(&chain, &memory, &disk, read_only);
        if let Some(status) = done.status {
            prop_assert!(status <= status::UNSUPP);
        } else {
            prop_assert_eq!(done.used_len, 0);
        }
        let writable: u64 = chain.iter().filter(|d| d.device_writes).map(|d| u64::from(d.len)).sum();
        prop_assert!(u64::from(done.used_len) <= writable);
        if read_only || done.status != Some(status::OK) {
            // A refused request may not have changed the disk... except a write that failed
            // part-way on a disk error, which the in-memory disk never produces.
            prop_assert!(disk.contents() == before);
        }
    }
}
