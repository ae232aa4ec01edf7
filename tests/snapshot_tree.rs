//! The snapshot tree against a model: seeded random sequences of snapshot creation (external
//! disk-only, external with memory, internal with and without memory), reverts, deletes
//! (with and without children), VM pauses and guest writes from writer threads on two live
//! qcow2 disks, with a fake VM whose "memory" is a byte buffer.
//!
//! After each sequence: every snapshot, reverted to in turn, shows exactly its disks and
//! memory (live reads, and offline reads of the frozen images by snapvmm and by qemu-img);
//! `qemu-img check` is clean on every image; every image file in the directory is used by a
//! snapshot or a disk; the metadata reloads to the same tree.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapshot::tree::{DeleteOptions, RunState, SnapshotKind, SnapshotTree, TakeOptions};
use snapshot::vm_state::{VmState, VmStateError};
use std::sync::Mutex;
use storage::qcow2::{create, CreateOptions};
use storage::{BlockDevice, LiveDisk, OpenOptions};
use test_support::image::{open_ro, read_all};
use test_support::pattern::assert_same;
use test_support::qemu::{assert_check_clean, qemu_img, qemu_read_all};
use test_support::require::have_qemu;

const SIZE: u64 = 2 << 20;
const BLOCK: u64 = 4096;
const MEMORY: usize = 32 << 10;

/// A VM whose whole state is `memory`; it checks the tree calls it in the documented order.
struct FakeVm {
    memory: Mutex<Vec<u8>>,
    paused: AtomicBool,
    /// The next call of this name fails.
    fail: Mutex<Option<&'static str>>,
}

impl FakeVm {
    fn injected(&self, call: &'static str) -> Result<(), VmStateError> {
        let mut fail = self.fail.lock().unwrap();
        if *fail == Some(call) {
            *fail = None;
            return Err(format!("injected failure of {call}").into());
        }
        Ok(())
    }

    fn require_paused(&self, what: &str) -> Result<(), VmStateError> {
        if self.paused.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!("{what} called while the vCPUs run").into())
        }
    }
}

impl VmState for FakeVm {
    fn pause_vcpus(&self) -> Result<bool, VmStateError> {
        Ok(!self.paused.swap(true, Ordering::SeqCst))
    }

    fn resume_vcpus(&self) -> Result<(), VmStateError> {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Err("resume of a running VM".into());
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        self.require_paused("save_checkpoint")?;
        self.injected("save_checkpoint")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("memory"), &*self.memory.lock().unwrap())?;
        Ok(())
    }

    fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        self.require_paused("load_checkpoint")?;
        self.injected("load_checkpoint")?;
        let memory = std::fs::read(dir.join("memory"))?;
        if memory.len() != MEMORY {
            return Err(format!("memory file of {} bytes", memory.len()).into());
        }
        *self.memory.lock().unwrap() = memory;
        Ok(())
    }

    fn save_stream(&self, out: &mut dyn Write) -> Result<u64, VmStateError> {
        self.require_paused("save_stream")?;
        self.injected("save_stream")?;
        let memory = self.memory.lock().unwrap();
        out.write_all(&memory)?;
        Ok(memory.len() as u64)
    }

    fn load_stream(&self, input: &mut dyn Read) -> Result<(), VmStateError> {
        self.require_paused("load_stream")?;
        self.injected("load_stream")?;
        let mut memory = Vec::new();
        input.read_to_end(&mut memory)?;
        if memory.len() != MEMORY {
            return Err(format!("VM state of {} bytes", memory.len()).into());
        }
        *self.memory.lock().unwrap() = memory;
        Ok(())
    }
}

/// What a snapshot must hold.
#[derive(Clone)]
struct Expected {
    disks: Vec<Vec<u8>>,
    memory: Option<Vec<u8>>,
    parent: Option<String>,
    kind: SnapshotKind,
    state: RunState,
}

struct World {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disks: Vec<Arc<LiveDisk>>,
    vm: Arc<FakeVm>,
    tree: SnapshotTree,
    /// What the disks hold now.
    data: Vec<Vec<u8>>,
    snapshots: BTreeMap<String, Expected>,
    current: Option<String>,
}

