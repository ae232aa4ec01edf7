//! The vsock device in a running VM, with the micro-guest's agent (workload `agent`) at the
//! other end: quiesced snapshots through `snapvmm ctl` and through [`vmm::Control`], the
//! frozen image checked against what the guest had written when it froze, vsock working
//! again after a checkpoint is loaded (the guest saw the transport reset), and a host
//! `CONNECT` to a port nobody listens on refused cleanly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::image::{open_ro, qcow2};
use test_support::require::have_kvm;
use test_support::vm::Snapvmm;
use vmm::agent::AgentEndpoint;
use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig, VsockConfig, Workload};
use vmm::control::types::SnapshotCreate;
use vmm::guest::{fill_pattern, AGENT_PORT, IO_LOOP_CHUNK};
use vmm::RestoreOptions;
use vmm::{Sandbox, SandboxOptions};

/// How long anything may take on a slow software-KVM host.
const TIMEOUT: Duration = Duration::from_secs(60);
/// A small disk: the io-loop's 64 chunks are each rewritten often.
const DISK_SIZE: u64 = 1 << 20;
/// The micro-guest's pattern seed (`snapvmm run`'s default).
const SEED: u64 = 1;

fn snapvmm() -> Snapvmm {
    Snapvmm::new(env!("CARGO_BIN_EXE_snapvmm"))
}

/// Waits until `serial` holds `count` lines starting with `prefix`; returns those lines.
fn wait_lines(serial: &Path, prefix: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        // Only whole lines: the console is read while it is written.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let lines: Vec<String> = complete
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} {prefix:?} line(s) in {TIMEOUT:?}; serial:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the agent printed at a freeze: writes so far, chunks written, digest.
#[derive(Debug, PartialEq, Eq)]
struct Frozen {
    writes: u64,
    chunks: u64,
    digest: u64,
}

/// Parses `agent frozen writes W chunks C digest 0xD`.
fn parse_frozen(line: &str) -> Frozen {
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        let at = words.iter().position(|w| *w == name).expect(line);
        words[at + 1]
    };
    Frozen {
        writes: field("writes").parse().expect(line),
        chunks: field("chunks").parse().expect(line),
        digest: u64::from_str_radix(field("digest").trim_start_matches("0x"), 16).expect(line),
    }
}

/// The digest the agent would print for the data in `image` (its disk 0): each chunk must
/// hold one generation of the pattern, or zeroes if never written.
fn digest_of_image(image: &Path) -> (u64, u64) {
    let disk = open_ro(image);
    let mut digest = 0u64;
    let mut chunks = 0u64;
    let mut data = vec![0u8; IO_LOOP_CHUNK as usize];
    let mut expected = vec![0u8; IO_LOOP_CHUNK as usize];
    for chunk in 0..DISK_SIZE / IO_LOOP_CHUNK {
        let offset = chunk * IO_LOOP_CHUNK;
        disk.read_at(&mut data, offset).unwrap();
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        // Generations only grow by one per write; a few thousand is far beyond this run.
        let generation = (1..10_000u64)
            .find(|&generation| {
                fill_pattern(&mut expected, SEED, 0, generation, offset);
                expected == data
            })
            .unwrap_or_else(|| panic!("chunk {chunk} of {} is torn", image.display()));
        digest = digest.wrapping_add(vmm::guest::agent_digest_term(0, chunk, generation));
        chunks += 1;
    }
    (digest, chunks)
}

/// Checks the last freeze/thaw pair on `serial` (the `n`th of each): no write between them,
/// and `image` holds exactly what the guest had written at the freeze.
fn check_freeze(serial: &Path, n: usize, image: Option<&Path>) {
    let frozen = parse_frozen(&wait_lines(serial, "agent frozen ", n)[n - 1]);
    let thawed = &wait_lines(serial, "agent thawed ", n)[n - 1];
    assert_eq!(
        thawed,
        &format!("agent thawed writes {} frozen writes 0", frozen.writes),
        "a write reached the disk while frozen"
    );
    if let Some(image) = image {
        let (digest, chunks) = digest_of_image(image);
        assert_eq!(
            (chunks, digest),
            (frozen.chunks, frozen.digest),
            "the frozen image {} is not what the guest had written at the freeze",
            image.display()
        );
    }
}

/// A `snapvmm run --guest builtin:agent` child, killed on drop.
struct AgentVm {
    child: Child,
    dir: tempfile::TempDir,
}

