//! The operations fault matrix: every multi-step operation of the snapshot layer driven
//! through each of its failure points. A clean run of the operation counts the file
//! operations it does (image writes, syncs, renames, truncates and creations, the tree's
//! metadata steps and the checkpoint files', all through `storage::fault`); then, on a fresh
//! copy of the same setup each time, call k fails with EIO or ENOSPC. After each trial:
//!
//! - the outcome reported is the state left: an error leaves the disks on their old tops (or,
//!   for [`snapshot::Error::AfterSwitch`], on the new ones, kept) and the tree without the
//!   new snapshot; success did all of it;
//! - the writer's data flushed before the operation reads back, live and after a restart,
//!   and so does data written and flushed after the failure;
//! - no image frozen before the operation changed a byte (hashed before);
//! - the tree reopens, on the tops it records, and every snapshot it lists reverts to its
//!   disks and memory;
//! - `qemu-img check` finds no corruption in any image of the directory (leaks are allowed).
//!
//! Small images (256 KiB, 4 KiB clusters), no VM: the VM is a buffer whose checkpoints go
//! through the checkpoint crate's memory-file writer, so the CI run takes seconds. CI fails
//! every step of an operation up to [`CI_TRIALS`] of them (spread over the steps, EIO and
//! ENOSPC alternating); `SNAPVMM_FAULT_MATRIX=full` fails every step with both errors.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::checkpoint::memory_file::MemoryFile;
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::tree::{DeleteOptions, SnapshotTree, TakeOptions};
use snapshot::vm_state::{VmState, VmStateError};
use snapshot::JobStatus;
use storage::fault::{self, Fault, FaultPlan};
use storage::qcow2::{create, CreateOptions};
use storage::{LiveDisk, OpenOptions};
use test_support::qemu::assert_consistent_as_next_open_leaves;
use test_support::require::have_qemu;

const SIZE: u64 = 256 << 10;
const CLUSTER: u64 = 4096;
const MEMORY: u64 = 64 << 10;
/// Trials per operation in CI mode.
const CI_TRIALS: u64 = 24;
/// More file operations than this is a runaway loop, not an operation.
const MAX_STEPS: u64 = 2000;

fn full_mode() -> bool {
    std::env::var("SNAPVMM_FAULT_MATRIX").is_ok_and(|v| v == "full")
}

/// The failure points tried for an operation of `steps` file operations: every one with
/// both errors in full mode; in CI at most [`CI_TRIALS`], spread evenly and always
/// including the first and the last, EIO and ENOSPC alternating.
fn plan(steps: u64) -> Vec<(u64, Fault)> {
    if full_mode() {
        return (1..=steps)
            .flat_map(|k| [(k, Fault::Eio), (k, Fault::Enospc)])
            .collect();
    }
    let mut ks: Vec<u64> = if steps <= CI_TRIALS {
        (1..=steps).collect()
    } else {
        (0..CI_TRIALS)
            .map(|i| 1 + i * (steps - 1) / (CI_TRIALS - 1))
            .collect()
    };
    ks.dedup();
    ks.into_iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k,
                if i % 2 == 0 {
                    Fault::Eio
                } else {
                    Fault::Enospc
                },
            )
        })
        .collect()
}

