//! The host side's text protocol, as Firecracker's vsock device speaks it on its Unix
//! socket: a host program connects to `uds`, writes `CONNECT <port>\n` and, once the guest
//! accepted, reads `OK <host port>\n` before the stream's bytes; a guest connecting to port
//! P reaches the host program listening on `<uds>_<P>`.
//!
//! The host program is trusted more than the guest, but its line is still bounded: a
//! connection whose first line is longer than [`MAX_CONNECT_LINE`] or not a `CONNECT` is
//! dropped.

use std::path::{Path, PathBuf};

/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;

/// Why a host connection's first line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLineError {
    /// No newline within [`MAX_CONNECT_LINE`] bytes.
    #[error("vsock host socket: no CONNECT line within {MAX_CONNECT_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("vsock host socket: expected \"CONNECT <port>\", got {0:?}")]
    Malformed(String),
}

/// What the bytes read so far on a new host connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectLine {
    /// Not a whole line yet: read more.
    Incomplete,
    /// The guest port asked for, and how many bytes the line took (what follows is the
    /// stream's data).
    Port {
        /// The guest port.
        port: u32,
        /// Bytes of the line, newline included.
        consumed: usize,
    },
}

/// Parses the first line of a host connection from the bytes read so far.
pub fn parse_connect(bytes: &[u8]) -> Result<ConnectLine, ConnectLineError> {
    let Some(end) = bytes
        .iter()
        .take(MAX_CONNECT_LINE)
        .position(|&b| b == b'\n')
    else {
        if bytes.len() >= MAX_CONNECT_LINE {
            return Err(ConnectLineError::TooLong);
        }
        return Ok(ConnectLine::Incomplete);
    };
    let line = &bytes[..end];
    let text = std::str::from_utf8(line)
        .map_err(|_| ConnectLineError::Malformed(String::from_utf8_lossy(line).into_owned()))?;
    let port = text
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok())
        .ok_or_else(|| ConnectLineError::Malformed(text.to_string()))?;
    Ok(ConnectLine::Port {
        port,
        consumed: end + 1,
    })
}

/// The answer once the guest accepted: `OK <host port>\n`.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// Where a guest connection to `port` goes: `<uds>_<port>`.
pub fn guest_target(uds: &Path, port: u32) -> PathBuf {
    let mut name = uds.as_os_str().to_os_string();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b""), Ok(ConnectLine::Incomplete));
        assert_eq!(parse_connect(b"CONNECT 5"), Ok(ConnectLine::Incomplete));
        assert_eq!(
            parse_connect(b"CONNECT 52\n{\"execute\""),
            Ok(ConnectLine::Port {
                port: 52,
                consumed: 11
            })
        );
        assert!(matches!(
            parse_connect(b"CONNECT x\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect(b"CONNECT 99999999999\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect(b"HELLO 1\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect(b"\xff\xfe\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert_eq!(parse_connect(&[b'C'; 100]), Err(ConnectLineError::TooLong));
        assert_eq!(ok_line(1073741824), "OK 1073741824\n");
        assert_eq!(
            guest_target(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }
}
