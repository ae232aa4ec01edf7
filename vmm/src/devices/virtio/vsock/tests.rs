//! The connection table against rings in real guest memory and real Unix sockets: a host
//! program connecting through `CONNECT`, a guest connecting to `<uds>_<port>`, data both
//! ways, a hostile guest (bad headers, huge lengths, buffers outside memory, credit abuse),
//! and the transport reset a restore owes the guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::muxer::{Muxer, EVENT, RX, TX};
use super::packet::{Header, Op, HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::memory::GuestMemoryMmap;

const GUEST: u64 = 3;
const SIZE: u16 = 16;
const HOST_PORT: u32 = 1 << 30;

/// Three split rings in guest memory, and buffers for the packets.
struct Rings {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Next free descriptor and available index, per queue.
    next: [(u16, u16); 3],
    /// Used entries already read, per queue.
    seen: [u16; 3],
    /// Next free buffer address.
    heap: u64,
}

fn base(q: usize) -> u64 {
    0x10000 * (q as u64 + 1)
}

impl Rings {
    fn new() -> Rings {
        let memory = crate::memory::create(4 << 20).unwrap();
        let queues = (0..3)
            .map(|q| {
                let mut queue = Queue::new(SIZE).unwrap();
                queue.set_size(SIZE);
                queue.set_desc_table_address(Some(base(q) as u32), Some(0));
                queue.set_avail_ring_address(Some((base(q) + 0x1000) as u32), Some(0));
                queue.set_used_ring_address(Some((base(q) + 0x2000) as u32), Some(0));
                queue.set_ready(true);
                assert!(queue.is_valid(&memory));
                queue
            })
            .collect();
        Rings {
            memory,
            queues,
            next: [(0, 0); 3],
            seen: [0; 3],
            heap: 0x100000,
        }
    }

    /// Posts one descriptor at `addr` of `len` bytes on queue `q`.
    fn post(&mut self, q: usize, addr: u64, len: u32, writable: bool) {
        let (desc, avail) = self.next[q];
        let at = base(q) + 16 * u64::from(desc % SIZE);
        let m = &self.memory;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(at + 12))
            .unwrap();
        m.write_obj(0u16, GuestAddress(at + 14)).unwrap();
        let ring = base(q) + 0x1000;
        m.write_obj(
            desc % SIZE,
            GuestAddress(ring + 4 + 2 * u64::from(avail % SIZE)),
        )
        .unwrap();
        m.write_obj(avail.wrapping_add(1), GuestAddress(ring + 2))
            .unwrap();
        self.next[q] = (desc.wrapping_add(1), avail.wrapping_add(1));
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.heap;
        self.heap += (len as u64 + 0xFFF) & !0xFFF;
        at
    }

    /// The guest sends `bytes` on TX.
    fn send(&mut self, bytes: &[u8]) {
        let at = self.alloc(bytes.len().max(1));
        self.memory.write_slice(bytes, GuestAddress(at)).unwrap();
        self.post(TX, at, bytes.len() as u32, false);
    }

    /// The guest sends a packet from its port 52 (or `port`) to the host.
    fn send_packet(&mut self, op: Op, src_port: u32, dst_port: u32, payload: &[u8]) {
        let header = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send(&bytes);
    }

    /// Posts `n` RX buffers of 4 KiB.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let at = self.alloc(4096);
            self.post(RX, at, 4096, true);
        }
    }

    /// Packets the device put in RX since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let ring = base(RX) + 0x2000;
        let idx: u16 = self.memory.read_obj(GuestAddress(ring + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen[RX] != idx {
            let slot = ring + 4 + 8 * u64::from(self.seen[RX] % SIZE);
            let id: u32 = self.memory.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = self.memory.read_obj(GuestAddress(slot + 4)).unwrap();
            let desc = base(RX) + 16 * u64::from(id);
            let addr: u64 = self.memory.read_obj(GuestAddress(desc)).unwrap();
            let mut bytes = vec![0u8; len as usize];
            self.memory
                .read_slice(&mut bytes, GuestAddress(addr))
                .unwrap();
            // The device's own headers, read back as the guest would (host CID as source).
            let mut raw = [0u8; HEADER_SIZE];
            raw.copy_from_slice(&bytes[..HEADER_SIZE]);
            out.push((parse_device_header(&raw), bytes[HEADER_SIZE..].to_vec()));
            self.seen[RX] = self.seen[RX].wrapping_add(1);
        }
        out
    }

    fn pass(&mut self, muxer: &mut Muxer) {
        muxer.process(&self.memory, &mut self.queues);
    }
}

