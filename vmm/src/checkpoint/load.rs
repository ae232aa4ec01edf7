//! Loading a checkpoint: reading and checking a chain from disk ([`LoadedCheckpoint`]), then
//! loading it into the paused running VM (a revert) or into a VM just built for it
//! ([`crate::Vmm::restore`]); and loading a VM-state stream.
//!
//! Order (DESIGN §5): memory, VM, devices, vCPUs, then the devices restart. Everything is
//! checked against the VM before anything changes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use snapshot::checkpoint::{
    memory_path, resolve_chain_as, state_file, state_path, BaseRef, ChainLink, CheckpointError,
    MemoryFile, MemoryLayout, PageSet,
};
use storage::BlockDevice;

use super::capture::{MachineState, RestoreTarget, VmHandle};
use super::tracking::{Backing, Tracking};
use crate::config::{
    default_disk_name, BootSource, DiskConfig, SerialOutput, VmConfig, VsockConfig,
};
use crate::error::{Error, Result};
use crate::machine::AttachedDisk;
use crate::memory::persist::{self as memory_persist, MemoryLayer};
use crate::memory::uffd::PageSource;
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use crate::shell::ShellSource;

/// Largest page list a stream may announce (bytes of JSON).
const MAX_STREAM_PAGE_LIST: u64 = 64 << 20;

/// Where a restored VM's guest memory comes from.
#[derive(Default)]
pub enum MemorySource {
    /// The checkpoint's memory files: the full one mapped copy-on-write, diffs copied in.
    #[default]
    Files,
    /// A userfaultfd pager serving each page on first touch from `source` (a lazy restore
    /// from a snapshot store); the checkpoint directory needs only its state file. Chunks
    /// in `prefetch` are installed ahead of faults.
    Pager {
        /// The memory, in chunks.
        source: Arc<dyn PageSource>,
        /// Chunk indices to install before they are touched, in order.
        prefetch: Vec<u64>,
    },
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemorySource::Files => f.write_str("Files"),
            MemorySource::Pager { prefetch, .. } => f
                .debug_struct("Pager")
                .field("prefetch", &prefetch.len())
                .finish_non_exhaustive(),
        }
    }
}

/// How [`crate::Vmm::restore_with`] builds a VM beyond what its checkpoint says.
#[derive(Default)]
pub struct RestoreOptions {
    /// Where guest memory comes from.
    pub memory: MemorySource,
    /// Each disk's top device, in device order, instead of opening the images the
    /// checkpoint names (a local overlay over a remote layer). Sizes must match.
    pub disks: Option<Vec<Arc<dyn BlockDevice>>>,
    /// Disks to open on another image than the one the checkpoint names, by disk name: the
    /// image must show the same contents (an overlay on the saved image, as a clone's is)
    /// and have the same size, which the restore checks.
    pub disk_tops: Vec<(String, PathBuf)>,
    /// The vsock device's host socket, instead of the one saved (the VM checkpointed may
    /// still be running, bound to it).
    pub vsock_uds: Option<PathBuf>,
    /// A VM built ahead of time to restore into ([`crate::shell`]): a given shell must fit
    /// the checkpoint's memory size and vCPU count or the restore fails; a pool without a
    /// fitting shell ready leaves the restore to build its VM cold.
    pub shell: ShellSource,
}

impl RestoreOptions {
    /// Points the disks of `config` at the images asked for.
    pub(crate) fn apply(&self, config: &mut crate::config::VmConfig) -> Result<()> {
        for (name, path) in &self.disk_tops {
            let index = (0..config.disks.len())
                .find(|&i| config.disk_name(i) == *name)
                .ok_or_else(|| {
                    Error::Config(format!("the checkpoint has no disk named {name:?}"))
                })?;
            config.disks[index].path = path.clone();
            config.disks[index].format = None;
        }
        Ok(())
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("memory", &self.memory)
            .field("disks", &self.disks.as_ref().map(Vec::len))
            .field("disk_tops", &self.disk_tops)
            .field("vsock_uds", &self.vsock_uds)
            .field("shell", &self.shell)
            .finish()
    }
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    dir.canonicalize()
        .map_err(Error::io(format!("resolving {}", dir.display())))
}

