//! Firecracker's snapshot create and load, measured in the same run as snapvmm's checkpoint
//! figures when `--firecracker PATH` names a Firecracker binary.
//!
//! Firecracker boots a guest of its own: a 4 KiB ELF written here whose one vCPU increments
//! a counter forever (Firecracker loads an ELF kernel at its physical address and enters it
//! in 64-bit mode). It touches one page, like the counter micro-guest snapvmm's idle save
//! uses, so both save a guest of the same memory size with the same few pages touched; a
//! Linux kernel could not boot on every host (software KVM), the spin loop can.
//!
//! - create: `PUT /snapshot/create` (full snapshot) of the paused VM, then fsync of the two
//!   files it wrote (snapvmm's save includes its fsync; Firecracker leaves it to the page
//!   cache);
//! - load: exec of a new Firecracker process until `PUT /snapshot/load` with
//!   `resume_vm: true` has answered, the counterpart of snapvmm's whole-process restore
//!   (exec until the API answers with the VM running).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapvmm_api::ApiClient;

use super::model::{Figure, Status};
use super::Bench;

const FAMILY: &str = "Checkpoints";
/// How long Firecracker may take to open its API socket or to answer a request.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Guest-physical address the spin guest is loaded at and entered (Firecracker's floor for
/// an ELF kernel is 1 MiB).
const LOAD_ADDRESS: u64 = 0x10_0000;
/// The spin loop: `inc qword [0x200000]; jmp back`.
const SPIN_CODE: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0xeb, 0xf6];

