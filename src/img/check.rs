//! `snapvmm img check`: qemu-img check's output and exit codes on snapvmm's qcow2 checker.
//!
//! Exit codes, as qemu-img: 0 clean, 1 the check itself failed (or found internal errors),
//! 2 corruptions left, 3 leaks left (and no corruptions), 63 the format has no checks (raw).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use storage::qcow2::{CheckReport, RepairMode};
use storage::ImageFormat;

use super::error::CliError;
use super::output::{to_json_pretty, OutputFormat, QDict, QValue};
use super::parse_format;

/// What `-r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// Arguments of `snapvmm img check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Output layout.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// Repair leaks, or leaks and corruptions (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_enum)]
    pub repair: Option<Repair>,
    /// Print nothing in the human layout; the exit code still tells.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Accepted for qemu-img compatibility.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub file: PathBuf,
}

/// Exit status when the format has no consistency checks (qemu-img's 63).
pub const EXIT_NOT_SUPPORTED: u8 = 63;

/// The report as qemu-img's JSON (fields that are zero are left out, as QAPI's optional
/// members are, except `check-errors`).
pub fn report_json(report: &CheckReport, format: ImageFormat) -> QValue {
    let mut d = QDict::new();
    d.insert("filename", report.filename.as_str().into());
    d.insert("format", format.name().into());
    d.insert("check-errors", report.check_errors.into());
    let optional = [
        ("image-end-offset", report.image_end_offset),
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("corruptions-fixed", report.corruptions_fixed),
        ("leaks-fixed", report.leaks_fixed),
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
    ];
    for (key, value) in optional {
        if value != 0 {
            d.insert(key, value.into());
        }
    }
    d.into()
}

/// The report in qemu-img's human layout (`dump_human_image_check`).
pub fn report_human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64,
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// The exit status qemu-img gives a finished check.
pub fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors != 0 {
        1
    } else if r.corruptions != 0 {
        2
    } else if r.leaks != 0 {
        3
    } else {
        0
    }
}

/// Runs `snapvmm img check`.
pub fn run(args: CheckArgs) -> Result<u8, CliError> {
    let format = match args.format {
        Some(f) => f,
        None => storage::probe_format(&args.file).map_err(|e| CliError::open(&args.file, e))?,
    };
    if format != ImageFormat::Qcow2 {
        eprintln!(
            "snapvmm img: error: {}: this image format ({format}) does not support checks",
            args.file.display()
        );
        return Ok(EXIT_NOT_SUPPORTED);
    }
    let mode = match args.repair {
        None => RepairMode::None,
        Some(Repair::Leaks) => RepairMode::Leaks,
        Some(Repair::All) => RepairMode::All,
    };
    let check = |mode| {
        storage::qcow2::check(&args.file, mode)
            .map_err(|e| CliError::new(format!("check failed: {e}")))
    };
    let mut report = check(mode)?;
    let human = args.output == OutputFormat::Human && !args.quiet;
    if report.leaks_fixed != 0 || report.corruptions_fixed != 0 {
        // As qemu-img: say what was repaired, then check again read-only, so the counts
        // shown are those of the repaired image, plus what was fixed.
        if human {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            );
        }
        let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
        report = check(RepairMode::None)?;
        report.leaks_fixed = leaks_fixed;
        report.corruptions_fixed = corruptions_fixed;
    }
    match args.output {
        OutputFormat::Human => {
            if !args.quiet {
                print!("{}", report_human(&report));
            }
        }
        OutputFormat::Json => {
            if !args.quiet {
                println!("{}", to_json_pretty(&report_json(&report, format)));
            }
        }
    }
    if report.check_errors != 0 {
        eprintln!(
            "snapvmm img: error: check failed: {} internal errors",
            report.check_errors
        );
    }
    Ok(exit_code(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaky() -> CheckReport {
        CheckReport {
            filename: "leak.qcow2".into(),
            leaks: 1,
            image_end_offset: 589824,
            total_clusters: 64,
            allocated_clusters: 3,
            ..CheckReport::default()
        }
    }

    #[test]
    fn human_layout_matches_qemu_img() {
        // `qemu-img check leak.qcow2` on an image with one leaked cluster (qemu 10.0).
        assert_eq!(
            report_human(&leaky()),
            "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n3/64 = 4.69% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 589824\n"
        );
        assert_eq!(exit_code(&leaky()), 3);
    }

    #[test]
    fn json_layout_matches_qemu_img() {
        let text = to_json_pretty(&report_json(&leaky(), ImageFormat::Qcow2));
        assert_eq!(
            text,
            "{\n    \"image-end-offset\": 589824,\n    \"total-clusters\": 64,\n    \"check-errors\": 0,\n    \"leaks\": 1,\n    \"allocated-clusters\": 3,\n    \"filename\": \"leak.qcow2\",\n    \"format\": \"qcow2\"\n}"
        );
    }
}
