//! The client against scripted agents on real Unix sockets: a well-behaved one (with stale
//! bytes in the channel), one that never answers, one that answers garbage, one that floods.
//! The real qemu-ga is exercised in `tests/guest_agent.rs`, inside a Linux guest: run on the
//! host it would freeze the host's filesystems.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// How a scripted agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
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
struct AgentState {
    frozen: AtomicBool,
    freezes: AtomicUsize,
    thaws: AtomicUsize,
}

/// Serves connections on `listener` as `behaviour` says, until the test ends.
fn serve(listener: UnixListener, behaviour: Behaviour, state: Arc<AgentState>) {
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
                    reply.extend(format!("\u{0}\n").as_bytes());
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

fn quick() -> AgentTimeouts {
    AgentTimeouts {
        sync: Duration::from_millis(300),
        freeze: Duration::from_millis(300),
        command: Duration::from_millis(300),
    }
}

/// An agent behaving as `behaviour` on a socket in `dir`.
fn agent(dir: &tempfile::TempDir, behaviour: Behaviour) -> (GuestAgent, Arc<AgentState>) {
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let state = Arc::new(AgentState::default());
    serve(listener, behaviour, state.clone());
    (
        GuestAgent::with_timeouts(AgentEndpoint::Unix(path), quick()),
        state,
    )
}

#[test]
fn freeze_and_thaw_through_stale_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, state) = agent(&dir, Behaviour::Good);
    agent.ping().unwrap();
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
    let frozen = agent.freeze().unwrap();
    assert_eq!(frozen.filesystems(), 2);
    assert!(state.frozen.load(Ordering::SeqCst));
    frozen.thaw().unwrap();
    assert!(!state.frozen.load(Ordering::SeqCst));
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn dropping_a_freeze_thaws() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, state) = agent(&dir, Behaviour::Good);
    {
        let _frozen = agent.freeze().unwrap();
        assert!(state.frozen.load(Ordering::SeqCst));
    }
    assert!(!state.frozen.load(Ordering::SeqCst));
    assert_eq!(state.thaws.load(Ordering::SeqCst), 1);
    // Even when unwinding from a panic.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _frozen = agent.freeze().unwrap();
        panic!("snapshot failed");
    }));
    assert!(result.is_err());
    assert!(!state.frozen.load(Ordering::SeqCst));
}

#[test]
fn a_failed_freeze_is_thawed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, state) = agent(&dir, Behaviour::FreezeFails);
    let error = agent.freeze().unwrap_err();
    assert!(
        matches!(&error, AgentFailure::Command { desc, .. } if desc.contains("busy")),
        "{error:?}"
    );
    assert!(!state.frozen.load(Ordering::SeqCst), "left frozen");
}

#[test]
fn a_missing_agent_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let agent = GuestAgent::with_timeouts(
        AgentEndpoint::Unix(dir.path().join("nobody.sock")),
        quick(),
    );
    let error = agent.freeze().unwrap_err();
    assert!(matches!(error, AgentFailure::Connect(_)), "{error:?}");
    assert!(error.is_unavailable());
}

#[test]
fn a_hanging_agent_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, state) = agent(&dir, Behaviour::Hang);
    assert_eq!(agent.ping().unwrap_err(), AgentFailure::Timeout);
    assert_eq!(agent.freeze().unwrap_err(), AgentFailure::Timeout);
    assert_eq!(state.freezes.load(Ordering::SeqCst), 0);
}

#[test]
fn a_garbage_agent_never_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent(&dir, Behaviour::Garbage);
    // The garbage holds a delimiter followed by non-JSON: skipped, then the wait times out.
    let error = agent.freeze().unwrap_err();
    assert!(
        matches!(error, AgentFailure::Timeout | AgentFailure::Protocol(_)),
        "{error:?}"
    );
}

#[test]
fn a_flooding_agent_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    serve(listener, Behaviour::Flood, Arc::new(AgentState::default()));
    let agent = GuestAgent::with_timeouts(
        AgentEndpoint::Unix(path),
        AgentTimeouts {
            sync: Duration::from_secs(30),
            ..quick()
        },
    );
    let error = agent.ping().unwrap_err();
    assert!(
        matches!(&error, AgentFailure::Protocol(m) if m.contains("bytes")),
        "{error:?}"
    );
}

#[test]
fn oversized_answer_lines_are_refused() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut client = AgentClient::new(ours);
    std::thread::spawn(move || {
        let mut reply = vec![b'{'; protocol::MAX_LINE + 10];
        reply.push(b'\n');
        let _ = theirs.write_all(&reply);
        std::thread::sleep(Duration::from_secs(5));
    });
    let error = client.ping(Duration::from_secs(30)).unwrap_err();
    assert!(
        matches!(&error, AgentFailure::Protocol(m) if m.contains("longer")),
        "{error:?}"
    );
}

#[test]
fn answers_of_the_wrong_shape_are_protocol_errors() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut client = AgentClient::new(ours);
    theirs
        .write_all(b"{\"return\": \"not a number\"}\n{}\n[1,2]\n")
        .unwrap();
    for _ in 0..3 {
        let error = client.freeze(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(error, AgentFailure::Protocol(_)), "{error:?}");
    }
    drop(theirs);
    assert_eq!(
        client.freeze(Duration::from_secs(5)).unwrap_err(),
        AgentFailure::Closed
    );
}

#[test]
fn endpoints_parse() {
    assert_eq!(
        AgentEndpoint::parse("/run/qga.sock", None).unwrap(),
        AgentEndpoint::Unix("/run/qga.sock".into())
    );
    assert_eq!(
        AgentEndpoint::parse("unix:/run/qga.sock", None).unwrap(),
        AgentEndpoint::Unix("/run/qga.sock".into())
    );
    assert_eq!(
        AgentEndpoint::parse("vsock:1234", Some(Path::new("/run/v.sock"))).unwrap(),
        AgentEndpoint::Vsock {
            uds: "/run/v.sock".into(),
            port: 1234
        }
    );
    assert!(AgentEndpoint::parse("vsock:1234", None).is_err());
    assert!(AgentEndpoint::parse("vsock:x", Some(Path::new("/v"))).is_err());
    assert!(AgentEndpoint::parse("", None).is_err());
}

#[test]
fn vsock_handshake_accepts_ok_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    std::thread::spawn(move || {
        let answers: [&[u8]; 3] = [b"OK 1073741824\n", b"NOPE\n", &[b'O'; 200]];
        for answer in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 52\n");
            let mut stream = stream;
            stream.write_all(answer).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let endpoint = AgentEndpoint::Vsock { uds, port: 52 };
    endpoint.connect(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        endpoint.connect(Duration::from_secs(5)).unwrap_err(),
        AgentFailure::Connect(_)
    ));
    assert!(matches!(
        endpoint.connect(Duration::from_secs(5)).unwrap_err(),
        AgentFailure::Connect(_)
    ));
}