fn new_image(path: &Path, backing: Option<&Path>) {
    create(
        path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size: CLUSTER,
            backing_file: backing.map(|b| b.to_string_lossy().into_owned()),
            backing_format: backing.map(|_| storage::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .expect("create image");
}

fn open_disk(name: &str, top: &Path) -> Arc<LiveDisk> {
    LiveDisk::new(
        name,
        storage::open(top, &OpenOptions::default()).expect("open disk"),
    )
}

fn read_disk(disk: &LiveDisk) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    disk.read_at(&mut buf, 0).expect("read disk");
    buf
}

/// What a disk holds: its bytes, kept alongside as the writer's model.
type Data = Vec<u8>;

/// Writes `clusters` of `value` into `disk` and the model, then flushes.
fn write_flush(disk: &LiveDisk, model: &mut Data, value: u8, clusters: &[u64]) {
    for &c in clusters {
        let buf = vec![value; CLUSTER as usize];
        disk.write_at(&buf, c * CLUSTER).expect("write");
        model[(c * CLUSTER) as usize..][..CLUSTER as usize].copy_from_slice(&buf);
    }
    disk.flush().expect("flush");
}

/// A one-line description of a disk's contents: runs of equal cluster values.
fn runs(bytes: &[u8]) -> String {
    let values: Vec<u8> = bytes.chunks(CLUSTER as usize).map(|c| c[0]).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let j = i + values[i..].iter().take_while(|&&b| b == values[i]).count();
        out.push(format!("{:#04x}x{}", values[i], j - i));
        i = j;
    }
    out.join(" ")
}

fn assert_data(what: &str, got: &[u8], expected: &[u8]) {
    assert!(
        got == expected,
        "{what}: reads [{}], expected [{}]",
        runs(got),
        runs(expected)
    );
}

/// A file's length and content hash (SipHash: enough to see any change).
fn content_hash(path: &Path) -> (u64, u64) {
    use std::hash::{Hash as _, Hasher};
    let bytes = std::fs::read(path).expect("read frozen file");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len() as u64, h.finish())
}

/// Hashes of files frozen before the operation.
struct Frozen(BTreeMap<PathBuf, (u64, u64)>);

impl Frozen {
    fn of(paths: &[PathBuf]) -> Frozen {
        Frozen(paths.iter().map(|p| (p.clone(), content_hash(p))).collect())
    }

    fn assert_unchanged(&self, what: &str) {
        for (path, hash) in &self.0 {
            if path.exists() {
                assert_eq!(
                    &content_hash(path),
                    hash,
                    "{what}: frozen image {} changed",
                    path.display()
                );
            }
        }
    }
}

/// Every qcow2 image in `dir` passes `qemu-img check` (leaks allowed) as its next writable
/// open leaves it.
fn assert_images_consistent(what: &str, dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "qcow2") && path.is_file() {
            assert_consistent_as_next_open_leaves(what, &path);
        }
    }
}

/// Runs `trial(dir, k, fault)` for the clean run (k = 0, returning the steps it counted),
/// then for every failure point of [`plan`].
fn matrix(name: &str, trial: impl Fn(&Path, u64, Fault) -> u64) {
    let root = tempfile::tempdir().expect("tempdir");
    let clean = root.path().join("clean");
    std::fs::create_dir(&clean).expect("mkdir");
    let steps = trial(&clean, 0, Fault::Eio);
    assert!(
        steps > 0 && steps < MAX_STEPS,
        "{name}: {steps} steps counted"
    );
    let trials = plan(steps);
    eprintln!("{name}: {steps} failure points, {} trials", trials.len());
    for (k, error) in trials {
        let dir = root.path().join(format!("{k}-{error:?}"));
        std::fs::create_dir(&dir).expect("mkdir");
        trial(&dir, k, error);
        std::fs::remove_dir_all(&dir).expect("clean up trial");
    }
}

/// Runs `op` with failure point `k` armed over `dir` (k = 0 counts only); returns the
/// operation's result, the steps counted and whether the fault fired.
fn armed<T>(dir: &Path, k: u64, error: Fault, op: impl FnOnce() -> T) -> (T, u64, bool) {
    let guard = fault::inject(if k == 0 {
        FaultPlan::count_only().under(dir)
    } else {
        FaultPlan::fail_nth(k, None, error).under(dir)
    });
    let result = op();
    let (count, fired) = (guard.count(), guard.fired() > 0);
    drop(guard);
    assert!(
        k == 0 || fired || k > count,
        "step {k} of {count} did not fire"
    );
    (result, count, fired)
}

