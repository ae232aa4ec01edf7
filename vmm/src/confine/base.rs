//! The syscalls every VMM thread needs: memory, threads and futexes, signals, time, and I/O on
//! file descriptors the thread already holds. Nothing here opens a network socket, runs a
//! program or changes credentials.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// A rule set: syscall number to the rules (any of which allows it; none means always).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allows `syscalls` unconditionally.
pub(super) fn allow(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        rules.insert(nr, Vec::new());
    }
}

/// One condition `arg[index] & mask == value`.
pub(super) fn masked(index: u8, mask: u64, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}

/// The shared allow-list.
pub(super) fn rules() -> Result<Rules, BackendError> {
    let mut rules = Rules::new();
    allow(
        &mut rules,
        &[
            // Memory: the allocator and guest-memory bookkeeping.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_membarrier,
            // Threads, futexes, scheduling (std, parking_lot, tokio).
            libc::SYS_futex,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_prctl,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigtimedwait,
            libc::SYS_tgkill,
            // The kernel's resumption of a sleep or poll a signal without a handler broke
            // into (a stop and continue: Ctrl-Z, `kill -STOP`/`-CONT`, a debugger, a
            // SIGCHLD some thread blocks): it continues a syscall this filter let in already.
            libc::SYS_restart_syscall,
            // Time.
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            // I/O on descriptors the thread holds, and files it opens by path (disk images,
            // checkpoint files). Sockets and exec are not here.
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_close,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_sync,
            libc::SYS_syncfs,
            libc::SYS_sync_file_range,
            libc::SYS_msync,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_truncate,
            libc::SYS_umask,
            libc::SYS_epoll_pwait2,
            libc::SYS_mincore,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_openat,
            libc::SYS_getdents64,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlinkat,
            libc::SYS_mkdirat,
            libc::SYS_linkat,
            libc::SYS_flock,
            libc::SYS_fadvise64,
            libc::SYS_copy_file_range,
            libc::SYS_eventfd2,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
            libc::SYS_getcwd,
            libc::SYS_readlinkat,
            libc::SYS_readlink,
            // The legacy path calls std and libc still make next to their `*at` forms.
            libc::SYS_rename,
            libc::SYS_unlink,
            libc::SYS_rmdir,
            libc::SYS_mkdir,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_sysinfo,
            libc::SYS_uname,
            libc::SYS_getrlimit,
            libc::SYS_prlimit64,
            // Writing to connected sockets a thread was handed (console, API replies).
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
        ],
    );
    // Stacking a narrower filter: a thread inherits its spawner's filter and adds its kind's
    // (SECCOMP_SET_MODE_FILTER only ever narrows what a thread may do).
    rules.insert(
        libc::SYS_seccomp,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            1, // SECCOMP_SET_MODE_FILTER
        )?])?],
    );
    // mmap, but never executable: no guest bytes become host code.
    rules.insert(
        libc::SYS_mmap,
        vec![SeccompRule::new(vec![masked(
            2,
            libc::PROT_EXEC as u64,
            0,
        )?])?],
    );
    // Stack guards and allocator permission changes, never towards executable.
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![masked(
            2,
            libc::PROT_EXEC as u64,
            0,
        )?])?],
    );
    // ioctl on terminals and non-blocking toggles only; KVM ioctls are per kind.
    rules.insert(
        libc::SYS_ioctl,
        ioctl_rules(&[libc::TCGETS, libc::TCSETS, libc::FIONBIO, libc::FIOCLEX])?,
    );
    Ok(rules)
}

/// Rules allowing `ioctl` with exactly the request numbers in `requests`.
pub(super) fn ioctl_rules(requests: &[libc::c_ulong]) -> Result<Vec<SeccompRule>, BackendError> {
    requests
        .iter()
        .map(|&request| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?])
        })
        .collect()
}
