//! The `snapvmm` binary: one executable with a subcommand per job.
//!
//! Today it carries the image tool (`snapvmm img ...`, qemu-img's verbs on snapvmm's own
//! storage engine). The VMM's `run`, `restore`, `ctl` and `vhost-user-blk` subcommands join
//! the [`Command`] enum as their layers land.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod checkpoint;
mod clone;
mod confine;
mod ctl;
mod demo;
mod img;
mod jail;
mod restore;
mod run;
mod serve;
mod store;
mod vhost_user_blk;

/// Command line of the `snapvmm` binary.
#[derive(Debug, Parser)]
#[command(
    name = "snapvmm",
    version,
    about = "A snapshot-centred KVM micro-VMM",
    disable_help_subcommand = true
)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The top-level subcommands. Deferred: clap builds the arguments of the one subcommand
/// invoked (all of them only for `--help`), not the whole tree on every start; a process
/// start (`snapvmm restore`'s, on a clone's critical path) skips the allocations and page
/// faults of every other subcommand's definition.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum Command {
    /// Create, inspect, check, convert and exercise disk images (qemu-img's verbs).
    Img(img::ImgArgs),
    /// Boot a VM: the built-in micro-guest or a Linux kernel, with virtio-blk disks.
    Run(run::RunArgs),
    /// Drive a running VM through its API socket (virsh's verbs).
    Ctl(ctl::CtlArgs),
    /// Boot the micro-guest on a new qcow2 disk and snapshot, stream and commit it live.
    Demo(demo::DemoArgs),
    /// Start a VM from a checkpoint directory, where it was saved.
    Restore(restore::RestoreArgs),
    /// Work on checkpoint directories offline (merge a diff chain, show one).
    Checkpoint(checkpoint::CheckpointArgs),
    /// Serve a disk to another VMM's guest as a vhost-user-blk backend.
    VhostUserBlk(vhost_user_blk::VhostUserBlkArgs),
    /// Start VMs from a snapshot of a tree, each on its own overlays (no running VM needed).
    Clone(clone::CloneArgs),
    /// Measure snapshot latency on this machine, beside QEMU when installed; JSON/HTML report.
    Bench(bench::BenchArgs),
    /// Snapshots in an S3-compatible store: push, pull, ls, rm, gc.
    Snapshot(store::SnapshotArgs),
    /// Run `run`, `restore` or `vhost-user-blk` confined: namespaces, a chroot, no privileges.
    Jail(jail::JailArgs),
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`snapvmm img map big.qcow2 | head`), as C tools such as
    // qemu-img do, instead of panicking in `println!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors exit 1, as qemu-img's do: clap's default status 2 would read as
            // "corruptions found" to a script driving `snapvmm img check`. The message gets
            // the same "snapvmm img: error:" prefix as every other error of the tool.
            let prefix = match std::env::args().nth(1).as_deref() {
                Some("img") => "snapvmm img",
                _ => "snapvmm",
            };
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("{prefix}: error: {text}");
            return ExitCode::from(1);
        }
    };
    let code = match cli.command {
        Command::Img(args) => img::main(args),
        Command::Run(args) => run::main(args),
        Command::Ctl(args) => ctl::main(args),
        Command::Demo(args) => demo::main(args),
        Command::Restore(args) => restore::main(args),
        Command::Checkpoint(args) => checkpoint::main(args),
        Command::VhostUserBlk(args) => vhost_user_blk::main(args),
        Command::Clone(args) => clone::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Snapshot(args) => store::main(args),
        Command::Jail(args) => jail::main(args),
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// The subcommands' arguments are deferred (built only when invoked), so clap's own
    /// consistency checks no longer run over the whole tree at every start: run them here.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
