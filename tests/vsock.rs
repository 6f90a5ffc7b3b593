//! Real AF_VSOCK: the engine and the binaries on vsock sockets.
//!
//! These tests run only inside the QEMU guest of tests/vm, whose kernel has
//! `vsock_loopback` (CID 1) and no way out. Everywhere else they are ignored,
//! and if forced to run (`--ignored`) they refuse before opening AF_VSOCK.
//! tests/vm/run.sh runs them with `--ignored` on each of its kernels, once
//! normally and once with `kernel.io_uring_disabled=2` where the kernel has it;
//! tests/vm/two-vms.sh runs the `two_vms` ones, one side in each of two VMs.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock_relay_engine::{Backend, BackendChoice, DataPath, Endpoint, Relay, RelayConfig, Target};
use vsock_relay_testkit::exact::{cases, check_byte_exact};
use vsock_relay_testkit::guest::require_vsock_guest;
use vsock_relay_testkit::servers::{echo, twin, Ledger, Server, Stream};
use vsock_relay_testkit::traffic;

// doctor, the to-host flag and connect hints on real vsock (issue 29).
mod vsock_doctor;

const MIB: u64 = 1 << 20;

/// Two VMs joined by vhost-device-vsock (tests/vm/two-vms.sh), not the one
/// guest of tests/vm/run.sh: the parent's and the enclave's sides.
#[path = "vm/two_vms.rs"]
mod two_vms;

/// Both backends where io_uring runs; where it cannot (disabled, or a kernel
/// without what the engine needs), `auto` only, which must pick portable.
fn backends() -> Vec<BackendChoice> {
    match uring_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED here: the io_uring backend ({why}); testing auto, which must choose portable");
            vec![BackendChoice::Auto]
        }
        None => vec![BackendChoice::Uring, BackendChoice::Portable],
    }
}

/// Why the io_uring backend cannot run in this guest, if it cannot: asked
/// of the engine once, with a relay on a Unix socket.
fn uring_unavailable() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("uring-probe-{}.sock", std::process::id()));
        let endpoint = Endpoint::Unix { path: path.clone() };
        let mut config = RelayConfig::new(endpoint.clone(), Target::fixed(&endpoint).unwrap());
        config.backend = BackendChoice::Uring;
        config.workers = 1;
        let why = match Relay::start(config) {
            Ok(relay) => {
                relay.shutdown().unwrap();
                None
            }
            Err(vsock_relay_engine::Error::UringUnavailable(why)) => Some(why.to_string()),
            Err(other) => panic!("probing the io_uring backend: {other}"),
        };
        let _ = std::fs::remove_file(&path);
        why
    })
    .clone()
}

fn io_uring_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "2")
}

fn relay(listen: Endpoint, to: &Endpoint, backend: BackendChoice, path: DataPath) -> Relay {
    let mut config = RelayConfig::new(listen, Target::fixed(to).unwrap());
    config.backend = backend;
    config.data_path = path;
    config.workers = 2;
    let relay = Relay::start(config).unwrap();
    if uring_unavailable().is_some() {
        assert_eq!(relay.backend(), Backend::Portable, "auto falls back where io_uring cannot run");
    }
    relay
}

/// Connects to `to` once the child process listens there (30 s at most).
fn connect_when_listening(child: &mut std::process::Child, to: &Endpoint) -> Stream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Stream::connect(to) {
            Ok(client) => return client,
            Err(e) => {
                assert!(child.try_wait().unwrap().is_none(), "the process for {to} exited");
                assert!(Instant::now() < deadline, "nothing listened on {to}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn vsock(port: u32) -> Endpoint {
    Endpoint::vsock(1, port)
}

fn vsock_any(port: u32) -> Endpoint {
    Endpoint::vsock(vsock_relay_engine::endpoint::VSOCK_CID_ANY, port)
}

#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn vsock_to_tcp_byte_exact_64_connections() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let paths = [DataPath::Splice, DataPath::Copy, DataPath::Auto, DataPath::Ring];
        for (j, path) in paths.into_iter().enumerate() {
            let ledger = Ledger::default();
            let server = Server::tcp(twin(Arc::clone(&ledger)));
            let port = 10_000 + (i * paths.len() + j) as u32;
            let relay = relay(vsock_any(port), server.endpoint(), backend, path);
            check_byte_exact(&vsock(port), &ledger, cases(2 * MIB, 1));
            assert_eq!(relay.stats().snapshot().failed(), 0, "{backend:?} {path:?}");
        }
    }
}

