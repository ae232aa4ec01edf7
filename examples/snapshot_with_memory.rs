//! Boots the micro-guest `counter` on a qcow2 disk, snapshots it with memory, reverts to the
//! snapshot (the count goes back). `cargo run --example snapshot_with_memory` (needs KVM).
use std::{path::Path, thread::sleep, time::Duration};
use storage::qcow2::{create, CreateOptions};
use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig, Workload::Counter};
use vmm::control::types::TreeSnapshotCreate;
use vmm::{Sandbox, SandboxOptions};

fn count(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    String::from(text.lines().rfind(|l| l.contains("counter")).unwrap_or("-"))
}
/// Runs the example (also called by `tests/examples.rs`).
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (disk, log) = (dir.path().join("disk.qcow2"), dir.path().join("c.log"));
    let image = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    create(&disk, &image)?;
    let (workload, seed) = (Counter, 1);
    let mut config = VmConfig::new(BootSource::MicroGuest { workload, seed });
    config.disks.push(DiskConfig::new(&disk));
    config.serial = SerialOutput::File(log.clone());
    let sandbox = Sandbox::start(&config, &SandboxOptions::default())?;
    sleep(Duration::from_millis(500));
    let control = sandbox.control();
    let info = control.snapshot_create(&TreeSnapshotCreate::with_memory("s1"))?;
    println!("snapshot {} taken at {}", info.name, count(&log));
    sleep(Duration::from_millis(1000));
    println!("before the revert: {}", count(&log));
    control.snapshot_revert("s1")?;
    sleep(Duration::from_millis(300));
    println!("after the revert:  {}", count(&log));
    control.shutdown()?;
    println!("VM ended: {:?}", sandbox.wait()?);
    Ok(())
}
