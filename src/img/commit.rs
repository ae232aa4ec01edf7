//! `snapvmm img commit`: merges an image's data into its backing file (qemu-img commit).
//!
//! Without `-b`, FILE's data goes into its backing file and FILE is emptied afterwards
//! (unless `-d`). With `-b BASE`, everything from FILE down to just above BASE goes into
//! BASE and nothing is emptied; the layers in between no longer read correctly on their
//! own, as with qemu-img. The engine is [`::snapshot::offline::commit`].

use std::path::PathBuf;

use clap::Args;

use super::error::CliError;
use super::progress::Bar;

/// Arguments of `snapvmm img commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The image to commit into (must be in FILE's backing chain; default: FILE's
    /// backing file). Implies -d.
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// Do not empty FILE after committing.
    #[arg(short = 'd')]
    pub keep: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image whose data is committed.
    pub file: PathBuf,
}

/// Runs `snapvmm img commit`.
pub fn run(args: CommitArgs) -> Result<u8, CliError> {
    let bar = Bar::new(args.progress && !args.quiet);
    ::snapshot::offline::commit(
        &args.file,
        args.base.as_deref(),
        args.keep,
        &mut |done, total| bar.update(done, total),
    )
    .map_err(|e| CliError::new(format!("commit of '{}' failed: {e}", args.file.display())))?;
    bar.finish();
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
