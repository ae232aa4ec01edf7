//! Each thread kind's additions to the [`base`](super::base) allow-list.

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::base::{self, allow, Rules};
use super::ThreadKind;

/// The ioctl type byte of every KVM request (`KVMIO`), bits 8..16 of the request number.
const KVMIO: u64 = 0xAE;

/// The ioctl rule that lets a thread issue KVM requests (on the VM and vCPU fds) besides the base
/// terminal requests: any request whose type byte is `KVMIO`.
fn kvm_ioctls(rules: &mut Rules) -> Result<(), BackendError> {
    let kvm = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?;
    rules.entry(libc::SYS_ioctl).or_default().push(kvm);
    Ok(())
}

/// The ioctl rule for userfaultfd requests (`UFFDIO`, type byte 0xAA) of the lazy-restore pager.
fn uffd_ioctls(rules: &mut Rules) -> Result<(), BackendError> {
    let uffd = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        0xAA << 8,
    )?])?;
    rules.entry(libc::SYS_ioctl).or_default().push(uffd);
    Ok(())
}

/// What the API thread adds: accepting on its listening socket, and reaping or stopping the clone
/// children it starts through the spawner.
const API: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_wait4,
    libc::SYS_kill,
];

/// What vsock / guest-agent threads add: host-side Unix sockets.
const VSOCK: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// What the control thread adds besides every other kind's extras (threads inherit the filter
/// of the thread that spawns them, so the control thread's list covers all it starts later):
/// building devices and sockets, memory files for checkpoints, userfaultfd for lazy restore.
const MAIN: &[libc::c_long] = &[
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_socketpair,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_pipe2,
];

/// What the spawner adds: starting a program. A program keeps the filter of the thread that
/// executes it, so the spawner's list also covers everything a `snapvmm restore` child does
/// before it installs its own per-thread filters (hence it starts from the control list).
const SPAWNER: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_vfork,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_setpgid,
    libc::SYS_chdir,
    libc::SYS_close_range,
    libc::SYS_access,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_arch_prctl,
    libc::SYS_set_tid_address,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_ioperm,
    libc::SYS_seccomp,
    libc::SYS_sched_getaffinity,
];

/// The allow-list for `kind`.
pub(super) fn rules(kind: ThreadKind) -> Result<Rules, BackendError> {
    let mut rules = base::rules()?;
    match kind {
        ThreadKind::Main | ThreadKind::Spawner => {
            kvm_ioctls(&mut rules)?;
            uffd_ioctls(&mut rules)?;
            for list in [API, VSOCK, MAIN] {
                allow(&mut rules, list);
            }
            if kind == ThreadKind::Spawner {
                allow(&mut rules, SPAWNER);
                // The dynamic loader of the program maps its libraries executable.
                rules.insert(libc::SYS_mmap, Vec::new());
                rules.insert(libc::SYS_mprotect, Vec::new());
            }
        }
        // vCPUs run the guest and emulate MMIO/PIO. Device activation runs on a vCPU and starts
        // the device threads (clone is in the base list), which inherit its filter: the vsock
        // device's thread accepts guest-agent connections on a socket it was handed (accept
        // only; a vCPU still cannot create or connect a socket).
        ThreadKind::Vcpu => {
            kvm_ioctls(&mut rules)?;
            allow(&mut rules, &[libc::SYS_accept4]);
        }
        // Block workers read and write images through descriptors they hold: the base list.
        ThreadKind::BlockWorker => {}
        // The API thread (and the runtime threads it starts) drives the VMM through the control
        // layer, which does all the control thread does: KVM state (snapshots pause the vCPUs
        // and save their registers), 0600 checkpoint and overlay files, connecting to the guest
        // agent and to the API sockets of the clones it starts.
        ThreadKind::Api => {
            kvm_ioctls(&mut rules)?;
            for list in [API, VSOCK, MAIN] {
                allow(&mut rules, list);
            }
        }
        ThreadKind::Pager => uffd_ioctls(&mut rules)?,
        ThreadKind::Vsock => allow(&mut rules, VSOCK),
    }
    Ok(rules)
}
