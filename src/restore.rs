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
use snapvmm_api::ApiServer;
use vmm::config::SerialOutput;
use vmm::{ExitReason, Sandbox, SandboxOptions};

/// Arguments of `snapvmm restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    confine: crate::confine::ConfineArgs,
    /// The checkpoint directory (a full checkpoint or the top of a diff chain), or a
    /// snapshot in a store, s3://BUCKET/PREFIX/NAME, restored lazily (needs --cache).
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
    #[arg(long, value_name = "FILE")]
    snapshot_metadata: Option<PathBuf>,
    /// Store restores: the chunk cache and run directory (clones share it).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Store restores: the S3 endpoint URL [default: AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Store restores: do not prefetch the recorded working set.
    #[arg(long)]
    no_prefetch: bool,
    /// Store restores without a recorded working set: record the chunks touched in the
    /// first SECS seconds (0: do not record).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    working_set_secs: u64,
    /// Open disk NAME on IMAGE instead of the image the checkpoint names (an overlay on it,
    /// the same size: how clones start on their own overlays); repeatable.
    #[arg(long, value_name = "NAME=IMAGE")]
    disk_top: Vec<String>,
    /// The vsock device's host socket [default: the one the checkpointed VM had].
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest agent quiesced snapshots freeze the guest through: vsock:PORT (through the
    /// vsock device's socket) or the PATH of a Unix socket.
    #[arg(long, value_name = "vsock:PORT|PATH", requires = "api_socket")]
    guest_agent: Option<String>,
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
    if args.verify && !args.dir.starts_with("s3:") {
        vmm::snapshot::checkpoint::verify_chain(&args.dir).map_err(|e| text(e.into()))?;
    }
    let serial: SerialOutput = args
        .serial
        .as_deref()
        .unwrap_or("stdout")
        .parse()
        .map_err(text)?;
    let out = vmm::builder::open_serial(&serial).map_err(text)?;
    if let Some(url) = args.dir.to_str().filter(|d| d.starts_with("s3://")) {
        let cache = args
            .cache
            .as_deref()
            .ok_or("a restore from a store needs --cache DIR")?;
        if args.verify {
            return Err(
                "--verify is for local checkpoints (store chunks are always checked)".into(),
            );
        }
        return crate::store::restore_lazy(crate::store::LazyArgs {
            url,
            cache,
            endpoint: args.endpoint.as_deref(),
            api_socket: args.api_socket.as_deref(),
            serial: out,
            paused: args.paused,
            snapshot_metadata: args.snapshot_metadata.clone(),
            prefetch: !args.no_prefetch,
            working_set_secs: args.working_set_secs,
        });
    }
    // The API socket is bound, and its server readied, while the VM is built; it answers
    // once the VM runs (a failed restore removes it again).
    let pending = match &args.api_socket {
        Some(socket) => Some(ApiServer::bind(socket).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut restore_options = disk_tops(&args.disk_top)?;
    restore_options.vsock_uds = args.vsock_uds.clone();
    // Held until the snapshot tree has opened (it refuses a disk on an image a snapshot
    // froze, which a snapshot's own checkpoint names): through the sandbox even without an
    // API.
    let vm = vmm::Vmm::restore_with(&args.dir, out, true, restore_options).map_err(text)?;
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
        // Confined by `--seccomp` (`ConfineArgs::apply`) before the VM is built.
        confinement: None,
    };
    tracing::debug!(target: "vmm::restore", "snapvmm restore: VM built");
    let sandbox = Sandbox::with_vmm(vm, &options).map_err(text)?;
    tracing::debug!(target: "vmm::restore", "snapvmm restore: sandbox ready");
    if !args.paused {
        sandbox.vmm().pause_gate().resume();
    }
    tracing::info!("restored from {}", args.dir.display());
    let Some(pending) = pending else {
        for problem in sandbox.warnings() {
            eprintln!("snapvmm restore: warning: snapshot metadata: {problem}");
        }
        crate::confine::trigger();
        return sandbox.wait().map_err(text);
    };
    crate::store::install_exporter(&sandbox);
    crate::serve::serve_api_on(sandbox, pending)
}

/// Runs `snapvmm restore`; returns the process exit status.
pub fn main(args: RestoreArgs) -> u8 {
    crate::serve::init_logging();
    tracing::debug!(target: "vmm::restore", "snapvmm restore: arguments parsed");
    if let Err(message) = args.confine.apply() {
        eprintln!("snapvmm restore: error: confinement: {message}");
        return 1;
    }
    tracing::debug!(target: "vmm::restore", "snapvmm restore: confined");
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
