//! Crash trials of checkpoints: a child process runs the io-loop micro-guest on a qcow2 disk
//! and, without pause, takes checkpoints (full, incremental, live, live incremental) or
//! snapshots with memory through the snapshot tree (create, revert, delete), and is killed
//! with SIGKILL at a random moment. Then:
//!
//! - every checkpoint directory in place verifies (the rename is the commit point: a save
//!   cut short leaves only its temporary directory), and one the child reported done
//!   is never missing;
//! - the last checkpoint in place restores into a new VM;
//! - the tree reopens on the tops it records, lists every snapshot reported created and not
//!   deleted (give or take the one operation in flight), each snapshot's checkpoint
//!   verifies, and every image passes `qemu-img check` (leaks allowed).
//!
//! CI runs [`CI_TRIALS`] trials of each kind; `SNAPVMM_CHECKPOINT_CRASH_TRIALS=N` runs N
//! (`scripts/crash-trials.sh`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use snapshot::tree::{DeleteOptions, SnapshotTree, TakeOptions};
use snapshot::vm_state::VmState;
use storage::{LiveDisk, OpenOptions};
use test_support::console::Console;
use test_support::qemu::qemu_check;
use test_support::require::{have_kvm, have_qemu};
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::{CheckpointOptions, Vmm};

const CHILD_ENV: &str = "SNAPVMM_CHECKPOINT_CRASH_CHILD";
const TRIALS_ENV: &str = "SNAPVMM_CHECKPOINT_CRASH_TRIALS";
/// Trials of each kind in CI.
const CI_TRIALS: usize = 3;
const DISK_SIZE: u64 = 256 << 10;

/// Appends one line per `write(2)`, which survives SIGKILL whole.
struct Journal(std::fs::File);

impl Journal {
    fn line(&mut self, text: &str) {
        self.0
            .write_all(format!("{text}\n").as_bytes())
            .expect("journal write");
    }
}