/// A header the device sent (from the host to the guest).
fn parse_device_header(raw: &[u8; HEADER_SIZE]) -> Header {
    // Swap the addresses so the guest-side parser's checks apply in reverse.
    let mut swapped = *raw;
    swapped[0..8].copy_from_slice(&raw[8..16]);
    swapped[8..16].copy_from_slice(&raw[0..8]);
    let mut h = Header::parse_from_guest(&swapped, usize::MAX, GUEST).unwrap();
    std::mem::swap(&mut h.src_cid, &mut h.dst_cid);
    h
}

/// Runs passes until `until` holds (each pass is cheap; the sockets are local).
fn settle(rings: &mut Rings, muxer: &mut Muxer, mut until: impl FnMut(&mut Rings) -> bool) {
    for _ in 0..2000 {
        rings.pass(muxer);
        if until(rings) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the muxer never got there");
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, Muxer, Rings) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let muxer = Muxer::new(GUEST, uds.clone()).unwrap();
    (dir, uds, muxer, Rings::new())
}

#[test]
fn host_connects_through_connect_and_data_flows_both_ways() {
    let (_dir, uds, mut muxer, mut rings) = setup();
    rings.give_rx(8);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let mut got = Vec::new();
    settle(&mut rings, &mut muxer, |r| {
        got.extend(r.received());
        !got.is_empty()
    });
    let (request, _) = got.remove(0);
    assert_eq!(request.op, Op::Request);
    assert_eq!((request.src_port, request.dst_port), (HOST_PORT, 52));
    rings.send_packet(Op::Response, 52, HOST_PORT, &[]);
    rings.pass(&mut muxer);
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {HOST_PORT}\n"));
    // The bytes sent with CONNECT, then more, reach the guest.
    host.write_all(b" ping").unwrap();
    let mut data = Vec::new();
    settle(&mut rings, &mut muxer, |r| {
        for (h, payload) in r.received() {
            assert_eq!(h.op, Op::Rw);
            data.extend(payload);
        }
        data == b"early ping"
    });
    rings.send_packet(Op::Rw, 52, HOST_PORT, b"pong");
    rings.pass(&mut muxer);
    let mut pong = [0u8; 4];
    reader.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    // The host hangs up: the guest hears SHUTDOWN, answers RST, the entry goes.
    drop(reader);
    drop(host);
    let mut shutdown = None;
    settle(&mut rings, &mut muxer, |r| {
        shutdown = r.received().into_iter().find(|(h, _)| h.op == Op::Shutdown);
        shutdown.is_some()
    });
    assert_eq!(shutdown.unwrap().0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    rings.send_packet(Op::Rst, 52, HOST_PORT, &[]);
    rings.pass(&mut muxer);
    assert_eq!(muxer.connections(), 0);
}

#[test]
fn guest_connects_to_uds_port_or_is_reset() {
    let (dir, _uds, mut muxer, mut rings) = setup();
    let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    rings.give_rx(8);
    rings.send_packet(Op::Request, 2000, 1234, &[]);
    rings.pass(&mut muxer);
    let answers = rings.received();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0.op, Op::Response);
    assert_eq!((answers[0].0.src_port, answers[0].0.dst_port), (1234, 2000));
    let (mut accepted, _) = listener.accept().unwrap();
    rings.send_packet(Op::Rw, 2000, 1234, b"hello");
    rings.pass(&mut muxer);
    let mut hello = [0u8; 5];
    accepted.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");
    // Nothing listens on port 99: refused.
    rings.send_packet(Op::Request, 2001, 99, &[]);
    rings.pass(&mut muxer);
    let answers = rings.received();
    assert_eq!(answers[0].0.op, Op::Rst);
    // Data on no connection: reset too.
    rings.send_packet(Op::Rw, 3000, 77, b"x");
    rings.pass(&mut muxer);
    assert_eq!(rings.received()[0].0.op, Op::Rst);
}

