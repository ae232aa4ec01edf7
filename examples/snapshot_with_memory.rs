//! Boots the micro-guest `counter` on a qcow2 disk, snapshots it with memory, reverts to the
//! snapshot (the count goes back). `cargo run --example snapshot_with_memory` (needs KVM).
use std::{path::Path, thread::sleep, time::Duration};
use storage::qcow2::{create, CreateOptions};
use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig, Workload::Counter};
use vmm::control::types::TreeSnapshotCreate;
use vmm::{Sandbox, SandboxOptions};

fn count(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text.lines().rfind(|l| l.starts_with("counter"));
    last.unwrap_or("-").to_string()
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.qcow2");
    let log = dir.path().join("console.log");
    let mut image = CreateOptions::default();
    image.size = Some(1 << 20);
    create(&disk, &image)?;
    let (workload, seed) = (Counter, 1);
    let mut config = VmConfig::new(BootSource::MicroGuest { workload, seed });
    config.disks.push(DiskConfig::new(&disk));
    config.serial = SerialOutput::File(log.clone());
    let sandbox = Sandbox::start(&config, &SandboxOptions::default())?;
    let control = sandbox.control();
    sleep(Duration::from_millis(500));
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
