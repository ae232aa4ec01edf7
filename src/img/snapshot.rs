//! `snapvmm img snapshot`: internal qcow2 snapshots, as `qemu-img snapshot`.

use std::path::PathBuf;

use clap::Args;
use storage::qcow2::Qcow2Image;
use storage::{ImageFormat, OpenOptions};

use super::info::{snapshots_human, snapshots_json, Snapshot};
use super::output::{to_json_pretty, OutputFormat};
use super::CliError;

/// `snapvmm img snapshot [-l | -c NAME | -a NAME | -d NAME] [--output json] FILE`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").args(["list", "create", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    pub list: bool,
    /// Create a snapshot named NAME of the current disk state.
    #[arg(short = 'c', value_name = "NAME")]
    pub create: Option<String>,
    /// Revert the disk to snapshot NAME (id or tag).
    #[arg(short = 'a', value_name = "NAME")]
    pub apply: Option<String>,
    /// Delete snapshot NAME (id or tag).
    #[arg(short = 'd', value_name = "NAME")]
    pub delete: Option<String>,
    /// Image format; only qcow2 has internal snapshots.
    #[arg(short = 'f', value_parser = super::parse_format)]
    pub format: Option<ImageFormat>,
    /// Output format of -l.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub filename: PathBuf,
}

/// Runs the verb; exit status 0 on success, errors become exit status 1.
pub fn run(args: SnapshotArgs) -> Result<u8, CliError> {
    let format = match args.format {
        Some(f) => f,
        None => storage::probe_format(&args.filename)?,
    };
    if format != ImageFormat::Qcow2 {
        return Err(CliError::new(format!(
            "{}: format '{format}' does not support internal snapshots",
            args.filename.display()
        )));
    }
    let writing = args.create.is_some() || args.apply.is_some() || args.delete.is_some();
    let options = OpenOptions {
        read_only: !writing,
        // Snapshot operations touch this layer only, as qemu-img's do.
        open_backing: false,
        ..OpenOptions::default()
    };
    let mut image = Qcow2Image::open(&args.filename, &options)?;
    let name = |n: &str| n.to_string();
    if let Some(n) = &args.create {
        image
            .create_snapshot(n, 0, 0)
            .map_err(|e| CliError::new(format!("Could not create snapshot '{}': {e}", name(n))))?;
    } else if let Some(n) = &args.apply {
        image
            .apply_snapshot(n)
            .map_err(|e| CliError::new(format!("Could not apply snapshot '{}': {e}", name(n))))?;
    } else if let Some(n) = &args.delete {
        image
            .delete_snapshot(n)
            .map_err(|e| CliError::new(format!("Could not delete snapshot '{}': {e}", name(n))))?;
    } else {
        let list: Vec<Snapshot> = image.snapshots().iter().map(Snapshot::from).collect();
        match args.output {
            OutputFormat::Json => println!("{}", to_json_pretty(&snapshots_json(&list))),
            OutputFormat::Human => {
                if !list.is_empty() && !args.quiet {
                    print!("{}", snapshots_human(&list));
                }
            }
        }
    }
    image.close()?;
    Ok(0)
}
