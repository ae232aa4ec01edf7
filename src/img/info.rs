//! `snapvmm img info`: qemu-img info's human layout and JSON, one image or a whole chain.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;
use storage::{ImageFormat, OpenOptions};

use super::error::CliError;
use super::output::{to_json_pretty, OutputFormat, QDict, QValue};
use super::parse_format;
use super::size::size_to_str;

/// Arguments of `snapvmm img info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Format of FILE (probed when absent); backing files use their recorded format.
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Output layout (with --backing-chain, JSON is a list).
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// Show every image of the backing chain, top first.
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Inspect an image another process may be writing (no lock refusing its writes).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub file: PathBuf,
}

/// qcow2 facts shown under "Format specific information".
#[derive(Debug, Clone)]
struct Qcow2Facts {
    compat: String,
    version3: bool,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    compression_type: String,
}

/// One internal snapshot, as the qcow2 snapshot table records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    id: String,
    name: String,
    vm_state_size: u64,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    icount: Option<u64>,
}

impl From<&storage::qcow2::snapshot::SnapshotEntry> for Snapshot {
    fn from(e: &storage::qcow2::snapshot::SnapshotEntry) -> Self {
        Snapshot {
            id: e.id.clone(),
            name: e.name.clone(),
            vm_state_size: e.vm_state_size,
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            icount: u64::try_from(e.icount).ok(),
        }
    }
}

/// Everything `info` prints about one image file.
#[derive(Debug, Clone)]
struct Facts {
    filename: String,
    format: ImageFormat,
    virtual_size: u64,
    actual_size: u64,
    file_length: u64,
    cluster_size: Option<u64>,
    dirty: bool,
    backing_filename: Option<String>,
    full_backing_filename: Option<String>,
    backing_format: Option<String>,
    qcow2: Option<Qcow2Facts>,
    snapshots: Vec<Snapshot>,
}

/// Opens one image file (not its backing chain, as qemu-img info does, so that an image
/// whose backing file is missing can still be inspected) and gathers its facts.
fn gather(path: &Path, format: Option<ImageFormat>, force_share: bool) -> Result<Facts, CliError> {
    let options = OpenOptions {
        read_only: true,
        open_backing: false,
        format,
        force_share,
        ..OpenOptions::default()
    };
    let device = storage::open(path, &options).map_err(|e| CliError::open(path, e))?;
    let info = device.info();
    let meta = std::fs::metadata(path).map_err(|e| CliError::open(path, e))?;
    let format = info.format.unwrap_or(ImageFormat::Raw);
    let mut facts = Facts {
        filename: path.display().to_string(),
        format,
        virtual_size: device.size(),
        actual_size: meta.blocks() * 512,
        // QEMU's file layer counts whole 512-byte sectors, so its "file length" is rounded
        // up; shown the same way so the two tools' output compares line for line.
        file_length: meta.len().next_multiple_of(512),
        cluster_size: info.cluster_size,
        dirty: false,
        full_backing_filename: info.backing_filename.as_deref().map(|b| {
            storage::open::resolve_backing_path(path, b)
                .display()
                .to_string()
        }),
        backing_filename: info.backing_filename.clone(),
        backing_format: info.backing_format.clone(),
        qcow2: None,
        snapshots: Vec::new(),
    };
    if format == ImageFormat::Qcow2 {
        let compat = info.compat.clone().unwrap_or_else(|| "1.1".into());
        facts.qcow2 = Some(Qcow2Facts {
            version3: compat != "0.10",
            compat,
            lazy_refcounts: info.lazy_refcounts,
            refcount_bits: info.refcount_bits.unwrap_or(16),
            corrupt: info.corrupt,
            compression_type: info
                .compression_type
                .clone()
                .unwrap_or_else(|| "zlib".into()),
        });
        let header = read_header(path, info.cluster_size.unwrap_or(65536), meta.len())?;
        facts.dirty = header.incompatible_features & storage::qcow2::header::INCOMPAT_DIRTY != 0;
        if header.nb_snapshots > 0 {
            facts.snapshots = read_snapshots(path, &header, meta.len())?;
        }
    }
    Ok(facts)
}

/// Reads and parses the qcow2 header for the facts `ImageInfo` does not carry (the dirty
/// bit, the snapshot table's place).
fn read_header(
    path: &Path,
    cluster_size: u64,
    file_length: u64,
) -> Result<storage::qcow2::Header, CliError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| CliError::open(path, e))?;
    let mut buf = vec![0u8; cluster_size.min(file_length) as usize];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| CliError::new(format!("{}: reading the header: {e}", path.display())))?;
    storage::qcow2::Header::parse(path, &buf, file_length).map_err(CliError::from)
}