fn fill(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

impl World {
    fn new(seed: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = Vec::new();
        for name in ["vda", "vdb"] {
            let path = dir.path().join(format!("{name}.qcow2"));
            create(
                &path,
                &CreateOptions {
                    size: Some(SIZE),
                    cluster_size: 16 << 10,
                    ..Default::default()
                },
            )
            .unwrap();
            disks.push(LiveDisk::new(
                name,
                storage::open(&path, &OpenOptions::default()).unwrap(),
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let vm = Arc::new(FakeVm {
            memory: Mutex::new(fill(&mut rng, MEMORY)),
            paused: AtomicBool::new(false),
            fail: Mutex::new(None),
        });
        let tree = SnapshotTree::open(
            dir.path().join("snapshots.json"),
            disks.clone(),
            Some(vm.clone() as Arc<dyn VmState>),
        )
        .unwrap();
        World {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            disks,
            vm,
            tree,
            data: vec![vec![0u8; SIZE as usize]; 2],
            snapshots: BTreeMap::new(),
            current: None,
        }
    }

    /// Each disk gets a burst of block writes from its own thread, at the same time.
    fn write(&mut self, rng: &mut StdRng) {
        let plans: Vec<Vec<(u64, Vec<u8>)>> = (0..self.disks.len())
            .map(|_| {
                (0..rng.random_range(1..12))
                    .map(|_| {
                        let block = rng.random_range(0..SIZE / BLOCK);
                        let blocks = rng.random_range(1..4).min(SIZE / BLOCK - block);
                        (block * BLOCK, fill(rng, (blocks * BLOCK) as usize))
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|scope| {
            for (disk, plan) in self.disks.iter().zip(&plans) {
                scope.spawn(move || {
                    for (offset, data) in plan {
                        disk.write_at(data, *offset).unwrap();
                    }
                });
            }
        });
        for (model, plan) in self.data.iter_mut().zip(&plans) {
            for (offset, data) in plan {
                model[*offset as usize..][..data.len()].copy_from_slice(data);
            }
        }
    }

    fn create(&mut self, name: &str, rng: &mut StdRng) {
        let (options, kind) = match rng.random_range(0..4) {
            0 => (TakeOptions::disk_only(), SnapshotKind::ExternalDiskOnly),
            1 => (TakeOptions::with_memory(), SnapshotKind::ExternalWithMemory),
            2 => (TakeOptions::internal(true), SnapshotKind::Internal),
            _ => (TakeOptions::internal(false), SnapshotKind::Internal),
        };
        self.create_with(name, options, kind);
    }

    fn create_with(&mut self, name: &str, options: TakeOptions, kind: SnapshotKind) {
        let info = self.tree.create(name, &options).unwrap();
        assert_eq!(info.kind, kind);
        assert_eq!(info.parent, self.current);
        let state = if self.vm.paused.load(Ordering::SeqCst) {
            RunState::Paused
        } else {
            RunState::Running
        };
        if !options.disk_only {
            assert_eq!(info.state, state, "{name}: state at creation");
        }
        self.snapshots.insert(
            name.to_string(),
            Expected {
                disks: self.data.clone(),
                memory: (!options.disk_only).then(|| self.vm.memory.lock().unwrap().clone()),
                parent: self.current.clone(),
                kind,
                state,
            },
        );
        self.current = Some(name.to_string());
    }

    fn revert(&mut self, name: &str) {
        let paused_before = self.vm.paused.load(Ordering::SeqCst);
        self.tree
            .revert(name)
            .unwrap_or_else(|e| panic!("revert {name}: {e}"));
        let expected = &self.snapshots[name];
        self.data = expected.disks.clone();
        let paused_after = self.vm.paused.load(Ordering::SeqCst);
        match &expected.memory {
            Some(memory) => {
                assert!(*self.vm.memory.lock().unwrap() == *memory, "{name}: memory");
                assert_eq!(paused_after, expected.state == RunState::Paused);
            }
            None => assert_eq!(paused_after, paused_before),
        }
        self.current = Some(name.to_string());
        self.check_live(name);
    }

    fn delete(&mut self, name: &str, children: bool) {
        let deleted = self
            .tree
            .delete(
                name,
                &DeleteOptions {
                    children,
                    metadata_only: false,
                },
            )
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
        let mut gone = vec![name.to_string()];
        if children {
            let mut i = 0;
            while i < gone.len() {
                let parent = gone[i].clone();
                gone.extend(
                    self.snapshots
                        .iter()
                        .filter(|(_, e)| e.parent.as_deref() == Some(&parent))
                        .map(|(n, _)| n.clone()),
                );
                i += 1;
            }
        }
        assert_eq!(
            deleted.iter().collect::<BTreeSet<_>>(),
            gone.iter().collect::<BTreeSet<_>>()
        );
        for victim in &gone {
            let removed = self.snapshots.remove(victim).unwrap();
            for e in self.snapshots.values_mut() {
                if e.parent.as_deref() == Some(victim) {
                    e.parent = removed.parent.clone();
                }
            }
            if self.current.as_deref() == Some(victim) {
                self.current = removed.parent.clone();
            }
        }
        // Deleting never changes what the disks show.
        self.check_live(&format!("after deleting {name}"));
    }

    fn check_live(&self, what: &str) {
        for (disk, expected) in self.disks.iter().zip(&self.data) {
            let actual = read_all(&*disk.top());
            assert_same(&actual, expected, &format!("{what}: disk {}", disk.name()));
        }
    }

    fn check_tree(&self) {
        let listed = self.tree.list();
        let names: BTreeSet<String> = listed.iter().map(|s| s.name.clone()).collect();
        assert_eq!(
            names,
            self.snapshots.keys().cloned().collect::<BTreeSet<_>>()
        );
        for s in &listed {
            let e = &self.snapshots[&s.name];
            assert_eq!(s.parent, e.parent, "{}: parent", s.name);
            assert_eq!(s.kind, e.kind, "{}: kind", s.name);
        }
        assert_eq!(self.tree.current().map(|s| s.name), self.current);
    }

    /// The images the tree created (the disks' original files are the user's and stay),
    /// and the checkpoint directories.
    fn files(&self) -> (BTreeSet<PathBuf>, BTreeSet<PathBuf>) {
        let originals = ["vda.qcow2", "vdb.qcow2"].map(|n| self.dir.join(n));
        let mut images = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "qcow2") && !originals.contains(&path) {
                images.insert(abs(&path));
            }
        }
        let mut checkpoints = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("snapshots.checkpoints")) {
            for entry in entries {
                checkpoints.insert(entry.unwrap().path());
            }
        }
        (images, checkpoints)
    }

    /// The files snapshots and disks use: their images and every backing file below them.
    fn used(&self) -> BTreeSet<PathBuf> {
        let originals = ["vda.qcow2", "vdb.qcow2"].map(|n| abs(&self.dir.join(n)));
        let mut roots: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|d| d.top().path().to_path_buf())
            .collect();
        for s in self.tree.list() {
            roots.extend(s.disks.iter().map(|d| d.image.clone()));
        }
        let mut used = BTreeSet::new();
        for root in roots {
            for layer in snapshot::chain::layers(&open_ro(&root)) {
                let path = abs(layer.path());
                if !originals.contains(&path) {
                    used.insert(path);
                }
            }
        }
        used
    }

    /// Flushes the live disks twice: a flush writes back what COW mappings freed, the next
    /// one the refcounts those frees changed (as `close` does), so the open images are
    /// leak-free for `qemu-img check`.
    fn flush_disks(&self) {
        for d in &self.disks {
            d.flush().unwrap();
            d.flush().unwrap();
        }
    }

    fn final_check(&mut self) {
        self.check_tree();
        self.flush_disks();
        let (images, checkpoints) = self.files();
        let used = self.used();
        assert_eq!(images, used, "image files on disk vs. files in use");
        let expected_checkpoints: BTreeSet<PathBuf> = self
            .tree
            .list()
            .into_iter()
            .filter_map(|s| s.checkpoint)
            .collect();
        assert_eq!(checkpoints, expected_checkpoints, "checkpoint directories");
        // Offline reads of every external snapshot's frozen images, by us and by qemu-img.
        for s in self.tree.list() {
            if s.kind == SnapshotKind::Internal {
                continue;
            }
            for (d, expected) in s.disks.iter().zip(&self.snapshots[&s.name].disks) {
                let what = format!("{} offline, {}", s.name, d.disk);
                assert_same(&read_all(&*open_ro(&d.image)), expected, &what);
                assert_same(&qemu_read_all(&d.image), expected, &what);
            }
        }
        for image in images
            .iter()
            .chain(&["vda.qcow2", "vdb.qcow2"].map(|n| self.dir.join(n)))
        {
            assert_check_clean(image);
        }
        // Reopening the metadata gives the same tree.
        let reopened = SnapshotTree::open(
            self.dir.join("snapshots.json"),
            self.disks.clone(),
            Some(self.vm.clone() as Arc<dyn VmState>),
        )
        .unwrap();
        assert!(reopened.problems().is_empty(), "{:?}", reopened.problems());
        assert_eq!(reopened.list(), self.tree.list());
        drop(reopened);
        // Every snapshot, reverted to in turn, shows exactly its data.
        let names: Vec<String> = self.snapshots.keys().cloned().collect();
        for name in &names {
            self.revert(name);
        }
        for name in names.iter().rev() {
            self.revert(name);
        }
        self.flush_disks();
        let (images, _) = self.files();
        assert_eq!(images, self.used(), "after the reverts");
        for image in images
            .iter()
            .chain(&["vda.qcow2", "vdb.qcow2"].map(|n| self.dir.join(n)))
        {
            assert_check_clean(image);
        }
    }
}

fn abs(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap()
}

fn verbose(what: &str) {
    if std::env::var_os("SNAPVMM_TREE_VERBOSE").is_some() {
        eprintln!("{what}");
    }
}

/// Runs `steps` random operations; without `internal`, only external snapshots are taken,
/// so deletes merge images far more often (internal snapshots pin their images).
fn run_sequence(seed: u64, steps: usize, internal: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut world = World::new(seed);
    let mut next = 0;
    for _ in 0..steps {
        let names: Vec<String> = world.snapshots.keys().cloned().collect();
        if std::env::var_os("SNAPVMM_TREE_VERBOSE").is_some() {
            let images: Vec<String> = world
                .tree
                .images()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            eprintln!("current {:?} images {images:?}", world.current);
        }
        match rng.random_range(0..100) {
            0..35 => world.write(&mut rng),
            35..42 => *world.vm.memory.lock().unwrap() = fill(&mut rng, MEMORY),
            42..46 => {
                if world.vm.paused.load(Ordering::SeqCst) {
                    world.vm.resume_vcpus().unwrap();
                } else {
                    world.vm.pause_vcpus().unwrap();
                }
            }
            46..72 => {
                next += 1;
                verbose(&format!("create s{next}"));
                if internal {
                    world.create(&format!("s{next}"), &mut rng);
                } else if rng.random_bool(0.5) {
                    world.create_with(
                        &format!("s{next}"),
                        TakeOptions::disk_only(),
                        SnapshotKind::ExternalDiskOnly,
                    );
                } else {
                    world.create_with(
                        &format!("s{next}"),
                        TakeOptions::with_memory(),
                        SnapshotKind::ExternalWithMemory,
                    );
                }
            }
            72..86 if !names.is_empty() => {
                let name = &names[rng.random_range(0..names.len())];
                verbose(&format!("revert {name}"));
                world.revert(name);
            }
            86..100 if !names.is_empty() => {
                let name = &names[rng.random_range(0..names.len())];
                let children = rng.random_bool(0.2);
                verbose(&format!("delete {name} children={children}"));
                world.delete(name, children);
            }
            _ => world.write(&mut rng),
        }
        world.check_tree();
    }
    world.final_check();
}

#[test]
fn random_sequences_match_the_model() {
    if !have_qemu("random_sequences_match_the_model") {
        return;
    }
    let seeds: u64 = std::env::var("SNAPVMM_TREE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let only: Option<u64> = std::env::var("SNAPVMM_TREE_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
        eprintln!("seed {seed}");
        run_sequence(seed, 40, seed % 2 == 0);
    }
}

#[test]
fn internal_snapshots_show_a_vm_size_in_qemu_img() {
    if !have_qemu("internal_snapshots_show_a_vm_size_in_qemu_img") {
        return;
    }
    let mut world = World::new(99);
    let mut rng = StdRng::seed_from_u64(99);
    world.write(&mut rng);
    world
        .tree
        .create("mem", &TakeOptions::internal(true))
        .unwrap();
    for d in &world.disks {
        d.flush().unwrap();
    }
    let listing = qemu_img(&[
        "snapshot",
        "-l",
        "-U",
        world.dir.join("vda.qcow2").to_str().unwrap(),
    ]);
    let line = listing
        .lines()
        .find(|l| l.contains("mem"))
        .unwrap_or_else(|| panic!("no snapshot line in {listing}"));
    assert!(line.contains("32 KiB"), "VM SIZE column: {line}");
}

#[test]
fn missing_images_are_reported_on_open() {
    let mut world = World::new(5);
    let mut rng = StdRng::seed_from_u64(5);
    world.write(&mut rng);
    world.tree.create("a", &TakeOptions::disk_only()).unwrap();
    world.write(&mut rng);
    world.tree.create("b", &TakeOptions::with_memory()).unwrap();
    let frozen = world.tree.get("b").unwrap().disks[1].image.clone();
    let checkpoint = world.tree.get("b").unwrap().checkpoint.unwrap();
    std::fs::remove_dir_all(&checkpoint).unwrap();
    std::fs::rename(&frozen, world.dir.join("moved")).unwrap();
    let reopened =
        SnapshotTree::open(world.dir.join("snapshots.json"), world.disks.clone(), None).unwrap();
    let problems = reopened.problems().join("\n");
    assert!(
        problems.contains(&format!("{} is missing", frozen.display())),
        "{problems}"
    );
    assert!(problems.contains("checkpoint"), "{problems}");
    // Disk-only operations work without a VM; memory needs one.
    assert!(reopened
        .create("c", &TakeOptions::with_memory())
        .unwrap_err()
        .to_string()
        .contains("disk-only"));
    // Nor can it revert to memory it cannot load.
    assert!(reopened
        .revert("b")
        .unwrap_err()
        .to_string()
        .contains("memory"));
    // Names are checked.
    assert!(reopened.create("a/b", &TakeOptions::disk_only()).is_err());
    assert!(matches!(
        reopened.create("a", &TakeOptions::disk_only()),
        Err(snapshot::Error::SnapshotExists { .. })
    ));
    assert!(matches!(
        reopened.revert("zzz"),
        Err(snapshot::Error::NoSnapshot { .. })
    ));
}

#[test]
fn metadata_only_delete_keeps_the_files() {
    let mut world = World::new(7);
    let mut rng = StdRng::seed_from_u64(7);
    world.write(&mut rng);
    world.tree.create("a", &TakeOptions::with_memory()).unwrap();
    let info = world.tree.get("a").unwrap();
    world
        .tree
        .delete(
            "a",
            &DeleteOptions {
                children: false,
                metadata_only: true,
            },
        )
        .unwrap();
    assert!(world.tree.list().is_empty());
    assert!(world.tree.current().is_none());
    for d in &info.disks {
        assert!(d.image.exists());
    }
    assert!(info.checkpoint.unwrap().is_dir());
    world.check_live("after a metadata-only delete");
}

#[test]
fn reverts_and_deletes_under_a_running_writer() {
    // A writer thread keeps writing while snapshots are taken, reverted to and deleted:
    // no request may fail, whatever chain the disk is on at the time.
    let world = World::new(11);
    let stop = Arc::new(AtomicBool::new(false));
    let disk = world.disks[0].clone();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let offset = (n * 7919 % (SIZE / BLOCK)) * BLOCK;
                disk.write_at(&[n as u8; BLOCK as usize], offset).unwrap();
                let mut back = [0u8; 512];
                disk.read_at(&mut back, offset).unwrap();
                n += 1;
            }
            n
        })
    };
    for round in 0..6 {
        let name = format!("r{round}");
        let options = match round % 3 {
            0 => TakeOptions::disk_only(),
            1 => TakeOptions::with_memory(),
            _ => TakeOptions::internal(true),
        };
        world.tree.create(&name, &options).unwrap();
        if round > 0 {
            world.tree.revert(&format!("r{}", round - 1)).unwrap();
            world
                .tree
                .delete(&format!("r{}", round - 1), &DeleteOptions::default())
                .unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
}

/// Opens an image alone, read-only (for the unused-import lint when qemu is absent).
#[allow(dead_code)]
fn open_alone(path: &Path) -> Arc<dyn BlockDevice> {
    storage::open(
        path,
        &OpenOptions {
            read_only: true,
            open_backing: false,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn deletes_merge_by_stream_commit_and_rebase() {
    if !have_qemu("deletes_merge_by_stream_commit_and_rebase") {
        return;
    }
    let mut world = World::new(21);
    let mut rng = StdRng::seed_from_u64(21);
    let external = |w: &mut World, name: &str, rng: &mut StdRng| {
        w.write(rng);
        w.create_with(
            name,
            TakeOptions::disk_only(),
            SnapshotKind::ExternalDiskOnly,
        );
    };
    let gone = |w: &World, file: &str| !w.dir.join(file).exists();
    // Stream: the image a deleted snapshot froze is pulled into the active image above it.
    external(&mut world, "a", &mut rng);
    external(&mut world, "b", &mut rng);
    world.write(&mut rng);
    world.delete("b", false);
    assert!(
        gone(&world, "vda.a.qcow2"),
        "streamed into the active image"
    );
    // Commit: an intermediate image is committed into the one below it, which takes its
    // place as snapshot d's image.
    external(&mut world, "c", &mut rng);
    external(&mut world, "d", &mut rng);
    external(&mut world, "e", &mut rng);
    world.write(&mut rng);
    world.delete("d", false);
    let e = world.tree.get("e").unwrap();
    assert!(e.disks[0].image.ends_with("vda.a.b.c.qcow2"), "{e:?}");
    assert!(gone(&world, "vda.a.b.c.d.qcow2"));
    // Rebase: off the disks' chains, the image above is rebased onto the one below.
    external(&mut world, "f", &mut rng);
    world.revert("c");
    world.write(&mut rng);
    world.delete("e", false);
    assert!(gone(&world, "vda.a.b.c.qcow2"), "rebased away");
    let f = world.tree.get("f").unwrap();
    assert!(f.disks[0].image.ends_with("vda.a.b.c.d.e.qcow2"), "{f:?}");
    world.final_check();
}

#[test]
fn failures_of_the_vm_side_roll_back() {
    let mut world = World::new(31);
    let mut rng = StdRng::seed_from_u64(31);
    world.write(&mut rng);
    world.create_with(
        "m",
        TakeOptions::with_memory(),
        SnapshotKind::ExternalWithMemory,
    );
    world.write(&mut rng);
    let files = |w: &World| -> BTreeSet<PathBuf> {
        std::fs::read_dir(&w.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect()
    };
    let before = files(&world);
    let tops: Vec<PathBuf> = world
        .disks
        .iter()
        .map(|d| d.top().path().to_path_buf())
        .collect();

    // A checkpoint that cannot be written: no snapshot, no file, the VM runs again.
    *world.vm.fail.lock().unwrap() = Some("save_checkpoint");
    let error = world
        .tree
        .create("bad", &TakeOptions::with_memory())
        .unwrap_err();
    assert!(error.to_string().contains("injected"), "{error}");
    // A VM state that cannot be streamed into the image: no internal snapshot anywhere.
    *world.vm.fail.lock().unwrap() = Some("save_stream");
    assert!(world
        .tree
        .create("bad", &TakeOptions::internal(true))
        .is_err());
    for d in &world.disks {
        let top = d.top();
        assert!(top.as_qcow2().unwrap().snapshots().is_empty());
    }
    // A checkpoint that cannot be loaded: the disks go back to where the VM was.
    *world.vm.fail.lock().unwrap() = Some("load_checkpoint");
    assert!(world.tree.revert("m").is_err());
    assert!(!world.vm.paused.load(Ordering::SeqCst), "the VM runs again");
    assert_eq!(
        files(&world),
        before,
        "every file made by the failed steps is gone"
    );
    let now: Vec<PathBuf> = world
        .disks
        .iter()
        .map(|d| d.top().path().to_path_buf())
        .collect();
    assert_eq!(now, tops);
    assert!(!world.dir.join("snapshots.checkpoints/bad").exists());
    assert_eq!(world.tree.list().len(), 1);
    assert_eq!(world.tree.current().unwrap().name, "m");
    world.check_live("after the failures");
    world.revert("m");
    world.final_check();
}

#[test]
fn file_names_stay_short_over_many_snapshots() {
    let mut world = World::new(41);
    let mut rng = StdRng::seed_from_u64(41);
    for _ in 0..60 {
        world.write(&mut rng);
        world.create_with(
            "x",
            TakeOptions::disk_only(),
            SnapshotKind::ExternalDiskOnly,
        );
        world.delete("x", false);
    }
    let long = "n".repeat(snapshot::tree::MAX_NAME);
    world.create_with(
        &long,
        TakeOptions::disk_only(),
        SnapshotKind::ExternalDiskOnly,
    );
    world.write(&mut rng);
    world.revert(&long);
    for d in &world.disks {
        let name = d.top().path().file_name().unwrap().len();
        assert!(name <= 240, "{}", d.top().path().display());
    }
}

/// A VM whose vCPU is a writer thread: it writes blocks to the disks and keeps in its
/// "memory" what it wrote (as a guest's page cache would), and stops between writes when
/// paused. So memory and disks must match at every pause, whatever was reverted.
struct WriterVm {
    disks: Vec<Arc<LiveDisk>>,
    /// (paused, stop); the writer holds the lock while it writes, so a pause waits for the
    /// write in progress.
    state: Mutex<(bool, bool)>,
    wake: std::sync::Condvar,
    /// What the guest believes its disks hold.
    memory: Mutex<Vec<Vec<u8>>>,
}

impl WriterVm {
    fn run(self: Arc<Self>, seed: u64) -> std::thread::JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut writes = 0;
            loop {
                let mut state = self.state.lock().unwrap();
                while state.0 && !state.1 {
                    state = self.wake.wait(state).unwrap();
                }
                if state.1 {
                    return writes;
                }
                let disk = rng.random_range(0..self.disks.len());
                let offset = rng.random_range(0..SIZE / BLOCK) * BLOCK;
                let data = fill(&mut rng, BLOCK as usize);
                self.disks[disk].write_at(&data, offset).unwrap();
                // The guest notes the write a little later: a snapshot that does not stop
                // the vCPUs first would catch the disk ahead of the memory.
                std::thread::sleep(std::time::Duration::from_micros(300));
                self.memory.lock().unwrap()[disk][offset as usize..][..BLOCK as usize]
                    .copy_from_slice(&data);
                writes += 1;
                drop(state);
                std::thread::yield_now();
            }
        })
    }

    fn stop(&self) {
        self.state.lock().unwrap().1 = true;
        self.wake.notify_all();
    }

    fn encode(&self) -> Vec<u8> {
        self.memory.lock().unwrap().concat()
    }

    fn decode(&self, bytes: &[u8]) -> Result<(), VmStateError> {
        if bytes.len() != self.disks.len() * SIZE as usize {
            return Err(format!("memory of {} bytes", bytes.len()).into());
        }
        *self.memory.lock().unwrap() = bytes.chunks(SIZE as usize).map(<[u8]>::to_vec).collect();
        Ok(())
    }

    /// Pauses, checks that every disk holds what memory says, resumes.
    fn check(&self, what: &str) {
        let was_running = self.pause_vcpus().unwrap();
        let memory = self.memory.lock().unwrap().clone();
        for (disk, expected) in self.disks.iter().zip(&memory) {
            let actual = read_all(&*disk.top());
            assert_same(&actual, expected, &format!("{what}: disk {}", disk.name()));
        }
        if was_running {
            self.resume_vcpus().unwrap();
        }
    }
}

impl VmState for WriterVm {
    fn pause_vcpus(&self) -> Result<bool, VmStateError> {
        let mut state = self.state.lock().unwrap();
        let was_running = !state.0;
        state.0 = true;
        Ok(was_running)
    }
    fn resume_vcpus(&self) -> Result<(), VmStateError> {
        self.state.lock().unwrap().0 = false;
        self.wake.notify_all();
        Ok(())
    }
    fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("memory"), self.encode())?;
        Ok(())
    }
    fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        self.decode(&std::fs::read(dir.join("memory"))?)
    }
    fn save_stream(&self, out: &mut dyn Write) -> Result<u64, VmStateError> {
        let bytes = self.encode();
        out.write_all(&bytes)?;
        Ok(bytes.len() as u64)
    }
    fn load_stream(&self, input: &mut dyn Read) -> Result<(), VmStateError> {
        let mut bytes = Vec::new();
        input.read_to_end(&mut bytes)?;
        self.decode(&bytes)
    }
}

