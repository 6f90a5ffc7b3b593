//! The routed head: what a routed connection does before it has an
//! upstream, and what it tells its client.
//!
//! A routed client first sends a head (an HTTP `CONNECT`, a SOCKS5 greeting
//! and request, a TLS ClientHello) that names its destination; the parsers
//! in `route/` say what it means, this module reads it from the socket,
//! sends the answers the protocol wants (the SOCKS5 method choice, `200`,
//! `403`, a SOCKS reply code; none on success for a plain HTTP request,
//! whose answer is the upstream's response) and counts the route's decisions as they are
//! made, so that the connection's state machine (`conn/mod.rs`) only moves
//! between states. A refusal is answered and the client's EOF sent, never
//! a reset: the client reads why.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use crate::error::{ConnError, Op, Side};
use crate::route::{Decision, Destination, Head, Outcome, Parse, Route, RouteCounters, MAX_HEAD_BYTES};

/// The routed part of a connection.
#[derive(Debug)]
pub(crate) struct Routed {
    /// The head as read so far; gone once the tunnel is open (nothing more
    /// is answered then).
    head: Option<Box<Head>>,
    /// What the client asked for (`host:port`), once its head named it.
    destination: Option<String>,
    /// The client was answered (a refusal): its close is not a reset.
    answered: bool,
    counters: Arc<RouteCounters>,
}

/// Where the head stands after a step (more read, a verdict, a deadline).
#[derive(Debug)]
pub(crate) enum HeadStep {
    /// The head is not whole yet: wait for more.
    More,
    /// The head names `destination`; `after` goes upstream first: what the
    /// parser said to send in place of the head (an absolute-form request
    /// rewritten), then what the client sent after its head.
    Named { destination: Destination, after: Vec<u8> },
    /// The client closed without a byte (a port probe): no failure.
    Silent,
    /// The head was refused: the client was told (where its protocol has a
    /// way) and the decision counted.
    Refused { decision: Decision, reason: String },
    /// Reading or answering failed.
    Failed(ConnError),
}

impl Routed {
    /// The routed part of a new client of `route`.
    pub fn new(route: &Route) -> Self {
        Routed {
            head: Some(Box::new(Head::new(route.kind))),
            destination: None,
            answered: false,
            counters: Arc::clone(&route.counters),
        }
    }

