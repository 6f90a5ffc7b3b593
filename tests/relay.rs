//! The engine relaying over loopback TCP and Unix sockets: byte-exactness,
//! half-close, reset propagation, upstream failures. Every test runs on both
//! data paths (splice and copy).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, Relay};
use vsock_relay_testkit::exact::{cases, check_byte_exact};
use vsock_relay_testkit::servers::{echo, twin, Ledger, Server, Stream};
use vsock_relay_testkit::traffic;

use crate::util::{relay, TempDir, BACKENDS, VARIANTS};

const MIB: u64 = 1 << 20;

#[test]
fn byte_exact_64_connections_up_to_256_mib_tcp_splice() {
    for backend in BACKENDS {
        let ledger = Ledger::default();
        let server = Server::tcp(twin(Arc::clone(&ledger)));
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), (backend, DataPath::Splice), |_| {});
        let cases = cases(256 * MIB, 1);
        let up: u64 = cases.iter().map(|c| c.up + 24).sum();
        let down: u64 = cases.iter().map(|c| c.down).sum();
        check_byte_exact(relay.local_endpoint(), &ledger, cases);
        let stats = relay.stats().snapshot();
        assert_eq!((stats.accepted, stats.failed()), (64, 0), "{backend:?}");
        assert_eq!((stats.bytes_to_upstream, stats.bytes_to_client), (up, down), "{backend:?}");
        assert!(down > 256 * MIB && up > 256 * MIB);
        relay.shutdown().unwrap();
    }
}

#[test]
fn byte_exact_64_connections_unix_to_tcp_copy() {
    for backend in BACKENDS {
        let dir = TempDir::new("exact");
        let ledger = Ledger::default();
        let server = Server::tcp(twin(Arc::clone(&ledger)));
        let listen = format!("unix:{}", dir.path("relay.sock").display());
        let relay = relay(&listen, server.endpoint(), (backend, DataPath::Copy), |_| {});
        check_byte_exact(relay.local_endpoint(), &ledger, cases(64 * MIB, 2));
        relay.shutdown().unwrap();
    }
}

#[test]
fn byte_exact_tcp_to_unix_splice() {
    for backend in BACKENDS {
        let dir = TempDir::new("exact-unix");
        let ledger = Ledger::default();
        let server = Server::unix(&dir.path("upstream.sock"), twin(Arc::clone(&ledger)));
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), (backend, DataPath::Splice), |_| {});
        check_byte_exact(relay.local_endpoint(), &ledger, cases(64 * MIB, 3));
        relay.shutdown().unwrap();
    }
}

/// The io_uring ring data path (receives into the worker's provided-buffer
/// ring, sends from it), forced on TCP both ways; the vsock guest runs it on
/// vsock, where it is the default.
#[test]
fn byte_exact_64_connections_ring_path() {
    let ledger = Ledger::default();
    let server = Server::tcp(twin(Arc::clone(&ledger)));
    let relay = relay("tcp:127.0.0.1:0", server.endpoint(), (BackendChoice::Uring, DataPath::Ring), |_| {});
    let cases = cases(64 * MIB, 5);
    let up: u64 = cases.iter().map(|c| c.up + 24).sum();
    let down: u64 = cases.iter().map(|c| c.down).sum();
    check_byte_exact(relay.local_endpoint(), &ledger, cases);
    let stats = relay.stats().snapshot();
    assert_eq!((stats.accepted, stats.failed()), (64, 0));
    assert_eq!((stats.bytes_to_upstream, stats.bytes_to_client), (up, down));
    relay.shutdown().unwrap();
}

/// Spinning before sleep (`--spin-us`) changes how workers wait, not what
/// they move: byte-exact, and the relay stops as usual.
#[test]
fn byte_exact_while_spinning_before_sleep() {
    for backend in BACKENDS {
        let ledger = Ledger::default();
        let server = Server::tcp(twin(Arc::clone(&ledger)));
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), (backend, DataPath::Splice), |config| {
            config.spin = Duration::from_micros(50);
        });
        check_byte_exact(relay.local_endpoint(), &ledger, cases(16 * MIB, 4));
        assert_eq!(relay.stats().snapshot().failed(), 0, "{backend:?}");
        relay.shutdown().unwrap();
    }
}

/// The server reads to EOF, then replies: the client's half-close must not
/// cut the reply.
#[test]
fn client_half_close_still_gets_the_whole_reply() {
    for variant in VARIANTS {
        let server = Server::tcp(|mut stream| {
            let (bytes, _) = traffic::receive(&mut stream).unwrap();
            traffic::send(&mut stream, 3 * MIB + bytes, 42).unwrap();
        });
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), variant, |_| {});
        let mut client = Stream::connect(relay.local_endpoint()).unwrap();
        traffic::send(&mut client, 1000, 7).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let (bytes, hash) = traffic::receive(&mut client).unwrap();
        assert_eq!(bytes, 3 * MIB + 1000, "{variant:?}");
        assert_eq!(hash, traffic::expected_hash(bytes, 42), "{variant:?}");
    }
}

