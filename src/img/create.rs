//! `snapvmm img create`: qemu-img create for qcow2 and raw images.

use std::path::{Path, PathBuf};

use clap::Args;
use storage::raw::RawImage;
use storage::{ImageFormat, OpenOptions};

use super::error::CliError;
use super::options::{compression_name, create_settings, help_text, split_options, wants_help};
use super::{parse_format, parse_size_arg};

/// Arguments of `snapvmm img create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image (qemu-img's default is raw).
    #[arg(short = 'f', long = "format", value_parser = parse_format, default_value = "raw")]
    pub format: storage::ImageFormat,
    /// Format options: cluster_size, compat (0.10|1.1), refcount_bits, lazy_refcounts,
    /// compression_type, backing_file, backing_fmt, size; `-o help` lists them.
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Stack the new image on BACKING (relative names are relative to FILE's directory).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of BACKING (required with -b, as in qemu-img since 6.1).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Do not open BACKING to check it (SIZE is then required).
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_backing: bool,
    /// Do not print the "Formatting ..." line.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image file to create (replaced if it exists).
    pub file: PathBuf,
    /// Virtual size, with an optional k/M/G/T/P/E suffix; defaults to BACKING's size.
    #[arg(value_parser = parse_size_arg)]
    pub size: Option<u64>,
}

/// Prefixes `err` with the file name unless it already starts with it (qemu-img's
/// "FILE: message" style for creation errors).
fn about_file(file: &Path, err: impl std::fmt::Display) -> CliError {
    let shown = file.display().to_string();
    let text = err.to_string();
    if text.starts_with(&shown) {
        CliError::new(text)
    } else {
        CliError::new(format!("{shown}: {text}"))
    }
}

/// Runs `snapvmm img create`.
pub fn run(args: CreateArgs) -> Result<u8, CliError> {
    let pairs = split_options(&args.options)?;
    if wants_help(&pairs) {
        print!("{}", help_text(args.format));
        return Ok(0);
    }
    let settings = create_settings(args.format, &pairs).map_err(|e| about_file(&args.file, e))?;
    let backing = args.backing.clone().or(settings.backing_file.clone());
    let backing_format = match args
        .backing_format
        .clone()
        .or(settings.backing_format.clone())
    {
        Some(name) => Some(
            name.parse::<ImageFormat>()
                .map_err(|e| about_file(&args.file, format!("backing format: {e}")))?,
        ),
        None => None,
    };
    if args.format == ImageFormat::Raw && backing.is_some() {
        return Err(about_file(
            &args.file,
            "backing file not supported for file format 'raw'",
        ));
    }
    if backing.is_none() && backing_format.is_some() {
        return Err(about_file(
            &args.file,
            "backing format given without a backing file (-b)",
        ));
    }
    let mut size = args.size.or(settings.size);

    if let Some(name) = &backing {
        let backing_path = storage::open::resolve_backing_path(&args.file, name);
        let Some(backing_format) = backing_format else {
            // qemu-img refuses to guess since 6.1: a guessed raw backing file of a
            // malicious image could expose any host file. Say what a probe finds.
            let hint = match storage::probe_format(&backing_path) {
                Ok(f) => format!(" (detected format of {f}; add -F {f})"),
                Err(_) => String::new(),
            };
            return Err(about_file(
                &args.file,
                format!("backing file specified without backing format{hint}"),
            ));
        };
        if !args.unsafe_backing {
            let options = OpenOptions {
                read_only: true,
                format: Some(backing_format),
                ..OpenOptions::default()
            };
            let device = storage::open(&backing_path, &options).map_err(|e| {
                about_file(&args.file, format!("could not open backing image: {e}"))
            })?;
            size = size.or(Some(device.size()));
        }
    }
    let Some(size) = size else {
        return Err(about_file(
            &args.file,
            "image creation needs a size parameter",
        ));
    };

    let file = args.file.display().to_string();
    match args.format {
        ImageFormat::Raw => {
            if !args.quiet {
                println!("Formatting '{file}', fmt=raw size={size}");
            }
            RawImage::create(&args.file, size).map_err(|e| about_file(&args.file, e))?;
        }
        ImageFormat::Qcow2 => {
            let mut options = settings.qcow2.clone();
            // QEMU counts a qcow2 image's size in 512-byte sectors and rounds it up when
            // creating one; the "Formatting" line still shows the size as given.
            options.size = Some(size.next_multiple_of(512));
            options.backing_file = backing.clone();
            options.backing_format = backing.as_ref().and(backing_format);
            if !args.quiet {
                // qemu-img's order: defaults of the qcow2 driver, then the explicit ones.
                let mut line = format!(
                    "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2=off compression_type={} size={size}",
                    options.cluster_size,
                    compression_name(options.compression_type),
                );
                if let Some(compat) = &settings.compat_given {
                    line.push_str(&format!(" compat={compat}"));
                }
                if let Some(b) = &options.backing_file {
                    line.push_str(&format!(" backing_file={b}"));
                }
                if let Some(f) = options.backing_format {
                    line.push_str(&format!(" backing_fmt={f}"));
                }
                line.push_str(&format!(
                    " lazy_refcounts={} refcount_bits={}",
                    if options.lazy_refcounts { "on" } else { "off" },
                    options.refcount_bits
                ));
                println!("{line}");
            }
            storage::qcow2::create(&args.file, &options).map_err(|e| about_file(&args.file, e))?;
        }
    }
    Ok(0)
}
