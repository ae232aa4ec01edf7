//! Checkpoints of micro-guest VMs: save, revert in place, restore in a new VM or process,
//! diff chains and merges, live checkpoints, streams, and refusal of damaged files.
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::console::Console;
use test_support::require::have_kvm;
use test_support::vm::{counters, last_counter};
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::snapshot::checkpoint::{memory_path, state_path, MemoryFile, PAGE_SIZE};
use vmm::snapshot::vm_state::VmState;
use vmm::{CheckpointOptions, RestoreOptions, ShellPool, ShellShape, ShellSource, VmShell, Vmm};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Asserts `text` counts 1, 2, 3, ... with no gap or repeat, and returns the last value.
fn assert_contiguous(text: &str) -> u64 {
    let values = counters(text);
    for (i, &v) in values.iter().enumerate() {
        assert_eq!(v, i as u64 + 1, "counter sequence broken at {i}:\n{text}");
    }
    values.last().copied().unwrap_or(0)
}

fn counter_config(vcpus: u8, memory_mib: u64) -> VmConfig {
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::Counter,
        seed: 1,
    });
    config.vcpus = vcpus;
    config.memory_mib = memory_mib;
    config
}

fn start(config: &VmConfig) -> (Vmm, Console) {
    let console = Console::default();
    let vmm = Vmm::start_with_serial(config, Box::new(console.clone())).expect("start the VM");
    (vmm, console)
}

/// How a test restores a checkpoint: every restore test runs both ways.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// `Vmm::restore`: the VM built from scratch.
    Cold,
    /// Into a ready VM shell from a pool kept for the checkpoint's shape.
    Pool,
}

const WAYS: [Way; 2] = [Way::Cold, Way::Pool];

/// Restores `checkpoint` (a VM of `shape`) the `way` asked, its console to `console`.
fn restore(way: Way, checkpoint: &Path, shape: ShellShape, console: &Console, paused: bool) -> Vmm {
    let serial = Box::new(console.clone());
    match way {
        Way::Cold => Vmm::restore(checkpoint, serial, paused).unwrap(),
        Way::Pool => {
            let pool = Arc::new(ShellPool::new(&[(shape, 1)]).unwrap());
            assert!(pool.wait_full(TIMEOUT), "the pool never filled");
            let options = RestoreOptions {
                shell: ShellSource::Pool(pool.clone()),
                ..Default::default()
            };
            let vmm = Vmm::restore_with(checkpoint, serial, paused, options).unwrap();
            // The restore took the pool's shell (it did not fall back to a cold build).
            assert_eq!(pool.stats().taken, 1, "{:?}", pool.stats());
            vmm
        }
    }
}

/// Runs a 32 MiB counter guest on `vcpus` until its third counter, pauses it, checkpoints it
/// into `checkpoint` and stops it: the console text up to the pause and its last counter.
fn checkpointed_counter(vcpus: u8, checkpoint: &Path) -> (String, u64) {
    let (vmm, console) = start(&counter_config(vcpus, 32));
    console.wait(0, "3 counters", |t| last_counter(t) >= 3);
    let saved_text = pause(&vmm, &console);
    let saved = assert_contiguous(&saved_text);
    vmm.checkpointer()
        .checkpoint(checkpoint, CheckpointOptions::default())
        .unwrap();
    vmm.stop().unwrap();
    (saved_text, saved)
}

/// Waits for three counters on a restored VM's `console` and checks they carry on from the
/// checkpointed `saved_text` (whose last counter is `saved`).
fn assert_counts_on(saved_text: &str, saved: u64, console: &Console, what: &str) {
    console.wait(0, "counters after restore", |t| counters(t).len() >= 3);
    let last = assert_contiguous(&(saved_text.to_string() + &console.text()));
    assert!(last >= saved + 2, "{what}");
}

/// Pauses the VM and returns the console text up to the pause.
fn pause(vmm: &Vmm, console: &Console) -> String {
    vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
    console.text()
}

