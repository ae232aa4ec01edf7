//! Running the `snapvmm` binary from a test: commands with a deadline, `snapvmm ctl`, and a
//! `snapvmm run --api-socket` child ([`RunningVm`]). The binary's path comes from the test
//! ([`Snapvmm::new`] or [`crate::snapvmm_binary!`]), since cargo tells it only to the
//! package's own integration tests and benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::image::qcow2;

/// How long a [`RunningVm`] waits for anything.
const VM_TIMEOUT: Duration = Duration::from_secs(30);

/// The `snapvmm` binary under test.
#[derive(Debug, Clone)]
pub struct Snapvmm {
    path: PathBuf,
}

impl Snapvmm {
    /// The binary at `path` (a test passes `env!("CARGO_BIN_EXE_snapvmm")`).
    pub fn new(path: impl Into<PathBuf>) -> Snapvmm {
        Snapvmm { path: path.into() }
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `snapvmm` command.
    pub fn command(&self) -> Command {
        Command::new(&self.path)
    }

    /// `snapvmm ctl --api-socket SOCKET ARGS`, whatever its exit status.
    pub fn ctl(&self, socket: &Path, args: &[&str]) -> Output {
        self.command()
            .arg("ctl")
            .arg("--api-socket")
            .arg(socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {} ctl: {e}", self.path.display()))
    }

    /// `snapvmm ctl` that must succeed; returns its stdout. `context` goes into the failure.
    pub fn ctl_ok(&self, socket: &Path, args: &[&str], context: impl FnOnce() -> String) -> String {
        let output = self.ctl(socket, args);
        assert!(
            output.status.success(),
            "ctl {args:?} failed: {}{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            context()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `builtin:io-loop` on a fresh `disk_size`-byte qcow2 disk (`base.qcow2` in its
    /// own directory) and waits until its API socket accepts.
    pub fn start_vm(&self, disk_size: u64) -> RunningVm {
        let dir = tempfile::tempdir().expect("temporary directory");
        let base = dir.path().join("base.qcow2");
        qcow2(&base, disk_size, None);
        self.launch_vm(dir, "builtin:io-loop", &base)
    }

    /// Runs `guest` (`builtin:WORKLOAD`) on the image `disk`, with the API socket and serial
    /// log in `dir`, and waits until the socket accepts.
    pub fn launch_vm(&self, dir: tempfile::TempDir, guest: &str, disk: &Path) -> RunningVm {
        let socket = dir.path().join("api.sock");
        let serial = dir.path().join("serial.log");
        let child = self
            .command()
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
            .unwrap_or_else(|e| panic!("spawn {} run: {e}", self.path.display()));
        let mut vm = RunningVm {
            snapvmm: self.clone(),
            dir,
            child: Some(child),
            socket,
            serial,
        };
        let deadline = Instant::now() + VM_TIMEOUT;
        // Connectable, not merely present: the file appears at bind(), before listen().
        while std::os::unix::net::UnixStream::connect(&vm.socket).is_err() {
            if let Some(status) = vm.try_wait() {
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
}

/// Runs `command` to completion with its output captured; kills it and fails the test
/// after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
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
        if let Some(status) = child.try_wait().expect("wait for the child") {
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
            "{:?} did not finish in {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            command.get_program(),
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

/// A `snapvmm run --guest builtin:WORKLOAD --api-socket` child, started by
/// [`Snapvmm::start_vm`] or [`Snapvmm::launch_vm`]; killed on drop if still running.
pub struct RunningVm {
    snapvmm: Snapvmm,
    dir: tempfile::TempDir,
    /// None only once [`RunningVm::stderr`] has collected it.
    child: Option<Child>,
    /// The API socket.
    pub socket: PathBuf,
    serial: PathBuf,
}

impl RunningVm {
    /// A file in the VM's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The process id of `snapvmm run`, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child's exit status if it has ended.
    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("wait for snapvmm run")
    }

    /// Kills the VM and returns its stderr.
    fn stderr(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let _ = child.kill();
        match child.wait_with_output() {
            Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
            Err(e) => format!("(stderr unreadable: {e})"),
        }
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
        self.snapvmm.ctl(&self.socket, args)
    }

    /// `snapvmm ctl ARGS`, which must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        self.snapvmm.ctl_ok(&self.socket, args, || {
            format!("\nserial:\n{}", self.serial())
        })
    }

    /// Shuts the VM down through the API and waits for the process to end cleanly;
    /// returns its directory and serial console.
    pub fn shutdown(mut self) -> (tempfile::TempDir, String) {
        self.ctl_ok(&["shutdown"]);
        let deadline = Instant::now() + VM_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                assert!(status.success(), "snapvmm run: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "the VM did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.socket.exists(), "the socket is removed on exit");
        let serial = self.serial();
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().expect("temporary directory"),
        );
        (dir, serial)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
