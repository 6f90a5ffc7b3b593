//! The state of one relayed connection and every transition it makes.
//!
//! Primer:
//! - A connection is a client socket (accepted) and an upstream socket (ours,
//!   connected on the client's behalf), with two pumps: client -> upstream
//!   and upstream -> client.
//! - The upstream connect is non-blocking and bounded by a deadline. The
//!   driver reports "upstream writable"; this module decides whether that
//!   means connected, failed, or not yet (a connecting vsock socket can
//!   report writable early): then it waits again, until the deadline.
//! - EOF read on one side becomes `shutdown(SHUT_WR)` on the other; the
//!   connection ends cleanly once both directions passed their EOF on. The
//!   second EOF is passed on by closing both sockets, with no `shutdown`
//!   first (on vsock that saves a packet per connection).
//! - Any error ends the whole connection with a reset on both sides
//!   ([`Connection::reset`]), so that a peer never mistakes a failure for a
//!   clean end of stream.
//! - The connection owns its sockets; the pumps own their pipes or buffers
//!   only while bytes are in flight. The worker decides when the sockets may
//!   close (after the driver let go of every operation on them).
//! - A routed connection (`route/`) starts earlier: it reads its client's
//!   head until it names a destination, waits for the router's verdict, and
//!   only then opens its upstream socket. A refusal is answered (`403`, a
//!   SOCKS reply code) and closed, never reset, so the client reads why.
//!   Head bytes past the head (pipelined TLS, a peeked ClientHello) and a
//!   PROXY protocol header are the prelude: sent upstream before any relayed
//!   byte.

use std::io::{self, Read};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use socket2::{SockAddr, Socket};

use crate::driver::{BufferIo, Key, RingOps};
use crate::endpoint::Host;
use crate::error::{ConnError, Op, Side};
use crate::pool::Pools;
use crate::pump::{DataPath, Pump, Wait};
use crate::ringpump::{Completed, RingPump};
use crate::route::router::Verdict;
use crate::route::{Decision, Head, Outcome, Parse, MAX_HEAD_BYTES};
use crate::socket;

/// Longest a routed connection waits for the router's verdict: its lookup
/// timeout and time for the policy check.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(8);

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

/// The two directions of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes read from the client, written upstream.
    ToUpstream,
    /// Bytes read from upstream, written to the client.
    ToClient,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::ToUpstream, Direction::ToClient];

    /// The side this direction reads from.
    pub fn source(self) -> Side {
        match self {
            Direction::ToUpstream => Side::Client,
            Direction::ToClient => Side::Upstream,
        }
    }

    /// The side this direction writes to.
    pub fn destination(self) -> Side {
        match self {
            Direction::ToUpstream => Side::Upstream,
            Direction::ToClient => Side::Client,
        }
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Routed: reading the client's head until it names a destination, at
    /// the latest by `deadline`.
    ReadingHead { deadline: Instant },
    /// Routed: the router decides on the destination, until `deadline`.
    Deciding { deadline: Instant },
    /// The upstream connect is in flight until `deadline`.
    Connecting { deadline: Instant },
    /// Both sockets connected; the pumps run until each passed on its EOF.
    Relaying,
    /// Ended; the worker closes the sockets once nothing refers to them.
    Closed,
}

/// What happened to a connection, as the driver saw it.
#[derive(Debug)]
pub enum Event {
    /// The client socket reported readable while its head is read.
    ClientReadable,
    /// The router decided on the destination.
    Decided(Verdict),
    /// The upstream socket reported writable while connecting.
    UpstreamWritable,
    /// A deadline (of the head, the decision or the connect) may have passed.
    DeadlinePassed,
    /// A direction's awaited readiness arrived (or it yielded and may go on).
    Ready(Direction),
    /// A receive or send of a direction on the ring data path completed.
    Completed(Direction, Completed),
    /// No byte moved either way for this long (`--idle-timeout`).
    IdleFor(Duration),
}

/// What a transition may use besides the connection: the worker's pools,
/// its driver's ring operations (if any), and where to count bytes moved.
pub struct Io<'a> {
    pub pools: &'a mut Pools,
    pub ring: Option<&'a mut dyn RingOps>,
    /// This connection's key in the driver (names its ring operations).
    pub key: Key,
    /// Bytes delivered by each direction (to upstream, to the client).
    pub moved: [u64; 2],
}

impl<'a> Io<'a> {
    pub fn new(pools: &'a mut Pools, ring: Option<&'a mut dyn RingOps>, key: Key) -> Self {
        Io { pools, ring, key, moved: [0; 2] }
    }
}

/// How one direction moves its bytes.
#[derive(Debug)]
enum Mover {
    /// Readiness-driven splice or copy.
    Pump(Pump),
    /// Completion-driven, through the driver's buffer ring.
    Ring(RingPump),
}

