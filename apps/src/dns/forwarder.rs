//! `vsock-relay dns`: the enclave's resolver. An enclave has no network and
//! no name server; this listens where /etc/resolv.conf points (UDP and TCP
//! on one address, as every stub resolver expects) and sends each query to
//! the parent over one stream connection ([`crate::dns::upstream`]), where
//! the allowlist decides what a name may resolve to.
//!
//! The forwarder keeps what a resolver needs of it and no more: a UDP
//! answer above the client's size limit goes back truncated (TC set,
//! header and question) so the client asks again over TCP; TCP clients are
//! framed, pipelined and answered in any order; every query is answered
//! (SERVFAIL when the parent is unreachable, slow or overloaded). Input
//! that is no query is dropped (too short for a header, or a response:
//! answering those would let two resolvers ping-pong) or answered FORMERR
//! (a header that does not parse). Messages are parsed and built with
//! hickory-proto; what is forwarded is the client's own bytes, with only
//! the ID changed on the way.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use vsock_relay_engine::endpoint::{Endpoint, Host};

use crate::dns::frame;
use crate::dns::upstream::{message_id, Upstream, UpstreamConfig};
use crate::relay::options::{parse_seconds, UsageError};

/// The UDP size limit of a client that does not say (RFC 1035).
pub const UDP_CLASSIC_LIMIT: usize = 512;
/// The most a UDP answer may carry, whatever a client's EDNS size says:
/// above it, fragments (the DNS flag day 2020 figure is 1232; 4096 is
/// what most resolvers advertise and accept).
pub const UDP_MAX_LIMIT: usize = 4096;
/// The largest query taken from a client (a stub resolver's is a few
/// hundred bytes): bounds what the queries in flight hold, 4 MiB at the
/// default 1,024. Longer ones are dropped (UDP) or close the connection
/// (TCP). Answers from the parent may use the whole frame.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Queries one TCP client may have in flight; past it, its next frame is
/// read when an answer went out (back pressure, not SERVFAIL).
pub const TCP_IN_FLIGHT_PER_CLIENT: usize = 64;

/// `vsock-relay dns`'s options.
#[derive(Args, Clone, Debug)]
pub struct DnsArgs {
    /// Where to answer: udp:IP:PORT or tcp:IP:PORT (both mean UDP and TCP
    /// on that address), or a bare port (127.0.0.1). Port 0 picks a free
    /// one, the same for both.
    #[arg(long, value_name = "ADDRESS", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// The parent's DNS service (`route: dns`), a stream endpoint:
    /// vsock:3:PORT in an enclave.
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Endpoint,

    /// Point the system's resolver here: REPLACES FILE (default
    /// /etc/resolv.conf) with one `nameserver` line for the --listen
    /// address (which must then be on port 53), and brings the loopback
    /// interface up, as `forward --hosts` does. Not given: nothing is
    /// written.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "/etc/resolv.conf")]
    pub resolv_conf: Option<PathBuf>,

    /// Bring the loopback interface up (the enclave boots with it down);
    /// --resolv-conf does too.
    #[arg(long)]
    pub loopback_up: bool,

    /// Answer SERVFAIL to a query the parent has not answered within this
    /// many seconds (the parent unreachable or slow).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub query_timeout: f64,

    /// The most queries in flight to the parent, all clients together;
    /// a query beyond them is answered SERVFAIL at once.
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub max_in_flight: u64,

    /// The most TCP clients at once; another is closed on accept.
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_tcp_clients: u64,

    /// Close a TCP client that sent no query for this many seconds
    /// (its answers in flight are still written).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub tcp_idle_timeout: f64,
}

/// The forwarder's settings, checked.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub max_tcp_clients: usize,
    pub tcp_idle_timeout: Duration,
}