#[test]
fn memory_and_disks_match_under_a_running_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut disks = Vec::new();
    for name in ["vda", "vdb"] {
        let path = dir.path().join(format!("{name}.qcow2"));
        create(
            &path,
            &CreateOptions {
                size: Some(SIZE),
                cluster_size: 16 << 10,
                ..Default::default()
            },
        )
        .unwrap();
        disks.push(LiveDisk::new(
            name,
            storage::open(&path, &OpenOptions::default()).unwrap(),
        ));
    }
    let vm = Arc::new(WriterVm {
        disks: disks.clone(),
        state: Mutex::new((false, false)),
        wake: std::sync::Condvar::new(),
        memory: Mutex::new(vec![vec![0u8; SIZE as usize]; 2]),
    });
    let tree = SnapshotTree::open(
        dir.path().join("snapshots.json"),
        disks,
        Some(vm.clone() as Arc<dyn VmState>),
    )
    .unwrap();
    let writer = vm.clone().run(3);
    let mut rng = StdRng::seed_from_u64(3);
    let mut names: Vec<String> = Vec::new();
    for round in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(1..5)));
        match rng.random_range(0..10) {
            0..4 => {
                let name = format!("m{round}");
                let options = if rng.random_bool(0.5) {
                    TakeOptions::with_memory()
                } else {
                    TakeOptions::internal(true)
                };
                tree.create(&name, &options).unwrap();
                names.push(name);
            }
            4..8 if !names.is_empty() => {
                let name = &names[rng.random_range(0..names.len())];
                tree.revert(name).unwrap();
                vm.check(&format!("round {round}, after reverting to {name}"));
            }
            _ if names.len() > 1 => {
                let name = names.remove(rng.random_range(0..names.len()));
                tree.delete(&name, &DeleteOptions::default()).unwrap();
                vm.check(&format!("round {round}, after deleting {name}"));
            }
            _ => vm.check(&format!("round {round}")),
        }
    }
    vm.stop();
    let writes = writer.join().unwrap();
    assert!(writes > 0, "the guest wrote");
    vm.check("at the end");
}