/// Reads the qcow2 snapshot table through the storage crate's parser. The table's length is
/// only known once parsed, so a small read is tried first and the largest table QEMU
/// accepts only if needed.
fn read_snapshots(
    path: &Path,
    header: &storage::qcow2::Header,
    file_length: u64,
) -> Result<Vec<Snapshot>, CliError> {
    use std::os::unix::fs::FileExt;
    use storage::qcow2::snapshot::{parse_table, MAX_TABLE_BYTES};
    let file = std::fs::File::open(path).map_err(|e| CliError::open(path, e))?;
    let available = file_length.saturating_sub(header.snapshots_offset);
    let mut last_error = None;
    for limit in [1u64 << 20, MAX_TABLE_BYTES] {
        let len = available.min(limit);
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, header.snapshots_offset)
            .map_err(|e| {
                CliError::new(format!(
                    "{}: reading the snapshot table: {e}",
                    path.display()
                ))
            })?;
        match parse_table(
            path,
            &buf,
            header.nb_snapshots,
            header.size,
            header.cluster_size(),
        ) {
            Ok((entries, _)) => return Ok(entries.iter().map(Snapshot::from).collect()),
            Err(e) => last_error = Some(e),
        }
        if len == available {
            break;
        }
    }
    Err(last_error.map_or_else(
        || CliError::new(format!("{}: unreadable snapshot table", path.display())),
        CliError::from,
    ))
}

/// The child node qemu shows for the file under a format layer.
fn child_json(f: &Facts) -> QValue {
    let mut info = QDict::new();
    info.insert("filename", f.filename.as_str().into());
    info.insert("format", "file".into());
    info.insert("dirty-flag", false.into());
    info.insert("actual-size", f.actual_size.into());
    info.insert("virtual-size", f.file_length.into());
    let mut specific = QDict::new();
    specific.insert("type", "file".into());
    specific.insert("data", QDict::new().into());
    info.insert("format-specific", specific.into());
    info.insert("children", QValue::List(Vec::new()));
    let mut child = QDict::new();
    child.insert("name", "file".into());
    child.insert("info", info.into());
    child.into()
}

/// The qcow2 "format-specific" data, members in QAPI order.
fn qcow2_data(q: &Qcow2Facts) -> QDict {
    let mut data = QDict::new();
    data.insert("compat", q.compat.as_str().into());
    if q.version3 {
        data.insert("extended-l2", false.into());
        data.insert("lazy-refcounts", q.lazy_refcounts.into());
        data.insert("corrupt", q.corrupt.into());
    }
    data.insert("refcount-bits", (q.refcount_bits as u64).into());
    data.insert("compression-type", q.compression_type.as_str().into());
    data
}

/// One image as qemu-img's JSON `ImageInfo`, members in QAPI order.
fn facts_json(f: &Facts) -> QValue {
    let mut d = QDict::new();
    d.insert("filename", f.filename.as_str().into());
    d.insert("format", f.format.name().into());
    d.insert("dirty-flag", f.dirty.into());
    d.insert("actual-size", f.actual_size.into());
    d.insert("virtual-size", f.virtual_size.into());
    if let Some(cs) = f.cluster_size {
        d.insert("cluster-size", cs.into());
    }
    if let Some(b) = &f.backing_filename {
        d.insert("backing-filename", b.as_str().into());
    }
    if let Some(b) = &f.full_backing_filename {
        d.insert("full-backing-filename", b.as_str().into());
    }
    if let Some(b) = &f.backing_format {
        d.insert("backing-filename-format", b.as_str().into());
    }
    if !f.snapshots.is_empty() {
        d.insert("snapshots", snapshots_json(&f.snapshots));
    }
    if let Some(q) = &f.qcow2 {
        let mut specific = QDict::new();
        specific.insert("type", "qcow2".into());
        specific.insert("data", qcow2_data(q).into());
        d.insert("format-specific", specific.into());
    }
    d.insert("children", QValue::List(vec![child_json(f)]));
    d.into()
}

/// Snapshots as the JSON list qemu-img info shows.
pub(crate) fn snapshots_json(snapshots: &[Snapshot]) -> QValue {
    let list = snapshots
        .iter()
        .map(|s| {
            let mut e = QDict::new();
            e.insert("id", s.id.as_str().into());
            e.insert("name", s.name.as_str().into());
            e.insert("vm-state-size", s.vm_state_size.into());
            e.insert("date-sec", (s.date_sec as u64).into());
            e.insert("date-nsec", (s.date_nsec as u64).into());
            e.insert("vm-clock-sec", (s.vm_clock_nsec / 1_000_000_000).into());
            e.insert("vm-clock-nsec", (s.vm_clock_nsec % 1_000_000_000).into());
            if let Some(icount) = s.icount {
                e.insert("icount", icount.into());
            }
            e.into()
        })
        .collect();
    QValue::List(list)
}

