//! The daemon against a scripted frontend: a well-behaved session, then hostile ones (a memory
//! table past the end of its memfd, descriptors outside shared memory, oversized requests,
//! rings outside memory). Each must end in an error status or a refused message, never in a
//! panic or a SIGBUS, and the daemon must serve the next frontend.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use vmm::devices::virtio::block::{request_type, status};

const MEMORY: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x8000;
const DISK_SIZE: u64 = 1 << 20;

/// A frontend's guest memory: a memfd mapped into the test.
struct SharedMemory {
    fd: OwnedFd,
    base: *mut u8,
}

impl SharedMemory {
    fn new() -> Self {
        // SAFETY: plain syscalls on a fresh memfd; the mapping is checked and owned here.
        unsafe {
            let fd = libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), MEMORY as i64), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                MEMORY,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(base, libc::MAP_FAILED);
            SharedMemory {
                fd,
                base: base.cast(),
            }
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        assert!(addr as usize + bytes.len() <= MEMORY);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(addr as usize), bytes.len())
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        assert!(addr as usize + len <= MEMORY);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(addr as usize), out.as_mut_ptr(), len)
        };
        out
    }

    fn region(&self, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), MEMORY) };
    }
}

/// A daemon on a raw disk in a temporary directory, served from a thread.
struct Fixture {
    dir: tempfile::TempDir,
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Fixture {
    fn start(num_queues: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 512) as u8).collect();
        std::fs::write(&image, data).unwrap();
        let mut disk = DiskConfig::new(&image);
        disk.format = Some(storage::ImageFormat::Raw);
        let config = DaemonConfig {
            socket: dir.path().join("blk.sock"),
            disk,
            num_queues,
            guest_agent: None,
        };
        let daemon = BlkDaemon::new(&config).unwrap();
        let control = daemon.control();
        let thread = Some(std::thread::spawn(move || daemon.run(|| {})));
        Fixture {
            dir,
            control,
            thread,
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("blk.sock")
    }

    fn image(&self) -> std::path::PathBuf {
        self.dir.path().join("disk.raw")
    }

    fn stop(mut self) {
        self.control.shutdown().unwrap();
        let thread = self.thread.take().unwrap();
        thread.join().unwrap().unwrap();
        assert!(!self.socket().exists(), "the socket is removed on exit");
    }
}

fn connect(socket: &Path) -> Frontend {
    let mut frontend = Frontend::connect(socket, 16).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    // No EVENT_IDX: every completion signals, which keeps the script simple.
    frontend
        .set_features(features & !(1 << vmm::devices::virtio::VIRTIO_RING_F_EVENT_IDX))
        .unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    frontend
        .set_protocol_features(
            protocol
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .unwrap();
    frontend
}

/// One queue at DESC/AVAIL/USED, with the returned kick and call eventfds.
fn setup_queue(frontend: &mut Frontend, ring_base: u64) -> vhost::Result<(EventFd, EventFd)> {
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    frontend.set_vring_num(0, QUEUE_SIZE)?;
    frontend.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: ring_base + DESC,
            used_ring_addr: ring_base + USED,
            avail_ring_addr: ring_base + AVAIL,
            log_addr: None,
        },
    )?;
    frontend.set_vring_base(0, 0)?;
    frontend.set_vring_call(0, &call)?;
    frontend.set_vring_kick(0, &kick)?;
    frontend.set_vring_enable(0, true)?;
    Ok((kick, call))
}

/// Writes descriptor `index`: (addr, len, device-writes), chained to the next unless last.
fn descriptor(memory: &SharedMemory, index: u16, addr: u64, len: u32, write: bool, last: bool) {
    let mut bytes = [0u8; 16];
    bytes[0..8].copy_from_slice(&addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..16].copy_from_slice(&(index + 1).to_le_bytes());
    memory.write(DESC + u64::from(index) * 16, &bytes);
}

/// Posts the chain starting at descriptor `head` as avail entry `slot`, kicks, and waits for
/// the used index to reach `slot + 1`. Returns the used element's length.
fn submit(memory: &SharedMemory, kick: &EventFd, call: &EventFd, slot: u16, head: u16) -> u32 {
    memory.write(
        AVAIL + 4 + u64::from(slot % QUEUE_SIZE) * 2,
        &head.to_le_bytes(),
    );
    memory.write(AVAIL + 2, &(slot + 1).to_le_bytes());
    kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let used = u16::from_le_bytes(memory.read(USED + 2, 2).try_into().unwrap());
        if used == slot + 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "request {slot} not completed"
        );
        let _ = call.read();
        std::thread::sleep(Duration::from_millis(2));
    }
    let element = memory.read(USED + 4 + u64::from(slot % QUEUE_SIZE) * 8, 8);
    assert_eq!(
        u32::from_le_bytes(element[0..4].try_into().unwrap()),
        u32::from(head)
    );
    u32::from_le_bytes(element[4..8].try_into().unwrap())
}

fn header(memory: &SharedMemory, kind: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    memory.write(HEADER, &bytes);
}