impl DnsArgs {
    /// Checks the options into a config; a usage error names the bad one.
    pub fn config(&self) -> Result<ForwarderConfig, UsageError> {
        if self.resolv_conf.is_some() && self.listen.port() != 53 {
            return Err(UsageError(format!(
                "--resolv-conf needs --listen on port 53 (resolv.conf cannot name a port), not {}",
                self.listen.port()
            )));
        }
        Ok(ForwarderConfig {
            listen: self.listen,
            upstream: UpstreamConfig {
                to: self.to.clone(),
                query_timeout: Duration::from_secs_f64(self.query_timeout),
                max_in_flight: usize::try_from(self.max_in_flight).unwrap_or(usize::MAX),
            },
            max_tcp_clients: usize::try_from(self.max_tcp_clients).unwrap_or(usize::MAX),
            tcp_idle_timeout: Duration::from_secs_f64(self.tcp_idle_timeout),
        })
    }

    /// Does what --resolv-conf and --loopback-up ask, then forwards until
    /// SIGINT or SIGTERM, and logs the counters.
    pub fn run(self) -> anyhow::Result<()> {
        let config = self.config()?;
        if (self.resolv_conf.is_some() || self.loopback_up)
            && vsock_relay_engine::bring_up_loopback()
                .context("cannot bring the loopback interface up (run as root)")?
        {
            tracing::info!("loopback interface brought up");
        }
        if let Some(file) = &self.resolv_conf {
            write_resolv_conf(file, config.listen.ip())?;
            tracing::info!(file = %file.display(), nameserver = %config.listen.ip(), "resolv.conf replaced");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the forwarder's runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<i32>();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])?;
        let handle = signals.handle();
        let watcher = std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = stop.send(signal);
            }
        });
        let result = runtime.block_on(async {
            let forwarder = Forwarder::bind(&config).await?;
            tokio::select! {
                result = forwarder.serve() => result,
                signal = stopped => {
                    tracing::info!(signal = signal.unwrap_or(0), "stopping");
                    Ok(())
                }
            }
        });
        handle.close();
        let _ = watcher.join();
        result
    }
}

/// `--listen`: `udp:IP:PORT`, `tcp:IP:PORT` or a bare port. The `udp:`
/// form lives here only: the engine's endpoints are stream sockets.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    let rest = text
        .strip_prefix("udp:")
        .or_else(|| text.strip_prefix("tcp:"))
        .ok_or_else(|| format!("`{text}`: expected udp:IP:PORT, tcp:IP:PORT or a port"))?;
    match format!("tcp:{rest}").parse::<Endpoint>() {
        Ok(Endpoint::Tcp { host: Host::Ip(ip), port }) => Ok(SocketAddr::new(ip, port)),
        Ok(_) => Err(format!("`{text}`: the address must be an IP address (IPv6 in brackets), not a name")),
        Err(e) => Err(format!("`{text}`: {e}")),
    }
}

/// Replaces `file` with one line pointing the resolver at `nameserver`.
pub fn write_resolv_conf(file: &Path, nameserver: IpAddr) -> anyhow::Result<()> {
    let text = format!(
        "# written by vsock-relay dns: queries go to the parent's DNS service\nnameserver {nameserver}\n"
    );
    std::fs::write(file, text).with_context(|| format!("cannot write {} (run as root)", file.display()))
}

