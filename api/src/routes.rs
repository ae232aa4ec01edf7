//! Request routing: [`Router::handle`] takes a method, a path and a body, calls the one
//! [`Control`] method the route names and returns a status and a JSON body; [`super::server`]
//! feeds it from hyper. Control methods block (snapshots quiesce disks, files are created),
//! so the server calls them off its event loop.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm::Control;

use crate::error::Error;
use crate::types::{
    CheckpointRequest, CloneDestroyRequest, CloneRequest, Fault, ForkRequest, RevertRequest,
    SnapshotDeleteRequest, SnapshotPush, SpeedRequest, TreeSnapshotCreate,
};

/// Every route the server answers: (method, path template). `{disk}` and `{name}` match one
/// segment (percent-decoded).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PUT", "/vm/pause"),
    ("PUT", "/vm/resume"),
    ("PUT", "/vm/shutdown"),
    ("PUT", "/vm/checkpoint"),
    ("PUT", "/vm/checkpoint/revert"),
    ("GET", "/vm/agent"),
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
    ("PUT", "/snapshots/{name}/push"),
    ("GET", "/current-snapshot"),
    ("GET", "/snapshot-jobs"),
    ("PUT", "/snapshots/{name}/clone"),
    ("GET", "/snapshots/{name}/clones"),
    ("PUT", "/vm/fork"),
    ("PUT", "/clones/destroy"),
];

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
            Err(e) => Response::error(&Error::Internal(format!("encoding the answer: {e}"))),
        }
    }

    fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    /// The response for `error`, with a [`Fault`] body.
    pub fn error(error: &Error) -> Response {
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

/// Routes requests to a machine's [`Control`].
#[derive(Debug)]
pub struct Router {
    control: Arc<Control>,
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
fn percent_decode(segment: &str) -> Result<String, Error> {
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
                    Error::BadRequest(format!("bad percent escape in path segment {segment:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::BadRequest(format!("path segment {segment:?} is not UTF-8")))
}

/// Parses an optional JSON body; an empty one is `T::default()`.
fn parse_optional<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(body)
}

/// Parses a JSON body that must be there.
fn parse_required<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::BadRequest("this request needs a JSON body".into()));
    }
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

fn no_body(body: &[u8]) -> Result<(), Error> {
    if body.iter().all(u8::is_ascii_whitespace) || body == b"{}" {
        Ok(())
    } else {
        Err(Error::BadRequest("this request takes no body".into()))
    }
}

impl Router {
    /// A router onto `control`.
    pub fn new(control: Arc<Control>) -> Self {
        Router { control }
    }

    /// Cancels every block job still running and waits up to `timeout` for each.
    pub fn cancel_jobs(&self, timeout: Duration) {
        self.control.cancel_jobs(timeout);
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
            Error::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
            }
        } else {
            Error::NotFound(format!("no such path: {path}"))
        };
        Response::error(&error)
    }

    fn dispatch(
        &self,
        method: &str,
        template: &str,
        segment: &str,
        body: &[u8],
    ) -> Result<Response, Error> {
        let c = &self.control;
        match (method, template) {
            ("GET", "/vm") => Ok(Response::json(&c.info())),
            ("PUT", "/vm/pause") => {
                no_body(body)?;
                c.pause()?;
                Ok(Response::no_content())
            }
            ("PUT", "/vm/resume") => {
                no_body(body)?;
                c.resume()?;
                Ok(Response::no_content())
            }
            ("PUT", "/vm/shutdown") => {
                no_body(body)?;
                c.shutdown()?;
                Ok(Response::no_content())
            }
            ("PUT", "/vm/checkpoint") => {
                let request: CheckpointRequest = parse_required(body)?;
                Ok(Response::json(&c.checkpoint_save(&request)?))
            }
            ("PUT", "/vm/checkpoint/revert") => {
                let request: RevertRequest = parse_required(body)?;
                Ok(Response::json(&c.checkpoint_revert(&request)?))
            }
            ("GET", "/vm/agent") => Ok(Response::json(&c.agent_status()?)),
            ("GET", "/disks") => Ok(Response::json(&c.disks())),
            ("GET", "/disks/{disk}") => Ok(Response::json(&c.disk(segment)?)),
            ("PUT", "/snapshot/disk") => {
                Ok(Response::json(&c.disk_snapshot(&parse_required(body)?)?))
            }
            ("PUT", "/disks/{disk}/stream") => {
                Ok(Response::json(&c.stream(segment, &parse_optional(body)?)?))
            }
            ("PUT", "/disks/{disk}/commit") => {
                Ok(Response::json(&c.commit(segment, &parse_optional(body)?)?))
            }
            ("GET", "/disks/{disk}/job") => Ok(Response::json(&c.job(segment)?)),
            ("PUT", "/disks/{disk}/job/pause") => {
                no_body(body)?;
                Ok(Response::json(&c.job_pause(segment)?))
            }
            ("PUT", "/disks/{disk}/job/resume") => {
                no_body(body)?;
                Ok(Response::json(&c.job_resume(segment)?))
            }
            ("PUT", "/disks/{disk}/job/cancel") => {
                no_body(body)?;
                Ok(Response::json(&c.job_cancel(segment)?))
            }
            ("PUT", "/disks/{disk}/job/complete") => {
                no_body(body)?;
                Ok(Response::json(&c.job_complete(segment)?))
            }
            ("PUT", "/disks/{disk}/job/speed") => {
                let request: SpeedRequest = parse_required(body)?;
                Ok(Response::json(&c.job_set_speed(segment, request.speed)?))
            }
            ("GET", "/snapshots") => Ok(Response::json(&c.snapshot_list()?)),
            ("PUT", "/snapshots") => {
                let request: TreeSnapshotCreate = parse_required(body)?;
                Ok(Response::json(&c.snapshot_create(&request)?))
            }
            ("GET", "/snapshots/{name}") => Ok(Response::json(&c.snapshot_info(segment)?)),
            ("PUT", "/snapshots/{name}/revert") => {
                no_body(body)?;
                Ok(Response::json(&c.snapshot_revert(segment)?))
            }
            ("PUT", "/snapshots/{name}/delete") => {
                let request: SnapshotDeleteRequest = parse_optional(body)?;
                Ok(Response::json(&c.snapshot_delete(segment, &request)?))
            }
            ("PUT", "/snapshots/{name}/push") => {
                let request: SnapshotPush = parse_required(body)?;
                Ok(Response::json(&c.snapshot_push(segment, &request)?))
            }
            ("GET", "/current-snapshot") => Ok(Response::json(&c.snapshot_current()?)),
            ("GET", "/snapshot-jobs") => Ok(Response::json(&c.snapshot_jobs()?)),
            ("PUT", "/snapshots/{name}/clone") => {
                let request: CloneRequest = parse_required(body)?;
                Ok(Response::json(&c.snapshot_clone(segment, &request)?))
            }
            ("GET", "/snapshots/{name}/clones") => Ok(Response::json(&c.snapshot_clones(segment)?)),
            ("PUT", "/vm/fork") => {
                let request: ForkRequest = parse_required(body)?;
                Ok(Response::json(&c.fork(&request)?))
            }
            ("PUT", "/clones/destroy") => {
                let request: CloneDestroyRequest = parse_required(body)?;
                Ok(Response::json(&c.clone_destroy(&request)?))
            }
            _ => Err(Error::Internal(format!(
                "route {method} {template} has no handler"
            ))),
        }
    }
}
