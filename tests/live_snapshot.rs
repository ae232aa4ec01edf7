//! External snapshots of three live disks under writer threads, every few milliseconds,
//! with injected failures that must roll all three disks back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snapshot::chain::BackingPath;
use snapshot::live_snapshot::{external_snapshot, external_snapshot_with, DiskOverlay};
use snapshot::Error;
use storage::LiveDisk;
use test_support::image::{open_rw, qcow2};
use test_support::model::{fill, verify, Model, Writers};
use test_support::pattern::{block_data, generation_of, BLOCK};
use test_support::qemu::{assert_check_clean, assert_qemu_chain};
use test_support::require::have_qemu;

const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / BLOCK;

struct Disk {
    live: Arc<LiveDisk>,
    model: Arc<Model>,
    chain: Vec<PathBuf>,
}

fn tops(disks: &[Disk]) -> Vec<PathBuf> {
    disks
        .iter()
        .map(|d| d.live.top().path().to_path_buf())
        .collect()
}

fn overlay_specs(disks: &[Disk], dir: &Path, round: usize) -> Vec<DiskOverlay> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let how = if round % 2 == 0 {
                BackingPath::Relative
            } else {
                BackingPath::Absolute
            };
            let mut spec = DiskOverlay::new(&d.live, dir.join(format!("d{i}.s{round}.qcow2")))
                .backing_path(how);
            // Mixed cluster sizes along each chain.
            spec.cluster_size = Some(if round % 3 == 0 { 16 << 10 } else { 64 << 10 });
            spec
        })
        .collect()
}

#[test]
fn atomic_snapshots_of_three_disks_under_writers_roll_back_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let disks: Vec<Disk> = (0..3)
        .map(|i| {
            let base = dir.path().join(format!("d{i}.base.qcow2"));
            qcow2(&base, SIZE, None);
            let model = Arc::new(Model::default());
            fill(&base, i, BLOCKS, 0, 7, 1, &model);
            Disk {
                live: LiveDisk::new(format!("vd{i}"), open_rw(&base)),
                model,
                chain: vec![base],
            }
        })
        .collect();
    let mut disks = disks;
    let writers: Vec<Writers> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| Writers::start(&d.live, i as u64, BLOCKS, &d.model, 2, Duration::ZERO))
        .collect();

    let mut taken = 0;
    let mut rolled_back = 0;
    for round in 0..24 {
        std::thread::sleep(Duration::from_millis(3));
        let specs = overlay_specs(&disks, dir.path(), round);
        let before = tops(&disks);
        match round % 4 {
            1 => {
                // The third disk's overlay path is taken: nothing may change, and the file
                // that was there must survive.
                let squatter = &specs[2].overlay;
                std::fs::write(squatter, b"not ours").unwrap();
                let err = external_snapshot(&specs).unwrap_err();
                assert!(matches!(err, Error::Exists { .. }), "{err}");
                assert_eq!(std::fs::read(squatter).unwrap(), b"not ours");
                std::fs::remove_file(squatter).unwrap();
                rolled_back += 1;
            }
            3 => {
                // The hook fails with all disks quiesced and flushed.
                let err =
                    external_snapshot_with(&specs, || Err("checkpoint failed".into())).unwrap_err();
                assert!(matches!(err, Error::Hook(_)), "{err}");
                rolled_back += 1;
            }
            _ => {
                let mut hook_ran = false;
                let report = external_snapshot_with(&specs, || {
                    hook_ran = true;
                    Ok(())
                })
                .unwrap();
                assert!(hook_ran);
                assert_eq!(report.old_tops, before);
                for (d, spec) in disks.iter_mut().zip(&specs) {
                    assert_eq!(d.live.top().path(), spec.overlay);
                    assert!(d.live.top().backing().is_some_and(|b| b.read_only()));
                    d.chain.insert(0, spec.overlay.clone());
                }
                taken += 1;
                continue;
            }
        }
        // Rolled back: every disk still on its old top, writable, and no new files.
        assert_eq!(tops(&disks), before, "round {round}");
        for (d, spec) in disks.iter().zip(&specs) {
            assert!(!d.live.top().read_only());
            assert!(
                !spec.overlay.exists(),
                "{} left behind",
                spec.overlay.display()
            );
        }
    }
    let writes: u64 = writers.into_iter().map(Writers::stop).sum();
    assert!(taken >= 10 && rolled_back >= 10);
    assert!(writes > 100, "writers made too little progress: {writes}");

    for (i, d) in disks.iter().enumerate() {
        let live = &d.live;
        verify(
            i as u64,
            BLOCKS,
            &d.model,
            |buf, at| live.read_at(buf, at).unwrap(),
            "live disk",
        );
    }
    let chains: Vec<Vec<PathBuf>> = disks.iter().map(|d| d.chain.clone()).collect();
    let models: Vec<Arc<Model>> = disks.iter().map(|d| d.model.clone()).collect();
    drop(disks);
    for (i, (chain, model)) in chains.iter().zip(&models).enumerate() {
        // Reopened from the files: every write is there.
        let dev = open_rw(&chain[0]);
        verify(
            i as u64,
            BLOCKS,
            model,
            |buf, at| dev.read_at(buf, at).unwrap(),
            "reopened chain",
        );
        drop(dev);
        if have_qemu("atomic_snapshots") {
            let layers: Vec<&Path> = chain.iter().map(PathBuf::as_path).collect();
            assert_qemu_chain(&chain[0], &layers);
            for layer in chain {
                assert_check_clean(layer);
            }
        }
    }
}

