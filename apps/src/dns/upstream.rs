//! The forwarder's one connection to the parent: every query of every
//! client goes over it, pipelined, and the parent answers in any order.
//!
//! Clients choose their message IDs themselves, and two of them (or a UDP
//! and a TCP client) may choose the same one; so each query is sent with an
//! ID unique among the queries in flight (a 2-byte rewrite, the one thing
//! done to a message by hand), and its answer gets the client's ID back. An
//! answer that carries a question is taken as its query's only when it is
//! the query's question: 16 bits of ID come round again after 65,536
//! queries, and an answer that arrives after its query gave up must not
//! reach a later one. (An error reply without a question, such as the
//! parent's SERVFAIL to a client over its rate, goes by its ID.)
//! The table of queries in flight is bounded; a query finds it full, or
//! waits past its timeout, or is lost with two connections: each of those
//! ends in an error here, which the caller answers with SERVFAIL, so that
//! no client waits forever.
//!
//! Who owns what: the table (behind a mutex, never held across an await)
//! owns each query's bytes and the sender of its answer, and is also the
//! queue of what to write: the connection task, woken by each new query,
//! writes the entries not yet written on its connection, oldest first. So
//! nothing grows while the parent is away: a query that gives up leaves
//! the table, and with it the queue. [`Upstream::ask`] owns the receiving
//! end and removes its entry when it gives up, so a late answer finds
//! nothing and is dropped. The connection task owns the socket: it
//! connects (with backoff) and writes, and a reader task beside it hands
//! answers to the table. When the connection drops, each query written on
//! it is written again once on the next (a second loss fails it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use tokio::sync::{oneshot, Notify};
use vsock_relay_engine::Endpoint;

use crate::dns::frame::{self, MAX_FRAME_BYTES};
use crate::dns::stream::SocketStream;

/// The first wait before connecting again after a failure or a drop.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between attempts: the backoff doubles up to it.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// A connection that lived this long was healthy: after it drops, connect
/// again at once and start the backoff over.
const HEALTHY_FOR: Duration = Duration::from_secs(1);
/// How long one connect attempt to the parent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a query got no answer from the parent (the client gets SERVFAIL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// The table of queries in flight was full.
    #[error("too many queries in flight")]
    Busy,
    /// No answer within the query timeout.
    #[error("no answer in time")]
    Timeout,
    /// Sent on two connections that both dropped before an answer.
    #[error("the connection to the parent dropped twice with the query in flight")]
    Lost,
    /// The message has no 12-byte header to carry an ID.
    #[error("not a DNS message")]
    NotAMessage,
}

/// Settings of the connection to the parent.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Where the parent's DNS service listens (any stream endpoint).
    pub to: Endpoint,
    /// How long a query waits for its answer.
    pub query_timeout: Duration,
    /// The most queries in flight at once, all clients together.
    pub max_in_flight: usize,
}

/// What the forwarder counts of its upstream side.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Connections made to the parent (the first and every reconnect).
    pub connections: AtomicU64,
    /// Queries written to the parent again on a new connection.
    pub resent: AtomicU64,
    /// Answers for no query in flight (late, after a timeout), for another
    /// question than their ID's query, or too short.
    pub stray_answers: AtomicU64,
}

/// A query in flight.
struct Pending {
    /// Tells this query from a later one that got the same ID.
    seq: u64,
    /// The query as sent: the client's bytes with the upstream ID.
    query: Vec<u8>,
    /// Its first question, which its answer must carry (`None`: it has
    /// none, and neither will an answer).
    question: Option<Query>,
    answer: oneshot::Sender<Vec<u8>>,
    /// Times written to a connection.
    writes: u8,
    /// The connection it was last written on.
    written_on: Option<u64>,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u16, Pending>,
    next_id: u16,
    next_seq: u64,
}

/// One query's place in the table.
#[derive(Clone, Copy, Debug)]
struct Key {
    id: u16,
    seq: u64,
}

type Shared = Arc<Mutex<Table>>;

fn lock(table: &Shared) -> MutexGuard<'_, Table> {
    // Nothing panics while holding it; a poisoned table is still consistent.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The handle clients ask through; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    table: Shared,
    /// Wakes the connection task: a query to write.
    queued: Arc<Notify>,
    config: Arc<UpstreamConfig>,
    counters: Arc<UpstreamCounters>,
}