/// What the forwarder counts; logged when it stops.
#[derive(Debug, Default)]
pub struct Counters {
    pub queries: AtomicU64,
    pub answers: AtomicU64,
    pub servfail: AtomicU64,
    pub truncated: AtomicU64,
    pub formerr: AtomicU64,
    pub dropped: AtomicU64,
    pub tcp_refused: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a datagram or frame from a client is.
#[derive(Debug)]
pub enum Input {
    /// A query to forward, parsed.
    Query(Box<Message>),
    /// No query, to drop: too short for a header, or a response.
    Drop(&'static str),
    /// A header that does not parse: answer this (FORMERR) instead.
    FormErr(Vec<u8>),
}

/// Sorts a client's message: never panics, whatever the bytes.
pub fn classify(bytes: &[u8]) -> Input {
    let Some(id) = message_id(bytes) else {
        return Input::Drop("shorter than a DNS header");
    };
    // QR is the top bit of the third byte; a header has it.
    if bytes[2] & 0x80 != 0 {
        return Input::Drop("a response, not a query");
    }
    match Message::from_vec(bytes) {
        Ok(message) if message.metadata.message_type == MessageType::Query => Input::Query(Box::new(message)),
        Ok(_) => Input::Drop("a response, not a query"),
        Err(_) => match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
            Ok(answer) => Input::FormErr(answer),
            Err(_) => Input::Drop("cannot build FORMERR"),
        },
    }
}

/// A SERVFAIL answer to `query`: its ID, question, and an OPT record if it
/// had one (RFC 6891). `None` only if hickory cannot encode it.
pub fn servfail(query: &Message) -> Option<Vec<u8>> {
    let mut answer = Message::error_msg(query.metadata.id, query.metadata.op_code, ResponseCode::ServFail);
    answer.metadata.recursion_desired = query.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(u16::try_from(UDP_MAX_LIMIT).unwrap_or(u16::MAX));
        answer.set_edns(edns);
    }
    answer.to_vec().ok()
}

/// The largest UDP answer `query`'s client takes: 512, or its EDNS size
/// capped at [`UDP_MAX_LIMIT`].
pub fn udp_limit(query: &Message) -> usize {
    usize::from(query.max_payload()).clamp(UDP_CLASSIC_LIMIT, UDP_MAX_LIMIT)
}

/// `answer` fit for a UDP client whose limit is `limit`: itself, or its
/// header and question with TC set (from the query when the answer does
/// not parse). `None`: nothing to send.
pub fn fit_udp(answer: Vec<u8>, query: &Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    if answer.len() <= limit {
        return Some((answer, false));
    }
    let truncated = match Message::from_vec(&answer) {
        Ok(parsed) => parsed.truncate(),
        Err(_) => {
            let mut reply =
                Message::error_msg(query.metadata.id, query.metadata.op_code, ResponseCode::ServFail);
            reply.add_queries(query.queries.iter().cloned());
            reply.metadata.truncation = true;
            reply
        }
    };
    truncated.to_vec().ok().filter(|bytes| bytes.len() <= limit).map(|bytes| (bytes, true))
}

/// A query as a stub resolver sends it (recursion desired, one question,
/// an OPT record with `edns` as its UDP size if given): for the tests of
/// both halves and for checks that ask a forwarder or server.
pub fn stub_query(id: u16, name: &Name, record_type: RecordType, edns: Option<u16>) -> Message {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), record_type));
    if let Some(size) = edns {
        let mut opt = Edns::new();
        opt.set_max_payload(size);
        message.set_edns(opt);
    }
    message
}

/// The answer to a forwarded query: the parent's, or SERVFAIL.
async fn answer_query(
    upstream: &Upstream,
    counters: &Counters,
    query: &Message,
    bytes: Vec<u8>,
) -> Option<Vec<u8>> {
    match upstream.ask(bytes, query.queries.first()).await {
        Ok(answer) => {
            Counters::add(&counters.answers);
            Some(answer)
        }
        Err(e) => {
            Counters::add(&counters.servfail);
            tracing::debug!(error = %e, id = query.metadata.id, "query answered SERVFAIL");
            servfail(query)
        }
    }
}

/// A bound forwarder: its UDP socket and TCP listener on one address.
pub struct Forwarder {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    config: ForwarderConfig,
    counters: Arc<Counters>,
}

