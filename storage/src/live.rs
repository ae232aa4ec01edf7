//! The live disk: the handle a virtual device does I/O through, whose image chain can be
//! re-pointed while requests are in flight.
//!
//! A [`LiveDisk`] owns the current top of a chain. Every request holds a shared lock on it
//! for the duration of the I/O; [`LiveDisk::quiesce`] takes the lock exclusively, which waits
//! for the requests in flight to drain and makes new ones wait until the guard is dropped.
//! [`LiveDisk::quiesce_all`] does that for a set of disks as one hold: new requests stop on
//! every disk before the drain of any begins.
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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{check_range, Allocation, BlockDevice};
use crate::error::{Error, Result};
use crate::qcow2::Fill;

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

/// What the request path consults; replaced only under [`Quiesced`].
struct State {
    top: Arc<dyn BlockDevice>,
    dirty: Option<Arc<DirtyBitmap>>,
    copy_on_read: Option<CopyOnRead>,
}

/// A disk as a virtual device sees it: one chain, whose top can be swapped while the guest
/// runs. See the [module documentation](self).
pub struct LiveDisk {
    id: u64,
    name: String,
    size: u64,
    state: RwLock<State>,
    /// The job or operation that owns the disk's chain right now ("stream", "commit", ...).
    owner: Mutex<Option<&'static str>>,
    /// Former tops switched away from but maybe not yet flushed: a guest flush must cover
    /// the writes it made before the switch too. See [`Quiesced::retire`].
    retired: Mutex<Vec<Arc<dyn BlockDevice>>>,
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
            state: RwLock::new(State {
                top,
                dirty: None,
                copy_on_read: None,
            }),
            owner: Mutex::new(None),
            retired: Mutex::new(Vec::new()),
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
        let state = self.request();
        state.top.read_at(buf, offset)?;
        if let Some(cor) = state.copy_on_read {
            copy_up(&*state.top, cor, buf, offset);
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset` into the top.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let state = self.request();
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
        let state = self.request();
        let result = state.top.write_zeroes(offset, len);
        if let Some(dirty) = &state.dirty {
            dirty.mark(offset, len);
        }
        result
    }

    /// Discards a range (see [`BlockDevice::discard`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let state = self.request();
        let result = state.top.discard(offset, len);
        if let Some(dirty) = &state.dirty {
            dirty.mark(offset, len);
        }
        result
    }

    /// A durability barrier (see [`BlockDevice::flush`]) on the current top, and on former
    /// tops still holding writes made before a switch.
    pub fn flush(&self) -> Result<()> {
        let state = self.request();
        let retired: Vec<_> = self.retired.lock().clone();
        for old in &retired {
            old.flush()?;
        }
        state.top.flush()
    }

    /// The state a request runs against, held for the request's duration: past the gate,
    /// shared with the other requests, excluding a quiesce.
    fn request(&self) -> RwLockReadGuard<'_, State> {
        self.gate.pass();
        self.state.read()
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
        Quiesced {
            disk: self,
            state: self.state.write(),
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
        let mut locks: Vec<Option<RwLockWriteGuard<'a, State>>> =
            (0..disks.len()).map(|_| None).collect();
        for i in order {
            locks[i] = Some(disks[i].state.write());
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
    state: RwLockWriteGuard<'a, State>,
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
        if top.size() != self.disk.size {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot become the top of disk {}: size {} differs from the disk's {}",
                top.path().display(),
                self.disk.name,
                top.size(),
                self.disk.size
            )));
        }
        Ok(std::mem::replace(&mut self.state.top, top))
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
        self.state.dirty = bitmap;
    }

    /// Turns copy-on-read on (`Some`) or off (`None`).
    pub fn set_copy_on_read(&mut self, copy_on_read: Option<CopyOnRead>) {
        self.state.copy_on_read = copy_on_read;
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

/// Which granules of a disk changed since they were last taken: the guest-write log a
/// mirror copies from. Lock-free: marking is a `fetch_or`, taking a `fetch_and`.
#[derive(Debug)]
pub struct DirtyBitmap {
    granule_bits: u32,
    size: u64,
    words: Box<[AtomicU64]>,
    /// Number of set bits, kept alongside so progress needs no scan.
    count: AtomicU64,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes tracked in `granule`-byte units (a power of
    /// two, at least 512).
    pub fn new(size: u64, granule: u64) -> Result<Self> {
        if !granule.is_power_of_two() || granule < 512 {
            return Err(Error::InvalidArgument(format!(
                "dirty bitmap granule {granule} is not a power of two of at least 512"
            )));
        }
        let granules = size.div_ceil(granule);
        Ok(DirtyBitmap {
            granule_bits: granule.trailing_zeros(),
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            count: AtomicU64::new(0),
        })
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        1 << self.granule_bits
    }

    /// Marks every granule that `offset..offset+len` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return;
        }
        let first = offset >> self.granule_bits;
        let last = (offset + len - 1) >> self.granule_bits;
        for granule in first..=last {
            let bit = 1u64 << (granule % 64);
            let old = self.words[(granule / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            if old & bit == 0 {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Clears and returns the first dirty granule at or after granule `from` (wrapping
    /// round once), as a byte range `(offset, len)`.
    pub fn take_next(&self, from: u64) -> Option<(u64, u64)> {
        let words = self.words.len();
        if words == 0 {
            return None;
        }
        let start_word = ((from / 64) as usize).min(words - 1);
        for step in 0..=words {
            let w = (start_word + step) % words;
            let mut value = self.words[w].load(Ordering::Acquire);
            if step == 0 {
                // Granules below `from` in the first word are visited on the wrap.
                value &= !0u64 << (from % 64);
            }
            while value != 0 {
                let bit = value.trailing_zeros() as u64;
                let mask = 1u64 << bit;
                if self.words[w].fetch_and(!mask, Ordering::AcqRel) & mask != 0 {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    let granule = w as u64 * 64 + bit;
                    let offset = granule << self.granule_bits;
                    return Some((offset, self.granule().min(self.size - offset)));
                }
                value &= !mask;
            }
        }
        None
    }

    /// Like [`DirtyBitmap::take_next`], and goes on taking the dirty granules that follow
    /// it, up to `max_len` bytes in all, so that neighbouring granules are copied in one
    /// request.
    pub fn take_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let (offset, mut len) = self.take_next(from)?;
        let mut granule = (offset + len) >> self.granule_bits;
        while len < max_len && (granule << self.granule_bits) < self.size {
            let word = &self.words[(granule / 64) as usize];
            let mask = 1u64 << (granule % 64);
            if word.fetch_and(!mask, Ordering::AcqRel) & mask == 0 {
                break;
            }
            self.count.fetch_sub(1, Ordering::Relaxed);
            len += self
                .granule()
                .min(self.size - (granule << self.granule_bits));
            granule += 1;
        }
        Some((offset, len))
    }

    /// Number of dirty granules.
    pub fn dirty_granules(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Number of dirty bytes (granules times granule size, the last one clipped).
    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty_granules() << self.granule_bits).min(self.size)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::device::{BlockStatus, ImageInfo};
    use crate::raw::RawImage;

    /// A real raw image whose first write at offset 0 parks inside the device until the
    /// test lets it go: a request in flight for exactly as long as the test wants.
    struct HeldWrite {
        inner: RawImage,
        entered: Mutex<Option<mpsc::Sender<()>>>,
        release: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl BlockDevice for HeldWrite {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            if offset == 0 {
                if let Some(entered) = self.entered.lock().take() {
                    entered.send(()).unwrap();
                    let release = self.release.lock().take().unwrap();
                    release.recv().unwrap();
                }
            }
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.write_zeroes(offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.discard(offset, len)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            self.inner.block_status(offset, len)
        }
        fn read_only(&self) -> bool {
            self.inner.read_only()
        }
        fn info(&self) -> ImageInfo {
            self.inner.info()
        }
        fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
            None
        }
        fn path(&self) -> &std::path::Path {
            self.inner.path()
        }
    }

    fn raw(dir: &std::path::Path, name: &str) -> RawImage {
        let path = dir.join(name);
        RawImage::create(&path, 1 << 20).unwrap();
        RawImage::open(&path, false, false).unwrap()
    }

    /// A quiesce of a disk set holds back requests on every disk of it from its start: a
    /// request issued on the second disk while the first is still draining waits for the
    /// hold to end instead of slipping in (which would make one hold as long as a chain of
    /// requests, one per disk, as a guest writing its disks in turn produces).
    #[test]
    fn quiesce_all_closes_every_disk_before_draining_any() {
        let dir = tempfile::tempdir().unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let first = LiveDisk::new(
            "vda",
            Arc::new(HeldWrite {
                inner: raw(dir.path(), "a.raw"),
                entered: Mutex::new(Some(entered_tx)),
                release: Mutex::new(Some(release_rx)),
            }),
        );
        let second = LiveDisk::new("vdb", Arc::new(raw(dir.path(), "b.raw")));
        assert!(first.id() < second.id(), "the first disk is drained first");

        // A write in flight on the first disk.
        let in_flight = std::thread::spawn({
            let first = first.clone();
            move || first.write_at(&[1; 512], 0).unwrap()
        });
        entered.recv().unwrap();

        // The quiesce starts: it closes both gates, then waits for the write above.
        let (held_tx, held) = mpsc::channel();
        let (end_tx, end) = mpsc::channel::<()>();
        let quiescer = std::thread::spawn({
            let (first, second) = (first.clone(), second.clone());
            move || {
                let guards = LiveDisk::quiesce_all(&[&*first, &*second]);
                let mut seen = [0u8; 512];
                guards[1].top().read_at(&mut seen, 0).unwrap();
                held_tx.send(seen).unwrap();
                end.recv().unwrap();
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while second.gate.closed.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second disk's gate stayed open while the first drained"
            );
            std::thread::yield_now();
        }

        // Issued on the second disk while the first still drains: it must wait.
        let late = std::thread::spawn({
            let second = second.clone();
            move || second.write_at(&[2; 512], 0).unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!late.is_finished(), "a request started during the drain");

        release.send(()).unwrap();
        in_flight.join().unwrap();
        let seen = held.recv().unwrap();
        assert_eq!(seen, [0; 512], "the late write reached a quiesced disk");
        assert!(!late.is_finished());
        end_tx.send(()).unwrap();
        quiescer.join().unwrap();
        late.join().unwrap();
        let mut back = [0u8; 512];
        second.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [2; 512]);
        assert_eq!(second.gate.closed.load(Ordering::SeqCst), 0);
    }

    /// Quiesces of overlapping disk sets, one after the other and nested, each hold their
    /// disks, and the gates open again only when the last of them ends.
    #[test]
    fn overlapping_quiesces_keep_the_gate_closed_until_the_last_ends() {
        let dir = tempfile::tempdir().unwrap();
        let a = LiveDisk::new("vda", Arc::new(raw(dir.path(), "a.raw")));
        let b = LiveDisk::new("vdb", Arc::new(raw(dir.path(), "b.raw")));
        let outer = a.quiesce();
        let inner = {
            // `a` is held above: quiesce only `b` here, as a second operation would.
            LiveDisk::quiesce_all(&[&*b])
        };
        assert_eq!(b.gate.closed.load(Ordering::SeqCst), 1);
        drop(inner);
        assert_eq!(b.gate.closed.load(Ordering::SeqCst), 0);
        let writer = std::thread::spawn({
            let a = a.clone();
            move || a.write_at(&[7; 16], 0).unwrap()
        });
        let closed_twice = a.gate.close();
        drop(outer);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !writer.is_finished(),
            "a gate opened while a quiesce still held it"
        );
        drop(closed_twice);
        writer.join().unwrap();
        b.write_at(&[8; 16], 0).unwrap();
    }

    #[test]
    fn bitmap_marks_and_takes_each_granule_once() {
        let map = DirtyBitmap::new(1 << 20, 4096).unwrap();
        map.mark(4095, 2); // granules 0 and 1
        map.mark(200 * 4096, 1);
        map.mark(4096, 10); // already dirty
        assert_eq!(map.dirty_granules(), 3);
        assert_eq!(map.take_next(1), Some((4096, 4096)));
        assert_eq!(map.take_next(2), Some((200 * 4096, 4096)));
        // Wraps round to granule 0.
        assert_eq!(map.take_next(201), Some((0, 4096)));
        assert_eq!(map.take_next(0), None);
        assert_eq!(map.dirty_bytes(), 0);
    }

    #[test]
    fn bitmap_takes_runs_of_neighbours() {
        let map = DirtyBitmap::new(1 << 20, 4096).unwrap();
        map.mark(60 * 4096, 8 * 4096); // granules 60..68, across a word boundary
        map.mark(70 * 4096, 1);
        assert_eq!(map.take_run(0, 1 << 20), Some((60 * 4096, 8 * 4096)));
        assert_eq!(map.take_run(0, 4096), Some((70 * 4096, 4096)));
        map.mark(0, 3 * 4096);
        assert_eq!(map.take_run(0, 2 * 4096), Some((0, 2 * 4096)));
        assert_eq!(map.dirty_granules(), 1);
    }

    #[test]
    fn bitmap_clips_the_last_granule_and_ignores_out_of_range() {
        let map = DirtyBitmap::new(10_000, 4096).unwrap();
        map.mark(9_000, 1000);
        map.mark(20_000, 5);
        assert_eq!(map.take_next(0), Some((8192, 10_000 - 8192)));
        assert!(DirtyBitmap::new(1, 1000).is_err());
    }
}
