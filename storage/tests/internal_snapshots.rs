//! Internal qcow2 snapshots: compatibility with `qemu-img snapshot` in both directions, a
//! model-checked property test, and crash trials.

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use storage::qcow2::Qcow2Image;
use storage::{BlockDevice, OpenOptions};
use test_support::image::snapvmm_create;
use test_support::qemu::{
    assert_check_clean, qemu_check, qemu_create, qemu_img, qemu_io, CheckResult,
};
use test_support::require::have_qemu;

fn open_qcow2(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &OpenOptions::default()).expect("open")
}

fn new_image(dir: &Path, name: &str, size: u64, cluster_size: u64, version: u32) -> PathBuf {
    let path = dir.join(name);
    snapvmm_create(&path, Some(size), cluster_size, version, 16, None);
    path
}

#[test]
fn snapvmm_snapshots_work_in_qemu() {
    if !have_qemu("snapvmm_snapshots_work_in_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "a.qcow2", 64 << 20, 65536, 3);
    {
        let mut image = open_qcow2(&path);
        image.write_at(&vec![1u8; 300_000], 0).unwrap();
        image.create_snapshot("one", 0, 0).unwrap();
        image.write_at(&vec![2u8; 100_000], 50_000).unwrap();
        image.create_snapshot("two", 5_000_000_000, 0).unwrap();
        image.write_at(&vec![3u8; 4096], 0).unwrap();
    }
    assert_check_clean(&path);
    let list = qemu_img(&["snapshot".as_ref(), "-l".as_ref(), path.as_os_str()]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    assert!(list.contains("0000:00:05.000"), "vm clock shown: {list}");
    qemu_io(&path, "qcow2", &["read -P 3 0 4096"]);

    let copy = dir.path().join("b.qcow2");
    std::fs::copy(&path, &copy).unwrap();
    qemu_img(&[
        "snapshot".as_ref(),
        "-a".as_ref(),
        "one".as_ref(),
        copy.as_os_str(),
    ]);
    qemu_io(&copy, "qcow2", &["read -P 1 0 300000"]);
    qemu_img(&[
        "snapshot".as_ref(),
        "-a".as_ref(),
        "two".as_ref(),
        copy.as_os_str(),
    ]);
    qemu_io(&copy, "qcow2", &["read -P 1 0 50000"]);
    qemu_io(&copy, "qcow2", &["read -P 2 50000 100000"]);
    qemu_io(&copy, "qcow2", &["read -P 1 150000 150000"]);
    qemu_img(&[
        "snapshot".as_ref(),
        "-d".as_ref(),
        "one".as_ref(),
        copy.as_os_str(),
    ]);
    assert_check_clean(&copy);
}

#[test]
fn qemu_snapshots_work_in_snapvmm() {
    if !have_qemu("qemu_snapshots_work_in_snapvmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.qcow2");
    qemu_create(&path, "cluster_size=4096", Some(16 << 20));
    let p = path.to_str().unwrap();
    qemu_io(&path, "qcow2", &["write -P 5 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", p]);
    qemu_io(&path, "qcow2", &["write -P 6 512k 1M"]);
    qemu_img(&["snapshot", "-c", "second", p]);
    qemu_io(&path, "qcow2", &["write -P 7 0 8k"]);
    {
        let mut image = open_qcow2(&path);
        let names: Vec<_> = image.snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["first", "second"]);
        // Writing through snapvmm must not damage either snapshot.
        image.write_at(&vec![8u8; 1 << 20], 256 << 10).unwrap();
        image.apply_snapshot("first").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 5));
        image.delete_snapshot("first").unwrap();
    }
    assert_check_clean(&path);
    qemu_img(&["snapshot", "-a", "second", p]);
    qemu_io(&path, "qcow2", &["read -P 5 0 512k"]);
    qemu_io(&path, "qcow2", &["read -P 6 512k 1M"]);
    assert_check_clean(&path);
}