impl Forwarder {
    /// Binds UDP and TCP on the listen address; for port 0, on one free
    /// port for both (a few tries: the port UDP got may be taken for TCP).
    pub async fn bind(config: &ForwarderConfig) -> anyhow::Result<Forwarder> {
        let listen = config.listen;
        let mut tries = 0;
        let (udp, tcp) = loop {
            tries += 1;
            let udp =
                UdpSocket::bind(listen).await.with_context(|| format!("cannot listen on udp:{listen}"))?;
            let port = udp.local_addr()?.port();
            match TcpListener::bind(SocketAddr::new(listen.ip(), port)).await {
                Ok(tcp) => break (udp, tcp),
                Err(e) if listen.port() == 0 && tries < 8 => {
                    tracing::debug!(port, error = %e, "TCP port taken; another free port");
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot listen on tcp:{}", SocketAddr::new(listen.ip(), port))
                    })
                }
            }
        };
        Ok(Forwarder { udp: Arc::new(udp), tcp, config: config.clone(), counters: Arc::default() })
    }

    /// The address UDP and TCP listen on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Forwards until a listener fails; logs the counters when it ends
    /// (dropped, as on a signal, too).
    pub async fn serve(self) -> anyhow::Result<()> {
        let upstream = Upstream::start(self.config.upstream.clone());
        let _report = Report { counters: Arc::clone(&self.counters), upstream: upstream.clone() };
        tracing::info!(
            listen = %self.local_addr()?,
            to = %self.config.upstream.to,
            "dns forwarder listening (udp and tcp)"
        );
        let udp = serve_udp(Arc::clone(&self.udp), upstream.clone(), Arc::clone(&self.counters));
        let tcp = serve_tcp(self.tcp, upstream, Arc::clone(&self.counters), self.config.clone());
        tokio::try_join!(udp, tcp).map(drop)
    }
}

/// Logs the totals when the forwarder stops.
struct Report {
    counters: Arc<Counters>,
    upstream: Upstream,
}

impl Drop for Report {
    fn drop(&mut self) {
        let (c, u) = (&self.counters, self.upstream.counters());
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        tracing::info!(
            queries = get(&c.queries),
            answers = get(&c.answers),
            servfail = get(&c.servfail),
            truncated = get(&c.truncated),
            formerr = get(&c.formerr),
            dropped = get(&c.dropped),
            tcp_refused = get(&c.tcp_refused),
            connections = get(&u.connections),
            resent = get(&u.resent),
            stray_answers = get(&u.stray_answers),
            "dns forwarder stopped"
        );
    }
}

async fn serve_udp(udp: Arc<UdpSocket>, upstream: Upstream, counters: Arc<Counters>) -> anyhow::Result<()> {
    // One byte more than a query may have: a longer datagram fills it.
    let mut buf = vec![0u8; MAX_QUERY_BYTES + 1];
    loop {
        let (len, client) = match udp.recv_from(&mut buf).await {
            Ok(received) => received,
            // An ICMP error of an earlier send, reported here: not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e).context("cannot receive on the UDP socket"),
        };
        let bytes = &buf[..len];
        let input =
            if len > MAX_QUERY_BYTES { Input::Drop("longer than a query may be") } else { classify(bytes) };
        let query = match input {
            Input::Query(query) => query,
            Input::Drop(why) => {
                Counters::add(&counters.dropped);
                tracing::debug!(%client, bytes = len, why, "UDP input dropped");
                continue;
            }
            Input::FormErr(answer) => {
                Counters::add(&counters.formerr);
                tracing::debug!(%client, bytes = len, "UDP input does not parse; FORMERR");
                let _ = udp.send_to(&answer, client).await;
                continue;
            }
        };
        Counters::add(&counters.queries);
        let (udp, upstream, counters, bytes) =
            (Arc::clone(&udp), upstream.clone(), Arc::clone(&counters), bytes.to_vec());
        tokio::spawn(async move {
            let Some(answer) = answer_query(&upstream, &counters, &query, bytes).await else { return };
            let Some((answer, truncated)) = fit_udp(answer, &query, udp_limit(&query)) else { return };
            if truncated {
                Counters::add(&counters.truncated);
            }
            if let Err(e) = udp.send_to(&answer, client).await {
                tracing::debug!(%client, error = %e, "cannot send a UDP answer");
            }
        });
    }
}