impl Upstream {
    /// Starts the connection task on the current tokio runtime.
    pub fn start(config: UpstreamConfig) -> Upstream {
        let upstream = Upstream {
            table: Shared::default(),
            queued: Arc::default(),
            config: Arc::new(config),
            counters: Arc::default(),
        };
        tokio::spawn(connection_task(upstream.clone()));
        upstream
    }

    /// The counters of the upstream side.
    pub fn counters(&self) -> &UpstreamCounters {
        &self.counters
    }

    /// Sends `query` (a DNS message of at least 12 bytes) to the parent and
    /// returns its answer, with the query's own ID. `question` is the
    /// query's first question (the caller parsed it), which the answer must
    /// carry.
    pub async fn ask(&self, mut query: Vec<u8>, question: Option<&Query>) -> Result<Vec<u8>, AskError> {
        let client_id = message_id(&query).ok_or(AskError::NotAMessage)?;
        let (sender, answer) = oneshot::channel();
        let key = {
            let mut table = lock(&self.table);
            if table.pending.len() >= self.config.max_in_flight {
                return Err(AskError::Busy);
            }
            let id = loop {
                // Ends: fewer than 65,536 entries (max_in_flight is bounded).
                let id = table.next_id;
                table.next_id = id.wrapping_add(1);
                if !table.pending.contains_key(&id) {
                    break id;
                }
            };
            let seq = table.next_seq;
            table.next_seq += 1;
            set_message_id(&mut query, id);
            let question = question.cloned();
            table
                .pending
                .insert(id, Pending { seq, query, question, answer: sender, writes: 0, written_on: None });
            Key { id, seq }
        };
        let _entry = Entry { table: &self.table, key };
        self.queued.notify_one();
        match tokio::time::timeout(self.config.query_timeout, answer).await {
            Ok(Ok(mut answer)) => {
                set_message_id(&mut answer, client_id);
                Ok(answer)
            }
            Ok(Err(_dropped)) => Err(AskError::Lost),
            Err(_elapsed) => Err(AskError::Timeout),
        }
    }
}

/// Removes a query's entry when its asker is done with it (answered, timed
/// out, or dropped), unless the ID went to a later query meanwhile.
struct Entry<'a> {
    table: &'a Shared,
    key: Key,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut table = lock(self.table);
        if table.pending.get(&self.key.id).is_some_and(|p| p.seq == self.key.seq) {
            table.pending.remove(&self.key.id);
        }
    }
}

/// The ID of a DNS message: its first two bytes, big-endian.
pub fn message_id(message: &[u8]) -> Option<u16> {
    match message {
        [high, low, ..] if message.len() >= 12 => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    }
}

/// Sets the ID of a DNS message (the caller checked it has a header).
pub fn set_message_id(message: &mut [u8], id: u16) {
    if let Some(head) = message.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// The first question of a DNS message, if it has one and parses.
fn first_question(message: &[u8]) -> Option<Query> {
    Message::from_vec(message).ok()?.queries.into_iter().next()
}

/// Connects, serves the connection until it drops, and again, forever.
async fn connection_task(upstream: Upstream) {
    let to = upstream.config.to.clone();
    let mut backoff: Option<Duration> = None;
    let mut failures = 0u64;
    let mut serial = 0u64;
    loop {
        if let Some(wait) = backoff {
            tokio::time::sleep(wait).await;
        }
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, SocketStream::connect(&to)).await {
            Ok(Ok(stream)) => stream,
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no connection within {CONNECT_TIMEOUT:?}"),
                };
                failures += 1;
                let wait = next_backoff(backoff);
                // The first failure of a run says so; the rest only at debug.
                if failures == 1 {
                    tracing::warn!(%to, %error, retry_in = ?wait, "cannot connect to the parent's DNS service; retrying with backoff up to {RECONNECT_MAX:?}");
                } else {
                    tracing::debug!(%to, %error, failures, retry_in = ?wait, "cannot connect to the parent's DNS service");
                }
                backoff = Some(wait);
                continue;
            }
        };
        serial += 1;
        upstream.counters.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%to, connection = serial, after_failures = failures, "connected to the parent's DNS service");
        failures = 0;
        let resent = requeue_or_fail(&upstream, serial);
        if resent > 0 {
            tracing::info!(resent, "queries of the dropped connection sent again");
        }
        let started = Instant::now();
        serve(&upstream, stream, serial).await;
        let lived = started.elapsed();
        backoff = if lived >= HEALTHY_FOR { None } else { Some(next_backoff(backoff)) };
        tracing::warn!(%to, connection = serial, lived = ?lived, "connection to the parent's DNS service lost; reconnecting");
    }
}