#[test]
fn vm_state_is_stored_as_qemu_does() {
    if !have_qemu("vm_state_is_stored_as_qemu_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "vm.qcow2", 32 << 20, 65536, 3);
    let state: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut image = open_qcow2(&path);
        image.write_at(&[9u8; 4096], 0).unwrap();
        image.write_vm_state(&state[..1_000_000], 0).unwrap();
        image
            .write_vm_state(&state[1_000_000..], 1_000_000)
            .unwrap();
        image
            .create_snapshot("with-state", 1_000_000_000, state.len() as u64)
            .unwrap();
        let mut back = vec![0u8; state.len()];
        image.read_vm_state("with-state", &mut back, 0).unwrap();
        assert!(back == state, "VM state reads back");
        let mut past = [0u8; 16];
        assert!(image
            .read_vm_state("with-state", &mut past, state.len() as u64)
            .is_err());
    }
    assert_check_clean(&path);
    let list = qemu_img(&["snapshot".as_ref(), "-l".as_ref(), path.as_os_str()]);
    assert!(list.contains("4.77 MiB"), "VM SIZE column: {list}");
    // The VM state left the active layer: the disk still reads as before.
    qemu_io(&path, "qcow2", &["read -P 9 0 4096"]);
    let image = open_qcow2(&path);
    let mut back = vec![0u8; 4096];
    image
        .read_vm_state("with-state", &mut back, 4_000_000)
        .unwrap();
    assert_eq!(&back[..], &state[4_000_000..4_004_096]);
}

#[test]
fn snapshots_are_independent() {
    if !have_qemu("snapshots_are_independent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "i.qcow2", 8 << 20, 4096, 3);
    let mut image = open_qcow2(&path);
    for i in 1..=5u8 {
        image
            .write_at(&vec![i; 64 << 10], (i as u64) * 4096)
            .unwrap();
        image.create_snapshot(&format!("s{i}"), 0, 0).unwrap();
    }
    for i in 2..=4 {
        image.delete_snapshot(&format!("s{i}")).unwrap();
    }
    drop(image);
    assert_check_clean(&path);
    let mut image = open_qcow2(&path);
    for (name, top) in [("s1", 1u8), ("s5", 5u8)] {
        image.apply_snapshot(name).unwrap();
        let mut buf = vec![0u8; (top as usize + 16) * 4096];
        image.read_at(&mut buf, 0).unwrap();
        for i in 1..=top {
            let at = i as usize * 4096;
            // Each later write overlaps the previous from its start on.
            let expect = if i == top { top } else { i };
            assert_eq!(buf[at], expect, "{name}: block {i}");
        }
        // After apply, writes copy shared clusters instead of damaging other snapshots.
        image.write_at(&vec![0xee; 32 << 10], 0).unwrap();
    }
    image.apply_snapshot("s1").unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    drop(image);
    assert_check_clean(&path);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        cluster: u8,
        len_blocks: u8,
        pattern: u8,
    },
    Create,
    Apply(u8),
    Delete(u8),
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..32, 1u8..6, 1u8..255).prop_map(|(cluster, len_blocks, pattern)| Op::Write { cluster, len_blocks, pattern }),
        2 => Just(Op::Create),
        2 => any::<u8>().prop_map(Op::Apply),
        2 => any::<u8>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random interleavings of writes, create, apply and delete against a model of every
    /// snapshot's contents; `qemu-img check` clean after each sequence.
    #[test]
    fn snapshot_model(ops in proptest::collection::vec(op_strategy(), 1..40), small in any::<bool>()) {
        if !have_qemu("snapshot_model") {
            return Ok(());
        }
        let cluster_size = if small { 512 } else { 4096 };
        let size = 64 * 4096u64;
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), "m.qcow2", size, cluster_size, if small { 2 } else { 3 });
        let mut image = open_qcow2(&path);
        let mut model = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut counter = 0;
        for op in &ops {
            match *op {
                Op::Write { cluster, len_blocks, pattern } => {
                    let offset = cluster as u64 * 2048 + 100;
                    let len = len_blocks as usize * 1500;
                    let len = len.min(size as usize - offset as usize);
                    image.write_at(&vec![pattern; len], offset).unwrap();
                    model[offset as usize..offset as usize + len].fill(pattern);
                }
                Op::Create => {
                    counter += 1;
                    let name = format!("snap{counter}");
                    image.create_snapshot(&name, 0, 0).unwrap();
                    snaps.push((name, model.clone()));
                }
                Op::Apply(k) if !snaps.is_empty() => {
                    let (name, data) = &snaps[k as usize % snaps.len()];
                    image.apply_snapshot(name).unwrap();
                    model = data.clone();
                }
                Op::Delete(k) if !snaps.is_empty() => {
                    let (name, _) = snaps.remove(k as usize % snaps.len());
                    image.delete_snapshot(&name).unwrap();
                }
                Op::Reopen => {
                    drop(image);
                    image = open_qcow2(&path);
                }
                _ => {}
            }
            let mut buf = vec![0u8; size as usize];
            image.read_at(&mut buf, 0).unwrap();
            prop_assert!(buf == model, "active content after {:?}", op);
        }
        drop(image);
        let CheckResult { exit: code, output: text, .. } = qemu_check(&path);
        prop_assert_eq!(code, 0, "qemu-img check: {}", text);
        // Every snapshot, applied in turn, holds exactly its data.
        let mut image = open_qcow2(&path);
        for (name, data) in &snaps {
            image.apply_snapshot(name).unwrap();
            let mut buf = vec![0u8; size as usize];
            image.read_at(&mut buf, 0).unwrap();
            prop_assert!(&buf == data, "snapshot {} content", name);
        }
        drop(image);
        let CheckResult { exit: code, output: text, .. } = qemu_check(&path);
        prop_assert_eq!(code, 0, "qemu-img check after applies: {}", text);
    }
}

