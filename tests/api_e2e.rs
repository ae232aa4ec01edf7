//! The REST API and `snapvmm ctl` against a real `snapvmm run --guest builtin:io-loop`:
//! live disk-only snapshots, blockpull and an active blockcommit with pivot while the guest
//! does verified I/O, pause and resume, and malformed requests that must not disturb the VM.
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

mod vmm_util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapvmm_api::types::{DiskInfo, Fault, VmInfo};
use snapvmm_api::{ApiClient, VmState};
use vmm_util::{counters, kvm_or_skip, last_counter, qemu_img_check, RunningVm};

/// Small: every guest memory access is slow on this host's software KVM.
const DISK_SIZE: u64 = 256 * 1024;

#[test]
fn api_live_snapshot_stream_and_active_commit_under_io_loop() {
    if !kvm_or_skip("api_live_snapshot_stream_and_active_commit_under_io_loop") {
        return;
    }
    let vm = RunningVm::start(DISK_SIZE);
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
        qemu_img_check(&dir.path().join(file));
    }
}

#[test]
fn api_malformed_requests_get_4xx_and_the_vm_keeps_running() {
    if !kvm_or_skip("api_malformed_requests_get_4xx_and_the_vm_keeps_running") {
        return;
    }
    let vm = RunningVm::start(DISK_SIZE);
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
    if !kvm_or_skip("snapshot_tree_through_ctl_survives_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    vmm_util::qcow2(&base, DISK_SIZE, None);
    let vm = RunningVm::launch(dir, "builtin:counter", &base);
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
    let vm = RunningVm::launch(dir, "builtin:counter", &top);
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
        qemu_img_check(&dir.path().join(image));
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
    if !kvm_or_skip("snapshots_with_memory_take_the_running_guest_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    vmm_util::qcow2(&base, DISK_SIZE, None);
    let vm = RunningVm::launch(dir, "builtin:counter", &base);
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
            qemu_img_check(&path);
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
    if !kvm_or_skip("io_loop_survives_random_snapshot_create_revert_delete") {
        return;
    }
    let seed = std::env::var("SNAPVMM_TREE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vm = RunningVm::start(DISK_SIZE);
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
            qemu_img_check(&path);
        }
    }
}