fn next_backoff(current: Option<Duration>) -> Duration {
    current.map_or(RECONNECT_FIRST, |wait| (wait * 2).min(RECONNECT_MAX))
}

/// On a new connection (`serial`): each query written on an earlier one is
/// to be written again if that was its first write, or failed (its asker
/// gets [`AskError::Lost`]). Returns how many are to be written again.
fn requeue_or_fail(upstream: &Upstream, serial: u64) -> u64 {
    let mut table = lock(&upstream.table);
    let mut resent = 0;
    // Dropping a failed query's sender tells its asker at once.
    table.pending.retain(|_, pending| match pending.written_on {
        Some(on) if on < serial && pending.writes >= 2 => false,
        Some(on) if on < serial => {
            pending.written_on = None;
            resent += 1;
            true
        }
        _ => true,
    });
    upstream.counters.resent.fetch_add(resent, Ordering::Relaxed);
    resent
}

/// The queries not yet written on connection `serial`, oldest first, marked
/// as written on it.
fn take_unwritten(table: &Shared, serial: u64) -> Vec<Vec<u8>> {
    let mut table = lock(table);
    let mut unwritten: Vec<&mut Pending> =
        table.pending.values_mut().filter(|pending| pending.written_on.is_none()).collect();
    unwritten.sort_unstable_by_key(|pending| pending.seq);
    unwritten
        .into_iter()
        .map(|pending| {
            pending.writes += 1;
            pending.written_on = Some(serial);
            pending.query.clone()
        })
        .collect()
}

/// Serves one connection until it drops: writes what is in the table and
/// not yet written on it, whenever a query comes, while a reader task
/// delivers the answers.
async fn serve(upstream: &Upstream, stream: SocketStream, serial: u64) {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut answers =
        tokio::spawn(read_answers(reader, Arc::clone(&upstream.table), Arc::clone(&upstream.counters)));
    loop {
        for query in take_unwritten(&upstream.table, serial) {
            if let Err(e) = frame::write_frame(&mut writer, &query).await {
                tracing::debug!(error = %e, "cannot write a query to the parent");
                answers.abort();
                return;
            }
        }
        tokio::select! {
            () = upstream.queued.notified() => {}
            _ = &mut answers => break,
        }
    }
    answers.abort();
}