#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn tcp_to_vsock_and_vsock_to_vsock_byte_exact() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let ledger = Ledger::default();
        let port = 11_000 + i as u32 * 10;
        let server = Server::vsock(port, twin(Arc::clone(&ledger)));
        let from_tcp =
            relay("tcp:127.0.0.1:0".parse().unwrap(), server.endpoint(), backend, DataPath::Splice);
        check_byte_exact(from_tcp.local_endpoint(), &ledger, cases(2 * MIB, 2));
        ledger.lock().unwrap().clear(); // the same connection ids again
        let from_vsock = relay(vsock_any(port + 1), server.endpoint(), backend, DataPath::Splice);
        check_byte_exact(&vsock(port + 1), &ledger, cases(2 * MIB, 3));
        drop((from_tcp, from_vsock));
    }
}

/// An upstream on vsock `port` that reads to EOF and then replies; a relay on
/// `port + 1` in front of it; a client that half-closes after its request
/// must still get the whole reply. Returns the relay.
fn client_half_close_gets_the_whole_reply(port: u32, backend: BackendChoice, path: DataPath) -> Relay {
    let replier = Server::vsock(port, |mut stream| {
        let (bytes, _) = traffic::receive(&mut stream).unwrap();
        traffic::send(&mut stream, MIB + bytes, 42).unwrap();
    });
    let relay = relay(vsock_any(port + 1), replier.endpoint(), backend, path);
    let mut client = Stream::connect(&vsock(port + 1)).unwrap();
    traffic::send(&mut client, 1000, 7).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (bytes, hash) = traffic::receive(&mut client).unwrap();
    assert_eq!((bytes, hash), (MIB + 1000, traffic::expected_hash(MIB + 1000, 42)), "{backend:?} {path:?}");
    relay
}

#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn half_close_both_ways_over_vsock() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let port = 12_000 + i as u32 * 10;
        let relay_a = client_half_close_gets_the_whole_reply(port, backend, DataPath::Splice);

        // The upstream sends and half-closes first, then reads everything.
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let sender = Server::vsock(port + 2, move |mut stream| {
            traffic::send(&mut stream, MIB, 5).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            tx.lock().unwrap().send(traffic::receive(&mut stream).unwrap()).unwrap();
        });
        let relay_b = relay(vsock_any(port + 3), sender.endpoint(), backend, DataPath::Splice);
        let mut client = Stream::connect(&vsock(port + 3)).unwrap();
        assert_eq!(traffic::receive(&mut client).unwrap(), (MIB, traffic::expected_hash(MIB, 5)));
        let sent = traffic::send(&mut client, 2 * MIB, 6).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), (2 * MIB, sent), "{backend:?}");
        drop((relay_a, relay_b));
    }
}

#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn refused_vsock_upstream_resets_only_that_client() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let port = 13_000 + i as u32 * 10;
        let relay = relay(vsock_any(port), &vsock(port + 9), backend, DataPath::Splice);
        let started = Instant::now();
        let mut client = Stream::connect(&vsock(port)).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 8];
        // vsock has no reset a peer can tell from EOF (an RST packet ends the
        // stream like a shutdown), so the client sees the end of an empty stream.
        match client.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{backend:?}: expected an empty stream or a reset, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{backend:?}: took {:?}", started.elapsed());
        assert_eq!(relay.stats().snapshot().failed(), 1);
        // The relay goes on serving once the upstream exists.
        let _server = Server::vsock(port + 9, echo);
        let mut client = Stream::connect(&vsock(port)).unwrap();
        client.write_all(b"again").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"again");
    }
}

/// The ring data path on vsock (on the portable backend it copies): the
/// client's half-close still gets the whole reply, and a destination that
/// stops reading holds the client back (at most two buffers per direction
/// in the relay) without losing a byte.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn ring_path_over_vsock_half_close_and_slow_reader() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let port = 15_000 + i as u32 * 10;
        let relay_a = client_half_close_gets_the_whole_reply(port, backend, DataPath::Ring);

        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (go_rx, done_tx) = (std::sync::Mutex::new(go_rx), std::sync::Mutex::new(done_tx));
        let stalled = Server::vsock(port + 2, move |mut stream| {
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
            done_tx.lock().unwrap().send(traffic::receive(&mut stream).unwrap()).unwrap();
        });
        let relay_b = relay(vsock_any(port + 3), stalled.endpoint(), backend, DataPath::Ring);
        let mut client = Stream::connect(&vsock(port + 3)).unwrap();
        let writer = std::thread::spawn(move || {
            let sent = traffic::send(&mut client, 32 * MIB, 9).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            sent
        });
        std::thread::sleep(Duration::from_secs(2));
        assert!(!writer.is_finished(), "{backend:?}: the client pushed 32 MiB into a stalled destination");
        go_tx.send(()).unwrap();
        let sent = writer.join().unwrap();
        let received = done_rx.recv_timeout(Duration::from_secs(120)).unwrap();
        assert_eq!(received, (32 * MIB, sent), "{backend:?}");
        assert_eq!(relay_b.stats().snapshot().failed(), 0, "{backend:?}");
        drop((relay_a, relay_b));
    }
}