/// The deterministic workload of the crash child: step `i` writes one cluster, then creates,
/// deletes or applies a snapshot.
#[derive(Clone, Debug, PartialEq)]
struct CrashModel {
    active: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

const CRASH_CLUSTERS: usize = 48;
const CRASH_CLUSTER: u64 = 4096;

impl CrashModel {
    fn new() -> Self {
        CrashModel {
            active: vec![0; CRASH_CLUSTERS],
            snaps: Vec::new(),
        }
    }

    fn write_of(i: usize) -> (usize, u8) {
        ((i * 7 + 3) % CRASH_CLUSTERS, (i % 250) as u8 + 1)
    }

    /// Applies step `i`'s write only.
    fn write(&mut self, i: usize) {
        let (c, p) = Self::write_of(i);
        self.active[c] = p;
    }

    /// Applies step `i`'s snapshot operation only.
    fn op(&mut self, i: usize) {
        match i % 4 {
            0 | 1 => self.snaps.push((format!("s{i}"), self.active.clone())),
            2 => {
                if !self.snaps.is_empty() {
                    self.snaps.remove(0);
                }
            }
            _ => {
                if let Some((_, data)) = self.snaps.last() {
                    self.active = data.clone();
                }
            }
        }
    }
}

fn crash_child(path: &Path) {
    let mut image = open_qcow2(path);
    let mut model = CrashModel::new();
    for i in 0.. {
        let (c, p) = CrashModel::write_of(i);
        image
            .write_at(&vec![p; CRASH_CLUSTER as usize], c as u64 * CRASH_CLUSTER)
            .unwrap();
        image.flush().unwrap();
        model.write(i);
        match i % 4 {
            0 | 1 => {
                image.create_snapshot(&format!("s{i}"), 0, 0).unwrap();
            }
            2 => {
                if !model.snaps.is_empty() {
                    let name = model.snaps[0].0.clone();
                    image.delete_snapshot(&name).unwrap();
                }
            }
            _ => {
                if let Some((name, _)) = model.snaps.last() {
                    image.apply_snapshot(name).unwrap();
                }
            }
        }
        model.op(i);
        println!("ack {i}");
    }
}

fn read_clusters(image: &Qcow2Image) -> Vec<u8> {
    let mut out = Vec::with_capacity(CRASH_CLUSTERS);
    let mut buf = vec![0u8; CRASH_CLUSTER as usize];
    for c in 0..CRASH_CLUSTERS {
        image.read_at(&mut buf, c as u64 * CRASH_CLUSTER).unwrap();
        assert!(
            buf.iter().all(|&b| b == buf[0]),
            "cluster {c} holds a torn write"
        );
        out.push(buf[0]);
    }
    out
}

/// SIGKILL during create, apply and delete: the image opens, `qemu-img check` finds no
/// corruption, and it holds the snapshot set (with their data) from before or after the
/// interrupted step.
#[test]
fn crash_during_snapshot_operations() {
    if let Ok(path) = std::env::var("SNAPVMM_SNAPSHOT_CRASH_CHILD") {
        crash_child(Path::new(&path));
        return;
    }
    if !have_qemu("crash_during_snapshot_operations") {
        return;
    }
    use rand::Rng;
    let trials: usize = std::env::var("SNAPVMM_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut rng = rand::rng();
    let exe = std::env::current_exe().unwrap();
    for trial in 0..trials {
        let dir = tempfile::tempdir().unwrap();
        let version = if trial % 4 == 3 { 2 } else { 3 };
        let path = new_image(
            dir.path(),
            "c.qcow2",
            CRASH_CLUSTERS as u64 * CRASH_CLUSTER,
            CRASH_CLUSTER,
            version,
        );
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_during_snapshot_operations",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SNAPVMM_SNAPSHOT_CRASH_CHILD", &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(5..120)));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let acked = String::from_utf8_lossy(&out.stdout)
            .lines()
            // The first ack shares its line with libtest's "test ... " prefix.
            .filter_map(|l| l.rsplit("ack ").next()?.trim().parse::<usize>().ok())
            .max();
        // States the image may hold: after the last acked step, after the next step's write,
        // or after the whole next step.
        let mut model = CrashModel::new();
        let next = match acked {
            Some(k) => {
                for i in 0..=k {
                    model.write(i);
                    model.op(i);
                }
                k + 1
            }
            None => 0,
        };
        let before = model.clone();
        let mut written = model.clone();
        written.write(next);
        let mut after = written.clone();
        after.op(next);

        // Opening writable repairs what the dirty bit says may be stale (v3); v2 images
        // have no dirty bit and get `check -r all` semantics instead.
        let image = open_qcow2(&path);
        let names: Vec<String> = image.snapshots().iter().map(|s| s.name.clone()).collect();
        let active = read_clusters(&image);
        drop(image);
        if version == 2 {
            let code = qemu_check(&path).exit;
            if code != 0 {
                qemu_img(&[
                    "check".as_ref(),
                    "-q".as_ref(),
                    "-r".as_ref(),
                    "all".as_ref(),
                    path.as_os_str(),
                ]);
            }
        }
        let CheckResult {
            exit: code,
            output: text,
            ..
        } = qemu_check(&path);
        assert!(
            code == 0 || code == 3,
            "trial {trial}: qemu-img check after crash (acked {acked:?}): {text}"
        );
        let candidates = [&before, &written, &after];
        let matching: Vec<&CrashModel> = candidates
            .iter()
            .copied()
            .filter(|m| m.snaps.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>() == names)
            .collect();
        assert!(
            !matching.is_empty(),
            "trial {trial}: snapshot set {names:?} is neither before nor after step {next}"
        );
        assert!(
            candidates.iter().any(|m| m.active == active),
            "trial {trial}: active data {active:?} matches no allowed state (acked {acked:?}, v{version}):\n before {:?}\n written {:?}\n after {:?}",
            before.active,
            written.active,
            after.active
        );
        let mut image = open_qcow2(&path);
        let expected = matching[0];
        for (name, data) in &expected.snaps {
            image.apply_snapshot(name).unwrap();
            assert_eq!(
                &read_clusters(&image),
                data,
                "trial {trial}: snapshot {name}"
            );
        }
        drop(image);
        // Leaks from the crash may remain (allowed); corruption may not.
        let CheckResult {
            exit: code,
            output: text,
            ..
        } = qemu_check(&path);
        assert!(
            code == 0 || code == 3,
            "trial {trial}: check after applies: {text}"
        );
    }
}
