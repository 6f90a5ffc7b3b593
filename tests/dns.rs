//! DNS re-resolution through the proxy binary, with a name server the test
//! controls: the address follows a change after its TTL, and a failing
//! resolver keeps the last good address instead of stopping the proxy.

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
#[derive(Clone, Copy, Debug)]
enum Answer {
    Address(Ipv4Addr),
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
            match *answer.lock().unwrap() {
                Answer::ServerFailure => reply.metadata.response_code = ResponseCode::ServFail,
                Answer::Address(ip) => {
                    for q in &query.queries {
                        let asked = q.name().to_string();
                        if q.query_type() == RecordType::A && asked.trim_end_matches('.') == NAME {
                            reply.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(ip))));
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
    let answer = Arc::new(Mutex::new(Answer::Address(Ipv4Addr::new(127, 0, 0, 2))));
    let dns = name_server(Arc::clone(&answer));

    let dir = TempDir::new("dns");
    let cfg = dir.path("allow.yaml");
    std::fs::write(&cfg, format!("allowlist:\n- {{address: {NAME}, port: {port}}}\n")).unwrap();
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
    proxy.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&listen, Duration::from_secs(5));
    let endpoint = listen_arg.parse().unwrap();
    assert_eq!(ask(&endpoint), "A");

    *answer.lock().unwrap() = Answer::Address(Ipv4Addr::new(127, 0, 0, 3));
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
