//! Concurrency: several threads writing, zeroing and discarding one qcow2 overlay (over a raw
//! backing file) at once, against the only outcomes that are allowed, with readers checking
//! that data nobody writes stays stable. Every test ends with `qemu-img check` clean and
//! QEMU reading what the model says.
//!
//! Each scenario runs buffered and with `O_DIRECT`, with 4 KiB and 64 KiB clusters, v2 and v3.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use storage::{Allocation, BlockDevice, ImageFormat, OpenOptions};
use test_support::image::{read_all, snapvmm_create, write_raw};
use test_support::pattern::{assert_same, pattern};
use test_support::qemu::{assert_check_clean, qemu_read_all};
use test_support::require::have_qemu;

const MIB: u64 = 1 << 20;
const THREADS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Setup {
    cluster_size: u64,
    version: u32,
    direct: bool,
    /// A small L2 cache: evictions and writebacks happen while other threads work.
    small_cache: bool,
}

const BUFFERED: [Setup; 2] = [
    Setup {
        cluster_size: 65536,
        version: 3,
        direct: false,
        small_cache: false,
    },
    Setup {
        cluster_size: 4096,
        version: 2,
        direct: false,
        small_cache: true,
    },
];

const DIRECT: [Setup; 2] = [
    Setup {
        cluster_size: 65536,
        version: 3,
        direct: true,
        small_cache: true,
    },
    Setup {
        cluster_size: 4096,
        version: 3,
        direct: true,
        small_cache: false,
    },
];

struct Fixture {
    _dir: tempfile::TempDir,
    overlay: PathBuf,
    base: Arc<Vec<u8>>,
}

/// A raw base full of data and an empty qcow2 overlay over it.
fn fixture(setup: Setup, size: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = pattern(seed, size as usize);
    write_raw(&dir.path().join("base.raw"), &base);
    let overlay = dir.path().join("overlay.qcow2");
    snapvmm_create(
        &overlay,
        None,
        setup.cluster_size,
        setup.version,
        16,
        Some(("base.raw", ImageFormat::Raw)),
    );
    Fixture {
        _dir: dir,
        overlay,
        base: Arc::new(base),
    }
}

