//! `snapvmm restore`: start a VM in this process from a checkpoint directory.
//!
//! ```text
//! snapvmm restore ckpt1 --serial console.log --api-socket vm.sock
//! snapvmm restore ckpt1 --api-socket vm.sock --vsock-uds v2.sock --guest-agent vsock:52
//! ```
//!
//! A vsock device comes back on the host socket it had (or `--vsock-uds`) with no
//! connection: the guest is told its peers are gone (a transport reset), and host programs
//! connect again.
//!
//! The checkpoint names the disk images it was taken on; they must still be there, the
//! same size. Guest RAM maps the memory file copy-on-write, so the VM starts without
//! reading it.

use std::path::PathBuf;

use clap::Args;
use vmm::builder::RestoreOptions;
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
    /// The vsock device's host socket [default: the one the checkpointed VM had].
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest agent quiesced snapshots freeze the guest through: vsock:PORT (through the
    /// vsock device's socket) or the PATH of a Unix socket.
    #[arg(long, value_name = "vsock:PORT|PATH", requires = "api_socket")]
    guest_agent: Option<String>,
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
    let restore_options = RestoreOptions {
        vsock_uds: args.vsock_uds.clone(),
    };
    let vm = vmm::Vmm::restore_with(&args.dir, out, args.paused, &restore_options).map_err(text)?;
    let Some(socket) = &args.api_socket else {
        tracing::info!("restored from {}", args.dir.display());
        return vm.wait().map_err(text);
    };
    let guest_agent = match &args.guest_agent {
        Some(spec) => match crate::run::guest_agent(spec, vm.config()) {
            Ok(endpoint) => Some(endpoint),
            Err(message) => {
                let _ = vm.stop();
                return Err(message);
            }
        },
        None => None,
    };
    let options = SandboxOptions {
        snapshot_metadata: args.snapshot_metadata.clone(),
        guest_agent,
    };
    let sandbox = Sandbox::with_vmm(vm, &options).map_err(text)?;
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
