//! `snapvmm vhost-user-blk`: serve a disk to another VMM's guest over vhost-user.
//!
//! ```text
//! snapvmm vhost-user-blk --socket /run/blk.sock --disk path=disk.qcow2 --api-socket /run/blk.api
//! qemu-system-x86_64 ... -chardev socket,id=blk,path=/run/blk.sock \
//!     -device vhost-user-blk-pci,chardev=blk
//! snapvmm ctl --api-socket /run/blk.api snapshot-create-as s1 --disk-only
//! ```
//!
//! With `--guest-agent /run/qga.sock` and QEMU's
//! `-chardev socket,id=qga,path=/run/qga.sock,server=on,wait=off -device virtio-serial
//! -device virtserialport,chardev=qga,name=org.qemu.guest_agent.0`, `snapshot-create-as
//! --quiesce` freezes the guest's filesystems (qemu-ga in the guest) around the snapshot.

use std::path::PathBuf;

use clap::Args;
use snapvmm_api::ApiServer;
use vhost_user_blk::{BlkDaemon, DaemonConfig};
use vmm::config::DiskConfig;

/// Arguments of `snapvmm vhost-user-blk`.
#[derive(Debug, Args)]
pub struct VhostUserBlkArgs {
    #[command(flatten)]
    confine: crate::confine::ConfineArgs,
    /// The vhost-user socket to listen on; frontends may disconnect and reconnect.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk: path=FILE[,format=qcow2|raw][,readonly=on][,id=NAME] (named vda unless given
    /// an id).
    #[arg(long, value_name = "SPEC")]
    disk: String,
    /// Serve the REST API (snapshots, stream, commit, jobs) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Request queues offered to the frontend (1 to 16) [default: 1].
    #[arg(long, value_name = "N")]
    num_queues: Option<u16>,
    /// The Unix socket QEMU serves the guest agent's port on (`-chardev
    /// socket,path=PATH,server=on,wait=off` behind `virtserialport
    /// name=org.qemu.guest_agent.0`): snapshots may then `--quiesce`.
    #[arg(long, value_name = "PATH")]
    guest_agent: Option<PathBuf>,
}

/// Runs the daemon until `snapvmm ctl shutdown` (or a signal); returns the exit status.
pub fn main(args: VhostUserBlkArgs) -> u8 {
    crate::serve::init_logging();
    let disk: DiskConfig = match args.disk.parse() {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("snapvmm vhost-user-blk: error: {e}");
            return 1;
        }
    };
    let config = DaemonConfig {
        socket: args.socket,
        num_queues: args.num_queues.unwrap_or(disk.num_queues),
        disk,
        guest_agent: args.guest_agent,
    };
    // SIGINT and SIGTERM end the daemon as `ctl shutdown` does (disk flushed, jobs
    // cancelled): blocked here, before any thread exists, and awaited by one thread below.
    let signals = termination_signals();
    // SAFETY: changing this thread's signal mask; every thread spawned later inherits it.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    // Confined after the mask is set so that the spawner thread inherits it too.
    if let Err(message) = args.confine.apply() {
        eprintln!("snapvmm vhost-user-blk: error: confinement: {message}");
        return 1;
    }
    let daemon = match BlkDaemon::new(&config) {
        Ok(daemon) => daemon,
        Err(e) => {
            eprintln!("snapvmm vhost-user-blk: error: {e}");
            return 1;
        }
    };
    let server = match &args.api_socket {
        Some(path) => match ApiServer::start(path, daemon.control()) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("snapvmm vhost-user-blk: error: {e}");
                return 1;
            }
        },
        None => None,
    };
    let control = daemon.control();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: waits for one of the blocked signals in `signals`.
            if unsafe { libc::sigwait(&signals, &mut signal) } == 0 {
                tracing::info!("signal {signal}: shutting down");
                let _ = control.shutdown();
            }
        });
    // On shutdown the daemon stops the server (no request is left in flight) and cancels
    // its block jobs before its final flush.
    let stop_server = move || {
        if let Some(server) = server {
            server.stop();
        }
    };
    match daemon.run(stop_server) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snapvmm vhost-user-blk: error: {e}");
            1
        }
    }
}

/// SIGINT and SIGTERM as a signal set.
fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
