//! What a VM is made of, as the command line, a config file or an embedding program says.

use std::path::PathBuf;
use std::str::FromStr;

use storage::ImageFormat;

use crate::devices::virtio::block::device::{DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE};
pub use crate::devices::virtio::vsock::VsockConfig;
use crate::error::Error;

/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// What the vCPUs run.
    pub boot: BootSource,
    /// Disks, presented as virtio-blk devices in this order.
    pub disks: Vec<DiskConfig>,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// A virtio-vsock device (`--vsock cid=N,uds=PATH`), presented after the disks.
    pub vsock: Option<VsockConfig>,
}

impl VmConfig {
    /// A one-vCPU VM with default memory, no disks, console on stdout.
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            boot,
            disks: Vec::new(),
            serial: SerialOutput::Stdout,
            vsock: None,
        }
    }

    /// The name of disk `index`: its `id`, or vda, vdb, ... in order (as virsh shows them).
    pub fn disk_name(&self, index: usize) -> String {
        match self.disks.get(index).and_then(|d| d.id.clone()) {
            Some(id) => id,
            None => default_disk_name(index),
        }
    }
}

/// vda, vdb, ..., vdz, vdaa, vdab, ...: the Linux naming of the `index`th virtio disk.
pub fn default_disk_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// The micro-guest built into the VMM, running one workload.
    MicroGuest {
        /// The workload.
        workload: Workload,
        /// Seed of the data pattern the workload writes.
        seed: u64,
    },
    /// Restored from the checkpoint in this directory (see [`crate::Vmm::restore`]).
    Checkpoint(PathBuf),
    /// A Linux bzImage.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// An initramfs.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
}

/// The micro-guest's workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Prints `counter N` lines forever.
    Counter,
    /// Writes a seeded pattern over each disk, reads it back, prints `verify ok`, resets.
    WriteVerify,
    /// Verified random reads and writes without end; on [`crate::guest::request_finish`]
    /// it reads back and checks everything it wrote, prints `io-loop verify ok`, resets.
    IoLoop,
    /// Unverified 4 KiB random reads and writes on disk 0, reporting per 64 requests the
    /// TSC ticks they took and the longest one (`io-bench ops N ticks T max M`).
    IoBench,
    /// Writes a pattern over `seed` MiB of RAM (64 when 0) from 16 MiB on, prints
    /// `touch done mib N`, then prints `counter N` lines forever, reading every touched page
    /// between them: a known working set, for measuring what clones share.
    Touch,
    /// `io-loop` with a guest agent on the VM's vsock device (port
    /// [`crate::guest::AGENT_PORT`]) answering the qemu-ga subset the VMM uses; a freeze
    /// stops the disk writes until the thaw (DESIGN.md §11).
    Agent,
}

impl Workload {
    /// Every workload, with its name.
    pub const ALL: [(Workload, &'static str); 6] = [
        (Workload::Counter, "counter"),
        (Workload::WriteVerify, "write-verify"),
        (Workload::IoLoop, "io-loop"),
        (Workload::IoBench, "io-bench"),
        (Workload::Touch, "touch"),
        (Workload::Agent, "agent"),
    ];

    /// The number the micro-guest knows the workload by.
    pub fn code(self) -> u32 {
        match self {
            Workload::Counter => 1,
            Workload::WriteVerify => 2,
            Workload::IoLoop => 3,
            Workload::IoBench => 4,
            Workload::Touch => 5,
            Workload::Agent => 6,
        }
    }

    /// The workload's name ("write-verify").
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(w, _)| *w == self)
            .map(|(_, name)| *name)
            .unwrap_or("?")
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(w, _)| *w)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown workload {s:?} (counter, write-verify, io-loop, io-bench, touch, agent)"
                ))
            })
    }
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file (top of its chain).
    pub path: PathBuf,
    /// The image format; probed when `None`.
    pub format: Option<ImageFormat>,
    /// Present the disk read-only.
    pub read_only: bool,
    /// The disk's name instead of vdX.
    pub id: Option<String>,
    /// Request queues.
    pub num_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
}

impl DiskConfig {
    /// A writable disk on `path` with default queues.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            format: None,
            read_only: false,
            id: None,
            num_queues: DEFAULT_NUM_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

impl FromStr for DiskConfig {
    type Err = Error;