fn status_byte(memory: &SharedMemory) -> u8 {
    memory.read(STATUS, 1)[0]
}

#[test]
fn serves_reads_writes_and_config_then_a_second_frontend() {
    let fixture = Fixture::start(2);
    for round in 0..2u8 {
        let memory = SharedMemory::new();
        let mut frontend = connect(&fixture.socket());
        assert_eq!(frontend.get_queue_num().unwrap(), 2);
        let (_, config) = frontend
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
        assert_eq!(
            u64::from_le_bytes(config[0..8].try_into().unwrap()),
            DISK_SIZE / 512
        );
        assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 2);
        frontend
            .set_mem_table(&[memory.region(MEMORY as u64)])
            .unwrap();
        let (kick, call) = setup_queue(&mut frontend, memory.base as u64).unwrap();

        // Read sectors 3..5: the image holds each sector's index in every byte.
        header(&memory, request_type::IN, 3);
        memory.write(STATUS, &[0xff]);
        descriptor(&memory, 0, HEADER, 16, false, false);
        descriptor(&memory, 1, DATA, 1024, true, false);
        descriptor(&memory, 2, STATUS, 1, true, true);
        assert_eq!(submit(&memory, &kick, &call, 0, 0), 1025);
        assert_eq!(status_byte(&memory), status::OK);
        let data = memory.read(DATA, 1024);
        assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));

        // Write sector 7 with the round's pattern, then flush.
        header(&memory, request_type::OUT, 7);
        memory.write(DATA, &[0xa0 + round; 512]);
        descriptor(&memory, 0, HEADER, 16, false, false);
        descriptor(&memory, 1, DATA, 512, false, false);
        descriptor(&memory, 2, STATUS, 1, true, true);
        submit(&memory, &kick, &call, 1, 0);
        assert_eq!(status_byte(&memory), status::OK);
        header(&memory, request_type::FLUSH, 0);
        descriptor(&memory, 0, HEADER, 16, false, false);
        descriptor(&memory, 1, STATUS, 1, true, true);
        submit(&memory, &kick, &call, 2, 0);
        assert_eq!(status_byte(&memory), status::OK);
        let image = std::fs::read(fixture.image()).unwrap();
        assert!(image[7 * 512..8 * 512].iter().all(|&b| b == 0xa0 + round));
        drop(frontend);
    }
    fixture.stop();
}