/// A short smoke of the bench's request/response and churn workloads through
/// a relay over vsock, on both backends (the speed figures come from
/// `perf/compare --vsock`): every connection served, none counted as failed
/// (a vsock peer's close can read as ENOTCONN: that is an end of stream).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn rpc_and_churn_through_the_relay_over_vsock() {
    require_vsock_guest();
    let sink = bench_sink(19010);
    // The sink listens before any relay connects to it (a refused vsock
    // upstream reads as an empty stream, not as "cannot connect").
    run_when_listening(&["bench", "rpc", "--to", "vsock:1:19010", "--requests", "1"]);
    for (i, backend) in backends().into_iter().enumerate() {
        let port = 19_020 + i as u32;
        let relay = relay(vsock_any(port), &vsock(19010), backend, DataPath::Auto);
        let to = format!("vsock:1:{port}");
        let rpc = run_when_listening(&[
            "bench",
            "rpc",
            "--to",
            &to,
            "--connections",
            "4",
            "--requests",
            "100",
            "--json",
        ]);
        assert!(
            rpc.contains("\"connections\":4") && rpc.contains("\"requests_per_s\":"),
            "{backend:?}: {rpc}"
        );
        let churn = run_when_listening(&[
            "bench",
            "churn",
            "--to",
            &to,
            "--connections",
            "100",
            "--parallel",
            "4",
            "--json",
        ]);
        assert!(churn.contains("\"connections\":100"), "{backend:?}: {churn}");
        let stats = relay.stats().snapshot();
        assert_eq!((stats.accepted, stats.failed()), (104, 0), "{backend:?}");
        println!("{backend:?}: {}{}", rpc.trim_end(), churn.trim_end());
    }
    drop(sink);
}

/// io_uring CONNECT on vsock sometimes completes with EALREADY although the
/// connection is up (seen in the guests of tests/vm); the relay's connects
/// must never fail for it.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn three_hundred_vsock_connects_through_the_relay() {
    require_vsock_guest();
    for (i, backend) in backends().into_iter().enumerate() {
        let port = 14_000 + i as u32 * 10;
        let server = Server::vsock(port, echo);
        let relay = relay(vsock_any(port + 1), server.endpoint(), backend, DataPath::Splice);
        for n in 0..300u32 {
            let mut client = Stream::connect(&vsock(port + 1)).unwrap();
            client.write_all(&n.to_le_bytes()).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).unwrap_or_else(|e| panic!("{backend:?}: connection {n}: {e}"));
            assert_eq!(reply, n.to_le_bytes(), "{backend:?}: connection {n}");
        }
        let stats = relay.stats().snapshot();
        assert_eq!((stats.accepted, stats.failed()), (300, 0), "{backend:?}");
    }
}

