//! A real Linux under QEMU-TCG on `snapvmm vhost-user-blk`: the harness the whole-system tests
//! that boot Debian's kernel and our initramfs share (`tests/vhost_user_blk.rs`,
//! `tests/guest_agent.rs`). It finds the guest fixture, makes an ext4 base image, runs the
//! daemon and `snapvmm ctl`, boots QEMU with its console in a file, and watches that console.
//!
//! Every wait here has a deadline and panics with what it saw (the console, the daemon's log);
//! the child processes are killed when a test fails before ending them itself.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::require::{skip, Need};

/// The guest's memory, in MiB (shared memfd: vhost-user maps it).
pub const MEMORY_MIB: u64 = 256;

/// Whether `tool arg` starts at all (its exit status is not judged: some tools print their
/// version and exit non-zero).
pub fn tool_runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The kernel and initramfs, built (or found cached) by the repository's
/// `scripts/build-initramfs.sh`.
pub fn guest_fixture() -> Result<(PathBuf, PathBuf), String> {
    // This crate lives one level below the repository root.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-initramfs.sh");
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

/// The guest fixture `(kernel, initramfs)` if qemu-system-x86_64, qemu-img, mkfs.ext4, e2fsck
/// and `extra_tools` (each `(tool, version argument)`) all run and the fixture builds;
/// otherwise [`skip`]s `test` under [`Need::Qemu`] and returns `None`.
#[track_caller]
pub fn linux_guest(test: &str, extra_tools: &[(&str, &str)]) -> Option<(PathBuf, PathBuf)> {
    if !tool_runs("qemu-system-x86_64", "--version") {
        skip(
            Need::Qemu,
            test,
            "qemu-system-x86_64 not found (Debian package qemu-system-x86)",
        );
        return None;
    }
    let base = [
        ("qemu-img", "--version"),
        ("mkfs.ext4", "-V"),
        ("e2fsck", "-V"),
    ];
    for &(tool, arg) in base.iter().chain(extra_tools) {
        if !tool_runs(tool, arg) {
            skip(Need::Qemu, test, format_args!("{tool} not found"));
            return None;
        }
    }
    match guest_fixture() {
        Ok(fixture) => Some(fixture),
        Err(reason) => {
            skip(Need::Qemu, test, format_args!("no guest fixture: {reason}"));
            None
        }
    }
}

/// Runs `program args`, which must succeed; returns its stdout.
#[track_caller]
pub fn run_ok(program: &str, args: &[&str]) -> String {
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

/// `dir/base.qcow2`: a fresh `mib`-MiB ext4 made by mkfs.ext4 on the host, converted to qcow2.
pub fn ext4_base(dir: &Path, mib: u64) -> PathBuf {
    let raw = dir.join("fs.raw");
    File::create(&raw)
        .and_then(|f| f.set_len(mib << 20))
        .unwrap_or_else(|e| panic!("create {}: {e}", raw.display()));
    run_ok("mkfs.ext4", &["-q", "-F", &raw.to_string_lossy()]);
    let base = dir.join("base.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.to_string_lossy(),
            &base.to_string_lossy(),
        ],
    );
    let _ = std::fs::remove_file(&raw);
    base
}

/// A child process the test still owns: killed (and reaped) when dropped while running.
#[derive(Debug)]
pub struct Owned(pub Child);

impl Drop for Owned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `snapvmm vhost-user-blk` serving one disk, with its block socket, API socket and log
/// (`daemon.log`) in a test's directory.
#[derive(Debug)]
pub struct Daemon {
    process: Owned,
    binary: PathBuf,
    /// The vhost-user socket QEMU connects to (`blk.sock`).
    pub socket: PathBuf,
    /// The API socket `snapvmm ctl` talks to (`api.sock`).
    pub api: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary vhost-user-blk --disk DISK ... EXTRA` in `dir` and waits until both of
    /// its sockets exist.
    pub fn start(binary: &Path, dir: &Path, disk: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join("blk.sock");
        let api = dir.join("api.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(binary)
            .arg("vhost-user-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(File::create(&log).expect("create daemon.log"))
            .spawn()
            .expect("spawn snapvmm vhost-user-blk");
        let mut daemon = Daemon {
            process: Owned(child),
            binary: binary.to_path_buf(),
            socket,
            api,
            log,
        };
        daemon.wait_for_path(&daemon.socket.clone());
        daemon.wait_for_path(&daemon.api.clone());
        daemon
    }

    fn wait_for_path(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            if let Some(status) = self.process.0.try_wait().expect("poll the daemon") {
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

    /// `snapvmm ctl` with `args`: its status, stdout and stderr.
    pub fn ctl_raw(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(&self.binary)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .output()
            .expect("run snapvmm ctl");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `snapvmm ctl` with `args`, which must succeed; its stdout.
    #[track_caller]
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ctl_raw(args);
        assert!(ok, "snapvmm ctl {} failed:\n{out}{err}", args.join(" "));
        out
    }

    /// `snapvmm ctl --json` with `args`, which must succeed and print JSON.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ctl(&full)).expect("ctl --json prints JSON")
    }

    /// Asks the daemon to shut down and waits for it to exit successfully (its log goes into
    /// the failure otherwise).
    #[track_caller]
    pub fn stop(mut self) {
        self.ctl(&["shutdown"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.process.0.try_wait().expect("poll the daemon") {
                break status;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "daemon ended with {status}:\n{log}");
    }
}

/// How to boot a [`Guest`].
#[derive(Debug, Clone, Copy)]
pub struct Boot<'a> {
    /// The guest kernel.
    pub kernel: &'a Path,
    /// The guest initramfs.
    pub initramfs: &'a Path,
    /// The daemon's vhost-user socket.
    pub socket: &'a Path,
    /// The vhost-user-blk-pci device's queue count.
    pub num_queues: u16,
    /// The initramfs workload (`snapvmm.workload=` on the kernel command line).
    pub workload: &'a str,
    /// Where QEMU listens for the guest agent (`org.qemu.guest_agent.0`), if anywhere.
    pub agent: Option<&'a Path>,
}

/// A QEMU-TCG guest on a vhost-user-blk socket, its serial console in a file (and QEMU's
/// stderr beside it, extension `.stderr`).
#[derive(Debug)]
pub struct Guest {
    process: Owned,
    stdin: Option<ChildStdin>,
    console: PathBuf,
}

impl Guest {
    /// Boots `boot` with the console written to `console`.
    pub fn boot(boot: &Boot<'_>, console: PathBuf) -> Guest {
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2"])
            .args(["-m", &MEMORY_MIB.to_string()])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
                "-machine",
                "memory-backend=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=blk,path={}", boot.socket.display()))
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=blk,num-queues={}",
                boot.num_queues
            ));
        if let Some(agent) = boot.agent {
            command
                .arg("-chardev")
                .arg(format!(
                    "socket,id=qga,path={},server=on,wait=off",
                    agent.display()
                ))
                .args(["-device", "virtio-serial"])
                .args([
                    "-device",
                    "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
                ]);
        }
        let mut child = command
            .arg("-kernel")
            .arg(boot.kernel)
            .arg("-initrd")
            .arg(boot.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 snapvmm.workload={}",
                boot.workload
            ))
            .args([
                "-nographic",
                "-nodefaults",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .stdin(Stdio::piped())
            .stdout(File::create(&console).expect("create the console file"))
            .stderr(File::create(console.with_extension("stderr")).expect("create QEMU's stderr"))
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let stdin = child.stdin.take();
        Guest {
            process: Owned(child),
            stdin,
            console,
        }
    }

    /// The console so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.console.with_extension("stderr")).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; panics (with the console) on timeout or exit.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, deadline: Instant) {
        loop {
            let text = self.text();
            if text.contains(needle) {
                return;
            }
            if let Some(status) = self.process.0.try_wait().expect("poll QEMU") {
                panic!(
                    "QEMU exited ({status}) before {needle:?}; console:\n{text}\nstderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in time; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `line` on the console. A guest that already ended its loop by itself (its round
    /// cap) has no reader left, which is not an error here.
    pub fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush());
        }
    }

    /// Waits for QEMU to end by itself (the guest powered off); it must end successfully.
    /// Returns the console.
    #[track_caller]
    pub fn wait_exit(mut self, deadline: Instant) -> String {
        let status = self.wait_until(deadline);
        let text = self.text();
        assert!(
            status.success(),
            "QEMU ended with {status}; console:\n{text}\nstderr:\n{}",
            self.stderr()
        );
        text
    }

    /// Waits for QEMU to end by itself, whatever its status.
    #[track_caller]
    pub fn wait_until(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.process.0.try_wait().expect("poll QEMU") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not end; console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
