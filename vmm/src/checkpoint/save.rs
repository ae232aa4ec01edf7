//! Saving the VM: paused saves (full or diff), live saves (memory copied in rounds while the
//! guest runs, then a short stop), and the VM-state stream the snapshot layer stores in a
//! qcow2 image.
//!
//! A save writes into a [`Staging`] directory and returns what it wrote; the caller writes
//! the state file and commits the directory. Every page a save takes out of the dirty log
//! goes through [`Tracking`], which gives them back if the save fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::checkpoint::manifest::new_id;
use snapshot::checkpoint::{
    memory_path, state_file, BaseRef, DataDigest, Manifest, MemoryFile, MemoryLayout, PageSet,
    PAGE_SIZE,
};

use super::capture::{MachineState, VmHandle, PAUSE_TIMEOUT};
use super::destination::{set_mode, FILE_MODE};
use super::tracking::Tracking;
use crate::error::{Error, Result};
use crate::memory::persist as memory_persist;
use crate::persist::Persist;

/// Live rounds stop once a round leaves at most this many dirty pages (4 MiB) for the pause.
const LIVE_FINAL_PAGES: u64 = 1024;
/// Most copy rounds of a live checkpoint before it stops the guest anyway.
const LIVE_MAX_ROUNDS: usize = 8;

/// How to take a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// Copy memory while the guest runs; stop it only for the last pages and the vCPU and
    /// device state.
    pub live: bool,
    /// Save only what changed since this VM's last checkpoint (or the one it was restored
    /// or reverted from), as a diff naming it as base.
    pub incremental: bool,
    /// Replace a checkpoint already in the directory, if nothing depends on it (it is not
    /// this VM's next diff base, nor the base of a checkpoint beside it, nor a snapshot
    /// tree's). Without it, a directory that is not empty is refused.
    #[serde(default)]
    pub replace: bool,
}

/// What a checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Its id.
    pub id: u64,
    /// Its base, for a diff.
    pub base: Option<PathBuf>,
    /// Pages written to the memory file (counting pages a live round rewrote).
    pub pages_written: u64,
    /// Touched pages left as holes because they held only zeroes.
    pub zero_pages: u64,
    /// Memory copy rounds while the guest ran (live only).
    pub live_rounds: usize,
    /// How long the vCPUs were stopped, in microseconds.
    pub pause_us: u64,
    /// How long the whole checkpoint took, in microseconds.
    pub total_us: u64,
}

