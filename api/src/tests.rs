//! The server against a test machine: real sockets, real disks and a real snapshot tree in a
//! temporary directory, no KVM. Only the machine's life cycle is a stand-in: it is the HTTP
//! layer that is under test.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use snapshot::tree::SnapshotTree;
use storage::qcow2::{create, CreateOptions};
use storage::{LiveDisk, OpenOptions};
use vmm::control::{ControlError, Disk, Machine};
use vmm::Control;

use crate::routes::ROUTES;
use crate::types::{DiskInfo, JobInfo, SnapshotResult};
use crate::*;

/// A machine whose life is a state variable.
struct TestMachine {
    state: Mutex<VmState>,
}

impl Machine for TestMachine {
    fn state(&self) -> VmState {
        *self.state.lock()
    }
    fn vcpus(&self) -> u8 {
        2
    }
    fn memory_mib(&self) -> u64 {
        64
    }
    fn pause(&self) -> std::result::Result<(), ControlError> {
        let mut state = self.state.lock();
        if *state != VmState::Running {
            return Err(ControlError::Conflict("not running".into()));
        }
        *state = VmState::Paused;
        Ok(())
    }
    fn resume(&self) -> std::result::Result<(), ControlError> {
        let mut state = self.state.lock();
        if *state != VmState::Paused {
            return Err(ControlError::Conflict("not paused".into()));
        }
        *state = VmState::Running;
        Ok(())
    }
    fn shutdown(&self) -> std::result::Result<(), ControlError> {
        *self.state.lock() = VmState::ShuttingDown;
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    server: ApiServer,
    client: ApiClient,
    machine: Arc<TestMachine>,
    disks: Vec<Disk>,
}

fn qcow2(path: &Path, size: u64) -> Arc<LiveDisk> {
    create(
        path,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap();
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    LiveDisk::new(name, storage::open(path, &OpenOptions::default()).unwrap())
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut disks = Vec::new();
    for name in ["vda", "vdb"] {
        let disk = qcow2(&dir.path().join(format!("{name}.qcow2")), 4 << 20);
        disks.push(Disk::new(name, disk, false));
    }
    let tree = SnapshotTree::open(
        dir.path().join("snapshots.json"),
        disks.iter().map(|d| d.disk.clone()).collect(),
        None,
    )
    .unwrap();
    let machine = Arc::new(TestMachine {
        state: Mutex::new(VmState::Running),
    });
    let control = Control::new(machine.clone(), disks.clone(), Some(Arc::new(tree)));
    let socket = dir.path().join("api.sock");
    let server = ApiServer::start(&socket, Arc::new(control)).unwrap();
    let client = ApiClient::new(&socket).unwrap();
    Fixture {
        dir,
        server,
        client,
        machine,
        disks,
    }
}

fn fault(response: &client::RawResponse) -> String {
    let fault: types::Fault = serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not a fault body ({e}): {}", response.body));
    assert!(!fault.fault_message.is_empty());
    fault.fault_message
}

fn wait_job(client: &ApiClient, disk: &str, done: impl Fn(&JobInfo) -> bool) -> JobInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job: JobInfo = client.get(&format!("/disks/{disk}/job")).unwrap();
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job did not finish: {job:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A socket bound before its VM exists answers nothing until served, then answers the
/// clients that connected meanwhile; one never served goes away with its socket.
#[test]
fn a_bound_server_answers_early_clients_once_served() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let pending = ApiServer::bind(&socket).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server on the same socket is refused while the first holds it.
    assert!(matches!(
        ApiServer::bind(&socket),
        Err(Error::SocketInUse { .. })
    ));
    let mut early = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    early
        .write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    early
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        early.read(&mut byte).is_err(),
        "answered before the server was given its VM"
    );
    let machine = Arc::new(TestMachine {
        state: Mutex::new(VmState::Running),
    });
    let server = pending
        .serve(Arc::new(Control::new(machine, Vec::new(), None)))
        .unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    early.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"running\""), "{answer}");
    server.stop();
    assert!(!socket.exists());

    let pending = ApiServer::bind(&socket).unwrap();
    let _waiting = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    drop(pending);
    assert!(!socket.exists(), "an unserved socket outlived its server");
}

