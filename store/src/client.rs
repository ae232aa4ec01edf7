//! The blocking client of one store: an `object_store` S3 backend driven by a small tokio
//! runtime of its own, since the rest of snapvmm is synchronous.
//!
//! Every request goes through `object_store`'s bounded retries with exponential backoff
//! (server errors, timeouts, refused connections), then fails with an error naming the key.
//! Chunks fetched are checked against their hash; a mismatch is fetched once more (another
//! replica may serve it) before it is reported as corrupt.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

use crate::chunk::ChunkHash;
use crate::error::{Error, Result};
use crate::location::{Location, StoreConfig};

/// Requests in flight at once for parallel uploads and prefetches.
pub const PARALLEL_REQUESTS: usize = 8;
/// Largest object read whole (manifests, state blobs, chunks).
pub const MAX_OBJECT_BYTES: u64 = 256 << 20;

/// One object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the store's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Last modification, seconds since the Unix epoch.
    pub modified_unix: i64,
}

/// Bytes moved by a client since it was opened.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes of objects fetched.
    pub fetched: AtomicU64,
    /// Objects fetched.
    pub gets: AtomicU64,
    /// Bytes uploaded.
    pub uploaded: AtomicU64,
}

/// A blocking handle on the objects under one `s3://BUCKET/PREFIX`.
///
/// Every request runs as a task on the store's own runtime threads, never on the calling
/// thread: the callers include seccomp-confined VMM threads (the userfaultfd pager, block
/// workers) that may not open sockets, while the runtime's threads start with the filter of
/// the thread that opened the store.
pub struct Store {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Runtime,
}

/// What a request task needs (owned by the tasks, shared with the handle).
struct Inner {
    location: Location,
    objects: Arc<dyn ObjectStore>,
    traffic: Traffic,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(30),
    }
}

