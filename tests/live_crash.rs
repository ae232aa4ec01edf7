//! Crash trials: a child process writes through a live disk while it switches overlays,
//! streams or commits, and is killed with SIGKILL at a random moment. The chain it leaves
//! must open and hold every write acknowledged before the child's last completed flush.
//!
//! The child journals each write *before* issuing it ("W block gen") and each completed
//! flush ("F"), plus the file that holds the disk's top whenever that changes ("T path",
//! written before the change where a crash could otherwise lose it). Journal lines are
//! single `write(2)` calls, which survive SIGKILL. A block must then hold the generation of
//! its last write before the last "F", or of a later write; never anything else.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::JobStatus;
use storage::LiveDisk;
use test_support::image::{open_rw, qcow2};
use test_support::model::{fill, Model};
use test_support::pattern::{block_data, generation_of, BLOCK};
use test_support::qemu::assert_check_consistent;
use test_support::require::have_qemu;

const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / BLOCK;
const CHILD_ENV: &str = "SNAPVMM_LIVE_CRASH_CHILD";

struct Journal(std::fs::File);

impl Journal {
    fn line(&mut self, text: String) {
        self.0
            .write_all(format!("{text}\n").as_bytes())
            .expect("journal write");
    }
}

/// Chain depth accepted when reopening after a crash: the switch scenario adds a layer per
/// switch.
const DEEP_CHAIN: usize = 100_000;

