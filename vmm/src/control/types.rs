//! The values [`super::Control`] takes and answers: requests and results, one serde type each.
//!
//! They are also the REST API's JSON bodies (`docs/openapi.json`), which is why they derive
//! serde with fixed field names: a program embedding the VMM and a client of the HTTP API
//! speak the same types.

use serde::{Deserialize, Serialize};

pub use crate::checkpoint::CheckpointReport;

/// Whether the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are held outside `KVM_RUN`.
    Paused,
    /// The VM was asked to stop and is tearing down.
    ShuttingDown,
}

/// `GET /vm`: what the VM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Its state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of disks.
    pub disks: usize,
    /// The VMM's version.
    pub version: String,
}

/// One disk as `GET /disks` lists it (virsh `domblklist`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk's name: vda, vdb, ... or its id.
    pub name: String,
    /// The file of its active layer.
    pub source: String,
    /// The active layer's format.
    pub format: String,
    /// Its virtual size in bytes.
    pub size: u64,
    /// Whether the guest sees it read-only.
    pub read_only: bool,
    /// The backing chain below the active layer, top first.
    pub backing_chain: Vec<String>,
    /// The job running on it, if any.
    pub job: Option<String>,
}

/// One disk of an external snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDisk {
    /// The disk's name.
    pub disk: String,
    /// Where its overlay goes; by default beside the active layer, named after the snapshot.
    #[serde(default)]
    pub overlay: Option<String>,
}

/// `PUT /snapshot/disk`: an external disk-only snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The snapshot's name (used in the default overlay file names).
    pub name: String,
    /// A free-form description.
    #[serde(default)]
    pub description: Option<String>,
    /// The disks to snapshot; every writable disk when absent.
    #[serde(default)]
    pub disks: Option<Vec<SnapshotDisk>>,
    /// Switch every disk or none; otherwise disks are switched one after the other.
    #[serde(default)]
    pub atomic: bool,
    /// Freeze the guest's filesystems through its agent around the snapshot (virsh
    /// `--quiesce`); fails if the agent cannot freeze them, unless `quiesce_best_effort`.
    #[serde(default)]
    pub quiesce: bool,
    /// With `quiesce`: take the snapshot unquiesced when the agent is missing, does not
    /// answer in time or cannot freeze (the result then reports no frozen time).
    #[serde(default)]
    pub quiesce_best_effort: bool,
}

/// One disk switched by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDiskResult {
    /// The disk.
    pub disk: String,
    /// Its new active layer.
    pub overlay: String,
    /// Its previous active layer, now read-only.
    pub previous: String,
}

/// The answer to `PUT /snapshot/disk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotResult {
    /// The snapshot's name.
    pub name: String,
    /// The disks switched.
    pub disks: Vec<SnapshotDiskResult>,
    /// How long guest I/O was held, in microseconds (the longest, when not atomic).
    pub quiesced_us: u64,
    /// With `quiesce`: how long the guest's filesystems stayed frozen, in microseconds, from
    /// the freeze request to the thaw's answer; absent when not quiesced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_us: Option<u64>,
}

pub use snapshot::tree::{DiskImage, SnapshotInfo};

/// `PUT /snapshots`: a snapshot of every writable disk into the VM's snapshot tree (virsh
/// `snapshot-create-as`). External with memory by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeSnapshotCreate {
    /// The snapshot's name, unique in the tree.
    pub name: String,
    /// A free-form description.
    #[serde(default)]
    pub description: Option<String>,
    /// The disks only, no memory.
    #[serde(default)]
    pub disk_only: bool,
    /// A qcow2 internal snapshot in each disk (with the VM state unless `disk_only`).
    #[serde(default)]
    pub internal: bool,
    /// All disks or none (always so; accepted for virsh's `--atomic`).
    #[serde(default)]
    pub atomic: bool,
    /// Freeze the guest's filesystems through its agent around the snapshot (virsh
    /// `--quiesce`); fails if the agent cannot freeze them, unless `quiesce_best_effort`.
    /// The frozen time is in `GET /vm/agent`'s `last_quiesce`.
    #[serde(default)]
    pub quiesce: bool,
    /// With `quiesce`: take the snapshot unquiesced when the agent is missing, does not
    /// answer in time or cannot freeze.
    #[serde(default)]
    pub quiesce_best_effort: bool,
}

