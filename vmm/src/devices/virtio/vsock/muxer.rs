//! The vsock connection table between the guest's queues and host Unix sockets, one pass at a
//! time: [`Muxer::process`] takes what the guest posted on TX, accepts and reads host
//! sockets, writes what host sockets may take, and fills the guest's RX buffers. The device's
//! worker calls it whenever a queue is notified or a socket is ready ([`Muxer::poll_fds`]
//! says which); tests call it directly.
//!
//! Bounded against a hostile guest: packets are parsed by [`super::packet`] (a bad one is
//! dropped), each connection's data toward the host is bounded by the credit the device
//! announced ([`super::connection`]), at most [`MAX_CONNECTIONS`] connections and
//! [`MAX_PENDING_HOST`] half-open host connections exist, and control packets waiting for RX
//! buffers are capped at [`MAX_CONTROL_BACKLOG`].

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::connection::{Action, Connection, State};
use super::host::{guest_target, ok_line, parse_connect, ConnectLine};
use super::packet::{Header, Op, EVENT_TRANSPORT_RESET, HEADER_SIZE, MAX_PAYLOAD};
use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 16;
/// Most control packets (RESPONSE, RST, credit updates) waiting for RX buffers.
pub const MAX_CONTROL_BACKLOG: usize = 1024;
/// Most bytes read from a host socket ahead of the guest's credit.
const HOST_READ_AHEAD: usize = 64 * 1024;
/// The first host-side port given to host-initiated connections (Firecracker's choice).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Queue indexes.
pub const RX: usize = 0;
/// The guest's transmit queue.
pub const TX: usize = 1;
/// The event queue.
pub const EVENT: usize = 2;

/// A connection with its host socket.
#[derive(Debug)]
struct Entry {
    connection: Connection,
    stream: UnixStream,
    /// Guest bytes not yet written to the host socket.
    to_host: Vec<u8>,
    /// Host bytes not yet sent to the guest.
    to_guest: Vec<u8>,
    /// The host socket reached end of stream (the guest was told with SHUTDOWN).
    host_eof: bool,
    /// The guest shut its sending side: shut the host socket's write side once drained.
    shut_host_write: bool,
    /// The guest was sent SHUTDOWN after the host socket's end of stream.
    shutdown_sent: bool,
    /// Leading bytes of `to_host` that are not guest data (the `OK` line).
    not_guest_data: usize,
}

impl Entry {
    /// The host socket ended and everything it sent went to the guest: SHUTDOWN is due.
    fn owes_shutdown(&self) -> bool {
        self.host_eof
            && !self.shutdown_sent
            && self.to_guest.is_empty()
            && self.connection.state() == State::Established
    }
}

/// A host connection still sending its `CONNECT` line.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The connection table.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    pending: Vec<PendingHost>,
    /// By (host-side port, guest port).
    entries: HashMap<(u32, u32), Entry>,
    control: VecDeque<Header>,
    next_local_port: u32,
    /// A transport reset is owed to the guest (after a restore).
    reset_pending: bool,
}

