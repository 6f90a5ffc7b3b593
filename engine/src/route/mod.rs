//! Routing: services whose clients name their destination, instead of a
//! fixed target. A routed connection first reads a short head from its
//! client (an HTTP `CONNECT`, an HTTP request for an `http://` URL in
//! absolute form, a SOCKS5 request, or a TLS ClientHello's server name),
//! asks the router for a decision (DNS off the worker threads, then the
//! service's policy: the proxy's allowlist), connects to the address that
//! was checked, answers the client, and from then on relays exactly as a
//! fixed target does.
//!
//! The head parsers (`connect`, `socks5`, `sni`, the PROXY header's) are pure: bytes in, a
//! [`Parse`] out, so that they are tested alone (property tests: no panic,
//! bounded memory, whatever the bytes). What goes upstream first is theirs
//! to say too ([`Parse::Destination`]'s `send_first`: an absolute-form
//! request rewritten to origin form), so the connection only sends bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::endpoint::Host;
use crate::proxy_header;

pub(crate) mod connect;
pub(crate) mod router;
pub(crate) mod sni;
pub(crate) mod socks5;

/// Default bound on the time a client takes to send its head.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Decides whether a routed client may reach the destination it asked for
/// ([`Asked`]): `Ok` names the rule that allowed it (a metrics label: one
/// per rule, never per host), `Err` says why not.
///
/// The last argument says whether it may block (an allowlist entry given by
/// name may need a lookup). `false`: it runs on a worker thread and must not
/// block; it returns `None` when it cannot decide without blocking, and is
/// asked again on the router's threads with `true`, where it must decide.
pub type Policy = Arc<dyn Fn(&Asked<'_>, bool) -> Option<Result<String, String>> + Send + Sync>;

/// What a policy is asked: may `client` reach `host:port` at `address`
/// (the address the connect will use)?
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub client: Peer,
    pub host: &'a Host,
    pub port: u16,
    pub address: IpAddr,
}

/// Who a routed client is, as far as a policy tells clients apart: the
/// vsock CID of its machine (an enclave), the IP address of a TCP client,
/// or a local client (a Unix socket, or a peer not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Cid(u32),
    Ip(IpAddr),
    Local,
}

impl Peer {
    /// The peer of a connected socket.
    pub fn of(socket: &socket2::Socket) -> Peer {
        match socket.peer_addr() {
            Ok(address) => match (address.as_vsock_address(), address.as_socket()) {
                (Some((cid, _)), _) => Peer::Cid(cid),
                (None, Some(ip)) => Peer::Ip(ip.ip().to_canonical()),
                (None, None) => Peer::Local,
            },
            Err(_) => Peer::Local,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Cid(cid) => write!(f, "cid {cid}"),
            Peer::Ip(ip) => write!(f, "{ip}"),
            Peer::Local => f.write_str("local"),
        }
    }
}

/// A routed service's upstream: how clients name their destination, and
/// who decides.
#[derive(Clone)]
pub struct Route {
    pub kind: RouteKind,
    pub policy: Policy,
    /// A client that has not sent its whole head this long after its
    /// accept is closed.
    pub head_timeout: Duration,
    pub counters: Arc<RouteCounters>,
}

impl Route {
    pub fn new(kind: RouteKind, policy: Policy) -> Self {
        Route { kind, policy, head_timeout: DEFAULT_HEAD_TIMEOUT, counters: Arc::default() }
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Route({}, head timeout {:?})", self.kind, self.head_timeout)
    }
}

labelled! {
    /// What a route decided, for its counters.
    pub enum Decision as "route decision" {
        Allowed = "allowed", "the allowlist allowed the destination (the connect may still fail)";
        NotAllowed = "not_allowed", "the allowlist refused the destination";
        Unresolved = "unresolved", "no such name, or the lookup failed or timed out";
        BadHead = "bad_head", "the head was malformed, unsupported or too large";
        HeadTimeout = "head_timeout", "no whole head within the head timeout (--head-timeout)";
    }
}

/// A route's counters: its decisions, and the connections each policy rule
/// allowed. Written off the data path (once per routed connection).
#[derive(Debug, Default)]
pub struct RouteCounters {
    decisions: [AtomicU64; Decision::ALL.len()],
    by_rule: Mutex<BTreeMap<String, u64>>,
}