fn journal_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("journal"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn io_loop_vm(dir: &Path) -> Vmm {
    let disk = dir.join("vda.qcow2");
    if !disk.exists() {
        storage::qcow2::create(
            &disk,
            &storage::qcow2::CreateOptions {
                size: Some(DISK_SIZE),
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .expect("create disk");
    }
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::IoLoop,
        seed: 7,
    });
    config.memory_mib = 16;
    let mut disk_config = DiskConfig::new(&disk);
    disk_config.format = Some(storage::ImageFormat::Qcow2);
    config.disks.push(disk_config);
    Vmm::start_with_serial(&config, Box::new(Console::default())).expect("start the VM")
}

/// The child's side: runs until killed.
#[test]
fn checkpoint_crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // Only ever run as a child of the trials below.
    };
    let (scenario, dir) = spec.split_once(':').expect("scenario:dir");
    let dir = Path::new(dir);
    let mut journal = Journal(
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("journal"))
            .expect("journal"),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let vmm = io_loop_vm(dir);
    let checkpointer = vmm.checkpointer();
    journal.line("started");
    match scenario {
        "checkpoint" => {
            for i in 0.. {
                let options = CheckpointOptions {
                    live: i % 4 >= 2,
                    incremental: i % 2 == 1,
                    replace: false,
                };
                let target = dir.join(format!("c{i}"));
                journal.line(&format!("begin c{i}"));
                checkpointer
                    .checkpoint(&target, options)
                    .unwrap_or_else(|e| panic!("checkpoint c{i} ({options:?}): {e}"));
                journal.line(&format!("done c{i}"));
                std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
            }
        }
        "tree" => {
            let disks: Vec<Arc<LiveDisk>> = vmm.disks().iter().map(|d| d.disk.clone()).collect();
            let tree = SnapshotTree::open(
                dir.join("snapshots.json"),
                disks,
                Some(checkpointer.clone() as Arc<dyn VmState>),
            )
            .expect("open tree");
            let mut live: Vec<String> = Vec::new();
            for i in 0.. {
                let name = format!("s{i}");
                journal.line(&format!("begin create {name}"));
                tree.create(&name, &TakeOptions::with_memory())
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
                journal.line(&format!("done create {name}"));
                live.push(name);
                if i % 3 == 2 {
                    let target = live[rng.random_range(0..live.len())].clone();
                    journal.line(&format!("begin revert {target}"));
                    tree.revert(&target)
                        .unwrap_or_else(|e| panic!("revert {target}: {e}"));
                    journal.line(&format!("done revert {target}"));
                }
                if live.len() > 3 {
                    let target = live.remove(0);
                    journal.line(&format!("begin delete {target}"));
                    tree.delete(&target, &DeleteOptions::default())
                        .unwrap_or_else(|e| panic!("delete {target}: {e}"));
                    journal.line(&format!("done delete {target}"));
                }
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Starts a child on `scenario` in `dir`, kills it `kill_after` after it started its VM.
fn run_child(scenario: &str, dir: &Path, kill_after: Duration) {
    std::fs::write(dir.join("journal"), "").expect("journal");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "checkpoint_crash_child", "--nocapture"])
        .env(CHILD_ENV, format!("{scenario}:{}", dir.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("child.stderr")).expect("stderr file"))
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !journal_lines(dir).iter().any(|l| l == "started") {
        if let Some(status) = child.try_wait().expect("wait child") {
            panic!(
                "the child exited ({status}) before starting: {}",
                std::fs::read_to_string(dir.join("child.stderr")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the child did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(kill_after);
    if let Some(status) = child.try_wait().expect("wait child") {
        panic!(
            "the child died on its own ({status}): {}",
            std::fs::read_to_string(dir.join("child.stderr")).unwrap_or_default()
        );
    }
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let killed = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(killed, 0, "kill the child");
    child.wait().expect("reap child");
}

fn trials() -> usize {
    std::env::var(TRIALS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_TRIALS)
}

/// Every qcow2 image in `dir` is consistent (a dirty one as the next writable open leaves
/// it, checked on a copy).
fn assert_images_consistent(what: &str, dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let mut path = entry.expect("entry").path();
        if !(path.extension().is_some_and(|e| e == "qcow2") && path.is_file()) {
            continue;
        }
        let header = std::fs::read(&path).expect("read image");
        if header.get(72..80).is_some_and(|b| b[7] & 1 != 0) {
            let copy = path.with_extension("repaired");
            std::fs::copy(&path, &copy).expect("copy");
            let options = OpenOptions {
                open_backing: false,
                format: Some(storage::ImageFormat::Qcow2),
                ..Default::default()
            };
            drop(storage::open(&copy, &options).expect("repairing open"));
            path = copy;
        }
        let result = qemu_check(&path);
        assert!(
            result.consistent(),
            "{what}: qemu-img check {}: {}",
            path.display(),
            result.output
        );
    }
}

#[test]
fn sigkill_during_checkpoint_saves_leaves_only_valid_checkpoints() {
    if !have_kvm("sigkill_during_checkpoint_saves_leaves_only_valid_checkpoints") {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc4ec);
    let mut saves = 0;
    for trial in 0..trials() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        let kill_after = Duration::from_millis(rng.random_range(0..400));
        run_child("checkpoint", dir, kill_after);
        let what = format!("checkpoint trial {trial} (killed after {kill_after:?})");
        let lines = journal_lines(dir);
        let done: BTreeSet<String> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("done ").map(str::to_string))
            .collect();
        saves += done.len();
        let mut last = None;
        for i in 0.. {
            let name = format!("c{i}");
            let path = dir.join(&name);
            if !path.exists() {
                assert!(
                    !done.contains(&name),
                    "{what}: {name} was saved but is gone"
                );
                if !dir.join(format!("c{}", i + 1)).exists() {
                    break;
                }
                continue;
            }
            snapshot::checkpoint::verify_chain(&path)
                .unwrap_or_else(|e| panic!("{what}: {name} does not verify: {e}"));
            last = Some(path);
        }
        if let Some(last) = last {
            let restored = Vmm::restore(&last, Box::new(Console::default()), true)
                .unwrap_or_else(|e| panic!("{what}: restoring {}: {e}", last.display()));
            restored.stop().expect("stop the restored VM");
        }
        assert_images_consistent(&what, dir);
    }
    eprintln!("{} checkpoint trials, {saves} completed saves", trials());
}

#[test]
fn sigkill_during_tree_operations_with_memory_loses_no_snapshot() {
    if !have_kvm("sigkill_during_tree_operations_with_memory_loses_no_snapshot")
        || !have_qemu("sigkill_during_tree_operations_with_memory_loses_no_snapshot")
    {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7ee);
    let mut ops = 0;
    for trial in 0..trials() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        let kill_after = Duration::from_millis(rng.random_range(0..600));
        run_child("tree", dir, kill_after);
        let what = format!("tree trial {trial} (killed after {kill_after:?})");
        let lines = journal_lines(dir);
        // Created and not deleted, by what the child saw complete; the operation in
        // flight may or may not have happened.
        let mut expected = BTreeSet::new();
        let mut in_flight = None;
        for line in &lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["begin", op, name] => in_flight = Some((op.to_string(), name.to_string())),
                ["done", op, name] => {
                    ops += 1;
                    in_flight = None;
                    match *op {
                        "create" => {
                            expected.insert(name.to_string());
                        }
                        "delete" => {
                            expected.remove(*name);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let meta = dir.join("snapshots.json");
        if !meta.exists() {
            assert!(
                expected.is_empty(),
                "{what}: no metadata, expected {expected:?}"
            );
            continue;
        }
        let tops = SnapshotTree::resume_tops(&meta).expect("resume tops");
        let top = tops
            .first()
            .cloned()
            .unwrap_or_else(|| dir.join("vda.qcow2"));
        let disk = LiveDisk::new(
            "vda",
            storage::open(&top, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{what}: open {}: {e}", top.display())),
        );
        let tree = SnapshotTree::open(&meta, vec![disk.clone()], None)
            .unwrap_or_else(|e| panic!("{what}: the tree does not reopen: {e}"));
        assert!(
            tree.problems().iter().all(|p| p.contains("interrupted")),
            "{what}: problems {:?}",
            tree.problems()
        );
        let listed: BTreeSet<String> = tree.list().into_iter().map(|s| s.name).collect();
        let mut allowed = expected.clone();
        let mut required = expected.clone();
        match &in_flight {
            Some((op, name)) if op == "create" => {
                allowed.insert(name.clone());
            }
            Some((op, name)) if op == "delete" => {
                required.remove(name);
            }
            _ => {}
        }
        assert!(
            listed.is_superset(&required) && listed.is_subset(&allowed),
            "{what}: lists {listed:?}, expected {expected:?} (in flight {in_flight:?})"
        );
        for info in tree.list() {
            if let Some(checkpoint) = &info.checkpoint {
                snapshot::checkpoint::verify_chain(checkpoint).unwrap_or_else(|e| {
                    panic!("{what}: {}'s checkpoint does not verify: {e}", info.name)
                });
            }
        }
        drop(tree);
        drop(disk);
        assert_images_consistent(&what, dir);
    }
    eprintln!("{} tree trials, {ops} completed operations", trials());
}
