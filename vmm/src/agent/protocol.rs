//! The qemu-ga wire protocol, the subset the VMM uses: one JSON object per line each way,
//! `guest-sync-delimited` to find the start of the agent's next answer in a stream that may
//! still hold stale bytes (a reply to a request whose caller timed out, a previous client's
//! leftovers), then one command and one answer at a time.
//!
//! The agent runs in the guest and is not trusted: every read has a deadline, a line longer
//! than [`MAX_LINE`] is garbage, bytes skipped while looking for the sync delimiter are
//! bounded, and an answer that does not parse is an error, never a panic.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::AgentFailure;

/// Longest answer line accepted (qemu-ga's answers to these commands are a few dozen bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// Most bytes skipped while looking for the 0xFF that starts a `guest-sync-delimited` answer.
pub const MAX_SKIP: usize = 1024 * 1024;
/// The byte qemu-ga puts before its answer to `guest-sync-delimited`, and that a client sends
/// first to reset the agent's JSON parser (it is never valid in JSON text).
pub const DELIMITER: u8 = 0xFF;

/// A byte stream to an agent whose reads can be given a timeout.
pub trait Transport: Read + Write + Send {
    /// Makes each read return `WouldBlock`/`TimedOut` after `timeout` without data.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// Makes each write fail after `timeout` without progress.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

/// One request: `{"execute": NAME, "arguments": {...}}`.
#[derive(Debug, Serialize)]
struct Request<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<A>,
}

/// The arguments of `guest-sync-delimited`.
#[derive(Debug, Serialize)]
struct SyncArguments {
    id: u64,
}

/// An error the agent answered with.
#[derive(Debug, Deserialize)]
struct AgentErrorBody {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// One answer: `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Deserialize)]
struct Response {
    #[serde(rename = "return")]
    value: Option<serde_json::Value>,
    error: Option<AgentErrorBody>,
}

/// What `guest-fsfreeze-status` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// Every filesystem is writable.
    Thawed,
    /// The filesystems are frozen.
    Frozen,
}

/// A protocol session with an agent over `S`: commands, one at a time, each with a deadline.
#[derive(Debug)]
pub struct AgentClient<S: Transport> {
    stream: S,
    /// Bytes read past the end of the last answer.
    pending: Vec<u8>,
    /// The next `guest-sync-delimited` id.
    next_id: u64,
}