// ---- Issue 13: no way to lose a snapshot ----

/// A fresh qcow2 disk at `dir/NAME.qcow2` holding `fill` in its first block.
fn fresh_disk(dir: &Path, name: &str, fill: u8) -> Arc<LiveDisk> {
    let path = dir.join(format!("{name}.qcow2"));
    create(
        &path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size: 64 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let disk = LiveDisk::new(name, storage::open(&path, &OpenOptions::default()).unwrap());
    disk.write_at(&[fill; BLOCK as usize], 0).unwrap();
    disk
}

fn reopen(path: &Path, read_only: bool) -> Arc<LiveDisk> {
    let dev = storage::open(
        path,
        &OpenOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap();
    LiveDisk::new("vda", dev)
}

fn first_byte(disk: &LiveDisk) -> u8 {
    let mut b = [0u8; 1];
    disk.read_at(&mut b, 0).unwrap();
    b[0]
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Finding 2: the metadata and the tree's checkpoint directories are the owner's only,
/// whatever the umask.
#[test]
fn metadata_and_checkpoints_are_private_whatever_the_umask() {
    let world = World::new(21);
    // SAFETY: umask changes the mode of files created later in this process; the other
    // tests here do not check modes.
    let old = unsafe { libc::umask(0) };
    let created = world.tree.create("m", &TakeOptions::with_memory());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let info = created.unwrap();
    let checkpoint = info.checkpoint.unwrap();
    assert_eq!(mode(&world.dir.join("snapshots.json")), 0o600);
    assert_eq!(mode(checkpoint.parent().unwrap()), 0o700);
    assert_eq!(mode(&checkpoint), 0o700);
}

/// Finding 3: after a disk-only snapshot, the image it froze is refused as a writable disk,
/// naming the current top; read-only, or on the current top, the tree opens.
#[test]
fn an_image_a_snapshot_froze_is_never_opened_writable() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("snapshots.json");
    let disk = fresh_disk(dir.path(), "vda", 1);
    let original = abs(disk.top().path());
    let tree = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
    tree.create("s1", &TakeOptions::disk_only()).unwrap();
    disk.write_at(&[2; BLOCK as usize], 0).unwrap();
    let top = abs(disk.top().path());
    drop(tree);
    drop(disk);

    let writable = reopen(&original, false);
    let error = SnapshotTree::open(&meta, vec![writable.clone()], None).unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, snapshot::Error::Frozen { .. }), "{text}");
    assert!(text.contains(&top.display().to_string()), "{text}");
    assert!(text.contains("s1"), "{text}");
    drop(writable);
    // The snapshot still holds what it froze.
    let read_only = reopen(&original, true);
    assert_eq!(first_byte(&read_only), 1);
    SnapshotTree::open(&meta, vec![read_only], None).unwrap();
    assert_eq!(SnapshotTree::resume_tops(&meta).unwrap(), vec![top.clone()]);
    let on_top = reopen(&top, false);
    assert_eq!(first_byte(&on_top), 2);
    let tree = SnapshotTree::open(&meta, vec![on_top], None).unwrap();
    assert!(tree.problems().is_empty(), "{:?}", tree.problems());
}