async fn serve_tcp(
    listener: TcpListener,
    upstream: Upstream,
    counters: Arc<Counters>,
    config: ForwarderConfig,
) -> anyhow::Result<()> {
    let clients = Arc::new(Semaphore::new(config.max_tcp_clients));
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or a client gone before accept: the
                // listener is fine; wait a moment instead of spinning.
                tracing::debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&clients).try_acquire_owned() else {
            Counters::add(&counters.tcp_refused);
            tracing::debug!(%client, limit = config.max_tcp_clients, "TCP client closed: too many at once");
            continue;
        };
        let (upstream, counters) = (upstream.clone(), Arc::clone(&counters));
        let idle = config.tcp_idle_timeout;
        tokio::spawn(async move {
            serve_tcp_client(stream, client, upstream, counters, idle).await;
            drop(permit);
        });
    }
}

/// One TCP client: frames in, each query forwarded on its own, answers
/// framed back as they come (any order). Ends when the client closes, idles,
/// or sends a bad frame, after the answers in flight are written.
async fn serve_tcp_client(
    stream: TcpStream,
    client: SocketAddr,
    upstream: Upstream,
    counters: Arc<Counters>,
    idle: Duration,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut to_write) = mpsc::channel::<Vec<u8>>(TCP_IN_FLIGHT_PER_CLIENT);
    let write = tokio::spawn(async move {
        while let Some(answer) = to_write.recv().await {
            if frame::write_frame(&mut writer, &answer).await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(TCP_IN_FLIGHT_PER_CLIENT));
    loop {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
        let bytes = match tokio::time::timeout(idle, frame::read_frame(&mut reader, MAX_QUERY_BYTES)).await {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                Counters::add(&counters.dropped);
                tracing::debug!(%client, error = %e, "TCP client closed: bad frame");
                break;
            }
            Err(_idle) => {
                tracing::debug!(%client, "TCP client closed: idle");
                break;
            }
        };
        let query = match classify(&bytes) {
            Input::Query(query) => query,
            Input::Drop(why) => {
                Counters::add(&counters.dropped);
                tracing::debug!(%client, bytes = bytes.len(), why, "TCP input dropped");
                continue;
            }
            Input::FormErr(answer) => {
                Counters::add(&counters.formerr);
                tracing::debug!(%client, bytes = bytes.len(), "TCP input does not parse; FORMERR");
                let _ = answers.send(answer).await;
                continue;
            }
        };
        Counters::add(&counters.queries);
        let (upstream, counters, answers) = (upstream.clone(), Arc::clone(&counters), answers.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer_query(&upstream, &counters, &query, bytes).await {
                let _ = answers.send(answer).await;
            }
            drop(permit);
        });
    }
    // The writer ends when the last answer in flight is sent.
    drop(answers);
    let _ = write.await;
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record};
    use proptest::prelude::*;

    use super::*;

    fn query(name: &str, edns: Option<u16>) -> Message {
        stub_query(0x4242, &Name::from_ascii(name).unwrap(), RecordType::A, edns)
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen("udp:127.0.0.1:53").unwrap(), "127.0.0.1:53".parse().unwrap());
        assert_eq!(parse_listen("tcp:[::1]:5353").unwrap(), "[::1]:5353".parse().unwrap());
        assert_eq!(parse_listen("53").unwrap(), "127.0.0.1:53".parse().unwrap());
        assert!(parse_listen("udp:localhost:53").unwrap_err().contains("must be an IP address"));
        assert!(parse_listen("vsock:3:53").unwrap_err().contains("expected udp:IP:PORT"));
        assert!(parse_listen("udp:127.0.0.1:99999").unwrap_err().contains("bad port"));
    }

    #[test]
    fn resolv_conf_needs_port_53_and_is_replaced() {
        let args = |listen: &str, resolv: Option<&str>| DnsArgs {
            listen: parse_listen(listen).unwrap(),
            to: "unix:/tmp/p.sock".parse().unwrap(),
            resolv_conf: resolv.map(PathBuf::from),
            loopback_up: false,
            query_timeout: 5.0,
            max_in_flight: 1024,
            max_tcp_clients: 128,
            tcp_idle_timeout: 10.0,
        };
        assert!(args("udp:127.0.0.1:5353", Some("/etc/resolv.conf"))
            .config()
            .unwrap_err()
            .0
            .contains("port 53"));
        assert!(args("udp:127.0.0.1:5353", None).config().is_ok());
        let file = std::env::temp_dir().join(format!("dns-resolv-{}", std::process::id()));
        std::fs::write(&file, "nameserver 10.0.0.2\nsearch example\n").unwrap();
        write_resolv_conf(&file, Ipv4Addr::LOCALHOST.into()).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.ends_with("\nnameserver 127.0.0.1\n") && !text.contains("10.0.0.2"), "{text}");
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn input_is_sorted_into_queries_drops_and_formerr() {
        let good = query("a.test.", None).to_vec().unwrap();
        assert!(matches!(classify(&good), Input::Query(q) if q.metadata.id == 0x4242));
        assert!(matches!(classify(&good[..11]), Input::Drop(_)));
        let mut response = good.clone();
        response[2] |= 0x80;
        assert!(matches!(classify(&response), Input::Drop("a response, not a query")));
        let cut = &good[..good.len() - 3]; // the question cut short
        let Input::FormErr(answer) = classify(cut) else { panic!("a cut question gets FORMERR") };
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!((answer.metadata.id, answer.metadata.response_code), (0x4242, ResponseCode::FormErr));
    }

    #[test]
    fn servfail_keeps_id_question_and_edns() {
        let q = query("a.test.", Some(1232));
        let answer = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(answer.metadata.id, 0x4242);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(answer.queries, q.queries);
        assert!(answer.edns.is_some());
    }

    #[test]
    fn large_udp_answers_are_truncated_to_header_and_question() {
        let q = query("big.test.", None);
        assert_eq!(udp_limit(&q), 512);
        assert_eq!(udp_limit(&query("a.test.", Some(100))), 512);
        assert_eq!(udp_limit(&query("a.test.", Some(1232))), 1232);
        assert_eq!(udp_limit(&query("a.test.", Some(65000))), UDP_MAX_LIMIT);
        let mut answer = Message::response(0x4242, OpCode::Query);
        answer.add_queries(q.queries.iter().cloned());
        for i in 0..100u8 {
            let record =
                Record::from_rdata(Name::from_ascii("big.test.").unwrap(), 60, RData::A(A::new(10, 0, 0, i)));
            answer.add_answer(record);
        }
        let bytes = answer.to_vec().unwrap();
        assert!(bytes.len() > 512);
        let (small, truncated) = fit_udp(bytes.clone(), &q, 512).unwrap();
        assert!(truncated && small.len() <= 512);
        let small = Message::from_vec(&small).unwrap();
        assert!(small.metadata.truncation && small.answers.is_empty());
        assert_eq!((small.metadata.id, &small.queries), (0x4242, &q.queries));
        assert_eq!(fit_udp(bytes.clone(), &q, 4096), Some((bytes.clone(), false)));
        // An answer that does not parse is cut down from the query.
        let mut garbled = bytes;
        garbled.truncate(600);
        let (small, truncated) = fit_udp(garbled, &q, 512).unwrap();
        assert!(truncated && Message::from_vec(&small).unwrap().metadata.truncation);
    }

    proptest! {
        #[test]
        fn any_bytes_as_a_query_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            match classify(&bytes) {
                Input::Query(query) => {
                    let failed = servfail(&query);
                    prop_assert!(failed.is_none() || message_id(failed.as_deref().unwrap_or(&[])) == message_id(&bytes));
                    let _ = fit_udp(bytes.clone(), &query, udp_limit(&query));
                }
                Input::FormErr(answer) => prop_assert_eq!(message_id(&answer), message_id(&bytes)),
                Input::Drop(_) => {}
            }
        }

        #[test]
        fn any_bytes_with_a_question_prefix_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            // A header with counts the tail may or may not honour (many
            // questions, compression pointers, records cut short).
            let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01];
            bytes.extend_from_slice(&tail);
            let _ = classify(&bytes);
        }
    }
}