#[test]
fn counter_continues_after_revert_in_place() {
    if !have_kvm("counter_continues_after_revert_in_place") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("c1");
    let (vmm, console) = start(&counter_config(1, 32));
    console.wait(0, "3 counters", |t| last_counter(t) >= 3);
    let saved_text = pause(&vmm, &console);
    let saved = assert_contiguous(&saved_text);
    let report = vmm
        .checkpointer()
        .checkpoint(&checkpoint, CheckpointOptions::default())
        .unwrap();
    assert!(
        report.pages_written > 0 && report.pages_written < 32 * 256,
        "{report:?}"
    );
    vmm.pause_gate().resume();
    console.wait(0, "counting on", |t| last_counter(t) >= saved + 4);

    for _ in 0..3 {
        vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
        let mark = console.len();
        vmm.checkpointer().revert(&checkpoint).unwrap();
        vmm.pause_gate().resume();
        console.wait(mark, "counters after the revert", |t| {
            counters(t).len() >= 2
        });
        // The console after the revert continues the text as it was at the checkpoint.
        let last = assert_contiguous(&(saved_text.clone() + &console.since(mark)));
        assert!(last > saved);
    }
    vmm.stop().unwrap();
}

#[test]
fn counter_continues_in_a_new_vm_on_two_vcpus() {
    if !have_kvm("counter_continues_in_a_new_vm_on_two_vcpus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("c1");
    let (saved_text, saved) = checkpointed_counter(2, &checkpoint);
    assert!(
        saved_text.starts_with("micro-guest: cpus 2"),
        "{saved_text}"
    );

    let shape = ShellShape {
        memory_mib: 32,
        vcpus: 2,
    };
    for way in WAYS {
        let restored_console = Console::default();
        let restored = restore(way, &checkpoint, shape, &restored_console, false);
        assert_counts_on(&saved_text, saved, &restored_console, &format!("{way:?}"));
        restored.stop().unwrap();
    }
}

#[test]
fn a_shell_of_another_shape_is_refused_and_a_pool_without_one_builds_cold() {
    if !have_kvm("a_shell_of_another_shape_is_refused_and_a_pool_without_one_builds_cold") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("c1");
    let (saved_text, saved) = checkpointed_counter(1, &checkpoint);

    // A given shell must fit: other memory size, other vCPU count.
    for shape in [
        ShellShape {
            memory_mib: 64,
            vcpus: 1,
        },
        ShellShape {
            memory_mib: 32,
            vcpus: 2,
        },
    ] {
        let options = RestoreOptions {
            shell: ShellSource::Shell(VmShell::new(shape).unwrap()),
            ..Default::default()
        };
        let err = Vmm::restore_with(&checkpoint, Box::new(std::io::sink()), false, options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the VM shell holds") && err.contains("32 MiB, 1 vCPU"),
            "{err}"
        );
    }

    // A pool keeping only other shapes hands out nothing: the restore builds its VM cold.
    let other = ShellShape {
        memory_mib: 64,
        vcpus: 1,
    };
    let pool = Arc::new(ShellPool::new(&[(other, 1)]).unwrap());
    assert!(pool.wait_full(TIMEOUT));
    let restored_console = Console::default();
    let options = RestoreOptions {
        shell: ShellSource::Pool(pool.clone()),
        ..Default::default()
    };
    let restored = Vmm::restore_with(
        &checkpoint,
        Box::new(restored_console.clone()),
        false,
        options,
    )
    .unwrap();
    assert_eq!(pool.stats().taken, 0);
    assert_eq!(pool.ready(other), 1);
    assert_counts_on(&saved_text, saved, &restored_console, "cold, beside a pool");
    restored.stop().unwrap();
}

/// Every byte of guest RAM (as the memory file lays it out).
fn memory_bytes(vmm: &Vmm) -> Vec<u8> {
    use vmm::vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let memory = vmm.memory();
    let mut bytes = Vec::new();
    for region in memory.iter() {
        let mut chunk = vec![0u8; region.len() as usize];
        memory.read_slice(&mut chunk, region.start_addr()).unwrap();
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

/// The guest memory a full checkpoint's memory file holds.
fn file_bytes(dir: &Path) -> Vec<u8> {
    let manifest = vmm::snapshot::checkpoint::state_file::read(&state_path(dir)).unwrap();
    let total = manifest.memory.total_bytes();
    let file = MemoryFile::open(&memory_path(dir), manifest.id, total).unwrap();
    let mut bytes = vec![0u8; total as usize];
    file.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// The first page where `a` and `b` differ, the VM generation ID aside: every load of a
/// checkpoint writes a new one on purpose (`vmm::devices::vmgenid`).
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    let genid = vmm::arch::x86_64::layout::VMGENID_ADDR as usize;
    let genid = genid..genid + vmm::devices::vmgenid::VMGENID_LEN;
    a.iter()
        .zip(b)
        .enumerate()
        .position(|(i, (x, y))| x != y && !genid.contains(&i))
        .map(|i| i as u64 / PAGE_SIZE)
}

#[test]
fn diff_chains_restore_to_the_same_memory_as_a_full_checkpoint() {
    if !have_kvm("diff_chains_restore_to_the_same_memory_as_a_full_checkpoint") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, full, merged) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
        dir.path().join("full"),
        dir.path().join("merged"),
    );
    let (vmm, console) = start(&counter_config(1, 32));
    let checkpointer = vmm.checkpointer();
    console.wait(0, "2 counters", |t| last_counter(t) >= 2);

    // Without a base an incremental checkpoint is refused.
    let err = checkpointer
        .checkpoint(
            &a,
            CheckpointOptions {
                incremental: true,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a base"), "{err}");

    checkpointer
        .checkpoint(&a, CheckpointOptions::default())
        .unwrap();
    let incremental = CheckpointOptions {
        incremental: true,
        ..Default::default()
    };
    let n = last_counter(&console.text());
    console.wait(0, "more counters", |t| last_counter(t) >= n + 2);
    let report_b = checkpointer.checkpoint(&b, incremental).unwrap();
    assert!(report_b.base.is_some());
    let n = last_counter(&console.text());
    console.wait(0, "more counters", |t| last_counter(t) >= n + 2);
    let saved_text = pause(&vmm, &console);
    let report_c = checkpointer.checkpoint(&c, incremental).unwrap();
    // A diff holds what changed: far less than the full checkpoint.
    let report_full = checkpointer
        .checkpoint(&full, CheckpointOptions::default())
        .unwrap();
    assert!(
        report_c.pages_written < report_full.pages_written,
        "diff {report_c:?} full {report_full:?}"
    );
    let expected = memory_bytes(&vmm);
    assert!(first_difference(&expected, &file_bytes(&full)).is_none());

    // Merged, the chain holds exactly what the full checkpoint holds.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_snapvmm"))
        .args(["checkpoint", "merge"])
        .arg(&c)
        .arg(&merged)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(first_difference(&expected, &file_bytes(&merged)), None);
    vmm::snapshot::checkpoint::verify_chain(&c).unwrap();
    vmm::snapshot::checkpoint::verify_chain(&merged).unwrap();

    // Reverting the running VM to the chain gives the same memory, and it counts on.
    vmm.pause_gate().resume();
    console.wait(0, "more counters", |t| last_counter(t) >= n + 4);
    vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
    let mark = console.len();
    checkpointer.revert(&c).unwrap();
    assert_eq!(first_difference(&expected, &memory_bytes(&vmm)), None);
    vmm.pause_gate().resume();
    console.wait(mark, "counters after the revert", |t| {
        counters(t).len() >= 2
    });
    assert_contiguous(&(saved_text.clone() + &console.since(mark)));
    vmm.stop().unwrap();

    let shape = ShellShape {
        memory_mib: 32,
        vcpus: 1,
    };
    for way in WAYS {
        // So does a new VM restored from the chain, paused before its first instruction.
        let restored_console = Console::default();
        let restored = restore(way, &c, shape, &restored_console, true);
        assert_eq!(
            first_difference(&expected, &memory_bytes(&restored)),
            None,
            "{way:?}"
        );
        restored.pause_gate().resume();
        restored_console.wait(0, "counters after restore", |t| counters(t).len() >= 2);
        assert_contiguous(&(saved_text.clone() + &restored_console.text()));

        // An incremental checkpoint of the restored VM (its base: the chain it came from)
        // holds what a full one holds.
        let (d, full2, merged2) = (
            dir.path().join(format!("d-{way:?}")),
            dir.path().join(format!("full2-{way:?}")),
            dir.path().join(format!("merged2-{way:?}")),
        );
        restored.pause_gate().pause(Duration::from_secs(5)).unwrap();
        let report_d = restored.checkpointer().checkpoint(&d, incremental).unwrap();
        assert!(report_d.base.is_some(), "{report_d:?}");
        restored
            .checkpointer()
            .checkpoint(&full2, CheckpointOptions::default())
            .unwrap();
        let written = memory_bytes(&restored);
        assert_eq!(first_difference(&written, &file_bytes(&full2)), None);
        vmm::snapshot::checkpoint::merge::merge_chain(&d, &merged2).unwrap();
        assert_eq!(first_difference(&written, &file_bytes(&merged2)), None);
        restored.stop().unwrap();
    }
}

#[test]
fn live_checkpoints_and_streams_restore_the_counter() {
    if !have_kvm("live_checkpoints_and_streams_restore_the_counter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (live, live_diff) = (dir.path().join("live"), dir.path().join("live-diff"));
    let (vmm, console) = start(&counter_config(1, 64));
    let checkpointer = vmm.checkpointer();
    console.wait(0, "2 counters", |t| last_counter(t) >= 2);
    let report = checkpointer
        .checkpoint(
            &live,
            CheckpointOptions {
                live: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(report.live_rounds >= 1, "{report:?}");
    assert!(
        !vmm.pause_gate().is_paused(),
        "a live checkpoint leaves the VM running"
    );
    let n = last_counter(&console.text());
    console.wait(0, "more counters", |t| last_counter(t) >= n + 2);
    let report = checkpointer
        .checkpoint(
            &live_diff,
            CheckpointOptions {
                live: true,
                incremental: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(report.base.is_some(), "{report:?}");
    // The digests of pages rewritten over live rounds match what the files hold.
    vmm::snapshot::checkpoint::verify_chain(&live_diff).unwrap();
    console.wait(0, "more counters", |t| last_counter(t) >= n + 4);

    // Reverting to the live diff: the counter goes back and continues from there.
    let before = last_counter(&console.text());
    vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
    let mark = console.len();
    checkpointer.revert(&live_diff).unwrap();
    vmm.pause_gate().resume();
    console.wait(mark, "counters after the revert", |t| {
        counters(t).len() >= 2
    });
    let after = counters(&console.since(mark));
    assert!(
        after[0] <= before,
        "did not go back: {before} then {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");

    // A stream (what an internal qcow2 snapshot stores) round-trips through the trait.
    let state: Arc<dyn VmState> = checkpointer.clone();
    assert!(state.pause_vcpus().unwrap());
    let saved_text = console.text();
    let mut stream = Vec::new();
    let len = state.save_stream(&mut stream).unwrap();
    assert_eq!(len, stream.len() as u64);
    state.resume_vcpus().unwrap();
    console.wait(0, "more counters", |t| {
        last_counter(t) >= last_counter(&saved_text) + 3
    });
    assert!(state.pause_vcpus().unwrap(), "the VM was running");
    // A damaged stream is refused and leaves the VM as it was.
    let mut damaged = stream.clone();
    let last = damaged.len() - 10;
    damaged[last] ^= 1;
    let err = state
        .load_stream(&mut &damaged[..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("CRC mismatch"), "{err}");
    let mark = console.len();
    state.load_stream(&mut &stream[..]).unwrap();
    state.resume_vcpus().unwrap();
    console.wait(mark, "counters after the stream load", |t| {
        counters(t).len() >= 2
    });
    let after = counters(&console.since(mark));
    assert_eq!(after[0], last_counter(&saved_text) + 1, "{after:?}");
    vmm.stop().unwrap();
}

#[test]
fn io_loop_survives_twenty_checkpoint_revert_cycles_with_its_disk() {
    if !have_kvm("io_loop_survives_twenty_checkpoint_revert_cycles_with_its_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.raw");
    std::fs::write(&disk_path, vec![0u8; 256 * 1024]).unwrap();
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::IoLoop,
        seed: 5,
    });
    config.memory_mib = 32;
    config.disks.push(DiskConfig::new(&disk_path));
    let (vmm, console) = start(&config);
    console.wait(0, "io-loop start", |t| t.contains("io-loop start"));
    let disk = vmm.disks()[0].disk.clone();
    let checkpointer = vmm.checkpointer();
    for cycle in 0..20 {
        let checkpoint = dir.path().join(format!("c{cycle}"));
        // The disk is copied at the checkpoint's instant: queues drained, guest stopped.
        let mut image = vec![0u8; disk.size() as usize];
        checkpointer
            .checkpoint_with(&checkpoint, CheckpointOptions::default(), &mut || {
                disk.read_at(&mut image, 0)
                    .map_err(|source| vmm::Error::Disk {
                        name: "vda".into(),
                        path: disk_path.clone(),
                        source,
                    })
            })
            .unwrap();
        let mut after = vec![0u8; disk.size() as usize];
        let deadline = Instant::now() + TIMEOUT;
        loop {
            disk.read_at(&mut after, 0).unwrap();
            let changed = after
                .chunks(16 * 1024)
                .zip(image.chunks(16 * 1024))
                .filter(|(a, b)| a != b)
                .count();
            if changed >= 3 {
                // The guest rewrote several chunks since the checkpoint (and likely read
                // some back): a revert that forgot the disk would make it see data from
                // its future.
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the guest stopped writing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Back to the checkpoint, disk first (queues drained), then memory and state.
        checkpointer
            .revert_with(&checkpoint, &mut || {
                disk.write_at(&image, 0).map_err(|source| vmm::Error::Disk {
                    name: "vda".into(),
                    path: disk_path.clone(),
                    source,
                })
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // This host's KVM runs the loop at tens of operations a second: let it read back what
    // it wrote across the last revert, then check it never saw a wrong byte or a failure.
    let mut before = vec![0u8; disk.size() as usize];
    disk.read_at(&mut before, 0).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut now = before.clone();
    while now == before {
        assert!(
            Instant::now() < deadline,
            "the guest stopped writing after the cycles"
        );
        std::thread::sleep(Duration::from_millis(100));
        disk.read_at(&mut now, 0).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let text = console.text();
    assert!(!text.contains("io error"), "{text}");
    vmm.stop().unwrap();
}

#[test]
fn damaged_checkpoints_are_refused_with_a_clear_error() {
    if !have_kvm("damaged_checkpoints_are_refused_with_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let (vmm, console) = start(&counter_config(1, 32));
    console.wait(0, "a counter", |t| last_counter(t) >= 1);
    vmm.checkpointer()
        .checkpoint(&good, CheckpointOptions::default())
        .unwrap();
    let copy = |name: &str| {
        let target = dir.path().join(name);
        std::fs::create_dir_all(&target).unwrap();
        for file in ["state", "memory"] {
            std::fs::copy(good.join(file), target.join(file)).unwrap();
        }
        target
    };
    let restore_error = |checkpoint: &Path| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_snapvmm"))
            .arg("restore")
            .arg(checkpoint)
            .args(["--serial", "null"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "restored a damaged checkpoint");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    state[100] ^= 0x20;
    std::fs::write(flipped.join("state"), &state).unwrap();
    let err = restore_error(&flipped);
    assert!(
        err.contains("state file") && err.contains("CRC mismatch"),
        "{err}"
    );

    let newer = copy("newer");
    let mut state = std::fs::read(newer.join("state")).unwrap();
    state[8] = 9; // major version 9
    std::fs::write(newer.join("state"), &state).unwrap();
    let err = restore_error(&newer);
    assert!(
        err.contains("format version 9.1; this snapvmm reads 1.x"),
        "{err}"
    );

    let truncated = copy("truncated");
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap();
    memory.set_len(4096 + 16 * 1024 * 1024).unwrap();
    let err = restore_error(&truncated);
    assert!(
        err.contains("memory file") && err.contains("truncated"),
        "{err}"
    );

    let foreign = copy("foreign");
    let other = dir.path().join("other");
    vmm.checkpointer()
        .checkpoint(&other, CheckpointOptions::default())
        .unwrap();
    std::fs::copy(other.join("memory"), foreign.join("memory")).unwrap();
    let err = restore_error(&foreign);
    assert!(err.contains("belongs to checkpoint"), "{err}");

    let garbage = copy("garbage");
    std::fs::write(garbage.join("state"), b"not a state file at all, no").unwrap();
    let err = restore_error(&garbage);
    assert!(err.contains("not a snapvmm checkpoint state file"), "{err}");

    // A flipped byte of guest memory is found by verify (restore maps the file lazily and
    // does not read it unless asked to).
    let verify = |checkpoint: &Path| {
        snapvmm(&[])
            .args(["checkpoint", "verify"])
            .arg(checkpoint)
            .output()
            .unwrap()
    };
    assert!(verify(&good).status.success(), "{:?}", verify(&good));
    let rotten = copy("rotten");
    let manifest = vmm::snapshot::checkpoint::state_file::read(&state_path(&rotten)).unwrap();
    let data = manifest.data.expect("a data digest");
    let (first_page, _) = data.pages.runs().next().expect("written pages");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(rotten.join("memory"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    let offset = 4096 + first_page * PAGE_SIZE + 100;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x80], offset).unwrap();
    let output = verify(&rotten);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("data CRC mismatch"), "{err}");
    let output = snapvmm(&[])
        .arg("restore")
        .arg(&rotten)
        .args(["--verify", "--serial", "null"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("data CRC mismatch"),
        "{output:?}"
    );

    // In place too, and the VM keeps running as it was.
    let err = vmm.checkpointer().revert(&flipped).unwrap_err().to_string();
    assert!(err.contains("CRC mismatch"), "{err}");
    let mut bigger = counter_config(1, 64);
    bigger.serial = vmm::config::SerialOutput::Null;
    let other_vm = Vmm::start_with_serial(&bigger, Box::new(std::io::sink())).unwrap();
    let err = other_vm
        .checkpointer()
        .revert(&good)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not fit this VM") && err.contains("MiB"),
        "{err}"
    );
    other_vm.stop().unwrap();
    let n = last_counter(&console.text());
    console.wait(0, "more counters", |t| last_counter(t) >= n + 2);
    vmm.stop().unwrap();
}

fn snapvmm(args: &[&std::ffi::OsStr]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_snapvmm"));
    command.args(args);
    command
}

fn ctl(socket: &Path, args: &[&str]) -> String {
    let output = snapvmm(&[])
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn wait_for_file(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut std::process::Child) {
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("snapvmm did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn counter_continues_after_restore_in_a_new_process() {
    if !have_kvm("counter_continues_after_restore_in_a_new_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (socket, console) = (dir.path().join("vm.sock"), dir.path().join("console"));
    let checkpoint = dir.path().join("ckpt");
    let mut child = snapvmm(&[])
        .args(["run", "--guest", "builtin:counter", "--memory", "32"])
        .arg("--serial")
        .arg(&console)
        .arg("--api-socket")
        .arg(&socket)
        .spawn()
        .unwrap();
    wait_for_file(&console, "3 counters", |t| last_counter(t) >= 3);
    ctl(&socket, &["pause"]);
    let saved_text = std::fs::read_to_string(&console).unwrap();
    let saved = assert_contiguous(&saved_text);
    let out = ctl(&socket, &["checkpoint-save", checkpoint.to_str().unwrap()]);
    assert!(out.contains("saved (full"), "{out}");
    ctl(&socket, &["shutdown"]);
    wait_exit(&mut child);

    let info = snapvmm(&[])
        .args(["checkpoint", "info"])
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains(" full id "),
        "{info:?}"
    );

    let (socket2, console2) = (dir.path().join("vm2.sock"), dir.path().join("console2"));
    let mut restored = snapvmm(&[])
        .arg("restore")
        .arg(&checkpoint)
        .arg("--serial")
        .arg(&console2)
        .arg("--api-socket")
        .arg(&socket2)
        .spawn()
        .unwrap();
    let text = wait_for_file(&console2, "counters after restore", |t| {
        counters(t).len() >= 3
    });
    let last = assert_contiguous(&(saved_text.clone() + &text));
    assert!(last >= saved + 2);

    // Back to the same checkpoint in place, through the API.
    ctl(&socket2, &["pause"]);
    let mark = std::fs::read(&console2).unwrap().len();
    let out = ctl(
        &socket2,
        &["checkpoint-revert", checkpoint.to_str().unwrap()],
    );
    assert!(out.contains("reverted to checkpoint"), "{out}");
    ctl(&socket2, &["resume"]);
    let after = wait_for_file(&console2, "counters after the revert", |t| {
        counters(t.get(mark..).unwrap_or("")).len() >= 2
    });
    ctl(&socket2, &["shutdown"]);
    wait_exit(&mut restored);
    assert_contiguous(&(saved_text + &after[mark..]));
}

#[test]
fn the_snapshot_tree_hook_saves_and_loads_checkpoints() {
    if !have_kvm("the_snapshot_tree_hook_saves_and_loads_checkpoints") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("tree");
    let (vmm, console) = start(&counter_config(1, 32));
    console.wait(0, "2 counters", |t| last_counter(t) >= 2);
    let state: Arc<dyn VmState> = vmm.checkpointer();
    // The hook works on a paused VM only.
    let err = state.save_checkpoint(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("pause its vCPUs first"), "{err}");
    assert!(state.pause_vcpus().unwrap());
    assert!(!state.pause_vcpus().unwrap(), "already paused");
    let saved_text = console.text();
    state.save_checkpoint(&checkpoint).unwrap();
    assert!(vmm.pause_gate().is_paused(), "the save resumed the VM");
    state.resume_vcpus().unwrap();
    let saved = last_counter(&saved_text);
    console.wait(0, "more counters", |t| last_counter(t) >= saved + 3);
    assert!(state.pause_vcpus().unwrap());
    let mark = console.len();
    state.load_checkpoint(&checkpoint).unwrap();
    state.resume_vcpus().unwrap();
    console.wait(mark, "counters after the load", |t| counters(t).len() >= 2);
    assert_contiguous(&(saved_text + &console.since(mark)));
    vmm.stop().unwrap();
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Issue 13, findings 7 and 2: a checkpoint never overwrites a directory that holds
/// something unless asked to replace it, and never a checkpoint something depends on (the
/// base of a diff beside it, this VM's next diff base, a snapshot tree's own); a failed save
/// leaves nothing under the final name; directories are 0700 and files 0600.
#[test]
fn existing_checkpoints_are_never_overwritten() {
    if !have_kvm("existing_checkpoints_are_never_overwritten") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let (vmm, console) = start(&counter_config(1, 32));
    let checkpointer = vmm.checkpointer();
    console.wait(0, "2 counters", |t| last_counter(t) >= 2);
    let incremental = CheckpointOptions {
        incremental: true,
        ..Default::default()
    };
    let replace = CheckpointOptions {
        replace: true,
        ..Default::default()
    };
    checkpointer
        .checkpoint(&a, CheckpointOptions::default())
        .unwrap();
    checkpointer.checkpoint(&b, incremental).unwrap();
    let a_state = std::fs::read(state_path(&a)).unwrap();

    // Private whatever the umask: the test process runs with the usual 022.
    for checkpoint in [&a, &b] {
        assert_eq!(mode(checkpoint), 0o700, "{}", checkpoint.display());
        assert_eq!(mode(&state_path(checkpoint)), 0o600);
        assert_eq!(mode(&memory_path(checkpoint)), 0o600);
    }

    // Not without asking, whatever it is.
    let err = checkpointer
        .checkpoint(&a, CheckpointOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, vmm::Error::CheckpointExists { dir } if dir == &a),
        "{err}"
    );
    assert!(err.to_string().contains(&a.display().to_string()), "{err}");
    // Not a checkpoint something depends on: `b` is based on `a`, and is this VM's base.
    for target in [&a, &b] {
        let err = checkpointer.checkpoint(target, replace).unwrap_err();
        assert!(
            matches!(&err, vmm::Error::CheckpointInUse { .. }),
            "{}: {err}",
            target.display()
        );
    }
    assert_eq!(std::fs::read(state_path(&a)).unwrap(), a_state);
    vmm::snapshot::checkpoint::verify_chain(&b).unwrap();

    // Nor anything that is not a checkpoint, nor a snapshot tree's checkpoint.
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("keep"), b"precious").unwrap();
    let err = checkpointer.checkpoint(&junk, replace).unwrap_err();
    assert!(err.to_string().contains("no state file"), "{err}");
    let tree_owned = dir.path().join("vm.checkpoints").join("s1");
    checkpointer
        .checkpoint(&tree_owned, CheckpointOptions::default())
        .unwrap();
    let err = checkpointer.checkpoint(&tree_owned, replace).unwrap_err();
    assert!(err.to_string().contains("snapshot tree"), "{err}");
    assert_eq!(std::fs::read(junk.join("keep")).unwrap(), b"precious");

    // Once nothing depends on it (the VM's base moved to `c`, and nothing beside names
    // `b`), `b` may be replaced: it is then a full checkpoint.
    checkpointer
        .checkpoint(&c, CheckpointOptions::default())
        .unwrap();
    let report = checkpointer.checkpoint(&b, replace).unwrap();
    assert_eq!(report.dir, b.canonicalize().unwrap());
    assert!(report.base.is_none());
    vmm::snapshot::checkpoint::verify_chain(&b).unwrap();
    assert_eq!(mode(&b), 0o700);

    // An empty directory is fine; a failed save leaves nothing behind under any name.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    checkpointer
        .checkpoint(&empty, CheckpointOptions::default())
        .unwrap();
    let failed = dir.path().join("failed");
    let err = checkpointer
        .checkpoint_with(&failed, CheckpointOptions::default(), &mut || {
            Err(vmm::Error::Config("refused at the stop".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("refused at the stop"), "{err}");
    assert!(!failed.exists(), "a failed save left {}", failed.display());
    assert_eq!(entries_starting(dir.path(), "."), Vec::<String>::new());
    vmm.stop().unwrap();
}

/// Issue 13, finding 8: a save that fails after it took pages out of the dirty log gives
/// them back, so the next diff holds them; and its base stays the last durable checkpoint.
/// The save is made to fail at its very end: `at_stop` puts a directory where the
/// checkpoint must go, so it cannot be put into place.
#[test]
fn a_failed_save_keeps_its_dirty_pages_for_the_next_diff() {
    if !have_kvm("a_failed_save_keeps_its_dirty_pages_for_the_next_diff") {
        return;
    }
    use vmm::vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir().unwrap();
    let (vmm, console) = start(&counter_config(1, 32));
    let checkpointer = vmm.checkpointer();
    console.wait(0, "2 counters", |t| last_counter(t) >= 2);
    let base = dir.path().join("base");
    checkpointer
        .checkpoint(&base, CheckpointOptions::default())
        .unwrap();

    // Pages the micro-guest leaves alone; the VMM's own writes are tracked like the guest's.
    let markers = [0x1c0_0000u64, 0x1d0_0000, 0x1e0_0000];
    let mut step = 0;
    let mut failing = |name: &str, options: CheckpointOptions, marker: u64| {
        vmm.memory()
            .write_slice(&[0xa5; 64], GuestAddress(marker))
            .unwrap();
        let target = dir.path().join(name);
        let blocker = target.clone();
        let err = checkpointer
            .checkpoint_with(&target, options, &mut || {
                std::fs::create_dir_all(blocker.join("memory").join("in-the-way")).unwrap();
                Ok(())
            })
            .unwrap_err();
        step += 1;
        err
    };
    let incremental = CheckpointOptions {
        incremental: true,
        ..Default::default()
    };
    // A diff that fails, then a full save that fails, then a live full save that fails.
    failing("fail-diff", incremental, markers[0]);
    failing("fail-full", CheckpointOptions::default(), markers[1]);
    failing(
        "fail-live",
        CheckpointOptions {
            live: true,
            ..Default::default()
        },
        markers[2],
    );
    assert_eq!(step, 3);

    let next = dir.path().join("next");
    let report = checkpointer.checkpoint(&next, incremental).unwrap();
    assert_eq!(
        report.base.as_deref(),
        Some(base.canonicalize().unwrap().as_path()),
        "the diff's base is the last checkpoint that was saved"
    );
    let manifest = vmm::snapshot::checkpoint::state_file::read(&state_path(&next)).unwrap();
    let pages = manifest.pages.expect("a diff lists its pages");
    let file = MemoryFile::open(&memory_path(&next), manifest.id, 32 << 20).unwrap();
    for marker in markers {
        assert!(
            pages.contains(marker / PAGE_SIZE),
            "the diff misses the page at {marker:#x} a failed save collected"
        );
        let mut bytes = [0u8; 64];
        file.read_at(&mut bytes, marker).unwrap();
        assert_eq!(bytes, [0xa5; 64], "page at {marker:#x}");
    }
    vmm::snapshot::checkpoint::verify_chain(&next).unwrap();
    vmm.stop().unwrap();
}
