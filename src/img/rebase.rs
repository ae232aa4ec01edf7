//! `snapvmm img rebase`: changes an image's backing file (qemu-img rebase).
//!
//! Safe mode (the default) first copies into FILE every cluster it does not hold whose
//! contents differ between the old backing chain and the new one, so FILE reads the same
//! afterwards; `-u` only rewrites the header. `-b ""` makes FILE standalone. The engine is
//! [`::snapshot::offline::rebase`].

use std::path::PathBuf;

use clap::Args;
use storage::ImageFormat;

use super::error::CliError;
use super::parse_format;
use super::progress::Bar;

/// Arguments of `snapvmm img rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// The new backing file, as it is to be recorded (relative names are relative to
    /// FILE); "" for none.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: String,
    /// The new backing file's format (probed when absent).
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    pub backing_format: Option<ImageFormat>,
    /// Unsafe mode: rewrite the header only, without comparing or copying data.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image to rebase.
    pub file: PathBuf,
}

/// Runs `snapvmm img rebase`.
pub fn run(args: RebaseArgs) -> Result<u8, CliError> {
    let bar = Bar::new(args.progress && !args.quiet);
    let backing = (!args.backing.is_empty()).then_some(args.backing.as_str());
    ::snapshot::offline::rebase(
        &args.file,
        backing,
        args.backing_format,
        args.unsafe_mode,
        &mut |done, total| bar.update(done, total),
    )
    .map_err(|e| CliError::new(format!("rebase of '{}' failed: {e}", args.file.display())))?;
    bar.finish();
    Ok(0)
}
