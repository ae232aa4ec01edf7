//! The kinds of thread the VMM runs. A file of its own because the build script compiles the
//! allow-lists too (`build.rs` includes this file, `base.rs` and `kinds.rs` by path).

/// The kinds of thread the VMM runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main (control) thread once the VM is built: device and checkpoint management.
    Main,
    /// A vCPU thread: `KVM_RUN` and KVM ioctls, MMIO/PIO emulation.
    Vcpu,
    /// A virtio-blk / vhost-user-blk queue worker: file I/O on disk images.
    BlockWorker,
    /// The REST API thread (tokio runtime): a listening Unix socket.
    Api,
    /// The userfaultfd pager of a lazy restore.
    Pager,
    /// A virtio-vsock / guest-agent thread.
    Vsock,
    /// The spawner thread, the only one that may `execve` (clone children).
    Spawner,
}

/// How many [`ThreadKind`]s there are.
pub const KINDS: usize = 7;

impl ThreadKind {
    /// Every thread kind, in declaration order (the index of a kind is `kind as usize`).
    pub const ALL: [ThreadKind; KINDS] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::Api,
        ThreadKind::Pager,
        ThreadKind::Vsock,
        ThreadKind::Spawner,
    ];
}
