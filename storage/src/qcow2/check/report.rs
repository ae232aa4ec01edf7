//! What a check found and fixed, in qemu-img's terms, and what it may repair.

use super::checker::MAX_MESSAGES;

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Fix leaked clusters (refcount higher than references).
    Leaks,
    /// Fix leaks and errors (refcounts too low, wrong COPIED flags).
    All,
}

/// The result of a check, with qemu-img's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Path of the image checked.
    pub filename: String,
    /// Errors found (refcount too low, bad entries, COPIED mismatches) and not fixed.
    pub corruptions: u64,
    /// Leaked clusters found and not fixed.
    pub leaks: u64,
    /// Errors while checking (I/O, unreadable tables).
    pub check_errors: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// One past the last used byte of the file.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// What was found and repaired, one line per finding in qemu-img's wording (at most
    /// about a thousand lines: a CLI prints them the way qemu-img prints its stderr).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether the image has no corruption, no leak and no check error left.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// Appends a message, formatting it only while the report has room.
pub(super) fn note(res: &mut CheckReport, message: impl FnOnce() -> String) {
    match res.messages.len() {
        n if n < MAX_MESSAGES => res.messages.push(message()),
        MAX_MESSAGES => res.messages.push("... further messages suppressed".into()),
        _ => {}
    }
}