impl RouteCounters {
    pub(crate) fn decided(&self, decision: Decision) {
        self.decisions[decision as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn allowed_by(&self, rule: &str) {
        let mut by_rule = self.by_rule.lock().unwrap_or_else(|e| e.into_inner());
        match by_rule.get_mut(rule) {
            Some(count) => *count += 1,
            None => {
                by_rule.insert(rule.to_string(), 1);
            }
        }
    }

    pub fn decisions(&self, decision: Decision) -> u64 {
        self.decisions[decision as usize].load(Relaxed)
    }

    /// Connections allowed per policy rule (rules that allowed none are absent).
    pub fn by_rule(&self) -> BTreeMap<String, u64> {
        self.by_rule.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Largest head read from a client before its destination is known: an
/// HTTP `CONNECT` head (more is `431`), a SOCKS5 greeting and request, or a
/// TLS ClientHello (one full TLS record is 16 KiB plus its header).
pub const MAX_HEAD_BYTES: usize = 16 * 1024 + 5;

/// The port `--route sni` reaches every destination on, unless told.
pub const DEFAULT_SNI_PORT: u16 = 443;

labelled! {
    /// How a routed service learns where a client wants to go.
    pub enum RouteKind as "route" {
        /// HTTP/1.1 `CONNECT host:port` (RFC 9110, 9.3.6): `HTTPS_PROXY=http://...`.
        /// Also a request for an `http://` URL in absolute form (RFC 9112,
        /// 3.2.2), sent upstream in origin form: `HTTP_PROXY=http://...`.
        Connect = "connect" | "http", "HTTP CONNECT and http:// URLs (HTTPS_PROXY and HTTP_PROXY=http://HOST:PORT)";
        /// SOCKS5 (RFC 1928), no authentication, the CONNECT command:
        /// `ALL_PROXY=socks5h://...`.
        Socks5 = "socks5" | "socks", "SOCKS5 (ALL_PROXY=socks5h://HOST:PORT, names resolved here)";
        /// The server name of the client's TLS ClientHello, on a fixed port
        /// (parsed as [`DEFAULT_SNI_PORT`]; the caller may change it); the
        /// ClientHello is passed on unchanged.
        Sni { port: u16 = DEFAULT_SNI_PORT } = "sni", "the server name of the client's TLS ClientHello, on one port";
        /// A PROXY protocol v2 header naming the address and port the
        /// client was redirected from (`vsock-relay forward --transparent`
        /// in the enclave); nothing is answered, a refusal closes.
        Transparent = "transparent", "a PROXY v2 header with the original destination (forward --transparent)";
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteKind::Sni { port } => write!(f, "sni (port {port})"),
            other => f.write_str(other.label()),
        }
    }
}

/// What a head parser made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parse {
    /// Not enough bytes yet: read more (within [`MAX_HEAD_BYTES`] and the
    /// head timeout).
    More,
    /// Write `reply` to the client, drop the first `consumed` bytes, and
    /// parse what follows (the SOCKS5 method selection).
    Answer { consumed: usize, reply: Vec<u8> },
    /// The client asked for `host:port`; the first `consumed` bytes were the
    /// head (what follows is the client's first payload, passed on).
    /// `send_first` goes upstream before that payload, in place of the head
    /// (an absolute-form HTTP request in origin form); empty for the routes
    /// that send nothing of their own (SNI keeps its head: `consumed` 0).
    Destination { host: Host, port: u16, consumed: usize, send_first: Vec<u8> },
    /// The head is malformed, unsupported or too large: write `reply` (may
    /// be empty) and close; `reason` goes to the log.
    Refuse { reply: Vec<u8>, reason: String },
}

/// The destination a routed client's head named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
}

/// How a routed connection's attempt ended, as its client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected: the tunnel is open.
    Connected,
    /// The policy (the allowlist) does not allow the destination.
    NotAllowed,
    /// The name does not resolve (NXDOMAIN, no address record).
    NoSuchName,
    /// The lookup failed otherwise (no answer, server failure, busy).
    LookupFailed,
    /// The upstream refused the connection.
    Refused,
    /// No route to the upstream (network or host unreachable).
    Unreachable,
    /// No answer from the upstream within the connect timeout.
    TimedOut,
    /// Any other failure of the upstream connect.
    Failed,
}

impl Outcome {
    /// The outcome of a failed upstream connect, by its error.
    pub(crate) fn of_connect_error(error: &std::io::Error) -> Outcome {
        match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => Outcome::Refused,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL) => Outcome::Unreachable,
            _ if error.kind() == std::io::ErrorKind::TimedOut => Outcome::TimedOut,
            _ => Outcome::Failed,
        }
    }
}

/// A routed connection's head, read and parsed as it arrives.
#[derive(Debug)]
pub(crate) struct Head {
    /// The bytes read so far (the SOCKS5 greeting dropped once answered).
    pub bytes: Vec<u8>,
    /// Every byte read, the dropped ones included.
    pub seen: usize,
    parser: Parser,
}

/// Where a head's parse stands, per route.
#[derive(Debug)]
enum Parser {
    /// `absolute`: the head was a request in absolute form, whose answer is
    /// the upstream's response (no `200 Connection established`).
    Connect {
        absolute: bool,
    },
    /// `greeted`: the greeting was answered; the request comes next.
    Socks5 {
        greeted: bool,
    },
    /// rustls's acceptor keeps what it was fed; the bytes stay for the replay.
    Sni {
        port: u16,
        peek: Box<sni::SniPeek>,
    },
    Transparent,
}

