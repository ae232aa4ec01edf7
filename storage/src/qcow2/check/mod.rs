//! Consistency check and repair of qcow2 images (`qemu-img check` semantics).
//!
//! The checker recomputes, from the metadata alone, how many references every host cluster
//! has (header, L1/L2 tables, data and compressed clusters of the active layer and of every
//! internal snapshot, the snapshot table, persistent bitmaps, and the refcount structures
//! themselves) and compares the result with the refcounts stored in the image. The counting
//! rules follow QEMU's `qcow2_check_refcounts` (block/qcow2-refcount.c) closely, so that the
//! numbers in [`CheckReport`] equal those of `qemu-img check --output json`; where this code
//! deliberately differs, the comment at that spot says why.
//!
//! Every offset, size and count read from the file is untrusted: arithmetic is checked,
//! reads past the end of the file see zeroes (as QEMU's block layer does), and allocations
//! are bounded by the file size or by QEMU's own table limits.
//!
//! The code is split by step: `checker` reads the image the way QEMU's check does,
//! `count` recomputes every reference, `compare` compares them with the stored refcounts
//! and COPIED flags, `rebuild` writes a new refcount structure, and `report` holds what
//! a check tells its caller.

mod checker;
mod compare;
mod count;
mod rebuild;
mod report;

use std::path::Path;

use crate::error::Result;
use crate::file::ImageFile;
use checker::{Checker, MIN_V3_SNAPSHOT_EXTRA};
pub use rebuild::rebuild_refcounts;
use report::note;
pub use report::{CheckReport, RepairMode};

/// Checks (and with `repair`, fixes) the qcow2 image at `path`.
///
/// Like `qemu-img check -r`, a repairing check is followed by a read-only one: the counts
/// reported are what is left after the repair, and `leaks_fixed` / `corruptions_fixed` say
/// what the repair did. When the refcount structure itself is broken (a used cluster with
/// refcount 0, a misplaced refcount block), `RepairMode::All` rebuilds it from scratch;
/// `RepairMode::Leaks` then reports a check error instead, as QEMU does.
///
/// ```no_run
/// use storage::qcow2::{check, RepairMode};
/// let report = check("disk.qcow2".as_ref(), RepairMode::None)?;
/// if !report.is_clean() {
///     let fixed = check("disk.qcow2".as_ref(), RepairMode::All)?;
///     assert!(fixed.is_clean(), "{:?}", fixed.messages);
/// }
/// # Ok::<(), storage::Error>(())
/// ```
pub fn check(path: &Path, repair: RepairMode) -> Result<CheckReport> {
    let file = ImageFile::open(path, repair == RepairMode::None, false)?;
    let (first, completed) = check_pass(&file, repair)?;
    if repair == RepairMode::None || !completed {
        return Ok(first);
    }
    // Report what is left, counted afresh, together with what the repair fixed.
    let (mut again, _) = check_pass(&file, RepairMode::None)?;
    let mut messages = first.messages;
    if first.leaks_fixed > 0 || first.corruptions_fixed > 0 {
        messages.push(format!(
            "The following inconsistencies were found and repaired: {} leaked clusters, {} corruptions",
            first.leaks_fixed, first.corruptions_fixed
        ));
    }
    messages.append(&mut again.messages);
    again.messages = messages;
    again.leaks_fixed = first.leaks_fixed;
    again.corruptions_fixed = first.corruptions_fixed;
    Ok(again)
}

/// One check of the open image; with a repair mode, fixes what it may. The flag is false
/// when the check stopped early (QEMU fails the whole check at that point).
fn check_pass(file: &ImageFile, fix: RepairMode) -> Result<(CheckReport, bool)> {
    let mut checker = Checker::open(file)?;
    let mut res = CheckReport {
        filename: file.path().display().to_string(),
        ..Default::default()
    };
    if let Err(reason) = checker.load_snapshots()? {
        res.check_errors += 1;
        note(&mut res, || {
            format!("ERROR failed to read the snapshot table: {reason}")
        });
        return Ok((res, false));
    }
    let mut snapshot_corruptions = 0;
    if checker.header.version >= 3 {
        for (i, sn) in checker.snapshots.iter().enumerate() {
            if sn.extra_data_size < MIN_V3_SNAPSHOT_EXTRA {
                // QEMU rewrites the snapshot table here under `-r all`; snapvmm reports the
                // entry and leaves the table alone (it does not change refcounts).
                snapshot_corruptions += 1;
                note(&mut res, || {
                    format!("ERROR snapshot table entry {i} is incomplete")
                });
            }
        }
    }
    let completed = checker.check_refcounts(&mut res, fix)?;
    res.corruptions += snapshot_corruptions;
    if !completed {
        return Ok((res, false));
    }
    if fix != RepairMode::None && res.check_errors == 0 && res.corruptions == 0 {
        checker.mark_clean()?;
    }
    Ok((res, true))
}

impl Checker<'_> {
    /// QEMU's `qcow2_check_refcounts`. Returns false when the check had to stop (a
    /// rebuild is needed but not allowed).
    fn check_refcounts(&mut self, res: &mut CheckReport, fix: RepairMode) -> Result<bool> {
        let clusters = self.file_len.div_ceil(self.cluster_size);
        if clusters > i32::MAX as u64 {
            res.check_errors += 1;
            note(res, || {
                format!("ERROR image file has {clusters} clusters, too many to check")
            });
            return Ok(false);
        }
        // QEMU's total_sectors truncates the virtual size to whole sectors.
        res.total_clusters = (self.header.size / 512 * 512).div_ceil(self.cluster_size);
        let mut rebuild = false;
        let mut refs = self.calculate(res, fix, &mut rebuild)?;
        let before_compare = res.clone();
        let mut highest = self.compare(&refs, res, RepairMode::None, &mut rebuild)?;
        if rebuild && fix == RepairMode::All {
            let old = res.clone();
            note(res, || "Rebuilding refcount structure".into());
            let mut fresh = self.new_refs()?;
            let mut scratch = CheckReport::default();
            self.walk_metadata(&mut fresh, &mut scratch, RepairMode::None)?;
            self.write_new_structure(&mut fresh)?;
            // The references are counted again against the new structure.
            res.corruptions = 0;
            res.leaks = 0;
            let mut still_broken = false;
            refs = self.calculate(res, RepairMode::None, &mut still_broken)?;
            let mut fresh_res = CheckReport::default();
            highest = self.compare(&refs, &mut fresh_res, RepairMode::Leaks, &mut still_broken)?;
            if still_broken {
                note(res, || {
                    "ERROR rebuilt refcount structure is still broken".into()
                });
            }
            for m in fresh_res.messages {
                note(res, || m);
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_res.leaks;
        } else if fix != RepairMode::None {
            if rebuild {
                res.check_errors += 1;
                note(res, || {
                    "ERROR need to rebuild refcount structures (repair all)".into()
                });
                res.image_end_offset = (highest + 1) * self.cluster_size;
                return Ok(false);
            }
            if res.leaks > 0 || res.corruptions > 0 {
                *res = before_compare;
                highest = self.compare(&refs, res, fix, &mut rebuild)?;
            }
        }
        self.check_copied(res, fix)?;
        res.image_end_offset = (highest + 1) * self.cluster_size;
        Ok(true)
    }
}