/// The last quiesced snapshot: how long the guest stayed frozen, or why it was not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceReport {
    /// The snapshot.
    pub snapshot: String,
    /// How long the filesystems stayed frozen, in microseconds, from the freeze request to
    /// the thaw's answer; absent when the snapshot was taken unquiesced (best effort).
    pub frozen_us: Option<u64>,
    /// How many filesystems the agent froze.
    pub filesystems: u64,
    /// Why a best-effort snapshot was taken unquiesced.
    pub skipped: Option<String>,
}

/// `GET /vm/agent`: the guest agent, as it answers now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Where the agent is (`--guest-agent`).
    pub endpoint: String,
    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    pub fsfreeze: String,
    /// The last snapshot asked to quiesce, if any.
    pub last_quiesce: Option<QuiesceReport>,
}

/// `PUT /snapshots/{name}/delete` (virsh `snapshot-delete`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDeleteRequest {
    /// Delete its descendants too.
    #[serde(default)]
    pub children: bool,
    /// Only forget it: leave images and checkpoints as they are.
    #[serde(default)]
    pub metadata: bool,
}

/// The answer to `PUT /snapshots/{name}/delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDeleteResult {
    /// The snapshots deleted, children before parents.
    pub deleted: Vec<String>,
}

/// `PUT /snapshots/{name}/push`: upload the snapshot into a snapshot store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPush {
    /// The store: `s3://BUCKET/PREFIX` (endpoint and credentials are the VM process's).
    pub store: String,
    /// Replace a snapshot of the same name in the store.
    #[serde(default)]
    pub replace: bool,
}

/// The answer to `PUT /snapshots/{name}/push`: what the upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPushResult {
    /// The snapshot's name in the store.
    pub name: String,
    /// Its manifest's key (bucket-relative).
    pub manifest: String,
    /// Bytes of memory and disk read.
    pub bytes_scanned: u64,
    /// Bytes of chunk data uploaded.
    pub bytes_uploaded: u64,
    /// Non-zero chunks the snapshot references.
    pub chunks: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Chunk references that needed no upload.
    pub chunks_reused: u64,
    /// Chunks of zeroes (not stored).
    pub zero_chunks: u64,
}

/// `PUT /disks/{disk}/stream` (virsh `blockpull`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    /// Stop at this layer (kept as the new backing file); the whole chain when absent.
    #[serde(default)]
    pub base: Option<String>,
    /// Speed limit in bytes per second (0: unlimited).
    #[serde(default)]
    pub speed: u64,
}

/// `PUT /disks/{disk}/commit` (virsh `blockcommit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The top of the range to commit; the active layer when absent (needs `active`).
    #[serde(default)]
    pub top: Option<String>,
    /// The layer to commit into; `top`'s backing file when absent.
    #[serde(default)]
    pub base: Option<String>,
    /// Commit the active layer (it then pivots on `complete`).
    #[serde(default)]
    pub active: bool,
    /// Speed limit in bytes per second (0: unlimited).
    #[serde(default)]
    pub speed: u64,
}

/// `PUT /disks/{disk}/job/speed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedRequest {
    /// Bytes per second (0: unlimited).
    pub speed: u64,
}

/// A block job (QEMU `query-jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// stream, commit or active-commit.
    pub kind: String,
    /// The disk it works on.
    pub disk: String,
    /// created, running, paused, ready, standby, aborting or concluded.
    pub status: String,
    /// Bytes done.
    pub current: u64,
    /// Bytes to do, as currently known.
    pub total: u64,
    /// Speed limit in bytes per second (0: unlimited).
    pub speed: u64,
    /// completed, cancelled or failed, once concluded.
    pub outcome: Option<String>,
    /// The error that ended it.
    pub error: Option<String>,
}

impl From<snapshot::JobInfo> for JobInfo {
    fn from(info: snapshot::JobInfo) -> Self {
        JobInfo {
            id: info.id,
            kind: info.kind.to_string(),
            disk: info.disk,
            status: info.status.to_string(),
            current: info.progress.current,
            total: info.progress.total,
            speed: info.speed,
            outcome: info.outcome.map(|o| {
                match o {
                    snapshot::JobOutcome::Completed => "completed",
                    snapshot::JobOutcome::Cancelled => "cancelled",
                    snapshot::JobOutcome::Failed => "failed",
                }
                .to_string()
            }),
            error: info.error,
        }
    }
}

