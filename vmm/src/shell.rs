//! Empty VMs built ahead of time, so an in-process restore skips most of KVM's set-up.
//!
//! A restore's KVM ioctls alone cost about a millisecond on a shadow-paging host (DESIGN
//! §5.6): creating the VM, registering a memory slot (whose rmap arrays KVM allocates
//! eagerly, in proportion to RAM), the irqchip, the PIT and the vCPU fds. None of it depends
//! on the checkpoint beyond its memory size and vCPU count, so a [`VmShell`] does all of it
//! before the checkpoint is known: a KVM VM with one slot per region over reserved, untouched
//! anonymous RAM of the size class, its TSS, irqchip, PIT and bare vCPU fds. A restore then
//! maps the checkpoint's memory file over that RAM in place (`MAP_FIXED`, same addresses, so
//! the slot stays valid); KVM's MMU notifier fires on the replaced range, but on a slot no
//! vCPU has ever run on it finds no shadow pages, which is far cheaper than registering the
//! slot afresh. A [`ShellPool`] keeps a bounded number of shells per shape ready and refills
//! on a background thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::{VmConfig, MAX_VCPUS};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// Most shells a pool keeps ready per shape: each holds a KVM VM, a slot's kernel arrays
/// and a reservation of guest-sized address space, so the bound keeps a misconfigured
/// pool from exhausting the host.
pub const MAX_SHELLS_PER_SHAPE: usize = 64;

/// How long the refill thread waits after failing to build a shell before trying again
/// (a host out of memory or KVM VMs should not be hammered).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The size class a shell fits: a checkpoint restores into a shell only when both match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShellShape {
    /// Guest memory in MiB (a positive multiple of 2).
    pub memory_mib: u64,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u8,
}

impl ShellShape {
    /// The shape of the VM `config` describes.
    pub fn of(config: &VmConfig) -> ShellShape {
        ShellShape {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
        }
    }

    /// Checks the shape can be built, returning its memory size in bytes.
    fn check(self) -> Result<u64> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "shell of {} vCPUs (1 to {MAX_VCPUS})",
                self.vcpus
            )));
        }
        self.memory_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::Config(format!("shell of {} MiB", self.memory_mib)))
    }
}

impl std::fmt::Display for ShellShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB, {} vCPU(s)", self.memory_mib, self.vcpus)
    }
}