/// A checkpoint read and checked from disk: its chain (machine states parsed straight into
/// [`MachineState`]) and open memory files.
#[derive(Debug)]
pub(crate) struct LoadedCheckpoint {
    dir: PathBuf,
    chain: Vec<ChainLink<MachineState>>,
    /// One per link, full checkpoint first (none when memory comes from a pager).
    files: Vec<Arc<MemoryFile>>,
    /// Memory comes from a pager, not from memory files: these pages hold data.
    paged: Option<PageSet>,
}

impl LoadedCheckpoint {
    /// Reads the chain ending at `dir`, its machine state, and opens (and checks) every
    /// memory file.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, None)
    }

    /// As [`LoadedCheckpoint::open`]; with `paged` (the pages that hold data) memory comes
    /// from a pager, so only a full checkpoint's state file is read, no memory file.
    pub(crate) fn open_with(dir: &Path, paged: Option<PageSet>) -> Result<Self> {
        if let Some(pages) = paged {
            let manifest = state_file::read_as::<MachineState>(&state_path(dir))?;
            if manifest.is_diff() {
                return Err(Error::Checkpoint(CheckpointError::Chain(format!(
                    "{}: a paged restore needs a full checkpoint",
                    dir.display()
                ))));
            }
            if pages.len() != manifest.memory.total_pages() {
                return Err(Error::Memory(format!(
                    "the page source covers {} pages, the checkpoint {}",
                    pages.len(),
                    manifest.memory.total_pages()
                )));
            }
            check_machine(&manifest.machine, &state_path(dir))?;
            return Ok(LoadedCheckpoint {
                dir: dir.to_path_buf(),
                chain: vec![ChainLink {
                    dir: dir.to_path_buf(),
                    manifest,
                }],
                files: Vec::new(),
                paged: Some(pages),
            });
        }
        let chain = resolve_chain_as::<MachineState>(dir)?;
        let top = chain
            .last()
            .ok_or_else(|| Error::Checkpoint(CheckpointError::Chain("empty chain".into())))?;
        check_machine(&top.manifest.machine, &state_path(dir))?;
        let total = top.manifest.memory.total_bytes();
        let mut files = Vec::new();
        for link in &chain {
            files.push(Arc::new(MemoryFile::open(
                &memory_path(&link.dir),
                link.manifest.id,
                total,
            )?));
        }
        Ok(LoadedCheckpoint {
            dir: dir.to_path_buf(),
            chain,
            files,
            paged: None,
        })
    }

    fn top(&self) -> &ChainLink<MachineState> {
        // `open` and the stream path build a non-empty chain.
        &self.chain[self.chain.len() - 1]
    }

    /// The machine state to load: the top checkpoint's.
    fn machine(&self) -> &MachineState {
        &self.top().manifest.machine
    }

    fn full_file(&self) -> Arc<MemoryFile> {
        self.files[0].clone()
    }

    /// The next diff's base once this checkpoint is in RAM.
    fn base_ref(&self) -> Result<BaseRef> {
        Ok(BaseRef {
            dir: absolute(&self.dir)?,
            id: self.top().manifest.id,
        })
    }

    /// The tracking of a VM built by [`crate::Vmm::restore`] from this checkpoint: no dirty
    /// log yet (turning it on would double the restore time), changes found in the pagemap.
    pub(crate) fn tracking(&self) -> Result<Tracking> {
        if let Some(pages) = &self.paged {
            return Ok(Tracking::paged(pages.clone()));
        }
        Ok(Tracking::restored(self.base_ref()?, self.full_file()))
    }

    /// The memory layout saved.
    pub(crate) fn layout(&self) -> MemoryLayout {
        self.top().manifest.memory.clone()
    }

    /// The configuration to rebuild the saved VM: its shape and the disks' images at
    /// checkpoint time.
    pub(crate) fn config(&self) -> Result<VmConfig> {
        let state = self.machine();
        let mut config = VmConfig::new(BootSource::Checkpoint(self.dir.clone()));
        config.vcpus = state.vcpu_count;
        config.memory_mib = state.memory_mib;
        config.serial = SerialOutput::Null;
        for (index, saved) in state.disks.iter().enumerate() {
            let disk = &saved.disk;
            let mut entry = DiskConfig::new(disk.top.clone());
            entry.read_only = disk.read_only;
            entry.num_queues = disk.num_queues;
            entry.queue_size = disk.queue_size;
            if disk.name != default_disk_name(index) {
                entry.id = Some(disk.name.clone());
            }
            config.disks.push(entry);
        }
        config.vsock = state.vsock.as_ref().map(|saved| VsockConfig {
            guest_cid: saved.device.guest_cid,
            uds: saved.device.uds.clone(),
        });
        Ok(config)
    }

    /// Loads memory: the full checkpoint mapped, then each diff's pages copied in. A restore
    /// calls it on the fresh RAM of a VM before KVM learns of that RAM
    /// ([`crate::Vmm::restore_with`]): replacing a mapping KVM already has a slot on makes KVM
    /// walk the whole slot to drop what it mapped (a cost that grows with RAM size).
    pub(crate) fn load_memory(&self, memory: &GuestMemoryMmap) -> Result<()> {
        if self.paged.is_some() {
            // The pager fills RAM on demand; only the layout must fit.
            return memory_persist::check_layout(memory, &self.layout()).map_err(Error::Memory);
        }
        let layers: Vec<MemoryLayer<'_>> = self
            .chain
            .iter()
            .zip(&self.files)
            .enumerate()
            .map(|(index, (link, file))| MemoryLayer {
                file,
                // The bottom is mapped whole; each diff above brings its own pages.
                pages: if index == 0 {
                    None
                } else {
                    link.manifest.pages.as_ref()
                },
            })
            .collect();
        memory.restore(&layers, &self.layout())
    }

    /// Loads the machine state into a VM just built for it ([`crate::Vmm::restore`]), whose
    /// RAM [`LoadedCheckpoint::load_memory`] has already filled; the devices are left
    /// quiesced for the caller to resume once the vCPUs exist. Nothing else holds that RAM
    /// yet, so a check failing here only drops it.
    pub(crate) fn apply_new(
        &self,
        disks: &[AttachedDisk],
        target: RestoreTarget<'_>,
    ) -> Result<()> {
        for (saved, disk) in self.machine().disks.iter().zip(disks) {
            disk.check(&saved.disk).map_err(|e| {
                Error::Checkpoint(CheckpointError::Mismatch(format!(
                    "{e} ({})",
                    saved.disk.top.display()
                )))
            })?;
        }
        if let (Some(saved), Some(vsock)) = (&self.machine().vsock, target.vsock) {
            vsock.check(&saved.device).map_err(|e| {
                Error::Checkpoint(CheckpointError::Mismatch(format!(
                    "{e} ({})",
                    self.dir.display()
                )))
            })?;
        }
        self.machine().restore_into(target, true)
    }
}