/// `PUT /vm/checkpoint`: save the VM's memory, vCPU and device state into a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// The checkpoint directory (created if absent), on the VMM's host.
    pub dir: std::path::PathBuf,
    /// Copy memory while the guest runs; stop it only briefly at the end.
    #[serde(default)]
    pub live: bool,
    /// Save only what changed since the VM's last checkpoint (a diff naming it as base).
    #[serde(default)]
    pub incremental: bool,
    /// Replace a checkpoint already in `dir`; refused when anything depends on it (a diff
    /// names it as base, or it is the VM's current base). Without it an existing directory
    /// that is not empty is refused.
    #[serde(default)]
    pub replace: bool,
}

/// `PUT /vm/checkpoint/revert`: return the running VM to a checkpoint, in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// The checkpoint directory (a full checkpoint or the top of a diff chain).
    pub dir: std::path::PathBuf,
}

/// The answer to `PUT /vm/checkpoint/revert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertResult {
    /// The checkpoint loaded.
    pub dir: std::path::PathBuf,
    /// How long the vCPUs were stopped, in microseconds.
    pub pause_us: u64,
}

impl SnapshotCreate {
    /// Snapshot `name` of every writable disk, one disk after the other, overlays beside
    /// the active layers.
    pub fn new(name: impl Into<String>) -> Self {
        SnapshotCreate {
            name: name.into(),
            ..Default::default()
        }
    }
}

impl TreeSnapshotCreate {
    /// An external snapshot `name` with memory (the VM's state with its disks).
    pub fn with_memory(name: impl Into<String>) -> Self {
        TreeSnapshotCreate {
            name: name.into(),
            ..Default::default()
        }
    }

    /// An external disk-only snapshot `name`.
    pub fn disk_only(name: impl Into<String>) -> Self {
        TreeSnapshotCreate {
            name: name.into(),
            disk_only: true,
            ..Default::default()
        }
    }
}

impl CommitRequest {
    /// Commit the active layer into its backing file; the disk pivots on completion.
    pub fn active() -> Self {
        CommitRequest {
            active: true,
            ..Default::default()
        }
    }
}

impl CheckpointRequest {
    /// A full, paused checkpoint into `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        CheckpointRequest {
            dir: dir.into(),
            ..Default::default()
        }
    }
}

/// Most clones one request may start.
pub const MAX_CLONES: u32 = 64;

/// `PUT /snapshots/{name}/clone`: start `count` VMs from a snapshot with memory, each on its
/// own overlays in `dir/clone-K/`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// How many clones (1 to [`MAX_CLONES`]).
    pub count: u32,
    /// The directory the clones' directories go into (absolute; created if absent).
    pub dir: std::path::PathBuf,
}

/// `PUT /vm/fork`: a live fork of the running VM into `count` children in `dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children (1 to [`MAX_CLONES`]).
    pub count: u32,
    /// The directory the fork's checkpoint and the children's directories go into
    /// (absolute; created if absent).
    pub dir: std::path::PathBuf,
}

/// One clone started: a VM process of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneInfo {
    /// Its name, `clone-K`, unique in its directory's parent.
    pub id: String,
    /// Its REST API socket.
    pub api_socket: std::path::PathBuf,
    /// Its serial console log.
    pub serial: std::path::PathBuf,
    /// Its process id.
    pub pid: u32,
    /// Its directory (overlays, socket, console, log, snapshot tree).
    pub dir: std::path::PathBuf,
}

/// A clone as the clone registry keeps it (`GET /snapshots/{name}/clones`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRecord {
    /// The snapshot it was started from; `None` for a fork's child.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// The checkpoint it was started from.
    pub checkpoint: std::path::PathBuf,
    /// The images its overlays are built on (never written while it exists).
    pub backing: Vec<std::path::PathBuf>,
    /// The clone.
    pub clone: CloneInfo,
    /// When it was started, seconds since the Unix epoch.
    pub created: u64,
    /// Whether its process still runs (filled in when listed).
    #[serde(default)]
    pub running: bool,
}

/// The answer to `PUT /vm/fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkResult {
    /// The live checkpoint the children started from.
    pub checkpoint: std::path::PathBuf,
    /// How long the parent's vCPUs were stopped (the live checkpoint's final stop, with the
    /// switch of its disks onto fresh overlays), in microseconds.
    pub pause_us: u64,
    /// The parent's new active images, in disk order.
    pub parent_overlays: Vec<std::path::PathBuf>,
    /// The children.
    pub clones: Vec<CloneInfo>,
}

/// `PUT /clones/destroy`: stop a clone and remove its directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneDestroyRequest {
    /// The clone's directory, as [`CloneInfo::dir`] gave it.
    pub dir: std::path::PathBuf,
}
