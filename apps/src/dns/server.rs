//! The parent's DNS service (`route: dns`, `proxy --route dns`): answers
//! the enclave's queries, which arrive over a stream socket (vsock: Nitro
//! has no datagrams) framed as DNS over TCP is (RFC 7766: a 2-byte length,
//! then the message; pipelined, answered in any order).
//!
//! The allowlist decides by name: a query for a name no entry names (by
//! name or wildcard, on any port) is answered REFUSED, not NXDOMAIN: the
//! name may well exist, this parent will not look it up, and a refusal is
//! not cached as a name's absence (a reload that allows it works at once).
//! An allowed name is looked up with the parent's resolver (hickory, the
//! same options as the routed services': `--dns-server`, `-4`/`-6` aside:
//! both A and AAAA are answered as asked), and addresses the safe-by-default
//! rule withholds (loopback, link-local with the metadata service, the AWS
//! instance services, unspecified) are removed from the answer: a name that
//! resolves to 169.254.169.254 gives the enclave nothing to connect to.
//! Record types other than A and AAAA pass as the resolver gives them.
//!
//! Each client (an enclave's CID) is remembered with what it was told
//! ([`Answered`]), for the `transparent` route. Bounded: connections per
//! client and in all, queries in flight per client, and a per-client rate
//! (beyond it: SERVFAIL at once), so that a flood from one enclave costs
//! bounded memory and leaves the others answered. The service runs on a
//! thread of its own (a small tokio runtime), beside the relay's workers.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData};
use hickory_resolver::TokioResolver;
use socket2::Socket;
use tokio::sync::{mpsc, Semaphore};
use vsock_relay_engine::dns::{self, DnsError, DnsOptions, IpFamily};
use vsock_relay_engine::Peer;

use crate::dns::answered::Answered;
use crate::dns::frame::{self, FrameError};
use crate::dns::stream::SocketStream;
use crate::relay::allowlist::Allowlist;

/// Connections one client may hold open at once.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// Connections open at once, all clients together.
pub const MAX_CONNECTIONS: usize = 256;
/// Queries one client may have in flight (all its connections together);
/// beyond, its connections are not read until answers go out.
pub const MAX_IN_FLIGHT_PER_CLIENT: usize = 128;
/// Default queries per second one client may ask (and as many at once).
pub const DEFAULT_RATE: u32 = 2_000;
/// Clients whose rate is tracked at most (beyond, quiet ones are forgotten).
const MAX_RATE_BUCKETS: usize = 4_096;
/// The UDP payload size an answer's EDNS record announces.
const EDNS_PAYLOAD: u16 = 4_096;
/// Longest one lookup may take before the client is answered SERVFAIL.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest TTL given out: an answer is remembered for its TTL, so that a
/// long TTL cannot keep an address open after the allowlist changed.
pub const MAX_TTL: u32 = 300;

vsock_relay_engine::labelled! {
    /// What the DNS service made of a query, for its counters.
    pub enum DnsDecision as "DNS decision" {
        Answered = "answered", "the name is allowed: answered as the parent's resolver answered";
        Withheld = "withheld", "answered with some addresses removed (loopback, link-local, metadata)";
        Refused = "refused", "no allowlist entry names it: REFUSED";
        Failed = "failed", "the parent's lookup failed or timed out: SERVFAIL";
        Limited = "limited", "over the client's rate: SERVFAIL at once";
        Malformed = "malformed", "not one standard query: FORMERR, NOTIMP or dropped";
    }
}

/// The service's counters, by decision.
#[derive(Debug, Default)]
pub struct QueryCounters {
    decisions: [AtomicU64; DnsDecision::ALL.len()],
}

impl QueryCounters {
    fn count(&self, decision: DnsDecision) {
        self.decisions[decision as usize].fetch_add(1, Relaxed);
    }

    pub fn decisions(&self, decision: DnsDecision) -> u64 {
        self.decisions[decision as usize].load(Relaxed)
    }
}

