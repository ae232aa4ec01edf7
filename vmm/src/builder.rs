//! Assembling a VM from a [`VmConfig`] and running it to its end.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use parking_lot::Mutex;
use snapshot::checkpoint::{PageSet, PAGE_SIZE};
use storage::LiveDisk;

use crate::arch::x86_64::layout::{self, BOOT_INFO_ADDR, SERIAL_GSI, SERIAL_PORT};
use crate::arch::x86_64::{acpi, linux, regs};
use crate::checkpoint::{
    Checkpointer, LoadedCheckpoint, MemorySource, RestoreOptions, RestoreTarget, Tracking,
};
use crate::config::{BootSource, DiskConfig, SerialOutput, VmConfig, MAX_VCPUS};
use crate::devices::bus::BusDevice;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_PORTS};
use crate::devices::legacy::{IgnoredPorts, IGNORED_PORT_RANGES};
use crate::devices::serial::{IrqTrigger, Serial, SERIAL_PORTS};
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vsock::{SharedVsock, Vsock};
use crate::devices::vmgenid::VmGenId;
use crate::error::{Error, Result};
use crate::exit::{ExitHandle, ExitReason};
use crate::guest::{self, GuestDevice};
use crate::machine::Machine;
pub use crate::machine::{AttachedDisk, AttachedVsock};
use crate::memory::uffd::{PageSource, Pager};
use crate::memory::{self, GuestMemoryMmap};
use crate::shell::ShellShape;
use crate::vcpu::{IoBuses, PauseGate, SharedVcpuFd, Vcpu, VcpuStart, VcpuThread};
use crate::vm::Vm;

/// How long a vCPU may take to leave `KVM_RUN` when the VM stops.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a restore's time goes: each step's duration as a debug event of target
/// `vmm::restore` (`SNAPVMM_LOG=vmm::restore=debug`), so a slow restore can be taken apart
/// without a profiler.
struct Steps {
    start: Instant,
    last: Instant,
}

impl Steps {
    fn new() -> Self {
        let now = Instant::now();
        Steps {
            start: now,
            last: now,
        }
    }

    /// Records that `what` just ended.
    fn done(&mut self, what: &str) {
        let now = Instant::now();
        tracing::debug!(
            target: "vmm::restore",
            "{what}: {} us (at {} us)",
            (now - self.last).as_micros(),
            (now - self.start).as_micros()
        );
        self.last = now;
    }
}

/// A running VM.
pub struct Vmm {
    // Field order is drop order: vCPUs are joined explicitly before any of these go.
    exit: ExitHandle,
    stop: Arc<AtomicBool>,
    vcpus: Vec<VcpuThread>,
    checkpointer: Arc<Checkpointer>,
    machine: Arc<Machine>,
    /// The userfaultfd pager filling guest RAM of a lazy restore; stopped after the rest.
    pager: Option<Pager>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("disks", &self.machine.disks)
            .finish_non_exhaustive()
    }
}

/// What [`assemble`] builds around guest RAM: everything but the vCPUs.
struct Assembled {
    vm: Vm,
    buses: IoBuses,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    attached: Vec<AttachedDisk>,
    serial: Arc<Mutex<Serial>>,
    /// The pager of a lazy restore's RAM (set by [`Vmm::restore_with`]).
    pager: Option<Pager>,
    vsock: Option<AttachedVsock>,
}

/// Checks the VM's shape and returns its memory size in bytes.
fn check_config(config: &VmConfig) -> Result<u64> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!(
            "{} vCPUs (1 to {MAX_VCPUS})",
            config.vcpus
        )));
    }
    config
        .memory_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| Error::Config(format!("{} MiB of memory", config.memory_mib)))
}

