//! `snapvmm restore`: start a VM in this process from a checkpoint directory.
//!
//! ```text
//! snapvmm restore ckpt1 --serial console.log --api-socket vm.sock
//! ```
//!
//! The checkpoint names the disk images it was taken on; they must still be there, the
//! same size. Guest RAM maps the memory file copy-on-write, so the VM starts without
//! reading it.

use std::path::PathBuf;

use clap::Args;
use vmm::config::SerialOutput;
use vmm::{ExitReason, Sandbox, SandboxOptions};

/// Arguments of `snapvmm restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The checkpoint directory (a full checkpoint or the top of a diff chain).
    dir: PathBuf,
    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serial console destination: stdout, null, or a file [default: stdout].
    #[arg(long, value_name = "FILE|stdout")]
    serial: Option<String>,
    /// Leave the vCPUs paused (resume through the API).
    #[arg(long, requires = "api_socket")]
    paused: bool,
    /// Read every memory file first and check its CRC (slower: the restore is no longer
    /// lazy).
    #[arg(long)]
    verify: bool,
    /// The snapshot tree's metadata file [default: snapvmm-snapshots.json beside the first
    /// writable disk's image].
    #[arg(long, value_name = "FILE", requires = "api_socket")]
    snapshot_metadata: Option<PathBuf>,
    /// Open disk NAME on IMAGE instead of the image the checkpoint names (an overlay on it,
    /// the same size: how clones start on their own overlays); repeatable.
    #[arg(long, value_name = "NAME=IMAGE")]
    disk_top: Vec<String>,
}

/// Parses the `--disk-top NAME=IMAGE` flags.
fn disk_tops(specs: &[String]) -> Result<vmm::RestoreOptions, String> {
    let mut options = vmm::RestoreOptions::default();
    for spec in specs {
        let (name, path) = spec
            .split_once('=')
            .filter(|(name, path)| !name.is_empty() && !path.is_empty())
            .ok_or_else(|| format!("--disk-top {spec:?}: expected NAME=IMAGE"))?;
        options
            .disk_tops
            .push((name.to_string(), PathBuf::from(path)));
    }
    Ok(options)
}

fn restore(args: &RestoreArgs) -> Result<ExitReason, String> {
    let text = |e: vmm::Error| e.to_string();
    if args.verify {
        vmm::snapshot::checkpoint::verify_chain(&args.dir).map_err(|e| text(e.into()))?;
    }
    let serial: SerialOutput = args
        .serial
        .as_deref()
        .unwrap_or("stdout")
        .parse()
        .map_err(text)?;
    let out = vmm::builder::open_serial(&serial).map_err(text)?;
    let restore_options = disk_tops(&args.disk_top)?;
    let Some(socket) = &args.api_socket else {
        let vm =
            vmm::Vmm::restore_with(&args.dir, out, args.paused, &restore_options).map_err(text)?;
        tracing::info!("restored from {}", args.dir.display());
        return vm.wait().map_err(text);
    };
    let options = SandboxOptions {
        snapshot_metadata: args.snapshot_metadata.clone(),
    };
    let sandbox = Sandbox::restore_with(&args.dir, out, args.paused, &options, &restore_options)
        .map_err(text)?;
    tracing::info!("restored from {}", args.dir.display());
    crate::run::serve_api(sandbox, socket)
}

/// Runs `snapvmm restore`; returns the process exit status.
pub fn main(args: RestoreArgs) -> u8 {
    crate::run::init_logging();
    match restore(&args) {
        Ok(reason) if reason.is_clean() => 0,
        Ok(ExitReason::Error(message)) => {
            eprintln!("snapvmm restore: VM failed: {message}");
            1
        }
        Ok(reason) => {
            eprintln!("snapvmm restore: VM ended abnormally: {reason:?}");
            1
        }
        Err(e) => {
            eprintln!("snapvmm restore: error: {e}");
            1
        }
    }
}
