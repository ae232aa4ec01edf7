//! `snapvmm ctl` against the API server in this process, serving a fake VM over real disk
//! images: every verb, text and `--json`, without KVM.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use snapshot::tree::SnapshotTree;
use snapshot::vm_state::VmStateError;
use snapvmm_api::types::{DiskInfo, JobInfo, SnapshotResult};
use snapvmm_api::types::{SnapshotDeleteResult, SnapshotInfo};
use snapvmm_api::{ApiServer, VmInfo, VmState};
use storage::{LiveDisk, OpenOptions};
use vmm::control::{ControlError, Disk, Machine};
use vmm::Control;

/// A machine whose life is a state variable: `ctl` is what is under test.
struct FakeVm {
    state: Mutex<VmState>,
}

/// The VM side of snapshots with memory: its "memory" is a byte buffer.
struct FakeMemory {
    memory: Mutex<Vec<u8>>,
}

impl snapshot::vm_state::VmState for FakeMemory {
    fn pause_vcpus(&self) -> Result<bool, VmStateError> {
        Ok(true)
    }
    fn resume_vcpus(&self) -> Result<(), VmStateError> {
        Ok(())
    }
    fn save_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("memory"), &*self.memory.lock().unwrap())?;
        Ok(())
    }
    fn load_checkpoint(&self, dir: &Path) -> Result<(), VmStateError> {
        *self.memory.lock().unwrap() = std::fs::read(dir.join("memory"))?;
        Ok(())
    }
    fn save_stream(&self, out: &mut dyn std::io::Write) -> Result<u64, VmStateError> {
        let memory = self.memory.lock().unwrap();
        out.write_all(&memory)?;
        Ok(memory.len() as u64)
    }
    fn load_stream(&self, input: &mut dyn std::io::Read) -> Result<(), VmStateError> {
        let mut memory = Vec::new();
        input.read_to_end(&mut memory)?;
        *self.memory.lock().unwrap() = memory;
        Ok(())
    }
}