/// Creates the KVM VM over `memory` (or takes `vm`, a shell's, already over it) with its
/// serial console, i8042 and one virtio-blk device per disk of `config`.
fn assemble(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
    serial: Box<dyn Write + Send>,
    exit: &ExitHandle,
    tops: Option<Vec<Arc<dyn storage::BlockDevice>>>,
    vm: Option<Vm>,
) -> Result<Assembled> {
    let disks = match tops {
        None => open_disks(config)?,
        Some(tops) => {
            if tops.len() != config.disks.len() {
                return Err(Error::Config(format!(
                    "{} disk devices given for {} disks",
                    tops.len(),
                    config.disks.len()
                )));
            }
            tops.into_iter()
                .enumerate()
                .map(|(index, top)| {
                    let disk = &config.disks[index];
                    (LiveDisk::new(config.disk_name(index), top), disk.read_only)
                })
                .collect()
        }
    };
    let vm = match vm {
        Some(vm) => vm,
        None => Vm::new(memory)?,
    };

    let mut buses = IoBuses::default();
    let trigger = IrqTrigger::new()?;
    vm.fd()
        .register_irqfd(trigger.fd(), SERIAL_GSI)
        .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(Serial::new(trigger, serial)));
    buses
        .pio
        .insert(serial.clone(), SERIAL_PORT.into(), SERIAL_PORTS)
        .map_err(|o| Error::Config(format!("I/O range {:#x}+{} overlaps", o.base, o.len)))?;
    insert(
        &mut buses.pio,
        I8042::new(exit.clone()),
        I8042_BASE.into(),
        I8042_PORTS,
    )?;
    for &(port, count) in IGNORED_PORT_RANGES {
        insert(&mut buses.pio, IgnoredPorts, port.into(), count)?;
    }

    let mut devices = Vec::new();
    let mut attached = Vec::new();
    for (index, (disk, read_only)) in disks.into_iter().enumerate() {
        let disk_config = &config.disks[index];
        let name = disk.name().to_string();
        let gsi = layout::virtio_gsi(index).ok_or_else(|| {
            Error::Config(format!("too many devices: no interrupt left for {name}"))
        })?;
        let mmio_base = layout::virtio_mmio_window(index);
        let block = Block::new(
            BlockConfig {
                id: name.clone(),
                read_only,
                num_queues: disk_config.num_queues,
                queue_size: disk_config.queue_size,
            },
            disk.clone(),
        )?;
        let transport = MmioTransport::new(
            format!("virtio-blk {name}"),
            Box::new(block),
            memory.clone(),
        )?;
        let transport = plug_transport(&vm, &mut buses, transport, mmio_base, gsi)?;
        devices.push(transport);
        attached.push(AttachedDisk {
            name,
            disk,
            read_only,
            mmio_base,
            gsi,
        });
    }
    // The vsock comes after the disks, so the disks keep their windows and names.
    let vsock = match &config.vsock {
        Some(vsock_config) => {
            let index = devices.len();
            let gsi = layout::virtio_gsi(index).ok_or_else(|| {
                Error::Config("too many devices: no interrupt left for the vsock".into())
            })?;
            let mmio_base = layout::virtio_mmio_window(index);
            let (shared, device) = SharedVsock::new(Vsock::new(vsock_config.clone())?);
            let transport = MmioTransport::new(
                format!("virtio-vsock cid {}", vsock_config.guest_cid),
                Box::new(shared),
                memory.clone(),
            )?;
            let transport = plug_transport(&vm, &mut buses, transport, mmio_base, gsi)?;
            devices.push(transport.clone());
            Some(AttachedVsock {
                config: vsock_config.clone(),
                device,
                transport,
                mmio_base,
                gsi,
            })
        }
        None => None,
    };
    Ok(Assembled {
        vm,
        buses,
        devices,
        attached,
        serial,
        pager: None,
        vsock,
    })
}

