//! A client of the API over its Unix socket (hyper's HTTP/1 client), as `snapvmm ctl` and
//! the tests use it.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;
use crate::types::Fault;

/// A raw answer: status and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// A client of one API socket. Each call uses a fresh connection.
#[derive(Debug)]
pub struct ApiClient {
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl ApiClient {
    /// A client of the socket at `path` (nothing is connected yet).
    pub fn new(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Ok(ApiClient {
            path: path.as_ref().to_path_buf(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?,
        })
    }

    /// Sends `body` (raw bytes) with `method` to `path`; any status is returned as is.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<RawResponse, Error> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| Error::Http(format!("method {method:?}: {e}")))?;
        self.runtime
            .block_on(self.send(method, path, Bytes::copy_from_slice(body)))
    }

    async fn send(&self, method: Method, path: &str, body: Bytes) -> Result<RawResponse, Error> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| Error::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("API client connection: {e}");
            }
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| Error::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Http(e.to_string()))?
            .to_bytes();
        drop(sender);
        let _ = driver.await;
        Ok(RawResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Sends `body` as JSON; an error status becomes [`Error::Status`]. Returns the
    /// answer's body text (empty for 204).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<String, Error> {
        let bytes = match body {
            Some(body) => serde_json::to_vec(body).map_err(|e| Error::Http(e.to_string()))?,
            None => Vec::new(),
        };
        let response = self.raw(method, path, &bytes)?;
        if response.status >= 400 {
            let message = serde_json::from_str::<Fault>(&response.body)
                .map(|f| f.fault_message)
                .unwrap_or(response.body);
            return Err(Error::Status {
                status: response.status,
                message,
            });
        }
        Ok(response.body)
    }

    /// [`ApiClient::call`], decoding the answer as `T`.
    pub fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let text = self.call(method, path, body)?;
        serde_json::from_str(&text).map_err(|e| Error::Decode(format!("{e}: {text}")))
    }

    /// `GET path`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call_json("GET", path, None::<&()>)
    }
}
