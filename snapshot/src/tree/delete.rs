//! Deleting snapshots: forgetting them, deleting internal ones from their images, and
//! leaving external images to [compaction](super::compact).

use super::internal::{open_alone, reopen_top};
use super::*;

impl SnapshotTree {
    /// Deletes snapshot `name` (and its descendants with `children`). Unless
    /// `metadata_only`, images are merged so every other snapshot keeps its contents, and
    /// every image nothing uses any more is removed. Returns the names deleted.
    pub fn delete(&self, name: &str, options: &DeleteOptions) -> Result<Vec<String>> {
        let _op = self.op.lock();
        self.get(name)?;
        self.register_live_chains();
        let targets = if options.children {
            self.subtree(name)
        } else {
            vec![name.to_string()]
        };
        let mut deleted = Vec::new();
        for target in targets {
            // An internal snapshot's delete commits its metadata itself (before touching
            // its images); any other is committed by recording its files' removal.
            let commits_itself =
                !options.metadata_only && self.get(&target)?.kind == SnapshotKind::Internal;
            let before = self.meta.lock().clone();
            let unnamed = self.delete_one(&target, options.metadata_only)?;
            if let Err(e) = self.record_removal(&unnamed) {
                if commits_itself {
                    tracing::warn!(snapshot = %target, error = %e,
                        "the snapshot is deleted, but recording it again failed");
                } else {
                    // Not committed: the snapshot is still there, as reported.
                    self.restore_metadata(before);
                    return Err(e);
                }
            }
            deleted.push(target);
            if let Err(e) = self.finish_removal(&unnamed) {
                tracing::warn!(error = %e,
                    "removing a deleted snapshot's files failed; the next open finishes it");
            }
        }
        // Merging and removing images nothing needs any more is housekeeping after the
        // deletes committed: a failure is not the delete failing, and the next delete or
        // revert compacts again.
        if !options.metadata_only {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "compacting the snapshot tree after a delete failed");
            }
        }
        Ok(deleted)
    }

    /// `name` and its descendants, children before parents.
    fn subtree(&self, name: &str) -> Vec<String> {
        let meta = self.meta.lock();
        let mut out = Vec::new();
        fn visit(meta: &TreeFile, name: &str, out: &mut Vec<String>) {
            for child in meta
                .snapshots
                .iter()
                .filter(|s| s.parent.as_deref() == Some(name))
            {
                visit(meta, &child.name, out);
            }
            out.push(name.to_string());
        }
        visit(&meta, name, &mut out);
        out
    }

    /// Forgets snapshot `name`; returns its checkpoint directory, to be removed once the
    /// metadata no longer names it.
    fn delete_one(&self, name: &str, metadata_only: bool) -> Result<Vec<PathBuf>> {
        let snapshot = self.get(name)?;
        let mut unnamed = Vec::new();
        if !metadata_only {
            unnamed.extend(snapshot.checkpoint.clone());
        }
        if snapshot.kind == SnapshotKind::Internal && !metadata_only {
            // Forgotten (and written) first, then removed from the images: a crash in
            // between leaves an internal snapshot nothing lists, never a listed snapshot
            // whose data is gone.
            let claims = self.claim_all("snapshot-delete")?;
            let before = self.meta.lock().clone();
            self.forget(&snapshot, false);
            if let Err(e) = self.save() {
                // Not forgotten on disk (or in doubt, if only the directory sync failed):
                // the snapshot stays, in memory and, written again, in the file.
                self.restore_metadata(before);
                return Err(e);
            }
            // Deleted as far as anyone can see: a failure to free its clusters now is
            // not the delete failing (the images keep an internal snapshot nothing lists,
            // as a crash here would leave).
            if let Err(e) = self.delete_internal(&snapshot) {
                tracing::warn!(snapshot = name, error = %e,
                    "the snapshot is deleted, but removing it from its images failed");
            }
            drop(claims);
            return Ok(unnamed);
        }
        self.forget(&snapshot, metadata_only);
        Ok(unnamed)
    }

    /// Forgets `snapshot` in memory: its children hang from its parent.
    fn forget(&self, snapshot: &SnapshotInfo, metadata_only: bool) {
        let name = snapshot.name.as_str();
        let mut meta = self.meta.lock();
        meta.snapshots.retain(|s| s.name != name);
        for child in meta.snapshots.iter_mut() {
            if child.parent.as_deref() == Some(name) {
                child.parent = snapshot.parent.clone();
            }
        }
        if meta.current.as_deref() == Some(name) {
            meta.current = snapshot.parent.clone();
        }
        if metadata_only {
            // Forgotten, not deleted: its images (and the internal snapshot in them) are the
            // user's now, never merged or removed by the tree.
            for d in &snapshot.disks {
                if let Some(record) = meta.images.iter_mut().find(|r| r.path == d.image) {
                    record.owned = false;
                }
            }
        }
        tracing::info!(snapshot = name, metadata_only, "snapshot deleted");
    }

    pub(super) fn delete_internal(&self, snapshot: &SnapshotInfo) -> Result<()> {
        for (disk, d) in self.disks.iter().zip(&snapshot.disks) {
            if abs(disk.top().path()) == d.image {
                // The caller holds the disk's claim.
                let mut guard = disk.quiesce();
                let mut image = reopen_top(&guard)?;
                let deleted = image.delete_snapshot(&snapshot.name);
                guard.replace_top(Arc::new(image))?;
                deleted?;
            } else if d.image.exists() {
                // A backing file now: its table and refcounts change, never its active
                // mappings, which the disk's read-only handle may hold in its caches.
                let mut image = open_alone(&d.image, false)?;
                if image.find_snapshot(&snapshot.name).is_some() {
                    image.delete_snapshot(&snapshot.name)?;
                }
                image.close()?;
            }
        }
        Ok(())
    }
}