/// Writes more data after the operation and flushes it: once the flush succeeds it must
/// survive a restart. Returns false when the disk could not take writes (acceptable only
/// if a fault fired: the model is then left as it was).
fn write_after(disk: &LiveDisk, model: &mut Data, value: u8) -> bool {
    let mut next = model.clone();
    for c in [2u64, 50] {
        let buf = vec![value; CLUSTER as usize];
        if disk.write_at(&buf, c * CLUSTER).is_err() {
            return false;
        }
        next[(c * CLUSTER) as usize..][..CLUSTER as usize].copy_from_slice(&buf);
    }
    if disk.flush().is_err() {
        return false;
    }
    *model = next;
    true
}

#[test]
fn live_snapshot_of_a_disk_set_survives_every_failure() {
    if !have_qemu("live_snapshot_of_a_disk_set_survives_every_failure") {
        return;
    }
    matrix("live snapshot", |dir, k, error| {
        let names = ["vda", "vdb"];
        let mut models = Vec::new();
        let mut disks = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(format!("{name}.qcow2"));
            new_image(&path, None);
            let disk = open_disk(name, &path);
            let mut model = vec![0u8; SIZE as usize];
            write_flush(&disk, &mut model, 0x10 + i as u8, &[0, 1, 7, 30]);
            disks.push(disk);
            models.push(model);
        }
        let old: Vec<PathBuf> = disks.iter().map(|d| d.top().path().to_path_buf()).collect();
        let overlays: Vec<PathBuf> = names
            .iter()
            .map(|n| dir.join(format!("{n}.s1.qcow2")))
            .collect();
        let (result, count, fired) = armed(dir, k, error, || {
            external_snapshot(
                &disks
                    .iter()
                    .zip(&overlays)
                    .map(|(d, o)| DiskOverlay::new(d, o))
                    .collect::<Vec<_>>(),
            )
        });
        let what = format!("live snapshot, step {k} ({error:?})");
        let switched = match &result {
            Ok(_) => true,
            Err(snapshot::Error::AfterSwitch { .. }) => true,
            Err(e) => {
                assert!(fired, "{what}: unarmed run failed: {e}");
                false
            }
        };
        for (i, disk) in disks.iter().enumerate() {
            let expected = if switched { &overlays[i] } else { &old[i] };
            assert_eq!(
                disk.top().path(),
                expected.as_path(),
                "{what}: {result:?} left disk {i} on another top"
            );
            if !switched {
                assert!(
                    !overlays[i].exists(),
                    "{what}: the failed snapshot left {}",
                    overlays[i].display()
                );
            }
            assert_data(&what, &read_disk(disk), &models[i]);
        }
        if switched {
            // The old tops are frozen now.
            let frozen = Frozen::of(&old);
            let mut wrote = true;
            for (i, disk) in disks.iter().enumerate() {
                wrote &= write_after(disk, &mut models[i], 0x40 + i as u8);
            }
            assert!(
                wrote || fired,
                "{what}: writes after a clean snapshot failed"
            );
            frozen.assert_unchanged(&what);
        } else {
            for (i, disk) in disks.iter().enumerate() {
                write_after(disk, &mut models[i], 0x40 + i as u8);
            }
        }
        let tops: Vec<PathBuf> = disks.iter().map(|d| d.top().path().to_path_buf()).collect();
        drop(disks);
        for (i, top) in tops.iter().enumerate() {
            let disk = open_disk(names[i], top);
            assert_data(&format!("{what}, reopened"), &read_disk(&disk), &models[i]);
        }
        assert_images_consistent(&what, dir);
        count
    });
}