/// Checks the machine state a manifest holds for a consistent vCPU count.
fn check_machine(machine: &MachineState, source: &Path) -> Result<()> {
    let bad = |message: String| {
        Error::Checkpoint(CheckpointError::StateFile {
            path: source.to_path_buf(),
            message,
        })
    };
    if machine.vcpus.len() != usize::from(machine.vcpu_count) || machine.vcpus.is_empty() {
        return Err(bad(format!(
            "{} vCPU states for {} vCPUs",
            machine.vcpus.len(),
            machine.vcpu_count
        )));
    }
    Ok(())
}

/// Checks `loaded` fits the VM before anything is changed.
pub(super) fn check_fits(vm: &VmHandle, loaded: &LoadedCheckpoint) -> Result<()> {
    vm.check_fits(&loaded.dir, loaded.machine(), &loaded.layout())
}

/// Loads a checked checkpoint into the paused VM, running `before_load` first (devices
/// quiesced), and makes it the next diff's base.
pub(super) fn load_paused(
    vm: &VmHandle,
    tracking: &Mutex<Tracking>,
    loaded: &LoadedCheckpoint,
    before_load: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    vm.require_paused()?;
    vm.with_devices_quiesced(|| {
        before_load()?;
        loaded.load_memory(vm.memory())?;
        loaded.machine().restore_into(vm.target(), false)
    })?;
    adopt(vm, &mut tracking.lock(), loaded)
}

