//! One vsock stream connection's state machine and credit flow control (virtio 1.2
//! §5.10.6.3), as pure logic: packets from the guest come in as parsed [`Header`]s, and the
//! answers are [`Action`]s for the device to carry out (send a packet, forward bytes, close).
//!
//! Credit: each side announces its receive buffer (`buf_alloc`) and how much of it it has
//! consumed (`fwd_cnt`); a sender may have at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in
//! flight. The guest is not trusted with it: data beyond the credit the device announced is
//! a violation that resets the connection, and a `fwd_cnt` claiming more than was ever sent
//! grants nothing (the device sends only within `peer_buf_alloc` of what is acknowledged).

use std::num::Wrapping;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer the device announces per connection: how much guest data it holds for
/// a host socket that has not read it yet.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked (REQUEST sent), waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows both ways (unless a direction was shut down).
    Established,
    /// Gone: reset by either side, or both directions shut down.
    Closed,
}

/// What the device should do after a packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing (the packet only updated credit, or was dropped).
    None,
    /// The guest accepted the host's connection: tell the host socket `OK <port>`.
    Connected,
    /// Forward this many payload bytes to the host socket.
    Forward(u32),
    /// Send the guest a CREDIT_UPDATE.
    SendCreditUpdate,
    /// The guest shut down its sending side: the host socket sees end of stream.
    PeerShutdown,
    /// Close the host socket; send the guest an RST when `reset_guest`.
    Close {
        /// Whether the guest must be told with an RST.
        reset_guest: bool,
    },
}

/// Why a packet broke the connection (it is then reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The guest sent more data than the credit the device gave it.
    #[error("vsock {local}<->{peer}: the guest sent {len} bytes with {credit} bytes of credit")]
    CreditExceeded {
        /// The host-side port.
        local: u32,
        /// The guest's port.
        peer: u32,
        /// The payload length.
        len: u32,
        /// The credit left.
        credit: u32,
    },
    /// A packet the connection's state does not allow (data before RESPONSE, a second
    /// REQUEST, data after the guest shut its sending side).
    #[error("vsock {local}<->{peer}: unexpected {op:?} while {state:?}")]
    Unexpected {
        /// The host-side port.
        local: u32,
        /// The guest's port.
        peer: u32,
        /// The operation.
        op: Op,
        /// The state it arrived in.
        state: State,
    },
}

/// One connection between a host-side port and a guest port.
#[derive(Debug, Clone)]
pub struct Connection {
    guest_cid: u64,
    /// The port on the host side (the device's, for the host socket).
    local_port: u32,
    /// The guest's port.
    peer_port: u32,
    state: State,
    /// Shutdown flags the guest sent.
    peer_shutdown: u32,
    /// Guest bytes received, in total.
    rx_cnt: Wrapping<u32>,
    /// Guest bytes the host socket consumed, in total.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last announced to the guest.
    announced_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest, in total.
    tx_cnt: Wrapping<u32>,
    /// The guest's receive buffer.
    peer_buf_alloc: u32,
    /// How much of it the guest consumed, in total.
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    /// A connection the host starts to guest port `peer_port` (the device sends REQUEST).
    pub fn host_initiated(guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self::new(guest_cid, local_port, peer_port, State::Connecting)
    }