impl Mover {
    fn new(from: Side, to: Side, path: DataPath) -> Mover {
        match path {
            DataPath::Ring => Mover::Ring(RingPump::new(from, to)),
            path => Mover::Pump(Pump::new(from, to, path)),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Mover::Pump(pump) => pump.is_finished(),
            Mover::Ring(ring) => ring.is_finished(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Mover::Pump(pump) => pump.bytes,
            Mover::Ring(ring) => ring.bytes,
        }
    }

    /// The other direction finished: this one's EOF ends the connection,
    /// and closing the sockets passes it on (no `shutdown` first).
    fn end_with_close(&mut self) {
        match self {
            Mover::Pump(pump) => pump.half_close = false,
            Mover::Ring(ring) => ring.half_close = false,
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both directions passed their EOF on.
    Finished,
    /// Routed: the head, or the destination it named, was refused (the
    /// client was told, where its protocol has a way).
    Refused { decision: Decision, reason: String },
    /// One side failed; both sides are reset.
    Failed(ConnError),
    /// Idle longer than the idle timeout; both sides are reset.
    Idle(Duration),
}

/// What the worker must do next for a connection.
#[derive(Debug)]
pub enum Action {
    /// Wait for the client to send more of its head (the head deadline stands).
    AwaitHead,
    /// Ask the router about this destination, then report its verdict.
    Decide { host: Host, port: u16 },
    /// Open an upstream socket for `address` and [`Connection::start`] it.
    Connect(SockAddr),
    /// Wait for the upstream socket to be writable (the connect deadline stands).
    AwaitConnect,
    /// Wait as told for each direction that has a `Some` (the others keep
    /// whatever they were waiting for).
    Wait([Option<Wait>; 2]),
    /// End the connection.
    Close(Ending),
}

/// One relayed connection.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub client: Socket,
    /// Opened at the accept for a fixed target; for a routed connection,
    /// once the router allowed its destination.
    pub upstream: Option<Socket>,
    pub state: ConnState,
    pub opened: Instant,
    /// When the upstream connect began, and how long it took once it is
    /// established (taken once, for the connect-time histogram).
    connect_started: Instant,
    connect_took: Option<Duration>,
    /// The client's address as text, for the log line (empty unless debug
    /// logging is on: it costs a system call per connection).
    pub client_name: String,
    /// Routed: the head as read so far, and what the client asked for.
    head: Option<Box<Head>>,
    pub destination: Option<String>,
    /// Bytes sent upstream before the client's (a PROXY protocol header,
    /// bytes the client sent after its head).
    prelude: Vec<u8>,
    /// How many of the prelude's first bytes are not the client's (the
    /// PROXY protocol header): the rest counts as bytes delivered upstream.
    prelude_ours: usize,
    /// The client was answered (a routed refusal): close without a reset.
    answered: bool,
    edge_triggered: bool,
    movers: [Mover; 2],
}

impl Connection {
    /// A connection whose upstream connect may take until `deadline`, moving
    /// bytes by `paths` (to upstream, to the client); call
    /// [`Connection::start`] next.
    #[cfg(test)]
    pub fn new(id: u64, client: Socket, upstream: Socket, paths: [DataPath; 2], deadline: Instant) -> Self {
        let mut conn = Connection::accepted(id, client, ConnState::Connecting { deadline }, None);
        conn.attach(upstream, paths, deadline);
        conn
    }

    /// A connection to a fixed target, before its upstream socket is
    /// attached ([`Connection::attach`], then [`Connection::start`]).
    pub fn unattached(id: u64, client: Socket) -> Self {
        Connection::accepted(id, client, ConnState::Connecting { deadline: Instant::now() }, None)
    }

    /// A routed connection: its head is read until `deadline`
    /// ([`Action::AwaitHead`] first).
    pub fn routed(id: u64, client: Socket, head: Head, deadline: Instant) -> Self {
        Connection::accepted(id, client, ConnState::ReadingHead { deadline }, Some(Box::new(head)))
    }

    fn accepted(id: u64, client: Socket, state: ConnState, head: Option<Box<Head>>) -> Self {
        let client_name = match tracing::enabled!(tracing::Level::DEBUG) {
            true => socket::peer_name(&client).unwrap_or_default(),
            false => String::new(),
        };
        Connection {
            client_name,
            id,
            client,
            upstream: None,
            state,
            opened: Instant::now(),
            connect_started: Instant::now(),
            connect_took: None,
            head,
            destination: None,
            prelude: Vec::new(),
            prelude_ours: 0,
            answered: false,
            edge_triggered: false,
            movers: [
                Mover::new(Side::Client, Side::Upstream, DataPath::Copy),
                Mover::new(Side::Upstream, Side::Client, DataPath::Copy),
            ],
        }
    }

    /// Gives the connection its upstream socket, the data path of each
    /// direction and the connect's deadline.
    pub fn attach(&mut self, upstream: Socket, paths: [DataPath; 2], deadline: Instant) {
        self.upstream = Some(upstream);
        self.state = ConnState::Connecting { deadline };
        self.connect_started = Instant::now();
        self.movers = [
            Mover::new(Side::Client, Side::Upstream, paths[0]),
            Mover::new(Side::Upstream, Side::Client, paths[1]),
        ];
        if self.edge_triggered {
            self.set_edge_triggered();
        }
    }

    /// Bytes of ours (a PROXY protocol header) to send upstream first,
    /// before anything of the client's.
    pub fn set_prelude(&mut self, prelude: Vec<u8>) {
        self.prelude_ours = prelude.len();
        self.prelude = prelude;
    }

    /// Tells the pumps that readiness is edge-triggered (epoll): a short read
    /// then needs a confirming read, as an EOF behind it is reported no more.
    pub fn set_edge_triggered(&mut self) {
        self.edge_triggered = true;
        for mover in &mut self.movers {
            if let Mover::Pump(pump) = mover {
                pump.level_triggered = false;
            }
        }
    }

    /// Bytes delivered (to upstream, to the client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.movers[0].bytes(), self.movers[1].bytes())
    }

    /// The socket of `side` (the upstream's once there is one).
    pub fn socket(&self, side: Side) -> Option<&Socket> {
        match side {
            Side::Client => Some(&self.client),
            Side::Upstream => self.upstream.as_ref(),
        }
    }

    /// Arms a reset on both sockets (`SO_LINGER {1, 0}`): closing them then
    /// sends RST, so neither peer takes the end for a clean end of stream.
    /// A client that was answered (a routed refusal) is closed normally, so
    /// that it reads the answer.
    pub fn reset(&self) {
        if !self.answered {
            socket::reset(&self.client);
        }
        if let Some(upstream) = &self.upstream {
            socket::reset(upstream);
        }
    }

    /// Runs a direction: a readiness pump until it would block, a ring pump
    /// on a completion (`completed`) or to submit what it can (`None`).
    fn run(
        &mut self,
        direction: Direction,
        completed: Option<Completed>,
        io: &mut Io<'_>,
    ) -> Result<Wait, ConnError> {
        let Some(upstream) = &self.upstream else {
            let e = io::Error::other("relaying without an upstream socket");
            return Err(ConnError::new(Side::Upstream, Op::Write, e));
        };
        if direction == Direction::ToUpstream && !self.prelude.is_empty() {
            match upstream.send(&self.prelude) {
                Ok(sent) => {
                    self.prelude.drain(..sent);
                    // The client's bytes among them were delivered.
                    io.moved[0] += (sent.saturating_sub(self.prelude_ours)) as u64;
                    self.prelude_ours = self.prelude_ours.saturating_sub(sent);
                    if !self.prelude.is_empty() {
                        return Ok(Wait::Writable);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Wait::Writable),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Wait::Yield),
                Err(e) => return Err(ConnError::new(Side::Upstream, Op::Write, e)),
            }
        }
        let (src, dst) = match direction {
            Direction::ToUpstream => (&self.client, upstream),
            Direction::ToClient => (upstream, &self.client),
        };
        let (wait, n) = match (&mut self.movers[direction as usize], io.ring.as_deref_mut()) {
            (Mover::Pump(pump), _) => pump.run(src, dst, io.pools)?,
            (Mover::Ring(ring), Some(ops)) => {
                let mut buffers = BufferIo { ops, key: io.key, direction };
                match completed {
                    Some(completed) => ring.complete(completed, src, dst, &mut buffers)?,
                    None => (ring.step(src, dst, &mut buffers)?, 0),
                }
            }
            (Mover::Ring(_), None) => {
                let e = io::Error::other("the ring data path without a buffer ring");
                return Err(ConnError::new(direction.source(), Op::Read, e));
            }
        };
        io.moved[direction as usize] += n;
        if self.movers[direction as usize].is_finished() {
            self.movers[1 - direction as usize].end_with_close();
        }
        Ok(wait)
    }

    /// Starts the upstream connect to `addr` (after [`Connection::attach`]).
    pub fn start(&mut self, addr: &SockAddr, io: &mut Io<'_>) -> Action {
        let Some(upstream) = &self.upstream else {
            let e = io::Error::other("no upstream socket attached");
            return self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io);
        };
        match socket::start_connect(upstream, addr) {
            Ok(true) => self.connected(io),
            Ok(false) => Action::AwaitConnect,
            Err(e) => self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io),
        }
    }

    /// How long the upstream connect took, once, after the transition that
    /// established it (whether the connect completed at once in
    /// [`Connection::start`] or later).
    pub fn take_connect_time(&mut self) -> Option<Duration> {
        self.connect_took.take()
    }

    /// Every transition after the start.
    pub fn handle(&mut self, event: Event, io: &mut Io<'_>) -> Action {
        match (self.state, event) {
            // More of the head: parse it; a whole head goes to the router.
            (ConnState::ReadingHead { .. }, Event::ClientReadable) => self.read_head(io),
            (ConnState::ReadingHead { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                let after = deadline.saturating_duration_since(self.opened);
                let reason = format!("no whole head within {after:?}");
                self.refuse(Decision::HeadTimeout, Outcome::TimedOut, reason, io)
            }
            // The router's verdict: connect to the address it checked, or
            // tell the client why not.
            (ConnState::Deciding { .. }, Event::Decided(Verdict::Allowed { address, .. })) => {
                Action::Connect(SockAddr::from(address))
            }
            (ConnState::Deciding { .. }, Event::Decided(Verdict::Refused { outcome, reason })) => {
                // Not allowed by the policy; else the lookup (or the router) failed.
                let decision = match outcome {
                    Outcome::NotAllowed => Decision::NotAllowed,
                    _ => Decision::Unresolved,
                };
                self.refuse(decision, outcome, reason, io)
            }
            (ConnState::Deciding { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                let reason = "no decision on the destination in time".to_string();
                self.refuse(Decision::Unresolved, Outcome::LookupFailed, reason, io)
            }
            // Writable: connected, refused, or (vsock) not yet: then wait
            // again while the deadline allows.
            (ConnState::Connecting { deadline }, Event::UpstreamWritable) => {
                match self.upstream.as_ref().and_then(socket::finish_connect) {
                    Some(Ok(())) => self.connected(io),
                    Some(Err(e)) => self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io),
                    None if Instant::now() < deadline => Action::AwaitConnect,
                    None => self.timed_out(deadline, io),
                }
            }
            (ConnState::Connecting { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                self.timed_out(deadline, io)
            }
            // A direction may move again, or one of its operations completed.
            (ConnState::Relaying, Event::Ready(direction))
                if !self.movers[direction as usize].is_finished() =>
            {
                self.run_one(direction, None, io)
            }
            (ConnState::Relaying, Event::Completed(direction, completed)) => {
                self.run_one(direction, Some(completed), io)
            }
            (ConnState::Relaying, Event::IdleFor(idle)) => self.close(Ending::Idle(idle), io),
            // Late or stray events (readiness while connecting, a deadline
            // after the connect, anything after the end): nothing to do.
            (state, event) => {
                tracing::trace!(id = self.id, ?state, ?event, "event ignored");
                Action::Wait([None, None])
            }
        }
    }

    fn run_one(&mut self, direction: Direction, completed: Option<Completed>, io: &mut Io<'_>) -> Action {
        match self.run(direction, completed, io) {
            Ok(wait) => {
                let mut waits = [None, None];
                waits[direction as usize] = Some(wait);
                self.after_runs(waits, io)
            }
            Err(e) => self.fail(e, io),
        }
    }

    /// Reads what the client sent of its head and parses it.
    fn read_head(&mut self, io: &mut Io<'_>) -> Action {
        let Some(head) = self.head.as_mut() else {
            let e = io::Error::other("a routed connection without its head");
            return self.fail(ConnError::new(Side::Client, Op::Read, e), io);
        };
        // Read until the socket is empty (epoll reports edges) or the bound.
        let mut ended = false;
        let mut chunk = [0u8; 4096];
        while head.bytes.len() < MAX_HEAD_BYTES {
            let room = (MAX_HEAD_BYTES - head.bytes.len()).min(chunk.len());
            match (&self.client).read(&mut chunk[..room]) {
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
                Err(e) => return self.fail(ConnError::new(Side::Client, Op::Read, e), io),
            }
        }
        loop {
            let Some(head) = self.head.as_mut() else { return Action::AwaitHead };
            match head.parse() {
                // Connected and closed without a word (a port probe): no failure.
                Parse::More if ended && head.seen == 0 => return self.close(Ending::Finished, io),
                Parse::More if ended => {
                    let reason =
                        format!("the client closed after {} bytes, before its head ended", head.bytes.len());
                    return self.refuse(Decision::BadHead, Outcome::Failed, reason, io);
                }
                Parse::More => return Action::AwaitHead,
                Parse::Answer { reply, .. } => {
                    if let Err(e) = send_whole(&self.client, &reply) {
                        return self.fail(ConnError::new(Side::Client, Op::Write, e), io);
                    }
                }
                Parse::Destination { host, port, consumed } => {
                    let after_head = head.bytes.get(consumed..).unwrap_or_default();
                    self.prelude.extend_from_slice(after_head);
                    self.destination = Some(format!("{host}:{port}"));
                    // The router bounds its lookups; this bounds the whole decision.
                    self.state = ConnState::Deciding { deadline: Instant::now() + DECISION_TIMEOUT };
                    return Action::Decide { host, port };
                }
                Parse::Refuse { reply, reason } => {
                    self.answer(&reply);
                    return self.close(Ending::Refused { decision: Decision::BadHead, reason }, io);
                }
            }
        }
    }

    /// Tells a routed client `outcome` (where its protocol has a way) and
    /// closes.
    fn refuse(&mut self, decision: Decision, outcome: Outcome, reason: String, io: &mut Io<'_>) -> Action {
        if let Some(head) = &self.head {
            let reply = head.reply(outcome, &reason, None);
            self.answer(&reply);
        }
        self.close(Ending::Refused { decision, reason }, io)
    }

    /// Sends a routed client its answer and its EOF; the close that follows
    /// is not a reset, so the answer is read. What the client sent that was
    /// not read yet is read and dropped first (a close with unread bytes
    /// sends RST, which could overtake the answer), a bounded amount.
    fn answer(&mut self, reply: &[u8]) {
        if !reply.is_empty() && send_whole(&self.client, reply).is_err() {
            return;
        }
        let _ = self.client.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        let mut dropped = 0;
        while dropped < MAX_HEAD_BYTES * 4 {
            match (&self.client).read(&mut sink) {
                Ok(n) if n > 0 => dropped += n,
                _ => break,
            }
        }
        self.answered = true;
    }

    /// No upstream socket could be opened (out of descriptors): a routed
    /// client is told, others are reset. The caller counts it.
    pub fn give_up(&mut self) {
        if let Some(head) = &self.head {
            let reply = head.reply(Outcome::Failed, "the proxy is out of resources", None);
            self.answer(&reply);
        }
        self.state = ConnState::Closed;
        self.reset();
    }

    /// The upstream accepted: answer a routed client, then start both pumps
    /// (either side may already have sent bytes or even EOF).
    fn connected(&mut self, io: &mut Io<'_>) -> Action {
        self.state = ConnState::Relaying;
        self.connect_took = Some(self.connect_started.elapsed());
        if let Some(head) = self.head.take() {
            let bound = self.upstream.as_ref().and_then(|u| u.local_addr().ok()).and_then(|a| a.as_socket());
            let reply = head.reply(Outcome::Connected, "", bound);
            if let Err(e) = send_whole(&self.client, &reply) {
                return self.fail(ConnError::new(Side::Client, Op::Write, e), io);
            }
        }
        let mut waits = [None, None];
        for direction in Direction::BOTH {
            match self.run(direction, None, io) {
                Ok(wait) => waits[direction as usize] = Some(wait),
                Err(e) => return self.fail(e, io),
            }
        }
        self.after_runs(waits, io)
    }

    fn timed_out(&mut self, deadline: Instant, io: &mut Io<'_>) -> Action {
        let after = deadline.saturating_duration_since(self.opened);
        let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"));
        self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io)
    }

    fn after_runs(&mut self, waits: [Option<Wait>; 2], io: &mut Io<'_>) -> Action {
        if self.movers.iter().all(Mover::is_finished) {
            self.close(Ending::Finished, io)
        } else {
            Action::Wait(waits)
        }
    }

    fn fail(&mut self, error: ConnError, io: &mut Io<'_>) -> Action {
        // A routed client whose upstream could not be reached is told why.
        if let (Some(head), ConnState::Connecting { .. }, Op::Connect) = (&self.head, self.state, error.op) {
            let reply = head.reply(Outcome::of_connect_error(&error.source), &error.source.to_string(), None);
            self.answer(&reply);
        }
        self.close(Ending::Failed(error), io)
    }

    /// Marks the connection closed, gives back pooled pipes, buffers and
    /// ring buffers, and arms a reset when it failed. The sockets close when
    /// dropped.
    fn close(&mut self, ending: Ending, io: &mut Io<'_>) -> Action {
        self.state = ConnState::Closed;
        for (mover, direction) in self.movers.iter_mut().zip(Direction::BOTH) {
            match (mover, io.ring.as_deref_mut()) {
                (Mover::Pump(pump), _) => pump.release(io.pools),
                (Mover::Ring(ring), Some(ops)) => ring.release(&mut BufferIo { ops, key: io.key, direction }),
                (Mover::Ring(_), None) => {}
            }
        }
        if let Ending::Failed(_) | Ending::Idle(_) = ending {
            self.reset();
        }
        Action::Close(ending)
    }
}

