//! The client against scripted agents on real Unix sockets: a well-behaved one (with stale
//! bytes in the channel), one that never answers, one that answers garbage, one that floods.
//! The real qemu-ga is exercised in `tests/guest_agent.rs`, inside a Linux guest: run on the
//! host it would freeze the host's filesystems.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::testing::{self, serve, AgentState, Behaviour};
use super::*;

/// Short waits, for agents that are meant not to answer.
fn quick() -> AgentTimeouts {
    AgentTimeouts {
        sync: Duration::from_millis(300),
        freeze: Duration::from_millis(300),
        command: Duration::from_millis(300),
    }
}

/// An agent behaving as `behaviour` on a socket in `dir`; those meant to answer get the
/// default (long) timeouts, so a loaded machine does not fail the test.
fn agent(dir: &tempfile::TempDir, behaviour: Behaviour) -> (GuestAgent, Arc<AgentState>) {
    let timeouts = match behaviour {
        Behaviour::Good | Behaviour::FreezeFails => AgentTimeouts::default(),
        _ => quick(),
    };
    testing::scripted(&dir.path().join("qga.sock"), behaviour, timeouts)
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
    let agent =
        GuestAgent::with_timeouts(AgentEndpoint::Unix(dir.path().join("nobody.sock")), quick());
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
