//! `snapvmm img convert`: copies what an image (with its whole backing chain) reads as into
//! a new standalone raw or qcow2 image.
//!
//! Only ranges that hold data are read and written: zero and unallocated runs (found with
//! block status) are skipped, and so are 4 KiB blocks of data that happen to be all zeroes
//! (qemu-img's default `-S 4k`), because a fresh target already reads as zeroes there.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use storage::raw::RawImage;
use storage::{BlockDevice, ImageFormat, OpenOptions};

use super::chain::Chain;
use super::error::CliError;
use super::options::{create_settings, help_text, split_options, wants_help};
use super::progress::Bar;
use super::{flush, open_image, parse_format};

/// Bytes copied per read; large enough to stream, small enough to stay off the heap's mind.
const CHUNK: u64 = 2 << 20;
/// Granularity of zero detection inside data runs (qemu-img convert's default `-S`).
const SPARSE_BLOCK: u64 = 4096;

/// Arguments of `snapvmm img convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Format of IN (probed when absent).
    #[arg(short = 'f', long = "source-format", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Format of OUT.
    #[arg(short = 'O', long = "target-format", value_parser = parse_format, default_value = "raw")]
    pub target_format: ImageFormat,
    /// Options for OUT, as for `img create` (`-o help` lists them).
    #[arg(short = 'o', long = "target-options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Accepted for qemu-img compatibility: convert prints nothing without -p anyway.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The source image (read through its backing chain).
    pub input: PathBuf,
    /// The image to create (replaced if it exists).
    pub output: PathBuf,
}

/// Writes the non-zero blocks of `buf` (guest bytes starting at `offset`) to `target`.
fn write_nonzero(target: &Arc<dyn BlockDevice>, buf: &[u8], offset: u64) -> storage::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut at = 0usize;
    while at < buf.len() {
        // Blocks aligned to guest offsets, so partial first and last blocks are fine.
        let guest = offset + at as u64;
        let block_end = ((guest / SPARSE_BLOCK + 1) * SPARSE_BLOCK - offset) as usize;
        let end = block_end.min(buf.len());
        let zero = buf[at..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                target.write_at(&buf[start..at], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run_start {
        target.write_at(&buf[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Runs `snapvmm img convert`.
pub fn run(args: ConvertArgs) -> Result<u8, CliError> {
    let pairs = split_options(&args.options)?;
    if wants_help(&pairs) {
        print!("{}", help_text(args.target_format));
        return Ok(0);
    }
    let settings = create_settings(args.target_format, &pairs)?;
    if settings.backing_file.is_some() || settings.size.is_some() {
        return Err(CliError::new(
            "convert writes a standalone image of the source's size: -o size and -o backing_file are not accepted",
        ));
    }
    let source = open_image(
        &args.input,
        args.format,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    // Creating OUT truncates it: refuse when it is the source or one of its backing files.
    if let Ok(out) = std::fs::canonicalize(&args.output) {
        let mut layer = Some(source.clone());
        while let Some(l) = layer {
            if std::fs::canonicalize(l.path()).ok().as_ref() == Some(&out) {
                return Err(CliError::new(format!(
                    "'{}' is part of the source image's chain: refusing to overwrite it",
                    args.output.display()
                )));
            }
            layer = l.backing();
        }
    }
    let size = source.size();
    let create_error = |e: storage::Error| CliError::new(format!("{}: {e}", args.output.display()));
    match args.target_format {
        ImageFormat::Raw => RawImage::create(&args.output, size).map_err(create_error)?,
        ImageFormat::Qcow2 => {
            let mut options = settings.qcow2.clone();
            // qcow2 sizes are whole 512-byte sectors for QEMU (see `create`).
            options.size = Some(size.next_multiple_of(512));
            storage::qcow2::create(&args.output, &options).map_err(create_error)?;
        }
    }
    let target = open_image(
        &args.output,
        Some(args.target_format),
        OpenOptions {
            open_backing: false,
            ..OpenOptions::default()
        },
    )?;
    let chain = Chain::new(source);
    let progress = Bar::new(args.progress);
    progress.update(0, size);

    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0u64;
    while offset < size {
        let extent = chain.extent(offset, size - offset)?;
        if extent.data && !extent.zero {
            let end = offset + extent.length;
            let mut at = offset;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                chain.top().read_at(&mut buf[..n], at).map_err(|e| {
                    CliError::new(format!(
                        "error while reading '{}' at offset {at}: {e}",
                        args.input.display()
                    ))
                })?;
                write_nonzero(&target, &buf[..n], at).map_err(|e| {
                    CliError::new(format!(
                        "error while writing '{}' at offset {at}: {e}",
                        args.output.display()
                    ))
                })?;
                at += n as u64;
                progress.update(at, size);
            }
        }
        offset += extent.length;
        progress.update(offset, size);
    }
    flush(&target)?;
    progress.finish();
    Ok(0)
}