/// base (0x11 in 0..8) <- mid (0x22 in 4..12) <- top (0x33 in 10..14), the writer's data
/// flushed into the top: the chain stream and commit run on.
fn three_layers(dir: &Path) -> (Arc<LiveDisk>, Data, [PathBuf; 3]) {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let mut model = vec![0u8; SIZE as usize];
    new_image(&base, None);
    let disk = open_disk("vda", &base);
    write_flush(&disk, &mut model, 0x11, &(0..8).collect::<Vec<_>>());
    drop(disk);
    new_image(&mid, Some(&base));
    let disk = open_disk("vda", &mid);
    write_flush(&disk, &mut model, 0x22, &(4..12).collect::<Vec<_>>());
    drop(disk);
    new_image(&top, Some(&mid));
    let disk = open_disk("vda", &top);
    write_flush(&disk, &mut model, 0x33, &(10..14).collect::<Vec<_>>());
    (disk, model, [base, mid, top])
}

/// Waits for `job` and tells whether it completed.
fn finished(job: &snapshot::Job) -> bool {
    matches!(job.wait(), Ok(snapshot::JobOutcome::Completed))
}

#[test]
fn stream_survives_every_failure() {
    if !have_qemu("stream_survives_every_failure") {
        return;
    }
    matrix("stream", |dir, k, error| {
        let (disk, mut model, [base, mid, top]) = three_layers(dir);
        let frozen = Frozen::of(&[base.clone(), mid.clone()]);
        let (done, count, fired) = armed(dir, k, error, || {
            stream(
                &disk,
                StreamOptions {
                    base: Some(base.clone()),
                    ..Default::default()
                },
            )
            .is_ok_and(|job| finished(&job))
        });
        let what = format!("stream, step {k} ({error:?})");
        assert!(done || fired, "{what}: the unarmed stream failed");
        assert_eq!(disk.top().path(), top.as_path());
        assert_data(&what, &read_disk(&disk), &model);
        frozen.assert_unchanged(&what);
        write_after(&disk, &mut model, 0x44);
        drop(disk);
        let disk = open_disk("vda", &top);
        assert_data(&format!("{what}, reopened"), &read_disk(&disk), &model);
        if done {
            // The top now stands on base alone: mid can go.
            let chain = test_support::qemu::qemu_chain(&top);
            assert!(!chain.contains(&mid), "{what}: completed, chain {chain:?}");
        }
        drop(disk);
        assert_images_consistent(&what, dir);
        count
    });
}

#[test]
fn active_commit_with_pivot_survives_every_failure() {
    if !have_qemu("active_commit_with_pivot_survives_every_failure") {
        return;
    }
    matrix("active commit", |dir, k, error| {
        let (disk, mut model, [base, mid, top]) = three_layers(dir);
        // Committing the top into mid: base stays frozen below both.
        let frozen = Frozen::of(std::slice::from_ref(&base));
        let (done, count, fired) = armed(dir, k, error, || {
            let Ok(job) = commit(&disk, CommitOptions::default()) else {
                return false;
            };
            if !job.wait_for(Duration::from_secs(30), |s| {
                matches!(s, JobStatus::Ready | JobStatus::Concluded)
            }) {
                job.cancel();
            }
            if job.status() == JobStatus::Ready && job.complete().is_err() {
                job.cancel();
            }
            finished(&job)
        });
        let what = format!("active commit, step {k} ({error:?})");
        assert!(done || fired, "{what}: the unarmed commit failed");
        let expected_top = if done { &mid } else { &top };
        assert_eq!(
            disk.top().path(),
            expected_top.as_path(),
            "{what}: completed {done}"
        );
        assert_data(&what, &read_disk(&disk), &model);
        frozen.assert_unchanged(&what);
        write_after(&disk, &mut model, 0x44);
        drop(disk);
        let disk = open_disk("vda", expected_top);
        assert_data(&format!("{what}, reopened"), &read_disk(&disk), &model);
        drop(disk);
        assert_images_consistent(&what, dir);
        count
    });
}

