//! The spawner: the one thread allowed to run programs.
//!
//! A running VMM starts clone children (`snapvmm restore` processes) when the API asks for a
//! fork. `execve` is on no other thread's allow-list, so [`configure`](super::configure) starts
//! this thread before any filter exists; it confines itself as
//! [`ThreadKind::Spawner`](super::ThreadKind::Spawner) and runs the commands it is sent. Without
//! confinement [`spawn`] runs the command on the calling thread.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

/// Starts the spawner thread (once per process).
pub(super) fn start() -> io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (requests, incoming) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            super::enter_or_abort(super::ThreadKind::Spawner);
            for (mut command, reply) in incoming {
                let _ = reply.send(command.spawn());
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(requests));
    Ok(())
}

/// Spawns `command`, on the spawner thread when the process is confined.
pub fn spawn(mut command: Command) -> io::Result<Child> {
    let Some(spawner) = SPAWNER.get() else {
        return command.spawn();
    };
    let (reply, answer) = mpsc::channel();
    let gone = || io::Error::other("the spawner thread is gone");
    spawner
        .lock()
        .map_err(|_| gone())?
        .send((command, reply))
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}
