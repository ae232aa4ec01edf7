//! Quiesced snapshots through a guest agent (issue 16).
//!
//! - A real Linux under QEMU-TCG on our vhost-user-blk daemon, with Debian's qemu-ga in the
//!   initramfs (scripts/build-initramfs.sh) on QEMU's `org.qemu.guest_agent.0` port, writing
//!   files on ext4 in a tight loop: `snapshot-create-as --quiesce` snapshots through
//!   `snapvmm ctl`, whose frozen images hold a clean ext4 (no journal recovery needed, and
//!   `e2fsck -fn` passes); one snapshot without `--quiesce` under the same load, reported
//!   (its image normally needs recovery: the point of the feature); a quiesced snapshot that
//!   fails after the freeze leaves the guest thawed (`agent-status` asks qemu-ga); the guest
//!   sees no error and every checksum verifies at the end.
//! - The daemon with an agent that is missing, hangs or answers garbage: `--quiesce` fails
//!   with a clear error, `--quiesce-best-effort` snapshots anyway (no QEMU needed).
//!
//! The QEMU test skips (printing why) without qemu-system-x86_64, qemu-img, mkfs.ext4, e2fsck,
//! dumpe2fs or a guest fixture, unless `SNAPVMM_REQUIRE_QEMU=1`.
//! `SNAPVMM_QUIESCE_ROUNDS=N` takes N quiesced snapshots (default 4) for the frozen-time
//! figures it prints.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const DISK_MIB: u64 = 128;
const MEMORY_MIB: u64 = 256;

fn required() -> bool {
    std::env::var("SNAPVMM_REQUIRE_QEMU").as_deref() == Ok("1")
}

fn skip(test: &str, reason: &str) {
    if required() {
        panic!("{test}: SNAPVMM_REQUIRE_QEMU=1 but {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

fn tool_runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The kernel and initramfs, built (or found cached) by the repository's script.
fn guest_fixture() -> Result<(PathBuf, PathBuf), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-initramfs.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let initramfs = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let kernel = initramfs.with_file_name("vmlinuz");
    if initramfs.is_file() && kernel.is_file() {
        Ok((kernel, initramfs))
    } else {
        Err(format!(
            "{} or {} missing",
            kernel.display(),
            initramfs.display()
        ))
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `snapvmm ctl` with `args`: its status, stdout and stderr.
fn ctl_raw(api: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_snapvmm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run snapvmm ctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ctl(api: &Path, args: &[&str]) -> String {
    let (ok, out, err) = ctl_raw(api, args);
    assert!(ok, "snapvmm ctl {} failed:\n{out}{err}", args.join(" "));
    out
}

fn ctl_json(api: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    serde_json::from_str(&ctl(api, &full)).expect("ctl --json prints JSON")
}

/// Kills a child process the test still owns when it ends.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for_path(path: &Path, process: &mut Owned) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = process.0.try_wait().unwrap() {
            panic!("exited ({status}) before creating {}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon serving `image`, its API on `api`, its guest agent at `agent`.
fn daemon(dir: &Path, image: &Path, agent: &Path) -> (Owned, PathBuf, PathBuf) {
    let socket = dir.join("blk.sock");
    let api = dir.join("api.sock");
    let mut daemon = Owned(
        Command::new(env!("CARGO_BIN_EXE_snapvmm"))
            .arg("vhost-user-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(format!("path={}", image.display()))
            .arg("--api-socket")
            .arg(&api)
            .arg("--guest-agent")
            .arg(agent)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
            .spawn()
            .expect("spawn snapvmm vhost-user-blk"),
    );
    wait_for_path(&socket, &mut daemon);
    wait_for_path(&api, &mut daemon);
    (daemon, socket, api)
}

fn stop_daemon(mut daemon: Owned, api: &Path, dir: &Path) {
    ctl(api, &["shutdown"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(status.success(), "daemon ended with {status}:\n{log}");
}

/// The daemon with an agent that is missing, never answers, or answers garbage: a quiesced
/// snapshot fails naming the agent and switches nothing; a best-effort one is taken.
#[test]
fn quiesce_without_a_working_agent_fails_or_proceeds_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "4M"],
    );
    let agent = dir.path().join("qga.sock");
    let (daemon, _socket, api) = daemon(dir.path(), &image, &agent);
    for case in ["missing", "hanging", "garbage"] {
        let _agent = match case {
            "missing" => None,
            behaviour => Some(fake_agent(&agent, behaviour == "garbage")),
        };
        let name = format!("{case}-q");
        let before = ctl(&api, &["domblklist"]);
        let (ok, out, err) = ctl_raw(
            &api,
            &["snapshot-create-as", &name, "--disk-only", "--quiesce"],
        );
        assert!(!ok, "{case}: a quiesced snapshot succeeded:\n{out}");
        assert!(err.contains("guest agent"), "{case}: {err}");
        assert_eq!(
            ctl(&api, &["domblklist"]),
            before,
            "{case}: the disk was switched"
        );
        let name = format!("{case}-be");
        let result = ctl_json(
            &api,
            &[
                "snapshot-create-as",
                &name,
                "--disk-only",
                "--quiesce",
                "--quiesce-best-effort",
            ],
        );
        assert_eq!(result["name"], name.as_str());
        assert!(result.get("frozen_us").is_none(), "{case}: {result}");
        let _ = std::fs::remove_file(&agent);
    }
    let chain = ctl(&api, &["domblklist"]);
    assert!(chain.contains("garbage-be"), "{chain}");
    stop_daemon(daemon, &api, dir.path());
}

/// A stand-in agent on `path`: accepts connections, reads, and never answers (or answers
/// garbage), for the life of the returned listener thread's socket.
fn fake_agent(path: &Path, garbage: bool) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if garbage {
                        let _ = stream.write_all(b"\xff{not json\n{\"return\": \"x\"}\n");
                    }
                }
            });
        }
    })
}