impl AgentVm {
    fn start() -> AgentVm {
        let dir = tempfile::tempdir().unwrap();
        qcow2(&dir.path().join("base.qcow2"), DISK_SIZE, None);
        let child = Command::new(env!("CARGO_BIN_EXE_snapvmm"))
            .current_dir(dir.path())
            .args([
                "run",
                "--guest",
                "builtin:agent",
                "--disk",
                "path=base.qcow2",
            ])
            .args(["--vsock", "cid=3,uds=v.sock", "--guest-agent", "vsock:52"])
            .args(["--serial", "serial.log", "--api-socket", "api.sock"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let vm = AgentVm { child, dir };
        wait_lines(&vm.path("serial.log"), "agent listening cid 3 port 52", 1);
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(vm.path("api.sock")).is_err() {
            assert!(Instant::now() < deadline, "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ctl(&self, args: &[&str]) -> String {
        let serial = self.path("serial.log");
        snapvmm().ctl_ok(&self.path("api.sock"), args, || {
            format!(
                "\nserial:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            )
        })
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host program's `CONNECT <port>` on the vsock socket: the device's answer line, or
/// None when the connection was closed instead.
fn host_connect(uds: &Path, line: &[u8]) -> Option<String> {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(line).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) if byte[0] == b'\n' => return Some(String::from_utf8_lossy(&answer).into()),
            Ok(_) => answer.push(byte[0]),
            Err(e) => panic!("reading the vsock socket's answer to {line:?}: {e}"),
        }
    }
}

#[test]
fn quiesced_snapshots_through_ctl_and_after_a_revert() {
    if !have_kvm("vmm_vsock_ctl") {
        return;
    }
    let vm = AgentVm::start();
    let serial = vm.path("serial.log");
    wait_lines(&serial, "io-loop ops ", 2);

    // Nobody listens on port 99: the guest refuses, the host program sees its socket close.
    assert_eq!(host_connect(&vm.path("v.sock"), b"CONNECT 99\n"), None);
    assert_eq!(host_connect(&vm.path("v.sock"), b"HELLO\n"), None);
    let ok = host_connect(
        &vm.path("v.sock"),
        format!("CONNECT {AGENT_PORT}\n").as_bytes(),
    );
    assert!(
        ok.as_deref().is_some_and(|l| l.starts_with("OK ")),
        "{ok:?}"
    );

    let out = vm.ctl(&["snapshot-create-as", "q1", "--disk-only", "--quiesce"]);
    assert!(out.contains("filesystems frozen"), "no frozen time: {out}");
    // base.qcow2 is the image the snapshot froze.
    check_freeze(&serial, 1, Some(&vm.path("base.qcow2")));
    let status = vm.ctl(&["agent-status"]);
    assert!(
        status.contains("thawed") && status.contains("q1"),
        "{status}"
    );

    // A snapshot with memory, loaded back: the guest hears the transport reset and its
    // agent takes connections again.
    wait_lines(&serial, "io-loop ops ", 4);
    vm.ctl(&["snapshot-create-as", "m1", "with memory"]);
    vm.ctl(&["snapshot-revert", "m1"]);
    wait_lines(&serial, "vsock transport reset", 1);
    let out = vm.ctl(&["snapshot-create-as", "q2", "--disk-only", "--quiesce"]);
    assert!(out.contains("filesystems frozen"), "no frozen time: {out}");
    check_freeze(&serial, 2, None);
    vm.ctl(&["shutdown"]);
}

#[test]
fn quiesce_through_control_survives_a_restore_and_the_guest_verifies() {
    if !have_kvm("vmm_vsock_control") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2(&base, DISK_SIZE, None);
    let uds = dir.path().join("v.sock");
    let serial = dir.path().join("serial.log");
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::Agent,
        seed: SEED,
    });
    config.disks.push(DiskConfig::new(&base));
    config.serial = SerialOutput::File(serial.clone());
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds: uds.clone(),
    });
    let options = SandboxOptions {
        guest_agent: Some(AgentEndpoint::Vsock {
            uds: uds.clone(),
            port: AGENT_PORT,
        }),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(&config, &options).unwrap();
    wait_lines(&serial, "io-loop ops ", 2);
    let snapshot = |control: &vmm::Control, name: &str| {
        control
            .disk_snapshot(&SnapshotCreate {
                name: name.into(),
                description: None,
                disks: None,
                atomic: true,
                quiesce: true,
                quiesce_best_effort: false,
            })
            .unwrap()
    };
    let result = snapshot(sandbox.control(), "q1");
    assert!(result.frozen_us.is_some_and(|us| us > 0), "{result:?}");
    check_freeze(&serial, 1, Some(&base));

    // Paused, saved, stopped: the disks stay as the checkpoint saw them.
    let control = sandbox.control().clone();
    control.pause().unwrap();
    let checkpoint = dir.path().join("ckpt");
    control
        .checkpoint_save(&vmm::control::types::CheckpointRequest {
            dir: checkpoint.clone(),
            live: false,
            incremental: false,
            replace: false,
        })
        .unwrap();
    drop(control);
    sandbox.stop().unwrap();

    // Restored on another socket: the guest hears the reset, its agent answers again.
    let uds2 = dir.path().join("v2.sock");
    let serial2 = dir.path().join("serial2.log");
    let out = Box::new(std::fs::File::create(&serial2).unwrap());
    let restore = RestoreOptions {
        vsock_uds: Some(uds2.clone()),
        ..Default::default()
    };
    let vm = vmm::Vmm::restore_with(&checkpoint, out, false, restore).unwrap();
    assert_eq!(
        vm.config().vsock.as_ref().map(|v| v.uds.clone()),
        Some(uds2.clone())
    );
    let options = SandboxOptions {
        guest_agent: Some(AgentEndpoint::Vsock {
            uds: uds2,
            port: AGENT_PORT,
        }),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::with_vmm(vm, &options).unwrap();
    wait_lines(&serial2, "vsock transport reset", 1);
    let result = snapshot(sandbox.control(), "q2");
    assert!(result.frozen_us.is_some(), "{result:?}");
    check_freeze(&serial2, 1, None);

    // The guest reads back everything it wrote, across the snapshots and the restore.
    wait_lines(&serial2, "io-loop ops ", 1);
    vmm::guest::request_finish(sandbox.vmm().memory()).unwrap();
    let verdict = wait_lines(&serial2, "io-loop verify ", 1);
    assert!(verdict[0].starts_with("io-loop verify ok"), "{verdict:?}");
    sandbox.wait().unwrap();
}
