//! Compaction: after a delete or revert, every image the tree created that no snapshot names
//! and no disk writes to is deleted (nothing built on it) or merged into the one image built
//! on it (stream into a disk's active image, commit of an intermediate image, or an offline
//! rebase off the disks' chains), so no other snapshot's contents change.

use std::collections::HashSet;

use super::*;
use crate::commit::{commit, CommitOptions};
use crate::stream::{stream, StreamOptions};

/// One step of compaction.
enum Merge {
    /// Nothing is built on the image: delete it.
    Delete(PathBuf),
    /// Pull `image` into the disk's active image, which is built on it.
    Stream { disk: usize, image: PathBuf },
    /// Commit `top`, an intermediate image of the disk's chain, into `image` below it.
    Commit {
        disk: usize,
        top: PathBuf,
        image: PathBuf,
    },
    /// Rebase `top`, on no disk's chain, off `image` onto `image`'s backing file.
    Rebase { top: PathBuf, image: PathBuf },
}

impl SnapshotTree {
    /// Merges and removes images until every image the tree created is named by a snapshot,
    /// is a disk's active image, or is shared by two images built on it.
    pub(super) fn compact(&self) -> Result<()> {
        while let Some(step) = self.next_merge() {
            let unnamed = self.run_merge(step)?;
            self.remove_unnamed(unnamed)?;
        }
        Ok(())
    }

    fn next_merge(&self) -> Option<Merge> {
        let chains = self.live_chains();
        let meta = self.meta.lock();
        let mut named: HashSet<&Path> = HashSet::new();
        let mut internal_hosts: HashSet<&Path> = HashSet::new();
        for s in &meta.snapshots {
            for d in &s.disks {
                named.insert(&d.image);
                if s.kind == SnapshotKind::Internal {
                    internal_hosts.insert(&d.image);
                }
            }
        }
        for chain in &chains {
            if let Some(top) = chain.first() {
                named.insert(top);
            }
        }
        let users = |path: &Path| -> Vec<&ImageRecord> {
            meta.images
                .iter()
                .filter(|r| r.backing.as_deref() == Some(path))
                .collect()
        };
        for record in &meta.images {
            if !record.owned || named.contains(record.path.as_path()) {
                continue;
            }
            let on = users(&record.path);
            match on.as_slice() {
                [] => return Some(Merge::Delete(record.path.clone())),
                [user] => {
                    // An image holding internal snapshots must keep its backing file as it
                    // is: its snapshots read through it.
                    if internal_hosts.contains(user.path.as_path()) {
                        continue;
                    }
                    let live = chains.iter().enumerate().find_map(|(disk, chain)| {
                        chain
                            .iter()
                            .position(|p| p == &user.path)
                            .map(|depth| (disk, depth))
                    });
                    match live {
                        Some((disk, 0)) => {
                            return Some(Merge::Stream {
                                disk,
                                image: record.path.clone(),
                            })
                        }
                        Some((disk, _)) => {
                            if user.owned && users(&user.path).len() == 1 {
                                return Some(Merge::Commit {
                                    disk,
                                    top: user.path.clone(),
                                    image: record.path.clone(),
                                });
                            }
                        }
                        None => {
                            return Some(Merge::Rebase {
                                top: user.path.clone(),
                                image: record.path.clone(),
                            })
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn run_job(&self, job: Job) -> Result<()> {
        self.jobs.lock().push(job.clone());
        let result = job.wait();
        self.jobs.lock().retain(|j| j.id() != job.id());
        match result? {
            crate::job::JobOutcome::Completed => Ok(()),
            other => Err(Error::InvalidArgument(format!(
                "merge job {} ended {other:?}",
                job.id()
            ))),
        }
    }

    /// Runs one step; returns the files it left that nothing names any more (forgotten in
    /// memory, not yet removed).
    fn run_merge(&self, step: Merge) -> Result<Vec<PathBuf>> {
        let backing_of = |path: &Path| -> Option<PathBuf> {
            self.meta
                .lock()
                .images
                .iter()
                .find(|r| r.path == path)
                .and_then(|r| r.backing.clone())
        };
        match step {
            Merge::Delete(image) => {
                // The metadata may not know every file built on the image (one a crash or
                // the user left): such a file would lose its backing file.
                let dirs: Vec<PathBuf> = image
                    .parent()
                    .map(Path::to_path_buf)
                    .into_iter()
                    .chain([self.dir.clone()])
                    .collect();
                let users = recovery::users_on_disk(&image, &dirs);
                let mut meta = self.meta.lock();
                match users {
                    Ok(users) if users.is_empty() => {
                        meta.images.retain(|r| r.path != image);
                        return Ok(vec![image]);
                    }
                    found => {
                        tracing::warn!(image = %image.display(), users = ?found,
                            "keeping an image other files are (or may be) built on; no longer managed by the tree");
                        if let Some(r) = meta.images.iter_mut().find(|r| r.path == image) {
                            r.owned = false;
                        }
                    }
                }
            }
            Merge::Stream { disk, image } => {
                let below = backing_of(&image);
                let top = abs(self.disks[disk].top().path());
                tracing::info!(image = %image.display(), into = %top.display(), "merging by stream");
                self.run_job(stream(
                    &self.disks[disk],
                    StreamOptions {
                        base: below.clone(),
                        ..Default::default()
                    },
                )?)?;
                return Ok(self.forget_merged(&top, below, &image));
            }
            Merge::Commit { disk, top, image } => {
                tracing::info!(image = %top.display(), into = %image.display(), "merging by commit");
                self.run_job(commit(
                    &self.disks[disk],
                    CommitOptions {
                        top: Some(top.clone()),
                        base: Some(image.clone()),
                        ..Default::default()
                    },
                )?)?;
                let mut meta = self.meta.lock();
                for r in meta.images.iter_mut() {
                    if r.backing.as_deref() == Some(top.as_path()) {
                        r.backing = Some(image.clone());
                    }
                }
                for s in meta.snapshots.iter_mut() {
                    for d in s.disks.iter_mut() {
                        if d.image == top {
                            d.image = image.clone();
                        }
                    }
                }
                meta.images.retain(|r| r.path != top);
                return Ok(vec![top]);
            }
            Merge::Rebase { top, image } => {
                let below = backing_of(&image);
                tracing::info!(image = %image.display(), into = %top.display(), "merging by rebase");
                let name = below.as_deref().map(path_text).transpose()?;
                let format = match &below {
                    Some(p) => Some(storage::probe_format(p)?),
                    None => None,
                };
                crate::offline::rebase(&top, name.as_deref(), format, false, &mut |_, _| {})?;
                return Ok(self.forget_merged(&top, below, &image));
            }
        }
        Ok(Vec::new())
    }

    /// After `image` was merged into `top` (which now reads through to `below`): records the
    /// new link and forgets `image`, whose file is returned to be removed.
    fn forget_merged(&self, top: &Path, below: Option<PathBuf>, image: &Path) -> Vec<PathBuf> {
        let mut meta = self.meta.lock();
        if let Some(r) = meta.images.iter_mut().find(|r| r.path == top) {
            r.backing = below;
        }
        meta.images.retain(|r| r.path != image);
        vec![image.to_path_buf()]
    }
}
