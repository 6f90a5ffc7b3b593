//! Faults a production relay meets, through the binary on both backends:
//! running out of descriptors and recovering, a client reset with bytes in
//! flight, an upstream that stops reading, thousands of idle clients, and a
//! SIGTERM in the middle of transfers.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vsock_relay_testkit::servers::{echo, Server, Stream};
use vsock_relay_testkit::traffic;

use crate::util::{backend_arg, ping, relay_process, wait_for_unix, Proc, TempDir, BACKENDS};

const MIB: u64 = 1 << 20;

/// Starts `vsock-relay relay` on a Unix socket in `dir`, with `extra` options
/// and a last say on the command.
fn relay_with(
    dir: &TempDir,
    backend: &str,
    to: &str,
    extra: &[&str],
    configure: impl FnOnce(&mut std::process::Command),
) -> (Proc, String) {
    let listen = dir.path("relay.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let mut args = vec!["relay", "--backend", backend, "--listen", &listen_arg, "--to", to];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn_with("vsock-relay", &args, configure);
    proc.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&listen, Duration::from_secs(5));
    (proc, listen_arg)
}

/// 64 open files for the whole relay process: clients beyond what fits are
/// reset (accept pauses, no spin, no crash), and once they close the relay
/// serves again.
#[test]
fn out_of_descriptors_then_recovery() {
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let server = Server::tcp(echo);
        let dir = TempDir::new("fd-exhaustion");
        let to = server.endpoint().to_string();
        let (mut relay, listen) = relay_with(&dir, backend, &to, &["-w", "1"], |command| {
            vsock_relay_testkit::seccomp::limit_open_files(command, 64);
        });
        let mut clients = Vec::new();
        let mut refused = 0;
        // Until a few are refused: a client the paused accept leaves in the
        // backlog waits for its read timeout.
        for _ in 0..60 {
            if refused == 3 {
                break;
            }
            let Ok(mut client) = Stream::connect(&listen.parse().unwrap()) else {
                refused += 1;
                continue;
            };
            client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let served = client.write_all(b"ping").is_ok() && {
                let mut reply = [0u8; 4];
                client.read_exact(&mut reply).is_ok() && &reply == b"ping"
            };
            if served {
                clients.push(client);
            } else {
                refused += 1;
            }
        }
        assert!(refused > 0, "{backend}: 60 clients fit in 64 descriptors?");
        assert!(clients.len() >= 20, "{backend}: only {} clients served before the limit", clients.len());
        assert!(relay.running(), "{backend}: the relay survives running out:\n{}", relay.stderr());
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(ping(&listen), Ok(true)) {
            assert!(Instant::now() < deadline, "{backend}: no recovery:\n{}", relay.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = relay.stderr();
        assert!(
            log.contains("out of resources") || log.contains("cannot open an upstream socket"),
            "{backend}: running out is logged:\n{log}"
        );
    }
}

/// The client resets while megabytes it sent still sit in the relay (its
/// upstream reads slowly): the upstream sees a reset, never a clean end,
/// and the relay serves the next client.
#[test]
fn client_reset_with_bytes_in_flight_reaches_upstream_as_a_reset() {
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let server = Server::tcp(move |mut stream| {
            let mut buf = [0u8; 16 * 1024];
            let mut total = 0u64;
            let end = loop {
                std::thread::sleep(Duration::from_millis(2));
                match stream.read(&mut buf) {
                    Ok(0) => break Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => break Err(e.kind()),
                }
            };
            let _ = tx.lock().unwrap().send((total, end));
        });
        let to = server.endpoint().to_string();
        let (_relay, listen) = relay_process(backend, &to, &[]);
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let chunk = vec![7u8; 256 * 1024];
        for _ in 0..16 {
            client.write_all(&chunk).unwrap();
        }
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let (received, end) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert!(received < 4 * MIB, "{backend}: bytes were still in flight ({received} arrived)");
        assert_eq!(
            end,
            Err(ErrorKind::ConnectionReset),
            "{backend}: upstream saw {end:?} after {received} bytes"
        );
        let mut next = TcpStream::connect(("127.0.0.1", port)).unwrap();
        next.write_all(b"x").unwrap();
        next.shutdown(Shutdown::Write).unwrap();
        let served = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(served, (1, Ok(1)), "{backend}: the relay serves the next client");
    }
}

