//! Folding a diff chain into one full checkpoint.

use std::path::Path;

use super::error::{CheckpointError, CheckpointResult};
use super::manifest::Manifest;
use super::memory_file::{copy_pages, MemoryFile};
use super::{memory_path, resolve_chain, state_file, state_path};

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeReport {
    /// Checkpoints folded (the full one and its diffs).
    pub layers: usize,
    /// Pages written to the new memory file.
    pub pages_copied: u64,
}

/// Writes the checkpoint `top` (a diff, or a full one, which is copied) as one full
/// checkpoint in `out`: the base's data, then each diff's pages in order, newest last; the
/// machine state of `top`. `out` is created if absent and must not be part of the chain.
pub fn merge_chain(top: &Path, out: &Path) -> CheckpointResult<MergeReport> {
    let chain = resolve_chain(top)?;
    super::create_private_dir(out)?;
    let out_canonical = out.canonicalize().map_err(CheckpointError::io(out))?;
    for link in &chain {
        if link.dir.canonicalize().ok().as_deref() == Some(out_canonical.as_path()) {
            return Err(CheckpointError::Chain(format!(
                "{} is part of the chain being merged; choose another output directory",
                out.display()
            )));
        }
    }
    let Some(newest) = chain.last() else {
        return Err(CheckpointError::Chain("empty chain".into()));
    };
    let layout = newest.manifest.memory.clone();
    let data_len = layout.total_bytes();
    let mut manifest = Manifest::new_full(layout, newest.manifest.machine.clone());

    let tmp = memory_path(out).with_extension("tmp");
    let target = MemoryFile::create(&tmp, manifest.id, data_len)?;
    let mut pages_copied = 0;
    let mut written = super::PageSet::new(data_len / super::PAGE_SIZE);
    for link in &chain {
        let source = MemoryFile::open(&memory_path(&link.dir), link.manifest.id, data_len)?;
        let pages = match &link.manifest.pages {
            Some(pages) => pages.clone(),
            // A full checkpoint: only its data extents (holes are zero, and so is the
            // new file).
            None => source.data_pages(0, data_len)?,
        };
        pages_copied += copy_pages(&source, &target, &pages)?;
        written.union(&pages);
    }
    target.sync()?;
    manifest.data = Some(super::DataDigest {
        crc: target.crc_of(&written)?,
        pages: written,
    });
    std::fs::rename(&tmp, memory_path(out)).map_err(CheckpointError::io(out))?;
    state_file::write(&state_path(out), &manifest)?;
    Ok(MergeReport {
        layers: chain.len(),
        pages_copied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{BaseRef, MemoryLayout, MemoryRegion, PageSet, PAGE_SIZE};

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![MemoryRegion {
            guest_addr: 0,
            size: 32 * PAGE_SIZE,
        }])
    }

    fn write_checkpoint(dir: &Path, manifest: &Manifest, pages: &[(u64, u8)]) {
        std::fs::create_dir_all(dir).unwrap();
        let file = MemoryFile::create(&memory_path(dir), manifest.id, 32 * PAGE_SIZE).unwrap();
        for &(page, fill) in pages {
            file.write_at(&[fill; PAGE_SIZE as usize], page * PAGE_SIZE)
                .unwrap();
        }
        state_file::write(&state_path(dir), manifest).unwrap();
    }

    #[test]
    fn diffs_override_and_holes_fall_through() {
        let root = tempfile::tempdir().unwrap();
        let full = Manifest::new_full(layout(), serde_json::json!("full"));
        write_checkpoint(&root.path().join("a"), &full, &[(1, 1), (2, 1), (3, 1)]);
        // The diff holds page 2 as zeroes (a hole in its file, but listed) and page 5;
        // page 3 is not listed, so the base's data must survive.
        let mut pages = PageSet::new(32);
        pages.insert(2);
        pages.insert(5);
        let diff = Manifest::new_diff(
            layout(),
            serde_json::json!("diff"),
            BaseRef {
                dir: "../a".into(),
                id: full.id,
            },
            pages,
        );
        write_checkpoint(&root.path().join("b"), &diff, &[(5, 5)]);

        let out = root.path().join("merged");
        let report = merge_chain(&root.path().join("b"), &out).unwrap();
        assert_eq!(report.layers, 2);
        let merged = state_file::read(&state_path(&out)).unwrap();
        assert!(!merged.is_diff());
        assert_eq!(merged.machine, serde_json::json!("diff"));
        let file = MemoryFile::open(&memory_path(&out), merged.id, 32 * PAGE_SIZE).unwrap();
        let mut page = [0u8; PAGE_SIZE as usize];
        for (index, fill) in [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 5)] {
            file.read_at(&mut page, index * PAGE_SIZE).unwrap();
            assert!(page.iter().all(|&b| b == fill), "page {index}");
        }
    }

    #[test]
    fn a_replaced_base_breaks_the_chain() {
        let root = tempfile::tempdir().unwrap();
        let full = Manifest::new_full(layout(), serde_json::json!(1));
        write_checkpoint(&root.path().join("a"), &full, &[]);
        let diff = Manifest::new_diff(
            layout(),
            serde_json::json!(2),
            BaseRef {
                dir: "../a".into(),
                id: full.id ^ 1,
            },
            PageSet::new(32),
        );
        write_checkpoint(&root.path().join("b"), &diff, &[]);
        let err = merge_chain(&root.path().join("b"), &root.path().join("m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("base was replaced"), "{err}");
    }

    #[test]
    fn checkpoint_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        // SAFETY: umask only changes the mode of files created later; other tests' files
        // get more permissive modes for a moment, which they do not check.
        let old = unsafe { libc::umask(0) };
        let full = Manifest::new_full(layout(), serde_json::json!("full"));
        let a = root.path().join("a");
        crate::checkpoint::create_private_dir(&a).unwrap();
        write_checkpoint(&a, &full, &[(1, 1)]);
        let out = root.path().join("deep/merged");
        let merged = merge_chain(&a, &out);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        merged.unwrap();
        for file in [
            state_path(&a),
            memory_path(&a),
            state_path(&out),
            memory_path(&out),
        ] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        for dir in [a, out] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
    }
}