/// Snapshots in qemu's "Snapshot list:" table (`bdrv_snapshot_dump`).
pub(crate) fn snapshots_human(snapshots: &[Snapshot]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&snapshot_row(
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT",
    ));
    out.push('\n');
    for s in snapshots {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map_or_else(|| "--".to_string(), |n| n.to_string());
        out.push_str(&snapshot_row(
            &s.id,
            &s.name,
            &size_to_str(s.vm_state_size),
            &local_date(s.date_sec),
            &clock,
            &icount,
        ));
        out.push('\n');
    }
    out
}

/// A Unix time as local "YYYY-MM-DD HH:MM:SS", as qemu's snapshot list shows it.
fn local_date(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain old data, fully written by localtime_r before it is read; both
    // pointers are valid for the duration of the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: as above: both pointers are valid for the call, `tm` is written before read.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One row of qemu's snapshot list (`bdrv_snapshot_dump`).
fn snapshot_row(id: &str, name: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {name:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}")
}

/// One image in qemu-img's human layout (`bdrv_image_info_dump` and the child node).
fn facts_human(f: &Facts) -> String {
    let mut out = String::new();
    out.push_str(&format!("image: {}\n", f.filename));
    out.push_str(&format!("file format: {}\n", f.format));
    out.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(f.virtual_size),
        f.virtual_size
    ));
    out.push_str(&format!("disk size: {}\n", size_to_str(f.actual_size)));
    if let Some(cs) = f.cluster_size {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if f.dirty {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &f.backing_filename {
        out.push_str(&format!("backing file: {b}"));
        match &f.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
            Some(_) => {}
        }
        out.push('\n');
        if let Some(fmt) = &f.backing_format {
            out.push_str(&format!("backing file format: {fmt}\n"));
        }
    }
    if !f.snapshots.is_empty() {
        out.push_str(&snapshots_human(&f.snapshots));
    }
    if let Some(q) = &f.qcow2 {
        out.push_str("Format specific information:\n");
        for (key, value) in qcow2_data(q).iter_qemu_order() {
            let shown = match value {
                QValue::Str(s) => s.clone(),
                QValue::Bool(b) => b.to_string(),
                QValue::Uint(n) => n.to_string(),
                QValue::Int(n) => n.to_string(),
                other => to_json_pretty(other),
            };
            out.push_str(&format!("    {}: {shown}\n", key.replace('-', " ")));
        }
    }
    out.push_str("Child node '/file':\n");
    out.push_str(&format!("    filename: {}\n", f.filename));
    out.push_str("    protocol type: file\n");
    out.push_str(&format!(
        "    file length: {} ({} bytes)\n",
        size_to_str(f.file_length),
        f.file_length
    ));
    out.push_str(&format!("    disk size: {}\n", size_to_str(f.actual_size)));
    out
}

/// Runs `snapvmm img info`.
pub fn run(args: InfoArgs) -> Result<u8, CliError> {
    let mut images = vec![gather(&args.file, args.format, args.force_share)?];
    if args.backing_chain {
        let mut seen = HashSet::new();
        if let Ok(c) = std::fs::canonicalize(&args.file) {
            seen.insert(c);
        }
        while let Some(last) = images.last() {
            let Some(next) = last.full_backing_filename.clone() else {
                break;
            };
            let format = match &last.backing_format {
                Some(name) => Some(name.parse::<ImageFormat>().map_err(|e| {
                    CliError::new(format!("{}: backing format: {e}", last.filename))
                })?),
                None => None,
            };
            let path = PathBuf::from(&next);
            let canonical = std::fs::canonicalize(&path).map_err(|e| CliError::open(&path, e))?;
            if !seen.insert(canonical) {
                return Err(CliError::new(format!(
                    "backing file '{next}' creates an infinite loop"
                )));
            }
            if images.len() > storage::DEFAULT_MAX_CHAIN_DEPTH {
                return Err(CliError::new(format!(
                    "backing chain of '{}' is deeper than {} layers",
                    args.file.display(),
                    storage::DEFAULT_MAX_CHAIN_DEPTH
                )));
            }
            images.push(gather(&path, format, args.force_share)?);
        }
    }
    match args.output {
        OutputFormat::Human => {
            let text: Vec<String> = images.iter().map(facts_human).collect();
            print!("{}", text.join("\n"));
        }
        OutputFormat::Json => {
            let value = if args.backing_chain {
                QValue::List(images.iter().map(facts_json).collect())
            } else {
                facts_json(&images[0])
            };
            println!("{}", to_json_pretty(&value));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_header_matches_qemu() {
        assert_eq!(
            snapshot_row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert_eq!(
            snapshot_row(
                "1",
                "snap1",
                "0 B",
                "2026-11-22 09:48:32",
                "0000:00:00.000",
                "0"
            ),
            "1       snap1                 0 B 2026-11-22 09:48:32  0000:00:00.000          0"
        );
    }
}
