//! Quiesced snapshots through a guest agent (issue 16).
//!
//! - A real Linux under QEMU-TCG on our vhost-user-blk daemon, with Debian's qemu-ga in the
//!   initramfs (scripts/build-initramfs.sh) on QEMU's `org.qemu.guest_agent.0` port, writing
//!   files on ext4 in a tight loop: `snapshot-create-as --quiesce` snapshots through
//!   `snapvmm ctl`, whose frozen images hold a clean ext4 (no journal recovery needed, and
//!   `e2fsck -fn` passes); one snapshot without `--quiesce` under the same load, reported
//!   (its image normally needs recovery: the point of the feature); a quiesced snapshot that
//!   fails after the freeze leaves the guest thawed (`agent-status` asks qemu-ga); the guest
//!   sees no error and every checksum verifies at the end.
//! - The daemon with an agent that is missing, hangs or answers garbage: `--quiesce` fails
//!   with a clear error, `--quiesce-best-effort` snapshots anyway (no QEMU needed).
//!
//! The QEMU test skips (printing why) without qemu-system-x86_64, qemu-img, mkfs.ext4, e2fsck,
//! dumpe2fs or a guest fixture, unless `SNAPVMM_REQUIRE_QEMU=1`.
//! `SNAPVMM_QUIESCE_ROUNDS=N` takes N quiesced snapshots (default 4) for the frozen-time
//! figures it prints.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use test_support::qemu_vm::{ext4_base, linux_guest, run_ok, Boot, Daemon, Guest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const DISK_MIB: u64 = 128;

/// The daemon serving `image`, its API in `dir`, its guest agent at `agent`.
fn daemon(dir: &Path, image: &Path, agent: &Path) -> Daemon {
    Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_snapvmm")),
        dir,
        &format!("path={}", image.display()),
        &["--guest-agent", &agent.to_string_lossy()],
    )
}

/// The daemon with an agent that is missing, never answers, or answers garbage: a quiesced
/// snapshot fails naming the agent and switches nothing; a best-effort one is taken.
#[test]
fn quiesce_without_a_working_agent_fails_or_proceeds_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "4M"],
    );
    let agent = dir.path().join("qga.sock");
    let daemon = daemon(dir.path(), &image, &agent);
    for case in ["missing", "hanging", "garbage"] {
        let _agent = match case {
            "missing" => None,
            behaviour => Some(fake_agent(&agent, behaviour == "garbage")),
        };
        let name = format!("{case}-q");
        let before = daemon.ctl(&["domblklist"]);
        let (ok, out, err) =
            daemon.ctl_raw(&["snapshot-create-as", &name, "--disk-only", "--quiesce"]);
        assert!(!ok, "{case}: a quiesced snapshot succeeded:\n{out}");
        assert!(err.contains("guest agent"), "{case}: {err}");
        assert_eq!(
            daemon.ctl(&["domblklist"]),
            before,
            "{case}: the disk was switched"
        );
        let name = format!("{case}-be");
        let result = daemon.ctl_json(&[
            "snapshot-create-as",
            &name,
            "--disk-only",
            "--quiesce",
            "--quiesce-best-effort",
        ]);
        assert_eq!(result["name"], name.as_str());
        assert!(result.get("frozen_us").is_none(), "{case}: {result}");
        let _ = std::fs::remove_file(&agent);
    }
    let chain = daemon.ctl(&["domblklist"]);
    assert!(chain.contains("garbage-be"), "{chain}");
    daemon.stop();
}

/// A stand-in agent on `path`: accepts connections, reads, and never answers (or answers
/// garbage), for the life of the returned listener thread's socket.
fn fake_agent(path: &Path, garbage: bool) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if garbage {
                        let _ = stream.write_all(b"\xff{not json\n{\"return\": \"x\"}\n");
                    }
                }
            });
        }
    })
}

