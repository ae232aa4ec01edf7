//! `snapvmm run`: boot a VM from command-line flags or a TOML config file.
//!
//! ```text
//! snapvmm run --guest builtin:write-verify --vcpus 2 --disk path=a.qcow2 --disk path=b.raw,readonly=on
//! snapvmm run --config vm.toml
//! ```
//!
//! The config file uses the flags' names as keys; flags given on the command line win:
//!
//! ```toml
//! guest = "builtin:io-loop"
//! vcpus = 2
//! memory = 256
//! disk = ["path=a.qcow2", "path=b.qcow2,id=data"]
//! serial = "console.log"
//! vsock = "cid=3,uds=vsock.sock"
//! guest-agent = "vsock:52"
//! ```

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;
use vmm::agent::AgentEndpoint;
use vmm::config::{BootSource, DiskConfig, SerialOutput, VmConfig, VsockConfig, Workload};
use vmm::{ExitReason, Sandbox, SandboxOptions};

/// Arguments of `snapvmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    confine: crate::confine::ConfineArgs,
    /// Run the built-in micro-guest: builtin:counter, builtin:write-verify, builtin:io-loop,
    /// builtin:io-bench or builtin:agent (io-loop with a guest agent on the vsock).
    #[arg(long, value_name = "builtin:WORKLOAD", conflicts_with = "kernel")]
    guest: Option<String>,
    /// Boot a Linux kernel: a bzImage, or an uncompressed ELF vmlinux (64-bit boot protocol).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest RAM in MiB [default: 128].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// A disk: path=FILE[,format=qcow2|raw][,readonly=on][,id=NAME][,queues=N]; repeatable.
    /// Disks are named vda, vdb, ... in order unless given an id.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// Serial console destination: stdout, null, or a file [default: stdout].
    #[arg(long, value_name = "FILE|stdout")]
    serial: Option<String>,
    /// A virtio-vsock device: cid=N,uds=PATH (Firecracker's host side: a host program
    /// connects to PATH and writes `CONNECT <port>`; the guest's connections to port P reach
    /// PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// The guest agent quiesced snapshots freeze the guest through: vsock:PORT (through
    /// --vsock's socket) or the PATH of a Unix socket.
    #[arg(long, value_name = "vsock:PORT|PATH")]
    guest_agent: Option<String>,
    /// Seed of the micro-guest's data pattern [default: 1].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The snapshot tree's metadata file [default:
    /// snapvmm-snapshots.json beside the first writable disk's image].
    #[arg(long, value_name = "FILE.json")]
    snapshot_metadata: Option<PathBuf>,
    /// Read settings from a TOML file (keys named after the flags).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
}

/// The TOML config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    guest: Option<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    vcpus: Option<u8>,
    memory: Option<u64>,
    #[serde(default)]
    disk: Vec<String>,
    serial: Option<String>,
    vsock: Option<String>,
    guest_agent: Option<String>,
    seed: Option<u64>,
    api_socket: Option<PathBuf>,
    snapshot_metadata: Option<PathBuf>,
}

fn read_config_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where the REST API is served and the snapshot tree kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ApiConfig {
    socket: Option<PathBuf>,
    snapshot_metadata: Option<PathBuf>,
    guest_agent: Option<AgentEndpoint>,
}