impl Store {
    /// Opens the S3 store at `location` with `config`'s endpoint, region and credentials.
    pub fn open(location: &Location, config: &StoreConfig) -> Result<Self> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&config.region)
            .with_retry(retry_config())
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60)),
            );
        if let Some(endpoint) = &config.endpoint {
            // Path-style requests: S3-compatible stores on a plain host:port need them.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id.expose())
                    .with_secret_access_key(secret.expose());
            }
            _ => builder = builder.with_skip_signature(true),
        }
        // The builder's own errors name fields, never their values.
        let objects = builder
            .build()
            .map_err(|e| Error::Config(format!("{location}: {e}")))?;
        Self::with_object_store(location.clone(), Arc::new(objects))
    }

    /// A store over any `object_store` backend (the in-memory one in unit tests).
    pub fn with_object_store(location: Location, objects: Arc<dyn ObjectStore>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapvmm-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", "start", e))?;
        Ok(Store {
            inner: Arc::new(Inner {
                location,
                objects,
                traffic: Traffic::default(),
            }),
            runtime,
        })
    }

    /// Where the store lives.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// Bytes moved so far.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// Runs the request `make` builds as a task on the runtime's threads and waits for it
    /// (the calling thread only waits: it makes no system call of the request).
    fn block<T, F>(&self, make: impl FnOnce(Arc<Inner>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let task = self.runtime.spawn(make(self.inner.clone()));
        self.runtime.block_on(task).map_err(|e| Error::Remote {
            key: self.inner.location.to_string(),
            op: "request",
            message: format!("the request task failed: {e}"),
        })?
    }

    /// Fetches the object at `key` (relative to the prefix), refusing objects larger than
    /// `max` bytes.
    pub fn get(&self, key: &str, max: u64) -> Result<Bytes> {
        let key = key.to_string();
        self.block(move |inner| async move {
            let path = inner.path(&key)?;
            inner.get(&key, &path, max).await
        })
    }

    /// Stores `bytes` at `key`.
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let key = key.to_string();
        self.block(move |inner| async move {
            let path = inner.path(&key)?;
            inner.put(&key, &path, bytes).await
        })
    }

    /// Whether an object exists at `key`.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.block(move |inner| async move {
            let path = inner.path(&key)?;
            inner.exists(&key, &path).await
        })
    }

    /// Deletes the object at `key` (absent objects are not an error).
    pub fn delete(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.block(move |inner| async move {
            let path = inner.path(&key)?;
            match inner.objects.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(inner.remote_error(&key, "delete", e)),
            }
        })
    }

    /// Every object under `dir` (relative to the prefix), recursively.
    pub fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let dir = dir.to_string();
        self.block(move |inner| async move {
            let path = inner.path(&dir)?;
            let root = if inner.location.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", inner.location.prefix)
            };
            let metas: Vec<_> = inner
                .objects
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(|e| inner.remote_error(&dir, "list", e))?;
            Ok(metas
                .into_iter()
                .map(|meta| {
                    let full = meta.location.to_string();
                    ObjectInfo {
                        key: full.strip_prefix(&root).unwrap_or(&full).to_string(),
                        size: meta.size,
                        modified_unix: meta.last_modified.timestamp(),
                    }
                })
                .collect())
        })
    }

    /// Fetches chunk `hash` and checks it; a mismatch is fetched once more before it is
    /// reported as [`Error::Corrupt`].
    pub fn get_chunk(&self, hash: &ChunkHash) -> Result<Bytes> {
        let hash = hash.clone();
        self.block(move |inner| async move { inner.get_chunk(&hash).await })
    }

    /// Fetches many chunks in parallel, handing each checked chunk to `sink` (on the
    /// calling thread, in completion order). Stops at the first error.
    pub fn get_chunks(
        &self,
        hashes: &[ChunkHash],
        sink: &mut dyn FnMut(&ChunkHash, Bytes) -> Result<()>,
    ) -> Result<()> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(PARALLEL_REQUESTS);
        let hashes = hashes.to_vec();
        let inner = self.inner.clone();
        // The fetching task stops when the receiver goes (an error here ends the loop).
        self.runtime.spawn(async move {
            let mut fetches = futures::stream::iter(hashes.into_iter().map(|hash| {
                let inner = inner.clone();
                async move {
                    let bytes = inner.get_chunk(&hash).await?;
                    Ok::<_, Error>((hash, bytes))
                }
            }))
            .buffer_unordered(PARALLEL_REQUESTS);
            while let Some(result) = fetches.next().await {
                let failed = result.is_err();
                if sender.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        while let Some(result) = self.runtime.block_on(receiver.recv()) {
            let (hash, bytes) = result?;
            sink(&hash, bytes)?;
        }
        Ok(())
    }

    /// Uploads the chunks the store does not hold yet (checked with HEAD), in parallel;
    /// returns which of `chunks` were uploaded (true) or found present (false), in order.
    pub fn put_missing_chunks(&self, chunks: &[(ChunkHash, Bytes)]) -> Result<Vec<bool>> {
        let chunks = chunks.to_vec();
        self.block(move |inner| async move {
            futures::stream::iter(chunks.into_iter().map(|(hash, bytes)| {
                let inner = inner.clone();
                async move {
                    let key = hash.key();
                    let path = inner.path(&key)?;
                    if inner.exists(&key, &path).await? {
                        return Ok(false);
                    }
                    inner.put(&key, &path, bytes).await?;
                    Ok::<_, Error>(true)
                }
            }))
            .buffered(PARALLEL_REQUESTS)
            .try_collect()
            .await
        })
    }
}

impl Inner {
    fn path(&self, key: &str) -> Result<ObjectPath> {
        let full = self.location.key(key);
        ObjectPath::parse(&full)
            .map_err(|e| Error::InvalidArgument(format!("object key '{full}': {e}")))
    }

    fn remote_error(&self, key: &str, op: &'static str, error: object_store::Error) -> Error {
        match error {
            object_store::Error::NotFound { .. } => Error::NotFound {
                key: self.location.key(key),
            },
            other => Error::Remote {
                key: self.location.key(key),
                op,
                message: other.to_string(),
            },
        }
    }

    async fn get(&self, key: &str, path: &ObjectPath, max: u64) -> Result<Bytes> {
        let result = self
            .objects
            .get(path)
            .await
            .map_err(|e| self.remote_error(key, "get", e))?;
        if result.meta.size > max {
            return Err(Error::Remote {
                key: self.location.key(key),
                op: "get",
                message: format!(
                    "object of {} bytes (at most {max} accepted)",
                    result.meta.size
                ),
            });
        }
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.remote_error(key, "get", e))?;
        self.traffic
            .fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.traffic.gets.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    async fn put(&self, key: &str, path: &ObjectPath, bytes: Bytes) -> Result<()> {
        let len = bytes.len() as u64;
        self.objects
            .put(path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| self.remote_error(key, "put", e))?;
        self.traffic.uploaded.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    async fn exists(&self, key: &str, path: &ObjectPath) -> Result<bool> {
        match self.objects.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.remote_error(key, "head", e)),
        }
    }

    async fn get_chunk(&self, hash: &ChunkHash) -> Result<Bytes> {
        let key = hash.key();
        let path = self.path(&key)?;
        let mut last = None;
        for _ in 0..2 {
            let bytes = self.get(&key, &path, MAX_OBJECT_BYTES).await?;
            match hash.verify(&bytes) {
                Ok(()) => return Ok(bytes),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::NotFound {
            key: self.location.key(&key),
        }))
    }
}