/// What a DNS service answers by.
#[derive(Clone)]
pub struct DnsSettings {
    /// The allowlist in force (a reload replaces what it holds).
    pub allowlist: Arc<RwLock<Allowlist>>,
    /// The parent's resolver options (`--dns-server`).
    pub dns: DnsOptions,
    /// The memory of answers given, shared with the `transparent` services.
    pub answered: Arc<Answered>,
    /// Queries per second per client.
    pub rate: u32,
    /// Only clients from these vsock CIDs are served (`allow_cid`,
    /// `--allow-cid`); others are closed. `None`: any client.
    pub allow_cids: Option<Vec<u32>>,
}

/// What answers a query: the allowlist in force, the resolver, the memory
/// of answers given.
pub struct Answerer {
    allowlist: Arc<RwLock<Allowlist>>,
    resolver: TokioResolver,
    answered: Arc<Answered>,
    counters: Arc<QueryCounters>,
    rate: u32,
    /// Addresses of another family than `-4`/`-6` allow are not given out:
    /// the parent could not connect to them.
    family: IpFamily,
}

impl Answerer {
    /// An answerer as `settings` say; its resolver runs on the current
    /// tokio runtime.
    pub fn new(settings: DnsSettings) -> Result<Answerer, DnsError> {
        Ok(Answerer {
            resolver: dns::build(&settings.dns)?,
            family: settings.dns.family,
            allowlist: settings.allowlist,
            answered: settings.answered,
            counters: Arc::default(),
            rate: settings.rate,
        })
    }

    /// The answer to one query from `client` (`None`: too short to answer).
    pub async fn answer(&self, client: Peer, query: &[u8]) -> Option<Vec<u8>> {
        let (decision, reply) = self.decide(client, query).await;
        self.counters.count(decision);
        let reply = reply?;
        match reply.to_vec() {
            Ok(bytes) if bytes.len() <= frame::MAX_FRAME_BYTES => Some(bytes),
            _ => error_reply(query, ResponseCode::ServFail),
        }
    }

    async fn decide(&self, client: Peer, query: &[u8]) -> (DnsDecision, Option<Message>) {
        let Ok(request) = Message::from_vec(query) else {
            return (DnsDecision::Malformed, error_message(query, ResponseCode::FormErr));
        };
        let id = request.metadata.id;
        if request.metadata.message_type != MessageType::Query {
            return (DnsDecision::Malformed, None);
        }
        if request.metadata.op_code != OpCode::Query {
            return (
                DnsDecision::Malformed,
                Some(Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp)),
            );
        }
        let [question] = request.queries.as_slice() else {
            return (
                DnsDecision::Malformed,
                Some(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)),
            );
        };
        let mut reply = Message::response(id, OpCode::Query);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(question.clone());
        if request.edns.is_some() {
            // A query with EDNS gets an answer with it (RFC 6891, 6.1.1);
            // the stream hop carries any size, the enclave's forwarder
            // truncates for its UDP clients.
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            reply.set_edns(edns);
        }
        let name = question.name().to_ascii();
        let name = name.trim_end_matches('.');
        let allowed = question.query_class() == DNSClass::IN
            && self.allowlist.read().unwrap_or_else(|e| e.into_inner()).names(name).is_some();
        if !allowed {
            tracing::debug!(%client, name, "DNS query refused: no allowlist entry names it");
            reply.metadata.response_code = ResponseCode::Refused;
            return (DnsDecision::Refused, Some(reply));
        }
        let rtype = question.query_type();
        let lookup =
            tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup(question.name().clone(), rtype));
        let found = match lookup.await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) if e.is_no_records_found() || e.is_nx_domain() => {
                if e.is_nx_domain() {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
                return (DnsDecision::Answered, Some(reply));
            }
            Ok(Err(e)) => {
                tracing::info!(%client, name, error = %e, "DNS lookup failed: SERVFAIL");
                reply.metadata.response_code = ResponseCode::ServFail;
                return (DnsDecision::Failed, Some(reply));
            }
            Err(_) => {
                tracing::info!(%client, name, "DNS lookup timed out: SERVFAIL");
                reply.metadata.response_code = ResponseCode::ServFail;
                return (DnsDecision::Failed, Some(reply));
            }
        };
        let (mut kept, mut withheld) = (Vec::new(), Vec::new());
        let mut ttl = MAX_TTL;
        {
            let allowlist = self.allowlist.read().unwrap_or_else(|e| e.into_inner());
            for record in found.answers() {
                let address: Option<IpAddr> = match &record.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                };
                if let Some(address) = address {
                    if !self.family.admits(address) {
                        continue;
                    }
                    if let Some(kind) = allowlist.withholds(address) {
                        withheld.push((address, kind));
                        continue;
                    }
                    kept.push(address);
                }
                let mut record = record.clone();
                record.ttl = record.ttl.min(MAX_TTL);
                ttl = ttl.min(record.ttl);
                reply.add_answer(record);
            }
        }
        if !kept.is_empty() {
            self.answered.remember(client, name, &kept, Duration::from_secs(u64::from(ttl)));
        }
        if withheld.is_empty() {
            tracing::debug!(%client, name, %rtype, addresses = ?kept, "DNS answered");
            return (DnsDecision::Answered, Some(reply));
        }
        tracing::info!(%client, name, %rtype, addresses = ?kept, withheld = ?withheld,
            "DNS answered without the addresses the safe-by-default rule withholds");
        (DnsDecision::Withheld, Some(reply))
    }

    /// Whether `client` may ask one more query now (a token bucket per
    /// client: `rate` a second, as many at once).
    fn admit(&self, buckets: &Mutex<HashMap<Peer, (f64, Instant)>>, client: Peer) -> bool {
        let rate = f64::from(self.rate.max(1));
        let now = Instant::now();
        let mut buckets = buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_RATE_BUCKETS {
            // Clients quiet for a second have full buckets: forgetting them changes nothing.
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
        }
        let (tokens, at) = buckets.entry(client).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// An error reply with the query's ID, when its header can be read.
fn error_message(query: &[u8], code: ResponseCode) -> Option<Message> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    Some(Message::error_msg(id, OpCode::Query, code))
}

fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    error_message(query, code)?.to_vec().ok()
}

/// A running DNS service; it ends with the process.
pub struct DnsServer {
    pub counters: Arc<QueryCounters>,
}

/// Per client: its connections open and the permits of its queries in flight.
type Clients = Mutex<HashMap<Peer, (usize, Arc<Semaphore>)>>;

/// Serves `listener` (a stream listener of any family): a thread accepts,
/// and each connection is served on a small tokio runtime, where lookups
/// run too (a slow name delays only its own answer).
pub fn start(listener: Socket, mut settings: DnsSettings) -> anyhow::Result<DnsServer> {
    let allow_cids = settings.allow_cids.take();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dns-service")
        .enable_all()
        .build()?;
    let answerer = {
        let _in_runtime = runtime.enter();
        Answerer::new(settings).context("cannot set up the DNS service's resolver")?
    };
    let counters = Arc::clone(&answerer.counters);
    listener.set_nonblocking(false)?;
    let allow_cids = allow_cids.map(|cids| cids.into_iter().collect());
    let service = Arc::new(Service {
        allow_cids,
        answerer: Arc::new(answerer),
        clients: Clients::default(),
        buckets: Mutex::default(),
        open: AtomicU64::new(0),
    });
    std::thread::Builder::new().name("dns".into()).spawn(move || service.accept(&listener, &runtime))?;
    Ok(DnsServer { counters })
}

struct Service {
    allow_cids: Option<std::collections::HashSet<u32>>,
    answerer: Arc<Answerer>,
    clients: Clients,
    buckets: Mutex<HashMap<Peer, (f64, Instant)>>,
    open: AtomicU64,
}