/// Merges flags over the config file into a VM configuration and the API's settings.
fn build_config(args: RunArgs) -> Result<(VmConfig, ApiConfig), String> {
    let file = match &args.config {
        Some(path) => read_config_file(path)?,
        None => FileConfig::default(),
    };
    // Paths in the config file are relative to the file, as in most VMM configs.
    let base = args
        .config
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let rebase = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

    let guest = args.guest.or(file.guest);
    let kernel = args.kernel.or(file.kernel.map(rebase));
    let boot = match (guest, kernel) {
        (Some(_), Some(_)) => return Err("--guest and --kernel exclude each other".into()),
        (Some(guest), None) => {
            let name = guest
                .strip_prefix("builtin:")
                .ok_or_else(|| format!("--guest {guest:?}: expected builtin:WORKLOAD"))?;
            let workload: Workload = name.parse().map_err(|e: vmm::Error| e.to_string())?;
            BootSource::MicroGuest {
                workload,
                seed: args.seed.or(file.seed).unwrap_or(1),
            }
        }
        (None, Some(kernel)) => BootSource::Linux {
            kernel,
            initrd: args.initrd.or(file.initrd.map(rebase)),
            cmdline: args
                .cmdline
                .or(file.cmdline)
                .unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
        },
        (None, None) => return Err("give --guest builtin:WORKLOAD or --kernel PATH".into()),
    };
    let mut config = VmConfig::new(boot);
    if let Some(vcpus) = args.vcpus.or(file.vcpus) {
        config.vcpus = vcpus;
    }
    if let Some(memory) = args.memory.or(file.memory) {
        config.memory_mib = memory;
    }
    let from_file = args.disk.is_empty();
    let specs = if from_file { file.disk } else { args.disk };
    for spec in specs {
        let mut disk: DiskConfig = spec.parse().map_err(|e: vmm::Error| e.to_string())?;
        if from_file {
            disk.path = rebase(disk.path);
        }
        config.disks.push(disk);
    }
    let mut names = std::collections::HashSet::new();
    for index in 0..config.disks.len() {
        let name = config.disk_name(index);
        if !names.insert(name.clone()) {
            return Err(format!("two disks are named {name}"));
        }
    }
    if let Some(serial) = args.serial.or(file.serial) {
        config.serial = serial.parse().map_err(|e: vmm::Error| e.to_string())?;
    }
    config.vsock = match (args.vsock, file.vsock) {
        (Some(spec), _) => Some(spec.parse().map_err(|e: vmm::Error| e.to_string())?),
        (None, Some(spec)) => {
            let mut vsock: VsockConfig = spec.parse().map_err(|e: vmm::Error| e.to_string())?;
            vsock.uds = rebase(vsock.uds);
            Some(vsock)
        }
        (None, None) => None,
    };
    let guest_agent = match (args.guest_agent, file.guest_agent) {
        (Some(spec), _) => Some(guest_agent(&spec, &config)?),
        (None, Some(spec)) => Some(match guest_agent(&spec, &config)? {
            AgentEndpoint::Unix(path) => AgentEndpoint::Unix(rebase(path)),
            vsock => vsock,
        }),
        (None, None) => None,
    };
    let api = ApiConfig {
        socket: args.api_socket.or(file.api_socket.map(&rebase)),
        snapshot_metadata: args
            .snapshot_metadata
            .or(file.snapshot_metadata.map(&rebase)),
        guest_agent,
    };
    Ok((config, api))
}

/// The `--guest-agent` endpoint `spec` names for the VM `config` describes.
pub(crate) fn guest_agent(spec: &str, config: &VmConfig) -> Result<AgentEndpoint, String> {
    AgentEndpoint::parse(spec, config.vsock.as_ref().map(|v| v.uds.as_path()))
}

/// Runs the VM with the REST API served on `socket` until the VM ends.
fn run_with_api(config: &VmConfig, api: &ApiConfig, socket: &Path) -> Result<ExitReason, String> {
    let options = SandboxOptions {
        snapshot_metadata: api.snapshot_metadata.clone(),
        guest_agent: api.guest_agent.clone(),
        // Confined by `--seccomp` (`ConfineArgs::apply`) before the sandbox starts.
        confinement: None,
    };
    let sandbox = Sandbox::start(config, &options).map_err(|e| e.to_string())?;
    crate::store::install_exporter(&sandbox);
    crate::serve::serve_api(sandbox, socket)
}

/// Runs the VM with no API until it ends; its snapshot tree is opened all the same, so the
/// metadata's checks (no writable disk on a frozen image) hold.
fn run_without_api(config: &VmConfig, api: &ApiConfig) -> Result<ExitReason, String> {
    let options = SandboxOptions {
        snapshot_metadata: api.snapshot_metadata.clone(),
        guest_agent: api.guest_agent.clone(),
        // Confined by `--seccomp` (`ConfineArgs::apply`) before the sandbox starts.
        confinement: None,
    };
    let sandbox = Sandbox::start(config, &options).map_err(|e| e.to_string())?;
    crate::confine::trigger();
    for problem in sandbox.warnings() {
        eprintln!("snapvmm run: warning: snapshot metadata: {problem}");
    }
    sandbox.wait().map_err(|e| e.to_string())
}

