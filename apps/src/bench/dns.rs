//! `vsock-relay bench dns`: lookups one at a time, as an application's stub
//! resolver makes them, and how long each took. Pointed at the enclave's
//! DNS forwarder (`udp:127.0.0.1:53`) and at the parent's DNS service
//! itself (a stream endpoint: DNS over TCP framing), the difference is what
//! the forwarder and the vsock hop add to a lookup.
//!
//! Blocking sockets, one query in flight: a latency probe, not a load.
//! Given several targets, it asks them in turn, query by query: on a noisy
//! machine their difference is then measured at the same moments.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;
use socket2::Socket;
use vsock_relay_engine::Endpoint;

use super::load::{Latency, CONNECT_TIMEOUT};
use crate::dns::forwarder::stub_query;
use crate::dns::frame::encode_frame;
use crate::sample::client;

/// How long one query waits for its answer before it counts as unanswered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the queries go: a UDP name server (a stub resolver's way), or a
/// stream endpoint speaking DNS over TCP framing (RFC 7766).
#[derive(Clone, Debug)]
pub enum DnsTarget {
    Udp(SocketAddr),
    Stream(Endpoint),
}

impl std::str::FromStr for DnsTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<DnsTarget, String> {
        match text.strip_prefix("udp:") {
            Some(address) => address
                .parse()
                .map(DnsTarget::Udp)
                .map_err(|_| format!("`{text}`: expected udp:IP:PORT (an IPv6 address in brackets)")),
            None => text
                .parse()
                .map(DnsTarget::Stream)
                .map_err(|e: vsock_relay_engine::endpoint::EndpointParseError| e.to_string()),
        }
    }
}

impl std::fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsTarget::Udp(address) => write!(f, "udp:{address}"),
            DnsTarget::Stream(endpoint) => endpoint.fmt(f),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DnsResult {
    /// The target, as given.
    pub to: String,
    pub queries: usize,
    /// Queries that got an answer (any response code) within the timeout.
    pub answered: usize,
    /// Answers by response code (NoError, Refused, ServFail, ...).
    pub codes: BTreeMap<String, usize>,
    /// Of the answered ones.
    pub latency: Latency,
}

/// One connection (or socket) to the target, a query at a time.
enum Asker {
    Udp(UdpSocket),
    Stream(Socket),
}

impl Asker {
    fn open(target: &DnsTarget) -> io::Result<Asker> {
        match target {
            DnsTarget::Udp(address) => {
                let any: SocketAddr =
                    if address.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let socket = UdpSocket::bind(any)?;
                socket.connect(address)?;
                socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                Ok(Asker::Udp(socket))
            }
            DnsTarget::Stream(endpoint) => {
                let socket = client::connect(endpoint, CONNECT_TIMEOUT)?;
                socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                Ok(Asker::Stream(socket))
            }
        }
    }

    /// Sends `query` and returns the answer with its ID (another ID, a
    /// late answer of an earlier query, is skipped).
    fn ask(&mut self, query: &[u8], id: u16) -> io::Result<Message> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        match self {
            Asker::Udp(socket) => socket.send(query)?,
            Asker::Stream(socket) => {
                let framed = encode_frame(query).map_err(io::Error::other)?;
                socket.write_all(&framed)?;
                framed.len()
            }
        };
        loop {
            if Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let bytes = match self {
                Asker::Udp(socket) => {
                    let mut buffer = vec![0u8; 4096];
                    let n = socket.recv(&mut buffer)?;
                    buffer.truncate(n);
                    buffer
                }
                Asker::Stream(socket) => {
                    let mut length = [0u8; 2];
                    socket.read_exact(&mut length)?;
                    let mut buffer = vec![0u8; u16::from_be_bytes(length).into()];
                    socket.read_exact(&mut buffer)?;
                    buffer
                }
            };
            let answer = Message::from_vec(&bytes).map_err(io::Error::other)?;
            if answer.metadata.id == id {
                return Ok(answer);
            }
        }
    }
}

/// `queries` lookups of `name` (type A) at each target, one at a time:
/// the targets take turns query by query (who goes first rotates), so
/// their figures share every moment's noise; before them one lookup per
/// target warms its cache and is not counted. A result per target, in
/// their order.
pub fn lookups(targets: &[DnsTarget], name: &str, queries: usize) -> anyhow::Result<Vec<DnsResult>> {
    let name = Name::from_ascii(name).with_context(|| format!("`{name}` is not a domain name"))?;
    let mut askers = targets
        .iter()
        .map(|target| Asker::open(target).with_context(|| format!("cannot reach {target}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(queries); targets.len()];
    let mut codes: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); targets.len()];
    for round in 0..=queries {
        let id = (round % 65_536) as u16;
        let query = stub_query(id, &name, RecordType::A, None).to_vec().context("cannot build a query")?;
        for turn in 0..targets.len() {
            let at = (round + turn) % targets.len();
            let started = Instant::now();
            let outcome = askers[at].ask(&query, id);
            let took = started.elapsed();
            match outcome {
                Ok(answer) if round > 0 => {
                    samples[at].push(took);
                    *codes[at].entry(code_name(answer.metadata.response_code)).or_insert(0) += 1;
                }
                Ok(_) => {}
                // A stream out of step cannot be trusted: start a new one.
                Err(e) => {
                    tracing::debug!(error = %e, target = %targets[at], "a query got no answer");
                    if let DnsTarget::Stream(_) = targets[at] {
                        askers[at] = Asker::open(&targets[at])
                            .with_context(|| format!("cannot reach {} again", targets[at]))?;
                    }
                }
            }
        }
    }
    targets
        .iter()
        .zip(samples)
        .zip(codes)
        .map(|((target, samples), codes)| {
            anyhow::ensure!(
                !samples.is_empty(),
                "no query to {target} was answered within {ANSWER_TIMEOUT:?}"
            );
            let answered = samples.len();
            Ok(DnsResult { to: target.to_string(), queries, answered, codes, latency: Latency::of(samples) })
        })
        .collect()
}

fn code_name(code: ResponseCode) -> String {
    format!("{code:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_udp_addresses_or_stream_endpoints() {
        assert!(matches!("udp:127.0.0.1:53".parse::<DnsTarget>(), Ok(DnsTarget::Udp(a)) if a.port() == 53));
        assert!(matches!("udp:[::1]:5353".parse::<DnsTarget>(), Ok(DnsTarget::Udp(a)) if a.is_ipv6()));
        assert!(matches!("tcp:127.0.0.1:8053".parse::<DnsTarget>(), Ok(DnsTarget::Stream(_))));
        assert!(matches!("vsock:3:8053".parse::<DnsTarget>(), Ok(DnsTarget::Stream(_))));
        let error = "udp:localhost:53".parse::<DnsTarget>().unwrap_err();
        assert!(error.contains("expected udp:IP:PORT"), "{error}");
        assert!("ftp:1:2".parse::<DnsTarget>().is_err());
    }

    #[test]
    fn a_silent_name_server_is_an_error_that_says_where() {
        // Bound and never read: every query times out.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = DnsTarget::Udp(silent.local_addr().unwrap());
        let error = lookups(&[target], "example.com.", 1).unwrap_err().to_string();
        assert!(error.contains("no query to udp:127.0.0.1:"), "{error}");
    }
}
