//! `snapvmm snapshot push|pull|ls|rm|gc`: snapshots in an S3-compatible store (AWS S3,
//! SeaweedFS, MinIO...), and `snapvmm restore s3://...`, the lazy restore from one.
//!
//! ```text
//! snapvmm snapshot push --snapshot-metadata vm/snapvmm-snapshots.json s1 s3://snaps/fleet
//! snapvmm snapshot push --api-socket vm.sock s1 s3://snaps/fleet     # from a running VM
//! snapvmm snapshot ls s3://snaps/fleet
//! snapvmm snapshot pull s3://snaps/fleet/s1 ./s1                        # files for offline use
//! snapvmm restore s3://snaps/fleet/s1 --cache /var/cache/snapvmm --serial console.log
//! snapvmm snapshot rm s3://snaps/fleet/s1 && snapvmm snapshot gc s3://snaps/fleet
//! ```
//!
//! The endpoint comes from `--endpoint` or `AWS_ENDPOINT_URL`, credentials from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or `SNAPVMM_STORE_CONFIG` (AWS INI format),
//! the region from `AWS_REGION`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use store::lazy::LazyRestore;
use store::push::{PushOptions, PushSummary};
use store::remote::RemoteMemory;
use store::source::SnapshotSource;
use store::{Location, Store, StoreConfig};
use vmm::checkpoint::{MemorySource, RestoreOptions};
use vmm::control::export::SnapshotExporter;
use vmm::control::types::{SnapshotPush, SnapshotPushResult};
use vmm::memory::uffd::PageSource;
use vmm::snapshot::tree::SnapshotInfo;
use vmm::{ExitHandle, ExitReason, Sandbox, SandboxOptions};

/// Arguments of `snapvmm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    verb: Verb,
}

/// Options every store verb takes.
#[derive(Debug, Args)]
struct StoreOptions {
    /// The S3 endpoint URL [default: AWS_ENDPOINT_URL, else AWS's own].
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Upload a snapshot (memory and frozen disk images) into a store as deduplicated chunks.
    Push {
        /// Read the snapshot from this tree metadata file (offline; nothing is changed).
        #[arg(long, value_name = "FILE", required_unless_present = "api_socket")]
        snapshot_metadata: Option<PathBuf>,
        /// Push from a running VM, through its API socket.
        #[arg(long, value_name = "PATH", conflicts_with = "snapshot_metadata")]
        api_socket: Option<PathBuf>,
        /// Replace a snapshot of the same name in the store.
        #[arg(long)]
        replace: bool,
        /// Bytes per chunk: a power of two from 64 KiB to 64 MiB [default: 512 KiB]. Smaller
        /// chunks share more between snapshots and cost more requests (offline pushes only).
        #[arg(long, value_name = "BYTES", conflicts_with = "api_socket")]
        chunk_size: Option<u64>,
        /// The snapshot's name in the tree (and in the store).
        name: String,
        /// The store: s3://BUCKET/PREFIX.
        store: String,
        #[command(flatten)]
        options: StoreOptions,
    },
    /// Download a snapshot as local files: OUT/checkpoint and OUT/DISK.qcow2.
    Pull {
        /// The snapshot: s3://BUCKET/PREFIX/NAME.
        snapshot: String,
        /// The directory to write (created).
        out: PathBuf,
        /// Chunk cache directory [default: OUT/.chunks].
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        #[command(flatten)]
        options: StoreOptions,
    },
    /// List the snapshots in a store.
    Ls {
        /// The store: s3://BUCKET/PREFIX.
        store: String,
        #[command(flatten)]
        options: StoreOptions,
    },
    /// Remove a snapshot from a store (its chunks go at the next gc if nothing else uses
    /// them).
    Rm {
        /// The snapshot: s3://BUCKET/PREFIX/NAME.
        snapshot: String,
        #[command(flatten)]
        options: StoreOptions,
    },
    /// Delete the chunks no snapshot of the store references.
    Gc {
        /// The store: s3://BUCKET/PREFIX.
        store: String,
        /// Keep unreferenced chunks younger than this (a push under way may be about to
        /// reference them).
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        grace_secs: u64,
        #[command(flatten)]
        options: StoreOptions,
    },
}

/// Opens the store at `url` with the configuration from the environment.
pub(crate) fn open_store(
    location: &Location,
    endpoint: Option<&str>,
) -> Result<Arc<Store>, String> {
    let config = StoreConfig::from_env(endpoint).map_err(|e| e.to_string())?;
    Ok(Arc::new(
        Store::open(location, &config).map_err(|e| e.to_string())?,
    ))
}