/// An upstream that stops reading: the client's writes block (the relay
/// holds at most a pipe or two buffers per direction, and its memory stays
/// bounded on every data path), and nothing is lost once it reads again.
#[test]
fn a_non_reading_upstream_holds_the_client_back_in_bounded_memory() {
    const BYTES: u64 = 64 * MIB;
    for (backend, path) in [
        ("uring", "splice"),
        ("uring", "copy"),
        ("uring", "ring"),
        ("portable", "splice"),
        ("portable", "copy"),
    ] {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let (go_rx, done_tx) = (std::sync::Mutex::new(go_rx), std::sync::Mutex::new(done_tx));
        let server = Server::tcp(move |mut stream| {
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
            let received = traffic::receive(&mut stream).unwrap();
            if received.0 > 0 {
                done_tx.lock().unwrap().send(received).unwrap();
            }
        });
        let dir = TempDir::new("stalled-upstream");
        let to = server.endpoint().to_string();
        let (relay, listen) = relay_with(&dir, backend, &to, &["--data-path", path], |_| {});
        let mut client = Stream::connect(&listen.parse().unwrap()).unwrap();
        let writer = std::thread::spawn(move || {
            let sent = traffic::send(&mut client, BYTES, 91).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            sent
        });
        std::thread::sleep(Duration::from_secs(2));
        let rss = relay.rss_kib();
        assert!(rss < 16 * 1024, "{backend}/{path}: relay RSS {rss} KiB with a stalled upstream");
        assert!(!writer.is_finished(), "{backend}/{path}: the client pushed 64 MiB into a stalled upstream");
        let resumed = Instant::now();
        // One for the probe of `relay_with` (which brings nothing), one for the client.
        go_tx.send(()).unwrap();
        go_tx.send(()).unwrap();
        let sent = writer.join().unwrap();
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(120)).unwrap(),
            (BYTES, sent),
            "{backend}/{path}"
        );
        println!("{backend}/{path}: RSS {rss} KiB while stalled; the rest took {:?}", resumed.elapsed());
    }
}

/// 5,000 idle clients, each with its upstream connection open: a new
/// client is still served at once.
#[test]
fn five_thousand_idle_clients_and_a_new_one_is_served() {
    const IDLE: usize = 5000;
    vsock_relay_engine::raise_open_files_limit().unwrap();
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        // An upstream that keeps every connection without a thread each.
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = format!("tcp:{}", upstream.local_addr().unwrap());
        let (accepted_tx, accepted_rx) = mpsc::channel();
        let acceptor = std::thread::spawn(move || {
            // The idle clients, the new one, and the probe of `relay_with`.
            for stream in upstream.incoming().take(IDLE + 2) {
                if accepted_tx.send(stream.unwrap()).is_err() {
                    return;
                }
            }
        });
        let dir = TempDir::new("idle-5000");
        let (relay, listen) = relay_with(&dir, backend, &to, &[], |_| {});
        let endpoint = listen.parse().unwrap();
        let probe = accepted_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut clients = Vec::with_capacity(IDLE);
        let mut held = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            clients.push(Stream::connect(&endpoint).unwrap_or_else(|e| panic!("{backend}: client {i}: {e}")));
            // In steps, so that the upstream's accept queue never overflows.
            if clients.len() % 100 == 0 || clients.len() == IDLE {
                while held.len() < clients.len() {
                    held.push(accepted_rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|e| {
                        panic!("{backend}: upstream connection {} never came: {e}", held.len())
                    }));
                }
            }
        }
        let started = Instant::now();
        let mut last = Stream::connect(&endpoint).unwrap();
        last.write_all(b"new client").unwrap();
        let mut upstream_side = accepted_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        upstream_side.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 10];
        upstream_side.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"new client");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{backend}: the new client waited {took:?}");
        println!("{backend}: relay RSS with {IDLE} idle connections: {} KiB", relay.rss_kib());
        drop((probe, clients, held, last, upstream_side));
        acceptor.join().unwrap();
    }
}

/// SIGTERM while four 32 MiB transfers run: each finishes byte-exact in the
/// drain, and the relay exits 0 with nothing failed or cut.
#[test]
fn sigterm_with_transfers_in_flight_lets_them_finish_byte_exact() {
    const BYTES: u64 = 32 * MIB;
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let server = Server::tcp(|mut stream| {
            let (bytes, hash) = traffic::receive(&mut stream).unwrap();
            let _ = stream.write_all(&bytes.to_le_bytes());
            let _ = stream.write_all(&hash);
        });
        let dir = TempDir::new("sigterm-in-flight");
        let to = server.endpoint().to_string();
        let (mut relay, listen) = relay_with(&dir, backend, &to, &["--drain-timeout", "60"], |_| {});
        let transfers: Vec<_> = (0..4u64)
            .map(|seed| {
                let endpoint = listen.parse().unwrap();
                std::thread::spawn(move || {
                    let mut client = Stream::connect(&endpoint).unwrap();
                    client.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    // Slow enough that the signal lands mid-transfer.
                    let mut data = traffic::Data::new(seed);
                    let mut chunk = vec![0u8; 256 * 1024];
                    for _ in 0..BYTES / chunk.len() as u64 {
                        data.fill(&mut chunk);
                        client.write_all(&chunk).unwrap();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    client.shutdown(Shutdown::Write).unwrap();
                    let mut reply = [0u8; 40];
                    client.read_exact(&mut reply).unwrap();
                    (u64::from_le_bytes(reply[..8].try_into().unwrap()), reply[8..].to_vec())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        relay.signal("TERM");
        for (seed, transfer) in transfers.into_iter().enumerate() {
            let (bytes, hash) = transfer.join().unwrap();
            assert_eq!(bytes, BYTES, "{backend}: transfer {seed}");
            assert_eq!(
                hash,
                traffic::expected_hash(BYTES, seed as u64).to_vec(),
                "{backend}: transfer {seed}"
            );
        }
        assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0), "{backend}: {}", relay.stderr());
        let log = relay.stderr();
        // Every byte of the four arrived upstream (the fifth client was
        // the probe that saw the socket listening), and nothing was cut.
        assert!(
            log.contains("cut_by_drain=0 bytes_to_upstream=134217728 bytes_to_client=160"),
            "{backend}: {log}"
        );
    }
}