/// A VM whose state is a buffer; checkpoints go through the checkpoint memory-file writer
/// (so the fault layer sees their creation, writes and syncs) and the VM-state stream of an
/// internal snapshot through the qcow2 image.
struct BufferVm {
    memory: Mutex<Vec<u8>>,
    paused: AtomicBool,
}

impl BufferVm {
    fn new(value: u8) -> Arc<BufferVm> {
        Arc::new(BufferVm {
            memory: Mutex::new(vec![value; MEMORY as usize]),
            paused: AtomicBool::new(false),
        })
    }

    fn memory(&self) -> Vec<u8> {
        self.memory.lock().unwrap().clone()
    }
}

impl VmState for BufferVm {
    fn pause_vcpus(&self) -> Result<bool, VmStateError> {
        Ok(!self.paused.swap(true, Ordering::SeqCst))
    }

    fn resume_vcpus(&self) -> Result<(), VmStateError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        snapshot::checkpoint::create_private_dir(dir)?;
        let file = MemoryFile::create(&snapshot::checkpoint::memory_path(dir), 1, MEMORY)?;
        // Page by page, as the VMM writes dirty pages.
        let memory = self.memory();
        for (i, page) in memory.chunks(16 << 10).enumerate() {
            file.write_at(page, i as u64 * (16 << 10))?;
        }
        file.sync()?;
        Ok(())
    }

    fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        let file = MemoryFile::open(&snapshot::checkpoint::memory_path(dir), 1, MEMORY)?;
        let mut memory = vec![0u8; MEMORY as usize];
        file.read_at(&mut memory, 0)?;
        *self.memory.lock().unwrap() = memory;
        Ok(())
    }

    fn save_stream(&self, out: &mut dyn Write) -> Result<u64, VmStateError> {
        out.write_all(&self.memory())?;
        Ok(MEMORY)
    }

    fn load_stream(&self, input: &mut dyn Read) -> Result<(), VmStateError> {
        let mut memory = Vec::new();
        input.read_to_end(&mut memory)?;
        if memory.len() as u64 != MEMORY {
            return Err(format!("VM state of {} bytes", memory.len()).into());
        }
        *self.memory.lock().unwrap() = memory;
        Ok(())
    }
}

/// A tree over one disk, with snapshots made before the operation under test.
struct TreeWorld {
    dir: PathBuf,
    meta: PathBuf,
    disk: Arc<LiveDisk>,
    vm: Arc<BufferVm>,
    tree: SnapshotTree,
    model: Data,
    /// Each snapshot's disk and memory (`None`: disk-only).
    expected: BTreeMap<String, (Data, Option<Vec<u8>>)>,
}

impl TreeWorld {
    fn new(dir: &Path) -> TreeWorld {
        let path = dir.join("vda.qcow2");
        new_image(&path, None);
        let disk = open_disk("vda", &path);
        let vm = BufferVm::new(0xa0);
        let meta = dir.join("snapshots.json");
        let tree = SnapshotTree::open(
            &meta,
            vec![disk.clone()],
            Some(vm.clone() as Arc<dyn VmState>),
        )
        .expect("open tree");
        let mut world = TreeWorld {
            dir: dir.to_path_buf(),
            meta,
            disk,
            vm,
            tree,
            model: vec![0u8; SIZE as usize],
            expected: BTreeMap::new(),
        };
        world.write(0x11, &[0, 1, 2, 3]);
        world
    }

    fn write(&mut self, value: u8, clusters: &[u64]) {
        write_flush(&self.disk, &mut self.model, value, clusters);
        *self.vm.memory.lock().unwrap() = vec![value; MEMORY as usize];
    }

    fn take(&mut self, name: &str, options: &TakeOptions) {
        self.tree.create(name, options).expect("create snapshot");
        self.record(name, options);
    }

    fn record(&mut self, name: &str, options: &TakeOptions) {
        let memory = (!options.disk_only).then(|| self.vm.memory());
        self.expected
            .insert(name.to_string(), (self.model.clone(), memory));
    }