    /// Parses `path=FILE[,format=qcow2|raw][,readonly=on|off][,id=NAME][,queues=N][,queue_size=N]`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |message: String| Error::Config(format!("--disk {s:?}: {message}"));
        let mut disk = DiskConfig::new(PathBuf::new());
        let mut path = None;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key {
                "path" => path = Some(PathBuf::from(value)),
                "format" => {
                    disk.format = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("format {value:?}")))?,
                    )
                }
                "readonly" => {
                    disk.read_only = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(bad(format!("readonly={value} (on or off)"))),
                    }
                }
                "id" => {
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad(format!("id {value:?}")));
                    }
                    disk.id = Some(value.to_string())
                }
                "queues" => {
                    disk.num_queues = value.parse().map_err(|_| bad(format!("queues={value}")))?
                }
                "queue_size" => {
                    disk.queue_size = value
                        .parse()
                        .map_err(|_| bad(format!("queue_size={value}")))?
                }
                _ => return Err(bad(format!("unknown key {key:?}"))),
            }
        }
        disk.path = path.ok_or_else(|| bad("no path=".into()))?;
        Ok(disk)
    }
}

impl FromStr for VsockConfig {
    type Err = Error;

    /// Parses `cid=N,uds=PATH` (Firecracker's `guest_cid` and `uds_path`).
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |message: String| Error::Config(format!("--vsock {s:?}: {message}"));
        let mut cid = None;
        let mut uds = None;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key {
                "cid" => {
                    cid = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| bad(format!("cid={value}")))?,
                    )
                }
                "uds" if !value.is_empty() => uds = Some(PathBuf::from(value)),
                "uds" => return Err(bad("empty uds=".into())),
                _ => return Err(bad(format!("unknown key {key:?}"))),
            }
        }
        let guest_cid = cid.ok_or_else(|| bad("no cid=".into()))?;
        let min = crate::devices::virtio::vsock::device::MIN_GUEST_CID;
        if guest_cid < min || guest_cid > u64::from(u32::MAX) {
            return Err(bad(format!(
                "cid {guest_cid} (must be {min} to {})",
                u32::MAX
            )));
        }
        Ok(VsockConfig {
            guest_cid,
            uds: uds.ok_or_else(|| bad("no uds=".into()))?,
        })
    }
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    Null,
}

impl FromStr for SerialOutput {
    type Err = Error;

    /// `stdout`, `null`, or a file path.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "stdout" | "-" => SerialOutput::Stdout,
            "null" | "none" => SerialOutput::Null,
            "" => return Err(Error::Config("empty --serial".into())),
            path => SerialOutput::File(PathBuf::from(path)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(default_disk_name(0), "vda");
        assert_eq!(default_disk_name(25), "vdz");
        assert_eq!(default_disk_name(26), "vdaa");
        assert_eq!(default_disk_name(27), "vdab");
        let mut config = VmConfig::new(BootSource::MicroGuest {
            workload: Workload::Counter,
            seed: 0,
        });
        config.disks.push(DiskConfig::new("a"));
        config.disks.push("path=b,id=data".parse().unwrap());
        assert_eq!(config.disk_name(0), "vda");
        assert_eq!(config.disk_name(1), "data");
    }

    #[test]
    fn parses_disk_options() {
        let disk: DiskConfig = "path=/x.qcow2,format=qcow2,readonly=on,id=root,queues=2"
            .parse()
            .unwrap();
        assert_eq!(disk.path, PathBuf::from("/x.qcow2"));
        assert_eq!(disk.format, Some(ImageFormat::Qcow2));
        assert!(disk.read_only);
        assert_eq!(disk.id.as_deref(), Some("root"));
        assert_eq!(disk.num_queues, 2);
        for bad in [
            "format=raw",
            "path=a,readonly=maybe",
            "path=a,colour=red",
            "path=a,x",
            "path=a,id=",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_workloads() {
        for (workload, name) in Workload::ALL {
            assert_eq!(name.parse::<Workload>().unwrap(), workload);
            assert_eq!(workload.name(), name);
        }
        assert!("forever".parse::<Workload>().is_err());
    }

    #[test]
    fn parses_vsock_options() {
        let vsock: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(vsock.guest_cid, 3);
        assert_eq!(vsock.uds, PathBuf::from("/run/v.sock"));
        for bad in [
            "cid=3",
            "uds=/x",
            "cid=2,uds=/x",
            "cid=4294967296,uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=",
            "cid=3,uds=/x,port=1",
            "cid",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }
}
