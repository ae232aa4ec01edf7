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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::qemu::assert_check_clean;
use test_support::require::{skip, Need};

/// The whole first boot, writes and jobs included; about 30 s under TCG here.
const FIRST_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A boot that only verifies.
const VERIFY_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DISK_MIB: u64 = 128;
const MEMORY_MIB: u64 = 256;

fn tool_runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The kernel and initramfs, built (or found cached) by the repository's script.
fn guest_fixture() -> Result<(PathBuf, PathBuf), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-initramfs.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let initramfs = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let kernel = initramfs.with_file_name("vmlinuz");
    if initramfs.is_file() && kernel.is_file() {
        Ok((kernel, initramfs))
    } else {
        Err(format!(
            "{} or {} missing",
            kernel.display(),
            initramfs.display()
        ))
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ctl(api: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_snapvmm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run snapvmm ctl");
    assert!(
        output.status.success(),
        "snapvmm ctl {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A QEMU guest on the daemon's socket, its console in a file.
struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: PathBuf,
}

impl Guest {
    fn boot(
        kernel: &Path,
        initramfs: &Path,
        socket: &Path,
        console: PathBuf,
        workload: &str,
    ) -> Guest {
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2"])
            .args(["-m", &MEMORY_MIB.to_string()])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
                "-machine",
                "memory-backend=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=blk,path={}", socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=blk,num-queues=2"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 snapvmm.workload={workload}"
            ))
            .args([
                "-nographic",
                "-nodefaults",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let stdin = child.stdin.take();
        Guest {
            child,
            stdin,
            console,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `needle`; panics (with the console) on timeout or exit.
    fn wait_for(&mut self, needle: &str, deadline: Instant) {
        loop {
            let text = self.text();
            if text.contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("QEMU exited ({status}) before {needle:?}; console:\n{text}");
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("no {needle:?} in time; console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `line` on the console. A guest that already ended its loop by itself (its round
    /// cap) has no reader left, which is not an error here.
    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush());
        }
    }

    /// Waits for QEMU to end by itself (the guest powered off).
    fn wait_exit(mut self, deadline: Instant) -> String {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let text = self.text();
                assert!(
                    status.success(),
                    "QEMU ended with {status}; console:\n{text}"
                );
                return text;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("QEMU did not end; console:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills the daemon if the test fails before shutting it down.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for_path(path: &Path, daemon: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!(
                "the daemon exited ({status}) before creating {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn linux_ext4_on_our_daemon_through_snapshot_stream_and_active_commit() {
    let test = "linux_ext4_on_our_daemon_through_snapshot_stream_and_active_commit";
    if !tool_runs("qemu-system-x86_64", "--version") {
        skip(
            Need::Qemu,
            test,
            "qemu-system-x86_64 not found (Debian package qemu-system-x86)",
        );
        return;
    }
    for (tool, arg) in [
        ("qemu-img", "--version"),
        ("mkfs.ext4", "-V"),
        ("e2fsck", "-V"),
    ] {
        if !tool_runs(tool, arg) {
            skip(Need::Qemu, test, format_args!("{tool} not found"));
            return;
        }
    }
    let (kernel, initramfs) = match guest_fixture() {
        Ok(fixture) => fixture,
        Err(reason) => {
            skip(Need::Qemu, test, format_args!("no guest fixture: {reason}"));
            return;
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let raw = path("fs.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", raw.to_str().unwrap()]);
    let base = path("base.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();

    let socket = path("blk.sock");
    let api = path("api.sock");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_snapvmm"))
            .arg("vhost-user-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(format!("path={},format=qcow2", base.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(["--num-queues", "2"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(path("daemon.log")).unwrap())
            .spawn()
            .expect("spawn snapvmm vhost-user-blk"),
    );
    wait_for_path(&socket, &mut daemon);
    wait_for_path(&api, &mut daemon);
    assert!(ctl(&api, &["domblklist"]).contains(base.to_str().unwrap()));

    let started = Instant::now();
    let deadline = started + FIRST_BOOT_TIMEOUT;
    let mut guest = Guest::boot(
        &kernel,
        &initramfs,
        &socket,
        path("console1.log"),
        "ext4-write-verify",
    );
    guest.wait_for("snapvmm: ext4-write-verify round 20", deadline);
    eprintln!("{test}: guest writing after {:.1?}", started.elapsed());

    // Live snapshot, stream it full, snapshot again, commit the active layer and pivot: all
    // while the guest writes and syncs.
    let s1 = path("base.s1.qcow2");
    let s2 = path("base.s1.s2.qcow2");
    ctl(&api, &["snapshot-create-as", "s1", "--disk-only"]);
    assert!(ctl(&api, &["domblklist"]).contains(s1.to_str().unwrap()));
    ctl(&api, &["blockpull", "vda", "--wait"]);
    guest.wait_for("snapvmm: ext4-write-verify round 40", deadline);
    ctl(&api, &["snapshot-create-as", "s2", "--disk-only"]);
    assert!(ctl(&api, &["domblklist"]).contains(s2.to_str().unwrap()));
    guest.wait_for("snapvmm: ext4-write-verify round 60", deadline);
    ctl(
        &api,
        &["blockcommit", "vda", "--active", "--pivot", "--wait"],
    );
    let list = ctl(&api, &["domblklist"]);
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
    let guest = Guest::boot(
        &kernel,
        &initramfs,
        &socket,
        path("console2.log"),
        "ext4-verify",
    );
    let console = guest.wait_exit(Instant::now() + VERIFY_BOOT_TIMEOUT);
    assert!(
        console.contains(&format!("snapvmm: ext4-verify ok {files}")),
        "the reconnected guest did not verify {files}; console:\n{console}"
    );

    ctl(&api, &["shutdown"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(path("daemon.log")).unwrap_or_default();
    assert!(status.success(), "daemon ended with {status}:\n{log}");

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
