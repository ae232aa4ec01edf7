//! `snapvmm ctl`: drive a running VM through its API socket, with virsh's verbs.
//!
//! ```text
//! snapvmm ctl --api-socket vm.sock info
//! snapvmm ctl --api-socket vm.sock domblklist
//! snapvmm ctl --api-socket vm.sock snapshot-create-as s1 --disk-only --atomic
//! snapvmm ctl --api-socket vm.sock blockpull vda --wait
//! snapvmm ctl --api-socket vm.sock blockcommit vda --active --pivot --wait
//! snapvmm ctl --api-socket vm.sock blockjob vda --info
//! ```
//!
//! Every verb takes `--json` to print the API's answer instead of a table.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vmm::api::client::ClientError;
use vmm::api::types::{
    CommitRequest, DiskInfo, JobInfo, SnapshotCreate, SnapshotResult, SpeedRequest, StreamRequest,
};
use vmm::api::{ApiClient, VmInfo};

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
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM.
    Shutdown,
    /// List the disks and their files.
    Domblklist,
    /// Take an external snapshot of the disks.
    #[command(name = "snapshot-create-as")]
    SnapshotCreateAs {
        /// The snapshot's name.
        name: String,
        /// A description.
        description: Option<String>,
        /// Snapshot the disks only (the only kind supported; required, as with virsh).
        #[arg(long)]
        disk_only: bool,
        /// Switch every disk or none.
        #[arg(long)]
        atomic: bool,
    },
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
            atomic,
        } => {
            if !disk_only {
                return Err(CtlError::Usage(
                    "only disk-only snapshots are supported: add --disk-only".into(),
                ));
            }
            let request = SnapshotCreate {
                name,
                description,
                disks: None,
                atomic,
            };
            let result: SnapshotResult =
                client.call_json("PUT", "/snapshot/disk", Some(&request))?;
            if json {
                return print_json(&result);
            }
            println!("Domain snapshot {} created", result.name);
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

/// Polls `disk`'s job until `done`, drawing a progress bar unless `quiet`.
fn wait_for(
    client: &ApiClient,
    disk: &str,
    quiet: bool,
    done: impl Fn(&JobInfo) -> bool,
) -> Result<JobInfo, CtlError> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    };
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
