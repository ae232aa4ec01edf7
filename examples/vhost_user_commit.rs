//! Serves a qcow2 disk over vhost-user-blk (a QEMU guest may attach to the socket), takes a
//! live disk-only snapshot and commits it back actively through the daemon's `Control`.
use snapshot::JobStatus::{Concluded, Ready};
use std::time::Duration;
use storage::qcow2::{create, CreateOptions};
use vhost_user_blk::{BlkDaemon, DaemonConfig};
use vmm::config::DiskConfig;
use vmm::control::types::{CommitRequest, SnapshotCreate};
/// Runs the example (also called by `tests/examples.rs`).
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.qcow2");
    let image = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    create(&disk, &image)?;
    let config = DaemonConfig {
        socket: dir.path().join("blk.sock"),
        disk: DiskConfig::new(&disk),
        num_queues: 1,
        guest_agent: None,
    };
    let daemon = BlkDaemon::new(&config)?;
    let control = daemon.control();
    let serving = std::thread::spawn(move || daemon.run(|| {}));
    let moved = &control.disk_snapshot(&SnapshotCreate::new("s1"))?.disks[0].overlay;
    println!("vda moved onto {moved}");
    control.commit("vda", &CommitRequest::active())?;
    let wait = Duration::from_secs(30);
    control.job_wait("vda", wait, |s| s == Ready || s == Concluded)?;
    control.job_complete("vda")?;
    let job = control.job_wait("vda", wait, |s| s == Concluded)?;
    let source = control.disk("vda")?.source;
    println!("{} {}: vda back on {source}", job.kind, job.status);
    control.shutdown()?;
    serving.join().map_err(|_| "the daemon thread panicked")??;
    Ok(())
}