    /// A connection the guest asked for with `request` (the device answers RESPONSE once
    /// the host socket `<uds>_<port>` accepted it).
    pub fn guest_initiated(guest_cid: u64, request: &Header) -> Self {
        let mut connection = Self::new(
            guest_cid,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        connection.update_peer_credit(request);
        connection
    }

    fn new(guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            guest_cid,
            local_port,
            peer_port,
            state,
            peer_shutdown: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            announced_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest's port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// Credit the device still gives the guest: free space in its receive buffer.
    pub fn rx_credit(&self) -> u32 {
        let held = (self.rx_cnt - self.fwd_cnt).0;
        HOST_BUF_ALLOC.saturating_sub(held)
    }

    /// How many bytes the device may send the guest now. A `fwd_cnt` from the guest ahead
    /// of what was sent wraps `in_flight` past `peer_buf_alloc`: no credit, not more.
    pub fn tx_credit(&self) -> u32 {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_RCV != 0 {
            return 0;
        }
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, header: &Header) -> Result<Action, ConnectionError> {
        if self.state == State::Closed {
            return Ok(Action::None);
        }
        self.update_peer_credit(header);
        let unexpected = |state| ConnectionError::Unexpected {
            local: self.local_port,
            peer: self.peer_port,
            op: header.op,
            state,
        };
        match (self.state, header.op) {
            (_, Op::Rst) => {
                self.state = State::Closed;
                Ok(Action::Close { reset_guest: false })
            }
            (State::Connecting, Op::Response) => {
                self.state = State::Established;
                Ok(Action::Connected)
            }
            (State::Established, Op::Rw) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return Err(self.fail(unexpected(self.state)));
                }
                let credit = self.rx_credit();
                if header.len > credit {
                    return Err(self.fail(ConnectionError::CreditExceeded {
                        local: self.local_port,
                        peer: self.peer_port,
                        len: header.len,
                        credit,
                    }));
                }
                self.rx_cnt += Wrapping(header.len);
                Ok(Action::Forward(header.len))
            }
            (State::Established, Op::Shutdown) => {
                self.peer_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.state = State::Closed;
                    return Ok(Action::Close { reset_guest: true });
                }
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return Ok(Action::PeerShutdown);
                }
                Ok(Action::None)
            }
            (State::Established, Op::CreditRequest) => Ok(Action::SendCreditUpdate),
            (State::Established, Op::CreditUpdate) => Ok(Action::None),
            (state, _) => Err(self.fail(unexpected(state))),
        }
    }

    /// Closes after a violation; the device resets the guest's side.
    fn fail(&mut self, error: ConnectionError) -> ConnectionError {
        self.state = State::Closed;
        error
    }

    /// Records `len` bytes sent to the guest (at most [`Connection::tx_credit`]).
    pub fn record_sent(&mut self, len: u32) {
        self.tx_cnt += Wrapping(len);
    }

    /// Records `len` guest bytes the host socket consumed; answers whether the guest should
    /// hear of the freed space now (a quarter of the buffer freed since the last update).
    pub fn record_forwarded(&mut self, len: u32) -> bool {
        self.fwd_cnt += Wrapping(len);
        (self.fwd_cnt - self.announced_fwd_cnt).0 >= HOST_BUF_ALLOC / 4
    }

    /// A header from the device to the guest on this connection, carrying the device's
    /// current credit; marks the credit as announced.
    pub fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.announced_fwd_cnt = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            op,
            flags,
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn from_guest(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: 1 << 30,
            len,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established() -> Connection {
        let mut c = Connection::host_initiated(GUEST, 1 << 30, 52);
        assert_eq!(c.tx_credit(), 0, "no credit before the guest answers");
        let response = from_guest(Op::Response, 0, 4096, 0);
        assert_eq!(c.on_guest_packet(&response), Ok(Action::Connected));
        c
    }

    #[test]
    fn connect_send_and_credit() {
        let mut c = established();
        assert_eq!(c.tx_credit(), 4096);
        c.record_sent(4000);
        assert_eq!(c.tx_credit(), 96);
        // The guest consumed 1000 bytes.
        let update = from_guest(Op::CreditUpdate, 0, 4096, 1000);
        assert_eq!(c.on_guest_packet(&update), Ok(Action::None));
        assert_eq!(c.tx_credit(), 1096);
        let data = from_guest(Op::Rw, 100, 4096, 1000);
        assert_eq!(c.on_guest_packet(&data), Ok(Action::Forward(100)));
        assert_eq!(c.rx_credit(), HOST_BUF_ALLOC - 100);
        assert!(!c.record_forwarded(100));
        assert_eq!(c.rx_credit(), HOST_BUF_ALLOC);
        let request = from_guest(Op::CreditRequest, 0, 4096, 1000);
        assert_eq!(c.on_guest_packet(&request), Ok(Action::SendCreditUpdate));
        let h = c.header(Op::CreditUpdate, 0, 0);
        assert_eq!(
            (h.fwd_cnt, h.buf_alloc, h.dst_cid),
            (100, HOST_BUF_ALLOC, GUEST)
        );
    }

    #[test]
    fn data_beyond_credit_resets_the_connection() {
        let mut c = established();
        let mut sent = 0;
        while sent + 65536 <= HOST_BUF_ALLOC {
            let data = from_guest(Op::Rw, 65536, 4096, 0);
            assert_eq!(c.on_guest_packet(&data), Ok(Action::Forward(65536)));
            sent += 65536;
        }
        // The host socket read nothing: the buffer is full.
        let more = from_guest(Op::Rw, 1, 4096, 0);
        assert!(matches!(
            c.on_guest_packet(&more),
            Err(ConnectionError::CreditExceeded { credit: 0, .. })
        ));
        assert_eq!(c.state(), State::Closed);
        // Further packets on a closed connection do nothing.
        assert_eq!(c.on_guest_packet(&more), Ok(Action::None));
    }

    #[test]
    fn a_lying_fwd_cnt_grants_no_extra_credit() {
        let mut c = established();
        c.record_sent(10);
        // The guest claims it consumed far more than it was ever sent.
        let lie = from_guest(Op::CreditUpdate, 0, 4096, 1_000_000);
        c.on_guest_packet(&lie).unwrap();
        assert_eq!(c.tx_credit(), 0);
        // Or a buffer of u32::MAX: credit is still what it announced, minus in flight.
        let big = from_guest(Op::CreditUpdate, 0, u32::MAX, 10);
        c.on_guest_packet(&big).unwrap();
        assert_eq!(c.tx_credit(), u32::MAX);
        // Counters wrap without panicking.
        c.record_sent(u32::MAX);
        c.record_sent(u32::MAX);
        let _ = c.tx_credit();
    }

    #[test]
    fn out_of_state_packets_are_errors() {
        let mut c = Connection::host_initiated(GUEST, 1 << 30, 52);
        let data = from_guest(Op::Rw, 1, 4096, 0);
        assert!(matches!(
            c.on_guest_packet(&data),
            Err(ConnectionError::Unexpected {
                op: Op::Rw,
                state: State::Connecting,
                ..
            })
        ));
        assert_eq!(c.state(), State::Closed);
        let mut c = established();
        let request = from_guest(Op::Request, 0, 4096, 0);
        assert!(c.on_guest_packet(&request).is_err());
    }

    #[test]
    fn shutdown_both_ways_closes() {
        let mut c = established();
        let mut shut = from_guest(Op::Shutdown, 0, 4096, 0);
        shut.flags = SHUTDOWN_SEND;
        assert_eq!(c.on_guest_packet(&shut), Ok(Action::PeerShutdown));
        let data = from_guest(Op::Rw, 1, 4096, 0);
        assert!(
            c.on_guest_packet(&data).is_err(),
            "data after SHUTDOWN_SEND"
        );
        let mut c = established();
        shut.flags = SHUTDOWN_RCV;
        assert_eq!(c.on_guest_packet(&shut), Ok(Action::None));
        assert_eq!(c.tx_credit(), 0, "no data to a side that receives no more");
        shut.flags = SHUTDOWN_SEND | 0xFFFF_FFF0;
        assert_eq!(
            c.on_guest_packet(&shut),
            Ok(Action::Close { reset_guest: true })
        );
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn rst_closes_from_any_state() {
        let mut c = Connection::host_initiated(GUEST, 1, 2);
        let rst = from_guest(Op::Rst, 0, 0, 0);
        assert_eq!(
            c.on_guest_packet(&rst),
            Ok(Action::Close { reset_guest: false })
        );
        assert_eq!(c.state(), State::Closed);
    }
}