impl<S: Transport> AgentClient<S> {
    /// A session over `stream`; call [`AgentClient::sync`] before the first command.
    pub fn new(stream: S) -> Self {
        // Ids differ between sessions, so an answer to an earlier session's sync (still in
        // the channel) is never taken for this one's.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        AgentClient {
            stream,
            pending: Vec::new(),
            next_id: (seed ^ u64::from(std::process::id())) & 0x7fff_ffff_ffff,
        }
    }

    /// Resets the agent's parser and skips everything the channel still holds, up to the
    /// answer to a fresh `guest-sync-delimited`.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), AgentFailure> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & 0x7fff_ffff_ffff;
        self.pending.clear();
        let mut bytes = vec![DELIMITER];
        bytes.extend(encode(&Request {
            execute: "guest-sync-delimited",
            arguments: Some(SyncArguments { id }),
        })?);
        self.write_all(&bytes, deadline)?;
        // Answers to the parser reset and stale ones come first: skip to the delimiter, then
        // to the answer carrying our id (a stale delimited answer carries another).
        let mut skipped = 0usize;
        loop {
            self.skip_to_delimiter(deadline, &mut skipped)?;
            let line = self.read_line(deadline)?;
            let value: serde_json::Value = match parse_response(&line, "guest-sync-delimited") {
                Ok(value) => value,
                Err(AgentFailure::Protocol(_)) | Err(AgentFailure::Command { .. }) => continue,
                Err(other) => return Err(other),
            };
            if value.as_u64() == Some(id) {
                return Ok(());
            }
        }
    }

    /// `guest-ping`: whether the agent answers at all.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), AgentFailure> {
        self.execute::<serde_json::Value>("guest-ping", timeout)
            .map(drop)
    }

    /// `guest-fsfreeze-freeze`: freezes the guest's filesystems; answers how many.
    pub fn freeze(&mut self, timeout: Duration) -> Result<u64, AgentFailure> {
        self.execute("guest-fsfreeze-freeze", timeout)
    }

    /// `guest-fsfreeze-thaw`: thaws them; answers how many were frozen.
    pub fn thaw(&mut self, timeout: Duration) -> Result<u64, AgentFailure> {
        self.execute("guest-fsfreeze-thaw", timeout)
    }

    /// `guest-fsfreeze-status`.
    pub fn status(&mut self, timeout: Duration) -> Result<FreezeStatus, AgentFailure> {
        self.execute("guest-fsfreeze-status", timeout)
    }

    /// Sends command `name` (no arguments) and reads its answer as a `T`.
    pub fn execute<T: DeserializeOwned>(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<T, AgentFailure> {
        let deadline = Instant::now() + timeout;
        let bytes = encode(&Request::<()> {
            execute: name,
            arguments: None,
        })?;
        self.write_all(&bytes, deadline)?;
        loop {
            let line = self.read_line(deadline)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let value = parse_response(&line, name)?;
            return serde_json::from_value(value).map_err(|e| {
                AgentFailure::Protocol(format!(
                    "answer to {name} is not what it should be: {e}: {}",
                    printable(&line)
                ))
            });
        }
    }

    fn write_all(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), AgentFailure> {
        let left = remaining(deadline).ok_or(AgentFailure::Timeout)?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(AgentFailure::io("setting a write timeout"))?;
        self.stream.write_all(bytes).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => AgentFailure::Timeout,
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => AgentFailure::Closed,
            _ => AgentFailure::Io {
                what: "writing a request",
                message: e.to_string(),
            },
        })?;
        self.stream
            .flush()
            .map_err(AgentFailure::io("flushing a request"))
    }

    /// Reads more bytes into `pending`; an end of stream is an error (the agent went away).
    fn fill(&mut self, deadline: Instant) -> Result<(), AgentFailure> {
        let left = remaining(deadline).ok_or(AgentFailure::Timeout)?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(AgentFailure::io("setting a read timeout"))?;
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(AgentFailure::Closed),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(AgentFailure::Timeout)
                }
                Err(e) => {
                    return Err(AgentFailure::Io {
                        what: "reading an answer",
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    /// Drops bytes up to and including the next delimiter.
    fn skip_to_delimiter(
        &mut self,
        deadline: Instant,
        skipped: &mut usize,
    ) -> Result<(), AgentFailure> {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == DELIMITER) {
                *skipped += at;
                self.pending.drain(..=at);
                break;
            }
            *skipped += self.pending.len();
            self.pending.clear();
            if *skipped > MAX_SKIP {
                return Err(AgentFailure::Protocol(format!(
                    "more than {MAX_SKIP} bytes before the answer to guest-sync-delimited"
                )));
            }
            self.fill(deadline)?;
        }
        if *skipped > MAX_SKIP {
            return Err(AgentFailure::Protocol(format!(
                "more than {MAX_SKIP} bytes before the answer to guest-sync-delimited"
            )));
        }
        Ok(())
    }

    /// The next line, without its newline.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, AgentFailure> {
        let mut searched = 0;
        loop {
            if let Some(at) = self.pending[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + at;
                if end > MAX_LINE {
                    return Err(AgentFailure::Protocol(format!(
                        "an answer line longer than {MAX_LINE} bytes"
                    )));
                }
                let line = self.pending[..end].to_vec();
                self.pending.drain(..=end);
                return Ok(line);
            }
            searched = self.pending.len();
            if searched > MAX_LINE {
                return Err(AgentFailure::Protocol(format!(
                    "an answer line longer than {MAX_LINE} bytes"
                )));
            }
            self.fill(deadline)?;
        }
    }
}

/// How long until `deadline`, or None once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then_some(left)
}

fn encode(request: &impl Serialize) -> Result<Vec<u8>, AgentFailure> {
    let mut bytes = serde_json::to_vec(request)
        .map_err(|e| AgentFailure::Protocol(format!("encoding a request: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The value of answer `line` to command `name`, or the error it carries.
fn parse_response(line: &[u8], name: &str) -> Result<serde_json::Value, AgentFailure> {
    let response: Response = serde_json::from_slice(line).map_err(|e| {
        AgentFailure::Protocol(format!(
            "answer to {name} is not JSON: {e}: {}",
            printable(line)
        ))
    })?;
    match (response.value, response.error) {
        (_, Some(error)) => Err(AgentFailure::Command {
            command: name.to_string(),
            class: error.class,
            desc: error.desc,
        }),
        (Some(value), None) => Ok(value),
        (None, None) => Err(AgentFailure::Protocol(format!(
            "answer to {name} has neither \"return\" nor \"error\": {}",
            printable(line)
        ))),
    }
}

/// At most 120 characters of `line`, for error messages.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(120)]);
    let mut text: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if line.len() > 120 {
        text.push_str("...");
    }
    text
}