impl Muxer {
    /// A table for guest `guest_cid`, listening for host connections on `uds`.
    pub fn new(guest_cid: u64, uds: PathBuf) -> std::io::Result<Self> {
        match std::fs::symlink_metadata(&uds) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                std::fs::remove_file(&uds)?
            }
            _ => {}
        }
        let listener = UnixListener::bind(&uds)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            uds,
            listener,
            pending: Vec::new(),
            entries: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            reset_pending: false,
        })
    }

    /// The host socket's path.
    pub fn uds(&self) -> &std::path::Path {
        &self.uds
    }

    /// Drops every connection and owes the guest a transport reset (a restored VM: its
    /// peers are gone, as in Firecracker).
    ///
    /// New host connections then take local ports from a random point of the range: the
    /// guest may still hold packets of the connections the reset ended (delivered to its RX
    /// ring before the checkpoint, read after it) and answers each with an RST for that
    /// connection's ports. Had a new connection the same ports as an old one (the count
    /// restarts with the device), such a late RST would end the new connection.
    pub fn reset_transport(&mut self) {
        self.entries.clear();
        self.pending.clear();
        self.control.clear();
        self.reset_pending = true;
        self.next_local_port = rand::random_range(FIRST_LOCAL_PORT..=u32::MAX);
    }

    /// Drops every connection (a driver reset): host programs see their sockets close.
    pub fn close_all(&mut self) {
        self.entries.clear();
        self.pending.clear();
        self.control.clear();
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.entries.len()
    }

    /// The descriptors to wait on besides the queues': (fd, events).
    pub fn poll_fds(&self) -> Vec<(RawFd, libc::c_short)> {
        let mut fds = vec![(self.listener.as_raw_fd(), libc::POLLIN)];
        fds.extend(
            self.pending
                .iter()
                .map(|p| (p.stream.as_raw_fd(), libc::POLLIN)),
        );
        for entry in self.entries.values() {
            let mut events = 0;
            if !entry.host_eof && entry.to_guest.len() < HOST_READ_AHEAD {
                events |= libc::POLLIN;
            }
            if !entry.to_host.is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push((entry.stream.as_raw_fd(), events));
            }
        }
        fds
    }

    fn push_control(&mut self, header: Header) {
        if self.control.len() >= MAX_CONTROL_BACKLOG {
            tracing::warn!("vsock: control backlog full, dropping {:?}", header.op);
            return;
        }
        self.control.push_back(header);
    }

    /// An RST from the host side to the guest's `peer` port from host port `local`.
    fn rst(&self, local: u32, peer: u32) -> Header {
        Header {
            src_cid: super::packet::HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// One pass over everything; answers whether the guest needs an interrupt.
    pub fn process<M: GuestMemory>(&mut self, memory: &M, queues: &mut [Queue]) -> bool {
        let mut interrupt = false;
        if queues.len() <= EVENT {
            return false;
        }
        interrupt |= self.drain_tx(memory, &mut queues[TX]);
        self.accept_host();
        self.read_pending_host();
        self.pump_host_sockets();
        interrupt |= self.fill_rx(memory, &mut queues[RX]);
        interrupt |= self.send_reset_event(memory, &mut queues[EVENT]);
        interrupt
    }

    /// Takes every packet the guest posted.
    fn drain_tx<M: GuestMemory>(&mut self, memory: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            let mut total = 0usize;
            let limit = HEADER_SIZE + MAX_PAYLOAD as usize;
            let mut fault = false;
            for descriptor in chain.readable() {
                let len = descriptor.len() as usize;
                total = total.saturating_add(len);
                let take = len.min(limit.saturating_sub(bytes.len()));
                if take == 0 {
                    continue;
                }
                let start = bytes.len();
                bytes.resize(start + take, 0);
                if memory
                    .read_slice(&mut bytes[start..], descriptor.addr())
                    .is_err()
                {
                    fault = true;
                    break;
                }
            }
            if fault {
                tracing::warn!("vsock: TX descriptor {head} outside guest memory; dropped");
            } else {
                let available = total.saturating_sub(HEADER_SIZE).min(MAX_PAYLOAD as usize);
                match Header::parse_from_guest(&bytes, available, self.guest_cid) {
                    Ok(header) => {
                        let end = HEADER_SIZE + header.len as usize;
                        let payload = bytes.get(HEADER_SIZE..end).unwrap_or(&[]).to_vec();
                        self.on_guest_packet(header, payload);
                    }
                    Err(e) => tracing::warn!("vsock: {e}; dropped"),
                }
            }
            if let Err(e) = queue.add_used(memory, head, 0) {
                tracing::warn!("vsock: returning TX descriptor {head}: {e}");
                break;
            }
            used = true;
        }
        used && queue.needs_notification(memory).unwrap_or(true)
    }

    /// Acts on one packet from the guest.
    fn on_guest_packet(&mut self, header: Header, payload: Vec<u8>) {
        let key = (header.dst_port, header.src_port);
        let Some(entry) = self.entries.get_mut(&key) else {
            match header.op {
                Op::Request => self.guest_connect(&header),
                Op::Rst => {}
                _ => {
                    let rst = self.rst(header.dst_port, header.src_port);
                    self.push_control(rst);
                }
            }
            return;
        };
        match entry.connection.on_guest_packet(&header) {
            Ok(Action::None) => {}
            Ok(Action::Connected) => {
                let local = entry.connection.local_port();
                let mut line = ok_line(local).into_bytes();
                entry.not_guest_data += line.len();
                line.append(&mut entry.to_host);
                entry.to_host = line;
            }
            Ok(Action::Forward(_)) => entry.to_host.extend_from_slice(&payload),
            Ok(Action::SendCreditUpdate) => {
                let update = entry.connection.header(Op::CreditUpdate, 0, 0);
                self.push_control(update);
            }
            Ok(Action::PeerShutdown) => entry.shut_host_write = true,
            Ok(Action::Close { reset_guest }) => {
                let rst = entry.connection.header(Op::Rst, 0, 0);
                self.entries.remove(&key);
                if reset_guest {
                    self.push_control(rst);
                }
            }
            Err(e) => {
                tracing::warn!("{e}; resetting it");
                let rst = entry.connection.header(Op::Rst, 0, 0);
                self.entries.remove(&key);
                self.push_control(rst);
            }
        }
    }

    /// A guest connecting to host port P: `<uds>_<P>` if something listens there.
    fn guest_connect(&mut self, request: &Header) {
        if self.entries.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections already; refusing");
            let rst = self.rst(request.dst_port, request.src_port);
            return self.push_control(rst);
        }
        let target = guest_target(&self.uds, request.dst_port);
        let stream = UnixStream::connect(&target).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match stream {
            Ok(stream) => {
                let mut connection = Connection::guest_initiated(self.guest_cid, request);
                let response = connection.header(Op::Response, 0, 0);
                self.entries.insert(
                    (request.dst_port, request.src_port),
                    Entry {
                        connection,
                        stream,
                        to_host: Vec::new(),
                        to_guest: Vec::new(),
                        host_eof: false,
                        shut_host_write: false,
                        shutdown_sent: false,
                        not_guest_data: 0,
                    },
                );
                self.push_control(response);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {}: {e}", target.display());
                let rst = self.rst(request.dst_port, request.src_port);
                self.push_control(rst);
            }
        }
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_HOST
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the host program sees the connection close
                    }
                    self.pending.push(PendingHost {
                        stream,
                        line: Vec::new(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accepting on {}: {e}", self.uds.display());
                    return;
                }
            }
        }
    }

    /// Reads `CONNECT` lines; a complete one sends the guest a REQUEST.
    fn read_pending_host(&mut self) {
        let mut index = 0;
        while index < self.pending.len() {
            let mut chunk = [0u8; 64];
            let pending = &mut self.pending[index];
            let outcome = match pending.stream.read(&mut chunk) {
                Ok(0) => Err(()),
                Ok(n) => {
                    pending.line.extend_from_slice(&chunk[..n]);
                    match parse_connect(&pending.line) {
                        Ok(ConnectLine::Incomplete) => Ok(None),
                        Ok(ConnectLine::Port { port, consumed }) => Ok(Some((port, consumed))),
                        Err(e) => {
                            tracing::debug!("{e}");
                            Err(())
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    Ok(None)
                }
                Err(_) => Err(()),
            };
            match outcome {
                Ok(None) => index += 1,
                Err(()) => {
                    self.pending.swap_remove(index);
                }
                Ok(Some((port, consumed))) => {
                    let pending = self.pending.swap_remove(index);
                    if self.entries.len() >= MAX_CONNECTIONS {
                        tracing::warn!("vsock: {MAX_CONNECTIONS} connections already; refusing");
                        continue;
                    }
                    let local = self.allocate_port(port);
                    let mut connection = Connection::host_initiated(self.guest_cid, local, port);
                    let request = connection.header(Op::Request, 0, 0);
                    let early = pending.line[consumed..].to_vec();
                    self.entries.insert(
                        (local, port),
                        Entry {
                            connection,
                            stream: pending.stream,
                            to_host: Vec::new(),
                            to_guest: early,
                            host_eof: false,
                            shut_host_write: false,
                            shutdown_sent: false,
                            not_guest_data: 0,
                        },
                    );
                    self.push_control(request);
                }
            }
        }
    }

    fn allocate_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.entries.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    /// Writes guest data to host sockets and reads host data for the guest.
    fn pump_host_sockets(&mut self) {
        let mut closed = Vec::new();
        let mut updates = Vec::new();
        for (key, entry) in self.entries.iter_mut() {
            while !entry.to_host.is_empty() {
                match entry.stream.write(&entry.to_host) {
                    Ok(0) => break,
                    Ok(n) => {
                        entry.to_host.drain(..n);
                        // The OK line is not guest data: only count what the guest sent.
                        let line = n.min(entry.not_guest_data);
                        entry.not_guest_data -= line;
                        let counted = u32::try_from(n - line).unwrap_or(u32::MAX);
                        if entry.connection.record_forwarded(counted) {
                            updates.push(entry.connection.header(Op::CreditUpdate, 0, 0));
                        }
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
                    {
                        break
                    }
                    Err(_) => {
                        closed.push(*key);
                        break;
                    }
                }
            }
            if entry.shut_host_write && entry.to_host.is_empty() {
                let _ = entry.stream.shutdown(std::net::Shutdown::Write);
                entry.shut_host_write = false;
            }
            while !entry.host_eof && entry.to_guest.len() < HOST_READ_AHEAD {
                let mut chunk = vec![0u8; HOST_READ_AHEAD - entry.to_guest.len()];
                match entry.stream.read(&mut chunk) {
                    Ok(0) => {
                        entry.host_eof = true;
                    }
                    Ok(n) => entry.to_guest.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed.push(*key);
                        break;
                    }
                }
            }
        }
        for update in updates {
            self.push_control(update);
        }
        for key in closed {
            if let Some(mut entry) = self.entries.remove(&key) {
                let rst = entry.connection.header(Op::Rst, 0, 0);
                self.push_control(rst);
            }
        }
    }

    /// Whether something waits for an RX buffer.
    fn rx_ready(&self) -> bool {
        !self.control.is_empty()
            || self.entries.values().any(|e| {
                (!e.to_guest.is_empty() && e.connection.tx_credit() > 0) || e.owes_shutdown()
            })
    }

    /// Fills the guest's RX buffers: control packets first, then data within credit.
    fn fill_rx<M: GuestMemory>(&mut self, memory: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        while self.rx_ready() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let buffers: Vec<(vm_memory::GuestAddress, usize)> = chain
                .writable()
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let capacity: usize = buffers
                .iter()
                .map(|(_, l)| *l)
                .fold(0, usize::saturating_add);
            if capacity < HEADER_SIZE {
                tracing::warn!("vsock: RX buffer {head} smaller than a header; returned empty");
                if queue.add_used(memory, head, 0).is_err() {
                    break;
                }
                used = true;
                continue;
            }
            let Some((header, payload)) = self.next_rx_packet(capacity - HEADER_SIZE) else {
                queue.go_to_previous_position();
                break;
            };
            let mut packet = header.to_bytes().to_vec();
            packet.extend_from_slice(&payload);
            let mut written = 0usize;
            for (addr, len) in buffers {
                if written == packet.len() {
                    break;
                }
                let n = len.min(packet.len() - written);
                if memory
                    .write_slice(&packet[written..written + n], addr)
                    .is_err()
                {
                    tracing::warn!("vsock: RX buffer {head} outside guest memory");
                    break;
                }
                written += n;
            }
            if queue.add_used(memory, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(memory).unwrap_or(true)
    }

    /// The next packet for the guest, with at most `room` payload bytes (`rx_ready` said
    /// there is one).
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(header) = self.control.pop_front() {
            return Some((header, Vec::new()));
        }
        for entry in self.entries.values_mut() {
            let credit = entry.connection.tx_credit() as usize;
            if !entry.to_guest.is_empty() && credit > 0 {
                let n = entry
                    .to_guest
                    .len()
                    .min(credit)
                    .min(room)
                    .min(MAX_PAYLOAD as usize);
                let payload: Vec<u8> = entry.to_guest.drain(..n).collect();
                entry.connection.record_sent(n as u32);
                let header = entry.connection.header(Op::Rw, n as u32, 0);
                return Some((header, payload));
            }
            if entry.owes_shutdown() {
                // Tell the guest the host is gone; the connection ends on its RST.
                entry.shutdown_sent = true;
                let header = entry
                    .connection
                    .header(Op::Shutdown, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
                return Some((header, Vec::new()));
            }
        }
        None
    }

    /// Posts the transport reset event if one is owed.
    fn send_reset_event<M: GuestMemory>(&mut self, memory: &M, queue: &mut Queue) -> bool {
        if !self.reset_pending {
            return false;
        }
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            return false;
        };
        let head = chain.head_index();
        let target = chain.writable().find(|d| d.len() >= 4).map(|d| d.addr());
        let mut len = 0;
        if let Some(addr) = target {
            if memory
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), addr)
                .is_ok()
            {
                len = 4;
                self.reset_pending = false;
            }
        }
        if queue.add_used(memory, head, len).is_err() {
            return false;
        }
        queue.needs_notification(memory).unwrap_or(true)
    }
}
