//! Write-combining of copy-on-write allocations: partial writes to neighbouring unallocated
//! guest clusters that are in flight together share one allocation, one read of the backing
//! chain and one write.
//!
//! A partial write to a cluster this layer does not map copies the rest of the cluster from
//! the backing chain into a freshly allocated cluster: one read and one write of about a
//! cluster each. When a guest (or `img bench`) has many such writes in flight over
//! neighbouring clusters, issuing them one by one keeps the disk busy with cluster-sized
//! requests. Here at most [`COW_SLOTS`] copy-on-writes run at once; a writer that finds every
//! slot busy parks its request (it keeps holding its cluster's exclusive stripe) until either
//! a writer that gets a slot takes it along as part of a contiguous run, or a slot frees for
//! it. A run of `n` clusters is then one allocation of `n` host clusters, one read of `n`
//! clusters from below and one write of them, each request's bytes laid over its cluster.
//! Each writer publishes its own L2 entry once the data is written, under its own stripe, as
//! the single-cluster path does: the §3.4 ordering (data before mapping) is unchanged.
//!
//! A writer alone never waits, so single-threaded I/O takes the single-cluster path exactly
//! as before; the slot limit costs nothing measurable on the disks measured (four
//! cluster-sized copy-on-writes in flight already saturate them) and bounds the memory the
//! runs use.

use std::collections::BTreeMap;

use parking_lot::{Condvar, Mutex};

use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::file::AlignedBuf;

/// Copy-on-write runs in flight at once per layer.
pub(super) const COW_SLOTS: usize = 4;
/// Most bytes one run covers (whole clusters; at least one).
const MAX_RUN_BYTES: u64 = 2 << 20;

/// A parked copy-on-write: which bytes of its cluster the write covers.
struct Parked {
    in_cluster: usize,
    data: Vec<u8>,
}

/// How a parked request ended: the host offset of its new cluster, or the run's error.
type Outcome = std::result::Result<u64, SharedError>;

/// An error of a run, handed to every writer whose request was in it.
#[derive(Clone)]
struct SharedError {
    path: std::path::PathBuf,
    text: String,
    os_code: Option<i32>,
    kind: std::io::ErrorKind,
    no_space: bool,
}

impl SharedError {
    fn of(error: &Error) -> Self {
        let (path, os_code, kind) = match error {
            Error::Io { path, source, .. } => (path.clone(), source.raw_os_error(), source.kind()),
            Error::Invalid { path, .. }
            | Error::Unsupported { path, .. }
            | Error::ReadOnly { path }
            | Error::Locked { path, .. }
            | Error::NoSpace { path, .. } => (path.clone(), None, std::io::ErrorKind::Other),
            _ => (Default::default(), None, std::io::ErrorKind::Other),
        };
        SharedError {
            path,
            text: error.to_string(),
            os_code,
            kind,
            no_space: matches!(error, Error::NoSpace { .. }),
        }
    }

    fn into_error(self) -> Error {
        if self.no_space {
            return Error::NoSpace {
                path: self.path,
                reason: self.text,
            };
        }
        let source = match self.os_code {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(self.kind, self.text.clone()),
        };
        Error::Io {
            path: self.path,
            op: format!("copy-on-write run ({})", self.text),
            source,
        }
    }
}

#[derive(Default)]
struct State {
    /// Slots taken by runs in flight.
    busy: usize,
    /// Requests waiting, by guest cluster (one per cluster: each holds its stripe).
    parked: BTreeMap<u64, Parked>,
    /// Outcomes of parked requests a run carried, by guest cluster.
    done: BTreeMap<u64, Outcome>,
}

/// The per-layer meeting point of concurrent copy-on-writes (see the module docs).
#[derive(Default)]
pub(super) struct CowBatcher {
    state: Mutex<State>,
    changed: Condvar,
}

/// A taken slot, given back (and the parked writers woken) on drop.
struct SlotGuard<'a> {
    batcher: &'a CowBatcher,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.batcher.state.lock().busy -= 1;
        self.batcher.changed.notify_all();
    }
}

impl Qcow2Image {
    /// Writes `data` at `in_cluster` of guest cluster `guest_cluster`, which this layer does
    /// not map, into a new cluster holding the rest of the cluster from below. Returns the
    /// new cluster's host offset, written but not yet published; the caller holds the
    /// cluster's stripe exclusively and publishes the L2 entry.
    pub(super) fn cow_from_below(
        &self,
        guest_cluster: u64,
        in_cluster: usize,
        data: &[u8],
    ) -> Result<u64> {
        let batcher = &self.cow_batcher;
        let max_run = (MAX_RUN_BYTES >> self.cluster_bits).max(1);
        let mut state = batcher.state.lock();
        let mut parked = false;
        loop {
            if let Some(outcome) = state.done.remove(&guest_cluster) {
                return outcome.map_err(SharedError::into_error);
            }
            // A parked request no longer in `parked` was taken into another writer's run:
            // its outcome is coming.
            let taken = parked && !state.parked.contains_key(&guest_cluster);
            if !taken && state.busy < COW_SLOTS {
                state.busy += 1;
                if parked {
                    state.parked.remove(&guest_cluster);
                }
                let (lo, run) = take_neighbours(&mut state.parked, guest_cluster, max_run);
                drop(state);
                let slot = SlotGuard { batcher };
                if run.is_empty() {
                    let result = self.cow_one(guest_cluster, in_cluster, data);
                    drop(slot);
                    return result;
                }
                return self.lead_run(slot, guest_cluster, in_cluster, data, lo, run);
            }
            if !parked {
                state.parked.insert(
                    guest_cluster,
                    Parked {
                        in_cluster,
                        data: data.to_vec(),
                    },
                );
                parked = true;
            }
            batcher.changed.wait(&mut state);
        }
    }

