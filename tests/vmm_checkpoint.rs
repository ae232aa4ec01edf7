//! Checkpoints of micro-guest VMs: save, revert in place, restore in a new VM or process,
//! diff chains and merges, live checkpoints, streams, and refusal of damaged files.
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::snapshot::checkpoint::{memory_path, state_path, MemoryFile, PAGE_SIZE};
use vmm::snapshot::vm_state::VmState;
use vmm::{CheckpointOptions, Vmm};

const TIMEOUT: Duration = Duration::from_secs(60);

fn kvm_or_skip(test: &str) -> bool {
    match vmm::check_kvm() {
        Ok(()) => true,
        Err(reason) => {
            if std::env::var("SNAPVMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: KVM required (SNAPVMM_REQUIRE_KVM=1) but unusable: {reason}");
            }
            eprintln!("skipping {test}: KVM unusable: {reason}");
            false
        }
    }
}

/// The serial console, captured.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn since(&self, mark: usize) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()[mark..]).into_owned()
    }
    /// Waits until `done` holds for the text after `mark`.
    fn wait(&self, mark: usize, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(&self.since(mark)) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The `counter N` values in `text`, in order.
fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("counter "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Asserts `text` counts 1, 2, 3, ... with no gap or repeat, and returns the last value.
fn assert_contiguous(text: &str) -> u64 {
    let values = counters(text);
    for (i, &v) in values.iter().enumerate() {
        assert_eq!(v, i as u64 + 1, "counter sequence broken at {i}:\n{text}");
    }
    values.last().copied().unwrap_or(0)
}

fn last_counter(text: &str) -> u64 {
    counters(text).last().copied().unwrap_or(0)
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

/// Pauses the VM and returns the console text up to the pause.
fn pause(vmm: &Vmm, console: &Console) -> String {
    vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
    console.text()
}

#[test]
fn counter_continues_after_revert_in_place() {
    if !kvm_or_skip("counter_continues_after_revert_in_place") {
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
    assert!(report.pages_written > 0 && report.pages_written < 32 * 256, "{report:?}");
    vmm.pause_gate().resume();
    console.wait(0, "counting on", |t| last_counter(t) >= saved + 4);

    for _ in 0..3 {
        vmm.pause_gate().pause(Duration::from_secs(5)).unwrap();
        let mark = console.len();
        vmm.checkpointer().revert(&checkpoint).unwrap();
        vmm.pause_gate().resume();
        console.wait(mark, "counters after the revert", |t| counters(t).len() >= 2);
        // The console after the revert continues the text as it was at the checkpoint.
        let last = assert_contiguous(&(saved_text.clone() + &console.since(mark)));
        assert!(last > saved);
    }
    vmm.stop().unwrap();
}

#[test]
fn counter_continues_in_a_new_vm_on_two_vcpus() {
    if !kvm_or_skip("counter_continues_in_a_new_vm_on_two_vcpus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("c1");
    let (vmm, console) = start(&counter_config(2, 32));
    console.wait(0, "3 counters", |t| last_counter(t) >= 3);
    let saved_text = pause(&vmm, &console);
    assert!(saved_text.starts_with("micro-guest: cpus 2"), "{saved_text}");
    let saved = assert_contiguous(&saved_text);
    vmm.checkpointer()
        .checkpoint(&checkpoint, CheckpointOptions::default())
        .unwrap();
    vmm.stop().unwrap();

    let restored_console = Console::default();
    let restored = Vmm::restore(&checkpoint, Box::new(restored_console.clone()), false).unwrap();
    restored_console.wait(0, "counters after restore", |t| counters(t).len() >= 3);
    let last = assert_contiguous(&(saved_text + &restored_console.text()));
    assert!(last >= saved + 2);
    restored.stop().unwrap();
}
