//! The blocking client of one store: an `object_store` S3 backend driven by a small tokio
//! runtime of its own, since the rest of snapvmm is synchronous.
//!
//! Every request goes through `object_store`'s bounded retries with exponential backoff
//! (server errors, timeouts, refused connections), then fails with an error naming the key.
//! Chunks fetched are checked against their hash; a mismatch is fetched once more (another
//! replica may serve it) before it is reported as corrupt.

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
pub struct Store {
    location: Location,
    objects: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    traffic: Traffic,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
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
            location,
            objects,
            runtime,
            traffic: Traffic::default(),
        })
    }

    /// Where the store lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Bytes moved so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

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

    /// Fetches the object at `key` (relative to the prefix), refusing objects larger than
    /// `max` bytes.
    pub fn get(&self, key: &str, max: u64) -> Result<Bytes> {
        let path = self.path(key)?;
        self.runtime.block_on(self.get_async(key, &path, max))
    }

    async fn get_async(&self, key: &str, path: &ObjectPath, max: u64) -> Result<Bytes> {
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

    /// Stores `bytes` at `key`.
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.runtime.block_on(self.put_async(key, &path, bytes))
    }

    async fn put_async(&self, key: &str, path: &ObjectPath, bytes: Bytes) -> Result<()> {
        let len = bytes.len() as u64;
        self.objects
            .put(path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| self.remote_error(key, "put", e))?;
        self.traffic.uploaded.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Whether an object exists at `key`.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        self.runtime.block_on(self.exists_async(key, &path))
    }

    async fn exists_async(&self, key: &str, path: &ObjectPath) -> Result<bool> {
        match self.objects.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.remote_error(key, "head", e)),
        }
    }

    /// Deletes the object at `key` (absent objects are not an error).
    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.runtime.block_on(async {
            match self.objects.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.remote_error(key, "delete", e)),
            }
        })
    }

    /// Every object under `dir` (relative to the prefix), recursively.
    pub fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let path = self.path(dir)?;
        let root = if self.location.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.location.prefix)
        };
        self.runtime.block_on(async {
            let metas: Vec<_> = self
                .objects
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(|e| self.remote_error(dir, "list", e))?;
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
        let key = hash.key();
        let path = self.path(&key)?;
        self.runtime
            .block_on(self.get_chunk_async(hash, &key, &path))
    }

    async fn get_chunk_async(
        &self,
        hash: &ChunkHash,
        key: &str,
        path: &ObjectPath,
    ) -> Result<Bytes> {
        let mut last = None;
        for _ in 0..2 {
            let bytes = self.get_async(key, path, MAX_OBJECT_BYTES).await?;
            match hash.verify(&bytes) {
                Ok(()) => return Ok(bytes),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::NotFound {
            key: self.location.key(key),
        }))
    }

    /// Fetches many chunks in parallel, handing each checked chunk to `sink` (on the
    /// calling thread, in completion order). Stops at the first error.
    pub fn get_chunks(
        &self,
        hashes: &[ChunkHash],
        sink: &mut dyn FnMut(&ChunkHash, Bytes) -> Result<()>,
    ) -> Result<()> {
        self.runtime.block_on(async {
            let mut fetches = futures::stream::iter(hashes.iter().map(|hash| async move {
                let key = hash.key();
                let path = self.path(&key)?;
                let bytes = self.get_chunk_async(hash, &key, &path).await?;
                Ok::<_, Error>((hash, bytes))
            }))
            .buffer_unordered(PARALLEL_REQUESTS);
            while let Some(result) = fetches.next().await {
                let (hash, bytes) = result?;
                sink(hash, bytes)?;
            }
            Ok(())
        })
    }

    /// Uploads the chunks the store does not hold yet (checked with HEAD), in parallel;
    /// returns which of `chunks` were uploaded (true) or found present (false), in order.
    pub fn put_missing_chunks(&self, chunks: &[(ChunkHash, Bytes)]) -> Result<Vec<bool>> {
        self.runtime.block_on(async {
            futures::stream::iter(chunks.iter().map(|(hash, bytes)| async move {
                let key = hash.key();
                let path = self.path(&key)?;
                if self.exists_async(&key, &path).await? {
                    return Ok(false);
                }
                self.put_async(&key, &path, bytes.clone()).await?;
                Ok::<_, Error>(true)
            }))
            .buffered(PARALLEL_REQUESTS)
            .try_collect()
            .await
        })
    }
}