/// A KVM VM built before its checkpoint is known: memory slots over untouched RAM, TSS,
/// irqchip, PIT and bare vCPUs. Consumed by the one restore that uses it
/// ([`crate::RestoreOptions::shell`]); dropping an unused shell closes its VM.
pub struct VmShell {
    shape: ShellShape,
    // Field order is drop order: the vCPU fds, then the VM, then the RAM its slots point at.
    vcpus: Vec<Vcpu>,
    vm: Vm,
    memory: GuestMemoryMmap,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl VmShell {
    /// Builds a shell of `shape`. The order is the cold restore's (VM, slot, irqchip, PIT,
    /// then vCPUs): the slot goes on before the interrupt controllers, the order measured
    /// fastest.
    pub fn new(shape: ShellShape) -> Result<VmShell> {
        let bytes = shape.check()?;
        let memory = memory::create(bytes)?;
        let vm = Vm::new(&memory)?;
        // Each vCPU gets the CPUID a VM booted on this host gives it, which is what its
        // checkpoints saved: the restore then finds it set (see `vcpu::persist`).
        let cpuid = vm.supported_cpuid()?;
        let vcpus = (0..shape.vcpus)
            .map(|index| Vcpu::create_with_cpuid(&vm, &cpuid, index, shape.vcpus))
            .collect::<Result<Vec<_>>>()?;
        Ok(VmShell {
            shape,
            vcpus,
            vm,
            memory,
        })
    }

    /// The size class this shell fits.
    pub fn shape(&self) -> ShellShape {
        self.shape
    }

    /// Takes the shell apart for a restore of a VM shaped `want`; a shell of another shape
    /// is refused (never used for a VM it does not fit).
    pub(crate) fn into_parts(self, want: ShellShape) -> Result<(GuestMemoryMmap, Vm, Vec<Vcpu>)> {
        if self.shape != want {
            return Err(Error::Config(format!(
                "the VM shell holds {}, the checkpoint needs {want}",
                self.shape
            )));
        }
        Ok((self.memory, self.vm, self.vcpus))
    }
}

/// Where a restore gets its VM shell from ([`crate::RestoreOptions::shell`]).
#[derive(Debug, Default)]
pub enum ShellSource {
    /// No shell: the restore builds its VM itself (a cold restore).
    #[default]
    None,
    /// This shell, which must fit the checkpoint: a mismatch fails the restore.
    Shell(VmShell),
    /// A ready shell of the checkpoint's shape from this pool; when none is ready the
    /// restore builds its VM itself.
    Pool(Arc<ShellPool>),
}

impl ShellSource {
    /// The shell for a VM shaped `want`, if the source has one (an empty pool has none).
    pub(crate) fn take(self, want: ShellShape) -> Option<VmShell> {
        match self {
            ShellSource::None => None,
            // Its shape is checked where it is taken apart (`VmShell::into_parts`).
            ShellSource::Shell(shell) => Some(shell),
            ShellSource::Pool(pool) => {
                let shell = pool.take(want);
                if shell.is_none() {
                    tracing::debug!(
                        target: "vmm::restore",
                        "no VM shell of {want} ready: building the VM cold"
                    );
                }
                shell
            }
        }
    }
}

/// What a pool has done so far, for reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShellPoolStats {
    /// Shells built by the refill thread.
    pub built: u64,
    /// Shells handed out to restores.
    pub taken: u64,
    /// Time spent building the shells built, in total.
    pub build_time: Duration,
    /// The last build failure, if any (the thread retries after a pause).
    pub last_error: Option<String>,
}

/// One shape's shells.
struct Class {
    shape: ShellShape,
    target: usize,
    ready: VecDeque<VmShell>,
}

struct State {
    classes: Vec<Class>,
    stop: bool,
    stats: ShellPoolStats,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a shell is taken (the refiller wakes), built (waiters wake) or the
    /// pool stops.
    changed: Condvar,
}

/// Keeps up to a set number of [`VmShell`]s ready per shape, built and refilled by one
/// background thread; dropping the pool stops the thread and closes every unused shell.
pub struct ShellPool {
    shared: Arc<Shared>,
    refill: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShellPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock();
        let mut list = f.debug_list();
        for class in &state.classes {
            list.entry(&(class.shape, class.ready.len(), class.target));
        }
        list.finish()
    }
}

