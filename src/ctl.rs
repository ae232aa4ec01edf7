//! `snapvmm ctl`: drive a running VM through its API socket, with virsh's verbs.
//!
//! ```text
//! snapvmm ctl --api-socket vm.sock info
//! snapvmm ctl --api-socket vm.sock domblklist
//! snapvmm ctl --api-socket vm.sock checkpoint-save ckpt1 --live
//! snapvmm ctl --api-socket vm.sock checkpoint-save ckpt2 --incremental
//! snapvmm ctl --api-socket vm.sock checkpoint-revert ckpt1
//! snapvmm ctl --api-socket vm.sock snapshot-create-as s1 --disk-only --atomic
//! snapvmm ctl --api-socket vm.sock snapshot-create-as q1 --disk-only --quiesce
//! snapvmm ctl --api-socket vm.sock agent-status
//! snapvmm ctl --api-socket vm.sock snapshot-create-as s2 "with memory"
//! snapvmm ctl --api-socket vm.sock snapshot-create-as s3 --internal
//! snapvmm ctl --api-socket vm.sock snapshot-list --tree
//! snapvmm ctl --api-socket vm.sock snapshot-revert s1
//! snapvmm ctl --api-socket vm.sock snapshot-delete s2 --children
//! snapvmm ctl --api-socket vm.sock blockpull vda --wait
//! snapvmm ctl --api-socket vm.sock blockcommit vda --active --pivot --wait
//! snapvmm ctl --api-socket vm.sock blockjob vda --info
//! snapvmm ctl --api-socket vm.sock clone s2 --count 8 --dir /srv/clones
//! snapvmm ctl --api-socket vm.sock clone-list s2
//! snapvmm ctl --api-socket vm.sock clone-destroy /srv/clones/clone-3
//! snapvmm ctl --api-socket vm.sock fork --count 2 --dir /srv/forks
//! ```
//!
//! Every verb takes `--json` to print the API's answer instead of a table.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use snapvmm_api::types::{
    AgentStatus, CommitRequest, DiskInfo, JobInfo, SnapshotCreate, SnapshotDeleteRequest,
    SnapshotDeleteResult, SnapshotInfo, SnapshotResult, SpeedRequest, StreamRequest,
    TreeSnapshotCreate,
};
use snapvmm_api::types::{CheckpointReport, CheckpointRequest, RevertRequest, RevertResult};
use snapvmm_api::types::{
    CloneDestroyRequest, CloneInfo, CloneRecord, CloneRequest, ForkRequest, ForkResult,
};
use snapvmm_api::Error as ClientError;
use snapvmm_api::{ApiClient, VmInfo};

/// How often `--wait` looks at a job.
const POLL: Duration = Duration::from_millis(50);

/// Arguments of `snapvmm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API socket (`snapvmm run --api-socket` or `snapvmm vhost-user-blk --api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the API's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// What to do.
    #[command(subcommand)]
    verb: Verb,
}

