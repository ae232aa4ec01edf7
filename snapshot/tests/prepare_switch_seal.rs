//! The external snapshot split in three ([`snapshot::live_snapshot::prepare`], then
//! `switch`, then `seal`), with injected file-system faults: a failure while preparing
//! leaves nothing behind, and nothing after the switch ever removes a disk's live top.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::live_snapshot::{prepare, DiskOverlay};
use snapshot::Error;
use storage::fault::{self, Fault, FaultPlan};
use storage::qcow2::{create, CreateOptions};
use storage::{LiveDisk, OpenOptions};

const SIZE: u64 = 4 << 20;

/// Two live disks in `dir`, each with a distinct byte written at offset 0 and flushed.
fn disks(dir: &Path) -> Vec<Arc<LiveDisk>> {
    (0..2u8)
        .map(|i| {
            let path = dir.join(format!("d{i}.qcow2"));
            create(
                &path,
                &CreateOptions {
                    size: Some(SIZE),
                    ..Default::default()
                },
            )
            .expect("create base");
            let top = storage::open(&path, &OpenOptions::default()).expect("open base");
            let disk = LiveDisk::new(format!("vd{i}"), top);
            disk.write_at(&[i + 1; 4096], 0).expect("write");
            disk.flush().expect("flush");
            disk
        })
        .collect()
}

fn specs(disks: &[Arc<LiveDisk>], dir: &Path) -> Vec<DiskOverlay> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskOverlay::new(d, dir.join(format!("d{i}.snap.qcow2"))))
        .collect()
}

fn tops(disks: &[Arc<LiveDisk>]) -> Vec<PathBuf> {
    disks.iter().map(|d| d.top().path().to_path_buf()).collect()
}

/// Each disk still reads what was written at offset 0 (`first` + its index).
fn assert_data(disks: &[Arc<LiveDisk>], first: u8) {
    for (i, disk) in disks.iter().enumerate() {
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, 0).expect("read");
        assert!(
            buf.iter().all(|&b| b == first + i as u8),
            "disk {i} lost its data"
        );
    }
}

#[test]
fn a_failure_at_any_step_of_prepare_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let disks = disks(dir.path());
    let before = tops(&disks);
    let counting = fault::inject(FaultPlan::count_only().under(dir.path()));
    drop(prepare(&specs(&disks, dir.path())).expect("prepare"));
    let steps = counting.count();
    drop(counting);
    assert!(steps > 2, "prepare did {steps} file operations");
    // The unswitched snapshot was dropped: its overlays are gone.
    for spec in specs(&disks, dir.path()) {
        assert!(
            !spec.overlay.exists(),
            "{} left behind",
            spec.overlay.display()
        );
    }
    let mut failed = 0;
    for nth in 1..=steps {
        let armed = fault::inject(FaultPlan::fail_nth(nth, None, Fault::Eio).under(dir.path()));
        let result = prepare(&specs(&disks, dir.path()));
        drop(armed);
        match result {
            // The one step whose failure is only logged: the directory's fsync.
            Ok(prepared) => drop(prepared),
            Err(_) => failed += 1,
        }
        for spec in specs(&disks, dir.path()) {
            assert!(
                !spec.overlay.exists(),
                "step {nth}: {} left behind",
                spec.overlay.display()
            );
        }
        assert_eq!(tops(&disks), before, "step {nth}: a disk moved");
        for disk in &disks {
            assert_eq!(
                disk.owner(),
                None,
                "step {nth}: {} still claimed",
                disk.name()
            );
        }
        assert_data(&disks, 1);
    }
    assert!(failed > 0, "no injected fault made prepare fail");
}

#[test]
fn a_failing_seal_keeps_the_live_tops_and_the_guest_writes_in_them() {
    let dir = tempfile::tempdir().unwrap();
    let disks = disks(dir.path());
    let specs = specs(&disks, dir.path());
    let mut prepared = prepare(&specs).expect("prepare");
    // Writes between prepare and switch land in the old tops (a new cluster each: metadata
    // to write back), which the seal must then make durable.
    for (i, disk) in disks.iter().enumerate() {
        disk.write_at(&[i as u8 + 31; 4096], 1 << 20)
            .expect("write");
    }
    prepared.switch(|| Ok(())).expect("switch");
    let overlays: Vec<PathBuf> = specs.iter().map(|s| s.overlay.clone()).collect();
    assert_eq!(tops(&disks), overlays);
    // The guest writes into the new tops before the seal.
    for (i, disk) in disks.iter().enumerate() {
        disk.write_at(&[i as u8 + 11; 4096], 0).expect("write");
    }
    // Every file write and flush fails from now on: sealing (writing back and flushing the
    // old tops) cannot succeed.
    let armed = fault::inject(
        FaultPlan::fail_nth(1, None, Fault::Eio)
            .sticky()
            .under(dir.path()),
    );
    let sealed = prepared.seal();
    drop(armed);
    match sealed {
        Err(Error::AfterSwitch { live, .. }) => assert_eq!(live, overlays),
        other => panic!("sealing under failing flushes: {other:?}"),
    }
    for overlay in &overlays {
        assert!(overlay.exists(), "{} was removed", overlay.display());
    }
    assert_eq!(tops(&disks), overlays);
    assert_data(&disks, 11);
    for (i, disk) in disks.iter().enumerate() {
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, 1 << 20).expect("read");
        assert!(
            buf.iter().all(|&b| b == i as u8 + 31),
            "disk {i} lost a write"
        );
    }
    // The disks were released and flush again once the device recovers.
    for disk in &disks {
        assert_eq!(disk.owner(), None);
        disk.flush().expect("flush after the fault");
    }
}

#[test]
fn a_switched_snapshot_dropped_unsealed_keeps_its_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let disks = disks(dir.path());
    let specs = specs(&disks, dir.path());
    let mut prepared = prepare(&specs).expect("prepare");
    prepared.switch(|| Ok(())).expect("switch");
    assert!(prepared.switch(|| Ok(())).is_err(), "switched twice");
    drop(prepared);
    for spec in &specs {
        assert!(
            spec.overlay.exists(),
            "{} was removed",
            spec.overlay.display()
        );
    }
    for (i, disk) in disks.iter().enumerate() {
        disk.write_at(&[i as u8 + 21; 4096], 0).expect("write");
        disk.flush().expect("flush");
    }
    assert_data(&disks, 21);
}

#[test]
fn a_failing_hook_or_a_seal_before_the_switch_removes_the_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let disks = disks(dir.path());
    let before = tops(&disks);
    let specs = specs(&disks, dir.path());

    let mut prepared = prepare(&specs).expect("prepare");
    assert!(prepared.switch(|| Err("hook failed".into())).is_err());
    assert!(!prepared.is_switched());
    assert_eq!(tops(&disks), before);
    drop(prepared);
    for spec in &specs {
        assert!(
            !spec.overlay.exists(),
            "{} left behind",
            spec.overlay.display()
        );
    }

    let prepared = prepare(&specs).expect("prepare again");
    assert!(prepared.seal().is_err(), "sealed without a switch");
    for spec in &specs {
        assert!(
            !spec.overlay.exists(),
            "{} left behind",
            spec.overlay.display()
        );
    }
    assert_eq!(tops(&disks), before);
    assert_data(&disks, 1);
}