/// The highest "round N" the guest printed.
fn last_round(guest: &Guest) -> u64 {
    guest
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("snapvmm: ext4-write-verify round "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Whether the ext4 in `image` (a qcow2 chain, flattened to raw) needs journal recovery;
/// `e2fsck -fn` must pass when it does not.
fn needs_recovery(image: &Path, scratch: &Path) -> bool {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    );
    let header = run_ok("dumpe2fs", &["-h", scratch.to_str().unwrap()]);
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string();
    let recovery = features.contains("needs_recovery");
    if !recovery {
        run_ok("e2fsck", &["-fn", scratch.to_str().unwrap()]);
    }
    std::fs::remove_file(scratch).unwrap();
    recovery
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[test]
fn linux_quiesced_snapshots_through_qemu_ga_hold_clean_ext4() {
    let test = "linux_quiesced_snapshots_through_qemu_ga_hold_clean_ext4";
    let Some(fixture) = linux_guest(test, &[("dumpe2fs", "-V")]) else {
        return;
    };
    let rounds: usize = std::env::var("SNAPVMM_QUIESCE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4)
        .max(1);

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let base = ext4_base(dir.path(), DISK_MIB);
    let agent = path("qga.sock");
    let daemon = daemon(dir.path(), &base, &agent);

    let started = Instant::now();
    let deadline = started + BOOT_TIMEOUT;
    let mut guest = Guest::boot(
        &Boot {
            kernel: &fixture.0,
            initramfs: &fixture.1,
            socket: &daemon.socket,
            num_queues: 1,
            workload: "ext4-write-verify",
            agent: Some(&agent),
        },
        path("console.log"),
    );
    guest.wait_for("snapvmm: guest agent on", deadline);
    guest.wait_for("snapvmm: ext4-write-verify round 20", deadline);
    eprintln!("{test}: guest writing after {:.1?}", started.elapsed());
    let status = daemon.ctl_json(&["agent-status"]);
    assert_eq!(status["fsfreeze"], "thawed", "{status}");

    // Quiesced snapshots under load: each frozen image holds a clean ext4.
    let mut frozen = Vec::new();
    let mut frozen_images = Vec::new();
    for i in 0..rounds {
        let before = last_round(&guest);
        let name = format!("q{i}");
        let result = daemon.ctl_json(&["snapshot-create-as", &name, "--disk-only", "--quiesce"]);
        let us = result["frozen_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("no frozen_us: {result}"));
        frozen.push(us);
        frozen_images.push(PathBuf::from(
            result["disks"][0]["previous"].as_str().unwrap(),
        ));
        // The guest writes again between snapshots.
        guest.wait_for(
            &format!(
                "snapvmm: ext4-write-verify round {}",
                (before / 20 + 1) * 20
            ),
            deadline,
        );
    }
    // The first and the last frozen images, checked in full (each check copies the disk).
    let mut checked = vec![frozen_images[0].clone()];
    if rounds > 1 {
        checked.push(frozen_images[rounds - 1].clone());
    }
    for image in &checked {
        assert!(
            !needs_recovery(image, &path("check.raw")),
            "quiesced image {} needs journal recovery",
            image.display()
        );
    }

    // One snapshot without --quiesce under the same load, for comparison.
    let result = daemon.ctl_json(&["snapshot-create-as", "u0", "--disk-only"]);
    let unquiesced = PathBuf::from(result["disks"][0]["previous"].as_str().unwrap());
    let recovery = needs_recovery(&unquiesced, &path("check.raw"));
    eprintln!(
        "{test}: unquiesced snapshot image {} journal recovery",
        if recovery { "needs" } else { "does not need" }
    );

    // A quiesced snapshot failing after the freeze (its overlay's file is in the way): the
    // guest is thawed and keeps writing.
    let top = PathBuf::from(
        daemon.ctl_json(&["domblklist"])[0]["source"]
            .as_str()
            .unwrap(),
    );
    let stem = top.file_stem().unwrap().to_string_lossy().into_owned();
    std::fs::write(
        top.with_file_name(format!("{stem}.blocked.qcow2")),
        b"in the way",
    )
    .unwrap();
    let (ok, out, err) =
        daemon.ctl_raw(&["snapshot-create-as", "blocked", "--disk-only", "--quiesce"]);
    assert!(!ok, "the blocked snapshot succeeded:\n{out}");
    eprintln!("{test}: blocked snapshot: {}", err.trim());
    let status = daemon.ctl_json(&["agent-status"]);
    assert_eq!(status["fsfreeze"], "thawed", "left frozen: {status}");
    let before = last_round(&guest);
    guest.wait_for(
        &format!(
            "snapvmm: ext4-write-verify round {}",
            (before / 20 + 1) * 20
        ),
        deadline,
    );

    guest.send("stop\n");
    guest.wait_for("snapvmm: init: done", deadline);
    let text = guest.text();
    assert!(
        text.contains("snapvmm: ext4-write-verify ok"),
        "the guest's checksums did not verify; console:\n{text}"
    );
    assert!(!text.contains("FAILED"), "console:\n{text}");
    let _ = guest.wait_until(deadline);
    daemon.stop();

    frozen.sort_unstable();
    eprintln!(
        "{test}: {rounds} quiesced snapshots, frozen p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (total {:.1?})",
        percentile(&frozen, 50.0) as f64 / 1000.0,
        percentile(&frozen, 99.0) as f64 / 1000.0,
        frozen[rounds - 1] as f64 / 1000.0,
        started.elapsed()
    );
}
