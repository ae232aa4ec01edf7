//! The live disk: the handle a virtual device does I/O through, whose image chain can be
//! re-pointed while requests are in flight.
//!
//! A [`LiveDisk`] owns the current top of a chain. Every request takes a reference to the
//! disk's current view (top, dirty bitmap, copy-on-read) and is counted in that view's
//! flight until it ends (`flight`); it holds no lock while its I/O runs.
//! [`LiveDisk::quiesce`] holds new requests back, waits for the ones in flight to drain and
//! keeps the disk that way until the guard is dropped. [`LiveDisk::quiesce_all`] does that
//! for a set of disks as one hold: new requests stop on every disk before the drain of any
//! begins. [`LiveDisk::switch_all`] switches a set of disks to new tops without a drain.
//! What happens under the guard (flush, swap the top, install a dirty bitmap) is therefore
//! atomic with respect to the guest, and the stall it causes depends on the requests in
//! flight and the metadata to flush, not on the size of the disk or of its caches.
//!
//! Block jobs (stream, commit, external snapshots, all in the `snapshot` crate) work on the
//! layers themselves, never through the live disk's lock, and hook into the request path in
//! two ways only: a [`DirtyBitmap`] that records guest writes (active commit mirrors them),
//! and [`CopyOnRead`], which makes guest reads populate the top layer (stream).
//!
//! ```
//! use std::sync::Arc;
//! use storage::live::LiveDisk;
//! use storage::qcow2::{create, CreateOptions};
//! # fn main() -> storage::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("live-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("disk.qcow2");
//! create(&path, &CreateOptions { size: Some(1 << 20), ..Default::default() })?;
//! let top = storage::open(&path, &storage::OpenOptions::default())?;
//! let disk = LiveDisk::new("vda", top);
//! disk.write_at(b"hello", 0)?;
//! disk.flush()?;
//! let mut back = [0u8; 5];
//! disk.read_at(&mut back, 0)?;
//! assert_eq!(&back, b"hello");
//! # drop(disk); std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock, RwLockWriteGuard};

use crate::device::{Allocation, BlockDevice};
use crate::error::{Error, Result};
use crate::qcow2::Fill;

mod bitmap;
mod flight;

pub use bitmap::DirtyBitmap;
use flight::{InFlight, Ticket};

/// Source of [`LiveDisk::id`]: locks of a disk set are taken in id order, never deadlocking.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Guest reads populate the top layer with what they read from layers above `base_depth`
/// (QEMU's copy-on-read filter with a base): a stream job's companion, so that data the
/// guest touches is copied once instead of read through the chain again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOnRead {
    /// Depth (counting the top as 0) of the first layer whose data is *not* copied up:
    /// the stream's base, or the chain length to copy everything.
    pub base_depth: u32,
}

/// What the request path consults: a request takes a reference to the current view and
/// runs against it to its end. Replaced (never changed in place) under the disk's state
/// lock, by a quiesce or a switch.
#[derive(Clone)]
struct View {
    top: Arc<dyn BlockDevice>,
    dirty: Option<Arc<DirtyBitmap>>,
    copy_on_read: Option<CopyOnRead>,
    /// The requests running against `top`.
    flight: Arc<InFlight>,
}

/// A disk as a virtual device sees it: one chain, whose top can be swapped while the guest
/// runs. See the [module documentation](self).
pub struct LiveDisk {
    id: u64,
    name: String,
    size: u64,
    /// Held shared only to take a reference to the view and enter its flight, exclusively
    /// to replace the view: requests do not hold it while their I/O runs.
    state: RwLock<Arc<View>>,
    /// The job or operation that owns the disk's chain right now ("stream", "commit", ...).
    owner: Mutex<Option<&'static str>>,
    /// Former tops switched away from but maybe not yet flushed: a guest flush must cover
    /// the writes it made before the switch too. See [`Quiesced::retire`].
    retired: Mutex<Vec<Arc<dyn BlockDevice>>>,
    /// The requests still running on tops a [`LiveDisk::switch_all`] switched away from
    /// without draining them; new writes wait for those they overlap.
    former: Mutex<Vec<Arc<InFlight>>>,
    /// Whether `former` may be non-empty: the request path's one-load fast check.
    has_former: AtomicBool,
    /// New writes that waited for an overlapping write on a former top.
    overlap_waits: AtomicU64,
    /// Holds new requests back from the moment a quiesce begins, before its drain.
    gate: Gate,
}