/// A QEMU guest on the daemon's socket with the agent's port on `agent`.
fn boot(kernel: &Path, initramfs: &Path, socket: &Path, agent: &Path, console: &Path) -> Owned {
    Owned(
        Command::new("qemu-system-x86_64")
            .args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2"])
            .args(["-m", &MEMORY_MIB.to_string()])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
                "-machine",
                "memory-backend=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=blk,path={}", socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=blk,num-queues=1"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga,path={},server=on,wait=off",
                agent.display()
            ))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=-1 snapvmm.workload=ext4-write-verify",
            ])
            .args([
                "-nographic",
                "-nodefaults",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(console).unwrap())
            .stderr(std::fs::File::create(console.with_extension("stderr")).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64"),
    )
}

fn console_text(console: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned()
}

/// Waits until the console shows `needle`.
fn wait_console(qemu: &mut Owned, console: &Path, needle: &str, deadline: Instant) {
    loop {
        let text = console_text(console);
        if text.contains(needle) {
            return;
        }
        if let Some(status) = qemu.0.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(console.with_extension("stderr"));
            panic!(
                "QEMU exited ({status}) before {needle:?}; console:\n{text}\nstderr:\n{}",
                stderr.unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in time; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The highest "round N" the guest printed.
fn last_round(console: &Path) -> u64 {
    console_text(console)
        .lines()
        .filter_map(|l| l.strip_prefix("snapvmm: ext4-write-verify round "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Whether the ext4 in `image` (a qcow2 chain, flattened to raw) needs journal recovery;
/// `e2fsck -fn` must pass when it does not.
fn needs_recovery(image: &Path, scratch: &Path) -> bool {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    );
    let header = run_ok("dumpe2fs", &["-h", scratch.to_str().unwrap()]);
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string();
    let recovery = features.contains("needs_recovery");
    if !recovery {
        run_ok("e2fsck", &["-fn", scratch.to_str().unwrap()]);
    }
    std::fs::remove_file(scratch).unwrap();
    recovery
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[test]
fn linux_quiesced_snapshots_through_qemu_ga_hold_clean_ext4() {
    let test = "linux_quiesced_snapshots_through_qemu_ga_hold_clean_ext4";
    if !tool_runs("qemu-system-x86_64", "--version") {
        return skip(test, "qemu-system-x86_64 not found");
    }
    for (tool, arg) in [
        ("qemu-img", "--version"),
        ("mkfs.ext4", "-V"),
        ("e2fsck", "-V"),
        ("dumpe2fs", "-V"),
    ] {
        if !tool_runs(tool, arg) {
            return skip(test, &format!("{tool} not found"));
        }
    }
    let (kernel, initramfs) = match guest_fixture() {
        Ok(fixture) => fixture,
        Err(reason) => return skip(test, &format!("no guest fixture: {reason}")),
    };
    let rounds: usize = std::env::var("SNAPVMM_QUIESCE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4)
        .max(1);

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let raw = path("fs.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", raw.to_str().unwrap()]);
    let base = path("base.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    let agent = path("qga.sock");
    let (daemon, socket, api) = daemon(dir.path(), &base, &agent);

    let started = Instant::now();
    let deadline = started + BOOT_TIMEOUT;
    let console = path("console.log");
    let mut qemu = boot(&kernel, &initramfs, &socket, &agent, &console);
    wait_console(&mut qemu, &console, "snapvmm: guest agent on", deadline);
    wait_console(
        &mut qemu,
        &console,
        "snapvmm: ext4-write-verify round 20",
        deadline,
    );
    eprintln!("{test}: guest writing after {:.1?}", started.elapsed());
    let status = ctl_json(&api, &["agent-status"]);
    assert_eq!(status["fsfreeze"], "thawed", "{status}");

    // Quiesced snapshots under load: each frozen image holds a clean ext4.
    let mut frozen = Vec::new();
    let mut frozen_images = Vec::new();
    for i in 0..rounds {
        let before = last_round(&console);
        let name = format!("q{i}");
        let result = ctl_json(
            &api,
            &["snapshot-create-as", &name, "--disk-only", "--quiesce"],
        );
        let us = result["frozen_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("no frozen_us: {result}"));
        frozen.push(us);
        frozen_images.push(PathBuf::from(
            result["disks"][0]["previous"].as_str().unwrap(),
        ));
        // The guest writes again between snapshots.
        wait_console(
            &mut qemu,
            &console,
            &format!(
                "snapvmm: ext4-write-verify round {}",
                (before / 20 + 1) * 20
            ),
            deadline,
        );
    }
    // The first and the last frozen images, checked in full (each check copies the disk).
    let mut checked = vec![frozen_images[0].clone()];
    if rounds > 1 {
        checked.push(frozen_images[rounds - 1].clone());
    }
    for image in &checked {
        assert!(
            !needs_recovery(image, &path("check.raw")),
            "quiesced image {} needs journal recovery",
            image.display()
        );
    }

    // One snapshot without --quiesce under the same load, for comparison.
    let result = ctl_json(&api, &["snapshot-create-as", "u0", "--disk-only"]);
    let unquiesced = PathBuf::from(result["disks"][0]["previous"].as_str().unwrap());
    let recovery = needs_recovery(&unquiesced, &path("check.raw"));
    eprintln!(
        "{test}: unquiesced snapshot image {} journal recovery",
        if recovery { "needs" } else { "does not need" }
    );

    // A quiesced snapshot failing after the freeze (its overlay's file is in the way): the
    // guest is thawed and keeps writing.
    let top = PathBuf::from(
        ctl_json(&api, &["domblklist"])[0]["source"]
            .as_str()
            .unwrap(),
    );
    let stem = top.file_stem().unwrap().to_string_lossy().into_owned();
    std::fs::write(
        top.with_file_name(format!("{stem}.blocked.qcow2")),
        b"in the way",
    )
    .unwrap();
    let (ok, out, err) = ctl_raw(
        &api,
        &["snapshot-create-as", "blocked", "--disk-only", "--quiesce"],
    );
    assert!(!ok, "the blocked snapshot succeeded:\n{out}");
    eprintln!("{test}: blocked snapshot: {}", err.trim());
    let status = ctl_json(&api, &["agent-status"]);
    assert_eq!(status["fsfreeze"], "thawed", "left frozen: {status}");
    let before = last_round(&console);
    wait_console(
        &mut qemu,
        &console,
        &format!(
            "snapvmm: ext4-write-verify round {}",
            (before / 20 + 1) * 20
        ),
        deadline,
    );

    qemu.0.stdin.as_mut().unwrap().write_all(b"stop\n").unwrap();
    wait_console(&mut qemu, &console, "snapvmm: init: done", deadline);
    let text = console_text(&console);
    assert!(
        text.contains("snapvmm: ext4-write-verify ok"),
        "the guest's checksums did not verify; console:\n{text}"
    );
    assert!(!text.contains("FAILED"), "console:\n{text}");
    let _ = qemu.0.wait();
    stop_daemon(daemon, &api, dir.path());

    frozen.sort_unstable();
    eprintln!(
        "{test}: {rounds} quiesced snapshots, frozen p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (total {:.1?})",
        percentile(&frozen, 50.0) as f64 / 1000.0,
        percentile(&frozen, 99.0) as f64 / 1000.0,
        frozen[rounds - 1] as f64 / 1000.0,
        started.elapsed()
    );
}