#[test]
fn vm_info_and_lifecycle() {
    let f = fixture();
    let mode = std::fs::metadata(f.dir.path().join("api.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let info: VmInfo = f.client.get("/vm").unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.disks, 2);
    f.client.call("PUT", "/vm/pause", None::<&()>).unwrap();
    assert_eq!(*f.machine.state.lock(), VmState::Paused);
    let again = f.client.raw("PUT", "/vm/pause", b"").unwrap();
    assert_eq!(again.status, 409);
    fault(&again);
    f.client.call("PUT", "/vm/resume", None::<&()>).unwrap();
    f.client.call("PUT", "/vm/shutdown", None::<&()>).unwrap();
    let info: VmInfo = f.client.get("/vm").unwrap();
    assert_eq!(info.state, VmState::ShuttingDown);
}

#[test]
fn malformed_requests_get_4xx_with_a_message() {
    let f = fixture();
    let cases: &[(&str, &str, &[u8], u16)] = &[
        ("PUT", "/snapshot/disk", b"{not json", 400),
        ("PUT", "/snapshot/disk", b"", 400),
        ("PUT", "/snapshot/disk", br#"{"name":"s","colour":1}"#, 400),
        ("PUT", "/snapshot/disk", br#"{"name":"a/b"}"#, 400),
        (
            "PUT",
            "/snapshot/disk",
            br#"{"name":"s","disks":[{"disk":"vdz"}]}"#,
            404,
        ),
        (
            "PUT",
            "/snapshot/disk",
            br#"{"name":"s","disks":[{"disk":"vda","overlay":"rel.qcow2"}]}"#,
            400,
        ),
        ("PUT", "/disks/vdz/stream", b"", 404),
        ("PUT", "/disks/vda/stream", br#"{"speed":-1}"#, 400),
        (
            "PUT",
            "/disks/vda/stream",
            br#"{"base":"/nonexistent.qcow2"}"#,
            400,
        ),
        ("PUT", "/disks/vda/commit", b"{}", 400),
        (
            "PUT",
            "/disks/vda/commit",
            br#"{"active":true,"top":"/x"}"#,
            400,
        ),
        ("GET", "/disks/vdz", b"", 404),
        ("GET", "/disks/vda/job", b"", 404),
        ("PUT", "/disks/vda/job/cancel", b"", 404),
        ("PUT", "/disks/vda/job/speed", b"{}", 400),
        ("PUT", "/vm/pause", b"[1]", 400),
        ("DELETE", "/vm", b"", 405),
        ("POST", "/disks/vda/stream", b"", 405),
        ("GET", "/nope", b"", 404),
        ("GET", "/vm/extra/segments", b"", 404),
    ];
    for (method, path, body, status) in cases {
        let response = f.client.raw(method, path, body).unwrap();
        assert_eq!(
            response.status,
            *status,
            "{method} {path} {:?}: {}",
            String::from_utf8_lossy(body),
            response.body
        );
        fault(&response);
    }
    let huge = vec![b' '; server::MAX_BODY + 1];
    assert_eq!(
        f.client.raw("PUT", "/snapshot/disk", &huge).unwrap().status,
        413
    );
    let info: VmInfo = f.client.get("/vm").unwrap();
    assert_eq!(info.state, VmState::Running);
}

#[test]
fn snapshot_stream_and_active_commit() {
    let f = fixture();
    let vda = f.disks[0].disk.clone();
    vda.write_at(b"before", 0).unwrap();
    let result: SnapshotResult = f
        .client
        .call_json(
            "PUT",
            "/snapshot/disk",
            Some(&serde_json::json!({"name": "s1", "atomic": true})),
        )
        .unwrap();
    assert_eq!(result.disks.len(), 2);
    let overlay = f.dir.path().join("vda.s1.qcow2");
    assert_eq!(result.disks[0].overlay, overlay.display().to_string());
    assert_eq!(vda.top().path(), overlay.as_path());
    assert_eq!(
        f.disks[1].disk.top().path(),
        f.dir.path().join("vdb.s1.qcow2").as_path(),
        "atomic: vdb rolled back too"
    );
    vda.write_at(b"after!", 4096).unwrap();

    // A second snapshot onto an existing file is refused and changes nothing.
    let body = serde_json::json!({
        "name": "s2",
        "atomic": true,
        "disks": [{"disk": "vdb"}, {"disk": "vda", "overlay": overlay}],
    });
    let again = f
        .client
        .raw("PUT", "/snapshot/disk", body.to_string().as_bytes())
        .unwrap();
    assert_eq!(again.status, 400, "{}", again.body);
    assert_eq!(vda.top().path(), overlay.as_path());

    let disks: Vec<DiskInfo> = f.client.get("/disks").unwrap();
    assert_eq!(disks[0].backing_chain.len(), 1);
    assert_eq!(disks[0].format, "qcow2");

    let job: JobInfo = f
        .client
        .call_json("PUT", "/disks/vda/stream", None::<&()>)
        .unwrap();
    assert_eq!(job.kind, "stream");
    let job = wait_job(&f.client, "vda", |j| j.status == "concluded");
    assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
    let late = f.client.raw("PUT", "/disks/vda/job/cancel", b"").unwrap();
    assert_eq!(late.status, 409, "{}", late.body);
    let disk: DiskInfo = f.client.get("/disks/vda").unwrap();
    assert!(disk.backing_chain.is_empty());

    // Active commit of vdb into its base, then pivot.
    f.disks[1].disk.write_at(b"vdb data", 0).unwrap();
    let job: JobInfo = f
        .client
        .call_json(
            "PUT",
            "/disks/vdb/commit",
            Some(&serde_json::json!({"active": true})),
        )
        .unwrap();
    assert_eq!(job.kind, "active-commit");
    let busy = f.client.raw("PUT", "/disks/vdb/stream", b"").unwrap();
    assert_eq!(busy.status, 409, "{}", busy.body);
    let job: JobInfo = f
        .client
        .call_json(
            "PUT",
            "/disks/vdb/job/speed",
            Some(&serde_json::json!({"speed": 0})),
        )
        .unwrap();
    assert_eq!(job.speed, 0);
    wait_job(&f.client, "vdb", |j| j.status == "ready");
    f.client
        .call("PUT", "/disks/vdb/job/complete", None::<&()>)
        .unwrap();
    let job = wait_job(&f.client, "vdb", |j| j.status == "concluded");
    assert_eq!(job.outcome.as_deref(), Some("completed"), "{job:?}");
    let vdb = &f.disks[1].disk;
    assert_eq!(vdb.top().path(), f.dir.path().join("vdb.qcow2").as_path());
    let mut back = [0u8; 8];
    vdb.read_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"vdb data");
}

#[test]
fn openapi_document_matches_the_server() {
    let text = include_str!("../../docs/openapi.json");
    let document: serde_json::Value = serde_json::from_str(text).unwrap();
    let paths = document["paths"].as_object().expect("paths");
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "put", "post", "patch", "delete"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "docs/openapi.json and ROUTES differ");

    let f = fixture();
    for (method, path) in &documented {
        let concrete = path.replace("{disk}", "vda").replace("{name}", "none");
        let response = f.client.raw(method, &concrete, b"").unwrap();
        assert!(
            response.status != 404 || concrete.contains("/job") || concrete.contains("snapshot"),
            "{method} {path}: {} {}",
            response.status,
            response.body
        );
        assert_ne!(response.status, 405, "{method} {path}");
        if response.status == 404 {
            // Only "this disk has no job" or "no such snapshot" may be 404 on a documented path.
            let message = fault(&response);
            assert!(
                message.contains("no block job")
                    || message.contains("no snapshot named")
                    || message.contains("no current snapshot"),
                "{method} {path}: {message}"
            );
        }
        if response.status >= 400 {
            fault(&response);
        }
        for other in ["GET", "PUT", "POST", "PATCH", "DELETE"] {
            if !documented.contains(&(other.to_string(), path.clone())) {
                let response = f.client.raw(other, &concrete, b"").unwrap();
                assert_eq!(response.status, 405, "{other} {path}");
            }
        }
    }
    for undocumented in ["/", "/vms", "/vm/reboot", "/disks/vda/job/x", "/snapshot"] {
        let response = f.client.raw("GET", undocumented, b"").unwrap();
        assert_eq!(response.status, 404, "{undocumented}");
        let response = f.client.raw("PUT", undocumented, b"").unwrap();
        assert_eq!(response.status, 404, "{undocumented}");
    }
}

#[test]
fn stopping_the_server_cancels_running_jobs() {
    let f = fixture();
    let vda = f.disks[0].disk.clone();
    // A stream copies 1 MiB per throttle slice: data in two MiBs makes it wait.
    vda.write_at(&[7; 65536], 0).unwrap();
    vda.write_at(&[7; 65536], 2 << 20).unwrap();
    f.client
        .call(
            "PUT",
            "/snapshot/disk",
            Some(&serde_json::json!({"name": "s"})),
        )
        .unwrap();
    let job: JobInfo = f
        .client
        .call_json(
            "PUT",
            "/disks/vda/stream",
            Some(&serde_json::json!({"speed": 1})),
        )
        .unwrap();
    assert_ne!(job.status, "concluded");
    assert!(vda.owner().is_some());
    f.server.stop();
    assert!(vda.owner().is_none(), "the job let go of the disk");
    assert!(!f.dir.path().join("api.sock").exists());
    assert!(
        vda.top().backing().is_some(),
        "cancelled: the chain is unchanged"
    );
}

#[test]
fn snapshot_tree_routes() {
    use crate::types::{SnapshotDeleteResult, SnapshotInfo};
    let f = fixture();
    let vda = f.disks[0].disk.clone();
    vda.write_at(b"first", 0).unwrap();
    let info: SnapshotInfo = f
        .client
        .call_json(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({"name": "one two", "description": "d", "disk_only": true})),
        )
        .unwrap();
    assert_eq!(info.kind, snapshot::tree::SnapshotKind::ExternalDiskOnly);
    assert_eq!(info.disks.len(), 2);
    // Memory needs a VM that can save it; names are unique and checked.
    for (body, status) in [
        (serde_json::json!({"name": "m"}), 400),
        (
            serde_json::json!({"name": "one two", "disk_only": true}),
            409,
        ),
        (serde_json::json!({"name": "a/b", "disk_only": true}), 400),
        (
            serde_json::json!({"name": "x", "disk_only": true, "colour": 1}),
            400,
        ),
    ] {
        let response = f
            .client
            .raw("PUT", "/snapshots", body.to_string().as_bytes())
            .unwrap();
        assert_eq!(response.status, status, "{body}: {}", response.body);
        fault(&response);
    }
    vda.write_at(b"second", 0).unwrap();
    let info: SnapshotInfo = f
        .client
        .call_json(
            "PUT",
            "/snapshots",
            Some(&serde_json::json!({"name": "int", "disk_only": true, "internal": true})),
        )
        .unwrap();
    assert_eq!(info.parent.as_deref(), Some("one two"));
    let list: Vec<SnapshotInfo> = f.client.get("/snapshots").unwrap();
    assert_eq!(list.len(), 2);
    let current: SnapshotInfo = f.client.get("/current-snapshot").unwrap();
    assert_eq!(current.name, "int");
    let one: SnapshotInfo = f.client.get("/snapshots/one%20two").unwrap();
    assert_eq!(one.description.as_deref(), Some("d"));
    let reverted: SnapshotInfo = f
        .client
        .call_json("PUT", "/snapshots/one%20two/revert", None::<&()>)
        .unwrap();
    assert_eq!(reverted.name, "one two");
    let mut back = [0u8; 5];
    vda.read_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"first");
    let missing = f.client.raw("PUT", "/snapshots/nope/revert", b"").unwrap();
    assert_eq!(missing.status, 404);
    let bad = f.client.raw("GET", "/snapshots/%zz", b"").unwrap();
    assert_eq!(bad.status, 400);
    let deleted: SnapshotDeleteResult = f
        .client
        .call_json(
            "PUT",
            "/snapshots/one%20two/delete",
            Some(&serde_json::json!({"children": true})),
        )
        .unwrap();
    assert_eq!(deleted.deleted, ["int", "one two"]);
    let list: Vec<SnapshotInfo> = f.client.get("/snapshots").unwrap();
    assert!(list.is_empty());
    assert_eq!(
        f.client
            .raw("GET", "/current-snapshot", b"")
            .unwrap()
            .status,
        404
    );
    let jobs: Vec<JobInfo> = f.client.get("/snapshot-jobs").unwrap();
    assert!(jobs.is_empty());
    vda.read_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"first");
}