/// The verbs, named after virsh's.
#[derive(Debug, Subcommand)]
enum Verb {
    /// Show the VM's state and shape.
    Info,
    /// Start VMs from snapshot NAME (with memory), each on its own overlays in DIR/clone-K.
    Clone {
        /// The snapshot.
        name: String,
        /// How many clones (1 to 64).
        #[arg(long, value_name = "N")]
        count: u32,
        /// Where the clones' directories go (created if absent).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// List the clones of snapshot NAME.
    #[command(name = "clone-list")]
    CloneList {
        /// The snapshot.
        name: String,
    },
    /// Stop a clone (or fork child) and remove its directory.
    #[command(name = "clone-destroy")]
    CloneDestroy {
        /// The clone's directory.
        dir: PathBuf,
    },
    /// Live fork: the VM goes on on fresh overlays, N children start from the same instant.
    Fork {
        /// How many children (1 to 64).
        #[arg(long, value_name = "N")]
        count: u32,
        /// Where the fork's checkpoint and the children's directories go.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM.
    Shutdown,
    /// Save a memory, vCPU and device checkpoint of the running VM into DIR.
    #[command(name = "checkpoint-save")]
    CheckpointSave {
        /// The checkpoint directory (created if absent).
        dir: PathBuf,
        /// Copy memory while the guest runs; stop it only briefly at the end.
        #[arg(long)]
        live: bool,
        /// Save only what changed since the VM's last checkpoint, as a diff on it.
        #[arg(long)]
        incremental: bool,
        /// Replace a checkpoint already in DIR (refused when a diff or the VM depends on it).
        #[arg(long)]
        replace: bool,
    },
    /// Return the running VM to the checkpoint in DIR, in place (disks are not changed).
    #[command(name = "checkpoint-revert")]
    CheckpointRevert {
        /// The checkpoint directory (a full checkpoint or the top of a diff chain).
        dir: PathBuf,
    },
    /// List the disks and their files.
    Domblklist,
    /// Take a snapshot of every writable disk, with the VM's memory unless --disk-only; it
    /// becomes the current snapshot.
    #[command(name = "snapshot-create-as")]
    SnapshotCreateAs {
        /// The snapshot's name.
        name: String,
        /// A description.
        description: Option<String>,
        /// Snapshot the disks only, not the memory.
        #[arg(long)]
        disk_only: bool,
        /// Take qcow2 internal snapshots (VM state in the first disk's VM-state area).
        #[arg(long)]
        internal: bool,
        /// Switch every disk or none (always so).
        #[arg(long)]
        atomic: bool,
        /// Freeze the guest's filesystems through its agent around the snapshot (needs
        /// --disk-only and a --guest-agent); fails if they cannot be frozen.
        #[arg(long)]
        quiesce: bool,
        /// With --quiesce: take the snapshot unquiesced if the agent cannot freeze.
        #[arg(long, requires = "quiesce")]
        quiesce_best_effort: bool,
    },
    /// Ask the guest agent whether the filesystems are frozen; show the last quiesce.
    #[command(name = "agent-status")]
    AgentStatus,
    /// Revert the running VM to a snapshot, which becomes current.
    #[command(name = "snapshot-revert")]
    SnapshotRevert {
        /// The snapshot.
        name: String,
    },
    /// Delete a snapshot, merging images so no other snapshot changes.
    #[command(name = "snapshot-delete")]
    SnapshotDelete {
        /// The snapshot.
        name: String,
        /// Delete its descendants too.
        #[arg(long)]
        children: bool,
        /// Only forget it: leave its images and checkpoint as they are.
        #[arg(long)]
        metadata: bool,
    },
    /// List the snapshots.
    #[command(name = "snapshot-list")]
    SnapshotList {
        /// Draw the parent/child tree.
        #[arg(long)]
        tree: bool,
    },
    /// Show one snapshot.
    #[command(name = "snapshot-info")]
    SnapshotInfo {
        /// The snapshot.
        name: String,
    },
    /// Show the current snapshot's name.
    #[command(name = "snapshot-current")]
    SnapshotCurrent,
    /// Pull the backing chain's data into the active layer.
    Blockpull {
        /// The disk.
        disk: String,
        /// Keep this layer as the backing file.
        #[arg(long, value_name = "FILE")]
        base: Option<String>,
        /// Speed limit in bytes per second.
        #[arg(long, value_name = "BYTES")]
        bandwidth: Option<u64>,
        /// Wait for the job to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Commit layers into a base.
    Blockcommit {
        /// The disk.
        disk: String,
        /// The top of the range (an intermediate layer).
        #[arg(long, value_name = "FILE", conflicts_with = "active")]
        top: Option<String>,
        /// The layer to commit into.
        #[arg(long, value_name = "FILE")]
        base: Option<String>,
        /// Commit the active layer.
        #[arg(long)]
        active: bool,
        /// With --active --wait: switch to the base once it is in sync.
        #[arg(long, requires = "active")]
        pivot: bool,
        /// Speed limit in bytes per second.
        #[arg(long, value_name = "BYTES")]
        bandwidth: Option<u64>,
        /// Wait for the job to finish (or, for --active, to be ready), with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Look at or steer a disk's block job.
    Blockjob {
        /// The disk.
        disk: String,
        /// Show the job (the default).
        #[arg(long, group = "action")]
        info: bool,
        /// Cancel the job.
        #[arg(long, group = "action")]
        abort: bool,
        /// Complete a ready active commit: switch to the base.
        #[arg(long, group = "action")]
        pivot: bool,
        /// Set the speed limit in bytes per second.
        #[arg(long, value_name = "BYTES", group = "action")]
        bandwidth: Option<u64>,
    },
}

/// A failure of a verb.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    /// The API call failed or answered with an error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The verb's arguments do not fit together.
    #[error("{0}")]
    Usage(String),
    /// A waited-for job did not complete.
    #[error("{0}")]
    Job(String),
    /// Setting up the client failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs `snapvmm ctl`; returns the process exit status.
pub fn main(args: CtlArgs) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snapvmm ctl: error: {e}");
            1
        }
    }
}

fn print_json(value: &impl Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CtlError::Job(format!("encoding JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn job_path(disk: &str, verb: &str) -> String {
    format!("/disks/{disk}/job{verb}")
}

fn job_title(job: &JobInfo) -> &'static str {
    match job.kind.as_str() {
        "stream" => "Block Pull",
        _ => "Block Commit",
    }
}

/// " (filesystems frozen N ms)" after a quiesced snapshot, or nothing.
fn frozen_note(frozen_us: Option<u64>) -> String {
    frozen_us
        .map(|us| format!(" (filesystems frozen {:.3} ms)", us as f64 / 1000.0))
        .unwrap_or_default()
}

fn percent(job: &JobInfo) -> u64 {
    job.current
        .saturating_mul(100)
        .checked_div(job.total)
        .unwrap_or(100)
}

fn run(args: CtlArgs) -> Result<(), CtlError> {
    let client = ApiClient::new(&args.api_socket)?;
    let json = args.json;
    let none = None::<&()>;
    match args.verb {
        Verb::Info => {
            let info: VmInfo = client.get("/vm")?;
            if json {
                return print_json(&info);
            }
            let state = serde_json::to_value(info.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            println!("{:<16}{state}", "State:");
            println!("{:<16}{}", "CPU(s):", info.vcpus);
            println!("{:<16}{} MiB", "Memory:", info.memory_mib);
            println!("{:<16}{}", "Disks:", info.disks);
            println!("{:<16}{}", "Version:", info.version);
        }
        Verb::Pause | Verb::Resume | Verb::Shutdown => {
            let (path, done) = match args.verb {
                Verb::Pause => ("/vm/pause", "paused"),
                Verb::Resume => ("/vm/resume", "resumed"),
                _ => ("/vm/shutdown", "is being shut down"),
            };
            client.call("PUT", path, none)?;
            if json {
                return print_json(&serde_json::json!({ "ok": true }));
            }
            println!("Domain {done}");
        }
        Verb::CheckpointSave {
            dir,
            live,
            incremental,
            replace,
        } => {
            // The VMM may run in another directory: send an absolute path.
            let request = CheckpointRequest {
                dir: std::path::absolute(&dir)?,
                live,
                incremental,
                replace,
            };
            let report: CheckpointReport =
                client.call_json("PUT", "/vm/checkpoint", Some(&request))?;
            if json {
                return print_json(&report);
            }
            let kind = if report.base.is_some() {
                "diff"
            } else {
                "full"
            };
            println!(
                "Checkpoint {} saved ({kind}, {} pages written, paused {:.3} ms)",
                report.dir.display(),
                report.pages_written,
                report.pause_us as f64 / 1000.0
            );
        }
        Verb::CheckpointRevert { dir } => {
            let request = RevertRequest {
                dir: std::path::absolute(&dir)?,
            };
            let result: RevertResult =
                client.call_json("PUT", "/vm/checkpoint/revert", Some(&request))?;
            if json {
                return print_json(&result);
            }
            println!(
                "Domain reverted to checkpoint {} (paused {:.3} ms)",
                result.dir.display(),
                result.pause_us as f64 / 1000.0
            );
        }
        Verb::Domblklist => {
            let disks: Vec<DiskInfo> = client.get("/disks")?;
            if json {
                return print_json(&disks);
            }
            println!(" {:<8} Source", "Target");
            println!("{}", "-".repeat(40));
            for disk in disks {
                println!(" {:<8} {}", disk.name, disk.source);
            }
        }
        Verb::SnapshotCreateAs {
            name,
            description,
            disk_only,
            internal,
            atomic,
            quiesce,
            quiesce_best_effort,
        } => {
            let request = TreeSnapshotCreate {
                name: name.clone(),
                description: description.clone(),
                disk_only,
                internal,
                atomic,
                quiesce,
                quiesce_best_effort,
            };
            match client.call_json::<SnapshotInfo>("PUT", "/snapshots", Some(&request)) {
                Ok(info) => {
                    if json {
                        return print_json(&info);
                    }
                    // The tree's answer has no room for it: the frozen time is the agent's.
                    let frozen = if quiesce {
                        client
                            .get::<AgentStatus>("/vm/agent")
                            .ok()
                            .and_then(|s| s.last_quiesce)
                            .filter(|q| q.snapshot == info.name)
                            .and_then(|q| q.frozen_us)
                    } else {
                        None
                    };
                    println!(
                        "Domain snapshot {} created{}",
                        info.name,
                        frozen_note(frozen)
                    );
                    return Ok(());
                }
                Err(ClientError::Status { status: 501, .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // A VM without a snapshot tree still takes plain disk-only snapshots.
            if !disk_only || internal {
                return Err(CtlError::Usage(
                    "this VM keeps no snapshot tree: only external snapshots with --disk-only"
                        .into(),
                ));
            }
            let request = SnapshotCreate {
                name,
                description,
                disks: None,
                atomic,
                quiesce,
                quiesce_best_effort,
            };
            let result: SnapshotResult =
                client.call_json("PUT", "/snapshot/disk", Some(&request))?;
            if json {
                return print_json(&result);
            }
            println!(
                "Domain snapshot {} created{}",
                result.name,
                frozen_note(result.frozen_us)
            );
        }
        Verb::AgentStatus => {
            let status: AgentStatus = client.get("/vm/agent")?;
            if json {
                return print_json(&status);
            }
            println!("{:<16}{}", "Agent:", status.endpoint);
            println!("{:<16}{}", "Filesystems:", status.fsfreeze);
            if let Some(last) = status.last_quiesce {
                let what = match (last.frozen_us, &last.skipped) {
                    (Some(us), _) => format!(
                        "{} filesystem(s) frozen {:.3} ms",
                        last.filesystems,
                        us as f64 / 1000.0
                    ),
                    (None, Some(why)) => format!("taken unquiesced: {why}"),
                    (None, None) => "taken unquiesced".to_string(),
                };
                println!("{:<16}{} ({what})", "Last quiesce:", last.snapshot);
            }
        }
        Verb::SnapshotRevert { name } => {
            let info: SnapshotInfo =
                client.call_json("PUT", &format!("/snapshots/{}/revert", encode(&name)), none)?;
            if json {
                return print_json(&info);
            }
            println!("Domain reverted to snapshot {}", info.name);
        }
        Verb::SnapshotDelete {
            name,
            children,
            metadata,
        } => {
            let request = SnapshotDeleteRequest { children, metadata };
            let result = delete_with_progress(&args.api_socket, &name, request, json)?;
            if json {
                return print_json(&result);
            }
            if children {
                println!("Domain snapshot {name} and its children deleted");
            } else {
                println!("Domain snapshot {name} deleted");
            }
        }
        Verb::SnapshotList { tree } => {
            let list: Vec<SnapshotInfo> = client.get("/snapshots")?;
            if json {
                return print_json(&list);
            }
            if tree {
                print_tree(&list);
                return Ok(());
            }
            println!(
                " {:<20} {:<26} {:<9} Kind",
                "Name", "Creation Time", "State"
            );
            println!("{}", "-".repeat(80));
            for s in &list {
                println!(
                    " {:<20} {:<26} {:<9} {}",
                    s.name,
                    format_time(s.created),
                    s.state,
                    s.kind
                );
            }
        }
        Verb::SnapshotInfo { name } => {
            let info: SnapshotInfo = client.get(&format!("/snapshots/{}", encode(&name)))?;
            if json {
                return print_json(&info);
            }
            let list: Vec<SnapshotInfo> = client.get("/snapshots")?;
            let current = client
                .get::<SnapshotInfo>("/current-snapshot")
                .ok()
                .map(|c| c.name);
            let children = list
                .iter()
                .filter(|s| s.parent.as_deref() == Some(&info.name))
                .count();
            let row = |k: &str, v: &dyn std::fmt::Display| println!("{:<16}{v}", format!("{k}:"));
            row("Name", &info.name);
            row("Description", &info.description.as_deref().unwrap_or("-"));
            row("Creation Time", &format_time(info.created));
            row(
                "Current",
                &if current.as_deref() == Some(&info.name) {
                    "yes"
                } else {
                    "no"
                },
            );
            row("State", &info.state);
            row("Kind", &info.kind);
            row("Memory", &if info.memory { "yes" } else { "no" });
            row("Parent", &info.parent.as_deref().unwrap_or("-"));
            row("Children", &children);
            row("Descendants", &descendants(&list, &info.name));
            for d in &info.disks {
                row(&format!("Disk {}", d.disk), &d.image.display());
            }
            if let Some(dir) = &info.checkpoint {
                row("Checkpoint", &dir.display());
            }
        }
        Verb::Clone { name, count, dir } => {
            let request = CloneRequest {
                count,
                dir: std::path::absolute(&dir)?,
            };
            let path = format!("/snapshots/{}/clone", encode(&name));
            let clones: Vec<CloneInfo> = client.call_json("PUT", &path, Some(&request))?;
            crate::clone::print_clones(&clones, json).map_err(CtlError::Job)?;
        }
        Verb::CloneList { name } => {
            let records: Vec<CloneRecord> =
                client.get(&format!("/snapshots/{}/clones", encode(&name)))?;
            crate::clone::print_records(&records, json).map_err(CtlError::Job)?;
        }
        Verb::CloneDestroy { dir } => {
            let request = CloneDestroyRequest {
                dir: std::path::absolute(&dir)?,
            };
            let record: CloneRecord = client.call_json("PUT", "/clones/destroy", Some(&request))?;
            if json {
                return print_json(&record);
            }
            println!("Clone {} destroyed", record.clone.dir.display());
        }
        Verb::Fork { count, dir } => {
            let request = ForkRequest {
                count,
                dir: std::path::absolute(&dir)?,
            };
            let result: ForkResult = client.call_json("PUT", "/vm/fork", Some(&request))?;
            if json {
                return crate::clone::print_clones(&result.clones, true).map_err(CtlError::Job);
            }
            eprintln!(
                "Domain forked at checkpoint {} (paused {:.3} ms)",
                result.checkpoint.display(),
                result.pause_us as f64 / 1000.0
            );
            crate::clone::print_clones(&result.clones, false).map_err(CtlError::Job)?;
        }
        Verb::SnapshotCurrent => {
            let info: SnapshotInfo = client.get("/current-snapshot")?;
            if json {
                return print_json(&info);
            }
            println!("{}", info.name);
        }
        Verb::Blockpull {
            disk,
            base,
            bandwidth,
            wait,
        } => {
            let request = StreamRequest {
                base,
                speed: bandwidth.unwrap_or(0),
            };
            let job: JobInfo =
                client.call_json("PUT", &format!("/disks/{disk}/stream"), Some(&request))?;
            if !wait {
                return if json {
                    print_json(&job)
                } else {
                    println!("Block Pull started");
                    Ok(())
                };
            }
            let job = wait_for(&client, &disk, json, |j| j.status == "concluded")?;
            finish(&job, json, "Pull complete")?;
        }
        Verb::Blockcommit {
            disk,
            top,
            base,
            active,
            pivot,
            bandwidth,
            wait,
        } => {
            if pivot && !wait {
                return Err(CtlError::Usage("--pivot needs --wait".into()));
            }
            let request = CommitRequest {
                top,
                base,
                active,
                speed: bandwidth.unwrap_or(0),
            };
            let job: JobInfo =
                client.call_json("PUT", &format!("/disks/{disk}/commit"), Some(&request))?;
            if !wait {
                return if json {
                    print_json(&job)
                } else {
                    println!(
                        "{}Block Commit started",
                        if active { "Active " } else { "" }
                    );
                    Ok(())
                };
            }
            if !active {
                let job = wait_for(&client, &disk, json, |j| j.status == "concluded")?;
                return finish(&job, json, "Commit complete");
            }
            let job = wait_for(&client, &disk, json, |j| {
                j.status == "ready" || j.status == "concluded"
            })?;
            if job.status == "concluded" {
                return finish(&job, json, "Commit complete");
            }
            if !pivot {
                return if json {
                    print_json(&job)
                } else {
                    println!("Now in synchronized phase");
                    Ok(())
                };
            }
            client.call("PUT", &job_path(&disk, "/complete"), none)?;
            let job = wait_for(&client, &disk, true, |j| j.status == "concluded")?;
            finish(&job, json, "Successfully pivoted")?;
        }
        Verb::Blockjob {
            disk,
            info: _,
            abort,
            pivot,
            bandwidth,
        } => {
            let job: JobInfo = if abort {
                client.call_json("PUT", &job_path(&disk, "/cancel"), none)?
            } else if pivot {
                client.call_json("PUT", &job_path(&disk, "/complete"), none)?
            } else if let Some(speed) = bandwidth {
                client.call_json(
                    "PUT",
                    &job_path(&disk, "/speed"),
                    Some(&SpeedRequest { speed }),
                )?
            } else {
                client.get(&job_path(&disk, ""))?
            };
            if json {
                return print_json(&job);
            }
            if abort {
                println!("Job {} cancelled", job.id);
            } else if pivot {
                println!("Job {} pivoting", job.id);
            } else if bandwidth.is_some() {
                println!("Job {} speed set to {} bytes/s", job.id, job.speed);
            } else {
                println!(
                    "{}: [{:>3} %] {} ({} of {} bytes)",
                    job_title(&job),
                    percent(&job),
                    job.status,
                    job.current,
                    job.total
                );
            }
        }
    }
    Ok(())
}

/// The progress bar of a block job (hidden when `quiet`).
fn job_bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Polls `disk`'s job until `done`, drawing a progress bar unless `quiet`.
fn wait_for(
    client: &ApiClient,
    disk: &str,
    quiet: bool,
    done: impl Fn(&JobInfo) -> bool,
) -> Result<JobInfo, CtlError> {
    let bar = job_bar(quiet);
    loop {
        let job: JobInfo = client.get(&job_path(disk, ""))?;
        bar.set_message(format!("{} {}", job_title(&job), job.status));
        bar.set_length(job.total);
        bar.set_position(job.current);
        if done(&job) {
            bar.finish_and_clear();
            return Ok(job);
        }
        std::thread::sleep(POLL);
    }
}

/// Reports a concluded job: success prints `message`, anything else is an error.
fn finish(job: &JobInfo, json: bool, message: &str) -> Result<(), CtlError> {
    if job.outcome.as_deref() != Some("completed") {
        return Err(CtlError::Job(format!(
            "job {} {}: {}",
            job.id,
            job.outcome.as_deref().unwrap_or("did not conclude"),
            job.error.as_deref().unwrap_or("no error reported")
        )));
    }
    if json {
        print_json(job)
    } else {
        println!("{message}");
        Ok(())
    }
}

/// Percent-encodes a snapshot name for a path segment.
fn encode(name: &str) -> String {
    let mut out = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `seconds` since the epoch as `YYYY-MM-DD HH:MM:SS +0000` (virsh's format, in UTC).
fn format_time(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} +0000",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn descendants(list: &[SnapshotInfo], name: &str) -> usize {
    list.iter()
        .filter(|s| s.parent.as_deref() == Some(name))
        .map(|s| 1 + descendants(list, &s.name))
        .sum()
}

/// Prints the snapshots as virsh `snapshot-list --tree` does.
fn print_tree(list: &[SnapshotInfo]) {
    fn visit(list: &[SnapshotInfo], name: &str, prefix: &str) {
        let children: Vec<&SnapshotInfo> = list
            .iter()
            .filter(|s| s.parent.as_deref() == Some(name))
            .collect();
        for (i, child) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            println!("{prefix}  |");
            println!("{prefix}  +- {}", child.name);
            let deeper = format!("{prefix}  {}", if last { "  " } else { "| " });
            visit(list, &child.name, &deeper);
        }
    }
    for root in list.iter().filter(|s| s.parent.is_none()) {
        println!("{}", root.name);
        visit(list, &root.name, "");
        println!();
    }
}

/// Deletes a snapshot while a second connection draws the progress of the merge jobs the
/// delete runs.
fn delete_with_progress(
    socket: &std::path::Path,
    name: &str,
    request: SnapshotDeleteRequest,
    quiet: bool,
) -> Result<SnapshotDeleteResult, CtlError> {
    let path = format!("/snapshots/{}/delete", encode(name));
    let worker_socket = socket.to_path_buf();
    let worker = std::thread::spawn(move || -> Result<SnapshotDeleteResult, CtlError> {
        let client = ApiClient::new(&worker_socket)?;
        Ok(client.call_json("PUT", &path, Some(&request))?)
    });
    let bar = job_bar(quiet);
    let client = ApiClient::new(socket)?;
    while !worker.is_finished() {
        if let Ok(jobs) = client.get::<Vec<JobInfo>>("/snapshot-jobs") {
            if let Some(job) = jobs.first() {
                bar.set_message(format!("Merging ({} on {})", job.kind, job.disk));
                bar.set_length(job.total);
                bar.set_position(job.current);
            }
        }
        std::thread::sleep(POLL);
    }
    bar.finish_and_clear();
    worker
        .join()
        .map_err(|_| CtlError::Job("the delete request's thread panicked".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_names_format_like_virsh() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 +0000");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20 +0000");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 +0000");
        assert_eq!(encode("a b/ç"), "a%20b%2F%C3%A7");
    }
}