/// Wires `transport` into the VM at `mmio_base`: its interrupt to `gsi`, its queue notify
/// register to ioeventfds, its window onto the MMIO bus.
fn plug_transport(
    vm: &Vm,
    buses: &mut IoBuses,
    transport: MmioTransport,
    mmio_base: u64,
    gsi: u32,
) -> Result<Arc<Mutex<MmioTransport>>> {
    let name = transport.name().to_string();
    vm.fd()
        .register_irqfd(transport.interrupt().irqfd(), gsi)
        .map_err(Error::kvm(format!("KVM_IRQFD ({name})")))?;
    for (queue, event) in transport.notify_events().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                event,
                &IoEventAddress::Mmio(mmio_base + QUEUE_NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(Error::kvm(format!("KVM_IOEVENTFD ({name} queue {queue})")))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    buses
        .mmio
        .insert(transport.clone(), mmio_base, layout::VIRTIO_MMIO_SIZE)
        .map_err(|o| Error::Config(format!("MMIO window {:#x} overlaps", o.base)))?;
    Ok(transport)
}

/// The virtio-mmio devices the guest is told about (boot info, ACPI): the disks, then the
/// vsock.
fn mmio_devices(assembled: &Assembled) -> Vec<(u64, u32)> {
    assembled
        .attached
        .iter()
        .map(|d| (d.mmio_base, d.gsi))
        .chain(assembled.vsock.iter().map(|v| (v.mmio_base, v.gsi)))
        .collect()
}

/// Opens the serial console's destination.
pub fn open_serial(output: &SerialOutput) -> Result<Box<dyn Write + Send>> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(std::io::LineWriter::new(
            std::fs::File::create(path).map_err(Error::io(format!(
                "creating serial output {}",
                path.display()
            )))?,
        )),
    })
}

/// Opens every disk of `config` as a live disk, in order.
pub fn open_disks(config: &VmConfig) -> Result<Vec<(Arc<LiveDisk>, bool)>> {
    let mut disks = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        disks.push((open_disk(&config.disk_name(index), disk)?, disk.read_only));
    }
    Ok(disks)
}

/// Opens the image chain of `disk` as a live disk called `name`.
pub fn open_disk(name: &str, disk: &DiskConfig) -> Result<Arc<LiveDisk>> {
    let options = storage::OpenOptions {
        read_only: disk.read_only,
        format: disk.format,
        ..Default::default()
    };
    let top = storage::open(&disk.path, &options).map_err(|source| Error::Disk {
        name: name.to_string(),
        path: disk.path.clone(),
        source,
    })?;
    if !disk.read_only && top.format_probed() {
        // QEMU's warning, for the same reason: a guest writing a header into a probed raw
        // image could turn it into an overlay of any host file at the next start. Storage
        // refuses such writes; the user should say what the image is.
        tracing::warn!(
            "disk {name}: the format of {} was probed ({}); give format= explicitly for a writable \
             disk (writes that would change what the image probes as are refused)",
            disk.path.display(),
            top.info()
                .format
                .map(|f| format!("{f:?}").to_lowercase())
                .unwrap_or_else(|| "unknown".into())
        );
    }
    Ok(LiveDisk::new(name, top))
}

impl Vmm {
    /// Builds the VM `config` describes and starts its vCPUs, sending the console to
    /// `config.serial`.
    pub fn start(config: &VmConfig) -> Result<Self> {
        let serial = open_serial(&config.serial)?;
        Self::start_with_serial(config, serial)
    }

    /// As [`Vmm::start`], with the console going to `serial`.
    pub fn start_with_serial(config: &VmConfig, serial: Box<dyn Write + Send>) -> Result<Self> {
        Self::boot(config, serial, false)
    }

    /// As [`Vmm::start`], but the vCPUs wait for [`PauseGate::resume`] before running a
    /// single guest instruction: a caller checks what must hold before the guest may touch
    /// its disks (a snapshot tree refusing an image a snapshot froze), then lets it run.
    pub fn start_paused(config: &VmConfig) -> Result<Self> {
        Self::boot(config, open_serial(&config.serial)?, true)
    }