/// Finding 12: a chain never gets deeper than storage opens; the 65th live snapshot is
/// refused with a message naming the limit, and reverts and restarts keep working.
#[test]
fn a_snapshot_past_the_chain_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("snapshots.json");
    let disk = fresh_disk(dir.path(), "vda", 0);
    let tree = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
    let limit = snapshot::tree::MAX_CHAIN_LAYERS - 1;
    assert_eq!(limit, 64);
    for i in 0..limit {
        disk.write_at(&[i as u8; BLOCK as usize], 0).unwrap();
        tree.create(&format!("s{i}"), &TakeOptions::disk_only())
            .unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
    }
    let error = tree
        .create("one-too-many", &TakeOptions::disk_only())
        .unwrap_err()
        .to_string();
    assert!(error.contains("65 layers"), "{error}");
    assert!(error.contains("delete"), "{error}");
    // Internal snapshots add no layer.
    tree.create("inside", &TakeOptions::internal(false))
        .unwrap();
    // The deepest chain opens again, as a restart or an img verb would.
    let top = disk.top().path().to_path_buf();
    storage::open(
        &top,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    tree.revert("s0").unwrap();
    assert_eq!(first_byte(&disk), 0);
    tree.revert(&format!("s{}", limit - 1)).unwrap();
    assert_eq!(first_byte(&disk), (limit - 1) as u8);
}