impl Service {
    fn accept(self: Arc<Self>, listener: &Socket, runtime: &tokio::runtime::Runtime) {
        loop {
            let socket = match listener.accept() {
                Ok((socket, _)) => socket,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS service: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let client = Peer::of(&socket);
            if let Some(allowed) = &self.allow_cids {
                if !matches!(client, Peer::Cid(cid) if allowed.contains(&cid)) {
                    tracing::warn!(%client, "DNS service: client refused: its CID is not in allow_cid");
                    continue;
                }
            }
            let Some(permits) = self.admit_connection(client) else {
                tracing::warn!(%client, "DNS service: too many connections; closing the new one");
                continue;
            };
            let service = Arc::clone(&self);
            runtime.spawn(async move {
                if let Err(e) = service.serve(socket, client, permits).await {
                    tracing::debug!(%client, error = %e, "DNS connection ended");
                }
                service.connection_closed(client);
            });
        }
    }

    /// Counts a new connection of `client`: its query permits, or `None`
    /// over the bounds.
    fn admit_connection(&self, client: Peer) -> Option<Arc<Semaphore>> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if self.open.load(Relaxed) >= MAX_CONNECTIONS as u64 {
            return None;
        }
        let (count, permits) =
            clients.entry(client).or_insert_with(|| (0, Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CLIENT))));
        if *count >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *count += 1;
        self.open.fetch_add(1, Relaxed);
        Some(Arc::clone(permits))
    }

    fn connection_closed(&self, client: Peer) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        self.open.fetch_sub(1, Relaxed);
        if let Some((count, _)) = clients.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                clients.remove(&client);
            }
        }
    }

    /// One connection: reads queries and answers each on a task of its
    /// own; a writer task sends the answers as they come, each releasing
    /// its query's permit once written (so a client that does not read its
    /// answers stops being read).
    async fn serve(&self, socket: Socket, client: Peer, permits: Arc<Semaphore>) -> Result<(), FrameError> {
        let (mut reader, mut writer) = tokio::io::split(SocketStream::new(socket)?);
        let (answers, mut outgoing) = mpsc::channel::<Answer>(MAX_IN_FLIGHT_PER_CLIENT);
        let written = tokio::spawn(async move {
            // After a failed write the answers still due are taken and
            // dropped, each with its permit: this ends only once every
            // lookup of the connection has, so that a client that closes
            // and comes back finds its permits still taken, not new ones.
            let mut failed = None;
            while let Some((answer, permit)) = outgoing.recv().await {
                if failed.is_none() {
                    failed = frame::write_frame(&mut writer, &answer).await.err();
                }
                drop(permit);
            }
            failed.map_or(Ok(()), Err)
        });
        let read = loop {
            let query = match frame::read_frame(&mut reader, frame::MAX_FRAME_BYTES).await {
                Ok(Some(query)) => query,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break Ok(()) };
            if !self.answerer.admit(&self.buckets, client) {
                self.answerer.counters.count(DnsDecision::Limited);
                let Some(reply) = error_reply(&query, ResponseCode::ServFail) else { continue };
                if answers.send((reply, permit)).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            let (answerer, answers) = (Arc::clone(&self.answerer), answers.clone());
            tokio::spawn(async move {
                if let Some(reply) = answerer.answer(client, &query).await {
                    let _ = answers.send((reply, permit)).await;
                }
            });
        };
        drop(answers);
        let written = written.await.unwrap_or_else(|e| Err(FrameError::Io(io::Error::other(e))));
        read.and(written)
    }
}