impl Machine for FakeVm {
    fn state(&self) -> VmState {
        *self.state.lock().unwrap()
    }
    fn vcpus(&self) -> u8 {
        1
    }
    fn memory_mib(&self) -> u64 {
        32
    }
    fn pause(&self) -> Result<(), ControlError> {
        *self.state.lock().unwrap() = VmState::Paused;
        Ok(())
    }
    fn resume(&self) -> Result<(), ControlError> {
        *self.state.lock().unwrap() = VmState::Running;
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ControlError> {
        *self.state.lock().unwrap() = VmState::ShuttingDown;
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    socket: PathBuf,
    vm: Arc<FakeVm>,
    disk: Arc<LiveDisk>,
    _server: ApiServer,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::build(None)
    }

    /// A VM with a snapshot tree whose VM state is `memory`.
    fn with_tree(memory: Arc<FakeMemory>) -> Fixture {
        Fixture::build(Some(memory))
    }

    fn build(memory: Option<Arc<FakeMemory>>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        test_support::image::qcow2(&base, 4 << 20, None);
        let disk = LiveDisk::new(
            "vda",
            storage::open(&base, &OpenOptions::default()).unwrap(),
        );
        disk.write_at(&[0x5a; 65536], 0).unwrap();
        let tree = memory.map(|memory| {
            Arc::new(
                SnapshotTree::open(
                    dir.path().join("snapshots.json"),
                    vec![disk.clone()],
                    Some(memory as Arc<dyn snapshot::vm_state::VmState>),
                )
                .unwrap(),
            )
        });
        let vm = Arc::new(FakeVm {
            state: Mutex::new(VmState::Running),
        });
        let control = Control::new(
            vm.clone(),
            vec![Disk::new("vda", disk.clone(), false)],
            tree,
        );
        let socket = dir.path().join("api.sock");
        let server = ApiServer::start(&socket, Arc::new(control)).unwrap();
        Fixture {
            dir,
            socket,
            vm,
            disk,
            _server: server,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ctl(&self, args: &[&str]) -> Output {
        test_support::snapvmm_binary!().ctl(&self.socket, args)
    }

    fn ok(&self, args: &[&str]) -> String {
        test_support::snapvmm_binary!().ctl_ok(&self.socket, args, String::new)
    }

    fn fails(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert_eq!(output.status.code(), Some(1), "ctl {args:?} should fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn top(&self) -> PathBuf {
        self.disk.top().path().to_path_buf()
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn ctl_vm_verbs() {
    let f = Fixture::new();
    let text = f.ok(&["info"]);
    assert!(
        text.contains("running") && text.contains("32 MiB"),
        "{text}"
    );
    assert!(f.ok(&["pause"]).contains("Domain paused"));
    let info: VmInfo = serde_json::from_str(&f.ok(&["info", "--json"])).unwrap();
    assert_eq!(info.state, VmState::Paused);
    f.ok(&["resume", "--json"]);
    assert_eq!(*f.vm.state.lock().unwrap(), VmState::Running);
    let list = f.ok(&["domblklist"]);
    assert!(
        list.contains("vda") && list.contains("base.qcow2"),
        "{list}"
    );
    f.ok(&["shutdown"]);
    assert_eq!(*f.vm.state.lock().unwrap(), VmState::ShuttingDown);
}

#[test]
fn ctl_snapshot_blockpull_blockcommit_blockjob() {
    let f = Fixture::new();
    let message = f.fails(&["snapshot-create-as", "s1"]);
    assert!(message.contains("--disk-only"), "{message}");
    let out = f.ok(&[
        "snapshot-create-as",
        "s1",
        "desc",
        "--disk-only",
        "--atomic",
    ]);
    assert!(out.contains("Domain snapshot s1 created"), "{out}");
    assert_eq!(f.top(), f.path("base.s1.qcow2"));
    // Data in every MiB: a stream copies 1 MiB per throttle slice, so a throttled one
    // cannot copy it all at once.
    for offset in [0x8_0000, 0x18_0000, 0x28_0000, 0x38_0000] {
        f.disk.write_at(&[0xa5; 65536], offset).unwrap();
    }
    let result: SnapshotResult =
        serde_json::from_str(&f.ok(&["snapshot-create-as", "s2", "--disk-only", "--json"]))
            .unwrap();
    assert_eq!(result.disks[0].previous, display(&f.path("base.s1.qcow2")));

    // Without --wait: started, then steer it with blockjob.
    let base = display(&f.path("base.qcow2"));
    let out = f.ok(&["blockpull", "vda", "--base", &base, "--bandwidth", "1"]);
    assert!(out.contains("Block Pull started"), "{out}");
    let busy = f.fails(&["blockcommit", "vda", "--active"]);
    assert!(busy.contains("409"), "{busy}");
    let job: JobInfo =
        serde_json::from_str(&f.ok(&["blockjob", "vda", "--bandwidth", "0", "--json"])).unwrap();
    assert_eq!(job.speed, 0);
    let info = f.ok(&["blockjob", "vda", "--info"]);
    assert!(info.contains("Block Pull"), "{info}");
    // Wait for it by starting nothing: poll --info until concluded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let job: JobInfo = serde_json::from_str(&f.ok(&["blockjob", "vda", "--json"])).unwrap();
        if job.status == "concluded" {
            assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{job:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let disks: Vec<DiskInfo> = serde_json::from_str(&f.ok(&["domblklist", "--json"])).unwrap();
    assert_eq!(disks[0].backing_chain, std::slice::from_ref(&base));

    let out = f.ok(&["blockcommit", "vda", "--active", "--pivot", "--wait"]);
    assert!(out.contains("Successfully pivoted"), "{out}");
    assert_eq!(f.top(), f.path("base.qcow2"));
    let mut back = [0u8; 16];
    f.disk.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, [0x5a; 16]);
    for offset in [0x8_0000, 0x18_0000, 0x28_0000, 0x38_0000] {
        f.disk.read_at(&mut back, offset).unwrap();
        assert_eq!(back, [0xa5; 16]);
    }

    // A stream with nothing below the top is a no-op that completes.
    let job: JobInfo =
        serde_json::from_str(&f.ok(&["blockpull", "vda", "--wait", "--json"])).unwrap();
    assert_eq!(job.outcome.as_deref(), Some("completed"));

    let missing = f.fails(&["blockjob", "vdz"]);
    assert!(missing.contains("no disk named"), "{missing}");
    let usage = f.fails(&["blockcommit", "vda", "--active", "--pivot"]);
    assert!(usage.contains("--wait"), "{usage}");
}

#[test]
fn ctl_snapshot_tree_verbs() {
    let memory = Arc::new(FakeMemory {
        memory: Mutex::new(b"memory one".to_vec()),
    });
    let f = Fixture::with_tree(memory.clone());
    let disk = f.disk.clone();
    let out = f.ok(&["snapshot-create-as", "one", "first snapshot"]);
    assert!(out.contains("Domain snapshot one created"), "{out}");
    disk.write_at(&[1; 4096], 0).unwrap();
    *memory.memory.lock().unwrap() = b"memory two".to_vec();
    let two: SnapshotInfo =
        serde_json::from_str(&f.ok(&["snapshot-create-as", "two", "--internal", "--json"]))
            .unwrap();
    assert_eq!(two.parent.as_deref(), Some("one"));
    assert_eq!(two.vm_state_size, 10);
    f.ok(&["snapshot-create-as", "three", "--disk-only", "--atomic"]);
    disk.write_at(&[3; 4096], 0).unwrap();

    let list = f.ok(&["snapshot-list"]);
    for needle in [
        "one",
        "two",
        "three",
        "external-with-memory",
        "internal",
        "running",
    ] {
        assert!(list.contains(needle), "{needle} in {list}");
    }
    let tree = f.ok(&["snapshot-list", "--tree"]);
    assert!(
        tree.starts_with("one\n  |\n  +- two\n      |\n      +- three"),
        "{tree}"
    );
    let listed: Vec<SnapshotInfo> =
        serde_json::from_str(&f.ok(&["snapshot-list", "--json"])).unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(f.ok(&["snapshot-current"]).trim(), "three");
    let info = f.ok(&["snapshot-info", "two"]);
    for needle in [
        "Name:           two",
        "Current:        no",
        "Children:       1",
        "Kind:           internal",
    ] {
        assert!(info.contains(needle), "{needle} in {info}");
    }

    let out = f.ok(&["snapshot-revert", "one"]);
    assert!(out.contains("reverted to snapshot one"), "{out}");
    assert_eq!(&*memory.memory.lock().unwrap(), b"memory one");
    let mut back = [0u8; 4];
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0x5a; 4]);
    f.ok(&["snapshot-revert", "two"]);
    assert_eq!(&*memory.memory.lock().unwrap(), b"memory two");
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [1; 4]);
    assert_eq!(f.ok(&["snapshot-current"]).trim(), "two");

    let missing = f.fails(&["snapshot-revert", "nope"]);
    assert!(
        missing.contains("404") && missing.contains("nope"),
        "{missing}"
    );
    let exists = f.fails(&["snapshot-create-as", "one", "--disk-only"]);
    assert!(exists.contains("409"), "{exists}");

    let out = f.ok(&["snapshot-delete", "one"]);
    assert!(out.contains("Domain snapshot one deleted"), "{out}");
    let result: SnapshotDeleteResult =
        serde_json::from_str(&f.ok(&["snapshot-delete", "two", "--children", "--json"])).unwrap();
    assert_eq!(result.deleted, ["three", "two"]);
    let empty: Vec<SnapshotInfo> =
        serde_json::from_str(&f.ok(&["snapshot-list", "--json"])).unwrap();
    assert!(empty.is_empty());
    assert!(f
        .fails(&["snapshot-current"])
        .contains("no current snapshot"));
    // What the disk shows never changed through the deletes.
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [1; 4]);
}