    /// The images the tree's snapshots froze: every image but the disk's top.
    fn frozen(&self) -> Frozen {
        let top = self.disk.top().path().to_path_buf();
        let images: Vec<PathBuf> = self
            .tree
            .images()
            .into_iter()
            .filter(|p| *p != top && p.is_file())
            .collect();
        Frozen::of(&images)
    }

    /// After the operation: the live disk reads `model`; data written and flushed now
    /// survives; the tree reopens on the tops it records and lists `names`; every snapshot
    /// reverts to its disk and memory; every image is consistent.
    fn verify(mut self, what: &str, names: &[&str]) {
        assert_data(what, &read_disk(&self.disk), &self.model);
        let mut listed: Vec<String> = self.tree.list().into_iter().map(|s| s.name).collect();
        listed.sort();
        assert_eq!(listed, names, "{what}: the tree lists other snapshots");
        let disk = self.disk.clone();
        write_after(&disk, &mut self.model, 0x77);
        let TreeWorld {
            dir,
            meta,
            disk,
            vm,
            tree,
            model,
            expected,
        } = self;
        drop(tree);
        let top = disk.top().path().to_path_buf();
        drop(disk);

        let resume = SnapshotTree::resume_tops(&meta).expect("resume tops");
        let top = resume.first().cloned().unwrap_or(top);
        let disk = open_disk("vda", &top);
        assert_data(&format!("{what}, reopened"), &read_disk(&disk), &model);
        let tree = SnapshotTree::open(&meta, vec![disk.clone()], Some(vm.clone() as _))
            .unwrap_or_else(|e| panic!("{what}: the tree does not reopen: {e}"));
        // An operation whose intent reached the file and that then failed is resolved
        // (rolled back) by this open: that is the one problem it may report.
        assert!(
            tree.problems().iter().all(|p| p.contains("interrupted")),
            "{what}: problems {:?}",
            tree.problems()
        );
        let mut listed: Vec<String> = tree.list().into_iter().map(|s| s.name).collect();
        listed.sort();
        assert_eq!(
            listed, names,
            "{what}: the reopened tree lists other snapshots"
        );
        for name in names {
            let (data, memory) = &expected[*name];
            tree.revert(name)
                .unwrap_or_else(|e| panic!("{what}: revert to {name}: {e}"));
            assert_data(&format!("{what}, {name}"), &read_disk(&disk), data);
            if let Some(memory) = memory {
                assert!(vm.memory() == *memory, "{what}: {name}'s memory differs");
            }
        }
        drop(tree);
        drop(disk);
        assert_images_consistent(what, &dir);
    }
}

/// Creating snapshot "s2" of `options` on a tree that holds "s1" (with memory).
fn tree_create_matrix(name: &str, options: TakeOptions) {
    matrix(name, |dir, k, error| {
        let mut world = TreeWorld::new(dir);
        world.take("s1", &TakeOptions::with_memory());
        world.write(0x22, &[2, 40]);
        let frozen = world.frozen();
        let (result, count, fired) = armed(dir, k, error, || world.tree.create("s2", &options));
        let what = format!("{name}, step {k} ({error:?})");
        frozen.assert_unchanged(&what);
        match result {
            // Past the switch the snapshot exists, whatever failed after.
            Ok(_) | Err(snapshot::Error::AfterSwitch { .. }) => {
                world.record("s2", &options);
                world.verify(&what, &["s1", "s2"]);
            }
            Err(e) => {
                assert!(fired, "{what}: unarmed run failed: {e}");
                world.verify(&format!("{what}: {e}"), &["s1"]);
            }
        }
        count
    });
}

#[test]
fn tree_create_external_disk_only_survives_every_failure() {
    if !have_qemu("tree_create_external_disk_only_survives_every_failure") {
        return;
    }
    tree_create_matrix("tree create disk-only", TakeOptions::disk_only());
}