#[test]
fn hostile_requests_get_error_statuses() {
    let fixture = Fixture::start(1);
    let memory = SharedMemory::new();
    let mut frontend = connect(&fixture.socket());
    frontend
        .set_mem_table(&[memory.region(MEMORY as u64)])
        .unwrap();
    let (kick, call) = setup_queue(&mut frontend, memory.base as u64).unwrap();
    let mut slot = 0;
    let mut run = |chain: &[(u64, u32, bool)]| {
        memory.write(STATUS, &[0xff]);
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            descriptor(&memory, i as u16, addr, len, write, i + 1 == chain.len());
        }
        let used = submit(&memory, &kick, &call, slot, 0);
        slot += 1;
        (used, status_byte(&memory))
    };

    // A data buffer outside shared memory.
    header(&memory, request_type::IN, 0);
    let (_, st) = run(&[(HEADER, 16, false), (1 << 40, 512, true), (STATUS, 1, true)]);
    assert_eq!(st, status::IOERR);
    // A buffer straddling the end of shared memory.
    let (_, st) = run(&[
        (HEADER, 16, false),
        (MEMORY as u64 - 256, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(st, status::IOERR);
    // A read past the end of the disk, and one whose sector overflows.
    header(&memory, request_type::IN, DISK_SIZE / 512 - 1);
    let (_, st) = run(&[(HEADER, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
    assert_eq!(st, status::IOERR);
    header(&memory, request_type::IN, u64::MAX / 256);
    let (_, st) = run(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(st, status::IOERR);
    // An oversized request: a 4 GiB - 1 descriptor. virtio-queue ends a chain whose lengths
    // overflow u32, leaving no status byte in reach (used length 0); either way, no data moves.
    header(&memory, request_type::IN, 0);
    memory.write(DATA, &[0x5a; 16]);
    let outcome = run(&[
        (HEADER, 16, false),
        (DATA, u32::MAX, true),
        (STATUS, 1, true),
    ]);
    assert!(
        outcome == (1, status::IOERR) || outcome == (0, 0xff),
        "{outcome:?}"
    );
    assert_eq!(memory.read(DATA, 16), [0x5a; 16]);
    // An unknown request type.
    header(&memory, 0x7777, 0);
    let (_, st) = run(&[(HEADER, 16, false), (STATUS, 1, true)]);
    assert_eq!(st, status::UNSUPP);
    // A status byte outside memory: returned with nothing written.
    header(&memory, request_type::FLUSH, 0);
    let (used, st) = run(&[(HEADER, 16, false), (1 << 40, 1, true)]);
    assert_eq!((used, st), (0, 0xff));
    drop(frontend);

    // Rings outside shared memory: refused or ignored, and the daemon lives on.
    let mut frontend = connect(&fixture.socket());
    frontend
        .set_mem_table(&[memory.region(MEMORY as u64)])
        .unwrap();
    let _ = setup_queue(&mut frontend, memory.base as u64 + (1 << 30));
    drop(frontend);
    fixture.stop();
}

#[test]
fn a_memory_table_past_the_end_of_its_file_is_refused() {
    let fixture = Fixture::start(1);
    let memory = SharedMemory::new();
    let mut frontend = connect(&fixture.socket());
    // The region claims 2 MiB of a 1 MiB memfd: touching the second MiB would raise SIGBUS.
    let _ = frontend.set_mem_table(&[memory.region(2 * MEMORY as u64)]);
    if let Ok((kick, _call)) = setup_queue(&mut frontend, memory.base as u64) {
        header(&memory, request_type::IN, 0);
        descriptor(&memory, 0, HEADER, 16, false, false);
        descriptor(&memory, 1, MEMORY as u64 + 4096, 512, true, false);
        descriptor(&memory, 2, STATUS, 1, true, true);
        memory.write(AVAIL + 4, &0u16.to_le_bytes());
        memory.write(AVAIL + 2, &1u16.to_le_bytes());
        let _ = kick.write(1);
        std::thread::sleep(Duration::from_millis(200));
        // Nothing was served on the refused table.
        assert_eq!(memory.read(USED + 2, 2), [0, 0]);
    }
    drop(frontend);

    // The next frontend is served normally.
    let mut frontend = connect(&fixture.socket());
    frontend
        .set_mem_table(&[memory.region(MEMORY as u64)])
        .unwrap();
    let (kick, call) = setup_queue(&mut frontend, memory.base as u64).unwrap();
    memory.write(USED, &[0; 8]);
    header(&memory, request_type::GET_ID, 0);
    descriptor(&memory, 0, HEADER, 16, false, false);
    descriptor(&memory, 1, DATA, 20, true, false);
    descriptor(&memory, 2, STATUS, 1, true, true);
    assert_eq!(submit(&memory, &kick, &call, 0, 0), 21);
    assert_eq!(&memory.read(DATA, 4), b"vda\0");
    drop(frontend);
    fixture.stop();
}

#[test]
fn the_api_sees_one_disk_and_refuses_pause() {
    let fixture = Fixture::start(1);
    let control = fixture.control.clone();
    let disks = control.disks();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].name, "vda");
    assert_eq!(control.info().disks, 1);
    assert!(matches!(control.pause(), Err(ControlError::Unsupported(_))));
    assert!(matches!(
        control.resume(),
        Err(ControlError::Unsupported(_))
    ));
    fixture.stop();
}

#[test]
fn check_regions_measures_each_region_against_its_file() {
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
    let shared = SharedMemory::new();
    let region = |size: usize, offset: u64| {
        let file = std::fs::File::from(shared.fd.try_clone().unwrap());
        let mmap = MmapRegion::<()>::from_file(FileOffset::new(file, offset), size).unwrap();
        GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap()
    };
    let memory = |r| GuestMemoryMmap::<()>::from_regions(vec![r]).unwrap();
    assert!(backend::check_regions(&memory(region(MEMORY, 0))).is_ok());
    let past_end = backend::check_regions(&memory(region(2 * MEMORY, 0))).unwrap_err();
    assert!(past_end.contains("past the end"), "{past_end}");
    assert!(backend::check_regions(&memory(region(MEMORY, 4096))).is_err());
    // An anonymous region has no file to check against.
    let anonymous = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
    assert!(backend::check_regions(&anonymous).is_err());
}

#[test]
fn shutdown_ends_the_wait_for_a_frontend_even_without_the_socket_file() {
    let fixture = Fixture::start(1);
    std::thread::sleep(Duration::from_millis(100));
    // Someone removed the socket: the daemon cannot be reached by path, but still stops.
    std::fs::remove_file(fixture.socket()).unwrap();
    fixture.stop();
}

/// Issue 13, finding 11: a frontend that publishes an avail index more than the queue size
/// ahead used to leave the worker spinning on the ring for ever, so new frontends timed out
/// and shutdown never finished. Now the connection is cut, and the next frontend is served.
#[test]
fn an_avail_index_far_ahead_disconnects_the_frontend() {
    let fixture = Fixture::start(1);
    let memory = SharedMemory::new();
    let mut frontend = connect(&fixture.socket());
    frontend
        .set_mem_table(&[memory.region(MEMORY as u64)])
        .unwrap();
    let (kick, _call) = setup_queue(&mut frontend, memory.base as u64).unwrap();
    memory.write(AVAIL + 2, &(QUEUE_SIZE + 5).to_le_bytes());
    kick.write(1).unwrap();
    // The daemon ends the session: the next message finds the socket closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while frontend.get_features().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon kept serving a frontend whose ring is broken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(frontend);
    // A well-behaved frontend is served afterwards.
    let mut frontend = connect(&fixture.socket());
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    drop(frontend);
    fixture.stop();
}
