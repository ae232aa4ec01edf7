//! The requests in flight on one top of a live disk: how many, and which byte ranges the
//! writing ones change.
//!
//! A quiesce waits here for the count to reach zero. A switch that does not drain
//! ([`super::LiveDisk::switch_all`]) leaves the requests of the old top running and hands
//! their [`InFlight`] to the disk's former tops; a new write then waits only for the former
//! writes it overlaps (see [`InFlight::wait_clear_of`]), and sealing the old top waits for
//! all of them.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

/// Source of [`InFlight::generation`].
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// The requests in flight on one top. Entered under the disk's state lock (so a switch or a
/// quiesce, which take that lock exclusively, sees every request that will use the top),
/// left when the request ends.
#[derive(Debug)]
pub(super) struct InFlight {
    /// Increases with every flight made: a request waits only for flights older than its
    /// own, never for itself or for requests that may wait for it.
    generation: u64,
    state: Mutex<Flights>,
    /// Notified when a request leaves while someone waits.
    left: Condvar,
}

#[derive(Debug, Default)]
struct Flights {
    /// Requests in flight, reads and flushes included.
    count: usize,
    /// The ranges writes in flight change, `(ticket, start, end)`: at most one per request
    /// in flight, so a short list (a device's queue depth).
    writes: Vec<(u64, u64, u64)>,
    next_ticket: u64,
    /// Threads waiting in [`InFlight::wait_idle`] or [`InFlight::wait_clear_of`]; leaving
    /// requests notify only when there are any.
    waiters: usize,
}

/// One request's place in an [`InFlight`]; give it back with [`InFlight::leave`].
#[derive(Debug)]
pub(super) struct Ticket(Option<u64>);

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            state: Mutex::default(),
            left: Condvar::new(),
        }
    }
}

impl InFlight {
    /// Whether this flight was made before `other`.
    pub(super) fn is_older_than(&self, other: &InFlight) -> bool {
        self.generation < other.generation
    }

    /// Counts a request in; `changes` is the byte range `start..end` it may change
    /// (writes, zeroes, discards), `None` for reads and flushes.
    pub(super) fn enter(&self, changes: Option<(u64, u64)>) -> Ticket {
        let mut state = self.state.lock();
        state.count += 1;
        Ticket(changes.map(|(start, end)| {
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.writes.push((ticket, start, end));
            ticket
        }))
    }

    /// Counts a request out.
    pub(super) fn leave(&self, ticket: Ticket) {
        let mut state = self.state.lock();
        state.count -= 1;
        if let Some(ticket) = ticket.0 {
            if let Some(at) = state.writes.iter().position(|w| w.0 == ticket) {
                state.writes.swap_remove(at);
            }
        }
        if state.waiters > 0 {
            self.left.notify_all();
        }
    }

    /// Whether no request is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.state.lock().count == 0
    }

    /// Waits until no request is in flight.
    pub(super) fn wait_idle(&self) {
        self.wait_until(|state| state.count == 0);
    }

    /// Waits until no write in flight changes a byte of `start..end`. Returns whether it
    /// had to wait.
    pub(super) fn wait_clear_of(&self, start: u64, end: u64) -> bool {
        self.wait_until(|state| !state.writes.iter().any(|&(_, s, e)| s < end && start < e))
    }

    /// Waits until `done` holds; returns whether it did not at first.
    fn wait_until(&self, done: impl Fn(&Flights) -> bool) -> bool {
        let mut state = self.state.lock();
        if done(&state) {
            return false;
        }
        state.waiters += 1;
        while !done(&state) {
            self.left.wait(&mut state);
        }
        state.waiters -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn overlap_waits_only_for_the_writes_it_touches() {
        let flight = Arc::new(InFlight::default());
        let read = flight.enter(None);
        let write = flight.enter(Some((4096, 8192)));
        assert!(!flight.wait_clear_of(0, 4096), "adjacent, not overlapping");
        assert!(!flight.wait_clear_of(8192, 9000));
        let waiter = std::thread::spawn({
            let flight = flight.clone();
            move || flight.wait_clear_of(0, 65536)
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "an overlapping write did not wait");
        flight.leave(write);
        assert!(waiter.join().unwrap(), "reports that it waited");
        assert!(!flight.is_idle(), "the read is still in flight");
        let idle = std::thread::spawn({
            let flight = flight.clone();
            move || flight.wait_idle()
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!idle.is_finished());
        flight.leave(read);
        idle.join().unwrap();
        assert!(flight.is_idle());
    }
}