/// The door in front of a disk's requests. A quiesce closes it first and only then waits for
/// the requests in flight: [`LiveDisk::quiesce_all`] closes every disk's gate before it drains
/// any, so the requests it waits for are the few in flight at that instant, drained side by
/// side, instead of requests a writer keeps starting on the disks not yet locked (a guest
/// writing its disks in turn stays one step ahead of a lock-one-disk-after-the-other drain).
/// The request path pays one atomic load while the gate is open.
struct Gate {
    /// How many quiesces hold the gate closed (disk sets may overlap).
    closed: AtomicU32,
    lock: Mutex<()>,
    opened: Condvar,
}

impl Gate {
    fn new() -> Self {
        Gate {
            closed: AtomicU32::new(0),
            lock: Mutex::new(()),
            opened: Condvar::new(),
        }
    }

    /// Closes the gate until the returned guard drops.
    fn close(&self) -> ClosedGate<'_> {
        self.closed.fetch_add(1, Ordering::SeqCst);
        ClosedGate(self)
    }

    /// Returns at once while the gate is open, else when it opens.
    fn pass(&self) {
        if self.closed.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut held = self.lock.lock();
        // Checked under the mutex the opener notifies under: no wake-up is lost.
        while self.closed.load(Ordering::SeqCst) != 0 {
            self.opened.wait(&mut held);
        }
    }
}

/// A closed [`Gate`]; dropping it opens the gate (unless another quiesce holds it too).
struct ClosedGate<'a>(&'a Gate);

impl Drop for ClosedGate<'_> {
    fn drop(&mut self) {
        if self.0.closed.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _held = self.0.lock.lock();
            self.0.opened.notify_all();
        }
    }
}

impl std::fmt::Debug for LiveDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveDisk")
            .field("name", &self.name)
            .field("top", &self.top().path())
            .finish_non_exhaustive()
    }
}

impl LiveDisk {
    /// Wraps the open chain `top` (usually from [`crate::open()`]) as live disk `name`.
    pub fn new(name: impl Into<String>, top: Arc<dyn BlockDevice>) -> Arc<Self> {
        Arc::new(LiveDisk {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            size: top.size(),
            state: RwLock::new(Arc::new(View {
                top,
                dirty: None,
                copy_on_read: None,
                flight: Arc::default(),
            })),
            owner: Mutex::new(None),
            retired: Mutex::new(Vec::new()),
            former: Mutex::new(Vec::new()),
            has_former: AtomicBool::new(false),
            overlap_waits: AtomicU64::new(0),
            gate: Gate::new(),
        })
    }

    /// The name given at creation ("vda"), used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A process-unique number; disk sets are locked in this order.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The virtual size in bytes; every top the disk is switched to has this size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The current top of the chain. Jobs work on it directly, outside the disk's lock.
    pub fn top(&self) -> Arc<dyn BlockDevice> {
        self.state.read().top.clone()
    }

