//! `snapvmm img map`: qemu-img map, in its human and JSON layouts.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use storage::OpenOptions;

use super::chain::{Chain, Extent};
use super::error::CliError;
use super::output::OutputFormat;
use super::{open_image, parse_format, parse_size_arg};

/// Arguments of `snapvmm img map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    pub format: Option<storage::ImageFormat>,
    /// Output layout.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// First guest byte to map.
    #[arg(long = "start-offset", value_parser = parse_size_arg, default_value = "0")]
    pub start_offset: u64,
    /// Map at most this many bytes.
    #[arg(long = "max-length", value_parser = parse_size_arg)]
    pub max_length: Option<u64>,
    /// Inspect an image another process may be writing (no lock refusing its writes).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub file: PathBuf,
}

/// qemu-img's `entry_mergeable`: two runs print as one when nothing but their position
/// differs and their host offsets continue each other.
fn mergeable(current: &Extent, next: &Extent) -> bool {
    if current.length == 0 {
        return false;
    }
    if current.zero != next.zero
        || current.data != next.data
        || current.compressed != next.compressed
        || current.depth != next.depth
        || current.present != next.present
        || current.filename != next.filename
        || current.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    match (current.offset, next.offset) {
        (Some(a), Some(b)) => a.checked_add(current.length) == Some(b),
        _ => true,
    }
}

/// Prints one run as qemu-img's `dump_map_entry` does. In the human layout it also folds
/// the next run's zero/data flags together, as qemu-img does, so that runs the layout does
/// not distinguish merge.
fn dump(
    out: &mut impl Write,
    format: OutputFormat,
    e: &Extent,
    next: Option<&mut Extent>,
) -> Result<(), CliError> {
    let io = |err: std::io::Error| CliError::new(format!("writing output: {err}"));
    match format {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err(CliError::new(
                    "file contains compressed clusters: the human layout cannot show them (use --output json)",
                ));
            }
            if e.data && !e.zero {
                let hex = |n: u64| {
                    if n == 0 {
                        "0".to_string()
                    } else {
                        format!("{n:#x}")
                    }
                };
                writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                )
                .map_err(io)?;
            }
            if let Some(next) = next {
                if !next.data || next.zero {
                    next.data = false;
                    next.zero = true;
                }
            }
        }
        OutputFormat::Json => {
            write!(
                out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            )
            .map_err(io)?;
            if let Some(offset) = e.offset {
                write!(out, ", \"offset\": {offset}").map_err(io)?;
            }
            write!(out, "}}").map_err(io)?;
            if next.is_some() {
                writeln!(out, ",").map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Runs `snapvmm img map`.
pub fn run(args: MapArgs) -> Result<u8, CliError> {
    let device = open_image(
        &args.file,
        args.format,
        OpenOptions {
            read_only: true,
            force_share: args.force_share,
            ..OpenOptions::default()
        },
    )?;
    let chain = Chain::new(device);
    let size = chain.top().size();
    let end = match args.max_length {
        Some(max) => size.min(args.start_offset.saturating_add(max)),
        None => size,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |err: std::io::Error| CliError::new(format!("writing output: {err}"));
    match args.output {
        OutputFormat::Human => writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?,
        OutputFormat::Json => write!(out, "[").map_err(io)?,
    }
    // The same loop as qemu-img's img_map, down to printing a zero-length entry for an
    // empty image.
    let mut current = Extent {
        start: args.start_offset,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        filename: None,
    };
    while current.start + current.length < end {
        let offset = current.start + current.length;
        let mut next = chain.extent(offset, end - offset)?;
        if mergeable(&current, &next) {
            next.start = current.start;
            next.length += current.length;
        } else if current.length > 0 {
            dump(&mut out, args.output, &current, Some(&mut next))?;
        }
        current = next;
    }
    dump(&mut out, args.output, &current, None)?;
    if args.output == OutputFormat::Json {
        writeln!(out, "]").map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(0)
}
