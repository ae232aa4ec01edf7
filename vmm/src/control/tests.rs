//! `Control` over real qcow2 images and a real snapshot tree in a temporary directory; only
//! the machine's life (pause, resume, shutdown) is a stand-in, as no KVM is needed for disks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use snapshot::tree::{SnapshotKind, SnapshotTree};
use snapshot::JobStatus;
use storage::qcow2::{create, CreateOptions};
use storage::{LiveDisk, OpenOptions};

use super::types::{
    CommitRequest, SnapshotCreate, SnapshotDeleteRequest, SnapshotDisk, StreamRequest,
    TreeSnapshotCreate, VmState,
};
use super::{Control, ControlError, Disk, Machine};

/// A machine whose life is a state variable.
struct TestMachine {
    state: Mutex<VmState>,
}

impl Machine for TestMachine {
    fn state(&self) -> VmState {
        *self.state.lock()
    }
    fn shutdown(&self) -> super::Result<()> {
        *self.state.lock() = VmState::ShuttingDown;
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    control: Control,
}

impl Fixture {
    /// Disks vda (writable) and vdb (read-only), with a snapshot tree when `tree`.
    fn new(tree: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vda = qcow2(&dir.path().join("vda.qcow2"));
        let vdb = qcow2(&dir.path().join("vdb.qcow2"));
        let tree = tree.then(|| {
            Arc::new(
                SnapshotTree::open(dir.path().join("tree.json"), vec![vda.clone()], None).unwrap(),
            )
        });
        let machine = Arc::new(TestMachine {
            state: Mutex::new(VmState::Running),
        });
        let disks = vec![Disk::new("vda", vda, false), Disk::new("vdb", vdb, true)];
        Fixture {
            control: Control::new(machine, disks, tree),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn vda(&self) -> &Arc<LiveDisk> {
        &self.control.disk_handles()[0].disk
    }

    fn disk_only(&self, name: &str) {
        let request = TreeSnapshotCreate {
            name: name.into(),
            disk_only: true,
            ..Default::default()
        };
        let info = self.control.snapshot_create(&request).unwrap();
        assert_eq!(info.kind, SnapshotKind::ExternalDiskOnly);
    }

    /// Waits for vda's job to reach `status`.
    fn wait(&self, status: JobStatus) {
        let job = self
            .control
            .job_wait("vda", Duration::from_secs(30), |s| s == status)
            .unwrap();
        assert_eq!(job.status, status.to_string(), "{job:?}");
    }
}

fn qcow2(path: &Path) -> Arc<LiveDisk> {
    create(
        path,
        &CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    LiveDisk::new(name, storage::open(path, &OpenOptions::default()).unwrap())
}

fn read(disk: &LiveDisk, offset: u64) -> [u8; 8] {
    let mut back = [0u8; 8];
    disk.read_at(&mut back, offset).unwrap();
    back
}

fn conflict_naming(result: super::Result<impl std::fmt::Debug>, needles: &[&str]) {
    match result {
        Err(ControlError::Conflict(message)) => {
            for needle in needles {
                assert!(message.contains(needle), "{needle:?} in {message}");
            }
        }
        other => panic!("expected a conflict naming {needles:?}, got {other:?}"),
    }
}

/// Issue 13, finding 4: an active commit into the image a snapshot froze rewrote the
/// snapshot, and reverting to it then brought back other data.
#[test]
fn commit_into_an_image_a_snapshot_froze_is_refused() {
    let f = Fixture::new(true);
    f.vda().write_at(b"at s1...", 0).unwrap();
    f.disk_only("s1");
    f.vda().write_at(b"after s1", 0).unwrap();
    let base = f.path("vda.qcow2");

    let active = CommitRequest {
        active: true,
        ..Default::default()
    };
    let canonical = std::fs::canonicalize(&base).unwrap();
    conflict_naming(
        f.control.commit("vda", &active),
        &["\"s1\"", canonical.to_str().unwrap()],
    );
    // Naming the base explicitly changes nothing.
    let explicit = CommitRequest {
        base: Some(base.display().to_string()),
        ..active.clone()
    };
    conflict_naming(f.control.commit("vda", &explicit), &["\"s1\""]);
    assert!(f.control.job("vda").is_err(), "no job was started");

    // An intermediate commit into it is refused too.
    f.disk_only("s2");
    let s1_top = f.path("vda.s1.qcow2");
    let intermediate = CommitRequest {
        top: Some(s1_top.display().to_string()),
        ..Default::default()
    };
    conflict_naming(f.control.commit("vda", &intermediate), &["\"s1\""]);

    // The snapshot still holds what it froze.
    f.control.snapshot_revert("s1").unwrap();
    assert_eq!(&read(f.vda(), 0), b"at s1...");

    // Once nothing froze the base, the same commit runs.
    let forget = SnapshotDeleteRequest {
        children: true,
        metadata: true,
    };
    f.control.snapshot_delete("s1", &forget).unwrap();
    f.vda().write_at(b"new data", 0).unwrap();
    f.control.commit("vda", &active).unwrap();
    f.wait(JobStatus::Ready);
    f.control.job_complete("vda").unwrap();
    f.wait(JobStatus::Concluded);
    assert_eq!(f.vda().top().path(), base.as_path());
    assert_eq!(&read(f.vda(), 0), b"new data");
}

#[test]
fn commit_into_an_image_holding_an_internal_snapshot_is_allowed() {
    let f = Fixture::new(true);
    let request = SnapshotCreate {
        name: "o".into(),
        description: None,
        disks: None,
        atomic: true,
        ..Default::default()
    };
    f.control.disk_snapshot(&request).unwrap();
    let internal = TreeSnapshotCreate {
        name: "i".into(),
        disk_only: true,
        internal: true,
        ..Default::default()
    };
    f.control.snapshot_create(&internal).unwrap();
    // `i` lives inside the overlay, the active layer; the base below it is not frozen.
    f.vda().write_at(b"abcdefgh", 4096).unwrap();
    f.control
        .commit(
            "vda",
            &CommitRequest {
                active: true,
                ..Default::default()
            },
        )
        .unwrap();
    f.wait(JobStatus::Ready);
    f.control.job_complete("vda").unwrap();
    f.wait(JobStatus::Concluded);
    assert_eq!(&read(f.vda(), 4096), b"abcdefgh");
}

#[test]
fn disk_snapshot_stream_and_job_verbs() {
    let f = Fixture::new(false);
    f.vda().write_at(b"before..", 0).unwrap();
    // A stream copies 1 MiB per throttle slice: data in two MiBs makes a slow one wait.
    f.vda().write_at(&[7; 65536], 2 << 20).unwrap();
    // Read-only disks are left out when no disk is named, and refused when one is.
    let all = SnapshotCreate {
        name: "s".into(),
        description: None,
        disks: None,
        atomic: true,
        ..Default::default()
    };
    let result = f.control.disk_snapshot(&all).unwrap();
    assert_eq!(result.disks.len(), 1);
    assert_eq!(
        result.disks[0].previous,
        f.path("vda.qcow2").display().to_string()
    );
    let read_only = SnapshotCreate {
        disks: Some(vec![SnapshotDisk {
            disk: "vdb".into(),
            overlay: None,
        }]),
        ..all.clone()
    };
    assert!(matches!(
        f.control.disk_snapshot(&read_only),
        Err(ControlError::Conflict(_))
    ));
    let bad_name = SnapshotCreate {
        name: "a/b".into(),
        ..all
    };
    assert!(matches!(
        f.control.disk_snapshot(&bad_name),
        Err(ControlError::InvalidArgument(_))
    ));
    let info = f.control.disk("vda").unwrap();
    assert_eq!(info.backing_chain.len(), 1);

    assert!(matches!(
        f.control.job("vda"),
        Err(ControlError::NotFound(_))
    ));
    assert!(matches!(
        f.control.job("vdz"),
        Err(ControlError::NotFound(_))
    ));
    assert!(matches!(
        f.control.stream("vdb", &StreamRequest::default()),
        Err(ControlError::Conflict(_))
    ));
    let slow = StreamRequest {
        base: None,
        speed: 1,
    };
    let job = f.control.stream("vda", &slow).unwrap();
    assert_eq!(job.kind, "stream");
    let busy = f.control.commit(
        "vda",
        &CommitRequest {
            active: true,
            ..Default::default()
        },
    );
    assert!(matches!(busy, Err(ControlError::Conflict(_))), "{busy:?}");
    assert_eq!(f.control.disk("vda").unwrap().job, Some(job.id.clone()));
    assert_eq!(f.control.job_set_speed("vda", 0).unwrap().speed, 0);
    f.wait(JobStatus::Concluded);
    let job = f.control.job("vda").unwrap();
    assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
    assert!(matches!(
        f.control.job_cancel("vda"),
        Err(ControlError::Conflict(_))
    ));
    assert!(f.control.disk("vda").unwrap().backing_chain.is_empty());
    assert_eq!(&read(f.vda(), 0), b"before..");
}

#[test]
fn what_the_machine_cannot_do_is_unsupported() {
    let f = Fixture::new(false);
    let info = f.control.info();
    assert_eq!(
        (info.state, info.disks, info.vcpus),
        (VmState::Running, 2, 0)
    );
    assert!(matches!(
        f.control.pause(),
        Err(ControlError::Unsupported(_))
    ));
    assert!(matches!(
        f.control.snapshot_list(),
        Err(ControlError::Unsupported(_))
    ));
    assert!(matches!(
        f.control.checkpoint_save(&super::types::CheckpointRequest {
            dir: f.path("ckpt"),
            ..Default::default()
        }),
        Err(ControlError::Unsupported(_))
    ));
    f.control.shutdown().unwrap();
    assert_eq!(f.control.info().state, VmState::ShuttingDown);
}

/// Quiesced snapshots against scripted agents on real sockets (the real qemu-ga runs in
/// `tests/guest_agent.rs`).
mod quiesce {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::agent::testing::{scripted, AgentState, Behaviour};
    use crate::agent::AgentTimeouts;

    fn with_agent(behaviour: Behaviour, tree: bool) -> (Fixture, Arc<AgentState>) {
        let mut f = Fixture::new(tree);
        let timeouts = match behaviour {
            Behaviour::Good | Behaviour::FreezeFails => AgentTimeouts::default(),
            _ => AgentTimeouts {
                sync: Duration::from_millis(300),
                freeze: Duration::from_millis(300),
                command: Duration::from_millis(300),
            },
        };
        let (agent, state) = scripted(&f.path("qga.sock"), behaviour, timeouts);
        let machine = Arc::new(TestMachine {
            state: Mutex::new(VmState::Running),
        });
        let disks = f.control.disk_handles().to_vec();
        let tree = f.control.snapshot_tree().cloned();
        f.control = Control::new(machine, disks, tree).with_guest_agent(Arc::new(agent));
        (f, state)
    }

    fn quiesced(name: &str, best_effort: bool) -> SnapshotCreate {
        SnapshotCreate {
            quiesce: true,
            quiesce_best_effort: best_effort,
            ..SnapshotCreate::new(name)
        }
    }

    #[test]
    fn a_quiesced_snapshot_freezes_and_thaws_and_reports_the_frozen_time() {
        let (f, state) = with_agent(Behaviour::Good, false);
        let result = f.control.disk_snapshot(&quiesced("q1", false)).unwrap();
        assert!(result.frozen_us.is_some(), "{result:?}");
        assert_eq!(state.freezes.load(Ordering::SeqCst), 1);
        assert_eq!(state.thaws.load(Ordering::SeqCst), 1);
        let status = f.control.agent_status().unwrap();
        assert_eq!(status.fsfreeze, "thawed");
        let report = status.last_quiesce.unwrap();
        assert_eq!((report.snapshot.as_str(), report.filesystems), ("q1", 2));
        // Unquiesced snapshots leave the agent alone.
        let result = f.control.disk_snapshot(&SnapshotCreate::new("q2")).unwrap();
        assert_eq!(result.frozen_us, None);
        assert_eq!(state.freezes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_snapshot_still_thaws() {
        let (f, state) = with_agent(Behaviour::Good, false);
        let request = SnapshotCreate {
            disks: Some(vec![SnapshotDisk {
                disk: "vda".into(),
                overlay: Some("relative.qcow2".into()),
            }]),
            ..quiesced("bad", false)
        };
        let error = f.control.disk_snapshot(&request).unwrap_err();
        assert!(
            matches!(error, ControlError::InvalidArgument(_)),
            "{error:?}"
        );
        assert_eq!(state.freezes.load(Ordering::SeqCst), 1);
        assert!(!state.frozen.load(Ordering::SeqCst), "left frozen");
    }

    #[test]
    fn tree_snapshots_quiesce_disk_only() {
        let (f, state) = with_agent(Behaviour::Good, true);
        let request = TreeSnapshotCreate {
            quiesce: true,
            ..TreeSnapshotCreate::disk_only("t1")
        };
        f.control.snapshot_create(&request).unwrap();
        assert_eq!(state.thaws.load(Ordering::SeqCst), 1);
        let report = f.control.agent_status().unwrap().last_quiesce.unwrap();
        assert!(report.frozen_us.is_some());
        let with_memory = TreeSnapshotCreate {
            quiesce: true,
            ..TreeSnapshotCreate::with_memory("t2")
        };
        let error = f.control.snapshot_create(&with_memory).unwrap_err();
        assert!(
            matches!(error, ControlError::InvalidArgument(_)),
            "{error:?}"
        );
    }

    #[test]
    fn unresponsive_or_broken_agents_fail_the_snapshot_unless_best_effort() {
        for behaviour in [Behaviour::Hang, Behaviour::Garbage, Behaviour::FreezeFails] {
            let (f, state) = with_agent(behaviour, false);
            let error = f.control.disk_snapshot(&quiesced("s", false)).unwrap_err();
            match (behaviour, &error) {
                (Behaviour::Hang, ControlError::Conflict(m)) => assert!(m.contains("in time")),
                (Behaviour::Garbage, ControlError::Conflict(_) | ControlError::Failed(_)) => {}
                (Behaviour::FreezeFails, ControlError::Failed(m)) => assert!(m.contains("busy")),
                _ => panic!("{behaviour:?}: {error:?}"),
            }
            // Nothing was snapshotted, nothing left frozen.
            assert_eq!(f.vda().top().path(), f.path("vda.qcow2").as_path());
            assert!(
                !state.frozen.load(Ordering::SeqCst),
                "{behaviour:?}: left frozen"
            );
            let result = f.control.disk_snapshot(&quiesced("s", true)).unwrap();
            assert_eq!(result.frozen_us, None, "{behaviour:?}");
            assert!(
                !state.frozen.load(Ordering::SeqCst),
                "{behaviour:?}: left frozen"
            );
        }
    }

    #[test]
    fn no_agent_is_a_conflict_unless_best_effort() {
        let f = Fixture::new(false);
        conflict_naming(
            f.control.disk_snapshot(&quiesced("s", false)),
            &["no guest agent"],
        );
        let result = f.control.disk_snapshot(&quiesced("s", true)).unwrap();
        assert_eq!(result.frozen_us, None);
        let error = f.control.agent_status().unwrap_err();
        assert!(matches!(error, ControlError::Unsupported(_)), "{error:?}");
        let error = f
            .control
            .disk_snapshot(&SnapshotCreate {
                quiesce_best_effort: true,
                ..SnapshotCreate::new("x")
            })
            .unwrap_err();
        assert!(
            matches!(error, ControlError::InvalidArgument(_)),
            "{error:?}"
        );
    }
}
