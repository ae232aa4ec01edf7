//! Our storage as a disk for a real Linux under QEMU: `snapvmm vhost-user-blk` serves a qcow2
//! holding ext4 (made on the host with mkfs.ext4) to QEMU's vhost-user-blk-pci frontend; the
//! guest (Debian's cloud kernel and our busybox initramfs, from scripts/build-initramfs.sh)
//! writes files with recorded checksums while the test, through `snapvmm ctl`, takes a live
//! disk-only snapshot, streams it, takes another and commits actively with pivot. The guest
//! then verifies every checksum; a second QEMU connects to the same daemon (reconnect) and
//! verifies them again; on the host `qemu-img check` is clean on every image and `e2fsck -fn`
//! on the final disk.
//!
//! The guest, the frontend and the filesystem are not ours: only the backend is.
//!
//! Skips (printing why) without qemu-system-x86_64, qemu-img, mkfs.ext4/e2fsck or a guest
//! fixture, unless `SNAPVMM_REQUIRE_QEMU=1` (CI sets it), which turns a skip into a failure.

use std::path::Path;
use std::time::{Duration, Instant};

use test_support::qemu::assert_check_clean;
use test_support::qemu_vm::{ext4_base, linux_guest, run_ok, Boot, Daemon, Guest};

/// The whole first boot, writes and jobs included; about 30 s under TCG here.
const FIRST_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A boot that only verifies.
const VERIFY_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DISK_MIB: u64 = 128;

/// Boots the fixture on `socket` running `workload`, its console in `console`.
fn boot(
    fixture: &(std::path::PathBuf, std::path::PathBuf),
    socket: &Path,
    console: std::path::PathBuf,
    workload: &str,
) -> Guest {
    Guest::boot(
        &Boot {
            kernel: &fixture.0,
            initramfs: &fixture.1,
            socket,
            num_queues: 2,
            workload,
            agent: None,
        },
        console,
    )
}

#[test]
fn linux_ext4_on_our_daemon_through_snapshot_stream_and_active_commit() {
    let test = "linux_ext4_on_our_daemon_through_snapshot_stream_and_active_commit";
    let Some(fixture) = linux_guest(test, &[]) else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let base = ext4_base(dir.path(), DISK_MIB);
    let daemon = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_snapvmm")),
        dir.path(),
        &format!("path={},format=qcow2", base.display()),
        &["--num-queues", "2"],
    );
    let ctl = |args: &[&str]| daemon.ctl(args);
    assert!(ctl(&["domblklist"]).contains(base.to_str().unwrap()));

    let started = Instant::now();
    let deadline = started + FIRST_BOOT_TIMEOUT;
    let mut guest = boot(
        &fixture,
        &daemon.socket,
        path("console1.log"),
        "ext4-write-verify",
    );
    guest.wait_for("snapvmm: ext4-write-verify round 20", deadline);
    eprintln!("{test}: guest writing after {:.1?}", started.elapsed());

    // Live snapshot, stream it full, snapshot again, commit the active layer and pivot: all
    // while the guest writes and syncs.
    let s1 = path("base.s1.qcow2");
    let s2 = path("base.s1.s2.qcow2");
    ctl(&["snapshot-create-as", "s1", "--disk-only"]);
    assert!(ctl(&["domblklist"]).contains(s1.to_str().unwrap()));
    ctl(&["blockpull", "vda", "--wait"]);
    guest.wait_for("snapvmm: ext4-write-verify round 40", deadline);
    ctl(&["snapshot-create-as", "s2", "--disk-only"]);
    assert!(ctl(&["domblklist"]).contains(s2.to_str().unwrap()));
    guest.wait_for("snapvmm: ext4-write-verify round 60", deadline);
    ctl(&["blockcommit", "vda", "--active", "--pivot", "--wait"]);
    let list = ctl(&["domblklist"]);
    assert!(
        list.contains(s1.to_str().unwrap()) && !list.contains(s2.to_str().unwrap()),
        "after the pivot the active layer is s1:\n{list}"
    );
    guest.wait_for("snapvmm: ext4-write-verify round 80", deadline);
    eprintln!("{test}: jobs done after {:.1?}", started.elapsed());

    guest.send("stop\n");
    let console = guest.wait_exit(deadline);
    assert!(
        console.contains("snapvmm: ext4-write-verify ok"),
        "the guest's checksums did not verify; console:\n{console}"
    );
    let files = console
        .lines()
        .find_map(|l| l.strip_prefix("snapvmm: ext4-write-verify ok "))
        .unwrap()
        .trim()
        .to_string();
    eprintln!(
        "{test}: first guest verified {files} after {:.1?}",
        started.elapsed()
    );

    // A second QEMU on the same daemon: the reconnect finds the (pivoted) disk and data.
    let guest = boot(
        &fixture,
        &daemon.socket,
        path("console2.log"),
        "ext4-verify",
    );
    let console = guest.wait_exit(Instant::now() + VERIFY_BOOT_TIMEOUT);
    assert!(
        console.contains(&format!("snapvmm: ext4-verify ok {files}")),
        "the reconnected guest did not verify {files}; console:\n{console}"
    );

    daemon.stop();

    for image in [&base, &s1, &s2] {
        assert_check_clean(image);
    }
    // s1 holds everything: the stream emptied base into it, the commit s2's writes.
    let info = run_ok(
        "qemu-img",
        &["info", "--backing-chain", s1.to_str().unwrap()],
    );
    assert!(
        !info.contains("backing file:"),
        "s1 still has a backing file:\n{info}"
    );
    let flat = path("final.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            s1.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    run_ok("e2fsck", &["-fn", flat.to_str().unwrap()]);
}