fn open(path: &Path, setup: Setup) -> Arc<dyn BlockDevice> {
    let options = OpenOptions {
        direct: setup.direct,
        l2_cache_bytes: setup.small_cache.then_some(8 * 1024),
        refcount_cache_bytes: setup.small_cache.then_some(8 * 1024),
        ..OpenOptions::default()
    };
    storage::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Closes the device, then checks the image with qemu-img and compares QEMU's view.
fn finish(disk: Arc<dyn BlockDevice>, fixture: &Fixture, expected: &[u8], what: &str) {
    assert_eq!(
        Arc::strong_count(&disk),
        1,
        "{what}: a thread kept the device"
    );
    assert_same(
        &read_all(&*disk),
        expected,
        &format!("{what}: snapvmm read"),
    );
    drop(disk);
    assert_check_clean(&fixture.overlay);
    assert_same(
        &qemu_read_all(&fixture.overlay),
        expected,
        &format!("{what}: qemu read"),
    );
}

/// Threads write distinct byte ranges of the same clusters (boundaries not sector aligned,
/// with gaps between them) at the same moment: every thread's bytes must survive, and the
/// gaps keep the backing file's data. Half the rounds hit unallocated clusters over the
/// backing file (copy-on-write), half hit clusters already allocated (in place).
fn distinct_subranges(setup: Setup) {
    let size = 8 * MIB;
    let fixture = fixture(setup, size, 1);
    let what = format!("distinct sub-ranges {setup:?}");
    let cs = setup.cluster_size;
    let disk = open(&fixture.overlay, setup);
    let mut expected = (*fixture.base).clone();
    let clusters_per_round = 6u64;
    let rounds = 24u64;
    let share = cs / THREADS as u64;
    // Thread t owns [t*share + 700, (t+1)*share + 300) of each cluster: neighbours' ranges
    // share a sector and a 4 KiB block, and 400 bytes between them stay untouched.
    let range_of = move |t: u64| {
        let start = t * share + 700;
        let end = ((t + 1) * share + 300).min(cs);
        (start, end)
    };
    for round in 0..rounds {
        // Even rounds: fresh clusters. Odd rounds: the previous round's clusters again.
        let first = (round / 2) * clusters_per_round;
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let disk = disk.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    let (start, end) = range_of(t);
                    for k in 0..clusters_per_round {
                        // Each thread walks the clusters in a different order.
                        let c = first + (k + t) % clusters_per_round;
                        let data = pattern(round * 1000 + t * 100 + c, (end - start) as usize);
                        disk.write_at(&data, c * cs + start).expect("write");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer thread panicked");
        }
        for c in first..first + clusters_per_round {
            for t in 0..THREADS as u64 {
                let (start, end) = range_of(t);
                let data = pattern(round * 1000 + t * 100 + c, (end - start) as usize);
                let at = (c * cs + start) as usize;
                expected[at..at + data.len()].copy_from_slice(&data);
            }
            let mut cluster = vec![0u8; cs as usize];
            disk.read_at(&mut cluster, c * cs).expect("read");
            let at = (c * cs) as usize;
            assert_same(
                &cluster,
                &expected[at..at + cs as usize],
                &format!("{what}: round {round} cluster {c}"),
            );
        }
    }
    finish(disk, &fixture, &expected, &what);
}

/// The 8-byte tag filling every word of a sector written by `thread` in `iteration`.
fn tag(thread: u64, iteration: u64, sector: u64) -> u64 {
    0x5a00_0000_0000_0000 | thread << 48 | iteration << 24 | sector
}

fn tagged(thread: u64, iteration: u64, first_sector: u64, sectors: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((sectors * 512) as usize);
    for s in first_sector..first_sector + sectors {
        let word = tag(thread, iteration, s).to_le_bytes();
        for _ in 0..64 {
            out.extend_from_slice(&word);
        }
    }
    out
}

/// Checks that every sector of `buf` (starting at `first_sector`) is entirely one writer's
/// tag for that sector; returns the tags found.
fn check_tagged(buf: &[u8], first_sector: u64, what: &str) -> Vec<u64> {
    buf.chunks(512)
        .enumerate()
        .map(|(i, sector)| {
            let lba = first_sector + i as u64;
            let first = u64::from_le_bytes(sector[..8].try_into().expect("8 bytes"));
            assert!(
                sector.chunks(8).all(|w| w == first.to_le_bytes()),
                "{what}: sector {lba} mixes writers' data"
            );
            assert!(
                first >> 56 == 0x5a
                    && (first >> 48) & 0xff < THREADS as u64
                    && first & 0xff_ffff == lba,
                "{what}: sector {lba} holds {first:#x}, no writer's tag for it"
            );
            first
        })
        .collect()
}

/// Threads write the same sectors at once (runs crossing cluster boundaries, over
/// unallocated clusters and allocated ones); each sector must end up entirely one writer's,
/// never a mix, zero or the backing file's.
fn overlapping_sectors(setup: Setup) {
    let size = 8 * MIB;
    let fixture = fixture(setup, size, 2);
    let what = format!("overlapping sectors {setup:?}");
    let cs = setup.cluster_size;
    let disk = open(&fixture.overlay, setup);
    let mut expected = (*fixture.base).clone();
    let iterations = 40u64;
    // Runs: half a cluster before a boundary to half after, on fresh clusters each time.
    let run_sectors = cs / 512 + 2;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let disk = disk.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                for i in 0..iterations {
                    // Two writers per run start at the same time; all four collide on the
                    // middle sectors.
                    let first_sector = (2 * i + 1) * cs / 512 - cs / 1024 - 1;
                    if i % 8 == 0 {
                        barrier.wait();
                    }
                    let shift = t % 2;
                    let data = tagged(t, i, first_sector + shift, run_sectors - shift);
                    disk.write_at(&data, (first_sector + shift) * 512)
                        .expect("write");
                    if (i + t) % 3 == 0 {
                        // Repeat the write in place now that the cluster is allocated.
                        disk.write_at(&data, (first_sector + shift) * 512)
                            .expect("rewrite");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread panicked");
    }
    for i in 0..iterations {
        let first_sector = (2 * i + 1) * cs / 512 - cs / 1024 - 1;
        let mut buf = vec![0u8; (run_sectors * 512) as usize];
        disk.read_at(&mut buf, first_sector * 512).expect("read");
        let tags = check_tagged(&buf, first_sector, &format!("{what}: run {i}"));
        for (k, t) in tags.iter().enumerate() {
            assert_eq!(
                (t >> 24) & 0xff_ffff,
                i,
                "{what}: run {i} sector {k} from another run"
            );
        }
        let at = (first_sector * 512) as usize;
        expected[at..at + buf.len()].copy_from_slice(&buf);
    }
    finish(disk, &fixture, &expected, &what);
}

/// Writers own disjoint sets of clusters interleaved with clusters nobody writes; they
/// write (whole and partial clusters), zero and discard while a flusher flushes and readers
/// keep reading the untouched clusters, which must never change. Afterwards every writer's
/// clusters hold what its own model says and no two guest clusters share a host cluster.
fn churn_with_stable_readers(setup: Setup) {
    let size = 8 * MIB;
    let fixture = fixture(setup, size, 3);
    let what = format!("churn {setup:?}");
    let cs = setup.cluster_size;
    let clusters = size / cs;
    let disk = open(&fixture.overlay, setup);
    // Stable clusters: every third; a third of them allocated in the overlay, a third
    // zeroed, a third left reading the backing file.
    let mut stable = (*fixture.base).clone();
    for c in (0..clusters).filter(|c| c % 3 == 0) {
        let at = c * cs;
        match (c / 3) % 3 {
            0 => {
                let data = pattern(10_000 + c, cs as usize);
                disk.write_at(&data, at).expect("prepare");
                stable[at as usize..(at + cs) as usize].copy_from_slice(&data);
            }
            1 => {
                disk.write_zeroes(at, cs).expect("prepare");
                stable[at as usize..(at + cs) as usize].fill(0);
            }
            _ => {}
        }
    }
    disk.flush().expect("flush");
    let stable = Arc::new(stable);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (disk, stable, stop, reads) =
                (disk.clone(), stable.clone(), stop.clone(), reads.clone());
            thread::spawn(move || {
                let mut n = r;
                let mut buf = vec![0u8; cs as usize];
                while !stop.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let c = (n >> 33) % clusters / 3 * 3;
                    let len = 512 * (1 + (n >> 20) % (cs / 512));
                    let at = c * cs + (n >> 8) % (cs - len + 1) / 512 * 512;
                    disk.read_at(&mut buf[..len as usize], at).expect("read");
                    assert!(
                        buf[..len as usize] == stable[at as usize..(at + len) as usize],
                        "stable data at {at:#x} (+{len}) changed under concurrent writes"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let flusher = {
        let (disk, stop) = (disk.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                disk.flush().expect("flush");
                thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let disk = disk.clone();
            let base = fixture.base.clone();
            let mut model = (*base).clone();
            let version = setup.version;
            thread::spawn(move || {
                // Writer w owns clusters c with c % 3 != 0 and (c / 3) % 3 == w.
                let own: Vec<u64> = (0..clusters)
                    .filter(|c| c % 3 != 0 && (c / 3) % 3 == w)
                    .collect();
                let mut n = w + 77;
                for i in 0..200u64 {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let c = own[((n >> 33) % own.len() as u64) as usize];
                    let at = c * cs;
                    match (n >> 16) % 8 {
                        0..=2 => {
                            let data = pattern(w * 1_000_000 + i, cs as usize);
                            disk.write_at(&data, at).expect("write");
                            model[at as usize..(at + cs) as usize].copy_from_slice(&data);
                        }
                        3..=4 => {
                            let off = (n >> 24) % cs;
                            let len = (1 + (n >> 40) % 3000).min(cs - off);
                            let data = pattern(w * 1_000_000 + i, len as usize);
                            disk.write_at(&data, at + off).expect("write");
                            model[(at + off) as usize..(at + off + len) as usize]
                                .copy_from_slice(&data);
                        }
                        5 => {
                            disk.write_zeroes(at, cs).expect("zeroes");
                            model[at as usize..(at + cs) as usize].fill(0);
                        }
                        6 => {
                            disk.discard(at, cs).expect("discard");
                            let range = at as usize..(at + cs) as usize;
                            if version >= 3 {
                                model[range].fill(0);
                            } else {
                                // v2 over a backing file: the cluster reads the backing data.
                                model[range.clone()].copy_from_slice(&base[range]);
                            }
                        }
                        _ => {
                            // Partial zeroes inside a cluster.
                            let off = (n >> 24) % cs / 512 * 512;
                            let len = (512 * (1 + (n >> 40) % 4)).min(cs - off);
                            disk.write_zeroes(at + off, len).expect("zeroes");
                            model[(at + off) as usize..(at + off + len) as usize].fill(0);
                        }
                    }
                }
                (own, model)
            })
        })
        .collect();
    let mut expected = (*stable).clone();
    for h in writers {
        let (own, model) = h.join().expect("writer thread panicked");
        for c in own {
            let range = (c * cs) as usize..((c + 1) * cs) as usize;
            expected[range.clone()].copy_from_slice(&model[range]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        h.join().expect("reader thread panicked");
    }
    flusher.join().expect("flusher thread panicked");
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "{what}: readers never ran"
    );
    // No two guest clusters may share a host cluster.
    let mut hosts = std::collections::HashMap::new();
    for c in 0..clusters {
        let status = disk.block_status(c * cs, cs).expect("block_status");
        if let (Allocation::Data, 0, Some(host)) = (status.allocation, status.depth, status.offset)
        {
            if let Some(other) = hosts.insert(host, c) {
                panic!("{what}: guest clusters {other} and {c} both map to host {host:#x}");
            }
        }
    }
    finish(disk, &fixture, &expected, &what);
}

/// Threads allocate new clusters (and L2 tables: the writes land across the whole disk) at
/// the same time as others discard theirs, so freed clusters are reused while allocation
/// races; then flush and check.
fn allocate_and_free_race(setup: Setup) {
    // Several L2 tables either way.
    let size = if setup.cluster_size == 4096 {
        5 * MIB
    } else {
        16 * MIB
    };
    let fixture = fixture(setup, size, 4);
    let what = format!("allocation race {setup:?}");
    let cs = setup.cluster_size;
    let clusters = size / cs;
    let disk = open(&fixture.overlay, setup);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let disk = disk.clone();
            let barrier = barrier.clone();
            let base = fixture.base.clone();
            let mut model = (*base).clone();
            let version = setup.version;
            thread::spawn(move || {
                barrier.wait();
                let own: Vec<u64> = (0..clusters).filter(|c| c % THREADS as u64 == t).collect();
                for pass in 0..3u64 {
                    for (k, &c) in own.iter().enumerate() {
                        let at = c * cs;
                        let range = at as usize..(at + cs) as usize;
                        if (k as u64 + pass) % 4 == 3 {
                            disk.discard(at, cs).expect("discard");
                            if version >= 3 {
                                model[range].fill(0);
                            } else {
                                model[range.clone()].copy_from_slice(&base[range]);
                            }
                        } else {
                            let data = pattern(t << 40 | pass << 32 | c, 1024);
                            let off = (k as u64 * 512) % (cs - 1024 + 1) / 512 * 512;
                            disk.write_at(&data, at + off).expect("write");
                            model[(at + off) as usize..(at + off) as usize + 1024]
                                .copy_from_slice(&data);
                        }
                    }
                    if t == 0 {
                        disk.flush().expect("flush");
                    }
                }
                (own, model)
            })
        })
        .collect();
    let mut expected = (*fixture.base).clone();
    for h in handles {
        let (own, model) = h.join().expect("thread panicked");
        for c in own {
            let range = (c * cs) as usize..((c + 1) * cs) as usize;
            expected[range.clone()].copy_from_slice(&model[range]);
        }
    }
    finish(disk, &fixture, &expected, &what);
}

#[test]
fn distinct_subranges_of_one_cluster_all_survive() {
    if !have_qemu("distinct_subranges_of_one_cluster_all_survive") {
        return;
    }
    for setup in BUFFERED {
        distinct_subranges(setup);
    }
}

#[test]
fn distinct_subranges_of_one_cluster_all_survive_direct_io() {
    if !have_qemu("distinct_subranges_of_one_cluster_all_survive_direct_io") {
        return;
    }
    for setup in DIRECT {
        distinct_subranges(setup);
    }
}

#[test]
fn overlapping_sector_writes_never_mix() {
    if !have_qemu("overlapping_sector_writes_never_mix") {
        return;
    }
    for setup in BUFFERED {
        overlapping_sectors(setup);
    }
}

#[test]
fn overlapping_sector_writes_never_mix_direct_io() {
    if !have_qemu("overlapping_sector_writes_never_mix_direct_io") {
        return;
    }
    for setup in DIRECT {
        overlapping_sectors(setup);
    }
}

#[test]
fn churn_keeps_untouched_data_stable() {
    if !have_qemu("churn_keeps_untouched_data_stable") {
        return;
    }
    for setup in BUFFERED.into_iter().chain(DIRECT) {
        churn_with_stable_readers(setup);
    }
}

#[test]
fn racing_allocations_and_frees() {
    if !have_qemu("racing_allocations_and_frees") {
        return;
    }
    for setup in BUFFERED.into_iter().chain(DIRECT) {
        allocate_and_free_race(setup);
    }
}

/// Minimal reproduction of the O_DIRECT bug: two threads write alternate 512-byte sectors
/// of the same 4 KiB block (sector-aligned requests, as a guest with 512-byte logical
/// blocks issues them) of a raw image and of an allocated qcow2 cluster opened with
/// `direct: true`, each reading its own sectors back after every round. Each request goes
/// through `ImageFile::write_bounced` (storage/src/file.rs), which reads the whole 4 KiB
/// block, patches one sector and writes the block back, with no lock: a sector the other
/// thread wrote in between is overwritten with stale data. The qcow2 in-place path
/// (`write_in_cluster`'s fast path in storage/src/qcow2/image.rs) holds the cluster's
/// stripe lock only shared, so it does not serialise the two either, contrary to
/// `write_bounced`'s doc comment.
#[test]
fn direct_io_adjacent_sectors_race() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    write_raw(&raw, &[0u8; 65536]);
    let qcow2 = dir.path().join("disk.qcow2");
    snapvmm_create(&qcow2, Some(65536), 65536, 3, 16, None);
    // Allocate the qcow2 cluster first so that every later write takes the in-place path.
    let disk = storage::open(&qcow2, &OpenOptions::default()).expect("open");
    disk.write_at(&[0u8; 65536], 0).expect("allocate");
    drop(disk);
    let mut failures = Vec::new();
    for path in [&raw, &qcow2] {
        let options = OpenOptions {
            direct: true,
            ..OpenOptions::default()
        };
        let disk = storage::open(path, &options).expect("open direct");
        let lost = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let (disk, lost) = (disk.clone(), lost.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    for round in 1..=500u32 {
                        let sector = [(round % 251) as u8; 512];
                        // Thread 0 owns the even sectors of block 0, thread 1 the odd ones.
                        for k in (t..8).step_by(2) {
                            disk.write_at(&sector, k * 512).expect("write");
                        }
                        for k in (t..8).step_by(2) {
                            disk.read_at(&mut buf, k * 512).expect("read");
                            if buf != sector {
                                lost.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer panicked");
        }
        let lost = lost.load(Ordering::Relaxed);
        if lost > 0 {
            failures.push(format!("{}: {lost} sectors lost a write", path.display()));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Many threads (more than the engine's copy-on-write slots, so requests park and travel in
/// shared runs) write one partial range into each of a stretch of neighbouring unallocated
/// clusters, interleaved so that neighbours are in flight together: every write lands in
/// its cluster with the rest of the cluster copied from the backing file, and nothing else.
fn neighbouring_copy_on_writes(setup: Setup) {
    const WRITERS: u64 = 16;
    let size = 8 * MIB;
    let fixture = fixture(setup, size, 7);
    let disk = open(&fixture.overlay, setup);
    let cs = setup.cluster_size;
    let clusters = size / cs;
    // Cluster c gets bytes [head, head+len) with head and len varying, never the whole
    // cluster, sector aligned only when the cluster is even (O_DIRECT bounces the rest).
    let range = move |c: u64| {
        let head = if c % 2 == 0 {
            (c % 3) * 512
        } else {
            c % 7 * 13
        };
        let len = (cs / 2 - (c % 5) * 512).max(512);
        (c * cs + head, len)
    };
    let start = Arc::new(Barrier::new(WRITERS as usize));
    let handles: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (disk, start) = (disk.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for c in (t..clusters).step_by(WRITERS as usize) {
                    let (at, len) = range(c);
                    disk.write_at(&pattern(1000 + c, len as usize), at)
                        .unwrap_or_else(|e| panic!("write into cluster {c}: {e}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer panicked");
    }
    disk.flush().expect("flush");
    let mut expected = fixture.base.to_vec();
    for c in 0..clusters {
        let (at, len) = range(c);
        expected[at as usize..(at + len) as usize]
            .copy_from_slice(&pattern(1000 + c, len as usize));
    }
    let what = format!("neighbouring copy-on-writes {setup:?}");
    finish(disk, &fixture, &expected, &what);
}

#[test]
fn neighbouring_copy_on_writes_in_flight_all_land() {
    if !have_qemu("neighbouring_copy_on_writes_in_flight_all_land") {
        return;
    }
    for setup in BUFFERED.into_iter().chain(DIRECT) {
        neighbouring_copy_on_writes(setup);
    }
}

/// A full disk part-way through neighbouring copy-on-writes in flight together: every
/// writer gets an answer (no writer waits for a run that failed), a failed write reports
/// the lack of space, and each write that succeeded reads back once space is back.
#[test]
fn a_failed_copy_on_write_run_answers_every_writer() {
    use storage::fault::{self, Fault, FaultPlan, Op};
    const WRITERS: u64 = 16;
    let setup = BUFFERED[0];
    let size = 8 * MIB;
    let fixture = fixture(setup, size, 9);
    let disk = open(&fixture.overlay, setup);
    let cs = setup.cluster_size;
    let clusters = size / cs;
    let start = Arc::new(Barrier::new(WRITERS as usize));
    let full = fault::inject(
        FaultPlan::fail_nth(40, Some(Op::Write), Fault::Enospc)
            .sticky()
            .under(fixture.overlay.parent().expect("dir")),
    );
    let handles: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (disk, start) = (disk.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut landed = Vec::new();
                for c in (t..clusters).step_by(WRITERS as usize) {
                    match disk.write_at(&[c as u8 | 1; 4096], c * cs + 512) {
                        Ok(()) => landed.push(c),
                        Err(e) => {
                            let text = e.to_string();
                            assert!(
                                text.contains("No space") || text.contains("no space"),
                                "cluster {c}: {text}"
                            );
                        }
                    }
                }
                landed
            })
        })
        .collect();
    let landed: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("writer panicked"))
        .collect();
    assert!(full.fired() > 0, "the disk never filled up");
    drop(full);
    assert!(landed.len() < clusters as usize, "no write failed");
    let mut buf = vec![0u8; 4096];
    for c in landed {
        disk.read_at(&mut buf, c * cs + 512).expect("read");
        assert!(
            buf.iter().all(|&b| b == c as u8 | 1),
            "cluster {c} lost its write"
        );
    }
    disk.flush().expect("flush once space is back");
}