    /// Builds the VM `config` describes and starts its vCPU threads, held at the pause gate
    /// when `paused`.
    fn boot(config: &VmConfig, serial: Box<dyn Write + Send>, paused: bool) -> Result<Self> {
        let memory_bytes = check_config(config)?;
        if matches!(config.boot, BootSource::MicroGuest { .. }) && memory_bytes < guest::MIN_MEMORY
        {
            return Err(Error::Config(format!(
                "the micro-guest needs at least {} MiB of memory",
                guest::MIN_MEMORY >> 20
            )));
        }
        let memory = memory::create(memory_bytes)?;
        let exit = ExitHandle::new()?;
        let assembled = assemble(config, &memory, serial, &exit, None, None)?;
        let mmio = mmio_devices(&assembled);

        regs::write_boot_tables(&memory)?;
        // A fresh generation for a fresh VM (a restore writes its own in the load).
        VmGenId::default().regenerate(&memory)?;
        let starts = match &config.boot {
            BootSource::MicroGuest { workload, seed } => {
                let guest_devices: Vec<GuestDevice> = mmio
                    .iter()
                    .map(|&(mmio_base, gsi)| GuestDevice { mmio_base, gsi })
                    .collect();
                let entry = guest::load(&memory, *workload, *seed, config.vcpus, &guest_devices)?;
                // Every vCPU enters the micro-guest directly; it picks a stack by index.
                (0..config.vcpus)
                    .map(|i| {
                        VcpuStart::LongMode(regs::entry_regs(
                            entry,
                            0,
                            u64::from(i),
                            BOOT_INFO_ADDR,
                        ))
                    })
                    .collect::<Vec<_>>()
            }
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let acpi_devices: Vec<acpi::MmioDevice> = mmio
                    .iter()
                    .map(|&(mmio_base, gsi)| acpi::MmioDevice { mmio_base, gsi })
                    .collect();
                let rsdp = acpi::create_tables(&memory, config.vcpus, &acpi_devices)?;
                let loaded = linux::load(
                    &memory,
                    memory_bytes,
                    kernel,
                    initrd.as_deref(),
                    cmdline,
                    rsdp,
                )?;
                // The boot vCPU enters the kernel; the others wait for its INIT/SIPI.
                std::iter::once(VcpuStart::LongMode(loaded.boot_regs()))
                    .chain((1..config.vcpus).map(|_| VcpuStart::WaitForSipi))
                    .collect()
            }
            BootSource::Checkpoint(dir) => {
                return Err(Error::Config(format!(
                    "{} is a checkpoint: restore it with Vmm::restore",
                    dir.display()
                )))
            }
        };

