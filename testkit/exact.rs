//! The byte-exact check: many concurrent connections of varied sizes
//! through a relay to a [`twin`](crate::servers::twin) server, SHA-256
//! compared in both directions.

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use vsock_relay_engine::Endpoint;

use crate::servers::{Ledger, Received, Stream};
use crate::traffic::{self, hex, Rng};

const MIB: u64 = 1 << 20;

/// One connection of the byte-exact check: bytes client -> server and back.
pub struct Case {
    pub id: u64,
    pub up: u64,
    pub down: u64,
}

/// 64 connections from 0 B to `max` bytes each way, mostly small, two at `max`.
pub fn cases(max: u64, seed: u64) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    let fixed = [(0, 0), (1, 0), (0, 1), (1, 1), (8191, 65_537), (MIB + 1, 3), (max, 1024), (1024, max)];
    let mut cases: Vec<Case> =
        fixed.iter().enumerate().map(|(i, &(up, down))| Case { id: i as u64, up, down }).collect();
    while cases.len() < 64 {
        // Log-uniform up to 4 MiB: many small, some large.
        let mut size = || {
            let bits = rng.between(0, 22);
            rng.between(0, (1u64 << bits).min(max))
        };
        cases.push(Case { id: cases.len() as u64, up: size(), down: size() });
    }
    cases
}

/// What one connection's client sent upstream: (case id, bytes, SHA-256).
pub type Upload = (u64, u64, [u8; 32]);

/// The seed of case `id`'s upstream bytes: a server in another VM derives
/// what the client sent from the case list alone.
fn up_seed(id: u64) -> u64 {
    id * 104_729 + 2
}

/// Runs `cases` concurrently through `relay_endpoint` to a twin server and
/// compares SHA-256 both ways.
pub fn check_byte_exact(relay_endpoint: &Endpoint, ledger: &Ledger, cases: Vec<Case>) {
    let sent = run_clients(relay_endpoint, cases);
    check_uploads(ledger, &sent);
}

/// The client side of the check alone: every case's connection at once,
/// each asserting the SHA-256 of what came back; returns what each sent.
pub fn run_clients(relay_endpoint: &Endpoint, cases: Vec<Case>) -> Vec<Upload> {
    let threads: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let endpoint = relay_endpoint.clone();
            std::thread::spawn(move || {
                let mut stream = Stream::connect(&endpoint).expect("connect to relay");
                let down_seed = case.id * 7919 + 1;
                let mut header = Vec::new();
                for word in [case.id, case.down, down_seed] {
                    header.extend_from_slice(&word.to_le_bytes());
                }
                stream.write_all(&header).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    let hash = traffic::send(&mut writer, case.up, up_seed(case.id)).expect("send upstream");
                    writer.shutdown(Shutdown::Write).unwrap();
                    hash
                });
                let (bytes, hash) = traffic::receive(&mut stream).expect("receive from relay");
                assert_eq!(bytes, case.down, "connection {}: bytes received from upstream", case.id);
                assert_eq!(
                    hex(&hash),
                    hex(&traffic::expected_hash(case.down, down_seed)),
                    "connection {}: SHA-256 of {} bytes received from upstream",
                    case.id,
                    case.down
                );
                (case.id, case.up, sender.join().unwrap())
            })
        })
        .collect();
    threads.into_iter().map(|thread| thread.join().expect("client thread")).collect()
}

/// What the clients of `cases` send upstream, known without them (the
/// server's side of the check when the clients run elsewhere).
pub fn expected_uploads(cases: &[Case]) -> Vec<Upload> {
    cases.iter().map(|c| (c.id, c.up, traffic::expected_hash(c.up, up_seed(c.id)))).collect()
}

/// The server's side: the twin server's ledger holds exactly `sent` (each
/// connection is waited for 30 s at most).
pub fn check_uploads(ledger: &Ledger, sent: &[Upload]) {
    for &(id, up, sha256) in sent {
        let deadline = Instant::now() + Duration::from_secs(30);
        let received = loop {
            if let Some(r) = ledger.lock().unwrap().get(&id) {
                break r.as_ref().map(|r| *r).map_err(|e| e.to_string());
            }
            assert!(Instant::now() < deadline, "server never finished connection {id}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(received, Ok(Received { bytes: up, sha256 }), "connection {id}: what upstream received");
    }
}