#[test]
fn snapshot_refuses_a_disk_twice_and_a_busy_disk() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2(&base, 1 << 20, None);
    let live = LiveDisk::new("vda", open_rw(&base));
    let a = DiskOverlay::new(&live, dir.path().join("a.qcow2"));
    let b = DiskOverlay::new(&live, dir.path().join("b.qcow2"));
    assert!(matches!(
        external_snapshot(&[a.clone(), b]),
        Err(Error::InvalidArgument(_))
    ));
    let claim = live.claim("stream").unwrap();
    assert!(matches!(
        external_snapshot(std::slice::from_ref(&a)),
        Err(Error::Busy(_))
    ));
    drop(claim);
    external_snapshot(&[a]).unwrap();
    assert_eq!(live.top().path(), dir.path().join("a.qcow2"));
}

/// A real raw image whose flushes fail once `fail` is set: how a disk error looks when an
/// old top is sealed after the switch (issue 13, finding 8).
struct FailingFlush {
    inner: Arc<dyn storage::BlockDevice>,
    fail: std::sync::atomic::AtomicBool,
}

impl storage::BlockDevice for FailingFlush {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> storage::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(storage::Error::io(
                self.inner.path(),
                "fsync",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> storage::Result<storage::BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn info(&self) -> storage::ImageInfo {
        self.inner.info()
    }
    fn backing(&self) -> Option<Arc<dyn storage::BlockDevice>> {
        self.inner.backing()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// Finding 8: sealing an old top fails after the disks switched. The overlays are the
/// disks' tops then, holding the guest's writes: the error says so, and they are kept.
#[test]
fn a_seal_failure_after_the_switch_keeps_the_live_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; SIZE as usize]).unwrap();
    let raw = storage::open(
        &base,
        &storage::OpenOptions {
            format: Some(storage::ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let failing = Arc::new(FailingFlush {
        inner: raw,
        fail: std::sync::atomic::AtomicBool::new(false),
    });
    let live = LiveDisk::new("vda", failing.clone());
    let overlay = dir.path().join("overlay.qcow2");
    let error = external_snapshot_with(&[DiskOverlay::new(&live, &overlay)], || {
        // Inside the critical section, after the top's flush in preparation: the seal's
        // flush is the next one.
        failing
            .fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    })
    .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, Error::AfterSwitch { .. }), "{text}");
    assert!(text.contains("overlay.qcow2"), "{text}");
    assert!(overlay.exists(), "the live overlay was removed");
    assert_eq!(live.top().path(), overlay.as_path());
    failing
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    live.write_at(&block_data(0, 3, 7), 3 * BLOCK).unwrap();
    live.flush().unwrap();
    drop(live);
    let reopened = open_rw(&overlay);
    let mut buf = vec![0u8; BLOCK as usize];
    reopened.read_at(&mut buf, 3 * BLOCK).unwrap();
    assert_eq!(generation_of(0, 3, &buf), Some(7));
}