impl Head {
    pub fn new(kind: RouteKind) -> Head {
        let parser = match kind {
            RouteKind::Connect => Parser::Connect { absolute: false },
            RouteKind::Socks5 => Parser::Socks5 { greeted: false },
            RouteKind::Sni { port } => Parser::Sni { port, peek: Box::default() },
            RouteKind::Transparent => Parser::Transparent,
        };
        Head { bytes: Vec::new(), seen: 0, parser }
    }

    /// Parses what was read so far.
    pub fn parse(&mut self) -> Parse {
        match &mut self.parser {
            Parser::Connect { absolute } => {
                let parse = connect::parse(&self.bytes);
                if let Parse::Destination { send_first, .. } = &parse {
                    *absolute = !send_first.is_empty();
                }
                parse
            }
            Parser::Socks5 { greeted: false } => match socks5::parse_greeting(&self.bytes) {
                Parse::Answer { consumed, reply } => {
                    self.parser = Parser::Socks5 { greeted: true };
                    self.bytes.drain(..consumed.min(self.bytes.len()));
                    Parse::Answer { consumed, reply }
                }
                other => other,
            },
            Parser::Socks5 { greeted: true } => socks5::parse_request(&self.bytes),
            Parser::Sni { port, peek } => peek.parse(&self.bytes, *port),
            Parser::Transparent => original_destination(&self.bytes),
        }
    }

    /// What the client is told of the outcome (empty: nothing, for SNI, and
    /// for an absolute-form request once connected: the upstream answers).
    pub fn reply(&self, outcome: Outcome, detail: &str, bound: Option<SocketAddr>) -> Vec<u8> {
        match self.parser {
            Parser::Connect { absolute: true } if outcome == Outcome::Connected => Vec::new(),
            Parser::Connect { .. } => connect::reply(outcome, detail),
            Parser::Socks5 { .. } => socks5::reply(outcome, bound),
            Parser::Sni { .. } | Parser::Transparent => Vec::new(),
        }
    }
}

/// A transparent client's head: the PROXY v2 header whose destination is
/// where the client was going. A header without one (LOCAL, UNSPEC) names
/// no destination and is refused.
fn original_destination(bytes: &[u8]) -> Parse {
    let refuse = |reason: String| Parse::Refuse { reply: Vec::new(), reason };
    match proxy_header::parse(bytes) {
        Ok(None) if bytes.len() < MAX_HEAD_BYTES => Parse::More,
        Ok(None) => refuse(format!("a PROXY header over {MAX_HEAD_BYTES} bytes")),
        Ok(Some(proxy_header::Parsed { addresses: Some((_, destination)), length })) => Parse::Destination {
            host: Host::Ip(destination.ip().to_canonical()),
            port: destination.port(),
            consumed: length,
            send_first: Vec::new(),
        },
        Ok(Some(_)) => refuse("the PROXY header names no destination (LOCAL or UNSPEC)".into()),
        Err(e) => refuse(format!("not a transparent forwarder's head: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transparent_head_names_the_original_destination_and_keeps_what_follows() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let original: SocketAddr = "[::ffff:198.51.100.10]:443".parse().unwrap();
        let mut bytes = proxy_header::encode(Some(client), Some(original));
        let length = bytes.len();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let mut head = Head::new(RouteKind::Transparent);
        for cut in 0..length {
            head.bytes = bytes[..cut].to_vec();
            assert_eq!(head.parse(), Parse::More, "{cut} bytes");
        }
        head.bytes = bytes;
        let destination = Parse::Destination {
            host: Host::Ip("198.51.100.10".parse().unwrap()),
            port: 443,
            consumed: length,
            send_first: Vec::new(),
        };
        assert_eq!(head.parse(), destination, "the IPv4-mapped address in its IPv4 form");
        assert!(head.reply(Outcome::Connected, "", None).is_empty(), "nothing is answered");
    }

    #[test]
    fn a_transparent_head_without_a_destination_is_refused_without_a_reply() {
        let mut head = Head::new(RouteKind::Transparent);
        for (bytes, why) in [
            (proxy_header::encode(None, None), "names no destination"),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not a transparent forwarder's head"),
        ] {
            head.bytes = bytes;
            match head.parse() {
                Parse::Refuse { reply, reason } => {
                    assert!(reply.is_empty());
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        let mut endless = proxy_header::SIGNATURE.to_vec();
        endless.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        endless.resize(MAX_HEAD_BYTES, 0);
        head.bytes = endless;
        assert!(matches!(head.parse(), Parse::Refuse { .. }), "a header longer than a head may be");
    }
}
