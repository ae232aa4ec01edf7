//! Request routing and the handlers behind each path, independent of HTTP plumbing.
//!
//! [`Router::handle`] takes a method, a path and a body and returns a status and a JSON
//! body; [`super::server`] feeds it from hyper. Handlers block (snapshots quiesce disks,
//! files are created), so the server calls them off its event loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::tree::{DeleteOptions, SnapshotTree, TakeOptions};
use snapshot::{Job, JobStatus};
use storage::BlockDevice;

use super::types::{CheckpointRequest, RevertRequest};
use super::types::{
    CommitRequest, DiskInfo, Fault, JobInfo, SnapshotCreate, SnapshotDeleteRequest,
    SnapshotDeleteResult, SnapshotDiskResult, SnapshotResult, SpeedRequest, StreamRequest,
    TreeSnapshotCreate,
};
use super::{ApiError, VmControl};
use crate::builder::AttachedDisk;

/// Every route the server answers: (method, path template). `{disk}` and `{name}` match one
/// segment (percent-decoded).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PUT", "/vm/pause"),
    ("PUT", "/vm/resume"),
    ("PUT", "/vm/shutdown"),
    ("PUT", "/vm/checkpoint"),
    ("PUT", "/vm/checkpoint/revert"),
    ("GET", "/disks"),
    ("GET", "/disks/{disk}"),
    ("PUT", "/snapshot/disk"),
    ("PUT", "/disks/{disk}/stream"),
    ("PUT", "/disks/{disk}/commit"),
    ("GET", "/disks/{disk}/job"),
    ("PUT", "/disks/{disk}/job/pause"),
    ("PUT", "/disks/{disk}/job/resume"),
    ("PUT", "/disks/{disk}/job/cancel"),
    ("PUT", "/disks/{disk}/job/complete"),
    ("PUT", "/disks/{disk}/job/speed"),
    ("GET", "/snapshots"),
    ("PUT", "/snapshots"),
    ("GET", "/snapshots/{name}"),
    ("PUT", "/snapshots/{name}/revert"),
    ("PUT", "/snapshots/{name}/delete"),
    ("GET", "/current-snapshot"),
    ("GET", "/snapshot-jobs"),
];

/// Longest accepted snapshot name.
const MAX_NAME: usize = 200;

/// A handler's answer: an HTTP status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON text, or `None` for 204.
    pub body: Option<String>,
}

impl Response {
    fn json(value: &impl Serialize) -> Response {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
            },
            Err(e) => Response::error(&ApiError::Internal(format!("encoding the answer: {e}"))),
        }
    }

    fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    /// The response for `error`, with a [`Fault`] body.
    pub fn error(error: &ApiError) -> Response {
        let fault = Fault {
            fault_message: error.to_string(),
        };
        Response {
            status: error.status(),
            // A struct of one string always serialises.
            body: serde_json::to_string(&fault).ok(),
        }
    }
}

/// Routes requests to a VM and keeps its block jobs, one per disk.
pub struct Router {
    vm: Arc<dyn VmControl>,
    jobs: Mutex<HashMap<String, Job>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("jobs", &self.jobs.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Matches `path` against `template`; returns the `{disk}` or `{name}` segment if there is
/// one, still percent-encoded.
fn match_template<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut disk = None;
    let mut path_segments = path.trim_start_matches('/').split('/');
    for expected in template.trim_start_matches('/').split('/') {
        let segment = path_segments.next()?;
        if expected.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            disk = Some(segment);
        } else if expected != segment {
            return None;
        }
    }
    match path_segments.next() {
        None => Some(disk),
        Some(_) => None,
    }
}

/// Decodes `%XX` escapes in a path segment.
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("bad percent escape in path segment {segment:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::BadRequest(format!("path segment {segment:?} is not UTF-8")))
}

/// Parses an optional JSON body; an empty one is `T::default()`.
fn parse_optional<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(body)
}

/// Parses a JSON body that must be there.
fn parse_required<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "this request needs a JSON body".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn no_body(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body == b"{}" {
        Ok(())
    } else {
        Err(ApiError::BadRequest("this request takes no body".into()))
    }
}

/// The files of `top`'s backing chain, below it, top first.
fn backing_chain(top: &Arc<dyn BlockDevice>) -> Vec<String> {
    let mut chain = Vec::new();
    let mut layer = top.backing();
    while let Some(current) = layer {
        chain.push(current.info().filename);
        layer = current.backing();
    }
    chain
}

