//! `snapvmm jail`: jailed `run`, `restore` and `vhost-user-blk` work (snapshots and checkpoints
//! included), the jailed VMM sees only its jail and runs as the given user with no capabilities
//! in new namespaces, bad input is refused with nothing left behind; and
//! `SandboxOptions::confinement` confines an embedder's VM.
//!
//! The jailer needs root and the VMs KVM: without them each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI, which runs as root) makes it fail.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::require::{have_kvm, skip, Need};
use test_support::vm::{run_with_timeout, Snapvmm};

const UID: u32 = 4242;
const GID: u32 = 4343;
const TIMEOUT: Duration = Duration::from_secs(30);

fn snapvmm() -> Snapvmm {
    test_support::snapvmm_binary!()
}

/// Whether `test` can jail VMs here: root and KVM.
fn can_jail(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(Need::Kvm, test, "the jailer needs root");
    }
    have_kvm(test)
}

/// A running `snapvmm jail`, killed (and with it the whole jail) when dropped.
struct Jail {
    child: Child,
    root: PathBuf,
    /// The jailer's stderr, beside the jails (a file: a pipe nobody reads could fill).
    log: PathBuf,
}

impl Jail {
    /// Starts jail `id` under `base` with `files` placed and `command` jailed, and waits for
    /// the API socket `/api.sock` inside it to accept.
    fn start(base: &Path, id: &str, files: &[String], command: &[&str]) -> Jail {
        let mut jailer = snapvmm().command();
        jailer.args(["jail", "--id", id, "--uid", &UID.to_string(), "--gid"]);
        jailer.arg(GID.to_string()).arg("--chroot-base").arg(base);
        for file in files {
            jailer.arg("--file").arg(file);
        }
        let log = base.join(format!("{id}.stderr"));
        let child = jailer
            .arg("--")
            .args(command)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn snapvmm jail");
        let mut jail = Jail {
            child,
            root: base.join("snapvmm").join(id).join("root"),
            log,
        };
        let deadline = Instant::now() + TIMEOUT;
        while std::os::unix::net::UnixStream::connect(jail.socket()).is_err() {
            if let Some(status) = jail.child.try_wait().unwrap() {
                panic!(
                    "snapvmm jail {id} ended early ({status}): {}",
                    jail.stderr()
                );
            }
            assert!(Instant::now() < deadline, "no API socket in jail {id}");
            std::thread::sleep(Duration::from_millis(20));
        }
        jail
    }

