//! The REST API and `snapvmm ctl` against a real `snapvmm run --guest builtin:io-loop`:
//! live disk-only snapshots, blockpull and an active blockcommit with pivot while the guest
//! does verified I/O, pause and resume, and malformed requests that must not disturb the VM.
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapvmm_api::types::{DiskInfo, Fault, VmInfo};
use snapvmm_api::{ApiClient, VmState};
use test_support::image::qcow2;
use test_support::qemu::assert_check_clean_if_available;
use test_support::require::have_kvm;
use test_support::vm::{counters, last_counter, RunningVm, Snapvmm};

/// Small: every guest memory access is slow on this host's software KVM.
const DISK_SIZE: u64 = 256 * 1024;

/// The `snapvmm` binary under test.
fn snapvmm() -> Snapvmm {
    test_support::snapvmm_binary!()
}

#[test]
fn api_live_snapshot_stream_and_active_commit_under_io_loop() {
    if !have_kvm("api_live_snapshot_stream_and_active_commit_under_io_loop") {
        return;
    }
    let vm = snapvmm().start_vm(DISK_SIZE);
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode");

    let info = vm.ctl_ok(&["info"]);
    assert!(info.contains("running"), "{info}");
    let info: VmInfo = serde_json::from_str(&vm.ctl_ok(&["info", "--json"])).unwrap();
    assert_eq!(
        (info.state, info.vcpus, info.disks),
        (VmState::Running, 1, 1)
    );
    let list = vm.ctl_ok(&["domblklist"]);
    assert!(
        list.contains("vda") && list.contains("base.qcow2"),
        "{list}"
    );

    let out = vm.ctl_ok(&[
        "snapshot-create-as",
        "s1",
        "first",
        "--disk-only",
        "--atomic",
    ]);
    assert!(out.contains("Domain snapshot s1 created"), "{out}");
    vm.wait_written(&vm.path("base.s1.qcow2"));
    vm.ctl_ok(&["snapshot-create-as", "s2", "--disk-only", "--json"]);
    let disks: Vec<DiskInfo> = serde_json::from_str(&vm.ctl_ok(&["domblklist", "--json"])).unwrap();
    let (base, s1, s2) = (
        vm.path("base.qcow2"),
        vm.path("base.s1.qcow2"),
        vm.path("base.s1.s2.qcow2"),
    );
    assert_eq!(disks[0].source, s2.display().to_string());
    assert_eq!(
        disks[0].backing_chain,
        [s1.display().to_string(), base.display().to_string()]
    );
    vm.wait_written(&s2);

    // Pull s1 into s2, keeping base below.
    let out = vm.ctl_ok(&[
        "blockpull",
        "vda",
        "--base",
        base.to_str().unwrap(),
        "--wait",
    ]);
    assert!(out.contains("Pull complete"), "{out}");
    let disks: Vec<DiskInfo> = serde_json::from_str(&vm.ctl_ok(&["domblklist", "--json"])).unwrap();
    assert_eq!(disks[0].backing_chain, [base.display().to_string()]);

    // base.qcow2 is the image s1 froze: committing into it would change what reverting to
    // s1 brings back (issue 13, finding 4), so it is refused and nothing changes.
    let refused = vm.ctl(&["blockcommit", "vda", "--active", "--pivot", "--wait"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "commit into s1's image accepted");
    assert!(stderr.contains("409") && stderr.contains("s1"), "{stderr}");
    // Once the tree forgets the snapshots (their images stay), base may take the commit.
    vm.ctl_ok(&["snapshot-delete", "s1", "--children", "--metadata"]);

    // Commit the active layer into base and pivot onto it.
    let out = vm.ctl_ok(&["blockcommit", "vda", "--active", "--pivot", "--wait"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    let disks: Vec<DiskInfo> = serde_json::from_str(&vm.ctl_ok(&["domblklist", "--json"])).unwrap();
    assert_eq!(disks[0].source, base.display().to_string());
    assert!(disks[0].backing_chain.is_empty());
    let job = vm.ctl_ok(&["blockjob", "vda", "--info"]);
    assert!(
        job.contains("Block Commit") && job.contains("concluded"),
        "{job}"
    );
    // The guest goes on on base (reading back, and verifying, data written before the pivot).
    vm.wait_written(&base);
    vm.wait_progress();

    let (dir, serial) = vm.shutdown();
    assert!(
        !serial.contains("io error"),
        "guest saw I/O errors:\n{serial}"
    );
    for file in ["base.qcow2", "base.s1.qcow2", "base.s1.s2.qcow2"] {
        assert_check_clean_if_available(&dir.path().join(file));
    }
}

#[test]
fn api_malformed_requests_get_4xx_and_the_vm_keeps_running() {
    if !have_kvm("api_malformed_requests_get_4xx_and_the_vm_keeps_running") {
        return;
    }
    let vm = snapvmm().start_vm(DISK_SIZE);
    let client = ApiClient::new(&vm.socket).unwrap();
    let cases: &[(&str, &str, &[u8], u16)] = &[
        ("PUT", "/snapshot/disk", b"{\"name\": ", 400),
        ("PUT", "/snapshot/disk", b"[]", 400),
        ("PUT", "/disks/vdz/stream", b"", 404),
        ("GET", "/disks/vdz", b"", 404),
        ("PUT", "/disks/vda/commit", b"{\"active\": \"yes\"}", 400),
        ("DELETE", "/vm", b"", 405),
        ("GET", "/vm/shutdown", b"", 405),
        ("GET", "/no/such/path", b"", 404),
        ("PUT", "/disks/vda/job/complete", b"", 404),
    ];
    for (method, path, body, status) in cases {
        let response = client.raw(method, path, body).unwrap();
        assert_eq!(
            response.status, *status,
            "{method} {path}: {}",
            response.body
        );
        let fault: Fault = serde_json::from_str(&response.body).unwrap();
        assert!(!fault.fault_message.is_empty(), "{method} {path}");
    }
    let output = vm.ctl(&["blockjob", "vdz", "--info"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no disk named"), "{stderr}");
    let output = vm.ctl(&["snapshot-create-as", "bad/name"]);
    assert!(!output.status.success(), "a snapshot name with '/'");

    let info: VmInfo = client.get("/vm").unwrap();
    assert_eq!(info.state, VmState::Running);
    let base = vm.path("base.qcow2");
    vm.wait_written(&base);

    // Paused, the guest issues no I/O; resumed, it goes on.
    assert!(vm.ctl_ok(&["pause"]).contains("Domain paused"));
    let again = client.raw("PUT", "/vm/pause", b"").unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    let info: VmInfo = client.get("/vm").unwrap();
    assert_eq!(info.state, VmState::Paused);
    // Requests already queued may still complete on the device's worker threads.
    std::thread::sleep(Duration::from_millis(200));
    let stamp = |f: &Path| std::fs::metadata(f).unwrap().modified().unwrap();
    let before = stamp(&base);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stamp(&base), before, "the guest wrote while paused");
    assert!(vm.ctl_ok(&["resume"]).contains("Domain resumed"));
    vm.wait_written(&base);
    // A paused VM still shuts down.
    vm.ctl_ok(&["pause"]);
    let (_dir, serial) = vm.shutdown();
    assert!(!serial.contains("io error"), "{serial}");
}

#[test]
fn snapshot_tree_through_ctl_survives_a_restart() {
    if !have_kvm("snapshot_tree_through_ctl_survives_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2(&base, DISK_SIZE, None);
    let vm = snapvmm().launch_vm(dir, "builtin:counter", &base);
    vm.ctl_ok(&["snapshot-create-as", "s1", "--disk-only"]);
    vm.ctl_ok(&[
        "snapshot-create-as",
        "s2",
        "second",
        "--disk-only",
        "--atomic",
    ]);
    vm.ctl_ok(&["snapshot-create-as", "s3", "--disk-only", "--internal"]);
    let tree = vm.ctl_ok(&["snapshot-list", "--tree"]);
    assert!(
        tree.contains("s1\n  |\n  +- s2\n      |\n      +- s3"),
        "{tree}"
    );
    assert_eq!(vm.ctl_ok(&["snapshot-current"]).trim(), "s3");

    vm.ctl_ok(&["snapshot-revert", "s1"]);
    assert_eq!(vm.ctl_ok(&["snapshot-current"]).trim(), "s1");
    let disks: Vec<DiskInfo> = serde_json::from_str(&vm.ctl_ok(&["domblklist", "--json"])).unwrap();
    let top = PathBuf::from(&disks[0].source);
    assert_eq!(top, vm.path("base.s1.revert.qcow2"));
    let info = vm.ctl_ok(&["snapshot-info", "s2"]);
    assert!(info.contains("Children:       1"), "{info}");
    let out = vm.ctl_ok(&["snapshot-delete", "s2", "--children"]);
    assert!(out.contains("deleted"), "{out}");
    let list = vm.ctl_ok(&["snapshot-list"]);
    assert!(list.contains("s1") && !list.contains("s2"), "{list}");
    let (dir, serial) = vm.shutdown();
    assert!(serial.contains("counter"), "{serial}");

    // The metadata beside the disk brings the tree back with the VM.
    assert!(dir.path().join("snapvmm-snapshots.json").exists());
    let vm = snapvmm().launch_vm(dir, "builtin:counter", &top);
    assert_eq!(vm.ctl_ok(&["snapshot-current"]).trim(), "s1");
    let listed: Vec<snapvmm_api::types::SnapshotInfo> =
        serde_json::from_str(&vm.ctl_ok(&["snapshot-list", "--json"])).unwrap();
    assert_eq!(listed.len(), 1);
    vm.ctl_ok(&["snapshot-delete", "s1"]);
    let (dir, _) = vm.shutdown();
    let mut images: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    images.sort();
    // The revert's overlay and the disk's own image stay; every other image went.
    assert_eq!(images, ["base.qcow2", "base.s1.revert.qcow2"]);
    for image in images {
        assert_check_clean_if_available(&dir.path().join(image));
    }
}

/// Waits until the `counter` guest printed at least `n` more values after console byte
/// `mark`; returns those values.
fn counted_since(vm: &RunningVm, mark: usize, n: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let serial = vm.serial();
        let values = counters(serial.get(mark..).unwrap_or(""));
        if values.len() >= n {
            return values;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counter guest stalled; serial:\n{serial}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The complete lines of the serial console once it has stopped growing (the VM is
/// paused); a line the guest was still printing is left out.
fn settled_serial(vm: &RunningVm) -> String {
    let mut last = vm.serial();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut now = vm.serial();
        if now.len() == last.len() {
            now.truncate(now.rfind('\n').map_or(0, |i| i + 1));
            return now;
        }
        last = now;
    }
}

#[test]
fn snapshots_with_memory_take_the_running_guest_back() {
    if !have_kvm("snapshots_with_memory_take_the_running_guest_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2(&base, DISK_SIZE, None);
    let vm = snapvmm().launch_vm(dir, "builtin:counter", &base);
    for (name, kind) in [("m1", None), ("i1", Some("--internal"))] {
        counted_since(&vm, 0, 3);
        // Taken while paused, once the console has caught up: then the last value printed
        // is the guest's counter at the snapshot (the console file can lag a running guest).
        vm.ctl_ok(&["pause"]);
        let at_snapshot = last_counter(&settled_serial(&vm));
        let mut create = vec!["snapshot-create-as", name];
        create.extend(kind);
        vm.ctl_ok(&create);
        vm.ctl_ok(&["resume"]);
        // Run well past the snapshot, then go back to it (paused, as it was taken).
        let mark = vm.serial().len();
        counted_since(&vm, mark, 12);
        vm.ctl_ok(&["pause"]);
        let left_at = last_counter(&settled_serial(&vm));
        vm.ctl_ok(&["snapshot-revert", name]);
        let mark = vm.serial().len();
        vm.ctl_ok(&["resume"]);
        let resumed = counted_since(&vm, mark, 3);
        assert!(
            // +1: the next line; +2: the line after one the pause cut short.
            (at_snapshot..=at_snapshot + 2).contains(&resumed[0]) && resumed[0] < left_at,
            "{name}: after the revert the counter went on from {} (at the snapshot \
             {at_snapshot}, when reverted {left_at})",
            resumed[0]
        );
        assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
        assert_eq!(vm.ctl_ok(&["snapshot-current"]).trim(), name);
    }
    let info = vm.ctl_ok(&["snapshot-info", "m1"]);
    assert!(info.contains("external"), "{info}");
    let (dir, _) = vm.shutdown();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            assert_check_clean_if_available(&path);
        }
    }
}

/// Counts `io error` lines in `text`.
fn io_errors(text: &str) -> usize {
    text.lines().filter(|l| l.contains("io error")).count()
}

/// Random create (external and internal, with memory), revert and delete under `io-loop`.
/// The guest's model of the disk lives in its memory, so a revert that brought back the
/// wrong disk data, or memory that does not match the disks, shows as `io error` lines as
/// soon as the guest reads what it wrote: every revert is checked from inside the guest.
#[test]
fn io_loop_survives_random_snapshot_create_revert_delete() {
    use rand::{Rng, SeedableRng};
    if !have_kvm("io_loop_survives_random_snapshot_create_revert_delete") {
        return;
    }
    let seed = std::env::var("SNAPVMM_TREE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vm = snapvmm().start_vm(DISK_SIZE);
    vm.wait_progress();
    let mut snapshots: Vec<String> = Vec::new();
    let mut next = 0;
    let mut steps = Vec::new();
    for _ in 0..14 {
        let op = match snapshots.len() {
            0 => 0,
            n if n >= 5 => rng.random_range(1..3),
            _ => rng.random_range(0..3),
        };
        match op {
            0 => {
                next += 1;
                let name = format!("s{next}");
                let mut args = vec!["snapshot-create-as", name.as_str()];
                if rng.random_bool(0.4) {
                    args.push("--internal");
                }
                vm.ctl_ok(&args);
                steps.push(args.join(" "));
                snapshots.push(name);
            }
            1 => {
                let name = snapshots[rng.random_range(0..snapshots.len())].clone();
                vm.ctl_ok(&["snapshot-revert", &name]);
                steps.push(format!("revert {name}"));
            }
            _ => {
                let index = rng.random_range(0..snapshots.len());
                let name = snapshots.remove(index);
                vm.ctl_ok(&["snapshot-delete", &name]);
                steps.push(format!("delete {name}"));
            }
        }
        // The guest goes on, reading back what it wrote, on whatever it now runs on.
        vm.wait_progress();
        vm.wait_progress();
        let serial = vm.serial();
        assert_eq!(
            io_errors(&serial),
            0,
            "seed {seed}, after {steps:?}:\n{serial}"
        );
    }
    // Every snapshot still there, reverted to in turn, holds what its guest expects.
    for name in snapshots.clone() {
        vm.ctl_ok(&["snapshot-revert", &name]);
        steps.push(format!("revert {name}"));
        vm.wait_progress();
        vm.wait_progress();
        let serial = vm.serial();
        assert_eq!(
            io_errors(&serial),
            0,
            "seed {seed}, after {steps:?}:\n{serial}"
        );
    }
    let listed: Vec<snapvmm_api::types::SnapshotInfo> =
        serde_json::from_str(&vm.ctl_ok(&["snapshot-list", "--json"])).unwrap();
    let mut names: Vec<_> = listed.iter().map(|s| s.name.clone()).collect();
    names.sort();
    snapshots.sort();
    assert_eq!(names, snapshots, "seed {seed}: {steps:?}");
    let (dir, serial) = vm.shutdown();
    assert_eq!(io_errors(&serial), 0, "{serial}");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            assert_check_clean_if_available(&path);
        }
    }
}

// The same flows against the typed layer directly: a `Sandbox` in this process and its
// `Control`, no HTTP, as a program embedding the VMM drives them.

/// A VM running `workload` on a fresh `base.qcow2` in a temporary directory, its console in
/// `serial.log` there.
struct TypedVm {
    dir: tempfile::TempDir,
    sandbox: vmm::Sandbox,
}

impl TypedVm {
    fn start(workload: vmm::config::Workload) -> TypedVm {
        use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qcow2(&base, DISK_SIZE, None);
        let mut config = VmConfig::new(BootSource::MicroGuest { workload, seed: 1 });
        config.disks.push(DiskConfig::new(&base));
        config.serial = SerialOutput::File(dir.path().join("serial.log"));
        let sandbox = vmm::Sandbox::start(&config, &vmm::SandboxOptions::default()).unwrap();
        assert!(sandbox.warnings().is_empty(), "{:?}", sandbox.warnings());
        TypedVm { dir, sandbox }
    }

    fn control(&self) -> &vmm::Control {
        self.sandbox.control()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    /// Waits until the guest printed `n` more lines starting with `prefix` after console
    /// byte `mark`; returns the console from `mark` on.
    fn wait_lines(&self, mark: usize, prefix: &str, n: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let serial = self.serial();
            let since = serial.get(mark..).unwrap_or("").to_string();
            if since.lines().filter(|l| l.starts_with(prefix)).count() >= n {
                return since;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the guest stalled; serial:\n{serial}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The complete console lines once the paused guest's console stopped growing.
    fn settled(&self) -> String {
        let mut last = self.serial();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut now = self.serial();
            if now.len() == last.len() {
                now.truncate(now.rfind('\n').map_or(0, |i| i + 1));
                return now;
            }
            last = now;
        }
    }

    /// Pauses the guest and returns its counter once the console caught up.
    fn pause_at_counter(&self) -> u64 {
        self.control().pause().unwrap();
        last_counter(&self.settled())
    }

    /// Resumes the guest and returns the first counter values it prints.
    fn resume_counting(&self) -> Vec<u64> {
        let mark = self.serial().len();
        self.control().resume().unwrap();
        counters(&self.wait_lines(mark, "counter ", 3))
    }

    /// Shuts the VM down, waits for it, and checks every image with `qemu-img check`.
    fn shutdown(self) -> String {
        self.control().shutdown().unwrap();
        let reason = self.sandbox.wait().unwrap();
        assert!(reason.is_clean(), "{reason:?}");
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "qcow2") {
                assert_check_clean_if_available(&path);
            }
        }
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }
}

/// Asserts the guest went on from `at` (give or take the line a pause cut short), below
/// `left_at`, counting by one.
fn went_back(what: &str, resumed: &[u64], at: u64, left_at: u64) {
    assert!(
        (at..=at + 2).contains(&resumed[0]) && resumed[0] < left_at,
        "{what}: the counter went on from {} (at the snapshot {at}, when reverted {left_at})",
        resumed[0]
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
}

#[test]
fn typed_snapshot_create_list_revert_delete_with_memory() {
    use vmm::control::types::{SnapshotDeleteRequest, TreeSnapshotCreate};
    if !have_kvm("typed_snapshot_create_list_revert_delete_with_memory") {
        return;
    }
    let vm = TypedVm::start(vmm::config::Workload::Counter);
    let control = vm.control();
    for (name, internal) in [("m1", false), ("i1", true)] {
        vm.wait_lines(0, "counter ", 3);
        let at = vm.pause_at_counter();
        let request = TreeSnapshotCreate {
            internal,
            ..TreeSnapshotCreate::with_memory(name)
        };
        let info = control.snapshot_create(&request).unwrap();
        assert!(info.memory, "{info:?}");
        control.resume().unwrap();
        let mark = vm.serial().len();
        vm.wait_lines(mark, "counter ", 12);
        let left_at = vm.pause_at_counter();
        assert_eq!(control.snapshot_revert(name).unwrap().name, name);
        went_back(name, &vm.resume_counting(), at, left_at);
        assert_eq!(control.snapshot_current().unwrap().name, name);
    }
    let names: Vec<String> = control
        .snapshot_list()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["m1", "i1"]);
    assert_eq!(
        control.snapshot_info("i1").unwrap().parent.as_deref(),
        Some("m1")
    );
    let deleted = control
        .snapshot_delete("m1", &SnapshotDeleteRequest::default())
        .unwrap();
    assert_eq!(deleted.deleted, ["m1"]);
    assert!(control.snapshot_jobs().unwrap().is_empty());
    assert_eq!(control.snapshot_list().unwrap().len(), 1);
    // The guest goes on after the delete's merges.
    let mark = vm.serial().len();
    vm.wait_lines(mark, "counter ", 2);
    vm.shutdown();
}

#[test]
fn typed_disk_only_snapshot_stream_and_active_commit_under_io_loop() {
    use snapshot::JobStatus;
    use vmm::control::types::{CommitRequest, SnapshotCreate, StreamRequest};
    if !have_kvm("typed_disk_only_snapshot_stream_and_active_commit_under_io_loop") {
        return;
    }
    let vm = TypedVm::start(vmm::config::Workload::IoLoop);
    let control = vm.control();
    let (base, s1, s2) = (
        vm.path("base.qcow2"),
        vm.path("base.s1.qcow2"),
        vm.path("base.s1.s2.qcow2"),
    );
    vm.wait_lines(0, "io-loop ops ", 1);
    let atomic = SnapshotCreate {
        atomic: true,
        ..SnapshotCreate::new("s1")
    };
    let result = control.disk_snapshot(&atomic).unwrap();
    assert_eq!(result.disks[0].overlay, s1.display().to_string());
    let result = control.disk_snapshot(&SnapshotCreate::new("s2")).unwrap();
    assert_eq!(result.disks[0].previous, s1.display().to_string());
    let disk = control.disk("vda").unwrap();
    assert_eq!(disk.source, s2.display().to_string());
    assert_eq!(disk.backing_chain.len(), 2);

    // Pull s1 into s2, keeping base below.
    let pull = StreamRequest {
        base: Some(base.display().to_string()),
        speed: 0,
    };
    assert_eq!(control.stream("vda", &pull).unwrap().kind, "stream");
    let wait = Duration::from_secs(60);
    let job = control
        .job_wait("vda", wait, |s| s == JobStatus::Concluded)
        .unwrap();
    assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
    let disk = control.disk("vda").unwrap();
    assert_eq!(disk.backing_chain, [base.display().to_string()]);

    // Commit the active layer into base and pivot onto it.
    let job = control.commit("vda", &CommitRequest::active()).unwrap();
    assert_eq!(job.kind, "active-commit");
    let ready = |s| s == JobStatus::Ready || s == JobStatus::Concluded;
    let job = control.job_wait("vda", wait, ready).unwrap();
    assert_eq!(job.status, "ready", "{job:?}");
    control.job_complete("vda").unwrap();
    let job = control
        .job_wait("vda", wait, |s| s == JobStatus::Concluded)
        .unwrap();
    assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
    let disk = control.disk("vda").unwrap();
    assert_eq!(disk.source, base.display().to_string());
    assert!(disk.backing_chain.is_empty() && disk.job.is_none());
    // The guest goes on on base, reading back and verifying what it wrote before.
    let mark = vm.serial().len();
    vm.wait_lines(mark, "io-loop ops ", 2);
    let serial = vm.shutdown();
    assert_eq!(io_errors(&serial), 0, "{serial}");
}

#[test]
fn typed_checkpoint_save_and_revert_in_place() {
    use vmm::control::types::{CheckpointRequest, RevertRequest};
    if !have_kvm("typed_checkpoint_save_and_revert_in_place") {
        return;
    }
    let vm = TypedVm::start(vmm::config::Workload::Counter);
    let control = vm.control();
    vm.wait_lines(0, "counter ", 3);
    let at = vm.pause_at_counter();
    let dir = vm.path("ckpt");
    let report = control
        .checkpoint_save(&CheckpointRequest::new(&dir))
        .unwrap();
    assert_eq!(report.dir, dir);
    assert!(report.pages_written > 0, "{report:?}");
    control.resume().unwrap();
    let mark = vm.serial().len();
    vm.wait_lines(mark, "counter ", 12);
    let left_at = vm.pause_at_counter();
    let reverted = control
        .checkpoint_revert(&RevertRequest { dir: dir.clone() })
        .unwrap();
    assert_eq!(reverted.dir, dir);
    went_back("checkpoint", &vm.resume_counting(), at, left_at);
    // A checkpoint that is not there is the caller's error, and the VM runs on.
    let missing = control.checkpoint_revert(&RevertRequest {
        dir: vm.path("nope"),
    });
    assert!(
        matches!(missing, Err(vmm::ControlError::InvalidArgument(_))),
        "{missing:?}"
    );
    assert_eq!(control.info().state, VmState::Running);
    vm.shutdown();
}
