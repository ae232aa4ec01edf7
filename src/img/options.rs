//! `-o key=value,...` format options, parsed as qemu-img parses them, and turned into the
//! storage layer's create options.

use storage::qcow2::{CompressionType, CreateOptions};
use storage::ImageFormat;

use super::error::CliError;
use super::size::parse_size;

/// Splits qemu-style option strings: comma-separated `key=value` items, where `,,` stands
/// for a literal comma and a bare `key` means `key=on`. Several `-o` arguments accumulate.
pub fn split_options(args: &[String]) -> Result<Vec<(String, String)>, CliError> {
    let mut pairs = Vec::new();
    for arg in args {
        let mut items = Vec::new();
        let mut current = String::new();
        let mut chars = arg.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    items.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        items.push(current);
        for item in items {
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.clone(), "on".to_string()),
            };
            if key.is_empty() {
                return Err(CliError::new(format!("invalid option '{item}'")));
            }
            pairs.push((key, value));
        }
    }
    Ok(pairs)
}

/// Whether the user asked for the option list (`-o help` or `-o ?`).
pub fn wants_help(pairs: &[(String, String)]) -> bool {
    pairs.iter().any(|(k, _)| k == "help" || k == "?")
}

/// The option list printed by `-o help`.
pub fn help_text(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Raw => {
            "Supported raw options:\n  size=<size>            - Virtual disk size\n  preallocation=off      - Preallocation mode (only off)\n"
        }
        ImageFormat::Qcow2 => {
            "Supported qcow2 options:\n  backing_file=<str>     - File name of a base image\n  backing_fmt=<str>      - Image format of the base image\n  cluster_size=<size>    - qcow2 cluster size (512 to 2M, power of two)\n  compat=<str>           - Compatibility level (v2 [0.10], v3 [1.1])\n  compression_type=<str> - Compression method used for image cluster compression (zlib, zstd)\n  extended_l2=off        - Extended L2 tables (only off)\n  lazy_refcounts=<bool>  - Postpone refcount updates (on, off)\n  preallocation=off      - Preallocation mode (only off)\n  refcount_bits=<num>    - Width of a reference count entry in bits\n  size=<size>            - Virtual disk size\n"
        }
    }
}

/// Parses qemu's boolean option values.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, CliError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::new(format!(
            "parameter '{key}' expects 'on' or 'off', not '{value}'"
        ))),
    }
}

/// Parses a size-valued option, naming the option on error.
pub fn parse_size_option(key: &str, value: &str) -> Result<u64, CliError> {
    parse_size(value).map_err(|_| {
        CliError::new(format!(
            "parameter '{key}' expects a size (e.g. 64k, 2M), not '{value}'"
        ))
    })
}

/// Create options for a new image, with a record of which the user set explicitly (qemu-img
/// echoes explicitly set options like `compat` in its "Formatting" line, and only those).
#[derive(Debug, Clone, Default)]
pub struct CreateSettings {
    /// The options for `storage::qcow2::create` (`size` filled in later).
    pub qcow2: CreateOptions,
    /// `compat` as given, when given.
    pub compat_given: Option<String>,
    /// `size=` given through `-o`.
    pub size: Option<u64>,
    /// `backing_file=` given through `-o`.
    pub backing_file: Option<String>,
    /// `backing_fmt=` given through `-o`.
    pub backing_format: Option<String>,
}

/// Turns `-o` pairs into settings for an image of `format`, refusing unknown options and
/// values the format cannot take.
pub fn create_settings(
    format: ImageFormat,
    pairs: &[(String, String)],
) -> Result<CreateSettings, CliError> {
    let mut s = CreateSettings::default();
    for (key, value) in pairs {
        match (format, key.as_str()) {
            (_, "size") => s.size = Some(parse_size_option(key, value)?),
            (_, "preallocation") => {
                if value != "off" {
                    return Err(CliError::new(format!(
                        "preallocation={value} is not supported (only off)"
                    )));
                }
            }
            (ImageFormat::Qcow2, "cluster_size") => {
                s.qcow2.cluster_size = parse_size_option(key, value)?;
            }
            (ImageFormat::Qcow2, "compat") => {
                s.qcow2.version = match value.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(CliError::new(format!(
                            "compat: invalid value '{value}' (expected 0.10, v2, 1.1 or v3)"
                        )))
                    }
                };
                s.compat_given = Some(value.clone());
            }
            (ImageFormat::Qcow2, "refcount_bits") => {
                s.qcow2.refcount_bits = value.parse().map_err(|_| {
                    CliError::new(format!(
                        "refcount_bits: invalid value '{value}' (expected 1, 2, 4, 8, 16, 32 or 64)"
                    ))
                })?;
            }
            (ImageFormat::Qcow2, "lazy_refcounts") => {
                s.qcow2.lazy_refcounts = parse_bool(key, value)?;
            }
            (ImageFormat::Qcow2, "compression_type") => {
                s.qcow2.compression_type = match value.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(CliError::new(format!(
                            "compression_type: invalid value '{value}' (expected zlib or zstd)"
                        )))
                    }
                };
            }
            (ImageFormat::Qcow2, "extended_l2") => {
                if parse_bool(key, value)? {
                    return Err(CliError::new(
                        "extended_l2=on is not supported by snapvmm's qcow2 engine",
                    ));
                }
            }
            (ImageFormat::Qcow2, "backing_file") => s.backing_file = Some(value.clone()),
            (ImageFormat::Qcow2, "backing_fmt") => s.backing_format = Some(value.clone()),
            _ => {
                return Err(CliError::new(format!(
                    "invalid parameter '{key}' for format {format} (see -o help)"
                )))
            }
        }
    }
    Ok(s)
}

/// qemu's name for a compression type.
pub fn compression_name(c: CompressionType) -> &'static str {
    match c {
        CompressionType::Zlib => "zlib",
        CompressionType::Zstd => "zstd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_like_qemu() {
        let pairs = split_options(&["a=1,b=x,,y".into(), "lazy_refcounts".into()]).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("lazy_refcounts".into(), "on".into())
            ]
        );
    }

    #[test]
    fn qcow2_settings() {
        let pairs = split_options(&[
            "cluster_size=4k,compat=0.10,refcount_bits=16,compression_type=zlib".into(),
        ])
        .unwrap();
        let s = create_settings(ImageFormat::Qcow2, &pairs).unwrap();
        assert_eq!(s.qcow2.cluster_size, 4096);
        assert_eq!(s.qcow2.version, 2);
        assert_eq!(s.compat_given.as_deref(), Some("0.10"));
        assert!(create_settings(ImageFormat::Qcow2, &[("bogus".into(), "1".into())]).is_err());
        assert!(
            create_settings(ImageFormat::Raw, &[("cluster_size".into(), "4k".into())]).is_err()
        );
        assert!(create_settings(ImageFormat::Qcow2, &[("compat".into(), "2".into())]).is_err());
    }
}
