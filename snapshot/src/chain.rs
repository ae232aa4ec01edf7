//! Walking and re-opening the layers of a live backing chain.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use storage::qcow2::Qcow2Image;
use storage::raw::RawImage;
use storage::{BlockDevice, ImageFormat, OpenOptions};

use crate::error::{Error, Result};

/// How a new overlay names its backing file in its header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPath {
    /// The backing file's absolute path (libvirt's default).
    #[default]
    Absolute,
    /// A path relative to the overlay's directory, so the chain can be moved as a whole.
    Relative,
    /// This exact string.
    Exact(String),
}

impl BackingPath {
    /// The name an image at `image` should record for its backing file at `backing`.
    pub fn name_for(&self, image: &Path, backing: &Path) -> Result<String> {
        let absolute = |p: &Path| -> Result<PathBuf> {
            std::path::absolute(p).map_err(|e| {
                Error::InvalidArgument(format!("{}: cannot make absolute: {e}", p.display()))
            })
        };
        let text = |p: PathBuf| -> Result<String> {
            p.into_os_string().into_string().map_err(|p| {
                Error::InvalidArgument(format!("{}: path is not UTF-8", Path::new(&p).display()))
            })
        };
        match self {
            BackingPath::Exact(name) => Ok(name.clone()),
            BackingPath::Absolute => text(normalize(&absolute(backing)?)),
            BackingPath::Relative => {
                let from = normalize(&absolute(image)?);
                let to = normalize(&absolute(backing)?);
                let dir = from.parent().unwrap_or(Path::new("/"));
                text(relative_path(dir, &to))
            }
        }
    }
}

/// Removes `.` and resolves `..` lexically (no symlinks are followed).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `to` as seen from directory `from` (both absolute and normalized).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to_parts[common..] {
        out.push(c);
    }
    out
}

/// Every layer of the chain under `top`, `top` first.
pub fn layers(top: &Arc<dyn BlockDevice>) -> Vec<Arc<dyn BlockDevice>> {
    let mut out = vec![top.clone()];
    while let Some(below) = out.last().and_then(|l| l.backing()) {
        out.push(below);
    }
    out
}

/// The depth (top = 0) of the layer stored at `path` in `layers`, comparing canonical paths.
pub fn depth_of(layers: &[Arc<dyn BlockDevice>], path: &Path, disk: &str) -> Result<usize> {
    let wanted = std::fs::canonicalize(path).map_err(|_| Error::NotInChain {
        path: path.to_path_buf(),
        disk: disk.to_string(),
    })?;
    layers
        .iter()
        .position(|l| std::fs::canonicalize(l.path()).ok().as_ref() == Some(&wanted))
        .ok_or_else(|| Error::NotInChain {
            path: path.to_path_buf(),
            disk: disk.to_string(),
        })
}

/// The format of a layer, as the backing-format extension records it.
pub fn format_of(layer: &dyn BlockDevice) -> ImageFormat {
    layer.info().format.unwrap_or(ImageFormat::Raw)
}

/// Opens a second, writable handle on `layer`'s file whose backing chain is `layer`'s own
/// (in-memory) backing device: how a read-only backing file becomes a commit target
/// without reopening the chain below it.
pub fn reopen_writable(layer: &Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>> {
    let path = layer.path();
    match format_of(&**layer) {
        ImageFormat::Raw => Ok(Arc::new(RawImage::open(path, false, false)?)),
        ImageFormat::Qcow2 => {
            let backing = layer.backing();
            let image = Qcow2Image::open_with(path, false, &OpenOptions::default(), |name, _| {
                backing.clone().ok_or_else(|| {
                    storage::Error::Chain(format!(
                        "{}: names backing file '{name}' but was open without one",
                        path.display()
                    ))
                })
            })?;
            Ok(Arc::new(image))
        }
    }
}

/// Turns a writable layer read-only before it becomes a backing file: qcow2 layers flip in
/// place (keeping their caches); raw files are flushed and reopened read-only.
pub fn seal(layer: &Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>> {
    if layer.read_only() {
        return Ok(layer.clone());
    }
    match layer.as_qcow2() {
        Some(image) => {
            image.make_read_only()?;
            Ok(layer.clone())
        }
        None => {
            layer.flush()?;
            Ok(Arc::new(RawImage::open(layer.path(), true, false)?))
        }
    }
}

/// Rewrites the backing pointer of the qcow2 `layer` to `name`/`format`/`device`. A
/// read-only layer (an intermediate one) gets its header rewritten through a short-lived
/// writable handle, and its in-memory handle is re-pointed.
pub fn rewrite_backing(
    layer: &Arc<dyn BlockDevice>,
    name: Option<&str>,
    format: Option<ImageFormat>,
    device: Option<Arc<dyn BlockDevice>>,
) -> Result<()> {
    let image = layer.as_qcow2().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: only qcow2 images have a backing pointer",
            layer.path().display()
        ))
    })?;
    if !image.is_read_only() {
        image.set_backing(name, format, device)?;
        return Ok(());
    }
    let path = layer.path();
    let current = layer.backing();
    let writer = Qcow2Image::open_with(path, false, &OpenOptions::default(), |name, _| {
        current.clone().ok_or_else(|| {
            storage::Error::Chain(format!(
                "{}: names backing file '{name}' but was open without one",
                path.display()
            ))
        })
    })?;
    writer.set_backing(name, format, device.clone())?;
    writer.close()?;
    drop(writer);
    image.replace_backing_device(device);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_walk_up_and_down() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(relative_path(&p("/a/b"), &p("/a/b/c.qcow2")), p("c.qcow2"));
        assert_eq!(
            relative_path(&p("/a/b"), &p("/a/x/c.qcow2")),
            p("../x/c.qcow2")
        );
        let name = BackingPath::Relative
            .name_for(&p("/vm/snap/top.qcow2"), &p("/vm/./base.qcow2"))
            .unwrap();
        assert_eq!(name, "../base.qcow2");
        let name = BackingPath::Absolute
            .name_for(&p("/vm/top.qcow2"), &p("/vm/x/../base.qcow2"))
            .unwrap();
        assert_eq!(name, "/vm/base.qcow2");
    }
}
