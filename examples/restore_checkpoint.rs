//! Boots the micro-guest `counter`, saves a checkpoint, stops it, and restores the checkpoint
//! in a new VM that counts on. `cargo run --example restore_checkpoint` (needs /dev/kvm).
use std::{fs::File, thread::sleep, time::Duration};
use storage::qcow2::{create, CreateOptions};
use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig, Workload::Counter};
use vmm::control::types::CheckpointRequest;
use vmm::{Sandbox, SandboxOptions};
/// Runs the example (also called by `tests/examples.rs`).
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (disk, checkpoint) = (dir.path().join("disk.qcow2"), dir.path().join("ckpt"));
    let image = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    create(&disk, &image)?;
    let (workload, seed) = (Counter, 1);
    let mut config = VmConfig::new(BootSource::MicroGuest { workload, seed });
    config.disks.push(DiskConfig::new(&disk));
    config.serial = SerialOutput::File(dir.path().join("first.log"));
    let first = Sandbox::start(&config, &SandboxOptions::default())?;
    sleep(Duration::from_millis(500));
    let control = first.control();
    let report = control.checkpoint_save(&CheckpointRequest::new(&checkpoint))?;
    println!("checkpoint saved: {} pages", report.pages_written);
    control.shutdown()?;
    first.wait()?;

    // A new VM from the checkpoint: memory is mapped lazily, the disk is the same image.
    let serial = Box::new(File::create(dir.path().join("second.log"))?);
    let second = Sandbox::restore(&checkpoint, serial, false, &SandboxOptions::default())?;
    sleep(Duration::from_millis(500));
    println!("restored VM: {:?}", second.control().info().state);
    second.control().shutdown()?;
    println!("VM ended: {:?}", second.wait()?);
    let counted = std::fs::read_to_string(dir.path().join("second.log"))?;
    println!("it counted on to {:?}", counted.lines().last());
    Ok(())
}
