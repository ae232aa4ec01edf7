//! A guest's serial console captured in memory (a `Write` the VMM is handed), and waiting on
//! what it shows.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long [`Console::wait`] waits unless told otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The serial console, captured; clones share the same buffer.
#[derive(Debug, Clone)]
pub struct Console {
    buffer: Arc<Mutex<Vec<u8>>>,
    timeout: Duration,
}

impl Default for Console {
    fn default() -> Console {
        Console::with_timeout(DEFAULT_TIMEOUT)
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// An empty console whose [`Console::wait`] gives up after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Console {
        Console {
            buffer: Arc::default(),
            timeout,
        }
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A writer that panicked mid-append leaves bytes that are still worth showing.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Everything the guest printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// How many bytes the guest printed so far: a mark for [`Console::since`].
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether the guest printed nothing yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the guest printed after `mark` (a [`Console::len`]).
    pub fn since(&self, mark: usize) -> String {
        let bytes = self.bytes();
        String::from_utf8_lossy(bytes.get(mark..).unwrap_or_default()).into_owned()
    }

    /// Waits until `done` holds for the text after `mark`; panics with the whole console,
    /// naming `what`, after the timeout.
    #[track_caller]
    pub fn wait(&self, mark: usize, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + self.timeout;
        while !done(&self.since(mark)) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
