//! Clones and live forks against real `snapvmm` processes running the micro-guest: 8 clones
//! of an io-loop snapshot side by side, counter clones with distinct VM generation IDs,
//! a live fork under io-loop, and bad requests that must leave nothing behind.
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapvmm_api::types::{CloneInfo, CloneRecord};
use test_support::image::qcow2;
use test_support::qemu::assert_check_clean_if_available as qemu_img_check;
use test_support::require::have_kvm as kvm_or_skip;
use test_support::vm::{counters, RunningVm, Snapvmm};

fn binary() -> Snapvmm {
    test_support::snapvmm_binary!()
}

fn snapvmm() -> std::process::Command {
    binary().command()
}

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    binary().ctl(socket, args)
}

fn ctl_ok(socket: &Path, args: &[&str], context: impl FnOnce() -> String) -> String {
    binary().ctl_ok(socket, args, context)
}

/// Small: every guest memory access is slow on this host's software KVM.
const DISK_SIZE: u64 = 256 * 1024;
/// How long a clone may take to show what a test waits for (a deadline, not a measurement).
const CLONE_TIMEOUT: Duration = Duration::from_secs(90);

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `clone`'s console has `lines` lines starting with `prefix`; returns it.
fn wait_lines(clone: &CloneInfo, prefix: &str, lines: usize) -> String {
    let deadline = Instant::now() + CLONE_TIMEOUT;
    loop {
        let serial = read(&clone.serial);
        if serial.lines().filter(|l| l.starts_with(prefix)).count() >= lines {
            return serial;
        }
        assert!(
            Instant::now() < deadline,
            "clone {} printed fewer than {lines} {prefix:?} lines; serial:\n{serial}\nlog:\n{}",
            clone.id,
            read(&clone.dir.join("snapvmm.log"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The io-loop console shows verified I/O and no error at all.
fn assert_io_clean(who: &str, serial: &str) {
    assert!(
        !serial.contains("mismatch") && !serial.contains("io error") && !serial.contains("failed"),
        "{who}: the guest found bad data:\n{serial}"
    );
    // A console read while the guest prints can end in half a line: only whole lines count.
    let whole = serial.rfind('\n').map_or("", |end| &serial[..end]);
    for line in whole.lines().filter(|l| l.starts_with("io-loop ops ")) {
        assert!(line.ends_with(" errors 0"), "{who}: {line}\n{serial}");
    }
}

/// The `generation <hex>` values a console printed, in order.
fn generations(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("generation "))
        .map(|g| g.trim().to_string())
        .collect()
}

fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

/// Shuts a clone down through its own API and waits for its process to end.
fn shutdown_clone(clone: &CloneInfo) {
    ctl_ok(&clone.api_socket, &["shutdown"], || read(&clone.serial));
    let deadline = Instant::now() + CLONE_TIMEOUT;
    while is_alive(clone.pid) {
        assert!(Instant::now() < deadline, "clone {} did not stop", clone.id);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Ends clones a failed test left running.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if is_alive(*pid) {
                // SAFETY: SIGKILL to a clone process this test started.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

/// Waits until `vm`'s console has printed `count` generation IDs.
fn wait_generations(vm: &RunningVm, count: usize) -> Vec<String> {
    let deadline = Instant::now() + CLONE_TIMEOUT;
    loop {
        let ids = generations(&vm.serial());
        if ids.len() >= count {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "no generation line: {}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn eight_clones_of_an_io_loop_snapshot_run_side_by_side() {
    if !kvm_or_skip("eight_clones_of_an_io_loop_snapshot_run_side_by_side") {
        return;
    }
    let vm = binary().start_vm(DISK_SIZE);
    vm.wait_progress();
    vm.ctl_ok(&["snapshot-create-as", "s1", "with memory"]);
    // The parent runs on (and writes to) its new overlay; pausing it spares the host's CPUs.
    vm.wait_progress();
    vm.ctl_ok(&["pause"]);
    let frozen = vm.path("base.qcow2");
    let before = file_bytes(&frozen);

    let dir = vm.path("clones");
    let out = vm.ctl_ok(&[
        "clone",
        "s1",
        "--count",
        "8",
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    let clones: Vec<CloneInfo> = serde_json::from_str(&out).unwrap();
    let _reaper = Reaper(clones.iter().map(|c| c.pid).collect());
    assert_eq!(clones.len(), 8);
    for (k, clone) in clones.iter().enumerate() {
        assert_eq!(clone.id, format!("clone-{k}"));
        assert_eq!(clone.dir, dir.join(&clone.id));
        assert!(clone.api_socket.exists() && is_alive(clone.pid));
    }
    // Each clone does verified I/O on its own overlay: reads check what the parent wrote
    // before the snapshot and what the clone wrote since; the new VM generation ID reseeded
    // its choice of chunks, so clones write different data and a leak would show.
    let mut ids = Vec::new();
    for clone in &clones {
        let serial = wait_lines(clone, "io-loop ops ", 2);
        assert_io_clean(&clone.id, &serial);
        ids.push(generations(&serial).last().cloned().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "every clone has its own generation ID");

    let listed: Vec<CloneRecord> =
        serde_json::from_str(&vm.ctl_ok(&["clone-list", "s1", "--json"])).unwrap();
    assert_eq!(listed.len(), 8);
    assert!(listed
        .iter()
        .all(|r| r.running && r.backing == vec![frozen.clone()]));
    let refused = vm.ctl(&["snapshot-delete", "s1"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("8 clone(s)"), "{message}");

    for clone in &clones {
        shutdown_clone(clone);
        assert_io_clean(&clone.id, &read(&clone.serial));
        qemu_img_check(&clone.dir.join("vda.qcow2"));
    }
    assert_eq!(
        file_bytes(&frozen),
        before,
        "the snapshot's image never changes"
    );
    qemu_img_check(&frozen);

    for clone in &clones {
        let out = vm.ctl_ok(&["clone-destroy", clone.dir.to_str().unwrap()]);
        assert!(out.contains("destroyed"), "{out}");
        assert!(!clone.dir.exists());
    }
    vm.ctl_ok(&["snapshot-delete", "s1"]);
    vm.ctl_ok(&["resume"]);
    vm.wait_progress();
    let (_dir, serial) = vm.shutdown();
    assert_io_clean("parent", &serial);
}

#[test]
fn counter_clones_resume_from_the_snapshot_with_new_generation_ids() {
    if !kvm_or_skip("counter_clones_resume_from_the_snapshot_with_new_generation_ids") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qcow2(&disk, DISK_SIZE, None);
    let vm = binary().launch_vm(dir, "builtin:counter", &disk);
    let deadline = Instant::now() + CLONE_TIMEOUT;
    while counters(&vm.serial()).len() < 3 {
        assert!(Instant::now() < deadline, "no counter: {}", vm.serial());
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.ctl_ok(&["pause"]);
    // Paused: the console settles (a line may have been under way).
    std::thread::sleep(Duration::from_millis(200));
    let at_pause = counters(&vm.serial()).last().copied().unwrap();
    let parent_generation = wait_generations(&vm, 1)[0].clone();
    vm.ctl_ok(&["snapshot-create-as", "s1"]);

    // Offline, from the tree's metadata: no API call.
    let metadata = vm.path("snapvmm-snapshots.json");
    let clones_dir = vm.path("clones");
    let output = snapvmm()
        .arg("clone")
        .arg("--snapshot-metadata")
        .arg(&metadata)
        .args(["s1", "--count", "3", "--dir"])
        .arg(&clones_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let clones: Vec<CloneInfo> = lines
        .iter()
        .enumerate()
        .map(|(k, line)| {
            let id = format!("clone-{k}");
            assert!(line.starts_with(&format!("{id} pid ")), "{line}");
            let pid = line.split_whitespace().nth(2).unwrap().parse().unwrap();
            let dir = clones_dir.join(&id);
            CloneInfo {
                id,
                api_socket: dir.join("api.sock"),
                serial: dir.join("serial.log"),
                pid,
                dir,
            }
        })
        .collect();
    let _reaper = Reaper(clones.iter().map(|c| c.pid).collect());

    let mut seen = vec![parent_generation];
    for clone in &clones {
        let serial = wait_lines(clone, "counter ", 2);
        let values = counters(&serial);
        assert!(
            values[0] > at_pause && values[0] <= at_pause + 2,
            "{}: resumed at {} after the snapshot's {at_pause}",
            clone.id,
            values[0]
        );
        let ids = generations(&serial);
        assert_eq!(ids.len(), 1, "{serial}");
        assert!(
            !seen.contains(&ids[0]),
            "{} reuses a generation ID",
            clone.id
        );
        seen.push(ids[0].clone());
    }
    let listed: Vec<CloneRecord> =
        serde_json::from_str(&vm.ctl_ok(&["clone-list", "s1", "--json"])).unwrap();
    assert_eq!(
        listed.len(),
        3,
        "offline clones are recorded beside the metadata"
    );

    // A revert in place loads the snapshot's memory: a new generation again. The snapshot
    // was taken paused, so the VM stays paused after the revert until resumed.
    vm.ctl_ok(&["snapshot-revert", "s1"]);
    vm.ctl_ok(&["resume"]);
    let reverted = wait_generations(&vm, 2)[1].clone();
    assert!(
        !seen.contains(&reverted),
        "the revert kept an old generation ID"
    );

    for clone in &clones {
        vm.ctl_ok(&["clone-destroy", clone.dir.to_str().unwrap()]);
        assert!(!is_alive(clone.pid) && !clone.dir.exists());
    }
    vm.shutdown();
}

#[test]
fn live_fork_under_io_loop() {
    if !kvm_or_skip("live_fork_under_io_loop") {
        return;
    }
    let vm = binary().start_vm(DISK_SIZE);
    vm.wait_progress();
    let dir = vm.path("forks");
    let out = vm.ctl_ok(&[
        "fork",
        "--count",
        "2",
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    let children: Vec<CloneInfo> = serde_json::from_str(&out).unwrap();
    let _reaper = Reaper(children.iter().map(|c| c.pid).collect());
    assert_eq!(children.len(), 2);
    // The parent runs on, on a fresh overlay; base.qcow2 is frozen under all three.
    vm.wait_progress();
    let disks = vm.ctl_ok(&["domblklist"]);
    assert!(disks.contains("base.fork-"), "{disks}");
    let frozen = vm.path("base.qcow2");
    let before = file_bytes(&frozen);
    for child in &children {
        let serial = wait_lines(child, "io-loop ops ", 2);
        assert_io_clean(&child.id, &serial);
    }
    for child in &children {
        shutdown_clone(child);
        assert_io_clean(&child.id, &read(&child.serial));
        qemu_img_check(&child.dir.join("vda.qcow2"));
    }
    vm.wait_progress();
    let (dir, serial) = vm.shutdown();
    assert_io_clean("parent", &serial);
    assert_eq!(
        file_bytes(&frozen),
        before,
        "the frozen image never changes"
    );
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            qemu_img_check(&path);
        }
    }
}

/// What `dir` holds, recursively, as sorted relative paths (lock files aside).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(".lock") {
                continue;
            }
            found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn bad_clone_requests_leave_nothing_behind() {
    if !kvm_or_skip("bad_clone_requests_leave_nothing_behind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qcow2(&disk, DISK_SIZE, None);
    let vm = binary().launch_vm(dir, "builtin:counter", &disk);
    vm.ctl_ok(&["snapshot-create-as", "disk-only", "--disk-only"]);
    vm.ctl_ok(&["snapshot-create-as", "full"]);
    let blocker = vm.path("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let clones = vm.path("clones");
    let files_before = tree(&vm.path(""));
    let cases = [
        ("missing", "1", "missing"),
        ("full", "0", "count 0"),
        ("full", "65", "count 65"),
        ("disk-only", "1", "no memory"),
    ];
    for (name, count, expect) in cases {
        let out = vm.ctl(&[
            "clone",
            name,
            "--count",
            count,
            "--dir",
            clones.to_str().unwrap(),
        ]);
        let message = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} {count} succeeded");
        assert!(message.contains(expect), "{name} {count}: {message}");
    }
    // A directory that cannot be created (its parent is a file).
    let out = vm.ctl(&[
        "clone",
        "full",
        "--count",
        "2",
        "--dir",
        blocker.join("clones").to_str().unwrap(),
    ]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && message.contains("cannot create"),
        "{message}"
    );
    // Offline: a snapshot that is not there, and a metadata file that is not there.
    let out = snapvmm()
        .arg("clone")
        .arg("--snapshot-metadata")
        .arg(vm.path("snapvmm-snapshots.json"))
        .args(["missing", "--count", "1", "--dir"])
        .arg(&clones)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("no snapshot named \"missing\""),
        "{message}"
    );
    let out = snapvmm()
        .arg("clone")
        .arg("--snapshot-metadata")
        .arg(vm.path("nope.json"))
        .args(["full", "--count", "1", "--dir"])
        .arg(&clones)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.json"));

    // Nothing appeared or went (the serial log only grew).
    assert_eq!(tree(&vm.path("")), files_before);
    assert!(!clones.exists());
    let listed = ctl(&vm.socket, &["clone-list", "full", "--json"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
    vm.shutdown();
}