    /// What the client asked for, once its head named it.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// Whether the client was answered (so its close must not be a reset).
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Reads what the client sent of its head (until the socket is empty:
    /// epoll reports edges, or the bound) and parses it.
    pub fn read(&mut self, client: &Socket) -> HeadStep {
        let Some(head) = self.head.as_mut() else { return HeadStep::Failed(no_head()) };
        let mut ended = false;
        let mut chunk = [0u8; 4096];
        while head.bytes.len() < MAX_HEAD_BYTES {
            let room = (MAX_HEAD_BYTES - head.bytes.len()).min(chunk.len());
            match (&*client).read(&mut chunk[..room]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    head.bytes.extend_from_slice(&chunk[..n]);
                    head.seen += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return HeadStep::Failed(ConnError::new(Side::Client, Op::Read, e)),
            }
        }
        loop {
            let Some(head) = self.head.as_mut() else { return HeadStep::More };
            match head.parse() {
                Parse::More if ended && head.seen == 0 => return HeadStep::Silent,
                Parse::More if ended => {
                    let reason =
                        format!("the client closed after {} bytes, before its head ended", head.bytes.len());
                    return self.refuse(client, Decision::BadHead, Outcome::Failed, reason);
                }
                Parse::More => return HeadStep::More,
                Parse::Answer { reply, .. } => {
                    if let Err(e) = send_whole(client, &reply) {
                        return HeadStep::Failed(ConnError::new(Side::Client, Op::Write, e));
                    }
                }
                Parse::Destination { host, port, consumed, send_first } => {
                    let mut after = send_first;
                    after.extend_from_slice(head.bytes.get(consumed..).unwrap_or_default());
                    self.destination = Some(format!("{host}:{port}"));
                    return HeadStep::Named { destination: Destination { host, port }, after };
                }
                Parse::Refuse { reply, reason } => {
                    self.answer(client, &reply);
                    return self.counted(Decision::BadHead, reason);
                }
            }
        }
    }

    /// No whole head `after` the accept.
    pub fn head_timed_out(&mut self, client: &Socket, after: Duration) -> HeadStep {
        let reason = format!("no whole head within {after:?}");
        self.refuse(client, Decision::HeadTimeout, Outcome::TimedOut, reason)
    }

    /// The router allowed the destination, by `rule`.
    pub fn allowed(&self, rule: &str) {
        self.counters.decided(Decision::Allowed);
        self.counters.allowed_by(rule);
    }

    /// The router refused the destination (`outcome` says why: the policy,
    /// or the lookup).
    pub fn refused(&mut self, client: &Socket, outcome: Outcome, reason: String) -> HeadStep {
        let decision = match outcome {
            Outcome::NotAllowed => Decision::NotAllowed,
            _ => Decision::Unresolved,
        };
        self.refuse(client, decision, outcome, reason)
    }

    /// No decision on the destination in time.
    pub fn undecided(&mut self, client: &Socket) -> HeadStep {
        let reason = "no decision on the destination in time".to_string();
        self.refuse(client, Decision::Unresolved, Outcome::LookupFailed, reason)
    }

    /// The upstream accepted: tells the client its tunnel is open (`bound`:
    /// the upstream socket's local address, for SOCKS5). Nothing is
    /// answered after this.
    pub fn connected(&mut self, client: &Socket, bound: Option<SocketAddr>) -> Result<(), ConnError> {
        let Some(head) = self.head.take() else { return Ok(()) };
        let reply = head.reply(Outcome::Connected, "", bound);
        send_whole(client, &reply).map_err(|e| ConnError::new(Side::Client, Op::Write, e))
    }

    /// The upstream could not be reached: the client is told why (before
    /// its tunnel opened; a failure after is a reset, as for any client).
    pub fn connect_failed(&mut self, client: &Socket, error: &io::Error) {
        self.tell(client, Outcome::of_connect_error(error), &error.to_string());
    }

    /// No upstream socket could be opened (out of descriptors).
    pub fn out_of_resources(&mut self, client: &Socket) {
        self.tell(client, Outcome::Failed, "the proxy is out of resources");
    }

    /// Tells the client `outcome` (where its protocol has a way), counts the
    /// decision, and says so.
    fn refuse(&mut self, client: &Socket, decision: Decision, outcome: Outcome, reason: String) -> HeadStep {
        self.tell(client, outcome, &reason);
        self.counted(decision, reason)
    }

    /// Counts a refusal: the route's decision.
    fn counted(&self, decision: Decision, reason: String) -> HeadStep {
        self.counters.decided(decision);
        HeadStep::Refused { decision, reason }
    }

    /// Tells the client `outcome` before its tunnel opened (nothing after),
    /// in its protocol's words where it has any.
    fn tell(&mut self, client: &Socket, outcome: Outcome, detail: &str) {
        if let Some(head) = &self.head {
            let reply = head.reply(outcome, detail, None);
            self.answer(client, &reply);
        }
    }

    /// Sends the client its answer and its EOF; the close that follows is
    /// not a reset, so the answer is read. What the client sent that was
    /// not read yet is read and dropped first (a close with unread bytes
    /// sends RST, which could overtake the answer), a bounded amount.
    fn answer(&mut self, client: &Socket, reply: &[u8]) {
        if !reply.is_empty() && send_whole(client, reply).is_err() {
            return;
        }
        let _ = client.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        let mut dropped = 0;
        while dropped < MAX_HEAD_BYTES * 4 {
            match (&*client).read(&mut sink) {
                Ok(n) if n > 0 => dropped += n,
                _ => break,
            }
        }
        self.answered = true;
    }
}

/// Sends all of a short message (an answer to a routed client) on a
/// non-blocking socket; one that does not fit at once is an error.
fn send_whole(socket: &Socket, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match socket.send(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The error of a routed step without its head (after the tunnel opened: a
/// bug, not a client's doing).
pub(super) fn no_head() -> ConnError {
    ConnError::new(Side::Client, Op::Read, io::Error::other("a routed connection without its head"))
}
