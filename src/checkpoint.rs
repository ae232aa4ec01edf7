//! `snapvmm checkpoint`: checkpoint directories offline.
//!
//! ```text
//! snapvmm checkpoint info ckpt3            # the chain below it, sizes, vCPUs, disks
//! snapvmm checkpoint merge ckpt3 full3     # fold ckpt3's diff chain into one full checkpoint
//! snapvmm checkpoint verify ckpt3          # read every memory file of the chain, check CRCs
//! ```

use std::path::PathBuf;

use clap::{Args, Subcommand};
use vmm::snapshot::checkpoint::{memory_path, merge::merge_chain, resolve_chain, verify_chain};

/// Arguments of `snapvmm checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// What to do.
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Show a checkpoint and the chain of bases below it.
    Info {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read every memory file of the chain ending at DIR and check it against its CRC.
    Verify {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Write the checkpoint DIR (the top of a diff chain) as one full checkpoint in OUT.
    Merge {
        /// The newest checkpoint of the chain.
        dir: PathBuf,
        /// The new full checkpoint's directory (created; must not be in the chain).
        out: PathBuf,
    },
}

fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn run(args: CheckpointArgs) -> Result<(), String> {
    match args.verb {
        Verb::Info { dir, json } => {
            let chain = resolve_chain(&dir).map_err(|e| e.to_string())?;
            let links: Vec<serde_json::Value> = chain
                .iter()
                .rev()
                .map(|link| {
                    let m = &link.manifest;
                    serde_json::json!({
                        "dir": link.dir,
                        "id": format!("{:016x}", m.id),
                        "kind": if m.is_diff() { "diff" } else { "full" },
                        "created_unix": m.created_unix,
                        "memory_bytes": m.memory.total_bytes(),
                        "pages_held": m.pages.as_ref().map(|p| p.count()),
                        "memory_file_allocated_bytes": allocated_bytes(&memory_path(&link.dir)),
                        "vcpus": m.machine.get("vcpu_count"),
                        "disks": m.machine.get("disks").and_then(|d| d.as_array()).map(|d| {
                            d.iter().map(|disk| disk["disk"]["top"].clone()).collect::<Vec<_>>()
                        }),
                    })
                })
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&links).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            for link in links {
                println!(
                    "{} {} id {} memory {} MiB, file {} KiB allocated, vCPUs {}, disks {}",
                    link["dir"].as_str().unwrap_or("?"),
                    link["kind"].as_str().unwrap_or("?"),
                    link["id"].as_str().unwrap_or("?"),
                    link["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                    link["memory_file_allocated_bytes"].as_u64().unwrap_or(0) >> 10,
                    link["vcpus"],
                    link["disks"],
                );
            }
        }
        Verb::Verify { dir } => {
            let pages = verify_chain(&dir).map_err(|e| e.to_string())?;
            println!("Checkpoint {} verified ({pages} pages read)", dir.display());
        }
        Verb::Merge { dir, out } => {
            let report = merge_chain(&dir, &out).map_err(|e| e.to_string())?;
            println!(
                "Merged {} checkpoint(s) into {} ({} pages copied)",
                report.layers,
                out.display(),
                report.pages_copied
            );
        }
    }
    Ok(())
}

/// Runs `snapvmm checkpoint`; returns the process exit status.
pub fn main(args: CheckpointArgs) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snapvmm checkpoint: error: {e}");
            1
        }
    }
}
