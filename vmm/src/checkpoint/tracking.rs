//! What a VM's checkpointer knows about its memory between checkpoints: whether KVM logs
//! dirty pages, the base of the next diff, the memory file RAM is mapped from, and the
//! pages a failed save took out of the dirty log.
//!
//! Reading KVM's dirty log (and vm-memory's bitmap) resets it. A save that reads it and then
//! fails must not lose those pages, or the next diff would miss them: every page a save
//! collects is kept until the save is durable ([`Tracking::commit`]); if it fails, they are
//! carried over ([`Tracking::roll_back`]) and the next save adds them to what it collects.

use std::sync::{Arc, OnceLock};

use snapshot::checkpoint::{BaseRef, MemoryFile, PageSet};

use crate::error::Result;
use crate::machine::Machine;
use crate::memory::persist as memory_persist;

/// Where the next full save finds pages the pagemap does not show: a memory file the RAM
/// is mapped from, and which of its pages hold data.
#[derive(Debug)]
pub(crate) struct Backing {
    /// `None` for RAM filled by a pager, whose data pages are known from the start.
    file: Option<Arc<MemoryFile>>,
    /// Found on first need (a restore must not wait for it).
    data_pages: OnceLock<PageSet>,
}

impl Backing {
    /// The backing of RAM mapped from `file`.
    pub fn new(file: Arc<MemoryFile>) -> Self {
        Backing {
            file: Some(file),
            data_pages: OnceLock::new(),
        }
    }

    /// The backing of RAM a pager fills on demand: `pages` hold data.
    pub fn pages(pages: PageSet) -> Self {
        Backing {
            file: None,
            data_pages: OnceLock::from(pages),
        }
    }

    fn data_pages(&self) -> Result<&PageSet> {
        if let Some(pages) = self.data_pages.get() {
            return Ok(pages);
        }
        let Some(file) = &self.file else {
            return Err(crate::Error::Memory(
                "paged memory without its page set".into(),
            ));
        };
        let pages = file.data_pages(0, file.data_len())?;
        Ok(self.data_pages.get_or_init(|| pages))
    }
}

/// What a VM's checkpointer knows about its memory: whether KVM logs dirty pages, the base
/// of the next diff, and the memory file RAM is mapped from.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    /// KVM logs dirty pages (turned on at the first save or load that needs it).
    pub dirty_logging: bool,
    /// RAM was mapped from the base's memory file and dirty logging is not on yet: what
    /// changed since the base is what the pagemap shows as written since the mapping.
    pub changes_in_pagemap: bool,
    /// The next diff's base: the last checkpoint this VM saved durably or loaded.
    pub base: Option<BaseRef>,
    /// The memory file guest RAM is mapped from, if any.
    pub backing: Option<Backing>,
    /// Pages changed since `base` that a failed save took out of the dirty log.
    carried: Option<PageSet>,
    /// What the save under way collected (and `changes_in_pagemap` before it), given back
    /// if it fails.
    in_flight: Option<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    collected: Option<PageSet>,
    changes_in_pagemap: bool,
}

fn union_into(target: &mut Option<PageSet>, pages: &PageSet) {
    match target {
        Some(existing) => existing.union(pages),
        None => *target = Some(pages.clone()),
    }
}

impl Tracking {
    /// The tracking of a VM whose RAM was just mapped from the checkpoint `base` (its
    /// full checkpoint's memory file `backing`), with no dirty log yet.
    pub fn restored(base: BaseRef, backing: Arc<MemoryFile>) -> Self {
        Tracking {
            dirty_logging: false,
            changes_in_pagemap: true,
            base: Some(base),
            backing: Some(Backing::new(backing)),
            carried: None,
            in_flight: None,
        }
    }

    /// The tracking of a VM whose RAM a pager fills on demand (a lazy restore): no base
    /// (pages the pager installed look written, so the first save is a full one), and a
    /// full save reads every page in `data_pages`, which the pager brings in.
    pub fn paged(data_pages: PageSet) -> Self {
        Tracking {
            backing: Some(Backing::pages(data_pages)),
            ..Default::default()
        }
    }