/// The child's side: runs until killed.
#[test]
fn crash_child() {
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
    let top = dir.join("top.qcow2");
    let live = LiveDisk::new("vda", open_rw(&top));
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let mut gen = 100;
    let mut job = match scenario {
        "stream" => Some(
            stream(
                &live,
                StreamOptions {
                    speed: 8 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "commit" => Some(
            commit(
                &live,
                CommitOptions {
                    speed: 16 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        _ => None,
    };
    let mut snapshots = 0;
    loop {
        for _ in 0..16 {
            let b = rng.random_range(0..BLOCKS);
            gen += 1;
            journal.line(format!("W {b} {gen}"));
            live.write_at(&block_data(0, b, gen), b * BLOCK).unwrap();
        }
        live.flush().unwrap();
        journal.line("F".into());
        match scenario {
            "switch" => {
                snapshots += 1;
                let overlay = dir.join(format!("snap{snapshots}.qcow2"));
                // Named before the switch: the overlay reads through to the old top, so it
                // is the right file to open whether or not the switch happened.
                journal.line(format!("T {}", overlay.display()));
                external_snapshot(&[DiskOverlay::new(&live, &overlay)]).unwrap();
            }
            "commit" => {
                if let Some(j) = job.as_ref().filter(|j| j.status() == JobStatus::Ready) {
                    // No write runs between the pivot and this line: either file is right.
                    let base = dir.join("base.qcow2");
                    j.complete().unwrap();
                    j.wait().unwrap();
                    journal.line(format!("T {}", base.display()));
                    job = None;
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Replays the journal: the top file, and for each block the generations it may hold.
fn replay(dir: &Path) -> (PathBuf, HashMap<u64, Vec<u64>>) {
    let text = std::fs::read_to_string(dir.join("journal")).unwrap();
    let mut top = dir.join("top.qcow2");
    let mut tops = vec![top.clone()];
    // Per block: every generation written, in order, and how many were before the last F.
    let mut writes: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut flushed: HashMap<u64, usize> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        match parts.next() {
            Some("W") => {
                let b: u64 = parts.next().unwrap().parse().unwrap();
                let g: u64 = parts.next().unwrap().parse().unwrap();
                writes.entry(b).or_default().push(g);
            }
            Some("F") => {
                for (b, gens) in &writes {
                    flushed.insert(*b, gens.len());
                }
            }
            Some("T") => {
                top = PathBuf::from(parts.collect::<Vec<_>>().join(" "));
                tops.push(top.clone());
            }
            _ => {} // A line cut short by the kill.
        }
    }
    // A switch killed while creating its overlay leaves a file that is not an image.
    while storage::open(
        &top,
        &storage::OpenOptions {
            read_only: true,
            max_chain_depth: DEEP_CHAIN,
            // Every top is qcow2: an overlay cut short before its header was written has no
            // magic and must not be probed as a (valid) raw image.
            format: Some(storage::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .is_err()
    {
        tops.pop();
        top = tops.last().expect("no openable top").clone();
    }
    let allowed = writes
        .into_iter()
        .map(|(b, gens)| {
            let n = flushed.get(&b).copied().unwrap_or(0);
            // The last flushed generation and anything later (not yet flushed).
            let from = n.saturating_sub(1);
            let mut ok: Vec<u64> = gens[from..].to_vec();
            if n == 0 {
                ok.push(1); // The base's initial data (or zeroes) until a flushed write.
                ok.push(0);
            }
            (b, ok)
        })
        .collect();
    (top, allowed)
}

fn trial(scenario: &str, kill_after: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let model = Model::default();
    qcow2(&base, SIZE, None);
    qcow2(&top, SIZE, Some(Path::new("base.qcow2")));
    // Every block starts as generation 1 in base (stream) or in top (commit).
    let seeded = if scenario == "stream" { &base } else { &top };
    fill(seeded, 0, BLOCKS, 0, 1, 1, &model);
    std::fs::write(dir.path().join("journal"), "").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{scenario}:{}", dir.path().display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(kill_after);
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{scenario}: child exited early with {status}");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (top, allowed) = replay(dir.path());
    // A long-running child stacks one overlay per switch: open past the default depth limit
    // (falling back to an older top would read stale data and fail for the wrong reason).
    let dev = storage::open(
        &top,
        &storage::OpenOptions {
            max_chain_depth: DEEP_CHAIN,
            format: Some(storage::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", top.display()));
    let mut buf = vec![0u8; BLOCK as usize];
    let mut checked = 0;
    for b in 0..BLOCKS {
        dev.read_at(&mut buf, b * BLOCK).unwrap();
        let got = generation_of(0, b, &buf)
            .unwrap_or_else(|| panic!("{scenario}: block {b} holds garbage"));
        match allowed.get(&b) {
            Some(ok) => {
                assert!(
                    ok.contains(&got),
                    "{scenario}: block {b} holds gen {got}, allowed {ok:?}"
                );
                checked += 1;
            }
            None => assert_eq!(got, 1, "{scenario}: untouched block {b}"),
        }
    }
    assert!(
        checked > 0,
        "{scenario}: the child wrote nothing before the kill"
    );
    let layers: Vec<PathBuf> = snapshot::chain::layers(&dev)
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    drop(dev);
    if have_qemu("live_crash") {
        for layer in &layers {
            assert_check_consistent(layer);
        }
    }
}

#[test]
fn sigkill_during_overlay_switches_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("switch", Duration::from_millis(rng.random_range(150..500)));
    }
}

#[test]
fn sigkill_during_stream_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("stream", Duration::from_millis(rng.random_range(150..700)));
    }
}

#[test]
fn sigkill_during_active_commit_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("commit", Duration::from_millis(rng.random_range(150..1200)));
    }
}

// ---- Crash trials of the snapshot tree (issue 13) ----
//
// A child process runs random snapshot creates (all four kinds), reverts, deletes and
// flushed guest writes on two disks, and dies: either `_exit` at a chosen step of a
// chosen metadata write (every such point is reachable), or SIGKILL at a random moment
// (merges, file creation, copies). The parent then opens the tree as a restarted VM would
// (on `SnapshotTree::resume_tops`) and checks: the tree opens; every qcow2 file in the
// directory is one the metadata names; nothing the metadata names is missing; `qemu-img
// check` finds no corruption; every snapshot still reverts to exactly the contents it was
// taken with (checksums the child journaled at creation); and deleting every snapshot
// (compaction) keeps the disks' contents. `SNAPVMM_TREE_CRASH_TRIALS=N` runs N trials of
// each kind (scripts/crash-trials.sh).

mod tree_crash {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    use std::io::{Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rand::{Rng, SeedableRng};
    use snapshot::tree::{DeleteOptions, SnapshotTree, TakeOptions};
    use snapshot::vm_state::{VmState, VmStateError};
    use storage::{LiveDisk, OpenOptions};
    use test_support::qemu::assert_consistent_as_next_open_leaves;
    use test_support::require::have_qemu;

    const SIZE: u64 = 1 << 20;
    const BLOCK: u64 = 4096;
    const CHILD_ENV: &str = "SNAPVMM_TREE_CRASH_CHILD";
    const DISKS: [&str; 2] = ["vda", "vdb"];
    /// Operations a child runs when it is to exit at a metadata write step.
    const SCRIPTED_OPS: usize = 14;

    /// A VM whose state is a few bytes; what it saves is what it loads.
    pub struct Vm {
        memory: Mutex<Vec<u8>>,
        paused: AtomicBool,
    }

    impl Vm {
        fn new() -> Arc<Vm> {
            Arc::new(Vm {
                memory: Mutex::new(vec![1; 64]),
                paused: AtomicBool::new(false),
            })
        }
    }

    impl VmState for Vm {
        fn pause_vcpus(&self) -> Result<bool, VmStateError> {
            Ok(!self.paused.swap(true, Ordering::SeqCst))
        }
        fn resume_vcpus(&self) -> Result<(), VmStateError> {
            self.paused.store(false, Ordering::SeqCst);
            Ok(())
        }
        fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
            snapshot::checkpoint::create_private_dir(dir)?;
            std::fs::write(dir.join("memory"), &*self.memory.lock().unwrap())?;
            Ok(())
        }
        fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
            *self.memory.lock().unwrap() = std::fs::read(dir.join("memory"))?;
            Ok(())
        }
        fn save_stream(&self, out: &mut dyn Write) -> Result<u64, VmStateError> {
            let memory = self.memory.lock().unwrap();
            out.write_all(&memory)?;
            Ok(memory.len() as u64)
        }
        fn load_stream(&self, input: &mut dyn Read) -> Result<(), VmStateError> {
            let mut memory = Vec::new();
            input.read_to_end(&mut memory)?;
            *self.memory.lock().unwrap() = memory;
            Ok(())
        }
    }

    fn content_hash(disks: &[Arc<LiveDisk>]) -> u64 {
        let mut hasher = DefaultHasher::new();
        let mut buf = vec![0u8; SIZE as usize];
        for disk in disks {
            disk.read_at(&mut buf, 0).unwrap();
            buf.hash(&mut hasher);
        }
        hasher.finish()
    }

    /// Opens the VM's disks where a restart would: on the tree's resume tops.
    fn open_disks(dir: &Path) -> Vec<Arc<LiveDisk>> {
        let mut tops = SnapshotTree::resume_tops(dir.join("snapshots.json")).unwrap();
        if tops.is_empty() {
            tops = DISKS
                .iter()
                .map(|d| dir.join(format!("{d}.qcow2")))
                .collect();
        }
        DISKS
            .iter()
            .zip(tops)
            .map(|(name, top)| {
                let dev = storage::open(&top, &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("open {}: {e}", top.display()));
                LiveDisk::new(*name, dev)
            })
            .collect()
    }

    fn journal(dir: &Path, line: String) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("journal"))
            .unwrap();
        file.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// The child: `dir|seed|exit_at` (exit_at 0: run until killed).
    pub fn child(spec: &str) {
        let parts: Vec<&str> = spec.split('|').collect();
        let dir = PathBuf::from(parts[0]);
        let seed: u64 = parts[1].parse().unwrap();
        let exit_at: u64 = parts[2].parse().unwrap();
        let disks = open_disks(&dir);
        let vm = Vm::new();
        let tree = SnapshotTree::open(
            dir.join("snapshots.json"),
            disks.clone(),
            Some(vm.clone() as Arc<dyn VmState>),
        )
        .unwrap();
        let steps = Arc::new(AtomicU64::new(0));
        let counter = steps.clone();
        tree.set_fault_hook(Arc::new(move |_| {
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == exit_at {
                // SAFETY: ends the process at once, like a crash (no destructors run).
                unsafe { libc::_exit(0) };
            }
            Ok(())
        }));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut names: Vec<String> = Vec::new();
        let mut next = 0;
        let mut gen = 0u8;
        let ops = if exit_at == 0 {
            usize::MAX
        } else {
            SCRIPTED_OPS
        };
        for _ in 0..ops {
            // Guest writes, flushed: a restart must find them.
            gen = gen.wrapping_add(1);
            for disk in &disks {
                for _ in 0..rng.random_range(1..6) {
                    let block = rng.random_range(0..SIZE / BLOCK);
                    disk.write_at(&[gen; BLOCK as usize], block * BLOCK)
                        .unwrap();
                }
                disk.flush().unwrap();
            }
            vm.memory.lock().unwrap()[0] = gen;
            match rng.random_range(0..10) {
                0..=4 if names.len() < 6 => {
                    let name = format!("s{next}");
                    next += 1;
                    let options = match rng.random_range(0..4) {
                        0 => TakeOptions::disk_only(),
                        1 => TakeOptions::with_memory(),
                        2 => TakeOptions::internal(false),
                        _ => TakeOptions::internal(true),
                    };
                    let hash = content_hash(&disks);
                    tree.create(&name, &options).unwrap();
                    journal(&dir, format!("C {name} {hash}"));
                    names.push(name);
                }
                0..=6 if !names.is_empty() => {
                    let name = &names[rng.random_range(0..names.len())];
                    tree.revert(name).unwrap();
                }
                _ if !names.is_empty() => {
                    let name = names[rng.random_range(0..names.len())].clone();
                    let children = rng.random_bool(0.3);
                    let deleted = tree
                        .delete(
                            &name,
                            &DeleteOptions {
                                children,
                                metadata_only: false,
                            },
                        )
                        .unwrap();
                    names.retain(|n| !deleted.contains(n));
                }
                _ => {}
            }
        }
        std::fs::write(dir.join("steps"), steps.load(Ordering::SeqCst).to_string()).unwrap();
    }

    fn qcow2_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .map(|p| std::fs::canonicalize(p).unwrap())
            .collect();
        files.sort();
        files
    }

    /// Everything a restart after the crash must find.
    fn check(dir: &Path, what: &str) {
        let disks = open_disks(dir);
        let vm = Vm::new();
        let tree = SnapshotTree::open(
            dir.join("snapshots.json"),
            disks.clone(),
            Some(vm.clone() as Arc<dyn VmState>),
        )
        .unwrap_or_else(|e| panic!("{what}: the tree does not open: {e}"));
        for problem in tree.problems() {
            assert!(
                !problem.contains("missing") && !problem.contains("no internal snapshot"),
                "{what}: {problem}"
            );
        }
        assert!(
            !dir.join(".snapshots.json.tmp").exists(),
            "{what}: a temporary is left"
        );
        let named = tree.images();
        for file in qcow2_files(dir) {
            assert!(
                named.contains(&file),
                "{what}: {} is a file no metadata names",
                file.display()
            );
        }
        for image in &named {
            assert!(image.exists(), "{what}: {} is missing", image.display());
        }
        if have_qemu("tree crash trials") {
            // A crash inside an internal snapshot operation leaves the dirty bit, which makes
            // the next writable open rebuild refcounts and COPIED flags: check what it leaves.
            for file in qcow2_files(dir) {
                assert_consistent_as_next_open_leaves(what, &file);
            }
        }
        // Every snapshot holds what it was taken with.
        let text = std::fs::read_to_string(dir.join("journal")).unwrap_or_default();
        let hashes: std::collections::HashMap<String, u64> = text
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                (p.next() == Some("C")).then_some(())?;
                Some((p.next()?.to_string(), p.next()?.parse().ok()?))
            })
            .collect();
        for s in tree.list() {
            tree.revert(&s.name)
                .unwrap_or_else(|e| panic!("{what}: revert to {}: {e}", s.name));
            if let Some(expected) = hashes.get(&s.name) {
                assert_eq!(
                    content_hash(&disks),
                    *expected,
                    "{what}: snapshot {} changed",
                    s.name
                );
            }
        }
        // Compaction after all that keeps what the disks hold and every file it needs.
        let before = content_hash(&disks);
        for s in tree.list() {
            if tree.get(&s.name).is_ok() {
                tree.delete(&s.name, &DeleteOptions::default())
                    .unwrap_or_else(|e| panic!("{what}: delete {}: {e}", s.name));
            }
        }
        assert_eq!(
            content_hash(&disks),
            before,
            "{what}: compaction changed the disks"
        );
        drop(tree);
        drop(disks);
        let reopened = open_disks(dir);
        assert_eq!(content_hash(&reopened), before, "{what}: after restart");
    }

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in DISKS {
            test_support::image::qcow2(&dir.path().join(format!("{d}.qcow2")), SIZE, None);
        }
        dir
    }

    fn spawn(dir: &Path, seed: u64, exit_at: u64) -> std::process::Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "tree_crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}|{seed}|{exit_at}", dir.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn trials() -> Option<usize> {
        std::env::var("SNAPVMM_TREE_CRASH_TRIALS")
            .ok()
            .and_then(|v| v.parse().ok())
    }

    /// Exits at metadata write step `exit_at` of the scripted run with `seed`; returns
    /// whether the child got that far (false: it finished first).
    pub fn exit_trial(seed: u64, exit_at: u64) -> bool {
        let dir = setup();
        let status = spawn(dir.path(), seed, exit_at).wait().unwrap();
        assert!(status.success(), "child {seed}/{exit_at}: {status}");
        let finished = dir.path().join("steps").exists();
        check(
            dir.path(),
            &format!("seed {seed}, exit at metadata step {exit_at}"),
        );
        !finished
    }

    /// Steps the scripted run with `seed` takes in all.
    pub fn steps_of(seed: u64) -> u64 {
        let dir = setup();
        let status = spawn(dir.path(), seed, u64::MAX).wait().unwrap();
        assert!(status.success());
        std::fs::read_to_string(dir.path().join("steps"))
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn kill_trial(seed: u64, after: Duration) {
        let dir = setup();
        let mut child = spawn(dir.path(), seed, 0);
        std::thread::sleep(after);
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tree child {seed} exited early with {status}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check(dir.path(), &format!("seed {seed}, SIGKILL after {after:?}"));
    }
}

#[test]
fn tree_crash_child() {
    if let Ok(spec) = std::env::var("SNAPVMM_TREE_CRASH_CHILD") {
        tree_crash::child(&spec);
    }
}

#[test]
fn tree_crash_at_metadata_writes_loses_no_snapshot() {
    let mut rng = rand::rng();
    let wanted = tree_crash::trials().unwrap_or(6);
    let mut done = 0;
    while done < wanted {
        let seed: u64 = rng.random();
        let total = tree_crash::steps_of(seed);
        assert!(total > 0, "seed {seed}: no metadata write at all");
        // On demand every step of a run; in CI a few random ones.
        let points: Vec<u64> = if tree_crash::trials().is_some() {
            (1..=total).collect()
        } else {
            (0..3).map(|_| rng.random_range(1..=total)).collect()
        };
        for exit_at in points {
            if done == wanted {
                break;
            }
            tree_crash::exit_trial(seed, exit_at);
            done += 1;
        }
    }
    eprintln!("tree crash trials at metadata writes: {done}");
}

#[test]
fn tree_sigkill_at_random_moments_loses_no_snapshot() {
    let mut rng = rand::rng();
    let wanted = tree_crash::trials().unwrap_or(3);
    for _ in 0..wanted {
        tree_crash::kill_trial(
            rng.random(),
            Duration::from_millis(rng.random_range(50..700)),
        );
    }
    eprintln!("tree SIGKILL trials: {wanted}");
}