/// Reads answers until the stream ends or is out of step, handing each to
/// its query's asker.
async fn read_answers(
    mut reader: tokio::io::ReadHalf<SocketStream>,
    table: Shared,
    counters: Arc<UpstreamCounters>,
) {
    loop {
        let answer = match frame::read_frame(&mut reader, MAX_FRAME_BYTES).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from the parent's DNS service; reconnecting");
                return;
            }
        };
        let asked = first_question(&answer);
        let pending = message_id(&answer).and_then(|id| {
            let mut table = lock(&table);
            let pending = table.pending.get(&id)?;
            // An error reply may carry no question (the parent could not
            // or did not echo it): the ID alone then says whose it is.
            (asked.is_none() || pending.question == asked).then(|| table.pending.remove(&id))?
        });
        match pending {
            // The asker may have given up just now: then nobody needs it.
            Some(pending) => drop(pending.answer.send(answer)),
            None => {
                counters.stray_answers.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    bytes = answer.len(),
                    "an answer for no query in flight (late, for another question, or garbled); dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_and_rewritten_in_the_header_only() {
        let mut message = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9];
        assert_eq!(message_id(&message), Some(0x1234));
        set_message_id(&mut message, 0xabcd);
        assert_eq!(message, vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(message_id(&message[..11]), None, "no 12-byte header, no ID");
    }

    #[test]
    fn backoff_doubles_from_50_ms_up_to_2_s() {
        let mut wait = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = next_backoff(wait);
            seen.push(next.as_millis());
            wait = Some(next);
        }
        assert_eq!(seen, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn config(to: Endpoint, max_in_flight: usize) -> UpstreamConfig {
        UpstreamConfig { to, query_timeout: Duration::from_millis(300), max_in_flight }
    }

    /// A parent on a Unix socket of its own: `serve` gets each connection.
    fn parent_path(test: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("dns-upstream-{test}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn query_for(id: u16, name: &str) -> (Vec<u8>, Query) {
        let name = hickory_proto::rr::Name::from_ascii(name).unwrap();
        let message = crate::dns::forwarder::stub_query(id, &name, hickory_proto::rr::RecordType::A, None);
        (message.to_vec().unwrap(), message.queries[0].clone())
    }

    #[test]
    fn queries_wait_for_the_parent_and_only_those_still_waiting_are_written() {
        let path = parent_path("waiting");
        runtime().block_on(async {
            // Long enough for a reconnect after the backoff grew.
            let patient = UpstreamConfig {
                query_timeout: Duration::from_secs(10),
                ..config(Endpoint::Unix { path: path.clone() }, 64)
            };
            let upstream = Upstream::start(patient);
            // Asked while no parent listens: each asker gives up, and leaves nothing behind.
            for id in 0..200 {
                let (query, question) = query_for(id, "gone.example.");
                let gave_up =
                    tokio::time::timeout(Duration::from_millis(2), upstream.ask(query, Some(&question)))
                        .await;
                assert!(gave_up.is_err(), "no parent, no answer");
            }
            assert!(lock(&upstream.table).pending.is_empty());
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let (query, question) = query_for(7, "wanted.example.");
            let ask = upstream.ask(query.clone(), Some(&question));
            let parent = async {
                let (mut stream, _) = listener.accept().await.unwrap();
                let written = frame::read_frame(&mut stream, MAX_FRAME_BYTES).await.unwrap().unwrap();
                assert_eq!(
                    first_question(&written),
                    Some(question.clone()),
                    "the first query written is the one waiting"
                );
                assert_eq!(&written[2..], &query[2..], "the client's bytes, but for the ID");
                frame::write_frame(&mut stream, &written).await.unwrap();
                stream
            };
            let both = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(ask, parent) });
            let (answer, _stream) = both.await.expect("answered within 20 s");
            assert_eq!(message_id(&answer.unwrap()), Some(7), "the client's ID back");
        });
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_answer_to_another_question_under_the_same_id_is_not_taken() {
        let path = parent_path("question");
        runtime().block_on(async {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let upstream = Upstream::start(config(Endpoint::Unix { path: path.clone() }, 64));
            let (query, question) = query_for(1, "asked.example.");
            let ask = upstream.ask(query, Some(&question));
            let parent = async {
                let (mut stream, _) = listener.accept().await.unwrap();
                let written = frame::read_frame(&mut stream, MAX_FRAME_BYTES).await.unwrap().unwrap();
                // A late answer that came round to the same ID, then the right one.
                let (mut late, _) = query_for(0, "other.example.");
                set_message_id(&mut late, message_id(&written).unwrap());
                frame::write_frame(&mut stream, &late).await.unwrap();
                frame::write_frame(&mut stream, &written).await.unwrap();
                stream
            };
            let both = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(ask, parent) });
            let (answer, mut stream) = both.await.expect("answered within 20 s");
            assert_eq!(first_question(&answer.unwrap()), Some(question));
            assert_eq!(upstream.counters().stray_answers.load(Ordering::Relaxed), 1);

            // An error reply without a question goes by its ID.
            let (query, question) = query_for(2, "limited.example.");
            let ask = upstream.ask(query, Some(&question));
            let parent = async {
                // On the same connection.
                let written = frame::read_frame(&mut stream, MAX_FRAME_BYTES).await.unwrap().unwrap();
                let id = message_id(&written).unwrap();
                let servfail = Message::error_msg(
                    id,
                    hickory_proto::op::OpCode::Query,
                    hickory_proto::op::ResponseCode::ServFail,
                );
                frame::write_frame(&mut stream, &servfail.to_vec().unwrap()).await.unwrap();
            };
            let both = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(ask, parent) });
            let (answer, ()) = both.await.expect("answered within 20 s");
            let answer = Message::from_vec(&answer.expect("the SERVFAIL is the query's")).unwrap();
            assert_eq!(
                (answer.metadata.id, answer.metadata.response_code),
                (2, hickory_proto::op::ResponseCode::ServFail)
            );
        });
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn without_a_parent_queries_time_out_and_a_full_table_says_busy() {
        let to = Endpoint::Unix { path: "/nonexistent/dns.sock".into() };
        runtime().block_on(async {
            let upstream = Upstream::start(config(to, 1));
            let query = vec![0u8; 12];
            let (first, second) = tokio::join!(upstream.ask(query.clone(), None), async {
                tokio::task::yield_now().await;
                upstream.ask(query.clone(), None).await
            });
            assert_eq!(first, Err(AskError::Timeout));
            assert_eq!(second, Err(AskError::Busy));
            assert!(lock(&upstream.table).pending.is_empty(), "a query that timed out leaves the table");
            assert_eq!(upstream.ask(vec![0u8; 11], None).await, Err(AskError::NotAMessage));
        });
    }
}