/// What a save wrote into its directory, before the state file.
pub(super) struct Saved {
    /// The manifest, for the state file.
    pub manifest: Manifest,
    /// Pages written to the memory file.
    pub pages_written: u64,
    /// Touched pages left as holes.
    pub zero_pages: u64,
    /// Live copy rounds.
    pub live_rounds: usize,
    /// How long the vCPUs were stopped.
    pub pause: Duration,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Saved {
    /// The report of this save, committed as `dir`.
    pub fn report(&self, dir: PathBuf, started: Instant) -> CheckpointReport {
        CheckpointReport {
            dir,
            id: self.manifest.id,
            base: self.manifest.base.as_ref().map(|b| b.dir.clone()),
            pages_written: self.pages_written,
            zero_pages: self.zero_pages,
            live_rounds: self.live_rounds,
            pause_us: micros(self.pause),
            total_us: micros(started.elapsed()),
        }
    }

    /// Writes the state file into `dir` (the staging directory), private.
    pub fn write_state(&self, dir: &Path) -> Result<()> {
        let path = snapshot::checkpoint::state_path(dir);
        state_file::write(&path, &self.manifest)?;
        set_mode(&path, FILE_MODE)
    }
}

/// Creates the memory file of a new checkpoint in `dir`, private.
fn create_memory_file(dir: &Path, id: u64, layout: &MemoryLayout) -> Result<MemoryFile> {
    let file = MemoryFile::create(&memory_path(dir), id, layout.total_bytes())?;
    set_mode(file.path(), FILE_MODE)?;
    Ok(file)
}

/// The manifest of a checkpoint `id` holding `machine` (a diff if `base` and `pages`).
pub(super) fn build_manifest(
    id: u64,
    layout: MemoryLayout,
    machine: MachineState,
    base: Option<BaseRef>,
    pages: Option<PageSet>,
    data: Option<DataDigest>,
) -> Result<Manifest> {
    let machine = serde_json::to_value(&machine)
        .map_err(|e| Error::Config(format!("encoding the machine state: {e}")))?;
    let mut manifest = match (base, pages) {
        (Some(base), Some(pages)) => Manifest::new_diff(layout, machine, base, pages),
        _ => Manifest::new_full(layout, machine),
    };
    manifest.id = id;
    manifest.data = data;
    Ok(manifest)
}

/// Saves the paused VM into `dir`: memory file written and synced, manifest returned.
pub(super) fn save_paused(
    vm: &VmHandle,
    tracking: &mut Tracking,
    dir: &Path,
    incremental: bool,
    at_stop: &mut dyn FnMut() -> Result<()>,
) -> Result<Saved> {
    vm.require_paused()?;
    let started = Instant::now();
    let base = if incremental {
        Some(tracking.incremental_base()?)
    } else {
        None
    };
    let machine = &*vm.machine;
    let memory = vm.memory();
    let layout = memory.save(())?;
    let id = new_id();
    let file = create_memory_file(dir, id, &layout)?;
    let (state, pages, stats) = vm.with_devices_quiesced(|| {
        vm.flush_disks()?;
        at_stop()?;
        let state = vm.capture()?;
        let (pages, stats) = if base.is_some() {
            let dirty = tracking.changes_since_base(machine)?;
            let stats = memory_persist::write_pages(memory, &file, &dirty, false, true)?;
            (Some(dirty), stats)
        } else {
            tracking.start_window(machine)?;
            let touched = tracking.touched_pages(machine)?;
            let stats = memory_persist::write_pages(memory, &file, &touched, true, true)?;
            (None, stats)
        };
        Ok((state, pages, stats))
    })?;
    let digest = stats.crc.map(|crc| DataDigest {
        pages: stats.written.clone(),
        crc,
    });
    let manifest = build_manifest(id, layout, state, base, pages, digest)?;
    file.sync()?;
    Ok(Saved {
        manifest,
        pages_written: stats.pages,
        zero_pages: stats.zero_pages,
        live_rounds: 0,
        pause: started.elapsed(),
    })
}

/// The live path, with the VM running: rounds while the guest runs, then a short pause.
pub(super) fn save_live(
    vm: &VmHandle,
    tracking: &mut Tracking,
    dir: &Path,
    incremental: bool,
    at_stop: &mut dyn FnMut() -> Result<()>,
) -> Result<Saved> {
    let base = if incremental {
        Some(tracking.incremental_base()?)
    } else {
        None
    };
    let machine = &*vm.machine;
    let memory = vm.memory();
    let layout = memory.save(())?;
    let id = new_id();
    let file = create_memory_file(dir, id, &layout)?;

    // Round 0: everything a full checkpoint holds, or what changed since the base.
    let changed_since_base = tracking.changes_since_base(machine)?;
    let mut all_pages = changed_since_base.clone();
    let mut written = 0;
    let mut zero_pages = 0;
    let first = if base.is_some() {
        memory_persist::write_pages(memory, &file, &changed_since_base, false, false)?
    } else {
        let touched = tracking.touched_pages(machine)?;
        memory_persist::write_pages(memory, &file, &touched, true, false)?
    };
    written += first.pages;
    zero_pages += first.zero_pages;
    let mut written_pages = first.written;
    let mut rounds = 1;
    let mut pending = tracking.collect_dirty(machine)?;
    while pending.count() > LIVE_FINAL_PAGES && rounds < LIVE_MAX_ROUNDS {
        let round = memory_persist::write_pages(memory, &file, &pending, false, false)?;
        written += round.pages;
        written_pages.union(&round.written);
        all_pages.union(&pending);
        rounds += 1;
        pending = tracking.collect_dirty(machine)?;
    }

    // The stop. Nothing slow may run while the vCPUs are stopped: the buffer the last pages
    // are copied into is allocated and faulted in now, and the devices are quiesced before
    // the vCPUs stop (draining their requests in flight, which may be a guest flush's fsync,
    // while the guest still runs) and restarted after the vCPUs run again (their worker
    // threads are spawned then). Inside the stop: the last dirty pages, the hook, and the
    // VM, vCPU and device state.
    let mut copied = Vec::new();
    let margin = pending.count().saturating_add(LIVE_FINAL_PAGES);
    copied.resize(usize::try_from(margin * PAGE_SIZE).unwrap_or(0), 0u8);
    copied.clear();
    let (state, pause) = vm.with_devices_quiesced(|| {
        machine.gate.pause(PAUSE_TIMEOUT)?;
        // The pause runs from the moment every vCPU is parked to the moment they may run
        // again, both clock reads inside the stop.
        let stopped = Instant::now();
        let captured = (|| {
            pending.union(&tracking.collect_dirty(machine)?);
            memory_persist::copy_out(memory, &pending, &mut copied);
            at_stop()?;
            vm.capture()
        })();
        let pause = stopped.elapsed();
        machine.gate.resume();
        Ok((captured?, pause))
    })?;
    memory_persist::write_copied(&file, &pending, &copied)?;
    written += pending.count();
    written_pages.union(&pending);
    all_pages.union(&pending);

    // Durability after the guest runs again: the disks, then the files. Pages were
    // rewritten round after round: the digest is of what the file ends up holding.
    vm.flush_disks()?;
    file.sync()?;
    let digest = DataDigest {
        crc: file.crc_of(&written_pages)?,
        pages: written_pages,
    };
    let pages = base.as_ref().map(|_| all_pages);
    let manifest = build_manifest(id, layout, state, base, pages, Some(digest))?;
    Ok(Saved {
        manifest,
        pages_written: written,
        zero_pages,
        live_rounds: rounds,
        pause,
    })
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the paused VM as one stream: a state frame, the list of non-zero pages, the
/// pages, and a CRC-32 of them. Returns the bytes written. The dirty log is not touched:
/// a stream is no diff base.
pub(super) fn save_stream(vm: &VmHandle, tracking: &Tracking, out: &mut dyn Write) -> Result<u64> {
    vm.require_paused()?;
    let memory = vm.memory();
    let mut out = CountingWriter {
        inner: out,
        count: 0,
    };
    vm.with_devices_quiesced(|| {
        vm.flush_disks()?;
        let state = vm.capture()?;
        let touched = tracking.touched_pages(&vm.machine)?;
        let pages = memory_persist::nonzero_pages(memory, &touched);
        let manifest = build_manifest(new_id(), memory.save(())?, state, None, None, None)?;
        let io = || Error::io("writing the VM state stream");
        out.write_all(&state_file::encode(&manifest)?)
            .map_err(io())?;
        let list = serde_json::to_vec(&pages)
            .map_err(|e| Error::Config(format!("encoding the page list: {e}")))?;
        out.write_all(&(list.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&list))
            .map_err(io())?;
        let crc = memory_persist::write_stream(memory, &pages, &mut out)?;
        out.write_all(&crc.to_le_bytes()).map_err(io())?;
        Ok(())
    })?;
    Ok(out.count)
}
