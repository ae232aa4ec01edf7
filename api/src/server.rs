//! The HTTP server: hyper on a tokio current-thread runtime, on its own thread, listening
//! on a Unix socket that only its owner may use (mode 0600).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;

use vmm::Control;

use crate::error::{Error, Result};
use crate::routes::{Response, Router};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long stopping the server waits for requests in flight.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long stopping the server waits for each cancelled job.
const JOB_CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running API server; [`ApiServer::stop`] (or dropping it) ends it and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    router: Arc<Router>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// An API socket bound, and its server thread ready, before the VM it will serve exists:
/// [`PendingApiServer::serve`] hands it the VM's control. A restore binds first and builds its
/// VM meanwhile, so the server's own start-up (its thread, seccomp filter, runtime and
/// handler thread) overlaps the VM's instead of following it. Clients that connect early wait
/// in the socket's backlog and are answered once the server serves; nothing is answered
/// before. Dropping it (the VM could not be built) ends the thread and removes the socket.
#[derive(Debug)]
pub struct PendingApiServer {
    path: PathBuf,
    ready: Option<oneshot::Sender<Arc<Router>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` and serves `control` from a new thread. A stale socket file at
    /// `path` is replaced; any other file there is an error.
    pub fn start(path: &Path, control: Arc<Control>) -> Result<Self> {
        ApiServer::bind(path)?.serve(control)
    }

    /// Listens on `path` and readies the server thread, which answers nothing until
    /// [`PendingApiServer::serve`]. A stale socket file at `path` is replaced; any other
    /// file there is an error.
    pub fn bind(path: &Path) -> Result<PendingApiServer> {
        let socket_error = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::Socket { path, what, source }
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::SocketInUse {
                    path: path.to_path_buf(),
                    reason: "a file that is not a socket is in the way",
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse {
                    path: path.to_path_buf(),
                    reason: "another process is serving it",
                });
            }
            std::fs::remove_file(path).map_err(socket_error("removing the stale socket"))?;
        }
        // Bound under a temporary name and renamed once its mode is 0600, so no client
        // can ever connect while the socket is open to others.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        let listener = std::os::unix::net::UnixListener::bind(&temp)
            .map_err(socket_error("binding it under a temporary name"))?;
        let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error("setting its mode"))
            .and_then(|()| {
                std::fs::rename(&temp, path).map_err(socket_error("moving it into place"))
            });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        // From here on the socket is in place: an error removes it again.
        let remove = |e: Error| {
            let _ = std::fs::remove_file(path);
            e
        };
        listener
            .set_nonblocking(true)
            .map_err(socket_error("making it non-blocking"))
            .map_err(remove)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(socket_error("creating the server's runtime"))
            .map_err(remove)?;
        let (stop, stopped) = oneshot::channel();
        let (ready, routed) = oneshot::channel::<Arc<Router>>();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                vmm::confine::enter_or_abort(vmm::confine::ThreadKind::Api);
                runtime.block_on(async move {
                    // Requests are handled on the runtime's blocking pool: start its first
                    // thread now rather than when the first request is waiting for it.
                    let _ = tokio::task::spawn_blocking(|| ()).await;
                    // No router: the VM was never built; the owner removes the socket.
                    if let Ok(router) = routed.await {
                        serve(listener, router, stopped).await;
                    }
                })
            })
            .map_err(socket_error("spawning the server thread"))
            .map_err(remove)?;
        Ok(PendingApiServer {
            path: path.to_path_buf(),
            ready: Some(ready),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving, cancels the block jobs still running (waiting for each to leave a
    /// valid chain) and removes the socket.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if self.thread.is_none() {
            return;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the API server thread panicked");
            }
        }
        self.router.cancel_jobs(JOB_CANCEL_TIMEOUT);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl PendingApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts answering requests on `control`'s behalf.
    pub fn serve(mut self, control: Arc<Control>) -> Result<ApiServer> {
        let router = Arc::new(Router::new(control));
        let thread = self.thread.take();
        let sent = self.ready.take().map(|ready| ready.send(router.clone()));
        let server = ApiServer {
            path: self.path.clone(),
            router,
            stop: self.stop.take(),
            thread,
        };
        if !matches!(sent, Some(Ok(()))) {
            // The thread is gone (it could not start its runtime): stop cleans up.
            server.stop();
            return Err(Error::Internal("the API server thread ended early".into()));
        }
        tracing::info!("API server on {}", self.path.display());
        Ok(server)
    }
}

impl Drop for PendingApiServer {
    fn drop(&mut self) {
        // Served: the `ApiServer` owns the thread and the socket now.
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Never served: the thread sees its router's sender go and ends.
        self.ready.take();
        if thread.join().is_err() {
            tracing::warn!("the API server thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    router: Arc<Router>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("API server: {e}");
            return;
        }
    };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("API server: accept: {e}");
                        continue;
                    }
                };
                let router = router.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| answer(router.clone(), request));
                    // One request per connection: a stop then waits only for requests
                    // in flight, never for an idle keep-alive connection.
                    if let Err(e) = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!("API connection: {e}");
                    }
                });
            }
        }
    }
    // Let requests in flight (the shutdown request among them) send their answers.
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("API server: requests still in flight after {DRAIN_TIMEOUT:?}");
    }
}

async fn answer(
    router: Arc<Router>,
    request: Request<Incoming>,
) -> std::result::Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let response = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            match tokio::task::spawn_blocking(move || router.handle(&method, &path, &body)).await {
                Ok(response) => response,
                Err(e) => Response::error(&Error::Internal(format!("handler failed: {e}"))),
            }
        }
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Response::error(&Error::PayloadTooLarge(MAX_BODY))
            } else {
                Response::error(&Error::BadRequest(format!("reading the body: {e}")))
            }
        }
    };
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut http = hyper::Response::new(Full::new(Bytes::from(response.body.unwrap_or_default())));
    *http.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        http.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Ok(http)
}
