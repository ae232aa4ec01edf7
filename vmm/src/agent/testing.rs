//! A scripted qemu-ga for tests on real Unix sockets: well-behaved (with stale bytes in the
//! channel), silent, garbage-answering, flooding, or failing its freezes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// How a scripted agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Answers like qemu-ga, after a stale answer and some noise.
    Good,
    /// Reads and never answers.
    Hang,
    /// Answers every line with non-JSON.
    Garbage,
    /// Answers with one endless line.
    Flood,
    /// Answers sync and ping, fails freezes (after freezing, as a partial failure would).
    FreezeFails,
}

/// What a scripted agent saw, shared with the test.
#[derive(Debug, Default)]
pub(crate) struct AgentState {
    pub frozen: AtomicBool,
    pub freezes: AtomicUsize,
    pub thaws: AtomicUsize,
}

/// Serves connections on `listener` as `behaviour` says, until the test ends.
pub(crate) fn serve(listener: UnixListener, behaviour: Behaviour, state: Arc<AgentState>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let state = state.clone();
            std::thread::spawn(move || answer(stream, behaviour, &state));
        }
    });
}

fn answer(stream: UnixStream, behaviour: Behaviour, state: &AgentState) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xFF).collect();
        let Ok(request) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        let command = request["execute"].as_str().unwrap_or("").to_string();
        let reply: Vec<u8> = match behaviour {
            Behaviour::Hang => continue,
            Behaviour::Garbage => b"}}not json at all{{\n\xff\x00garbage\n".to_vec(),
            Behaviour::Flood => {
                let chunk = vec![b'x'; 64 * 1024];
                loop {
                    if writer.write_all(&chunk).is_err() {
                        return;
                    }
                }
            }
            Behaviour::Good | Behaviour::FreezeFails => match command.as_str() {
                "guest-sync-delimited" => {
                    let id = request["arguments"]["id"].as_u64().unwrap();
                    // A stale delimited answer and noise first: the client skips both.
                    let mut reply = b"{\"return\": 7}\n\xff{\"return\": 1}\nnoise\n".to_vec();
                    reply.extend_from_slice(b"\0\n");
                    reply.push(0xFF);
                    reply.extend(format!("{{\"return\": {id}}}\n").as_bytes());
                    reply
                }
                "guest-ping" => b"{\"return\": {}}\n".to_vec(),
                "guest-fsfreeze-freeze" => {
                    state.freezes.fetch_add(1, Ordering::SeqCst);
                    state.frozen.store(true, Ordering::SeqCst);
                    if behaviour == Behaviour::FreezeFails {
                        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to freeze /mnt: Device or resource busy\"}}\n".to_vec()
                    } else {
                        b"{\"return\": 2}\n".to_vec()
                    }
                }
                "guest-fsfreeze-thaw" => {
                    state.thaws.fetch_add(1, Ordering::SeqCst);
                    state.frozen.store(false, Ordering::SeqCst);
                    b"{\"return\": 2}\n".to_vec()
                }
                "guest-fsfreeze-status" => {
                    if state.frozen.load(Ordering::SeqCst) {
                        b"{\"return\": \"frozen\"}\n".to_vec()
                    } else {
                        b"{\"return\": \"thawed\"}\n".to_vec()
                    }
                }
                _ => b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n".to_vec(),
            },
        };
        if writer.write_all(&reply).is_err() {
            return;
        }
    }
}

/// An agent behaving as `behaviour` on socket `path`.
pub(crate) fn scripted(
    path: &std::path::Path,
    behaviour: Behaviour,
    timeouts: super::AgentTimeouts,
) -> (super::GuestAgent, Arc<AgentState>) {
    let listener = UnixListener::bind(path).unwrap();
    let state = Arc::new(AgentState::default());
    serve(listener, behaviour, state.clone());
    (
        super::GuestAgent::with_timeouts(super::AgentEndpoint::Unix(path.to_path_buf()), timeouts),
        state,
    )
}
