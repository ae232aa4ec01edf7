//! `snapvmm clone`: start VMs from a snapshot of a tree without a running VM, and the
//! output the clone verbs of `snapvmm ctl` share (`clone`, `fork`, `clone-list`).
//!
//! ```text
//! snapvmm clone --snapshot-metadata vm/snapvmm-snapshots.json s1 --count 8 --dir /srv/clones
//! clone-0 pid 4242 api /srv/clones/clone-0/api.sock serial /srv/clones/clone-0/serial.log
//! ...
//! ```
//!
//! Each clone is a `snapvmm restore` process of the snapshot's checkpoint on its own
//! overlays in `DIR/clone-K/` (see `vmm::control::clone`); they keep running after this
//! command returns. The tree's metadata is only read; the clones are recorded in
//! `STEM.clones.json` beside it.

use std::path::PathBuf;

use clap::Args;
use vmm::control::clone::{clone_offline, CloneLauncher};
use vmm::control::types::{CloneInfo, CloneRecord, CloneRequest};

/// Arguments of `snapvmm clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The snapshot tree's metadata file (snapvmm-snapshots.json beside the VM's first
    /// writable disk, unless the VM was given another).
    #[arg(long, value_name = "FILE")]
    snapshot_metadata: PathBuf,
    /// The snapshot to clone (external, taken with memory).
    name: String,
    /// How many clones (1 to 64).
    #[arg(long, value_name = "N")]
    count: u32,
    /// The directory the clones' directories (clone-K) go into; created if absent.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Print the clones as a JSON list.
    #[arg(long)]
    json: bool,
}

/// Prints started clones: one line each, or a JSON list.
pub(crate) fn print_clones(clones: &[CloneInfo], json: bool) -> Result<(), String> {
    if json {
        let text =
            serde_json::to_string_pretty(clones).map_err(|e| format!("encoding JSON: {e}"))?;
        println!("{text}");
        return Ok(());
    }
    for clone in clones {
        println!(
            "{} pid {} api {} serial {}",
            clone.id,
            clone.pid,
            clone.api_socket.display(),
            clone.serial.display()
        );
    }
    Ok(())
}

/// Prints recorded clones (`ctl clone-list`): one line each, or the JSON list.
pub(crate) fn print_records(records: &[CloneRecord], json: bool) -> Result<(), String> {
    if json {
        let text =
            serde_json::to_string_pretty(records).map_err(|e| format!("encoding JSON: {e}"))?;
        println!("{text}");
        return Ok(());
    }
    println!(" {:<10} {:<8} {:<9} Directory", "Id", "Pid", "State");
    println!("{}", "-".repeat(60));
    for record in records {
        let state = if record.running { "running" } else { "stopped" };
        println!(
            " {:<10} {:<8} {:<9} {}",
            record.clone.id,
            record.clone.pid,
            state,
            record.clone.dir.display()
        );
    }
    Ok(())
}

fn clone(args: &CloneArgs) -> Result<(), String> {
    let request = CloneRequest {
        count: args.count,
        dir: std::path::absolute(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?,
    };
    let metadata = std::path::absolute(&args.snapshot_metadata)
        .map_err(|e| format!("{}: {e}", args.snapshot_metadata.display()))?;
    let clones = clone_offline(&metadata, &args.name, &request, &CloneLauncher::default())
        .map_err(|e| e.to_string())?;
    print_clones(&clones, args.json)
}

/// Runs `snapvmm clone`; returns the process exit status.
pub fn main(args: CloneArgs) -> u8 {
    crate::serve::init_logging();
    match clone(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snapvmm clone: error: {e}");
            1
        }
    }
}
