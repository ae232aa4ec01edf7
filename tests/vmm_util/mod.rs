//! Shared by the tests that run the VMM (`vmm_micro_guest`, `vmm_checkpoint`, `vmm_linux`, `api_e2e`,
//! `api_ctl`, `demo`):
//! the KVM skip rule, running `snapvmm` with a deadline, qcow2 disks, `snapvmm ctl`, and a
//! `snapvmm run --api-socket` child.
//!
//! KVM tests start with `if !vmm_util::kvm_or_skip("name") { return; }`: without a usable
//! /dev/kvm the test prints why and passes, unless `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use storage::qcow2::{create, CreateOptions};
use storage::ImageFormat;

/// The binary under test.
pub const SNAPVMM: &str = env!("CARGO_BIN_EXE_snapvmm");

/// Whether KVM is usable. Otherwise prints why `test` is skipped and returns false, or
/// panics when `SNAPVMM_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> bool {
    match vmm::check_kvm() {
        Ok(()) => true,
        Err(reason) => {
            if std::env::var("SNAPVMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: KVM required (SNAPVMM_REQUIRE_KVM=1) but unusable: {reason}");
            }
            eprintln!("skipping {test}: KVM unusable: {reason}");
            false
        }
    }
}

/// A `snapvmm` command.
pub fn snapvmm() -> Command {
    Command::new(SNAPVMM)
}

/// Runs `command` to completion with its output captured; kills it and fails the test
/// after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvmm");
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "snapvmm did not finish in {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// The stdout of a command that must have succeeded; fails with both streams otherwise.
pub fn assert_success(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "snapvmm failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Creates a qcow2 image of `size` bytes at `path`, on `backing` (a qcow2) if given.
pub fn qcow2(path: &Path, size: u64, backing: Option<&Path>) {
    create(
        path,
        &CreateOptions {
            size: Some(size),
            backing_file: backing.map(|b| b.to_str().unwrap().to_string()),
            backing_format: backing.map(|_| ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap();
}

/// `qemu-img check` must pass on `path`; skipped with a note where qemu-img is missing.
pub fn qemu_img_check(path: &Path) {
    match Command::new("qemu-img").arg("check").arg(path).output() {
        Ok(output) => assert!(
            output.status.success(),
            "qemu-img check {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => eprintln!("qemu-img unavailable ({e}): skipping its check"),
    }
}

/// `snapvmm ctl --api-socket SOCKET ARGS`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    snapvmm()
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run snapvmm ctl")
}

/// `snapvmm ctl` that must succeed; returns its stdout. `context` goes into the failure.
pub fn ctl_ok(socket: &Path, args: &[&str], context: impl FnOnce() -> String) -> String {
    let output = ctl(socket, args);
    assert!(
        output.status.success(),
        "ctl {args:?} failed: {}{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        context()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How long a `RunningVm` waits for anything.
const VM_TIMEOUT: Duration = Duration::from_secs(30);

/// A `snapvmm run --guest builtin:WORKLOAD --api-socket` child, by default `io-loop` on a
/// fresh qcow2 disk (`base.qcow2` in its own directory); killed on drop if still running.
pub struct RunningVm {
    dir: tempfile::TempDir,
    child: Child,
    /// The API socket.
    pub socket: PathBuf,
    serial: PathBuf,
}

impl RunningVm {
    /// Starts the VM with a `disk_size`-byte disk and waits until its API socket accepts.
    pub fn start(disk_size: u64) -> RunningVm {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qcow2(&base, disk_size, None);
        RunningVm::launch(dir, "builtin:io-loop", &base)
    }

    /// Runs `guest` (`builtin:WORKLOAD`) on the image `disk`, with the API socket and serial
    /// log in `dir`, and waits until the socket accepts.
    pub fn launch(dir: tempfile::TempDir, guest: &str, disk: &Path) -> RunningVm {
        let socket = dir.path().join("api.sock");
        let serial = dir.path().join("serial.log");
        let child = snapvmm()
            .arg("run")
            .args(["--guest", guest, "--disk"])
            .arg(format!("path={}", disk.display()))
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn snapvmm run");
        let mut vm = RunningVm {
            dir,
            child,
            socket,
            serial,
        };
        let deadline = Instant::now() + VM_TIMEOUT;
        // Connectable, not merely present: the file appears at bind(), before listen().
        while std::os::unix::net::UnixStream::connect(&vm.socket).is_err() {
            if let Some(status) = vm.child.try_wait().unwrap() {
                panic!("snapvmm run exited early ({status}): {}", vm.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no API socket after {VM_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    /// A file in the VM's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Kills the VM and returns its stderr.
    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let output = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn progress_lines(&self) -> usize {
        self.serial()
            .lines()
            .filter(|l| l.starts_with("io-loop ops "))
            .count()
    }

    /// Waits for the guest's next `io-loop ops` progress line (one comes every fraction of
    /// a second of guest time): the guest-side sign that its I/O goes on.
    pub fn wait_progress(&self) {
        let before = self.progress_lines();
        let deadline = Instant::now() + VM_TIMEOUT;
        while self.progress_lines() == before {
            assert!(
                Instant::now() < deadline,
                "no io-loop progress in {VM_TIMEOUT:?}; serial:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the guest writes to `file` (its length or modification time changes):
    /// the host-side sign that I/O goes on through that layer.
    pub fn wait_written(&self, file: &Path) {
        let stamp = |f: &Path| {
            std::fs::metadata(f)
                .map(|m| (m.len(), m.modified().ok()))
                .ok()
        };
        let before = stamp(file);
        let deadline = Instant::now() + VM_TIMEOUT;
        while stamp(file) == before {
            assert!(
                Instant::now() < deadline,
                "the guest did not write to {}; serial:\n{}",
                file.display(),
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `snapvmm ctl` on this VM.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.socket, args)
    }

    /// `snapvmm ctl ARGS`, which must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        ctl_ok(&self.socket, args, || {
            format!("\nserial:\n{}", self.serial())
        })
    }

    /// Shuts the VM down through the API and waits for the process to end cleanly;
    /// returns its directory and serial console.
    pub fn shutdown(mut self) -> (tempfile::TempDir, String) {
        self.ctl_ok(&["shutdown"]);
        let deadline = Instant::now() + VM_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "snapvmm run: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "the VM did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.socket.exists(), "the socket is removed on exit");
        let serial = self.serial();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, serial)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `counter N` values the `counter` workload printed in `text`, in order.
pub fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The last `counter N` value in `text` (0 before the first).
pub fn last_counter(text: &str) -> u64 {
    counters(text).last().copied().unwrap_or(0)
}
