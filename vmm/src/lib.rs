//! The snapvmm KVM micro-VMM: guest memory, vCPUs, boot, devices.
//!
//! ```no_run
//! use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
//! let mut config = VmConfig::new(BootSource::MicroGuest { workload: Workload::WriteVerify, seed: 1 });
//! config.disks.push(DiskConfig::new("disk.qcow2"));
//! let reason = vmm::run(&config)?;
//! assert!(reason.is_clean());
//! # Ok::<(), vmm::Error>(())
//! ```
//!
//! Layout, one module per concern (Firecracker style; what a checkpoint saves of each part
//! sits in a `persist.rs` beside it):
//! - [`agent`]: a qemu-ga client, to freeze guest filesystems around snapshots;
//! - [`memory`]: guest RAM with a dirty bitmap for the VMM's own writes;
//! - [`vm`], [`vcpu`], [`arch`]: KVM objects, CPUID, MSRs, registers, LAPIC, page tables;
//! - [`devices`]: the buses, serial console, i8042 reset, virtio-mmio and virtio-blk;
//! - [`guest`]: the micro-guest built from `vmm/guest/` and its boot info;
//! - [`control`]: the typed control layer, [`Control`]: one handle over a machine, its disks,
//!   its snapshot tree and its block jobs (the REST API, in `snapvmm-api`, maps onto it);
//! - [`sandbox`]: a running VM with its [`Control`], the entry point for embedding programs;
//! - [`console`]: the serial console as timestamped lines, for programs that drive a guest;
//! - [`builder`]: assembling a VM from a [`config::VmConfig`] (or a checkpoint) and running it;
//! - [`checkpoint`]: saving and loading the running VM (full, incremental, live, streams).

pub mod agent;
pub mod arch;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod confine;
pub mod console;
pub mod control;
pub mod devices;
pub mod error;
pub mod exit;
pub mod guest;
mod machine;
pub mod memory;
pub mod persist;
pub mod sandbox;
pub mod shell;
pub mod vcpu;
pub mod vm;

pub use builder::{run, AttachedDisk, Vmm};
pub use checkpoint::RestoreOptions;
pub use checkpoint::{CheckpointOptions, CheckpointReport, Checkpointer};
pub use control::{Control, ControlError, Machine};
pub use error::{Error, Result};
pub use exit::{ExitHandle, ExitReason};
pub use sandbox::{Sandbox, SandboxOptions};
pub use shell::{ShellPool, ShellShape, ShellSource, VmShell};
pub use snapshot;
pub use storage;
pub use vm::check_kvm;
pub use vm_memory;