/// `vsock-proxy` with the default `--backend auto` says which backend it
/// chose and why: io_uring where the engine's probe passes; portable, with
/// the kernel's reason, where io_uring is disabled (kernel.io_uring_disabled)
/// or lacks what the engine needs (Linux 5.10: older than the backend supports).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn auto_names_the_backend_and_why() {
    require_vsock_guest();
    let config = std::env::temp_dir().join("vsock-proxy-auto.yaml");
    std::fs::write(&config, "allowlist:\n- {address: 127.0.0.1, port: 9}\n").unwrap();
    let mut proxy = Command::new(vsock_relay_testkit::binary("vsock-proxy"))
        .args(["18005", "127.0.0.1", "9", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = std::io::BufReader::new(proxy.stderr.take().unwrap());
    while !log.contains("relay listening") {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0, "the proxy exited:\n{log}");
        log.push_str(&line);
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    match uring_unavailable() {
        None => assert!(log.contains("backend chosen: io_uring (setup and opcode probe passed)"), "{log}"),
        Some(why) => {
            let expected = format!("backend chosen: portable, io_uring unavailable: {why}");
            assert!(log.contains(&expected), "expected `{expected}` in:\n{log}");
            eprintln!("[guest] auto chose portable: {why}");
            if io_uring_disabled() {
                assert!(why.contains("Operation not permitted"), "disabled by the sysctl: {why}");
            }
        }
    }
}

/// `vsock-proxy` as the workshop starts it, with the remote host mapped to a
/// TCP server in the guest; a client connects over vsock CID 1.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn vsock_proxy_binary_as_the_workshop_runs_it() {
    require_vsock_guest();
    let server = Server::tcp(echo);
    let port = server.tcp_addr().port().to_string();
    let config = std::env::temp_dir().join("vsock-proxy-guest.yaml");
    std::fs::write(&config, format!("allowlist:\n- {{address: localhost, port: {port}}}\n")).unwrap();
    let mut proxy = Command::new(vsock_relay_testkit::binary("vsock-proxy"))
        .args(["18001", "localhost", &port, "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut client = connect_when_listening(&mut proxy, &vsock(18001));
    let sent = traffic::send(&mut client, 8 * MIB, 11).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (bytes, hash) = traffic::receive(&mut client).unwrap();
    assert_eq!((bytes, hash), (8 * MIB, sent));
    let _ = proxy.kill();
    let _ = proxy.wait();
}

/// One bulk stream vsock -> relay -> TCP against vsock -> vsock direct, as a
/// ratio (emulated CPU: only the ratio means anything).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn throughput_ratio_through_the_relay() {
    require_vsock_guest();
    let bytes = 32 * MIB;
    let sink = |mut stream: Stream| {
        let (n, _) = traffic::receive(&mut stream).unwrap();
        let _ = stream.write_all(&n.to_le_bytes());
    };
    let vsock_sink = Server::vsock(15_100, sink);
    let tcp_sink = Server::tcp(sink);
    let relay = relay(vsock_any(15_101), tcp_sink.endpoint(), backends()[0], DataPath::Splice);
    let mut payload = vec![0u8; MIB as usize];
    traffic::Data::new(3).fill(&mut payload);
    let push = |to: &Endpoint| {
        let started = Instant::now();
        let mut stream = Stream::connect(to).unwrap();
        for _ in 0..bytes / MIB {
            stream.write_all(&payload).unwrap();
        }
        stream.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count), bytes);
        bytes as f64 / started.elapsed().as_secs_f64() / 1e6
    };
    let direct = push(vsock_sink.endpoint());
    let relayed = push(&vsock(15_101));
    println!(
        "THROUGHPUT vsock->vsock direct {direct:.1} MB/s, vsock->relay->tcp {relayed:.1} MB/s, ratio {:.2} ({})",
        relayed / direct,
        relay.backend()
    );
}

/// `vsock-relay forward` in the workshop's positional form: TCP in the
/// "enclave" forwarded to a vsock port (CID 1 here, the parent's 3 there).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn forward_binary_in_the_workshop_form() {
    require_vsock_guest();
    let server = Server::vsock(16_000, |mut stream| {
        let (bytes, _) = traffic::receive(&mut stream).unwrap();
        let _ = stream.write_all(&bytes.to_le_bytes());
    });
    let mut forwarder = Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["forward", "127.0.0.1", "4443", "1", "16000"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut client = connect_when_listening(&mut forwarder, &"tcp:127.0.0.1:4443".parse().unwrap());
    traffic::send(&mut client, 3 * MIB, 4).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    client.read_exact(&mut count).unwrap();
    assert_eq!(
        u64::from_le_bytes(count),
        3 * MIB,
        "the vsock server got every byte, then answered after EOF"
    );
    drop(server);
    let _ = forwarder.kill();
    let _ = forwarder.wait();
}

/// Runs `vsock-relay ARGS` until it succeeds, retrying while its server
/// is not listening yet (30 s at most); returns its stdout.
fn run_when_listening(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(vsock_relay_testkit::binary("vsock-relay")).args(args).output().unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot connect") && Instant::now() < deadline, "{args:?}: {stderr}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `vsock-relay client` in the workshop's form: its answer.
fn client_answer(port: u32, region: &str) -> String {
    run_when_listening(&["client", "1", &port.to_string(), region])
}

/// The workshop's secure local channel with real vsock hops: client ->
/// (vsock) server -> forwarder -> (vsock) vsock-proxy -> HTTPS endpoint.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn whole_channel_over_vsock() {
    use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
    require_vsock_guest();
    let endpoint = HttpsEndpoint::start(SAMPLE_DOCUMENT.to_vec()).unwrap();
    let dir = std::env::temp_dir().join("whole-channel");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_file, allowlist) = (dir.join("ca.pem"), dir.join("vsock-proxy.yaml"));
    std::fs::write(&ca_file, endpoint.ca_pem()).unwrap();
    let port = endpoint.port().to_string();
    std::fs::write(&allowlist, format!("allowlist:\n- {{address: localhost, port: {port}}}\n")).unwrap();
    let spawn = |binary: &str, args: &[&str]| {
        Command::new(vsock_relay_testkit::binary(binary)).args(args).stderr(Stdio::null()).spawn().unwrap()
    };
    let mut children = KillOnDrop(vec![
        spawn("vsock-proxy", &["17000", "localhost", &port, "--config", allowlist.to_str().unwrap()]),
        spawn("vsock-relay", &["forward", "127.0.0.1", "4444", "1", "17000"]),
        spawn(
            "vsock-relay",
            &[
                "serve",
                "17005",
                "--url",
                "https://localhost:4444/ip-ranges.json",
                "--ca-file",
                ca_file.to_str().unwrap(),
            ],
        ),
    ]);
    // The server must not fetch before the hops behind it listen.
    drop(connect_when_listening(&mut children.0[0], &vsock(17_000)));
    drop(connect_when_listening(&mut children.0[1], &"tcp:127.0.0.1:4444".parse().unwrap()));
    assert_eq!(
        client_answer(17_005, "us-east-1"),
        "[\"3.5.0.0/19\", \"16.182.0.0/16\", \"52.216.0.0/15\"]\n"
    );
    assert_eq!(client_answer(17_005, "eu-west-1"), "[\"3.5.64.0/21\", \"52.218.0.0/17\"]\n");
    assert_eq!(client_answer(17_005, "mars-north-1"), "[]\n");
    assert_eq!(endpoint.requests(), 1, "the server fetched once, through forwarder and proxy");
    for child in &mut children.0 {
        assert!(child.try_wait().unwrap().is_none(), "an app of the channel exited");
    }
}