/// An answer to write, and the permit its query held.
type Answer = (Vec<u8>, tokio::sync::OwnedSemaphorePermit);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    use super::*;

    /// An answerer whose allowlist names `*.allowed.test` and whose resolver
    /// asks a port where nothing answers (these tests never look up).
    fn answerer(runtime: &tokio::runtime::Runtime) -> Answerer {
        let text = "allowlist:\n- {address: '*.allowed.test', port: 443}\n";
        let allowlist = Allowlist::parse(text, Path::new("test.yaml")).unwrap();
        let dns = DnsOptions { servers: vec!["127.0.0.1:9".parse().unwrap()], ..DnsOptions::default() };
        let settings = DnsSettings {
            allowlist: Arc::new(RwLock::new(allowlist)),
            dns,
            answered: Arc::default(),
            rate: DEFAULT_RATE,
            allow_cids: None,
        };
        let _in_runtime = runtime.enter();
        Answerer::new(settings).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = id;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        message.to_vec().unwrap()
    }

    fn reply(answerer: &Answerer, runtime: &tokio::runtime::Runtime, bytes: &[u8]) -> Option<Message> {
        let answer = runtime.block_on(answerer.answer(Peer::Cid(16), bytes))?;
        Some(Message::from_vec(&answer).expect("every answer parses"))
    }

    #[test]
    fn a_name_no_entry_names_is_refused_with_its_id_and_question() {
        let runtime = runtime();
        let answerer = answerer(&runtime);
        for name in ["kms.us-east-1.amazonaws.com.", "allowed.test.", "a.b.allowed.test."] {
            let answer = reply(&answerer, &runtime, &query(0x1234, name, RecordType::A)).unwrap();
            assert_eq!(answer.metadata.id, 0x1234);
            assert_eq!(answer.metadata.message_type, MessageType::Response);
            assert_eq!(answer.metadata.response_code, ResponseCode::Refused, "{name}");
            assert_eq!(answer.queries[0].name().to_ascii(), name);
            assert!(answer.answers.is_empty());
        }
        assert_eq!(answerer.counters.decisions(DnsDecision::Refused), 3);
    }

    #[test]
    fn what_is_not_one_standard_query_is_refused_as_malformed() {
        let runtime = runtime();
        let answerer = answerer(&runtime);
        assert!(reply(&answerer, &runtime, &[]).is_none(), "no header: nothing to answer");
        assert!(reply(&answerer, &runtime, &[0xAB]).is_none());
        let garbled = reply(&answerer, &runtime, &[0xAB, 0xCD, 0xFF]).unwrap();
        assert_eq!((garbled.metadata.id, garbled.metadata.response_code), (0xABCD, ResponseCode::FormErr));
        let mut two = Message::query();
        two.metadata.id = 7;
        two.add_query(Query::query(Name::from_ascii("a.allowed.test.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("b.allowed.test.").unwrap(), RecordType::A));
        let answer = reply(&answerer, &runtime, &two.to_vec().unwrap()).unwrap();
        assert_eq!((answer.metadata.id, answer.metadata.response_code), (7, ResponseCode::FormErr));
        let mut none = Message::query();
        none.metadata.id = 8;
        let answer = reply(&answerer, &runtime, &none.to_vec().unwrap()).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr, "zero questions");
        let mut response = Message::from_vec(&query(9, "a.allowed.test.", RecordType::A)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert!(
            reply(&answerer, &runtime, &response.to_vec().unwrap()).is_none(),
            "a response is not answered"
        );
        // A name whose compression pointer points at itself.
        let mut looped = query(10, "a.allowed.test.", RecordType::A)[..12].to_vec();
        looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        let answer = reply(&answerer, &runtime, &looped).unwrap();
        assert_eq!((answer.metadata.id, answer.metadata.response_code), (10, ResponseCode::FormErr));
        assert_eq!(answerer.counters.decisions(DnsDecision::Malformed), 7);
    }

    #[test]
    fn a_client_over_its_rate_is_not_admitted_and_others_are() {
        let runtime = runtime();
        let mut answerer = answerer(&runtime);
        answerer.rate = 10;
        let buckets = Mutex::default();
        let admitted = (0..100).filter(|_| answerer.admit(&buckets, Peer::Cid(5))).count();
        assert!((10..=11).contains(&admitted), "{admitted} of 100 at once");
        assert!(answerer.admit(&buckets, Peer::Cid(6)), "another client has its own rate");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_answered_with_their_id_or_dropped_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let runtime = runtime();
            let answerer = answerer(&runtime);
            if let Some(answer) = reply(&answerer, &runtime, &bytes) {
                prop_assert_eq!(answer.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
                prop_assert_eq!(answer.metadata.message_type, MessageType::Response);
            }
        }

        #[test]
        fn a_query_cut_anywhere_is_never_looked_up(cut in 0usize..40) {
            let runtime = runtime();
            let answerer = answerer(&runtime);
            let whole = query(77, "x.allowed.test.", RecordType::AAAA);
            if let Some(answer) = reply(&answerer, &runtime, &whole[..cut.min(whole.len() - 1)]) {
                prop_assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
            }
        }
    }
}
