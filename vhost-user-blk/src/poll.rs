//! How long a queue worker watches its ring before sleeping: an adaptive window, as QEMU's
//! event loop sizes its polling (`aio_poll`'s `poll_ns`).
//!
//! Watching the ring after a pass catches a driver whose next request follows its
//! completion closely, and saves the kick's wake-up. But a spin that catches nothing only
//! burns a CPU, and the CPU it burns is often the one the frontend needs to deliver the
//! completion's interrupt (a QEMU-TCG guest, or a host with fewer cores than busy threads).
//! So the window follows the driver: when a kick arrives soon after the worker went to
//! sleep (within [`POLL_MAX`]), a longer window would have caught it, and it doubles; when
//! the ring stays idle for longer than that, watching is wasted, and it halves to nothing.

use std::time::{Duration, Instant};

/// Longest window.
pub const POLL_MAX: Duration = Duration::from_micros(50);
/// The window a worker that does not poll yet starts with when polling would have paid.
pub const POLL_START: Duration = Duration::from_micros(4);

/// One queue worker's polling window.
#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    window: Duration,
    /// When the worker last went to sleep: its ring idle since then.
    slept_at: Option<Instant>,
}

impl Default for PollWindow {
    fn default() -> Self {
        PollWindow {
            window: POLL_MAX,
            slept_at: None,
        }
    }
}

impl PollWindow {
    /// How long to watch the ring now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The worker was woken by a kick at `now`: resizes the window on how long the ring
    /// stayed idle.
    pub fn woken(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        // The ring went idle when the window began, not when it ended.
        let idle = now.saturating_duration_since(slept_at) + self.window;
        if idle <= POLL_MAX {
            self.window = if self.window < POLL_START {
                POLL_START
            } else {
                (self.window * 2).min(POLL_MAX)
            };
        } else {
            self.window /= 2;
            if self.window < POLL_START {
                self.window = Duration::ZERO;
            }
        }
    }

    /// The window passed with no request at `now`: the worker sleeps until the next kick.
    pub fn sleeping(&mut self, now: Instant) {
        self.slept_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_slower_than_the_window_turns_polling_off() {
        let mut poll = PollWindow::default();
        let mut now = Instant::now();
        assert_eq!(poll.window(), POLL_MAX);
        for _ in 0..8 {
            poll.sleeping(now);
            now += Duration::from_millis(2);
            poll.woken(now);
        }
        assert_eq!(poll.window(), Duration::ZERO);
    }

    #[test]
    fn a_driver_that_comes_back_quickly_grows_it_again_to_the_maximum() {
        let mut poll = PollWindow::default();
        let mut now = Instant::now();
        for _ in 0..8 {
            poll.sleeping(now);
            now += Duration::from_millis(2);
            poll.woken(now);
        }
        let mut sizes = Vec::new();
        for _ in 0..5 {
            poll.sleeping(now);
            now += Duration::from_micros(1);
            poll.woken(now);
            sizes.push(poll.window().as_micros());
        }
        assert_eq!(sizes, [4, 8, 16, 32, 50]);
    }

    #[test]
    fn a_wake_up_without_a_sleep_changes_nothing() {
        let mut poll = PollWindow::default();
        poll.woken(Instant::now());
        assert_eq!(poll.window(), POLL_MAX);
    }
}