#[cfg(test)]
mod tests {
    //! Every transition, on real sockets put in each state: Unix pairs for
    //! relaying, a loopback listener that never accepts for a connect in
    //! progress, a closed port for a refused connect.

    use super::*;
    use crate::driver::BufferSlice;
    use socket2::{Domain, Type};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::os::unix::net::UnixStream;

    const FAR: Duration = Duration::from_secs(60);

    fn io(pools: &mut Pools) -> Io<'_> {
        Io::new(pools, None, Key { index: 0, generation: 0 })
    }

    fn pair() -> (Socket, UnixStream) {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        ours.set_nonblocking(true).unwrap();
        (ours, UnixStream::from(std::os::fd::OwnedFd::from(theirs)))
    }

    fn tcp_socket() -> Socket {
        Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).unwrap()
    }

    /// A connection in the given state of its connect, with the client's peer.
    fn connecting(upstream: Socket, deadline: Instant) -> (Connection, UnixStream) {
        let (client, client_peer) = pair();
        (Connection::new(1, client, upstream, [DataPath::Splice; 2], deadline), client_peer)
    }

    /// A listener whose accept queue is full, so a new connect stays in progress.
    fn unanswering_listener() -> (TcpListener, Vec<Socket>, SockAddr) {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the queue; further SYNs are dropped and their connects wait.
        let fillers: Vec<Socket> = (0..2)
            .map(|_| {
                let s = tcp_socket();
                let _ = s.connect(&addr);
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        (listener.into(), fillers, addr)
    }

    /// A connection relaying between two Unix pairs, and both peers.
    fn relaying(pools: &mut Pools) -> (Connection, UnixStream, UnixStream) {
        let (client, client_peer) = pair();
        let (upstream, upstream_peer) = pair();
        let mut conn = Connection::new(7, client, upstream, [DataPath::Copy; 2], Instant::now() + FAR);
        match conn.handle(Event::UpstreamWritable, &mut io(pools)) {
            Action::Wait([Some(Wait::Readable), Some(Wait::Readable)]) => {}
            other => panic!("expected both directions waiting to read, got {other:?}"),
        }
        assert_eq!(conn.state, ConnState::Relaying);
        (conn, client_peer, upstream_peer)
    }

    fn failed(action: Action) -> ConnError {
        match action {
            Action::Close(Ending::Failed(e)) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn start_with_an_immediate_connect_starts_relaying() {
        let dir = std::env::temp_dir().join(format!("conn-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("upstream.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let upstream = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
        let (mut conn, _peer) = connecting(upstream, Instant::now() + FAR);
        let mut pools = Pools::new(0, 4);
        let action = conn.start(&SockAddr::unix(&path).unwrap(), &mut io(&mut pools));
        assert!(matches!(action, Action::Wait([Some(Wait::Readable), Some(Wait::Readable)])), "{action:?}");
        assert_eq!(conn.state, ConnState::Relaying);
        // The connect time is reported once, even without a later event.
        assert!(conn.take_connect_time().is_some());
        assert_eq!(conn.take_connect_time(), None);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_in_progress_awaits_then_writable_but_unconnected_waits_again() {
        let (_listener, _fillers, addr) = unanswering_listener();
        let (mut conn, _peer) = connecting(tcp_socket(), Instant::now() + FAR);
        let mut pools = Pools::new(0, 4);
        assert!(matches!(conn.start(&addr, &mut io(&mut pools)), Action::AwaitConnect));
        // A (spurious) writable report while the connect is still in flight.
        let action = conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
        assert!(matches!(action, Action::AwaitConnect), "{action:?}");
        assert!(matches!(conn.state, ConnState::Connecting { .. }));
    }

    #[test]
    fn writable_but_unconnected_after_the_deadline_times_out() {
        let (_listener, _fillers, addr) = unanswering_listener();
        let (mut conn, _peer) = connecting(tcp_socket(), Instant::now());
        let mut pools = Pools::new(0, 4);
        assert!(matches!(conn.start(&addr, &mut io(&mut pools)), Action::AwaitConnect));
        let e = failed(conn.handle(Event::UpstreamWritable, &mut io(&mut pools)));
        assert_eq!((e.side, e.op, e.source.kind()), (Side::Upstream, Op::Connect, io::ErrorKind::TimedOut));
        assert_eq!(conn.state, ConnState::Closed);
    }

    #[test]
    fn deadline_passed_while_connecting_times_out_with_the_timeout_in_the_message() {
        let (_listener, _fillers, addr) = unanswering_listener();
        let opened = Instant::now() - Duration::from_secs(3);
        let (mut conn, _peer) = connecting(tcp_socket(), opened + Duration::from_secs(3));
        conn.opened = opened;
        let mut pools = Pools::new(0, 4);
        assert!(matches!(conn.start(&addr, &mut io(&mut pools)), Action::AwaitConnect));
        let e = failed(conn.handle(Event::DeadlinePassed, &mut io(&mut pools)));
        assert_eq!(e.to_string(), "upstream connect failed: no answer within 3s");
        assert_eq!(conn.state, ConnState::Closed);
    }

    #[test]
    fn a_deadline_event_before_the_deadline_is_ignored() {
        // Deadlines of earlier states (the head's) come up after the state moved on.
        let (_listener, _fillers, addr) = unanswering_listener();
        let (mut conn, _peer) = connecting(tcp_socket(), Instant::now() + FAR);
        let mut pools = Pools::new(0, 4);
        assert!(matches!(conn.start(&addr, &mut io(&mut pools)), Action::AwaitConnect));
        let action = conn.handle(Event::DeadlinePassed, &mut io(&mut pools));
        assert!(matches!(action, Action::Wait([None, None])), "{action:?}");
        assert!(matches!(conn.state, ConnState::Connecting { .. }));
    }

    #[test]
    fn refused_connect_fails_on_the_upstream_side() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (mut conn, _peer) = connecting(tcp_socket(), Instant::now() + FAR);
        let mut pools = Pools::new(0, 4);
        let action = match conn.start(&port.into(), &mut io(&mut pools)) {
            Action::AwaitConnect => {
                std::thread::sleep(Duration::from_millis(50));
                conn.handle(Event::UpstreamWritable, &mut io(&mut pools))
            }
            action => action,
        };
        let e = failed(action);
        assert_eq!(
            (e.side, e.op, e.source.kind()),
            (Side::Upstream, Op::Connect, io::ErrorKind::ConnectionRefused)
        );
        assert_eq!(conn.state, ConnState::Closed);
    }

    #[test]
    fn connect_result_after_the_end_is_ignored() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, client_peer, upstream_peer) = relaying(&mut pools);
        drop((client_peer, upstream_peer));
        let mut io = io(&mut pools);
        assert!(matches!(conn.handle(Event::Ready(Direction::ToUpstream), &mut io), Action::Wait(_)));
        assert!(matches!(
            conn.handle(Event::Ready(Direction::ToClient), &mut io),
            Action::Close(Ending::Finished)
        ));
        for event in [Event::UpstreamWritable, Event::DeadlinePassed, Event::Ready(Direction::ToClient)] {
            assert!(matches!(conn.handle(event, &mut io), Action::Wait([None, None])));
        }
        assert_eq!(conn.state, ConnState::Closed);
    }

    #[test]
    fn readiness_while_connecting_is_ignored() {
        let (_listener, _fillers, addr) = unanswering_listener();
        let (mut conn, _peer) = connecting(tcp_socket(), Instant::now() + FAR);
        let mut pools = Pools::new(0, 4);
        assert!(matches!(conn.start(&addr, &mut io(&mut pools)), Action::AwaitConnect));
        let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
        assert!(matches!(action, Action::Wait([None, None])));
        assert!(matches!(conn.state, ConnState::Connecting { .. }));
    }

    #[test]
    fn relaying_moves_bytes_counts_them_and_ends_after_both_eofs() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, mut client_peer, mut upstream_peer) = relaying(&mut pools);
        let mut io = io(&mut pools);
        client_peer.write_all(b"ping").unwrap();
        let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
        assert!(matches!(action, Action::Wait([Some(Wait::Readable), None])), "{action:?}");
        let mut got = [0u8; 4];
        upstream_peer.read_exact(&mut got).unwrap();
        assert_eq!((&got, io.moved), (b"ping", [4, 0]));

        // Half-close from the client: passed on, the other direction still runs.
        client_peer.shutdown(Shutdown::Write).unwrap();
        let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
        assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])), "{action:?}");
        assert_eq!(upstream_peer.read(&mut got).unwrap(), 0, "EOF passed upstream");
        upstream_peer.write_all(b"pong").unwrap();
        upstream_peer.shutdown(Shutdown::Write).unwrap();
        // A short read emptied the socket: the EOF behind it comes with the next readiness.
        let action = conn.handle(Event::Ready(Direction::ToClient), &mut io);
        assert!(matches!(action, Action::Wait([None, Some(Wait::Readable)])), "{action:?}");
        let action = conn.handle(Event::Ready(Direction::ToClient), &mut io);
        assert!(matches!(action, Action::Close(Ending::Finished)), "{action:?}");
        assert_eq!((io.moved, conn.bytes()), ([4, 4], (4, 4)));
        assert_eq!(conn.state, ConnState::Closed);
        // The second EOF is passed on by closing the sockets, not by a shutdown before.
        client_peer.set_nonblocking(true).unwrap();
        let mut reply = [0u8; 8];
        assert_eq!(client_peer.read(&mut reply).unwrap(), 4);
        assert_eq!(&reply[..4], b"pong");
        let pending = client_peer.read(&mut reply).unwrap_err();
        assert_eq!(pending.kind(), io::ErrorKind::WouldBlock, "no shutdown before the close");
        drop(conn);
        assert_eq!(client_peer.read(&mut reply).unwrap(), 0, "EOF at the close");
    }

    #[test]
    fn a_failing_side_resets_both() {
        let mut pools = Pools::new(0, 4);
        let (client, mut client_peer) = pair();
        let (upstream, upstream_peer) = pair();
        let mut conn = Connection::new(9, client, upstream, [DataPath::Copy; 2], Instant::now() + FAR);
        conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
        drop(upstream_peer);
        client_peer.write_all(&[0u8; 64 << 10]).unwrap();
        // The upstream is gone: writing to it fails and the whole connection ends.
        let mut action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
        for _ in 0..3 {
            if matches!(action, Action::Close(_)) {
                break;
            }
            action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
        }
        let e = failed(action);
        assert_eq!((e.side, e.op), (Side::Upstream, Op::Write));
        assert_eq!(conn.client.linger().unwrap(), Some(Duration::ZERO), "the client is reset");
        assert_eq!(
            conn.upstream.as_ref().unwrap().linger().unwrap(),
            Some(Duration::ZERO),
            "the upstream is reset"
        );
    }

    /// The driver side of the ring path, faked: records what the pumps
    /// submit; the test plays the kernel and feeds completions back.
    #[derive(Default)]
    struct FakeRing {
        /// Whether a send's completion is still the kernel's.
        in_kernel: bool,
        received: Vec<Direction>,
        sent: Vec<(Direction, u16, u32, u32)>,
        given_back: Vec<u16>,
    }

    impl RingOps for FakeRing {
        fn receive(&mut self, _key: Key, direction: Direction, _src: &Socket) -> io::Result<()> {
            self.received.push(direction);
            Ok(())
        }

        fn send(
            &mut self,
            _key: Key,
            direction: Direction,
            _dst: &Socket,
            slice: BufferSlice,
        ) -> io::Result<()> {
            self.sent.push((direction, slice.buffer, slice.offset, slice.len));
            Ok(())
        }

        fn give_back(&mut self, buffer: u16) {
            self.given_back.push(buffer);
        }

        fn sending(&self, _key: Key, _direction: Direction) -> bool {
            self.in_kernel
        }
    }

    fn ring_io<'a>(pools: &'a mut Pools, ring: &'a mut FakeRing) -> Io<'a> {
        Io::new(pools, Some(ring), Key { index: 0, generation: 0 })
    }

    #[test]
    fn ring_path_receives_sends_in_order_gives_buffers_back_and_half_closes() {
        let (mut pools, mut ring) = (Pools::new(0, 4), FakeRing::default());
        let (client, _client_peer) = pair();
        let (upstream, mut upstream_peer) = pair();
        let mut conn = Connection::new(3, client, upstream, [DataPath::Ring; 2], Instant::now() + FAR);
        let action = conn.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut ring));
        assert!(
            matches!(action, Action::Wait([Some(Wait::Completion), Some(Wait::Completion)])),
            "{action:?}"
        );
        assert_eq!(ring.received, [Direction::ToUpstream, Direction::ToClient], "both directions receive");

        let up = Direction::ToUpstream;
        let received = |result, buffer| Event::Completed(up, Completed::Received { result, buffer });
        // Two buffers arrive: one send in flight at a time, oldest first;
        // with two held, no further receive.
        conn.handle(received(100, Some(7)), &mut ring_io(&mut pools, &mut ring));
        conn.handle(received(50, Some(9)), &mut ring_io(&mut pools, &mut ring));
        assert_eq!(ring.sent, [(up, 7, 0, 100)]);
        assert_eq!(ring.received.len(), 3, "a receive after the first buffer, none with two held");
        // A short send: the rest of the same buffer goes next.
        let mut io = ring_io(&mut pools, &mut ring);
        conn.handle(Event::Completed(up, Completed::Sent { result: 60 }), &mut io);
        assert_eq!(io.moved, [60, 0]);
        assert_eq!(ring.sent.last(), Some(&(up, 7, 60, 40)));
        assert!(ring.given_back.is_empty());
        conn.handle(
            Event::Completed(up, Completed::Sent { result: 40 }),
            &mut ring_io(&mut pools, &mut ring),
        );
        assert_eq!((ring.given_back.as_slice(), ring.sent.last()), (&[7][..], Some(&(up, 9, 0, 50))));
        assert_eq!(ring.received.len(), 4, "one buffer held again: receive");
        // EOF while a send is in flight: the half-close waits for it.
        conn.handle(received(0, None), &mut ring_io(&mut pools, &mut ring));
        let mut got = [0u8; 1];
        upstream_peer.set_nonblocking(true).unwrap();
        assert!(upstream_peer.read(&mut got).is_err(), "no EOF before the last send completed");
        let action = conn.handle(
            Event::Completed(up, Completed::Sent { result: 50 }),
            &mut ring_io(&mut pools, &mut ring),
        );
        assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])), "{action:?}");
        assert_eq!(upstream_peer.read(&mut got).unwrap(), 0, "EOF passed upstream");
        assert_eq!((ring.given_back.as_slice(), conn.bytes()), (&[7, 9][..], (150, 0)));
    }

    #[test]
    fn ring_path_failure_resets_and_gives_back_what_no_send_uses() {
        let (mut pools, mut ring) = (Pools::new(0, 4), FakeRing::default());
        let (client, _client_peer) = pair();
        let (upstream, _upstream_peer) = pair();
        let mut conn = Connection::new(4, client, upstream, [DataPath::Ring; 2], Instant::now() + FAR);
        conn.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut ring));
        let down = Direction::ToClient;
        let received = |result, buffer| Event::Completed(down, Completed::Received { result, buffer });
        conn.handle(received(10, Some(1)), &mut ring_io(&mut pools, &mut ring));
        conn.handle(received(10, Some(2)), &mut ring_io(&mut pools, &mut ring));
        // A send whose completion is still in the kernel keeps its buffer at
        // close; one already reaped gives it back (the driver's part is the first).
        let (client, _peer_a) = pair();
        let (upstream, _peer_b) = pair();
        let mut other = Connection::new(5, client, upstream, [DataPath::Ring; 2], Instant::now() + FAR);
        let mut other_ring = FakeRing { in_kernel: true, ..FakeRing::default() };
        other.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut other_ring));
        other.handle(received(10, Some(4)), &mut ring_io(&mut pools, &mut other_ring));
        other.handle(received(10, Some(6)), &mut ring_io(&mut pools, &mut other_ring));
        let e = Event::Completed(
            Direction::ToUpstream,
            Completed::Received { result: -libc::ECONNRESET, buffer: None },
        );
        failed(other.handle(e, &mut ring_io(&mut pools, &mut other_ring)));
        assert_eq!(other_ring.given_back, [6], "buffer 4 is still being sent");
        // The client side fails a send: the whole connection ends with a reset.
        let sent = Event::Completed(down, Completed::Sent { result: -libc::EPIPE });
        let e = failed(conn.handle(sent, &mut ring_io(&mut pools, &mut ring)));
        assert_eq!((e.side, e.op), (Side::Client, Op::Write));
        assert_eq!(ring.given_back, [1, 2], "both buffers back (the failed send is over)");
        assert_eq!(conn.client.linger().unwrap(), Some(Duration::ZERO));
        assert_eq!(conn.state, ConnState::Closed);
    }

    #[test]
    fn a_finished_direction_ignores_readiness() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, client_peer, _upstream_peer) = relaying(&mut pools);
        client_peer.shutdown(Shutdown::Write).unwrap();
        let mut io = io(&mut pools);
        let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
        assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])));
        let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
        assert!(matches!(action, Action::Wait([None, None])));
        assert_eq!(conn.state, ConnState::Relaying);
    }

    /// A routed connection's client and its peer, reading a head of `kind`.
    fn routed(kind: crate::route::RouteKind, deadline: Instant) -> (Connection, UnixStream) {
        let (client, client_peer) = pair();
        (Connection::routed(7, client, Head::new(kind), deadline), client_peer)
    }

    fn allowed(address: &str) -> Event {
        Event::Decided(Verdict::Allowed { address: address.parse().unwrap(), rule: "rule".into() })
    }

    /// Attaches a connected Unix pair as the upstream; its peer.
    fn attach_connected(conn: &mut Connection) -> UnixStream {
        let (upstream, upstream_peer) = pair();
        conn.attach(upstream, [DataPath::Copy; 2], Instant::now() + FAR);
        upstream_peer
    }

    #[test]
    fn a_connect_head_in_pieces_is_decided_then_answered_200_with_the_pipelined_bytes_sent_first() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
        client_peer.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\n").unwrap();
        assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
        assert!(matches!(conn.state, ConnState::ReadingHead { .. }));
        client_peer.write_all(b"Host: api.example.com\r\n\r\nclient hello").unwrap();
        let action = conn.handle(Event::ClientReadable, &mut io(&mut pools));
        let Action::Decide { host, port } = action else { panic!("{action:?}") };
        assert_eq!((host, port), (Host::Name("api.example.com".into()), 443));
        assert!(matches!(conn.state, ConnState::Deciding { .. }));
        assert_eq!(conn.destination.as_deref(), Some("api.example.com:443"));
        // Allowed: connect to the address the router checked.
        let action = conn.handle(allowed("192.0.2.1:443"), &mut io(&mut pools));
        let Action::Connect(address) = action else { panic!("{action:?}") };
        assert_eq!(address.as_socket(), Some("192.0.2.1:443".parse().unwrap()));
        let mut upstream_peer = attach_connected(&mut conn);
        let mut io = io(&mut pools);
        let action = conn.handle(Event::UpstreamWritable, &mut io);
        assert!(matches!(action, Action::Wait(_)), "{action:?}");
        assert_eq!(conn.state, ConnState::Relaying);
        let mut answer = [0u8; 39];
        client_peer.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 Connection established\r\n\r\n");
        let mut first = [0u8; 12];
        upstream_peer.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"client hello", "bytes after the head go upstream first");
        // Then it relays as any connection does.
        client_peer.write_all(b"more").unwrap();
        conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
        let mut more = [0u8; 4];
        upstream_peer.read_exact(&mut more).unwrap();
        assert_eq!((&more, io.moved[0]), (b"more", 12 + 4), "the client's bytes after its head count too");
    }

    #[test]
    fn a_refused_destination_is_answered_403_and_closed_without_a_reset() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
        client_peer.write_all(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::Decide { .. }));
        let verdict = Verdict::Refused { outcome: Outcome::NotAllowed, reason: "no entry".into() };
        let action = conn.handle(Event::Decided(verdict), &mut io(&mut pools));
        let Action::Close(Ending::Refused { decision: Decision::NotAllowed, reason }) = action else {
            panic!("{action:?}")
        };
        assert_eq!(reason, "no entry");
        assert_eq!(conn.client.linger().unwrap(), None, "not reset: the client reads the answer");
        drop(conn);
        let mut answer = String::new();
        client_peer.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 403 Forbidden\r\n") && answer.ends_with("no entry\n"),
            "{answer}"
        );
    }

    #[test]
    fn an_unreachable_upstream_is_answered_502_by_socks_code_and_a_late_verdict_is_ignored() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Socks5, Instant::now() + FAR);
        client_peer.write_all(&[5, 1, 0]).unwrap();
        assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
        let mut choice = [0u8; 2];
        client_peer.read_exact(&mut choice).unwrap();
        assert_eq!(choice, [5, 0], "the greeting is answered: no authentication");
        client_peer.write_all(&[5, 1, 0, 1, 192, 0, 2, 1, 0, 80]).unwrap();
        let action = conn.handle(Event::ClientReadable, &mut io(&mut pools));
        assert!(matches!(action, Action::Decide { host: Host::Ip(_), port: 80 }), "{action:?}");
        conn.handle(allowed("192.0.2.1:80"), &mut io(&mut pools));
        // A refused connect: told as SOCKS reply 0x05, no reset of the client.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        conn.attach(tcp_socket(), [DataPath::Copy; 2], Instant::now() + FAR);
        let mut action = conn.start(&port.into(), &mut io(&mut pools));
        if let Action::AwaitConnect = action {
            std::thread::sleep(Duration::from_millis(50));
            action = conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
        }
        assert_eq!(failed(action).op, Op::Connect);
        let mut reply = [0u8; 10];
        client_peer.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..2], [5, 0x05], "connection refused");
        assert_eq!(conn.client.linger().unwrap(), None);
        let late = conn.handle(allowed("192.0.2.1:80"), &mut io(&mut pools));
        assert!(matches!(late, Action::Wait([None, None])), "{late:?}");
    }

    #[test]
    fn a_head_not_whole_by_its_deadline_is_closed_and_a_bad_one_at_once() {
        let mut pools = Pools::new(0, 4);
        let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
        client_peer.write_all(b"CONNECT a.example:443").unwrap();
        assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
        // The deadline has not passed: nothing happens.
        let action = conn.handle(Event::DeadlinePassed, &mut io(&mut pools));
        assert!(matches!(action, Action::Wait([None, None])), "{action:?}");
        let (mut late, _late_peer) = routed(crate::route::RouteKind::Connect, Instant::now());
        let action = late.handle(Event::DeadlinePassed, &mut io(&mut pools));
        assert!(
            matches!(action, Action::Close(Ending::Refused { decision: Decision::HeadTimeout, .. })),
            "{action:?}"
        );
        // Not TLS on an SNI route: closed at once, with nothing sent.
        let (mut sni, mut sni_peer) =
            routed(crate::route::RouteKind::Sni { port: 443 }, Instant::now() + FAR);
        sni_peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let action = sni.handle(Event::ClientReadable, &mut io(&mut pools));
        assert!(
            matches!(action, Action::Close(Ending::Refused { decision: Decision::BadHead, .. })),
            "{action:?}"
        );
        drop(sni);
        let mut rest = Vec::new();
        sni_peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // A client that connects and closes without a word is no failure.
        let (mut probe, probe_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
        probe_peer.shutdown(Shutdown::Write).unwrap();
        let action = probe.handle(Event::ClientReadable, &mut io(&mut pools));
        assert!(matches!(action, Action::Close(Ending::Finished)), "{action:?}");
    }
}