/// Finding 5 with a real full filesystem: the metadata lives on a tiny tmpfs that is full.
/// The snapshot rolls back whole: no overlay, no temporary, the disk on its image; with
/// room again it works. Needs root to mount (skipped otherwise).
#[test]
fn a_full_filesystem_under_the_metadata_rolls_the_snapshot_back() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("meta");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mount)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let meta = mount.join("snapshots.json");
    let disk = fresh_disk(dir.path(), "vda", 7);
    let original = abs(disk.top().path());
    let tree = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
    tree.create("s1", &TakeOptions::disk_only()).unwrap();
    let before = std::fs::read(&meta).unwrap();
    let top = abs(disk.top().path());
    // Fill the filesystem.
    let filler = mount.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);

    let error = tree
        .create("s2", &TakeOptions::disk_only())
        .unwrap_err()
        .to_string();
    assert!(error.contains("No space left"), "{error}");
    assert_eq!(abs(disk.top().path()), top, "the disk switched");
    assert_eq!(std::fs::read(&meta).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(&mount)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "stray files: {names:?}");
    let overlays: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("s2"))
        .collect();
    assert!(overlays.is_empty(), "overlays left: {overlays:?}");
    disk.write_at(&[8; BLOCK as usize], 0).unwrap();

    std::fs::remove_file(&filler).unwrap();
    tree.create("s2", &TakeOptions::disk_only()).unwrap();
    drop(tree);
    let reopened = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
    assert_eq!(reopened.list().len(), 2);
    assert_eq!(reopened.get("s1").unwrap().disks[0].image, original);
    reopened.revert("s2").unwrap();
    assert_eq!(first_byte(&disk), 8);
}

