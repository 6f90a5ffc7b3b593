//! A name server on loopback UDP whose answers a test sets: per name, the
//! addresses (A and AAAA records, TTL 1 s), a server failure, or a delay
//! before the answer. Names it was not told about get NXDOMAIN. Each query
//! is answered on a thread of its own, so a slow name delays only itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

/// What the server answers for one name.
#[derive(Clone, Debug)]
pub enum Answer {
    Addresses(Vec<IpAddr>),
    ServerFailure,
}

type Zone = Arc<Mutex<HashMap<String, (Answer, Duration)>>>;

/// A running name server; it serves until the test process ends.
pub struct NameServer {
    addr: SocketAddr,
    zone: Zone,
}

impl NameServer {
    /// Starts a name server on 127.0.0.1 (a free port).
    pub fn start() -> NameServer {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind the name server"));
        let addr = socket.local_addr().expect("its address");
        let zone: Zone = Arc::default();
        let shared = Arc::clone(&zone);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let (socket, zone) = (Arc::clone(&socket), Arc::clone(&shared));
                std::thread::spawn(move || answer(&socket, from, &query, &zone));
            }
        });
        NameServer { addr, zone }
    }

    /// Where to send queries (`--dns-server`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, answer `name` with `answer`.
    pub fn set(&self, name: &str, answer: Answer) {
        self.set_delayed(name, answer, Duration::ZERO);
    }

    /// From now on, answer `name` with `answer` after `delay`.
    pub fn set_delayed(&self, name: &str, answer: Answer, delay: Duration) {
        self.zone.lock().unwrap().insert(name.trim_end_matches('.').to_ascii_lowercase(), (answer, delay));
    }
}

fn answer(socket: &UdpSocket, from: SocketAddr, query: &Message, zone: &Zone) {
    let mut reply = Message::new(query.metadata.id, MessageType::Response, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    let mut delay = Duration::ZERO;
    for q in &query.queries {
        reply.add_query(q.clone());
        let asked = q.name().to_string().trim_end_matches('.').to_ascii_lowercase();
        let known = zone.lock().unwrap().get(&asked).cloned();
        match known {
            None => reply.metadata.response_code = ResponseCode::NXDomain,
            Some((Answer::ServerFailure, wait)) => {
                delay = wait;
                reply.metadata.response_code = ResponseCode::ServFail;
            }
            Some((Answer::Addresses(ips), wait)) => {
                delay = wait;
                for ip in ips {
                    let data = match (ip, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    reply.add_answer(Record::from_rdata(q.name().clone(), 1, data));
                }
            }
        }
    }
    std::thread::sleep(delay);
    if let Ok(bytes) = reply.to_vec() {
        let _ = socket.send_to(&bytes, from);
    }
}