/// The server sends everything and half-closes first; the client sends only
/// after it saw that EOF, and the server must still receive it all.
#[test]
fn upstream_half_close_still_receives_the_client() {
    for variant in VARIANTS {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let server = Server::tcp(move |mut stream| {
            traffic::send(&mut stream, 2 * MIB, 5).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let received = traffic::receive(&mut stream).unwrap();
            tx.lock().unwrap().send(received).unwrap();
        });
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), variant, |_| {});
        let mut client = Stream::connect(relay.local_endpoint()).unwrap();
        let (bytes, hash) = traffic::receive(&mut client).unwrap();
        assert_eq!((bytes, hash), (2 * MIB, traffic::expected_hash(2 * MIB, 5)), "{variant:?}");
        let sent = traffic::send(&mut client, 3 * MIB, 6).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let received = rx.recv_timeout(Duration::from_secs(20)).expect("server received");
        assert_eq!(received, (3 * MIB, sent), "{variant:?}");
    }
}

/// Reads once and expects a reset. An EINTR fails too: starting a relay
/// must not leave the calling thread's blocking calls interruptible (the
/// kernel interrupts the thread that set up an io_uring when it is torn down).
fn expect_reset(stream: &mut Stream, what: &str) {
    let mut buf = [0u8; 64];
    let result = stream.read(&mut buf);
    match result {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a connection reset, got {other:?}"),
    }
}

#[test]
fn client_reset_reaches_upstream_as_a_reset() {
    for variant in VARIANTS {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let server = Server::tcp(move |mut stream| {
            let mut buf = [0u8; 4096];
            let mut first = [0u8; 100];
            stream.read_exact(&mut first).unwrap();
            tx.lock().unwrap().send(None).unwrap();
            let result = loop {
                match stream.read(&mut buf) {
                    Ok(n) if n > 0 => continue,
                    other => break other,
                }
            };
            tx.lock().unwrap().send(Some(result)).unwrap();
        });
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), variant, |_| {});
        let mut client = Stream::connect(relay.local_endpoint()).unwrap();
        client.write_all(&[1u8; 100]).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_none());
        client.reset();
        let result = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(
            matches!(&result, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{variant:?}: upstream read after the client reset: expected a reset, got {result:?}"
        );
        assert_eq!(relay.stats().snapshot().failed(), 1);
    }
}

#[test]
fn upstream_reset_reaches_the_client_as_a_reset() {
    for variant in VARIANTS {
        let server = Server::tcp(|mut stream| {
            let mut first = [0u8; 100];
            stream.read_exact(&mut first).unwrap();
            stream.write_all(b"partial reply").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            stream.reset();
        });
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), variant, |_| {});
        let mut client = Stream::connect(relay.local_endpoint()).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(&[1u8; 100]).unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"partial reply");
        expect_reset(&mut client, &format!("{variant:?}: client read after the upstream reset"));
    }
}

/// Nothing listens upstream: that client is turned away at once with a reset,
/// and the relay keeps serving: an open connection goes on, and a new one
/// succeeds once the upstream is back.
#[test]
fn refused_upstream_closes_that_connection_only() {
    for variant in VARIANTS {
        let dir = TempDir::new("refused");
        let upstream = dir.path("upstream.sock");
        let server = Server::unix(&upstream, echo);
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), variant, |_| {});
        let mut open = Stream::connect(relay.local_endpoint()).unwrap();
        open.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        open.read_exact(&mut buf).unwrap();
        drop(server); // removes the socket file: connects are refused now

        let started = Instant::now();
        let mut refused = Stream::connect(relay.local_endpoint()).unwrap();
        refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        expect_reset(&mut refused, &format!("{variant:?}: client of a refused upstream"));
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

        open.write_all(b"during").unwrap();
        open.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"during");

        let _server = Server::unix(&upstream, echo);
        let mut again = Stream::connect(relay.local_endpoint()).unwrap();
        again.write_all(b"after!").unwrap();
        again.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after!");
        let stats = relay.stats().snapshot();
        assert_eq!((stats.accepted, stats.failed()), (3, 1), "{variant:?}");
    }
}

/// An upstream that never answers the SYN (its accept queue is full) is
/// given up after the connect timeout; the relay serves others meanwhile.
#[test]
fn unreachable_upstream_times_out_and_the_relay_serves_others() {
    let silent = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    silent.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    silent.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue so that further SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&silent_addr.into());
        fillers.push(s);
    }
    std::thread::sleep(Duration::from_millis(100));

    for variant in VARIANTS {
        let relay = relay("tcp:127.0.0.1:0", &Endpoint::tcp(silent_addr), variant, |config| {
            config.connect_timeout = Duration::from_millis(300);
        });
        let started = Instant::now();
        let mut client = Stream::connect(relay.local_endpoint()).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        expect_reset(&mut client, &format!("{variant:?}: client of an unreachable upstream"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{variant:?}: gave up after {waited:?}"
        );
        assert_eq!(relay.stats().snapshot().failed(), 1, "{variant:?}");
    }
    drop(fillers);
}

#[test]
fn stop_refuses_new_clients_and_lets_open_ones_finish() {
    let server = Server::tcp(|mut stream| {
        let (bytes, _) = traffic::receive(&mut stream).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let _ = stream.write_all(&bytes.to_le_bytes());
    });
    for backend in BACKENDS {
        let relay: Relay = relay("tcp:127.0.0.1:0", server.endpoint(), (backend, DataPath::Splice), |_| {});
        let endpoint = relay.local_endpoint().clone();
        let mut client = Stream::connect(&endpoint).unwrap();
        traffic::send(&mut client, 12345, 1).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let stop = relay.stop_handle();
        let waiter = std::thread::spawn(move || relay.wait());
        stop.stop();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, 12345u64.to_le_bytes(), "{backend:?}: the open connection finished after the stop");
        waiter.join().unwrap().unwrap();
        assert!(Stream::connect(&endpoint).is_err(), "{backend:?}: a stopped relay refuses connections");
    }
}