/// Finding 5 at every step of both metadata writes of a snapshot: a failure of the first
/// (the intent, before any file exists) rolls back whole; a failure of the second (after
/// the switch) keeps the overlay, and the metadata file names it so the next open completes
/// the snapshot. Never a temporary left.
#[test]
fn metadata_write_failures_at_every_step_lose_nothing() {
    use snapshot::tree::SaveStep;
    use std::sync::atomic::AtomicUsize;
    let steps = [
        SaveStep::CreateTemporary,
        SaveStep::Write,
        SaveStep::Fsync,
        SaveStep::Rename,
        SaveStep::FsyncDirectory,
    ];
    for (write, step) in [1usize, 2]
        .into_iter()
        .flat_map(|w| steps.iter().map(move |s| (w, *s)))
    {
        let what = format!("metadata write {write}, {step:?}");
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("snapshots.json");
        let disk = fresh_disk(dir.path(), "vda", 1);
        let original = abs(disk.top().path());
        let tree = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tree.set_fault_hook(Arc::new(move |s| {
            if s == SaveStep::CreateTemporary {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            if s == step && counter.load(Ordering::SeqCst) == write {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }));
        let result = tree.create("s1", &TakeOptions::disk_only());
        assert!(!dir.path().join(".snapshots.json.tmp").exists(), "{what}");
        let late = write == 2;
        match (&result, late) {
            (Err(snapshot::Error::AfterSwitch { .. }), true) | (Ok(_), true) => {
                // Past the switch: the guest writes on; every file stays.
                disk.write_at(&[3; BLOCK as usize], 0).unwrap();
                disk.flush().unwrap();
                let top = abs(disk.top().path());
                assert_ne!(top, original, "{what}");
                drop(tree);
                assert_eq!(SnapshotTree::resume_tops(&meta).unwrap(), vec![top.clone()]);
                let reopened = SnapshotTree::open(&meta, vec![disk.clone()], None)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let s1 = reopened.get("s1").unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(s1.disks[0].image, original, "{what}");
                assert!(reopened.images().contains(&top), "{what}");
                reopened.revert("s1").unwrap();
                assert_eq!(first_byte(&disk), 1, "{what}");
            }
            (Err(e), false) => {
                assert!(e.to_string().contains("No space left"), "{what}: {e}");
                assert_eq!(abs(disk.top().path()), original, "{what}");
                let files: Vec<PathBuf> = std::fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
                    .collect();
                assert_eq!(files, vec![original.clone()], "{what}");
                disk.write_at(&[3; BLOCK as usize], 0).unwrap();
                drop(tree);
                let reopened = SnapshotTree::open(&meta, vec![disk.clone()], None).unwrap();
                assert!(reopened.list().is_empty(), "{what}");
                reopened.create("s1", &TakeOptions::disk_only()).unwrap();
            }
            (other, _) => panic!("{what}: unexpected {other:?}"),
        }
    }
}