/// Runs `snapvmm run`; returns the process exit status.
pub fn main(mut args: RunArgs) -> u8 {
    crate::serve::init_logging();
    let confine = std::mem::take(&mut args.confine);
    let (config, api) = match build_config(args) {
        Ok(built) => built,
        Err(message) => {
            eprintln!("snapvmm run: error: {message}");
            return 1;
        }
    };
    if let SerialOutput::File(path) = &config.serial {
        tracing::info!("serial console in {}", path.display());
    }
    if let Err(message) = confine.apply() {
        eprintln!("snapvmm run: error: confinement: {message}");
        return 1;
    }
    let result = match &api.socket {
        Some(socket) => run_with_api(&config, &api, socket),
        // Without an API the snapshot tree is still opened: it is what refuses to let the
        // guest write into an image a snapshot froze.
        None => run_without_api(&config, &api),
    };
    match result {
        Ok(reason) if reason.is_clean() => {
            tracing::info!("VM ended: {reason:?}");
            0
        }
        Ok(ExitReason::Error(message)) => {
            eprintln!("snapvmm run: VM failed: {message}");
            1
        }
        Ok(reason) => {
            eprintln!("snapvmm run: VM ended abnormally: {reason:?}");
            1
        }
        Err(e) => {
            eprintln!("snapvmm run: error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        build_config(cli.run).map(|(config, _)| config)
    }

    #[test]
    fn flags_build_a_config() {
        let config = parse(&[
            "--guest",
            "builtin:write-verify",
            "--vcpus",
            "2",
            "--disk",
            "path=a.qcow2",
            "--disk",
            "path=b.raw,format=raw,readonly=on,id=data",
            "--serial",
            "out.log",
        ])
        .unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disk_name(0), "vda");
        assert_eq!(config.disk_name(1), "data");
        assert_eq!(config.serial, SerialOutput::File("out.log".into()));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse(&["--guest", "counter"]).is_err());
        assert!(parse(&["--guest", "builtin:nope"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&[
            "--guest",
            "builtin:counter",
            "--disk",
            "path=a,id=x",
            "--disk",
            "path=b,id=x"
        ])
        .is_err());
    }

    #[test]
    fn api_socket_from_flag_or_file() {
        let cli = Cli::try_parse_from([
            "run",
            "--guest",
            "builtin:io-loop",
            "--api-socket",
            "/tmp/vm.sock",
        ])
        .unwrap();
        let (_, api) = build_config(cli.run).unwrap();
        assert_eq!(api.socket, Some(PathBuf::from("/tmp/vm.sock")));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "guest = \"builtin:counter\"\napi-socket = \"api.sock\"\n\
             snapshot-metadata = \"snaps.json\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["run", "--config", path.to_str().unwrap()]).unwrap();
        let (_, api) = build_config(cli.run).unwrap();
        assert_eq!(api.socket, Some(dir.path().join("api.sock")));
        assert_eq!(api.snapshot_metadata, Some(dir.path().join("snaps.json")));
    }

    #[test]
    fn config_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "guest = \"builtin:io-loop\"\nvcpus = 2\nmemory = 64\ndisk = [\"path=a.qcow2\"]\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap(), "--vcpus", "3"]).unwrap();
        assert_eq!(config.vcpus, 3, "flags win over the file");
        assert_eq!(config.memory_mib, 64);
        assert_eq!(config.disks[0].path, dir.path().join("a.qcow2"));
        std::fs::write(&path, "colour = 1\n").unwrap();
        assert!(parse(&["--config", path.to_str().unwrap()]).is_err());
    }

    #[test]
    fn vsock_and_guest_agent_from_flags_or_file() {
        let cli = Cli::try_parse_from([
            "run",
            "--guest",
            "builtin:agent",
            "--vsock",
            "cid=3,uds=/tmp/v.sock",
            "--guest-agent",
            "vsock:52",
        ])
        .unwrap();
        let (config, api) = build_config(cli.run).unwrap();
        let vsock = config.vsock.clone().unwrap();
        assert_eq!(
            (vsock.guest_cid, vsock.uds),
            (3, PathBuf::from("/tmp/v.sock"))
        );
        assert_eq!(
            api.guest_agent,
            Some(AgentEndpoint::Vsock {
                uds: PathBuf::from("/tmp/v.sock"),
                port: 52
            })
        );
        // vsock:PORT needs a vsock device.
        assert!(parse(&["--guest", "builtin:agent", "--guest-agent", "vsock:52"]).is_err());
        assert!(parse(&["--guest", "builtin:agent", "--vsock", "cid=1,uds=/x"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "guest = \"builtin:agent\"\nvsock = \"cid=7,uds=v.sock\"\nguest-agent = \"vsock:52\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["run", "--config", path.to_str().unwrap()]).unwrap();
        let (config, api) = build_config(cli.run).unwrap();
        let uds = dir.path().join("v.sock");
        assert_eq!(config.vsock.unwrap().uds, uds);
        assert_eq!(
            api.guest_agent,
            Some(AgentEndpoint::Vsock { uds, port: 52 })
        );
    }
}