fn print(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        println!("{}", text());
    }
}

fn push_text(s: &PushSummary) -> String {
    format!(
        "pushed '{}': {} MiB scanned, {} KiB uploaded in {} chunk(s), {} chunk(s) reused, {} zero chunk(s) skipped",
        s.name,
        s.bytes_scanned >> 20,
        s.bytes_uploaded >> 10,
        s.chunks_uploaded,
        s.chunks_reused,
        s.zero_chunks
    )
}

/// Pushes snapshot `source` into `store` with a progress bar on a terminal.
pub(crate) fn push_with_progress(
    store: &Arc<Store>,
    source: &SnapshotSource,
    options: &PushOptions,
) -> Result<PushSummary, String> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let result = store::push::push(store, source, options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    result.map_err(|e| e.to_string())
}

fn run(args: SnapshotArgs) -> Result<(), String> {
    match args.verb {
        Verb::Push {
            snapshot_metadata,
            api_socket,
            replace,
            chunk_size,
            name,
            store,
            options,
        } => {
            let summary: PushSummary = match (snapshot_metadata, api_socket) {
                (Some(metadata), _) => {
                    let location = Location::parse(&store).map_err(|e| e.to_string())?;
                    let client = open_store(&location, options.endpoint.as_deref())?;
                    let source = SnapshotSource::from_metadata(&metadata, &name)
                        .map_err(|e| e.to_string())?;
                    let mut push = PushOptions {
                        replace,
                        ..Default::default()
                    };
                    if let Some(size) = chunk_size {
                        push.chunk_size = size;
                    }
                    push_with_progress(&client, &source, &push)?
                }
                (None, Some(socket)) => {
                    if options.endpoint.is_some() {
                        return Err(
                            "--endpoint is the VM process's (AWS_ENDPOINT_URL) with --api-socket"
                                .into(),
                        );
                    }
                    let client = snapvmm_api::ApiClient::new(&socket)
                        .map_err(|e| format!("{}: {e}", socket.display()))?;
                    let body = serde_json::json!({ "store": store, "replace": replace });
                    let reply: SnapshotPushResult = client
                        .call_json("PUT", &format!("/snapshots/{name}/push"), Some(&body))
                        .map_err(|e| e.to_string())?;
                    from_api(reply)
                }
                (None, None) => return Err("--snapshot-metadata or --api-socket".into()),
            };
            print(options.json, &summary, || push_text(&summary));
        }
        Verb::Pull {
            snapshot,
            out,
            cache,
            options,
        } => {
            let (location, name) =
                Location::parse_snapshot(&snapshot).map_err(|e| e.to_string())?;
            let client = open_store(&location, options.endpoint.as_deref())?;
            let cache = cache.unwrap_or_else(|| out.join(".chunks"));
            let summary =
                store::pull::pull(client, &name, &out, &cache).map_err(|e| e.to_string())?;
            print(options.json, &summary, || {
                format!(
                    "pulled '{name}' into {} ({} KiB fetched)",
                    out.display(),
                    summary.bytes_fetched >> 10
                )
            });
        }
        Verb::Ls { store, options } => {
            let location = Location::parse(&store).map_err(|e| e.to_string())?;
            let client = open_store(&location, options.endpoint.as_deref())?;
            let entries = store::catalog::list(&client).map_err(|e| e.to_string())?;
            print(options.json, &entries, || {
                let mut text = format!(
                    "{:<24} {:>12} {:>8} {:<7} {:<12} {}",
                    "NAME", "DATA (KiB)", "CHUNKS", "MEMORY", "WORKING SET", "DISKS"
                );
                for e in &entries {
                    text.push_str(&format!(
                        "\n{:<24} {:>12} {:>8} {:<7} {:<12} {}",
                        e.name,
                        e.data_bytes >> 10,
                        e.chunks,
                        if e.memory { "yes" } else { "no" },
                        if e.working_set { "yes" } else { "no" },
                        e.disks.join(",")
                    ));
                }
                text
            });
        }
        Verb::Rm { snapshot, options } => {
            let (location, name) =
                Location::parse_snapshot(&snapshot).map_err(|e| e.to_string())?;
            let client = open_store(&location, options.endpoint.as_deref())?;
            store::catalog::remove(&client, &name).map_err(|e| e.to_string())?;
            print(
                options.json,
                &serde_json::json!({ "removed": name }),
                || format!("removed '{name}' (run gc to reclaim its chunks)"),
            );
        }
        Verb::Gc {
            store,
            grace_secs,
            options,
        } => {
            let location = Location::parse(&store).map_err(|e| e.to_string())?;
            let client = open_store(&location, options.endpoint.as_deref())?;
            let summary = store::catalog::gc(&client, grace_secs).map_err(|e| e.to_string())?;
            print(options.json, &summary, || {
                format!(
                    "{} chunk(s), {} referenced by {} snapshot(s); deleted {} ({} KiB), kept {} young",
                    summary.chunks,
                    summary.referenced,
                    summary.manifests,
                    summary.deleted,
                    summary.deleted_bytes >> 10,
                    summary.kept_young
                )
            });
        }
    }
    Ok(())
}