/// The default overlay of snapshot `name` for a disk whose active layer is `top`:
/// `DIR/STEM.NAME.qcow2` beside it.
fn default_overlay(top: &Path, name: &str) -> PathBuf {
    let stem = top
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    top.with_file_name(format!("{stem}.{name}.qcow2"))
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ApiError::BadRequest(format!(
            "snapshot name must be 1 to {MAX_NAME} bytes"
        )));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\0' || c.is_control())
        || name == "."
        || name == ".."
    {
        return Err(ApiError::BadRequest(format!(
            "snapshot name {name:?} must not contain '/' or control characters"
        )));
    }
    Ok(())
}

impl Router {
    /// A router for `vm`, with no jobs.
    pub fn new(vm: Arc<dyn VmControl>) -> Self {
        Router {
            vm,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Cancels every job still running and waits up to `timeout` for each to conclude,
    /// so that no job is cut off mid-copy when the VM goes away.
    pub fn cancel_jobs(&self, timeout: Duration) {
        if let Some(tree) = self.vm.snapshot_tree() {
            tree.cancel_jobs(timeout);
        }
        let jobs: Vec<Job> = self.jobs.lock().values().cloned().collect();
        for job in jobs {
            if job.status() == JobStatus::Concluded {
                continue;
            }
            tracing::info!("cancelling job {} as the VM stops", job.id());
            job.cancel();
            if !job.wait_for(timeout, |status| status == JobStatus::Concluded) {
                tracing::warn!("job {} did not conclude in {timeout:?}", job.id());
            }
        }
    }

    /// Handles one request. Never panics on request content.
    pub fn handle(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let path = path.split('?').next().unwrap_or(path);
        let mut path_known = false;
        for (route_method, template) in ROUTES {
            let Some(disk) = match_template(template, path) else {
                continue;
            };
            path_known = true;
            if *route_method != method {
                continue;
            }
            tracing::debug!("API {method} {path}");
            let segment = match percent_decode(disk.unwrap_or("")) {
                Ok(segment) => segment,
                Err(error) => return Response::error(&error),
            };
            return match self.dispatch(method, template, &segment, body) {
                Ok(response) => response,
                Err(error) => {
                    tracing::info!("API {method} {path}: {} {error}", error.status());
                    Response::error(&error)
                }
            };
        }
        let error = if path_known {
            ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
            }
        } else {
            ApiError::NotFound(format!("no such path: {path}"))
        };
        Response::error(&error)
    }

    fn dispatch(
        &self,
        method: &str,
        template: &str,
        disk: &str,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        match (method, template) {
            ("GET", "/vm") => Ok(Response::json(&self.vm.info())),
            ("PUT", "/vm/pause") => {
                no_body(body)?;
                self.vm.pause().map(|()| Response::no_content())
            }
            ("PUT", "/vm/resume") => {
                no_body(body)?;
                self.vm.resume().map(|()| Response::no_content())
            }
            ("PUT", "/vm/shutdown") => {
                no_body(body)?;
                self.vm.shutdown().map(|()| Response::no_content())
            }
            ("PUT", "/vm/checkpoint") => {
                let request: CheckpointRequest = parse_required(body)?;
                self.vm.checkpoint(&request).map(|r| Response::json(&r))
            }
            ("PUT", "/vm/checkpoint/revert") => {
                let request: RevertRequest = parse_required(body)?;
                self.vm
                    .revert_checkpoint(&request)
                    .map(|r| Response::json(&r))
            }
            ("GET", "/disks") => {
                let disks: Vec<DiskInfo> =
                    self.vm.disks().iter().map(|d| self.disk_info(d)).collect();
                Ok(Response::json(&disks))
            }
            ("GET", "/disks/{disk}") => Ok(Response::json(&self.disk_info(&self.disk(disk)?))),
            ("PUT", "/snapshot/disk") => self.snapshot(parse_required(body)?),
            ("PUT", "/disks/{disk}/stream") => self.stream(disk, parse_optional(body)?),
            ("PUT", "/disks/{disk}/commit") => self.commit(disk, parse_optional(body)?),
            ("GET", "/disks/{disk}/job") => {
                Ok(Response::json(&JobInfo::from(self.job(disk)?.info())))
            }
            ("PUT", "/disks/{disk}/job/pause") => {
                no_body(body)?;
                self.job_verb(disk, |job| job.pause().map_err(ApiError::from))
            }
            ("PUT", "/disks/{disk}/job/resume") => {
                no_body(body)?;
                self.job_verb(disk, |job| job.resume().map_err(ApiError::from))
            }
            ("PUT", "/disks/{disk}/job/cancel") => {
                no_body(body)?;
                self.job_verb(disk, |job| {
                    if job.status() == JobStatus::Concluded {
                        return Err(ApiError::Conflict(format!(
                            "job {} has already concluded",
                            job.id()
                        )));
                    }
                    job.cancel();
                    Ok(())
                })
            }
            ("PUT", "/disks/{disk}/job/complete") => {
                no_body(body)?;
                self.job_verb(disk, |job| job.complete().map_err(ApiError::from))
            }
            ("PUT", "/disks/{disk}/job/speed") => {
                let request: SpeedRequest = parse_required(body)?;
                self.job_verb(disk, |job| {
                    job.set_speed(request.speed);
                    Ok(())
                })
            }
            ("GET", "/snapshots") => Ok(Response::json(&self.tree()?.list())),
            ("PUT", "/snapshots") => self.tree_create(parse_required(body)?),
            ("GET", "/snapshots/{name}") => Ok(Response::json(&self.tree()?.get(disk)?)),
            ("PUT", "/snapshots/{name}/revert") => {
                no_body(body)?;
                Ok(Response::json(&self.tree()?.revert(disk)?))
            }
            ("PUT", "/snapshots/{name}/delete") => {
                let request: SnapshotDeleteRequest = parse_optional(body)?;
                let deleted = self.tree()?.delete(
                    disk,
                    &DeleteOptions {
                        children: request.children,
                        metadata_only: request.metadata,
                    },
                )?;
                Ok(Response::json(&SnapshotDeleteResult { deleted }))
            }
            ("GET", "/current-snapshot") => {
                let current = self
                    .tree()?
                    .current()
                    .ok_or_else(|| ApiError::NotFound("the VM has no current snapshot".into()))?;
                Ok(Response::json(&current))
            }
            ("GET", "/snapshot-jobs") => {
                let jobs: Vec<JobInfo> =
                    self.tree()?.jobs().into_iter().map(JobInfo::from).collect();
                Ok(Response::json(&jobs))
            }
            _ => Err(ApiError::Internal(format!(
                "route {method} {template} has no handler"
            ))),
        }
    }

    fn tree(&self) -> Result<Arc<SnapshotTree>, ApiError> {
        self.vm
            .snapshot_tree()
            .ok_or_else(|| ApiError::NotImplemented("this VM keeps no snapshot tree".into()))
    }

    fn tree_create(&self, request: TreeSnapshotCreate) -> Result<Response, ApiError> {
        validate_name(&request.name)?;
        let info = self.tree()?.create(
            &request.name,
            &TakeOptions {
                description: request.description,
                disk_only: request.disk_only,
                internal: request.internal,
            },
        )?;
        Ok(Response::json(&info))
    }

    fn disk(&self, name: &str) -> Result<AttachedDisk, ApiError> {
        self.vm
            .disks()
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no disk named {name:?}")))
    }

    fn disk_info(&self, disk: &AttachedDisk) -> DiskInfo {
        let top = disk.disk.top();
        let info = top.info();
        let job = self
            .jobs
            .lock()
            .get(&disk.name)
            .filter(|job| job.status() != JobStatus::Concluded)
            .map(|job| job.id().to_string());
        DiskInfo {
            name: disk.name.clone(),
            source: info.filename.clone(),
            format: info
                .format
                .map(|f| format!("{f:?}").to_lowercase())
                .unwrap_or_else(|| "unknown".into()),
            size: info.virtual_size,
            read_only: disk.read_only,
            backing_chain: backing_chain(&top),
            job,
        }
    }

    fn job(&self, disk: &str) -> Result<Job, ApiError> {
        self.disk(disk)?;
        self.jobs
            .lock()
            .get(disk)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("disk {disk} has no block job")))
    }

    fn job_verb(
        &self,
        disk: &str,
        verb: impl FnOnce(&Job) -> Result<(), ApiError>,
    ) -> Result<Response, ApiError> {
        let job = self.job(disk)?;
        verb(&job)?;
        Ok(Response::json(&JobInfo::from(job.info())))
    }

    /// Starts a job on `disk` unless one is still running there, and records it.
    fn start_job(
        &self,
        disk: &str,
        start: impl FnOnce(&AttachedDisk) -> Result<Job, ApiError>,
    ) -> Result<Response, ApiError> {
        let attached = self.disk(disk)?;
        if attached.read_only {
            return Err(ApiError::Conflict(format!("disk {disk} is read-only")));
        }
        let mut jobs = self.jobs.lock();
        if let Some(job) = jobs.get(disk) {
            if job.status() != JobStatus::Concluded {
                return Err(ApiError::Conflict(format!(
                    "disk {disk} already has job {} ({})",
                    job.id(),
                    job.status()
                )));
            }
        }
        let job = start(&attached)?;
        tracing::info!("started {} job {} on {disk}", job.kind(), job.id());
        let info = JobInfo::from(job.info());
        jobs.insert(disk.to_string(), job);
        Ok(Response::json(&info))
    }

    fn stream(&self, disk: &str, request: StreamRequest) -> Result<Response, ApiError> {
        self.start_job(disk, |attached| {
            let options = StreamOptions {
                base: request.base.map(PathBuf::from),
                speed: request.speed,
                ..Default::default()
            };
            Ok(stream(&attached.disk, options)?)
        })
    }

    fn commit(&self, disk: &str, request: CommitRequest) -> Result<Response, ApiError> {
        let top = match (request.top, request.active) {
            (None, false) => {
                return Err(ApiError::BadRequest(
                    "committing the active layer needs \"active\": true (or give \"top\")".into(),
                ))
            }
            (Some(_), true) => {
                return Err(ApiError::BadRequest(
                    "\"top\" and \"active\" exclude each other".into(),
                ))
            }
            (top, _) => top.map(PathBuf::from),
        };
        self.start_job(disk, |attached| {
            if let Some(top) = &top {
                if attached.disk.top().path() == top.as_path() {
                    return Err(ApiError::BadRequest(format!(
                        "{} is the active layer of {disk}: use \"active\": true",
                        top.display()
                    )));
                }
            }
            let options = CommitOptions {
                top,
                base: request.base.map(PathBuf::from),
                speed: request.speed,
                ..Default::default()
            };
            Ok(commit(&attached.disk, options)?)
        })
    }

    fn snapshot(&self, request: SnapshotCreate) -> Result<Response, ApiError> {
        validate_name(&request.name)?;
        let all = self.vm.disks();
        let wanted: Vec<(AttachedDisk, Option<String>)> = match &request.disks {
            Some(list) => {
                if list.is_empty() {
                    return Err(ApiError::BadRequest("\"disks\" is empty".into()));
                }
                let mut seen = std::collections::HashSet::new();
                let mut wanted = Vec::new();
                for entry in list {
                    if !seen.insert(entry.disk.as_str()) {
                        return Err(ApiError::BadRequest(format!(
                            "disk {} is listed twice",
                            entry.disk
                        )));
                    }
                    let disk = self.disk(&entry.disk)?;
                    if disk.read_only {
                        return Err(ApiError::Conflict(format!(
                            "disk {} is read-only",
                            disk.name
                        )));
                    }
                    wanted.push((disk, entry.overlay.clone()));
                }
                wanted
            }
            None => all
                .into_iter()
                .filter(|d| !d.read_only)
                .map(|d| (d, None))
                .collect(),
        };
        if wanted.is_empty() {
            return Err(ApiError::Conflict("the VM has no writable disk".into()));
        }
        let mut overlays = Vec::new();
        for (disk, overlay) in &wanted {
            let path = match overlay {
                Some(path) => {
                    let path = PathBuf::from(path);
                    if !path.is_absolute() {
                        return Err(ApiError::BadRequest(format!(
                            "overlay {path:?} of disk {}: give an absolute path",
                            disk.name
                        )));
                    }
                    path
                }
                None => default_overlay(disk.disk.top().path(), &request.name),
            };
            overlays.push(DiskOverlay::new(&disk.disk, path));
        }
        let mut results = Vec::new();
        let mut quiesced = Duration::ZERO;
        let groups: Vec<&[DiskOverlay]> = if request.atomic {
            vec![&overlays[..]]
        } else {
            overlays.chunks(1).collect()
        };
        for group in groups {
            let report = external_snapshot(group).map_err(|e| {
                let done: Vec<&str> = results
                    .iter()
                    .map(|r: &SnapshotDiskResult| r.disk.as_str())
                    .collect();
                let error = ApiError::from(e);
                if done.is_empty() {
                    error
                } else {
                    ApiError::Internal(format!(
                        "{error} (disks already switched: {})",
                        done.join(", ")
                    ))
                }
            })?;
            quiesced = quiesced.max(report.quiesced_for);
            for (overlay, previous) in group.iter().zip(report.old_tops) {
                results.push(SnapshotDiskResult {
                    disk: overlay.disk.name().to_string(),
                    overlay: overlay.overlay.display().to_string(),
                    previous: previous.display().to_string(),
                });
            }
        }
        tracing::info!(
            "snapshot {} ({}) of {} disk(s); I/O held {quiesced:?}",
            request.name,
            request.description.as_deref().unwrap_or(""),
            results.len()
        );
        Ok(Response::json(&SnapshotResult {
            name: request.name,
            disks: results,
            quiesced_us: u64::try_from(quiesced.as_micros()).unwrap_or(u64::MAX),
        }))
    }
}