/// Makes `loaded` (just loaded into RAM) the base of the next incremental checkpoint.
fn adopt(vm: &VmHandle, tracking: &mut Tracking, loaded: &LoadedCheckpoint) -> Result<()> {
    let machine = &vm.machine;
    tracking.enable_dirty_logging(machine)?;
    // What the guest wrote before the load is gone from RAM: start the window afresh.
    memory_persist::collect_dirty(&machine.vm, &machine.memory)?;
    tracking.forget_changes();
    tracking.base = Some(loaded.base_ref()?);
    tracking.backing = Some(Backing::new(loaded.full_file()));
    Ok(())
}

/// Loads a stream from [`super::save::save_stream`] into the paused VM; memory is staged
/// and its CRC checked before anything changes.
pub(super) fn load_stream(
    vm: &VmHandle,
    tracking: &Mutex<Tracking>,
    input: &mut dyn Read,
) -> Result<()> {
    vm.require_paused()?;
    let source = Path::new("VM state stream");
    let manifest = state_file::read_from_as::<MachineState>(input, source)?;
    check_machine(&manifest.machine, source)?;
    let loaded = LoadedCheckpoint {
        dir: source.to_path_buf(),
        chain: vec![ChainLink {
            dir: source.to_path_buf(),
            manifest,
        }],
        files: Vec::new(),
        paged: None,
    };
    check_fits(vm, &loaded)?;
    let bad = |message: String| {
        Error::Checkpoint(CheckpointError::StateFile {
            path: source.into(),
            message,
        })
    };
    let mut len = [0u8; 8];
    input
        .read_exact(&mut len)
        .map_err(|e| bad(format!("reading the page list length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_STREAM_PAGE_LIST {
        return Err(bad(format!("page list of {len} bytes")));
    }
    let mut list = vec![0u8; len as usize];
    input
        .read_exact(&mut list)
        .map_err(|e| bad(format!("reading the page list: {e}")))?;
    let pages: PageSet =
        serde_json::from_slice(&list).map_err(|e| bad(format!("page list: {e}")))?;
    let memory = vm.memory();
    if pages.len() != loaded.layout().total_pages() {
        return Err(bad(format!(
            "page list covers {} pages, memory has {}",
            pages.len(),
            loaded.layout().total_pages()
        )));
    }
    let staged = memory_persist::StagedMemory::new(memory)?;
    let computed = staged.read_stream(&pages, input)?;
    let mut crc = [0u8; 4];
    input
        .read_exact(&mut crc)
        .map_err(|e| bad(format!("reading the memory CRC: {e}")))?;
    let stored = u32::from_le_bytes(crc);
    if stored != computed {
        return Err(bad(format!(
            "memory CRC mismatch (stored {stored:08x}, computed {computed:08x}): the stream is corrupt"
        )));
    }
    vm.with_devices_quiesced(|| {
        staged.commit(memory)?;
        loaded.machine().restore_into(vm.target(), false)
    })?;
    // RAM is anonymous again; the next incremental checkpoint needs a new base.
    let mut tracking = tracking.lock();
    tracking.backing = None;
    tracking.base = None;
    tracking.forget_changes();
    Ok(())
}
