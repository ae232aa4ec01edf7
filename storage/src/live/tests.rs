//! The live disk's gate, quiesce and switch under requests in flight.

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

/// A switch without a drain leaves a write in flight running on the old top and holds
/// nothing back for it, except a new write to the same cluster of the overlay: that one
/// copies the cluster up from the old top, so it waits for the old write to land (else the
/// overlay's copy would miss it). Settling, and a later quiesce, wait for it too.
#[test]
fn switch_all_leaves_requests_in_flight_and_orders_same_cluster_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let old_top: Arc<dyn BlockDevice> = Arc::new(HeldWrite {
        inner: raw(dir.path(), "base.raw"),
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(Some(release_rx)),
    });
    let disk = LiveDisk::new("vda", old_top.clone());
    let overlay_path = dir.path().join("overlay.qcow2");
    crate::qcow2::create(
        &overlay_path,
        &crate::qcow2::CreateOptions {
            size: Some(1 << 20),
            cluster_size: 65536,
            backing_file: Some(dir.path().join("base.raw").display().to_string()),
            backing_format: Some(crate::ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let overlay: Arc<dyn BlockDevice> = Arc::new(
        crate::qcow2::Qcow2Image::open_with(
            &overlay_path,
            false,
            &crate::OpenOptions::default(),
            |_, _| Ok(old_top.clone()),
        )
        .unwrap(),
    );

    // A write in flight on the old top, to the first sector of cluster 0.
    let in_flight = std::thread::spawn({
        let disk = disk.clone();
        move || disk.write_at(&[1; 512], 0).unwrap()
    });
    entered.recv().unwrap();

    let switch = std::thread::spawn({
        let (disk, old_top, overlay) = (disk.clone(), old_top.clone(), overlay.clone());
        move || {
            LiveDisk::switch_all(&[TopSwitch {
                disk: &disk,
                from: &old_top,
                to: overlay,
            }])
        }
    });
    assert!(
        finished(&switch),
        "the switch waited for a request in flight"
    );
    switch.join().unwrap().unwrap();
    assert!(Arc::ptr_eq(&disk.top(), &overlay));

    // Another cluster: runs at once, on the overlay.
    let elsewhere = std::thread::spawn({
        let disk = disk.clone();
        move || disk.write_at(&[3; 512], 65536).unwrap()
    });
    assert!(finished(&elsewhere), "a write to another cluster waited");
    elsewhere.join().unwrap();

    // The same cluster, another sector: waits for the old top's write.
    let same_cluster = std::thread::spawn({
        let disk = disk.clone();
        move || disk.write_at(&[2; 512], 4096).unwrap()
    });
    // Past the gate and waiting before the quiesce below closes the gate.
    std::thread::sleep(Duration::from_millis(50));
    let settle = std::thread::spawn({
        let disk = disk.clone();
        move || disk.settle()
    });
    let quiesce = std::thread::spawn({
        let disk = disk.clone();
        move || drop(disk.quiesce())
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!same_cluster.is_finished(), "a same-cluster write overtook");
    assert!(!settle.is_finished(), "settled with a write in flight");
    assert!(
        !quiesce.is_finished(),
        "a quiesce ignored the old top's write"
    );

    release.send(()).unwrap();
    in_flight.join().unwrap();
    same_cluster.join().unwrap();
    settle.join().unwrap();
    quiesce.join().unwrap();
    assert_eq!(disk.overlap_waits(), 1);

    // The overlay's copy of cluster 0 holds both writes.
    let mut back = [0u8; 4608];
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(&back[..512], &[1; 512], "the old top's write is lost");
    assert_eq!(&back[4096..], &[2; 512]);
    let mut other = [0u8; 512];
    disk.read_at(&mut other, 65536).unwrap();
    assert_eq!(other, [3; 512]);
}

/// A switch whose disk no longer has the expected top, or a new top of another size,
/// switches nothing.
#[test]
fn switch_all_refuses_a_changed_top_or_size() {
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<dyn BlockDevice> = Arc::new(raw(dir.path(), "a.raw"));
    let b: Arc<dyn BlockDevice> = Arc::new(raw(dir.path(), "b.raw"));
    let small = dir.path().join("small.raw");
    RawImage::create(&small, 4096).unwrap();
    let small: Arc<dyn BlockDevice> = Arc::new(RawImage::open(&small, false, false).unwrap());
    let disk = LiveDisk::new("vda", a.clone());
    let other = LiveDisk::new("vdb", b.clone());
    let stale = LiveDisk::switch_all(&[
        TopSwitch {
            disk: &other,
            from: &b,
            to: a.clone(),
        },
        TopSwitch {
            disk: &disk,
            from: &b,
            to: b.clone(),
        },
    ]);
    assert!(stale.is_err());
    assert!(
        Arc::ptr_eq(&other.top(), &b),
        "a disk switched in a failed set"
    );
    assert!(LiveDisk::switch_all(&[TopSwitch {
        disk: &disk,
        from: &a,
        to: small,
    }])
    .is_err());
    assert!(Arc::ptr_eq(&disk.top(), &a));
}

/// Whether `thread` ends within 10 seconds.
fn finished<T>(thread: &std::thread::JoinHandle<T>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    thread.is_finished()
}

/// Switches without a drain, back to back, while two writers share every cluster (each
/// owns alternate 4 KiB blocks): no request waits for itself or deadlocks with another,
/// and every block reads back as its writer last wrote it, through a chain of overlays
/// that each copied partial clusters up from a top with writes still in flight.
#[test]
fn switch_all_under_writers_sharing_clusters_loses_nothing_and_never_hangs() {
    const SIZE: u64 = 1 << 20;
    const BLOCK: usize = 4096;
    const SWITCHES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let overlay = move |n: usize, backing: Arc<dyn BlockDevice>| -> Arc<dyn BlockDevice> {
        let path = dir_path.join(format!("top{n}.qcow2"));
        crate::qcow2::create(
            &path,
            &crate::qcow2::CreateOptions {
                size: Some(SIZE),
                cluster_size: 65536,
                backing_file: Some(backing.path().display().to_string()),
                backing_format: Some(backing.info().format.unwrap_or(crate::ImageFormat::Raw)),
                ..Default::default()
            },
        )
        .unwrap();
        Arc::new(
            crate::qcow2::Qcow2Image::open_with(
                &path,
                false,
                &crate::OpenOptions::default(),
                |_, _| Ok(backing),
            )
            .unwrap(),
        )
    };
    let disk = LiveDisk::new("vda", Arc::new(raw(dir.path(), "base.raw")));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|owner| {
            let (disk, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || {
                let blocks = SIZE / BLOCK as u64;
                let mut last = vec![0u8; blocks as usize];
                let mut step = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    step += 1;
                    // Blocks of this writer only (alternate ones), spread over every cluster.
                    let block = (step * 7 % (blocks / 2)) * 2 + owner;
                    let value = (step % 250 + 1) as u8;
                    disk.write_at(&[value; BLOCK], block * BLOCK as u64)
                        .unwrap();
                    last[block as usize] = value;
                }
                last
            })
        })
        .collect();
    let switcher = std::thread::spawn({
        let disk = disk.clone();
        move || {
            for n in 0..SWITCHES {
                let from = disk.top();
                let to = overlay(n, from.clone());
                LiveDisk::switch_all(&[TopSwitch {
                    disk: &disk,
                    from: &from,
                    to,
                }])
                .unwrap();
                disk.settle();
            }
        }
    });
    assert!(
        finished(&switcher),
        "the switches hung (a request waiting for itself?)"
    );
    switcher.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for (owner, writer) in writers.into_iter().enumerate() {
        assert!(finished(&writer), "writer {owner} hung");
        let last = writer.join().unwrap();
        for (block, &value) in last.iter().enumerate() {
            if value == 0 {
                continue;
            }
            let mut back = [0u8; BLOCK];
            disk.read_at(&mut back, (block * BLOCK) as u64).unwrap();
            assert!(
                back.iter().all(|&b| b == value),
                "block {block} of writer {owner}: wrote {value}, reads {}",
                back[0]
            );
        }
    }
}