#[test]
fn hostile_packets_are_dropped_or_reset_never_a_panic() {
    let (dir, _uds, mut muxer, mut rings) = setup();
    let _listener = UnixListener::bind(dir.path().join("v.sock_5")).unwrap();
    rings.give_rx(16);
    // Short header, garbage, a huge len, a forged source CID, a payload on REQUEST.
    rings.send(&[1, 2, 3]);
    rings.send(&[0xFF; 64]);
    let mut huge = Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 5,
        len: u32::MAX,
        op: Op::Rw,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    rings.send(&huge.to_bytes());
    huge.len = 0;
    huge.src_cid = 99;
    rings.send(&huge.to_bytes());
    // A descriptor pointing outside guest memory.
    rings.post(TX, 0xFFFF_FFFF_0000, 4096, false);
    rings.pass(&mut muxer);
    assert_eq!(muxer.connections(), 0);
    assert!(rings.received().is_empty(), "dropped packets get no answer");
    // Credit abuse: more than 256 KiB unread by the host is a reset.
    rings.send_packet(Op::Request, 7, 5, &[]);
    rings.pass(&mut muxer);
    assert_eq!(rings.received()[0].0.op, Op::Response);
    let chunk = vec![0xAB; 60 * 1024];
    for _ in 0..6 {
        rings.send_packet(Op::Rw, 7, 5, &chunk);
        rings.pass(&mut muxer);
    }
    // The host never reads; the socket buffer takes some, then the credit runs out.
    let mut reset = false;
    for _ in 0..16 {
        rings.send_packet(Op::Rw, 7, 5, &chunk);
        rings.pass(&mut muxer);
        if rings.received().iter().any(|(h, _)| h.op == Op::Rst) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the credit was never enforced");
    assert_eq!(muxer.connections(), 0);
}

#[test]
fn a_restore_owes_the_guest_a_transport_reset() {
    let (dir, _uds, mut muxer, mut rings) = setup();
    let _listener = UnixListener::bind(dir.path().join("v.sock_5")).unwrap();
    rings.give_rx(4);
    rings.send_packet(Op::Request, 7, 5, &[]);
    rings.pass(&mut muxer);
    assert_eq!(muxer.connections(), 1);
    muxer.reset_transport();
    assert_eq!(muxer.connections(), 0);
    let event = rings.alloc(8);
    rings
        .memory
        .write_obj(0xFFFF_FFFFu32, GuestAddress(event))
        .unwrap();
    rings.post(EVENT, event, 8, true);
    rings.pass(&mut muxer);
    let id: u32 = rings.memory.read_obj(GuestAddress(event)).unwrap();
    assert_eq!(id, super::packet::EVENT_TRANSPORT_RESET);
    let used: u16 = rings
        .memory
        .read_obj(GuestAddress(base(EVENT) + 0x2000 + 2))
        .unwrap();
    assert_eq!(used, 1);
    // Only once.
    let again = rings.alloc(8);
    rings.post(EVENT, again, 8, true);
    rings.pass(&mut muxer);
    let used: u16 = rings
        .memory
        .read_obj(GuestAddress(base(EVENT) + 0x2000 + 2))
        .unwrap();
    assert_eq!(used, 1);
}

#[test]
fn a_late_rst_for_a_connection_before_the_restore_spares_the_new_one() {
    let (_dir, uds, mut muxer, mut rings) = setup();
    rings.give_rx(8);
    // A host connection before the checkpoint, on the first local port.
    let mut old = UnixStream::connect(&uds).unwrap();
    old.write_all(b"CONNECT 52\n").unwrap();
    let mut got = Vec::new();
    settle(&mut rings, &mut muxer, |r| {
        got.extend(r.received());
        !got.is_empty()
    });
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (HOST_PORT, 52));
    // The checkpoint is restored by a new VMM: a new device, told to reset the transport.
    drop(muxer);
    let mut muxer = Muxer::new(GUEST, uds.clone()).unwrap();
    muxer.reset_transport();
    // After the restore a host program connects to the same guest port ...
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let mut got = Vec::new();
    settle(&mut rings, &mut muxer, |r| {
        got.extend(r.received());
        got.iter().any(|(h, _)| h.op == Op::Request)
    });
    let (request, _) = got.into_iter().find(|(h, _)| h.op == Op::Request).unwrap();
    assert_ne!(
        request.src_port, HOST_PORT,
        "a new connection reused an old port"
    );
    // ... while the guest answers a packet of the old connection it read late with an RST.
    rings.send_packet(Op::Rst, 52, HOST_PORT, &[]);
    rings.pass(&mut muxer);
    assert_eq!(
        muxer.connections(),
        1,
        "the late RST ended the new connection"
    );
    rings.send_packet(Op::Response, 52, request.src_port, &[]);
    rings.pass(&mut muxer);
    let mut line = String::new();
    BufReader::new(host).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", request.src_port));
    drop(old);
}