fn from_api(r: SnapshotPushResult) -> PushSummary {
    PushSummary {
        name: r.name,
        manifest: r.manifest,
        bytes_scanned: r.bytes_scanned,
        bytes_uploaded: r.bytes_uploaded,
        chunks: r.chunks,
        chunks_uploaded: r.chunks_uploaded,
        chunks_reused: r.chunks_reused,
        zero_chunks: r.zero_chunks,
    }
}

fn to_api(s: PushSummary) -> SnapshotPushResult {
    SnapshotPushResult {
        name: s.name,
        manifest: s.manifest,
        bytes_scanned: s.bytes_scanned,
        bytes_uploaded: s.bytes_uploaded,
        chunks: s.chunks,
        chunks_uploaded: s.chunks_uploaded,
        chunks_reused: s.chunks_reused,
        zero_chunks: s.zero_chunks,
    }
}

/// The snapshot-store client behind `PUT /snapshots/{name}/push` of a VM this process
/// runs: endpoint and credentials from the process's environment.
#[derive(Debug)]
pub(crate) struct StoreExporter;

impl SnapshotExporter for StoreExporter {
    fn push(
        &self,
        snapshot: &SnapshotInfo,
        metadata: &Path,
        request: &SnapshotPush,
    ) -> Result<SnapshotPushResult, String> {
        let location = Location::parse(&request.store).map_err(|e| e.to_string())?;
        let client = open_store(&location, None)?;
        let base = metadata.parent().unwrap_or(Path::new("."));
        let source = SnapshotSource::from_info(snapshot, base).map_err(|e| e.to_string())?;
        let options = PushOptions {
            replace: request.replace,
            ..Default::default()
        };
        let summary = store::push::push(&client, &source, &options, &mut |_, _| {})
            .map_err(|e| e.to_string())?;
        tracing::info!("{}", push_text(&summary));
        Ok(to_api(summary))
    }
}

/// Lets `PUT /snapshots/{name}/push` of `sandbox`'s API push to a snapshot store. The
/// subcommands that serve an API call this, so the store depends on none of them.
pub(crate) fn install_exporter(sandbox: &Sandbox) {
    sandbox.control().set_exporter(Arc::new(StoreExporter));
}

/// Runs `snapvmm snapshot`; returns the process exit status.
pub fn main(args: SnapshotArgs) -> u8 {
    crate::serve::init_logging();
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snapvmm snapshot: error: {e}");
            1
        }
    }
}

/// Guest memory of a snapshot in the store, for the VMM's userfaultfd pager.
struct StorePages(Arc<RemoteMemory>);

impl PageSource for StorePages {
    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }

    fn is_zero_chunk(&self, index: u64) -> bool {
        self.0.is_zero_chunk(index)
    }

    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_chunk(index, buf).map_err(|e| e.to_string())
    }

    fn touched(&self, index: u64) {
        self.0.touch(index);
    }

    fn failed(&self, message: &str) {
        // The VM is stopping; a thread of ours stuck on the missing chunk would keep the
        // process alive for ever, so after a grace period for a clean stop it ends here.
        let message = message.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(STOP_GRACE);
            eprintln!("snapvmm restore: VM failed: {message}");
            std::process::exit(1);
        });
    }
}