impl ShellPool {
    /// A pool keeping `count` shells of each shape ready (at most [`MAX_SHELLS_PER_SHAPE`]);
    /// the refill thread starts building at once.
    pub fn new(shapes: &[(ShellShape, usize)]) -> Result<ShellPool> {
        let mut classes: Vec<Class> = Vec::new();
        for &(shape, count) in shapes {
            shape.check()?;
            if count == 0 || count > MAX_SHELLS_PER_SHAPE {
                return Err(Error::Config(format!(
                    "{count} shells of {shape} (1 to {MAX_SHELLS_PER_SHAPE})"
                )));
            }
            if classes.iter().any(|c| c.shape == shape) {
                return Err(Error::Config(format!("shell shape {shape} given twice")));
            }
            classes.push(Class {
                shape,
                target: count,
                ready: VecDeque::new(),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                classes,
                stop: false,
                stats: ShellPoolStats::default(),
            }),
            changed: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let refill = std::thread::Builder::new()
            .name("shell-pool".into())
            .spawn(move || refill(&thread_shared))
            .map_err(Error::io("spawning the VM shell pool's thread"))?;
        Ok(ShellPool {
            shared,
            refill: Some(refill),
        })
    }

    /// A ready shell of `shape`, if there is one; the refill thread builds its replacement.
    pub fn take(&self, shape: ShellShape) -> Option<VmShell> {
        let mut state = self.shared.state.lock();
        let shell = state
            .classes
            .iter_mut()
            .find(|c| c.shape == shape)?
            .ready
            .pop_front()?;
        state.stats.taken += 1;
        drop(state);
        self.shared.changed.notify_all();
        Some(shell)
    }

    /// How many shells of `shape` are ready now.
    pub fn ready(&self, shape: ShellShape) -> usize {
        let state = self.shared.state.lock();
        state
            .classes
            .iter()
            .find(|c| c.shape == shape)
            .map_or(0, |c| c.ready.len())
    }

    /// Waits until every shape has its full count ready; false if `timeout` passed first.
    /// For callers that want the refill finished before timing (benches) or starting.
    pub fn wait_full(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock();
        while !state.classes.iter().all(|c| c.ready.len() >= c.target) {
            if self
                .shared
                .changed
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return state.classes.iter().all(|c| c.ready.len() >= c.target);
            }
        }
        true
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> ShellPoolStats {
        self.shared.state.lock().stats.clone()
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.refill.take() {
            // The thread ends after the shell it may be building; a panic there has
            // nothing left to clean up.
            let _ = thread.join();
        }
        // The ready shells go with `shared`'s state when the last reference drops.
    }
}

/// The refill thread: builds one shell at a time for the first shape short of its count,
/// and sleeps when every shape is full.
fn refill(shared: &Shared) {
    let mut state = shared.state.lock();
    loop {
        if state.stop {
            return;
        }
        let Some(shape) = state
            .classes
            .iter()
            .find(|c| c.ready.len() < c.target)
            .map(|c| c.shape)
        else {
            shared.changed.wait(&mut state);
            continue;
        };
        drop(state);
        let start = Instant::now();
        let built = VmShell::new(shape);
        let took = start.elapsed();
        state = shared.state.lock();
        match built {
            Ok(shell) => {
                state.stats.built += 1;
                state.stats.build_time += took;
                if let Some(class) = state.classes.iter_mut().find(|c| c.shape == shape) {
                    class.ready.push_back(shell);
                }
                shared.changed.notify_all();
            }
            Err(e) => {
                tracing::warn!("building a VM shell of {shape}: {e}");
                state.stats.last_error = Some(e.to_string());
                shared.changed.notify_all();
                let _ = shared.changed.wait_for(&mut state, RETRY_AFTER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_shapes_and_counts() {
        let shape = ShellShape {
            memory_mib: 4,
            vcpus: 1,
        };
        assert!(ShellPool::new(&[(shape, 0)]).is_err());
        assert!(ShellPool::new(&[(shape, MAX_SHELLS_PER_SHAPE + 1)]).is_err());
        assert!(ShellPool::new(&[(shape, 1), (shape, 2)]).is_err());
        let no_vcpus = ShellShape { vcpus: 0, ..shape };
        assert!(ShellPool::new(&[(no_vcpus, 1)]).is_err());
        assert!(VmShell::new(no_vcpus).is_err());
    }

    #[test]
    fn a_pool_fills_hands_out_and_refills() {
        if let Err(reason) = crate::vm::check_kvm() {
            assert!(
                std::env::var_os("SNAPVMM_REQUIRE_KVM").is_none(),
                "KVM required: {reason}"
            );
            return;
        }
        let small = ShellShape {
            memory_mib: 4,
            vcpus: 1,
        };
        let other = ShellShape {
            memory_mib: 8,
            vcpus: 2,
        };
        let pool = ShellPool::new(&[(small, 2), (other, 1)]).unwrap();
        assert!(pool.wait_full(Duration::from_secs(10)));
        assert_eq!(pool.ready(small), 2);
        let shell = pool.take(small).unwrap();
        assert_eq!(shell.shape(), small);
        // A shape the pool does not keep is never handed out.
        assert!(pool
            .take(ShellShape {
                memory_mib: 4,
                vcpus: 2
            })
            .is_none());
        // A shell refuses a VM of another shape.
        assert!(shell.into_parts(other).is_err());
        assert!(pool.wait_full(Duration::from_secs(10)));
        let stats = pool.stats();
        assert_eq!(stats.taken, 1);
        assert_eq!(stats.built, 4);
        assert_eq!(stats.last_error, None);
    }
}