/// Routed egress and the client's address into the enclave, over real
/// vsock: the enclave's sample server fetches through its forwarder and the
/// parent's `proxy --route connect` (by name, resolved on the parent side),
/// and a parent TCP port relays clients to it with a PROXY protocol v2
/// header: the server logs each client's real address. Both backends.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn routed_egress_and_the_clients_address_over_vsock() {
    use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
    use vsock_relay_testkit::names::{Answer, NameServer};
    require_vsock_guest();
    let endpoint = HttpsEndpoint::start(SAMPLE_DOCUMENT.to_vec()).unwrap();
    let names = NameServer::start();
    names.set("ip-ranges.amazonaws.com", Answer::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    let dir = std::env::temp_dir().join("routed-egress");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_file, allowlist) = (dir.join("ca.pem"), dir.join("egress.yaml"));
    std::fs::write(&ca_file, endpoint.ca_pem()).unwrap();
    let port = endpoint.port();
    let entries = format!(
        "- {{address: ip-ranges.amazonaws.com, port: {port}}}\n- {{address: 127.0.0.0/8, port: {port}}}"
    );
    std::fs::write(&allowlist, format!("allowlist:\n{entries}\n")).unwrap();
    for (i, backend) in backends().into_iter().enumerate() {
        let backend = match backend {
            BackendChoice::Uring => "uring",
            BackendChoice::Portable => "portable",
            BackendChoice::Auto => "auto",
        };
        let base = 17_100 + 10 * i as u32;
        let (proxy_port, server_port, forward_port, ingress_port) = (base, base + 5, 4_450 + i, 4_460 + i);
        let server_log = dir.join(format!("serve-{backend}.log"));
        let spawn = |args: &[&str], log: Option<&std::path::Path>| {
            let stderr = match log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            };
            Command::new(vsock_relay_testkit::binary("vsock-relay"))
                .args(args)
                // Every relaying command (the server is none).
                .args(if args[0] == "serve" { vec![] } else { vec!["--backend", backend] })
                .env("RUST_LOG", "info")
                .stderr(stderr)
                .spawn()
                .unwrap()
        };
        let url = format!("https://ip-ranges.amazonaws.com:{port}/ip-ranges.json");
        let (dns, forward_proxy) = (names.addr().to_string(), format!("http://127.0.0.1:{forward_port}"));
        let mut children = KillOnDrop(vec![
            // parent: one routed port for every allowed host
            spawn(
                &[
                    "proxy",
                    "--listen",
                    &format!("vsock:any:{proxy_port}"),
                    "--route",
                    "connect",
                    "--config",
                    allowlist.to_str().unwrap(),
                    "--dns-server",
                    &dns,
                ],
                None,
            ),
            // enclave: the forwarder to it, and the server using it as its proxy
            spawn(
                &[
                    "forward",
                    "--listen",
                    &format!("tcp:127.0.0.1:{forward_port}"),
                    "--to",
                    &format!("vsock:1:{proxy_port}"),
                ],
                None,
            ),
            spawn(
                &[
                    "serve",
                    "--listen",
                    &format!("vsock:any:{server_port}"),
                    "--url",
                    &url,
                    "--ca-file",
                    ca_file.to_str().unwrap(),
                    "--proxy",
                    &forward_proxy,
                    "--proxy-protocol",
                ],
                Some(&server_log),
            ),
            // parent: a TCP port into the enclave's server, with the client's address
            spawn(
                &[
                    "relay",
                    "--listen",
                    &format!("tcp:127.0.0.1:{ingress_port}"),
                    "--to",
                    &format!("vsock:1:{server_port}"),
                    "--proxy-protocol",
                    "v2",
                ],
                None,
            ),
        ]);
        drop(connect_when_listening(&mut children.0[0], &vsock(proxy_port)));
        drop(connect_when_listening(
            &mut children.0[1],
            &format!("tcp:127.0.0.1:{forward_port}").parse().unwrap(),
        ));
        drop(connect_when_listening(
            &mut children.0[3],
            &format!("tcp:127.0.0.1:{ingress_port}").parse().unwrap(),
        ));
        // The server (probed without a header: it only logs that).
        drop(connect_when_listening(&mut children.0[2], &vsock(server_port)));
        let mut client = Stream::connect(&format!("tcp:127.0.0.1:{ingress_port}").parse().unwrap()).unwrap();
        let Stream::Tcp(tcp) = &client else { unreachable!() };
        let client_address = tcp.local_addr().unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        client.write_all(b"us-east-1").unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "[\"3.5.0.0/19\", \"16.182.0.0/16\", \"52.216.0.0/15\"]", "{backend}");
        let log = std::fs::read_to_string(&server_log).unwrap();
        assert!(
            log.contains(&format!("client=127.0.0.1:{}", client_address.port()))
                && log.contains("client address from the PROXY protocol header"),
            "{backend}: the server did not log the client's address {client_address}:\n{log}"
        );
        for child in &mut children.0 {
            assert!(child.try_wait().unwrap().is_none(), "{backend}: an app exited");
        }
    }
    assert_eq!(
        endpoint.requests(),
        backends().len() as u64,
        "one fetch per server, each through the routed port"
    );
}