#[test]
fn tree_create_external_with_memory_survives_every_failure() {
    if !have_qemu("tree_create_external_with_memory_survives_every_failure") {
        return;
    }
    tree_create_matrix("tree create with memory", TakeOptions::with_memory());
}

#[test]
fn tree_create_internal_survives_every_failure() {
    if !have_qemu("tree_create_internal_survives_every_failure") {
        return;
    }
    tree_create_matrix("tree create internal", TakeOptions::internal(true));
}

/// Reverting to "s1" (of `kind`) after writes since.
fn tree_revert_matrix(name: &str, kind: TakeOptions) {
    matrix(name, |dir, k, error| {
        let mut world = TreeWorld::new(dir);
        world.take("s1", &kind);
        world.write(0x22, &[2, 40]);
        let frozen = world.frozen();
        let (result, count, fired) = armed(dir, k, error, || world.tree.revert("s1"));
        let what = format!("{name}, step {k} ({error:?})");
        frozen.assert_unchanged(&what);
        match result {
            // Past the switch the revert happened, whatever failed after.
            Ok(_) | Err(snapshot::Error::AfterSwitch { .. }) => {
                let (data, memory) = world.expected["s1"].clone();
                world.model = data;
                if let Some(memory) = memory {
                    assert!(world.vm.memory() == memory, "{what}: memory not reverted");
                }
                world.verify(&what, &["s1"]);
            }
            Err(e) => {
                assert!(fired, "{what}: unarmed run failed: {e}");
                world.verify(&format!("{what}: {e}"), &["s1"]);
            }
        }
        count
    });
}

#[test]
fn tree_revert_external_survives_every_failure() {
    if !have_qemu("tree_revert_external_survives_every_failure") {
        return;
    }
    tree_revert_matrix("tree revert with memory", TakeOptions::with_memory());
}

#[test]
fn tree_revert_internal_survives_every_failure() {
    if !have_qemu("tree_revert_internal_survives_every_failure") {
        return;
    }
    tree_revert_matrix("tree revert internal", TakeOptions::internal(true));
}

/// Deleting "s1" (of `kind`) under "s2" (disk-only).
fn tree_delete_matrix(name: &str, kind: TakeOptions) {
    matrix(name, |dir, k, error| {
        let mut world = TreeWorld::new(dir);
        world.take("s1", &kind);
        world.write(0x22, &[2, 40]);
        world.take("s2", &TakeOptions::disk_only());
        world.write(0x33, &[3, 41]);
        // s1's images may be merged away: what s2 holds is checked by reverting to it.
        let (result, count, fired) = armed(dir, k, error, || {
            world.tree.delete("s1", &DeleteOptions::default())
        });
        let what = format!("{name}, step {k} ({error:?})");
        match result {
            Ok(_) => world.verify(&what, &["s2"]),
            Err(e) => {
                assert!(fired, "{what}: unarmed run failed: {e}");
                world.verify(&format!("{what}: {e}"), &["s1", "s2"]);
            }
        }
        count
    });
}

#[test]
fn tree_delete_external_survives_every_failure() {
    if !have_qemu("tree_delete_external_survives_every_failure") {
        return;
    }
    tree_delete_matrix("tree delete with memory", TakeOptions::with_memory());
}

#[test]
fn tree_delete_internal_survives_every_failure() {
    if !have_qemu("tree_delete_internal_survives_every_failure") {
        return;
    }
    tree_delete_matrix("tree delete internal", TakeOptions::internal(false));
}

