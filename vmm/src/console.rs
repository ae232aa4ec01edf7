//! The serial console as timestamped lines, for programs that drive a guest by what it
//! prints (the demo, benchmarks, tests): a [`LineSink`] to give [`crate::Vmm::start_with_serial`]
//! and the [`Console`] that receives its lines.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmm::config::{BootSource, VmConfig, Workload};
//! let config = VmConfig::new(BootSource::MicroGuest { workload: Workload::Counter, seed: 1 });
//! let (sink, mut console) = vmm::console::channel();
//! let vm = vmm::Vmm::start_with_serial(&config, Box::new(sink))?;
//! let line = console.wait_for(Duration::from_secs(10), |l| l.starts_with("counter "));
//! assert!(line.is_some());
//! vm.stop()?;
//! # Ok::<(), vmm::Error>(())
//! ```

use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Longest line kept whole; a guest that never sends a newline cannot grow the buffer
/// beyond this (the untrusted-input rule): the line is cut here.
const MAX_LINE: usize = 4096;

/// One line the guest printed, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    /// When its newline reached the VMM.
    pub at: Instant,
    /// The text, with invalid UTF-8 replaced and a trailing `\r` removed.
    pub text: String,
}

/// A serial output that cuts the byte stream into [`SerialLine`]s and sends each to the
/// [`Console`] made with it; optionally also copies the raw bytes elsewhere (a log file).
pub struct LineSink {
    partial: Vec<u8>,
    sender: Sender<SerialLine>,
    copy: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for LineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineSink")
            .field("partial", &self.partial.len())
            .field("copy", &self.copy.is_some())
            .finish()
    }
}

impl LineSink {
    /// Also writes every byte to `copy`, as it comes.
    pub fn copy_to(mut self, copy: Box<dyn Write + Send>) -> Self {
        self.copy = Some(copy);
        self
    }

    fn send_line(&mut self) {
        let mut text = String::from_utf8_lossy(&self.partial).into_owned();
        if text.ends_with('\r') {
            text.pop();
        }
        self.partial.clear();
        // The receiver may be gone (the driver stopped listening): the guest goes on.
        let _ = self.sender.send(SerialLine {
            at: Instant::now(),
            text,
        });
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(copy) = &mut self.copy {
            copy.write_all(buf)?;
        }
        for &byte in buf {
            if byte == b'\n' {
                self.send_line();
            } else {
                self.partial.push(byte);
                if self.partial.len() >= MAX_LINE {
                    self.send_line();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.copy {
            Some(copy) => copy.flush(),
            None => Ok(()),
        }
    }
}

/// The receiving end: waits for lines and keeps every line received.
#[derive(Debug)]
pub struct Console {
    receiver: Receiver<SerialLine>,
    lines: Vec<SerialLine>,
}

/// A connected [`LineSink`] and [`Console`].
pub fn channel() -> (LineSink, Console) {
    let (sender, receiver) = mpsc::channel();
    (
        LineSink {
            partial: Vec::new(),
            sender,
            copy: None,
        },
        Console {
            receiver,
            lines: Vec::new(),
        },
    )
}

impl Console {
    /// Waits up to `timeout` for the next line; `None` on timeout or once the VM (and with
    /// it the sink) is gone.
    pub fn next_line(&mut self, timeout: Duration) -> Option<SerialLine> {
        match self.receiver.recv_timeout(timeout) {
            Ok(line) => {
                self.lines.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Waits up to `timeout` for a line for which `wanted` holds, keeping the lines before
    /// it; `None` if none came in time.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Option<SerialLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.next_line(left)?;
            if wanted(&line.text) {
                return Some(line);
            }
        }
    }

    /// Takes in, without waiting, every line already sent.
    pub fn drain(&mut self) {
        while let Ok(line) = self.receiver.try_recv() {
            self.lines.push(line);
        }
    }

    /// Every line received so far, oldest first.
    pub fn lines(&self) -> &[SerialLine] {
        &self.lines
    }

    /// Every line received so far as text, one per line.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for line in &self.lines {
            text.push_str(&line.text);
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_lines_and_copies_bytes() {
        let (sink, mut console) = channel();
        let copy = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut sink = sink.copy_to(Box::new(Shared(copy.clone())));
        sink.write_all(b"one\r\ntw").unwrap();
        sink.write_all(b"o\nthree").unwrap();
        let line = console
            .wait_for(Duration::from_secs(1), |l| l.starts_with("tw"))
            .unwrap();
        assert_eq!(line.text, "two");
        assert_eq!(console.text(), "one\ntwo\n");
        assert_eq!(&*copy.lock(), b"one\r\ntwo\nthree");
        assert!(console.next_line(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn an_endless_line_is_cut() {
        let (mut sink, mut console) = channel();
        sink.write_all(&vec![b'x'; MAX_LINE * 2 + 1]).unwrap();
        drop(sink);
        console.drain();
        assert_eq!(console.lines().len(), 2);
        assert!(console.lines().iter().all(|l| l.text.len() == MAX_LINE));
        assert!(console.next_line(Duration::from_secs(1)).is_none());
    }
}