/// Measures Firecracker's snapshot create and load for every memory size, or records why
/// not.
pub fn run(bench: &mut Bench) {
    let sizes = bench.memory_mib.clone();
    for mib in sizes {
        let [create, load] = figures(mib);
        let Some(binary) = bench.firecracker.clone() else {
            for fig in [create, load] {
                bench.unmeasured(fig, Status::NotInstalled, "--firecracker PATH not given");
            }
            continue;
        };
        if let Err(reason) = vmm::check_kvm() {
            for fig in [create, load] {
                bench.unmeasured(fig, Status::Skipped, format!("KVM unusable: {reason}"));
            }
            continue;
        }
        bench.step(format!(
            "Firecracker snapshot create and load, {mib} MiB guest"
        ));
        let dir = bench.dir.join(format!("firecracker-{mib}"));
        let count = bench.samples(3, 10);
        let snapshot = prepare(&dir).and_then(|kernel| {
            let vm = Firecracker::boot(&binary, &dir, &kernel, mib)?;
            let samples = (0..count)
                .map(|_| vm.snapshot(&dir))
                .collect::<Result<Vec<f64>, String>>()?;
            Ok(samples)
        });
        let loads = match &snapshot {
            Ok(_) => (0..count).map(|n| load_process(&binary, &dir, n)).collect(),
            Err(e) => Err(format!("no snapshot to load: {e}")),
        };
        bench.record(create, snapshot);
        bench.record(load, loads);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The two figures of one memory size.
fn figures(mib: u64) -> [Figure; 2] {
    let new = |op: &str, label: &str, what: String| {
        Figure::new(
            &format!("firecracker.snapshot_{op}.{mib}"),
            FAMILY,
            &format!("{label}, {mib} MiB"),
            "Firecracker",
            "ms",
        )
        .what(what)
        .param(mib as f64)
    };
    [
        new(
            "create",
            "Firecracker snapshot create",
            format!(
                "Full snapshot (PUT /snapshot/create) of a paused {mib} MiB Firecracker \
                 micro-VM whose guest touched one page, then fsync of the snapshot and \
                 memory files"
            ),
        ),
        new(
            "load",
            "Firecracker snapshot load",
            format!(
                "Exec of a new Firecracker process until PUT /snapshot/load of a {mib} MiB \
                 snapshot with resume_vm has answered"
            ),
        ),
    ]
}

/// Makes `dir` and writes the spin guest into it; returns the guest's path.
fn prepare(dir: &Path) -> Result<PathBuf, String> {
    super::images::fresh_dir(dir)?;
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, spin_elf()).map_err(|e| format!("{}: {e}", kernel.display()))?;
    Ok(kernel)
}

/// A minimal ELF64 executable: one loadable segment holding [`SPIN_CODE`] at
/// [`LOAD_ADDRESS`], entered at its first byte.
fn spin_elf() -> Vec<u8> {
    const HEADER: u16 = 64;
    const PHDR: u16 = 56;
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::with_capacity(CODE_OFFSET as usize + SPIN_CODE.len());
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(HEADER).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [HEADER, PHDR, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let size = SPIN_CODE.len() as u64;
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: read + execute
    for word in [CODE_OFFSET, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(&SPIN_CODE);
    elf
}

/// A Firecracker process and its API; killed when dropped.
struct Firecracker {
    child: Child,
    api: ApiClient,
    socket: PathBuf,
}

impl Firecracker {
    /// Starts Firecracker with its API on `socket` and waits until the API answers.
    fn start(binary: &Path, socket: &Path) -> Result<Firecracker, String> {
        let _ = std::fs::remove_file(socket);
        let api = ApiClient::new(socket).map_err(|e| format!("API client runtime: {e}"))?;
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(socket)
            .args(["--level", "Error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut vm = Firecracker {
            child,
            api,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while vm.api.raw("GET", "/", &[]).is_err() {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(format!("{} exited early: {status}", binary.display()));
            }
            if start.elapsed() > TIMEOUT {
                return Err(format!("Firecracker's API did not answer in {TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(vm)
    }

    /// Boots the spin guest with `mib` MiB of memory and one vCPU.
    fn boot(binary: &Path, dir: &Path, kernel: &Path, mib: u64) -> Result<Firecracker, String> {
        let vm = Firecracker::start(binary, &dir.join("fc.sock"))?;
        let boot = serde_json::json!({ "kernel_image_path": kernel, "boot_args": "" });
        vm.request("PUT", "/boot-source", &boot)?;
        let machine = serde_json::json!({ "vcpu_count": 1, "mem_size_mib": mib });
        vm.request("PUT", "/machine-config", &machine)?;
        let start = serde_json::json!({ "action_type": "InstanceStart" });
        vm.request("PUT", "/actions", &start)?;
        Ok(vm)
    }

    /// One request with a JSON body; an answer other than 2xx is an error naming it.
    fn request(&self, method: &str, path: &str, body: &serde_json::Value) -> Result<(), String> {
        let body = body.to_string();
        let answer = self
            .api
            .raw(method, path, body.as_bytes())
            .map_err(|e| format!("Firecracker {method} {path}: {e}"))?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(format!(
                "Firecracker {method} {path} answered {}: {}",
                answer.status, answer.body
            ))
        }
    }

    /// Pauses, takes a full snapshot into `dir` (replacing the last one) and resumes; ms
    /// from the create request to both files being on disk.
    fn snapshot(&self, dir: &Path) -> Result<f64, String> {
        let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
        for file in [&state, &memory] {
            let _ = std::fs::remove_file(file);
        }
        super::tools::sync();
        self.request("PATCH", "/vm", &serde_json::json!({ "state": "Paused" }))?;
        let create = serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": state,
            "mem_file_path": memory,
        });
        let start = Instant::now();
        self.request("PUT", "/snapshot/create", &create)?;
        for file in [&state, &memory] {
            std::fs::File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fsync of {}: {e}", file.display()))?;
        }
        let took = start.elapsed();
        self.request("PATCH", "/vm", &serde_json::json!({ "state": "Resumed" }))?;
        Ok(took.as_secs_f64() * 1e3)
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One whole-process load of the snapshot in `dir`: exec until the resumed VM's load
/// request has answered; ms.
fn load_process(binary: &Path, dir: &Path, n: usize) -> Result<f64, String> {
    let load = serde_json::json!({
        "snapshot_path": dir.join("vm.snap"),
        "mem_backend": { "backend_type": "File", "backend_path": dir.join("vm.mem") },
        "resume_vm": true,
    });
    let start = Instant::now();
    let vm = Firecracker::start(binary, &dir.join(format!("load{n}.sock")))?;
    vm.request("PUT", "/snapshot/load", &load)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}