/// The enclave image's entry script (dist/enclave/entry.sh) as the guest's
/// init (tests/vm/init, role `enclave`, execs it as PID 1 with
/// PARENT_CID=1): this test is the parent around it. It stands in for
/// ip-ranges.amazonaws.com (an HTTPS endpoint whose certificate names it),
/// runs `vsock-proxy 8001 localhost PORT` as the workshop's parent does, and
/// asks the enclave's server on vsock port 5005 with the workshop's client:
/// the answer crossed the server, the entry script's hosts line and
/// forwarder, real vsock, and the proxy.
#[test]
#[ignore = "runs only in the enclave-entry guest: tests/vm/run.sh"]
fn enclave_entry_script_as_init_answers_through_forwarder_and_proxy() {
    use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
    require_vsock_guest();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap();
    assert!(
        cmdline.contains("vsock_relay_role=enclave"),
        "the entry script is not this guest's init: {cmdline}"
    );
    let endpoint = HttpsEndpoint::start(SAMPLE_DOCUMENT.to_vec()).unwrap();
    let allowlist = std::env::temp_dir().join("parent-vsock-proxy.yaml");
    let port = endpoint.port().to_string();
    std::fs::write(&allowlist, format!("allowlist:\n- {{address: localhost, port: {port}}}\n")).unwrap();
    let mut proxy = KillOnDrop(vec![Command::new(vsock_relay_testkit::binary("vsock-proxy"))
        .args(["8001", "localhost", &port, "--config", allowlist.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    drop(connect_when_listening(&mut proxy.0[0], &vsock(8001)));
    // The init waits for this file before it starts the entry script.
    let ca = std::env::temp_dir().join("enclave-ca.pem");
    std::fs::write(ca.with_extension("tmp"), endpoint.ca_pem()).unwrap();
    std::fs::rename(ca.with_extension("tmp"), &ca).unwrap();
    assert_eq!(client_answer(5005, "us-east-1"), "[\"3.5.0.0/19\", \"16.182.0.0/16\", \"52.216.0.0/15\"]\n");
    assert_eq!(client_answer(5005, "eu-west-1"), "[\"3.5.64.0/21\", \"52.218.0.0/17\"]\n");
    assert_eq!(endpoint.requests(), 1, "fetched once, through the entry script's forwarder and the proxy");
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    assert!(
        hosts.lines().any(|l| l.split_whitespace().eq(["127.0.0.1", "ip-ranges.amazonaws.com"])),
        "{hosts}"
    );
}

/// Child processes killed when the test ends, even by a panic (so a second
/// pass finds the ports free).
struct KillOnDrop(Vec<std::process::Child>);

/// `vsock-relay bench sink` on vsock `port`, killed when dropped.
fn bench_sink(port: u32) -> KillOnDrop {
    KillOnDrop(vec![Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["bench", "sink", "--listen", &format!("vsock:any:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()])
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `vsock-relay demo` takes the AF_VSOCK loopback where the kernel has it.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn demo_over_vsock_loopback() {
    require_vsock_guest();
    let out = Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["demo", "--transport", "vsock", "--throughput-mib", "32"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "vsock hops: AF_VSOCK loopback (CID 1)",
        "client us-east-1: [\"3.5.0.0/19\", \"16.182.0.0/16\", \"52.216.0.0/15\"]",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no `{line}` in:\n{stdout}");
    }
    println!("{}", stdout.lines().find(|l| l.starts_with("throughput:")).unwrap_or("no throughput line"));
}

/// `vsock-relay bench` over AF_VSOCK: its sink on vsock, bulk and rpc to it.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn bench_over_vsock() {
    require_vsock_guest();
    let sink = bench_sink(19000);
    let bulk = run_when_listening(&[
        "bench",
        "bulk",
        "--to",
        "vsock:1:19000",
        "--streams",
        "2",
        "--bytes",
        "8MiB",
        "--json",
    ]);
    assert!(bulk.starts_with("{\"bulk\":{") && bulk.contains("\"bytes_per_stream\":8388608"), "{bulk}");
    let rpc = run_when_listening(&["bench", "rpc", "--to", "vsock:1:19000", "--requests", "200"]);
    assert!(rpc.starts_with("rpc: 1 connection(s) x 200 round trips of 64 B to vsock:1:19000: "), "{rpc}");
    println!("{}{}", bulk.trim_end(), rpc.trim_end());
    drop(sink);
}

/// `--allow-cid` on real vsock: the guest's clients come from CID 1, so a
/// relay allowing 1 serves them and one allowing only 2 refuses them (reset,
/// counted, not accepted). Also one owner per vsock port: a second relay on
/// it gets "address in use".
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn allow_cid_serves_listed_cids_and_refuses_the_rest() {
    require_vsock_guest();
    let _server = Server::vsock(13_509, echo);
    for (i, backend) in backends().into_iter().enumerate() {
        for (allowed, served) in [(1, true), (2, false)] {
            let port = 13_500 + i as u32 * 2 + u32::from(!served);
            let mut config = RelayConfig::new(vsock_any(port), Target::fixed(&vsock(13_509)).unwrap());
            config.backend = backend;
            config.service().rules.allow_cids = Some(vec![allowed]);
            let relay = Relay::start(config).unwrap();
            let second =
                Relay::start(RelayConfig::new(vsock_any(port), Target::fixed(&vsock(13_509)).unwrap()));
            let err = second.err().expect("a second relay on the same vsock port").to_string();
            assert!(err.contains("(os error 98)"), "address in use: {err}");

            let mut client = Stream::connect(&vsock(port)).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = client.write_all(b"cid?");
            let mut reply = [0u8; 4];
            let got = client.read(&mut reply);
            let stats = relay.stats().snapshot();
            if served {
                assert_eq!(got.unwrap(), 4, "{backend:?}: CID 1 allowed");
                assert_eq!(&reply, b"cid?");
                assert_eq!((stats.accepted, stats.refused()), (1, 0));
            } else {
                assert!(matches!(got, Ok(0) | Err(_)), "{backend:?}: CID 1 refused, got {got:?}");
                let deadline = Instant::now() + Duration::from_secs(5);
                while relay.stats().snapshot().refused() == 0 {
                    assert!(Instant::now() < deadline, "{backend:?}: the refusal is counted");
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert_eq!(relay.stats().snapshot().accepted, 0);
            }
        }
    }
}

/// The soak over real vsock (`VSOCK_VM_SOAK_SECONDS=600 tests/vm/run.sh`
/// boots a guest for it alone; the suite's boots skip it): two chains side
/// by side, forwarder -> vsock -> proxy on the io_uring backend and on the
/// portable one, each under its own chaos schedule, at a quarter of the
/// host's traffic rate (the guest's CPU is emulated). Each prints one
/// `SOAK-SUMMARY` line (JSON) for perf/soak-report.
#[test]
#[ignore = "needs the vsock guest: VSOCK_VM_SOAK_SECONDS=600 tests/vm/run.sh"]
fn soak_over_vsock_both_backends() {
    require_vsock_guest();
    let seconds: u64 = std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vsock_relay_soak_seconds=")?.parse().ok())
        .unwrap_or(600);
    let runs: Vec<_> = [("uring", 17200u16, 11u64), ("portable", 17400, 12)]
        .into_iter()
        .map(|(backend, port_base, seed)| {
            std::thread::spawn(move || {
                let mut options = vsock_relay_testkit::soak::Options::new(
                    seconds,
                    seed,
                    std::env::temp_dir().join(format!("soak-{backend}")),
                );
                options.backend = backend.into();
                options.port_base = port_base;
                options.vsock = true;
                options.rate = 0.25;
                let outcome = vsock_relay_testkit::soak::run(&options).expect("the soak runs");
                println!("SOAK-SUMMARY {backend} {}", outcome.summary);
                (backend, outcome.problems)
            })
        })
        .collect();
    let mut problems = Vec::new();
    for run in runs {
        let (backend, found) = run.join().expect("soak thread");
        problems.extend(found.into_iter().map(|p| format!("{backend}: {p}")));
    }
    assert!(problems.is_empty(), "soak problems:\n{}", problems.join("\n"));
}

/// DNS for the enclave over real vsock: `vsock-relay dns` (UDP on
/// loopback) to the parent's `route: dns` service on vsock, both in this
/// guest. Allowed names are answered, others refused; and the time a
/// cached lookup takes through the forwarder is printed next to the
/// parent's own (its DNS service asked over loopback TCP): the forwarder
/// and the vsock hop are the difference (perf reads the line; a speed
/// figure is a benchmark's, not an assertion).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn dns_over_vsock_answers_allowed_names_and_adds_little_to_a_lookup() {
    use std::net::{TcpStream, UdpSocket};

    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use vsock_relay_testkit::names::{Answer, NameServer};
    require_vsock_guest();
    let names = NameServer::start();
    names.set("kms.us-east-1.amazonaws.com", Answer::Addresses(vec!["192.0.2.10".parse().unwrap()]));
    let dir = std::env::temp_dir().join("dns-over-vsock");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("parent.yaml");
    std::fs::write(
        &config,
        "allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\nservices:\n\
         - {name: enclave-dns, listen: 'vsock:any:18053', route: dns}\n\
         - {name: local-dns, listen: 'tcp:127.0.0.1:18054', route: dns}\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let name_server = names.addr().to_string();
    let binary = vsock_relay_testkit::binary("vsock-relay");
    let parent = Command::new(&binary)
        .args(["proxy", "--services", &config, "--config", &config, "--dns-server", &name_server])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let forwarder = Command::new(&binary)
        .args(["dns", "--listen", "udp:127.0.0.1:18055", "--to", "vsock:1:18053"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _children = KillOnDrop(vec![parent, forwarder]);
    let query = |id: u16, name: &str| {
        let mut message = Message::query();
        message.metadata.id = id;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        message.to_vec().unwrap()
    };
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    udp.connect("127.0.0.1:18055").unwrap();
    let through_forwarder = |id: u16, name: &str| -> Option<Message> {
        udp.send(&query(id, name)).ok()?;
        let mut buf = [0u8; 1500];
        let n = udp.recv(&mut buf).ok()?;
        Message::from_vec(&buf[..n]).ok()
    };
    // Until both are up (a minute at most).
    let started = Instant::now();
    let first = loop {
        match through_forwarder(1, "kms.us-east-1.amazonaws.com.") {
            Some(answer) if answer.metadata.response_code == ResponseCode::NoError => break answer,
            _ if started.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("no answer through the forwarder within a minute: {other:?}"),
        }
    };
    assert_eq!((first.metadata.id, first.answers.len()), (1, 1));
    let refused = through_forwarder(2, "example.com.").expect("an answer");
    assert_eq!((refused.metadata.id, refused.metadata.response_code), (2, ResponseCode::Refused));
    let mut tcp = TcpStream::connect("127.0.0.1:18054").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut direct = |id: u16, name: &str| -> Message {
        tcp.write_all(&vsock_relay_apps::dns::frame::encode_frame(&query(id, name)).unwrap()).unwrap();
        let mut length = [0u8; 2];
        tcp.read_exact(&mut length).unwrap();
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
        tcp.read_exact(&mut answer).unwrap();
        Message::from_vec(&answer).unwrap()
    };
    let (mut parents, mut forwarded) = (Vec::new(), Vec::new());
    for id in 10..210u16 {
        let asked = Instant::now();
        assert_eq!(direct(id, "kms.us-east-1.amazonaws.com.").answers.len(), 1);
        parents.push(asked.elapsed());
        let asked = Instant::now();
        let answer = through_forwarder(id, "kms.us-east-1.amazonaws.com.").expect("an answer");
        forwarded.push(asked.elapsed());
        assert_eq!((answer.metadata.id, answer.answers.len()), (id, 1));
    }
    parents.sort();
    forwarded.sort();
    let (parent, through) = (parents[parents.len() / 2], forwarded[forwarded.len() / 2]);
    println!(
        "PERF dns lookup (cached, median of 200): parent's own {} us, through the enclave's forwarder over vsock {} us, adds {} us",
        parent.as_micros(),
        through.as_micros(),
        through.saturating_sub(parent).as_micros()
    );
}