/// How long a VM whose memory chunk could not be fetched gets to stop cleanly.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How `snapvmm restore s3://...` runs.
pub(crate) struct LazyArgs<'a> {
    /// s3://BUCKET/PREFIX/NAME.
    pub url: &'a str,
    /// The chunk cache (and run) directory.
    pub cache: &'a Path,
    /// The endpoint flag.
    pub endpoint: Option<&'a str>,
    /// Serve the API here.
    pub api_socket: Option<&'a Path>,
    /// Console destination.
    pub serial: Box<dyn std::io::Write + Send>,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// Snapshot tree metadata for the API.
    pub snapshot_metadata: Option<PathBuf>,
    /// Fetch and install the recorded working set first.
    pub prefetch: bool,
    /// Record the working set over this long when none is stored.
    pub working_set_secs: u64,
}

/// Records which chunks the guest touched in its first `secs` (or until the VM ends) and
/// stores them as the snapshot's working set.
fn record_working_set(
    lazy: &LazyRestore,
    exit: ExitHandle,
    secs: u64,
) -> std::thread::JoinHandle<()> {
    let store = lazy.chunks.store().clone();
    let name = lazy.manifest.name.clone();
    let memory = lazy.memory.clone();
    let disks = lazy.remote_disks.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline && !exit.is_requested() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let touched_memory = memory.touched();
        let touched_disks = disks.iter().map(|d| d.touched()).collect();
        match store::catalog::write_working_set(&store, &name, touched_memory, touched_disks) {
            Ok(()) => tracing::info!("recorded the working set of '{name}'"),
            Err(e) => tracing::warn!("recording the working set of '{name}': {e}"),
        }
    })
}

/// Restores snapshot `args.url` lazily: memory through the pager, disks through local
/// overlays over the store. Returns how the VM ended.
pub(crate) fn restore_lazy(args: LazyArgs<'_>) -> Result<ExitReason, String> {
    let started = Instant::now();
    let (location, name) = Location::parse_snapshot(args.url).map_err(|e| e.to_string())?;
    let client = open_store(&location, args.endpoint)?;
    let lazy = store::lazy::prepare(client, &name, args.cache).map_err(|e| e.to_string())?;
    let mut prefetch = Vec::new();
    if args.prefetch {
        if let Some(set) = &lazy.working_set {
            // Memory's chunks before the start (the pager installs them ahead of the
            // guest's faults); the disks' in parallel with the starting guest, so the start
            // does not wait for data it reads later (a read that comes first fetches its
            // chunk itself).
            let (memory, disks) = lazy.working_set_hashes();
            let fetched = lazy.chunks.prefetch(&memory).map_err(|e| e.to_string())?;
            tracing::info!("prefetched {fetched} working-set memory chunk(s)");
            prefetch = set.memory.clone();
            let chunks = lazy.chunks.clone();
            std::thread::spawn(move || match chunks.prefetch(&disks) {
                Ok(n) => tracing::info!("prefetched {n} working-set disk chunk(s)"),
                Err(e) => tracing::warn!("prefetching the working set's disk chunks: {e}"),
            });
        }
    }
    let options = RestoreOptions {
        memory: MemorySource::Pager {
            source: Arc::new(StorePages(lazy.memory.clone())),
            prefetch,
        },
        disks: Some(lazy.overlays.clone()),
        ..Default::default()
    };
    let sandbox = Sandbox::restore_with(
        &lazy.checkpoint,
        args.serial,
        args.paused,
        &SandboxOptions {
            snapshot_metadata: args.snapshot_metadata.clone(),
            ..Default::default()
        },
        options,
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        "restored '{name}' from {location} in {} ms (run directory {})",
        started.elapsed().as_millis(),
        lazy.run_dir.display()
    );
    let recorder = (lazy.working_set.is_none() && args.working_set_secs > 0)
        .then(|| record_working_set(&lazy, sandbox.exit_handle(), args.working_set_secs));
    let reason = match args.api_socket {
        Some(socket) => {
            install_exporter(&sandbox);
            crate::serve::serve_api(sandbox, socket)
        }
        None => sandbox.wait().map_err(|e| e.to_string()),
    };
    if let Some(recorder) = recorder {
        let _ = recorder.join();
    }
    let (memory, disks) = lazy.touched();
    let disk_chunks: usize = disks.iter().map(Vec::len).sum();
    tracing::info!(
        "fetched {} chunk(s), {} KiB from the store; the guest touched {} memory chunk(s) \
         ({} KiB) and {} disk chunk(s)",
        lazy.chunks.fetched_chunks(),
        lazy.chunks.fetched_bytes() >> 10,
        memory.len(),
        (memory.len() as u64 * lazy.memory.chunk_size()) >> 10,
        disk_chunks
    );
    reason
}