    /// Starts a save: what it collects from now on is given back by [`Tracking::roll_back`].
    pub fn begin_save(&mut self) {
        self.in_flight = Some(InFlight {
            collected: None,
            changes_in_pagemap: self.changes_in_pagemap,
        });
    }

    /// The save is durable: what it collected is in it (a diff) or behind it (a full save
    /// starts a new window), and `base` is the next diff's base.
    pub fn commit(&mut self, base: BaseRef) {
        self.in_flight = None;
        self.carried = None;
        self.base = Some(base);
    }

    /// The save failed: the pages it took out of the dirty log still changed since the
    /// (unchanged) base, so the next save includes them.
    pub fn roll_back(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            if let Some(pages) = &in_flight.collected {
                union_into(&mut self.carried, pages);
            }
            self.changes_in_pagemap = in_flight.changes_in_pagemap;
        }
    }

    /// A checkpoint was loaded into RAM (or RAM replaced): what changed before is moot.
    pub fn forget_changes(&mut self) {
        self.carried = None;
        self.in_flight = None;
        self.changes_in_pagemap = false;
    }

    /// Turns KVM's dirty log on (once).
    pub fn enable_dirty_logging(&mut self, machine: &Machine) -> Result<()> {
        if !self.dirty_logging {
            machine.vm.set_dirty_logging(&machine.memory, true)?;
            self.dirty_logging = true;
        }
        Ok(())
    }

    /// Pages changed since the last collection (and resets the window): KVM's dirty log
    /// and the VMM's bitmap. A save under way keeps them for [`Tracking::roll_back`].
    pub fn collect_dirty(&mut self, machine: &Machine) -> Result<PageSet> {
        let pages = memory_persist::collect_dirty(&machine.vm, &machine.memory)?;
        if let Some(in_flight) = &mut self.in_flight {
            union_into(&mut in_flight.collected, &pages);
        }
        Ok(pages)
    }

    /// Pages changed since the base (and resets the window): the dirty log, pages carried
    /// from failed saves, and right after a restore, before dirty logging was on, every
    /// page written since RAM was mapped from the base (read after logging starts, so
    /// nothing falls between the two).
    pub fn changes_since_base(&mut self, machine: &Machine) -> Result<PageSet> {
        self.enable_dirty_logging(machine)?;
        let mut pages = self.collect_dirty(machine)?;
        if let Some(carried) = &self.carried {
            pages.union(carried);
        }
        if self.changes_in_pagemap {
            pages.union(&memory_persist::written_since_mapped(&machine.memory)?);
            self.changes_in_pagemap = false;
        }
        Ok(pages)
    }

    /// Starts the next diff's window here (a full save): the dirty log is reset, and what
    /// it held is kept for [`Tracking::roll_back`] should the save fail.
    pub fn start_window(&mut self, machine: &Machine) -> Result<()> {
        self.enable_dirty_logging(machine)?;
        self.collect_dirty(machine)?;
        self.changes_in_pagemap = false;
        Ok(())
    }

    /// Pages a full save must look at: those faulted in, and those of a backing memory file.
    pub fn touched_pages(&self, machine: &Machine) -> Result<PageSet> {
        let mut pages = memory_persist::resident_pages(&machine.memory)?;
        if let Some(backing) = &self.backing {
            pages.union(backing.data_pages()?);
        }
        Ok(pages)
    }

    /// The base of an incremental save.
    pub fn incremental_base(&self) -> Result<BaseRef> {
        match (&self.base, self.dirty_logging || self.changes_in_pagemap) {
            (Some(base), true) => Ok(base.clone()),
            _ => Err(crate::Error::Config(
                "an incremental checkpoint needs a base: take a full checkpoint (or restore \
                 or revert to one) first"
                    .into(),
            )),
        }
    }
}