/// The guest memory a VM has now.
fn vm_memory(vm: &vmm::Vmm) -> Vec<u8> {
    use vmm::vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let memory = vm.memory();
    let mut bytes = Vec::new();
    for region in memory.iter() {
        let mut chunk = vec![0u8; region.len() as usize];
        memory
            .read_slice(&mut chunk, region.start_addr())
            .expect("read guest memory");
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

/// The guest memory the checkpoint chain ending in `dir` holds, merged into `out`.
fn chain_memory(dir: &Path, out: &Path) -> Vec<u8> {
    use snapshot::checkpoint::{memory_path, state_file, state_path};
    snapshot::checkpoint::merge::merge_chain(dir, out).expect("merge the chain");
    let manifest = state_file::read(&state_path(out)).expect("merged state");
    let total = manifest.memory.total_bytes();
    let file = MemoryFile::open(&memory_path(out), manifest.id, total).expect("merged memory");
    let mut bytes = vec![0u8; total as usize];
    file.read_at(&mut bytes, 0).expect("read merged memory");
    bytes
}

/// The VMM's checkpoint saves (full, incremental, live, live incremental) of one paused
/// micro-guest, failed at every step: a failed save leaves nothing under its name (the
/// rename is its commit point), a successful one verifies, and the next incremental save
/// still holds everything (a failed save must not have consumed the dirty log or moved
/// the diff base).
#[test]
fn checkpoint_saves_survive_every_failure() {
    if !test_support::require::have_kvm("checkpoint_saves_survive_every_failure") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let mut config = vmm::config::VmConfig::new(vmm::config::BootSource::MicroGuest {
        workload: vmm::config::Workload::Counter,
        seed: 1,
    });
    config.memory_mib = 16;
    let vm = vmm::Vmm::start_with_serial(&config, Box::new(std::io::sink())).expect("start VM");
    std::thread::sleep(Duration::from_millis(200));
    // Paused for good: its memory is the same in every trial.
    vm.pause_gate()
        .pause(Duration::from_secs(5))
        .expect("pause the VM");
    let memory = vm_memory(&vm);
    let checkpointer = vm.checkpointer();
    checkpointer
        .checkpoint(&root.join("base"), vmm::CheckpointOptions::default())
        .expect("base checkpoint");
    let incremental = vmm::CheckpointOptions {
        incremental: true,
        ..Default::default()
    };
    for (label, live, inc) in [
        ("full", false, false),
        ("incremental", false, true),
        ("live", true, false),
        ("live-incremental", true, true),
    ] {
        let options = vmm::CheckpointOptions {
            live,
            incremental: inc,
            replace: false,
        };
        let (saved, steps, _) = armed(root, 0, Fault::Eio, || {
            checkpointer.checkpoint(&root.join(format!("{label}-clean")), options)
        });
        saved.unwrap_or_else(|e| panic!("{label}: clean save: {e}"));
        let trials = plan(steps);
        eprintln!(
            "checkpoint {label}: {steps} failure points, {} trials",
            trials.len()
        );
        for (k, error) in trials {
            let what = format!("checkpoint {label}, step {k} ({error:?})");
            let target = root.join(format!("{label}-{k}-{error:?}"));
            let (saved, _, fired) =
                armed(root, k, error, || checkpointer.checkpoint(&target, options));
            match saved {
                Ok(_) => {
                    snapshot::checkpoint::verify_chain(&target)
                        .unwrap_or_else(|e| panic!("{what}: saved but does not verify: {e}"));
                }
                Err(e) => {
                    assert!(fired, "{what}: unarmed save failed: {e}");
                    assert!(
                        !target.exists(),
                        "{what}: the failed save ({e}) left {}",
                        target.display()
                    );
                }
            }
            let next = root.join(format!("{label}-{k}-{error:?}-next"));
            checkpointer
                .checkpoint(&next, incremental)
                .unwrap_or_else(|e| panic!("{what}: the next save: {e}"));
            let merged = root.join(format!("{label}-{k}-{error:?}-merged"));
            assert!(
                chain_memory(&next, &merged) == memory,
                "{what}: the next incremental checkpoint's chain lost memory"
            );
            std::fs::remove_dir_all(&merged).expect("remove merged");
        }
    }
    vm.stop().expect("stop the VM");
}
