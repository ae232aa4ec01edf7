//! `snapvmm img`: qemu-img's verbs (and a little of qemu-io) on snapvmm's own storage engine.
//!
//! Each verb takes qemu-img's flags and prints qemu-img's output fields, so scripts and
//! habits carry over, and so the two tools can be run side by side on the same image to
//! check the engine against QEMU. One module per verb; shared parsing and printing live in
//! [`size`], [`options`], [`output`] and [`chain`].

use std::path::Path;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use storage::{BlockDevice, ImageFormat, OpenOptions};

pub mod bench;
pub mod chain;
pub mod check;
pub mod commit;
pub mod convert;
pub mod create;
pub mod error;
pub mod info;
pub mod io;
pub mod map;
pub mod options;
pub mod output;
pub mod progress;
pub mod rebase;
pub mod size;
pub mod snapshot;

pub use error::CliError;

/// `snapvmm img <verb> ...`.
#[derive(Debug, Args)]
pub struct ImgArgs {
    /// The verb.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs of `snapvmm img`.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a new image (qemu-img create).
    Create(create::CreateArgs),
    /// Show an image's metadata (qemu-img info).
    Info(info::InfoArgs),
    /// Check an image's consistency, optionally repairing it (qemu-img check).
    Check(check::CheckArgs),
    /// Show where each guest range of an image is stored (qemu-img map).
    Map(map::MapArgs),
    /// Copy an image, with its backing chain, into a standalone image (qemu-img convert).
    Convert(convert::ConvertArgs),
    /// Run qemu-io style read/write/discard/flush commands on an image (qemu-io -c).
    Io(io::IoArgs),
    /// Measure request throughput with parallel reads or writes (qemu-img bench).
    Bench(bench::BenchArgs),
    /// List, create, apply or delete internal snapshots (qemu-img snapshot).
    Snapshot(snapshot::SnapshotArgs),
    /// Merge an image's data into its backing file (qemu-img commit).
    Commit(commit::CommitArgs),
    /// Change an image's backing file, keeping its contents (qemu-img rebase).
    Rebase(rebase::RebaseArgs),
}

/// Runs one verb and turns its outcome into the process exit status: the verb's own status
/// (qemu-img check's 0/2/3/63, ...) or 1 after printing the error.
pub fn main(args: ImgArgs) -> u8 {
    let result = match args.verb {
        Verb::Create(a) => create::run(a),
        Verb::Info(a) => info::run(a),
        Verb::Check(a) => check::run(a),
        Verb::Map(a) => map::run(a),
        Verb::Convert(a) => convert::run(a),
        Verb::Io(a) => io::run(a),
        Verb::Bench(a) => bench::run(a),
        Verb::Snapshot(a) => snapshot::run(a),
        Verb::Commit(a) => commit::run(a),
        Verb::Rebase(a) => rebase::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapvmm img: error: {e}");
            1
        }
    }
}

/// Clap value parser for `-f`/`-O`/`-F` format names.
pub fn parse_format(name: &str) -> Result<ImageFormat, String> {
    name.parse::<ImageFormat>().map_err(|e| e.to_string())
}

/// Clap value parser for size arguments with qemu suffixes ("64k", "1G").
pub fn parse_size_arg(text: &str) -> Result<u64, String> {
    size::parse_size(text).map_err(|e| match e {
        size::SizeError::Invalid => format!(
            "invalid size '{text}': expected a number with an optional k, M, G, T, P or E suffix"
        ),
        size::SizeError::TooLarge => {
            format!(
                "invalid size '{text}': must be between 0 and {}",
                size::MAX_SIZE
            )
        }
    })
}

/// qemu's cache modes (`-t`), reduced to what they mean for snapvmm's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum CacheMode {
    /// `O_DIRECT`, flush on request.
    None,
    /// Page cache, flush on request (qemu's default).
    #[default]
    Writeback,
    /// Page cache, flush after every write.
    Writethrough,
    /// `O_DIRECT`, flush after every write.
    Directsync,
    /// Page cache, never flush (not even at exit).
    Unsafe,
}

impl CacheMode {
    /// Whether the image is opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether every write is followed by a flush.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether a final flush runs before the image is closed.
    pub fn flush_at_exit(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// Opens `path` (format forced or probed) with its backing chain, naming the file on error.
pub fn open_image(
    path: &Path,
    format: Option<ImageFormat>,
    options: OpenOptions,
) -> Result<Arc<dyn BlockDevice>, CliError> {
    let options = OpenOptions { format, ..options };
    storage::open(path, &options).map_err(|e| CliError::open(path, e))
}

/// Flushes `device` after writes, naming the file on error. Dropping the last `Arc` closes
/// the image too, but only an explicit flush reports failure.
pub fn flush(device: &Arc<dyn BlockDevice>) -> Result<(), CliError> {
    device.flush().map_err(|e| {
        CliError::new(format!(
            "flush of '{}' failed: {e}",
            device.path().display()
        ))
    })
}