    /// Copies a run of `lo..lo+run.len()+1` clusters (the caller's own among them) and hands
    /// every other writer its outcome.
    fn lead_run(
        &self,
        slot: SlotGuard<'_>,
        own: u64,
        own_in_cluster: usize,
        own_data: &[u8],
        lo: u64,
        mut run: BTreeMap<u64, Parked>,
    ) -> Result<u64> {
        let count = run.len() as u64 + 1;
        let result = self.copy_run(lo, count, |cluster| match run.get(&cluster) {
            Some(p) => (p.in_cluster, &p.data[..]),
            None => (own_in_cluster, own_data),
        });
        let cs = self.cluster_size;
        {
            let mut state = self.cow_batcher.state.lock();
            for (&cluster, _) in run.iter() {
                let outcome = match &result {
                    Ok(host) => Ok(host + (cluster - lo) * cs),
                    Err(e) => Err(SharedError::of(e)),
                };
                state.done.insert(cluster, outcome);
            }
        }
        run.clear();
        drop(slot);
        result.map(|host| host + (own - lo) * cs)
    }

    /// One allocation, one read from below and one write for `count` clusters from guest
    /// cluster `lo`; `part(cluster)` gives the bytes written into each. Returns the host
    /// offset of the first.
    fn copy_run<'d>(
        &self,
        lo: u64,
        count: u64,
        part: impl Fn(u64) -> (usize, &'d [u8]),
    ) -> Result<u64> {
        let cs = self.cluster_size as usize;
        let bytes = cs * count as usize;
        let host = {
            let mut meta = self.meta.lock();
            self.allocate(&mut meta, count)?
        };
        let mut aligned = AlignedBuf::new(bytes);
        let buf = &mut aligned[..bytes];
        if self.backing.read().is_some() {
            self.read_below(buf, lo << self.cluster_bits)?;
        }
        for (i, cluster) in (lo..lo + count).enumerate() {
            let (in_cluster, data) = part(cluster);
            let at = i * cs + in_cluster;
            buf[at..at + data.len()].copy_from_slice(data);
        }
        self.file.write_at(buf, host)?;
        Ok(host)
    }

    /// The single-cluster copy-on-write: reads only the parts of the cluster the write does
    /// not cover.
    fn cow_one(&self, guest_cluster: u64, in_cluster: usize, data: &[u8]) -> Result<u64> {
        let cs = self.cluster_size as usize;
        let target = {
            let mut meta = self.meta.lock();
            self.allocate(&mut meta, 1)?
        };
        // Aligned, so that with O_DIRECT the reads and the write go straight to the device
        // instead of through bounce buffers and copies.
        let mut aligned = AlignedBuf::new(cs);
        let full = &mut aligned[..cs];
        let cluster_start = guest_cluster << self.cluster_bits;
        let tail = in_cluster + data.len();
        if self.backing.read().is_some() {
            self.read_below(&mut full[..in_cluster], cluster_start)?;
            self.read_below(&mut full[tail..], cluster_start + tail as u64)?;
        }
        full[in_cluster..tail].copy_from_slice(data);
        self.file.write_at(full, target)?;
        Ok(target)
    }
}

/// Removes from `parked` the requests on the clusters right below and above `own` that form
/// one contiguous run with it, at most `max_run` clusters in all. Returns the run's first
/// cluster and the requests taken.
fn take_neighbours(
    parked: &mut BTreeMap<u64, Parked>,
    own: u64,
    max_run: u64,
) -> (u64, BTreeMap<u64, Parked>) {
    let mut lo = own;
    let mut hi = own;
    while hi - lo + 1 < max_run && lo > 0 && parked.contains_key(&(lo - 1)) {
        lo -= 1;
    }
    while hi - lo + 1 < max_run && hi < u64::MAX && parked.contains_key(&(hi + 1)) {
        hi += 1;
    }
    let mut run = BTreeMap::new();
    for cluster in (lo..=hi).filter(|&c| c != own) {
        if let Some(p) = parked.remove(&cluster) {
            run.insert(cluster, p);
        }
    }
    (lo, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(clusters: &[u64]) -> BTreeMap<u64, Parked> {
        clusters
            .iter()
            .map(|&c| {
                (
                    c,
                    Parked {
                        in_cluster: 0,
                        data: vec![c as u8],
                    },
                )
            })
            .collect()
    }

    #[test]
    fn neighbours_form_one_contiguous_run() {
        let mut p = parked(&[3, 4, 6, 7, 9]);
        let (lo, run) = take_neighbours(&mut p, 5, 32);
        assert_eq!(lo, 3);
        assert_eq!(run.keys().copied().collect::<Vec<_>>(), vec![3, 4, 6, 7]);
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![9]);
    }

    #[test]
    fn runs_are_bounded_and_start_at_zero_safely() {
        let mut p = parked(&[0, 1, 2, 3, 4, 5]);
        let (lo, run) = take_neighbours(&mut p, 1, 3);
        assert_eq!(lo, 0);
        assert_eq!(run.keys().copied().collect::<Vec<_>>(), vec![0, 2]);
        let mut none = parked(&[10]);
        let (lo, run) = take_neighbours(&mut none, 0, 32);
        assert_eq!((lo, run.len()), (0, 0));
    }
}