    /// What the jailer (and the VMM) wrote on stderr.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.root.join("api.sock")
    }

    fn ctl(&self, args: &[&str]) -> String {
        snapvmm().ctl_ok(&self.socket(), args, String::new)
    }

    /// The jailed processes' host pids: the jail's init (PID 1) and the VMM (PID 2).
    fn pids(&self) -> (u32, u32) {
        let children = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .expect("/proc/PID/task/PID/children (CONFIG_PROC_CHILDREN)")
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        };
        let init = children(self.child.id())[0];
        let vmm = children(init)[0];
        (init, vmm)
    }

    /// `ctl shutdown`, then the jailer's output once it has ended.
    fn shutdown(mut self) -> Output {
        self.ctl(&["shutdown"]);
        let deadline = Instant::now() + TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the jail did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr: self.stderr().into_bytes(),
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // The jail's init dies with its jailer (PR_SET_PDEATHSIG), and the VMM with its init.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `Key:` line of `/proc/PID/status`, without the key.
fn status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn assert_confined(pid: u32) {
    assert_eq!(status(pid, "Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(status(pid, "Gid"), format!("{GID}\t{GID}\t{GID}\t{GID}"));
    assert_eq!(status(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, caps), "0000000000000000", "{caps} of {pid}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            namespace(&pid.to_string(), kind),
            namespace("self", kind),
            "{kind} namespace of {pid}"
        );
    }
    assert_eq!(namespace(&pid.to_string(), "net"), namespace("self", "net"));
}

#[test]
fn jailed_vms_snapshot_restore_and_see_only_their_jail() {
    if !can_jail("jailed_vms_snapshot_restore_and_see_only_their_jail") {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let base = tempfile::tempdir().unwrap();
    let disk = images.path().join("disk.qcow2");
    let blk_disk = images.path().join("blk.qcow2");
    test_support::image::qcow2(&disk, 64 << 20, None);
    test_support::image::qcow2(&blk_disk, 64 << 20, None);

    let vm = Jail::start(
        base.path(),
        "vm-a",
        &[disk.display().to_string()],
        &[
            "run",
            "--guest",
            "builtin:io-loop",
            "--disk",
            "path=/disk.qcow2,format=qcow2",
            "--api-socket",
            "/api.sock",
            "--serial",
            "/serial.log",
        ],
    );
    let blk = Jail::start(
        base.path(),
        "blk-b",
        &[format!("{}:/images/blk.qcow2", blk_disk.display())],
        &[
            "vhost-user-blk",
            "--socket",
            "/blk.sock",
            "--disk",
            "path=/images/blk.qcow2,format=qcow2",
            "--api-socket",
            "/api.sock",
        ],
    );

    // The API socket is in the jail directory, the VMM's alone.
    let meta = std::fs::metadata(vm.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (UID, GID));

    // Snapshots and checkpoints work inside the jail, their files landing in it.
    vm.ctl(&["snapshot-create-as", "s1", "--disk-only"]);
    vm.ctl(&["snapshot-create-as", "s2"]);
    vm.ctl(&["checkpoint-save", "/ck1"]);
    assert!(vm.root.join("disk.s1.qcow2").is_file());
    assert!(vm.root.join("ck1/state").is_file());

    // The jailed processes' view and credentials.
    let (init, vmm) = vm.pids();
    for pid in [init, vmm] {
        assert_confined(pid);
    }
    assert_eq!(status(vmm, "NSpid").split_whitespace().nth(1), Some("2"));
    let view = PathBuf::from(format!("/proc/{vmm}/root"));
    assert!(view.join("disk.qcow2").is_file());
    assert!(view.join("dev/kvm").exists());
    for absent in [
        "etc/passwd",
        "images/blk.qcow2",
        "blk.sock",
        "tmp",
        "dev/userfaultfd",
    ] {
        assert!(
            !view.join(absent).exists(),
            "{absent} is visible in the jail"
        );
    }
    let (_, blk_pid) = blk.pids();
    assert_confined(blk_pid);
    let blk_view = PathBuf::from(format!("/proc/{blk_pid}/root"));
    assert!(blk_view.join("blk.sock").exists());
    assert!(!blk_view.join("disk.qcow2").exists());
    assert!(
        !blk_view.join("dev/kvm").exists(),
        "vhost-user-blk needs no KVM"
    );
    assert!(blk.ctl(&["domblklist"]).contains("/images/blk.qcow2"));

    let out = vm.shutdown();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(blk.shutdown().status.success());

    // A third jail restores the checkpoint the first one saved, on the same disk chain.
    let a = base.path().join("snapvmm/vm-a/root");
    let files: Vec<String> = ["disk.qcow2", "disk.s1.qcow2", "disk.s1.s2.qcow2", "ck1"]
        .iter()
        .map(|name| format!("{}:/{name}", a.join(name).display()))
        .collect();
    let restored = Jail::start(
        base.path(),
        "vm-c",
        &files,
        &[
            "restore",
            "/ck1",
            "--api-socket",
            "/api.sock",
            "--serial",
            "null",
        ],
    );
    assert!(restored.ctl(&["info"]).contains("running"));
    let out = restored.shutdown();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn jail(base: &Path, extra: &[&str]) -> Output {
    let mut command = snapvmm().command();
    command
        .arg("jail")
        .args(extra)
        .arg("--chroot-base")
        .arg(base);
    command.args(["--", "run", "--guest", "builtin:counter"]);
    run_with_timeout(command, TIMEOUT)
}

fn assert_refused(output: &Output, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "{stderr}");
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let base = tempfile::tempdir().unwrap();
    let ids = |id: &str| ["--id", id, "--uid", "4242", "--gid", "4242"].map(String::from);
    let args = |id: &str| ids(id);
    for id in ["a/b", "..", "../x", ""] {
        let a = args(id);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_refused(&jail(base.path(), &a), "--id");
    }
    let root = ["--id", "x", "--uid", "0", "--gid", "4242"];
    assert_refused(&jail(base.path(), &root), "uid and gid 0 refused");
    let file = base.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let ok = ["--id", "x", "--uid", "4242", "--gid", "4242"];
    assert_refused(&jail(&file, &ok), "not a directory");
    assert_refused(&jail(&base.path().join("missing"), &ok), "--chroot-base");
    let entries: Vec<_> = std::fs::read_dir(base.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "only the test's own file: {entries:?}");
}

#[test]
fn a_jail_that_fails_late_is_removed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            Need::Kvm,
            "a_jail_that_fails_late_is_removed",
            "the jailer needs root",
        );
        return;
    }
    let base = tempfile::tempdir().unwrap();
    // The layout is made before the cgroup is refused (no such controller, or no cgroup v2).
    let args = [
        "--id",
        "late",
        "--uid",
        "4242",
        "--gid",
        "4242",
        "--cgroup",
        "nosuch.max=1",
    ];
    let output = jail(base.path(), &args);
    assert_refused(&output, "--cgroup");
    assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
}

#[test]
fn sandbox_options_confine_an_embedders_vm() {
    if !have_kvm("sandbox_options_confine_an_embedders_vm") {
        return;
    }
    use vmm::config::{BootSource, SerialOutput, VmConfig, Workload};
    use vmm::confine::{Confinement, SeccompMode};
    // On a thread of its own: the thread that starts the sandbox stays confined.
    std::thread::spawn(|| {
        let mut config = VmConfig::new(BootSource::MicroGuest {
            workload: Workload::Counter,
            seed: 1,
        });
        config.memory_mib = 64;
        config.serial = SerialOutput::Null;
        let options = vmm::SandboxOptions {
            confinement: Some(Confinement {
                seccomp: SeccompMode::Kill,
            }),
            ..Default::default()
        };
        let sandbox = vmm::Sandbox::start(&config, &options).unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mine = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        assert!(
            mine.contains("Seccomp:\t2"),
            "the starting thread is not filtered"
        );
        // A thread names itself once it runs: look until both have.
        let deadline = Instant::now() + TIMEOUT;
        let threads = loop {
            let threads: Vec<(String, String)> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .map(|t| t.unwrap().path())
                .map(|t| {
                    let read = |name| std::fs::read_to_string(t.join(name)).unwrap_or_default();
                    (read("comm").trim().to_string(), read("status"))
                })
                .collect();
            let named = |name: &str| threads.iter().any(|(comm, _)| comm == name);
            if (named("vcpu0") && named("spawner")) || Instant::now() > deadline {
                break threads;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for name in ["vcpu0", "spawner"] {
            let (_, status) = threads
                .iter()
                .find(|(comm, _)| comm == name)
                .unwrap_or_else(|| panic!("no {name} thread"));
            assert!(status.contains("Seccomp:\t2"), "{name} is not filtered");
        }
        sandbox.stop().unwrap();
    })
    .join()
    .unwrap();
}
