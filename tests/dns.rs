//! DNS re-resolution through the proxy binary, with a name server the test
//! controls: the address follows a change after its TTL, a failing
//! resolver keeps the last good address instead of stopping the proxy, and
//! the allowlist holds for the address actually used, at start and after
//! every move.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use vsock_relay_testkit::servers::Stream;

use crate::util::{backend_arg, wait_for_unix, Proc, TempDir, BACKENDS};

const NAME: &str = "upstream.relay.test";

/// What the test name server answers for NAME.
#[derive(Clone, Debug)]
enum Answer {
    Addresses(Vec<Ipv4Addr>),
    ServerFailure,
}

/// A one-name DNS server on loopback UDP, TTL 1 second.
fn name_server(answer: Arc<Mutex<Answer>>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::new(query.metadata.id, MessageType::Response, query.metadata.op_code);
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.metadata.authoritative = true;
            for q in &query.queries {
                reply.add_query(q.clone());
            }
            match &*answer.lock().unwrap() {
                Answer::ServerFailure => reply.metadata.response_code = ResponseCode::ServFail,
                Answer::Addresses(ips) => {
                    for q in &query.queries {
                        let asked = q.name().to_string();
                        if q.query_type() == RecordType::A && asked.trim_end_matches('.') == NAME {
                            for ip in ips {
                                reply.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(*ip))));
                            }
                        }
                    }
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, from);
            }
        }
    });
    addr
}

/// A server on `ip:port` that answers every connection with `name`.
fn named_server(ip: Ipv4Addr, port: u16, name: &'static str) -> TcpListener {
    let listener = TcpListener::bind((ip, port)).unwrap();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for stream in accepting.incoming().flatten() {
            let mut stream = stream;
            let _ = std::io::Write::write_all(&mut stream, name.as_bytes());
        }
    });
    listener
}

fn ask(endpoint: &vsock_relay_engine::Endpoint) -> String {
    let mut stream = Stream::connect(endpoint).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Starts `vsock-relay proxy NAME port` on a Unix socket, asking the test's
/// name server, with `allowed` as the allowlist entry's address. `Err`: the
/// proxy exited (its code and stderr).
fn start_proxy(
    dir: &TempDir,
    backend: &str,
    answer: &Arc<Mutex<Answer>>,
    allowed: &str,
    port: u16,
) -> Result<(Proc, vsock_relay_engine::Endpoint), (Option<i32>, String)> {
    let dns = name_server(Arc::clone(answer));
    let cfg = dir.path("allow.yaml");
    std::fs::write(&cfg, format!("allowlist:\n- {{address: {allowed}, port: {port}}}\n")).unwrap();
    let listen = dir.path("proxy.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let (cfg_arg, dns_arg, port_arg) = (cfg.display().to_string(), dns.to_string(), port.to_string());
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &[
            "proxy",
            "--backend",
            backend,
            "--listen",
            &listen_arg,
            "--config",
            &cfg_arg,
            "--dns-server",
            &dns_arg,
            NAME,
            &port_arg,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy.stderr().contains("relay listening") {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50));
            return Err((status.code(), proxy.stderr()));
        }
        assert!(Instant::now() < deadline, "the proxy did not start:\n{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_unix(&listen, Duration::from_secs(5));
    Ok((proxy, listen_arg.parse().unwrap()))
}

/// The name has two addresses; only the second is allowlisted, and the
/// proxy would connect to the first: it refuses to start (AWS's rule; this
/// proxy used to pass when any address matched).
#[test]
fn a_name_whose_used_address_is_not_allowed_is_refused_at_start() {
    let answer = Arc::new(Mutex::new(Answer::Addresses(vec![A_IP, B_IP])));
    let dir = TempDir::new("dns");
    let Err((code, stderr)) = start_proxy(&dir, "auto", &answer, &B_IP.to_string(), 9) else {
        panic!("the proxy started although 127.0.0.2 is not allowlisted");
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: the given address and port are not allowed: {NAME}:9 (resolved to 127.0.0.2) matches no entry of"
        )),
        "{stderr}"
    );
    // The allowlisted address first: allowed.
    *answer.lock().unwrap() = Answer::Addresses(vec![B_IP, A_IP]);
    let (proxy, _) = start_proxy(&dir, "auto", &answer, &B_IP.to_string(), 9).unwrap();
    assert!(proxy.stderr().contains("allowed: address matches"), "{}", proxy.stderr());
}

/// The allowlist names an address; DNS later moves the name elsewhere: the
/// move is refused with an error log and the allowed address stays in use.
#[test]
fn a_dns_move_to_an_address_no_entry_allows_is_refused() {
    for backend in BACKENDS {
        let a = named_server(A_IP, 0, "A");
        let port = a.local_addr().unwrap().port();
        let _b = named_server(B_IP, port, "B");
        let answer = Arc::new(Mutex::new(Answer::Addresses(vec![A_IP])));
        let dir = TempDir::new("dns");
        let (mut proxy, endpoint) =
            start_proxy(&dir, backend_arg(backend), &answer, &A_IP.to_string(), port).unwrap();
        assert_eq!(ask(&endpoint), "A");
        *answer.lock().unwrap() = Answer::Addresses(vec![B_IP]);
        proxy.wait_for_log("refusing the upstream's new address", Duration::from_secs(15));
        for _ in 0..3 {
            assert_eq!(ask(&endpoint), "A", "the last allowed address stays in use");
        }
        let log = proxy.stderr();
        assert!(log.contains("address=127.0.0.3 reason=the given address and port are not allowed"), "{log}");
        assert!(!log.contains("upstream address changed"), "{log}");
        // Back to an allowed address: nothing to refuse, still served.
        *answer.lock().unwrap() = Answer::Addresses(vec![A_IP]);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(ask(&endpoint), "A");
        assert_eq!(log.matches("refusing the upstream's new address").count(), 1, "logged once: {log}");
    }
}

#[test]
fn proxy_follows_dns_changes_and_survives_resolver_failure() {
    for backend in BACKENDS {
        follows_dns(backend_arg(backend));
    }
}

fn follows_dns(backend: &str) {
    let a = named_server(Ipv4Addr::new(127, 0, 0, 2), 0, "A");
    let port = a.local_addr().unwrap().port();
    let _b = named_server(Ipv4Addr::new(127, 0, 0, 3), port, "B");
    let answer = Arc::new(Mutex::new(Answer::Addresses(vec![A_IP])));
    let dir = TempDir::new("dns");
    let (mut proxy, endpoint) = start_proxy(&dir, backend, &answer, NAME, port).unwrap();
    assert_eq!(ask(&endpoint), "A");

    *answer.lock().unwrap() = Answer::Addresses(vec![B_IP]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&endpoint) != "B" {
        assert!(Instant::now() < deadline, "the proxy never followed the new address:\n{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }

    *answer.lock().unwrap() = Answer::ServerFailure;
    proxy.wait_for_log("keeping the last good address", Duration::from_secs(15));
    assert_eq!(ask(&endpoint), "B", "the last good address is still used");
    assert!(proxy.child.try_wait().unwrap().is_none(), "the proxy is still running");
    assert!(proxy.stderr().contains("upstream address changed"));
}
