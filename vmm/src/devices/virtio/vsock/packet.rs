//! virtio-vsock packet headers (virtio 1.2 §5.10.6): parsing what the guest posts on its TX
//! queue, every field checked before anything acts on it, and building the headers the
//! device sends on the RX queue.
//!
//! The guest is not trusted: a header shorter than 44 bytes, an unknown type or operation,
//! addresses that are not (guest CID -> host), a payload longer than [`MAX_PAYLOAD`] or than
//! the buffers that carry it, or a payload on an operation that takes none, is a
//! [`PacketError`] naming the field, never a panic.

/// Size of the header on the wire.
pub const HEADER_SIZE: usize = 44;
/// Largest payload accepted in one packet (Linux's default receive buffer per packet is
/// 64 KiB, as Firecracker's limit).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// The only socket type served: a connection-oriented stream.
pub const TYPE_STREAM: u16 = 1;
/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The event that tells the guest every connection is gone (after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// What a packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connect.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Refuse or abort a connection.
    Rst = 3,
    /// Close one or both directions (`flags`).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's buffer space changed.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    fn from_wire(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// The operation.
    pub op: Op,
    /// Operation flags (shutdown directions).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, in total (wrapping).
    pub fwd_cnt: u32,
}

/// Why a packet from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The buffers hold fewer bytes than a header.
    #[error("vsock packet: header needs {HEADER_SIZE} bytes, the buffers hold {0}")]
    ShortHeader(usize),
    /// The `type` field is not a stream.
    #[error("vsock packet: type {0} is not a stream (1)")]
    BadType(u16),
    /// The `op` field is unknown.
    #[error("vsock packet: unknown op {0}")]
    BadOp(u16),
    /// The source CID is not the guest's.
    #[error("vsock packet: src_cid {found} is not the guest's CID {expected}")]
    BadSource {
        /// The guest's CID.
        expected: u64,
        /// What the header said.
        found: u64,
    },
    /// The destination is not the host.
    #[error("vsock packet: dst_cid {0} is not the host (2)")]
    BadDestination(u64),
    /// The `len` field is larger than the device accepts.
    #[error("vsock packet: len {0} exceeds {MAX_PAYLOAD}")]
    TooLong(u32),
    /// The `len` field is larger than the buffers that follow the header.
    #[error("vsock packet: len {len} but the buffers carry {available} payload bytes")]
    Truncated {
        /// The `len` field.
        len: u32,
        /// Payload bytes available.
        available: usize,
    },
    /// An operation other than RW carries a payload.
    #[error("vsock packet: op {op:?} carries {len} payload bytes")]
    UnexpectedPayload {
        /// The operation.
        op: Op,
        /// The `len` field.
        len: u32,
    },
}

fn u16_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl Header {
    /// Parses the header of a packet the guest with CID `guest_cid` posted: `bytes` holds at
    /// least the header (more is ignored), and `payload_available` is how many bytes the
    /// buffers carry after it.
    pub fn parse_from_guest(
        bytes: &[u8],
        payload_available: usize,
        guest_cid: u64,
    ) -> Result<Header, PacketError> {
        let raw: &[u8; HEADER_SIZE] = bytes
            .get(..HEADER_SIZE)
            .and_then(|b| b.try_into().ok())
            .ok_or(PacketError::ShortHeader(bytes.len()))?;
        let kind = u16_at(raw, 28);
        if kind != TYPE_STREAM {
            return Err(PacketError::BadType(kind));
        }
        let op = u16_at(raw, 30);
        let op = Op::from_wire(op).ok_or(PacketError::BadOp(op))?;
        let header = Header {
            src_cid: u64_at(raw, 0),
            dst_cid: u64_at(raw, 8),
            src_port: u32_at(raw, 16),
            dst_port: u32_at(raw, 20),
            len: u32_at(raw, 24),
            op,
            flags: u32_at(raw, 32),
            buf_alloc: u32_at(raw, 36),
            fwd_cnt: u32_at(raw, 40),
        };
        if header.src_cid != guest_cid {
            return Err(PacketError::BadSource {
                expected: guest_cid,
                found: header.src_cid,
            });
        }
        if header.dst_cid != HOST_CID {
            return Err(PacketError::BadDestination(header.dst_cid));
        }
        if header.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong(header.len));
        }
        if op != Op::Rw && header.len != 0 {
            return Err(PacketError::UnexpectedPayload {
                op,
                len: header.len,
            });
        }
        if header.len as usize > payload_available {
            return Err(PacketError::Truncated {
                len: header.len,
                available: payload_available,
            });
        }
        Ok(header)
    }

    /// The header as the device sends it.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        out[30..32].copy_from_slice(&(self.op as u16).to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GUEST: u64 = 3;

    fn header(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            len,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn round_trips() {
        for op in [
            Op::Request,
            Op::Response,
            Op::Rst,
            Op::Shutdown,
            Op::CreditUpdate,
        ] {
            let h = header(op, 0);
            assert_eq!(Header::parse_from_guest(&h.to_bytes(), 0, GUEST), Ok(h));
        }
        let h = header(Op::Rw, 100);
        assert_eq!(Header::parse_from_guest(&h.to_bytes(), 100, GUEST), Ok(h));
    }

    #[test]
    fn hostile_headers_are_refused_by_field() {
        let good = header(Op::Rw, 10).to_bytes();
        let parse = |b: &[u8], avail| Header::parse_from_guest(b, avail, GUEST);
        assert_eq!(parse(&good[..43], 10), Err(PacketError::ShortHeader(43)));
        assert_eq!(parse(&[], 10), Err(PacketError::ShortHeader(0)));
        let mut b = good;
        b[28] = 2; // seqpacket
        assert_eq!(parse(&b, 10), Err(PacketError::BadType(2)));
        let mut b = good;
        b[30] = 0;
        assert_eq!(parse(&b, 10), Err(PacketError::BadOp(0)));
        b[30] = 0xFF;
        b[31] = 0xFF;
        assert_eq!(parse(&b, 10), Err(PacketError::BadOp(0xFFFF)));
        let mut b = good;
        b[0] = 9;
        assert!(matches!(
            parse(&b, 10),
            Err(PacketError::BadSource { found: 9, .. })
        ));
        let mut b = good;
        b[8] = 1;
        assert_eq!(parse(&b, 10), Err(PacketError::BadDestination(1)));
        let huge = header(Op::Rw, u32::MAX).to_bytes();
        assert_eq!(
            parse(&huge, usize::MAX),
            Err(PacketError::TooLong(u32::MAX))
        );
        let over = header(Op::Rw, MAX_PAYLOAD + 1).to_bytes();
        assert!(matches!(
            parse(&over, usize::MAX),
            Err(PacketError::TooLong(_))
        ));
        assert_eq!(
            parse(&good, 9),
            Err(PacketError::Truncated {
                len: 10,
                available: 9
            })
        );
        let request_with_data = header(Op::Request, 4).to_bytes();
        assert!(matches!(
            parse(&request_with_data, 4),
            Err(PacketError::UnexpectedPayload {
                op: Op::Request,
                len: 4
            })
        ));
    }

    proptest! {
        /// Any bytes, any claimed payload: an answer, never a panic; an accepted header
        /// never claims more payload than is there or than the limit.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            available in 0usize..200_000,
        ) {
            if let Ok(h) = Header::parse_from_guest(&bytes, available, GUEST) {
                prop_assert!(h.len as usize <= available && h.len <= MAX_PAYLOAD);
                prop_assert_eq!(h.src_cid, GUEST);
                prop_assert_eq!(h.dst_cid, HOST_CID);
            }
        }
    }
}