        let cpuid = assembled.vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for (index, start) in starts.iter().enumerate() {
            vcpus.push(Vcpu::new(
                &assembled.vm,
                &cpuid,
                index as u8,
                config.vcpus,
                start,
            )?);
        }
        Self::launch(
            config.clone(),
            memory,
            assembled,
            vcpus,
            exit,
            paused,
            Tracking::default(),
        )
    }

    /// Builds a VM from the checkpoint in `dir` (a full one or the top of a diff chain) and
    /// starts it where the checkpoint left it; the console goes to `serial`. Guest RAM maps
    /// the full checkpoint's memory file `MAP_PRIVATE`, so nothing is read until touched.
    /// With `paused`, the vCPUs wait for [`PauseGate::resume`].
    pub fn restore(dir: &Path, serial: Box<dyn Write + Send>, paused: bool) -> Result<Self> {
        Self::restore_with(dir, serial, paused, RestoreOptions::default())
    }

    /// As [`Vmm::restore`], with guest memory and disks from where `options` says: a
    /// [`MemorySource::Pager`] registers guest RAM with a userfaultfd pager (started before
    /// anything touches RAM) instead of mapping memory files; `disk_tops` opens disks on
    /// other images than the saved ones (a clone's overlays); a shell
    /// ([`RestoreOptions::shell`]) supplies the KVM VM, its RAM and vCPUs ready-made.
    /// A restored vsock device has dropped every connection of the VM checkpointed and
    /// tells the guest so (a transport reset event).
    pub fn restore_with(
        dir: &Path,
        serial: Box<dyn Write + Send>,
        paused: bool,
        options: RestoreOptions,
    ) -> Result<Self> {
        let mut steps = Steps::new();
        let paged = match &options.memory {
            MemorySource::Files => None,
            MemorySource::Pager { source, .. } => Some(paged_data_pages(dir, source.as_ref())?),
        };
        let loaded = LoadedCheckpoint::open_with(dir, paged)?;
        steps.done("checkpoint read");
        let mut config = loaded.config()?;
        options.apply(&mut config)?;
        if let (Some(vsock), Some(uds)) = (config.vsock.as_mut(), &options.vsock_uds) {
            vsock.uds = uds.clone();
        }
        let memory_bytes = check_config(&config)?;
        // A shell's RAM already has KVM's slot on it: mapping the memory file over it in
        // place finds no shadow pages to drop (see `crate::shell`).
        let (memory, vm, shell_vcpus) = match options.shell.take(ShellShape::of(&config)) {
            Some(shell) => {
                let (memory, vm, vcpus) = shell.into_parts(ShellShape::of(&config))?;
                (memory, Some(vm), vcpus)
            }
            None => (memory::create(memory_bytes)?, None, Vec::new()),
        };
        memory::persist::check_layout(&memory, &loaded.layout())
            .map_err(|e| Error::Config(format!("checkpoint {}: {e}", dir.display())))?;
        // Without a shell, the memory file is mapped over RAM before KVM has a slot on it
        // (see `LoadedCheckpoint::load_memory`); this RAM is the restore's own until it
        // succeeds.
        loaded.load_memory(&memory)?;
        steps.done("RAM mapped, memory loaded");
        let exit = ExitHandle::new()?;
        let pager = match options.memory {
            MemorySource::Files => None,
            MemorySource::Pager { source, prefetch } => {
                Some(Pager::start(&memory, source, prefetch, exit.clone())?)
            }
        };
        // No dirty log yet: the first incremental checkpoint finds what the guest wrote since
        // the restore in the pagemap (see `memory::persist::written_since_mapped`).
        let from_shell = vm.is_some();
        let mut assembled = assemble(&config, &memory, serial, &exit, options.disks, vm)?;
        steps.done("KVM VM and devices built");
        assembled.pager = pager;
        let mut vcpus = shell_vcpus;
        if !from_shell {
            for index in 0..config.vcpus {
                vcpus.push(Vcpu::create_bare(&assembled.vm, index)?);
            }
        }
        steps.done("vCPUs created");
        let shared: Vec<SharedVcpuFd> = vcpus.iter().map(Vcpu::shared_fd).collect();
        loaded.apply_new(
            &assembled.attached,
            RestoreTarget {
                vm: &assembled.vm,
                vcpus: &shared,
                devices: &assembled.devices,
                serial: &assembled.serial,
                memory: &memory,
                // The new VM's device sits where every VM's does (assembled the same way).
                vmgenid: &VmGenId::default(),
                vsock: assembled.vsock.as_ref(),
            },
        )?;
        steps.done("state loaded");
        let tracking = loaded.tracking()?;
        // The devices restart before the vCPUs run; a failure stops the vCPUs again.
        for device in &assembled.devices {
            device.lock().resume()?;
        }
        steps.done("devices resumed");
        let vmm = Self::launch(config, memory, assembled, vcpus, exit, paused, tracking)?;
        steps.done("vCPU threads started");
        Ok(vmm)
    }

    /// Starts the vCPU threads of an assembled VM.
    fn launch(
        config: VmConfig,
        memory: GuestMemoryMmap,
        assembled: Assembled,
        vcpus: Vec<Vcpu>,
        exit: ExitHandle,
        paused: bool,
        tracking: Tracking,
    ) -> Result<Self> {
        let Assembled {
            vm,
            buses,
            devices,
            attached,
            serial,
            pager,
            vsock,
        } = assembled;
        let msr_list = crate::vcpu::persist::msr_list(vm.kvm())?;
        let shared: Vec<SharedVcpuFd> = vcpus.iter().map(Vcpu::shared_fd).collect();
        let buses = Arc::new(buses);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::new());
        if paused {
            pause.close();
        }
        let mut threads = Vec::new();
        for vcpu in vcpus {
            match vcpu.start(buses.clone(), exit.clone(), stop.clone(), pause.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    pause.forget_threads();
                    for thread in threads {
                        let _ = thread.stop(VCPU_STOP_TIMEOUT);
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(
            "VM started: {} vCPU(s), {} MiB, {} disk(s)",
            config.vcpus,
            config.memory_mib,
            attached.len()
        );
        let machine = Arc::new(Machine {
            vm,
            memory,
            vcpus: shared,
            devices,
            serial,
            disks: attached,
            vsock,
            config,
            gate: pause,
            msr_list,
            vmgenid: VmGenId::default(),
        });
        Ok(Vmm {
            exit,
            stop,
            vcpus: threads,
            checkpointer: Arc::new(Checkpointer::new(machine.clone(), tracking)),
            machine,
            pager,
        })
    }

    /// The userfaultfd pager of a lazy restore, if this VM has one.
    pub fn pager(&self) -> Option<&Pager> {
        self.pager.as_ref()
    }

    /// The VM's checkpoint engine: save, revert, live and incremental checkpoints; it is
    /// also the [`snapshot::vm_state::VmState`] the snapshot tree drives.
    pub fn checkpointer(&self) -> Arc<Checkpointer> {
        self.checkpointer.clone()
    }

    /// A handle that ends the VM when asked (from a signal handler thread, the API, ...).
    pub fn exit_handle(&self) -> ExitHandle {
        self.exit.clone()
    }

    /// The gate that pauses and resumes the vCPUs.
    pub fn pause_gate(&self) -> Arc<PauseGate> {
        self.machine.gate.clone()
    }

    /// The VM's disks, in device order.
    pub fn disks(&self) -> &[AttachedDisk] {
        &self.machine.disks
    }

    /// The VM's vsock device, if it has one.
    pub fn vsock(&self) -> Option<&AttachedVsock> {
        self.machine.vsock.as_ref()
    }

    /// What the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.machine.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.machine.memory
    }

    /// Waits for the VM to end, then tears it down: vCPUs stopped, device queues drained,
    /// disks flushed.
    pub fn wait(self) -> Result<ExitReason> {
        let reason = self.exit.wait();
        self.shutdown()?;
        Ok(reason)
    }

    /// Stops the VM now.
    pub fn stop(self) -> Result<ExitReason> {
        self.exit.request(ExitReason::Stopped);
        self.wait()
    }

    fn shutdown(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        self.machine.gate.forget_threads();
        let mut first_error = None;
        for vcpu in self.vcpus.drain(..) {
            if let Err(e) = vcpu.stop(VCPU_STOP_TIMEOUT) {
                first_error.get_or_insert(e);
            }
        }
        // Stop each device's queue workers once their requests complete; only then is a
        // flush final.
        for device in &self.machine.devices {
            device.lock().shutdown();
        }
        for disk in &self.machine.disks {
            if disk.read_only {
                continue;
            }
            if let Err(source) = disk.disk.flush() {
                first_error.get_or_insert(Error::Disk {
                    name: disk.name.clone(),
                    path: disk.disk.top().path().to_path_buf(),
                    source,
                });
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn insert(
    bus: &mut crate::devices::bus::Bus,
    device: impl BusDevice + 'static,
    base: u64,
    len: u64,
) -> Result<()> {
    bus.insert(Arc::new(Mutex::new(device)), base, len)
        .map_err(|o| Error::Config(format!("I/O range {:#x}+{} overlaps", o.base, o.len)))
}

/// The pages of a checkpoint's memory that `source` holds data for (its non-zero chunks).
fn paged_data_pages(dir: &Path, source: &dyn PageSource) -> Result<PageSet> {
    let manifest = snapshot::checkpoint::state_file::read(&snapshot::checkpoint::state_path(dir))?;
    let total = manifest.memory.total_pages();
    let pages_per_chunk = source.chunk_size() / PAGE_SIZE;
    let mut pages = PageSet::new(total);
    if pages_per_chunk == 0 {
        return Err(Error::Memory(format!(
            "page source chunk size {} is smaller than a page",
            source.chunk_size()
        )));
    }
    for chunk in 0..total.div_ceil(pages_per_chunk) {
        if !source.is_zero_chunk(chunk) {
            let first = chunk * pages_per_chunk;
            pages.insert_range(first, pages_per_chunk.min(total - first));
        }
    }
    Ok(pages)
}

/// Builds and runs the VM until it ends.
pub fn run(config: &VmConfig) -> Result<ExitReason> {
    Vmm::start(config)?.wait()
}
