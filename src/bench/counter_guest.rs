//! The counter micro-guest the checkpoint figures run, shared with the criterion bench
//! `benches/checkpoint.rs` (which includes this file by path), so both measure the same
//! thing. Self-contained: it uses no other module of the binary.

use std::path::Path;
use std::time::Duration;

use vmm::config::{BootSource, VmConfig, Workload};
use vmm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::{CheckpointOptions, Vmm};

/// A counter micro-guest of `mib` MiB, its console discarded, booted for 100 ms.
pub fn counter_vm(mib: u64) -> Result<Vmm, String> {
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::Counter,
        seed: 1,
    });
    config.memory_mib = mib;
    let vm = Vmm::start_with_serial(&config, Box::new(std::io::sink()))
        .map_err(|e| format!("starting a {mib} MiB VM: {e}"))?;
    // Let the guest boot and print a few lines.
    std::thread::sleep(Duration::from_millis(100));
    Ok(vm)
}

/// Writes a non-zero pattern over all guest RAM from the host (the VM is paused).
pub fn dirty_all(vm: &Vmm) -> Result<(), String> {
    for region in vm.memory().iter() {
        let host = region
            .get_host_address(vmm::vm_memory::MemoryRegionAddress(0))
            .map_err(|e| format!("guest memory region: {e}"))?;
        let len = usize::try_from(region.len()).map_err(|e| format!("region length: {e}"))?;
        // SAFETY: `host` is the start of the region's whole mapping of `len` bytes, alive as
        // long as `vm`; the vCPUs are paused and nothing else writes guest RAM meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        for (i, page) in bytes.chunks_mut(4096).enumerate() {
            // Patterned, so the save's zero-page check finds nothing to skip.
            page.fill((i % 251) as u8 | 1);
        }
    }
    Ok(())
}

/// A live checkpoint of `vm` into `target`, cleared first (a checkpoint never overwrites
/// one; untimed); the vCPU pause the checkpointer measured, in µs.
pub fn live_checkpoint(vm: &Vmm, target: &Path) -> Result<u64, String> {
    let _ = std::fs::remove_dir_all(target);
    let report = vm
        .checkpointer()
        .checkpoint(
            target,
            CheckpointOptions {
                live: true,
                ..Default::default()
            },
        )
        .map_err(|e| format!("live checkpoint to {}: {e}", target.display()))?;
    Ok(report.pause_us)
}