    /// Fills `buf` from guest offset `offset`, populating the top when copy-on-read is on.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let state = self.request(None);
        state.top.read_at(buf, offset)?;
        if let Some(cor) = state.copy_on_read {
            copy_up(&*state.top, cor, buf, offset);
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset` into the top.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let state = self.request(Some((offset, buf.len() as u64)));
        let result = state.top.write_at(buf, offset);
        // Marked after the write, even a failed one: a mirror must copy the range again
        // after any change it could have missed.
        if let Some(dirty) = &state.dirty {
            dirty.mark(offset, buf.len() as u64);
        }
        result
    }

    /// Makes a range read as zeroes (see [`BlockDevice::write_zeroes`]).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let state = self.request(Some((offset, len)));
        let result = state.top.write_zeroes(offset, len);
        if let Some(dirty) = &state.dirty {
            dirty.mark(offset, len);
        }
        result
    }

    /// Discards a range (see [`BlockDevice::discard`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let state = self.request(Some((offset, len)));
        let result = state.top.discard(offset, len);
        if let Some(dirty) = &state.dirty {
            dirty.mark(offset, len);
        }
        result
    }

    /// A durability barrier (see [`BlockDevice::flush`]) on the current top, and on former
    /// tops still holding writes made before a switch.
    pub fn flush(&self) -> Result<()> {
        let state = self.request(None);
        let retired: Vec<_> = self.retired.lock().clone();
        for old in &retired {
            old.flush()?;
        }
        state.top.flush()
    }

    /// The view a request runs against, counted in its flight until the request ends: past
    /// the gate, and for a request that changes `(offset, len)`, past the writes still in
    /// flight on former tops that change the same clusters (see [`LiveDisk::switch_all`]).
    fn request(&self, changes: Option<(u64, u64)>) -> Request {
        self.gate.pass();
        let changes = changes.map(|(offset, len)| (offset, offset.saturating_add(len)));
        let request = {
            // Entered under the lock: a quiesce or switch, which takes it exclusively,
            // sees every request that will run against the view it replaces.
            let view = self.state.read();
            let ticket = view.flight.enter(changes);
            Request {
                view: view.clone(),
                ticket: Some(ticket),
            }
        };
        if let Some((start, end)) = changes {
            if self.has_former.load(Ordering::Acquire) {
                self.wait_for_former_writes(&request.view, start, end);
            }
        }
        request
    }

    /// Waits for the writes in flight on former tops that change a cluster of `top` that
    /// `start..end` touches: a partial-cluster write to `top` copies the rest of its cluster
    /// up from the former top, and must see every write the guest had started there.
    ///
    /// Only flights older than the request's own count: a switch after the request entered
    /// its view makes that view's flight a former one too, and the request must not wait
    /// for itself or for a neighbour that may be waiting for it.
    fn wait_for_former_writes(&self, view: &View, start: u64, end: u64) {
        let cluster = view.top.as_qcow2().map_or(1, |image| image.cluster_size());
        let (start, end) = (
            start - start % cluster,
            end.saturating_add(cluster - 1) / cluster * cluster,
        );
        let former: Vec<Arc<InFlight>> = self
            .busy_former()
            .iter()
            .filter(|flight| flight.is_older_than(&view.flight))
            .cloned()
            .collect();
        let mut waited = false;
        for flight in &former {
            waited |= flight.wait_clear_of(start, end);
        }
        if waited {
            self.overlap_waits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many writes have waited for an overlapping write still in flight on a top a
    /// [`LiveDisk::switch_all`] switched away from (the only wait such a switch adds after
    /// it ends).
    pub fn overlap_waits(&self) -> u64 {
        self.overlap_waits.load(Ordering::Relaxed)
    }

    /// Waits until no request runs on a top this disk was switched away from, and forgets
    /// those tops' requests. An old top is sealed only after this.
    pub fn settle(&self) {
        let former: Vec<Arc<InFlight>> = self.former.lock().clone();
        for flight in &former {
            flight.wait_idle();
        }
        drop(self.busy_former()); // Forgets the flights that are idle now.
    }

    /// The former tops' flights with requests still in them, the idle ones forgotten (and
    /// the fast check cleared when none is left).
    fn busy_former(&self) -> parking_lot::MutexGuard<'_, Vec<Arc<InFlight>>> {
        let mut former = self.former.lock();
        former.retain(|flight| !flight.is_idle());
        if former.is_empty() {
            self.has_former.store(false, Ordering::Release);
        }
        former
    }

    /// Waits for every request on the current view and on former tops: the drain of a
    /// quiesce, run with the state lock held so no request starts meanwhile.
    fn drain(&self, view: &View) {
        view.flight.wait_idle();
        let former: Vec<Arc<InFlight>> = self.former.lock().clone();
        for flight in &former {
            flight.wait_idle();
        }
    }

    /// Forgets former tops that are read-only now (sealed, hence flushed).
    pub fn prune_retired(&self) {
        self.retired.lock().retain(|old| !old.read_only());
    }

    /// Waits for the requests in flight to finish and holds new ones back until the returned
    /// guard is dropped. Do not issue I/O through this disk on the same thread meanwhile:
    /// use [`Quiesced::top`].
    pub fn quiesce(&self) -> Quiesced<'_> {
        let gate = self.gate.close();
        let state = self.state.write();
        self.drain(&state);
        Quiesced {
            disk: self,
            state,
            _gate: gate,
        }
    }

    /// Quiesces every disk of a set as one hold: first holds new requests back on every
    /// disk, then waits for the requests in flight on all of them (they finish side by
    /// side, so the drain lasts about as long as the slowest one, not the sum). Locks are
    /// taken in [`LiveDisk::id`] order so two sets sharing disks cannot deadlock. The guards
    /// come back in `disks` order.
    ///
    /// # Panics
    /// If a disk appears twice in `disks`.
    pub fn quiesce_all<'a>(disks: &[&'a LiveDisk]) -> Vec<Quiesced<'a>> {
        let mut order: Vec<usize> = (0..disks.len()).collect();
        order.sort_by_key(|&i| disks[i].id);
        assert!(
            order.windows(2).all(|w| disks[w[0]].id != disks[w[1]].id),
            "a disk appears twice in one set"
        );
        // Every gate closes before any drain starts: from here on no disk of the set starts
        // a request, so the drains below wait for a fixed, small set of requests.
        let gates: Vec<ClosedGate<'a>> = disks.iter().map(|d| d.gate.close()).collect();
        let mut locks: Vec<Option<RwLockWriteGuard<'a, Arc<View>>>> =
            (0..disks.len()).map(|_| None).collect();
        for &i in &order {
            locks[i] = Some(disks[i].state.write());
        }
        // The drains run side by side: each waits for requests already running.
        for i in order {
            if let Some(state) = &locks[i] {
                disks[i].drain(state);
            }
        }
        disks
            .iter()
            .zip(locks)
            .zip(gates)
            .filter_map(|((&disk, state), gate)| {
                Some(Quiesced {
                    disk,
                    state: state?,
                    _gate: gate,
                })
            })
            .collect()
    }

    /// Switches every disk of a set to a new top at one instant, without draining: the
    /// requests in flight finish on the tops they started on, new ones run on the new tops.
    /// The hold is the time to take each disk's state lock (a request holds it only to
    /// enter, never while its I/O runs) and swap pointers: it does not depend on how long
    /// the requests in flight take. The set switches as one: every lock is taken, in
    /// [`LiveDisk::id`] order, before any view changes, so no request sees some disks
    /// switched and others not.
    ///
    /// What the drain guaranteed is kept where it matters. A write to a new top that
    /// touches a cluster a former top's write in flight changes waits for that write first
    /// (a partial-cluster write copies the rest of its cluster up from the former top).
    /// A guest flush covers the former tops ([`Quiesced::retire`]). The caller seals a
    /// former top only after [`LiveDisk::settle`].
    ///
    /// Nothing is switched on failure: a disk whose top is no longer `from`, a new top of
    /// another size, a disk named twice.
    pub fn switch_all(switches: &[TopSwitch<'_>]) -> Result<()> {
        for (i, switch) in switches.iter().enumerate() {
            let disk = switch.disk;
            if switches[..i].iter().any(|other| other.disk.id == disk.id) {
                return Err(Error::InvalidArgument(format!(
                    "disk {} appears twice in one switch",
                    disk.name
                )));
            }
            check_new_top(disk, &switch.to)?;
        }
        let mut order: Vec<usize> = (0..switches.len()).collect();
        order.sort_by_key(|&i| switches[i].disk.id);
        let mut locks: Vec<Option<RwLockWriteGuard<'_, Arc<View>>>> =
            (0..switches.len()).map(|_| None).collect();
        for &i in &order {
            locks[i] = Some(switches[i].disk.state.write());
        }
        let mut locks: Vec<_> = locks.into_iter().flatten().collect();
        for (switch, view) in switches.iter().zip(&locks) {
            if !Arc::ptr_eq(&view.top, switch.from) {
                return Err(Error::InvalidArgument(format!(
                    "disk {}: its top changed before the switch",
                    switch.disk.name
                )));
            }
        }
        for (switch, view) in switches.iter().zip(locks.iter_mut()) {
            let disk = switch.disk;
            disk.former.lock().push(view.flight.clone());
            disk.has_former.store(true, Ordering::Release);
            if !view.top.read_only() {
                disk.retired.lock().push(view.top.clone());
            }
            **view = Arc::new(View {
                top: switch.to.clone(),
                flight: Arc::default(),
                ..View::clone(view)
            });
        }
        Ok(())
    }

    /// Reserves the disk's chain for one job or operation; the reservation ends when the
    /// returned claim is dropped. Fails, naming the current owner, while another holds it.
    pub fn claim(self: &Arc<Self>, owner: &'static str) -> std::result::Result<DiskClaim, Busy> {
        let mut current = self.owner.lock();
        if let Some(holder) = *current {
            return Err(Busy {
                disk: self.name.clone(),
                holder,
            });
        }
        *current = Some(owner);
        Ok(DiskClaim { disk: self.clone() })
    }

    /// Who holds the disk's claim, if anyone.
    pub fn owner(&self) -> Option<&'static str> {
        *self.owner.lock()
    }
}

/// One disk of a [`LiveDisk::switch_all`].
pub struct TopSwitch<'a> {
    /// The disk to switch.
    pub disk: &'a LiveDisk,
    /// The top it must still have: the switch fails if it has another.
    pub from: &'a Arc<dyn BlockDevice>,
    /// Its new top, of the disk's size.
    pub to: Arc<dyn BlockDevice>,
}

/// Refuses a new top of another size than the disk's.
fn check_new_top(disk: &LiveDisk, top: &Arc<dyn BlockDevice>) -> Result<()> {
    if top.size() != disk.size {
        return Err(Error::InvalidArgument(format!(
            "{}: cannot become the top of disk {}: size {} differs from the disk's {}",
            top.path().display(),
            disk.name,
            top.size(),
            disk.size
        )));
    }
    Ok(())
}

/// A request running against a view, counted in the view's flight until dropped.
struct Request {
    view: Arc<View>,
    ticket: Option<Ticket>,
}

impl std::ops::Deref for Request {
    type Target = View;

    fn deref(&self) -> &View {
        &self.view
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.view.flight.leave(ticket);
        }
    }
}

/// Copies the clusters of a guest read that came from layers above the copy-on-read base
/// into the top. Failures are logged, not returned: the guest's read itself succeeded.
fn copy_up(top: &dyn BlockDevice, cor: CopyOnRead, buf: &[u8], offset: u64) {
    let Some(image) = top.as_qcow2() else {
        return;
    };
    let cs = image.cluster_size();
    let size = top.size();
    let end = offset + buf.len() as u64;
    let mut at = offset.next_multiple_of(cs);
    while at < end {
        let len = cs.min(size - at);
        if at + len > end {
            // Only whole clusters are populated; the stream job copies the rest.
            break;
        }
        let from_above_base = match top.block_status(at, len) {
            Ok(s) => {
                s.depth > 0 && s.depth < cor.base_depth && s.allocation != Allocation::Unallocated
            }
            Err(_) => false,
        };
        if from_above_base {
            let start = (at - offset) as usize;
            let data = &buf[start..start + len as usize];
            if let Err(e) = image.populate_cluster(at, Fill::Data(data)) {
                tracing::warn!(path = %top.path().display(), offset = at, error = %e,
                    "copy-on-read failed");
                return;
            }
        }
        at += len;
    }
}

/// A quiesced live disk: no guest request runs until this guard is dropped.
pub struct Quiesced<'a> {
    disk: &'a LiveDisk,
    // Declared before the gate: the lock is released first, so the requests the gate
    // releases find the disk unlocked instead of parking again on the lock.
    state: RwLockWriteGuard<'a, Arc<View>>,
    _gate: ClosedGate<'a>,
}

impl Quiesced<'_> {
    /// The disk this guard holds.
    pub fn disk(&self) -> &LiveDisk {
        self.disk
    }

    /// The current top.
    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.state.top
    }

    /// Makes `top` serve every request from now on and returns the old top. The new top
    /// must have the disk's size.
    pub fn replace_top(&mut self, top: Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>> {
        check_new_top(self.disk, &top)?;
        let old = self.state.top.clone();
        // Drained: the new top starts with a flight of its own.
        *self.state = Arc::new(View {
            top,
            flight: Arc::default(),
            ..View::clone(&self.state)
        });
        Ok(old)
    }

    /// Records `old`, a top this disk no longer writes to, as possibly holding writes that
    /// are not durable yet: [`LiveDisk::flush`] flushes it too until it is read-only. This
    /// lets a switch leave the old top's flush out of the critical section.
    pub fn retire(&mut self, old: Arc<dyn BlockDevice>) {
        if !old.read_only() {
            self.disk.retired.lock().push(old);
        }
    }

    /// Starts (`Some`) or stops (`None`) recording guest writes in `bitmap`.
    pub fn set_dirty_bitmap(&mut self, bitmap: Option<Arc<DirtyBitmap>>) {
        *self.state = Arc::new(View {
            dirty: bitmap,
            ..View::clone(&self.state)
        });
    }

    /// Turns copy-on-read on (`Some`) or off (`None`).
    pub fn set_copy_on_read(&mut self, copy_on_read: Option<CopyOnRead>) {
        *self.state = Arc::new(View {
            copy_on_read,
            ..View::clone(&self.state)
        });
    }
}

/// A disk's chain is reserved by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    /// The disk's name.
    pub disk: String,
    /// What holds it ("stream", "commit", "snapshot").
    pub holder: &'static str,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk {} is busy: a {} owns its chain",
            self.disk, self.holder
        )
    }
}

impl std::error::Error for Busy {}

/// The reservation made by [`LiveDisk::claim`]; released on drop.
#[derive(Debug)]
pub struct DiskClaim {
    disk: Arc<LiveDisk>,
}

impl DiskClaim {
    /// The claimed disk.
    pub fn disk(&self) -> &Arc<LiveDisk> {
        &self.disk
    }
}

impl Drop for DiskClaim {
    fn drop(&mut self) {
        *self.disk.owner.lock() = None;
    }
}

#[cfg(test)]
mod tests;
