//! Rate limiting of block jobs (`set-speed`): a token bucket refilled at the job's speed.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Longest burst a job may send at full speed after idling, so a paused job does not
/// resume with a second's worth of unthrottled I/O.
const MAX_BURST: Duration = Duration::from_millis(100);

/// How long to wait before each chunk of I/O so that a job averages `speed` bytes per
/// second; speed 0 means unlimited.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    speed: u64,
    /// The instant at which every byte accounted so far is "paid for".
    paid_until: Instant,
}

impl Throttle {
    /// A throttle allowing `speed` bytes per second (0: unlimited).
    pub fn new(speed: u64) -> Self {
        Throttle {
            state: Mutex::new(Bucket {
                speed,
                paid_until: Instant::now(),
            }),
        }
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn speed(&self) -> u64 {
        self.state.lock().speed
    }

    /// Changes the limit; takes effect from the next chunk.
    pub fn set_speed(&self, speed: u64) {
        let mut bucket = self.state.lock();
        bucket.speed = speed;
        bucket.paid_until = Instant::now();
    }

    /// Accounts `bytes` about to be copied and returns how long to wait first.
    pub fn delay_for(&self, bytes: u64) -> Duration {
        let mut bucket = self.state.lock();
        let now = Instant::now();
        if bucket.speed == 0 {
            bucket.paid_until = now;
            return Duration::ZERO;
        }
        let earliest = now.checked_sub(MAX_BURST).unwrap_or(now);
        let start = bucket.paid_until.max(earliest);
        let cost = Duration::from_secs_f64(bytes as f64 / bucket.speed as f64);
        bucket.paid_until = start + cost;
        // The chunk goes out once the bytes before it are paid for.
        start.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let t = Throttle::new(0);
        for _ in 0..100 {
            assert_eq!(t.delay_for(1 << 30), Duration::ZERO);
        }
    }

    #[test]
    fn limited_speed_spaces_chunks_out() {
        let t = Throttle::new(1 << 20);
        // A burst is allowed, then every MiB costs a second.
        let mut total = Duration::ZERO;
        for _ in 0..5 {
            total += t.delay_for(1 << 20);
        }
        assert!(total >= Duration::from_secs(5), "{total:?}");
        t.set_speed(0);
        assert_eq!(t.delay_for(1 << 20), Duration::ZERO);
    }
}
