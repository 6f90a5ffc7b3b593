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

use socket2::{Domain, SockAddr, Socket};

use crate::endpoint::Host;
use crate::error::{ConnError, Op, Side};
use crate::pool::Pools;
use crate::route::router::Verdict;
use crate::route::{Decision, Head, Outcome, Parse, MAX_HEAD_BYTES};
use crate::socket;
use crate::vocab::{BufferIo, BufferRingOps, Completed, DataPath, Direction, Key, Readiness, Wait};
use completion_pump::CompletionPump;
use pump::Pump;

mod completion_pump;
mod half_close;
pub(crate) mod pump;

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
pub struct Context<'a> {
    pub pools: &'a mut Pools,
    pub ring: Option<&'a mut dyn BufferRingOps>,
    /// This connection's key in the driver (names its ring operations).
    pub key: Key,
    /// Bytes delivered by each direction (to upstream, to the client).
    pub moved: [u64; 2],
}

impl<'a> Context<'a> {
    pub fn new(pools: &'a mut Pools, ring: Option<&'a mut dyn BufferRingOps>, key: Key) -> Self {
        Context { pools, ring, key, moved: [0; 2] }
    }
}

/// How one direction moves its bytes.
#[derive(Debug)]
enum Mover {
    /// Readiness-driven splice or copy.
    Pump(Pump),
    /// Completion-driven, through the driver's buffer ring.
    Completion(CompletionPump),
}

impl Mover {
    fn new(from: Side, to: Side, path: DataPath) -> Mover {
        match path {
            DataPath::Ring => Mover::Completion(CompletionPump::new(from, to)),
            path => Mover::Pump(Pump::new(from, to, path)),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Mover::Pump(pump) => pump.is_finished(),
            Mover::Completion(ring) => ring.is_finished(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Mover::Pump(pump) => pump.bytes,
            Mover::Completion(ring) => ring.bytes,
        }
    }

    /// The other direction finished: this one's EOF ends the connection,
    /// and closing the sockets passes it on (no `shutdown` first).
    fn end_with_close(&mut self) {
        match self {
            Mover::Pump(pump) => pump.half_close.end_with_close(),
            Mover::Completion(ring) => ring.half_close.end_with_close(),
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
    /// Writable is no proof of a connect here (vsock): ask for the peer too.
    connect_needs_peer: bool,
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
    /// What each direction waits for (`None`: not started).
    waits: [Option<Wait>; 2],
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
            connect_needs_peer: false,
            head,
            destination: None,
            prelude: Vec::new(),
            prelude_ours: 0,
            answered: false,
            edge_triggered: false,
            waits: [None, None],
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
        io: &mut Context<'_>,
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
            (Mover::Completion(ring), Some(ops)) => {
                let mut buffers = BufferIo { ops, key: io.key, direction };
                match completed {
                    Some(completed) => ring.complete(completed, src, dst, &mut buffers)?,
                    None => (ring.step(src, dst, &mut buffers)?, 0),
                }
            }
            (Mover::Completion(_), None) => {
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
    pub fn start(&mut self, addr: &SockAddr, io: &mut Context<'_>) -> Action {
        let Some(upstream) = &self.upstream else {
            let e = io::Error::other("no upstream socket attached");
            return self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io);
        };
        self.connect_needs_peer = addr.domain() == Domain::VSOCK;
        // With epoll, a connect done already (loopback) goes on now rather
        // than after a wait (measured: churn 1.01-1.30x on 6.18). io_uring's
        // poll of a connected socket completes within the submission that
        // arms it, so there the extra call only costs (0.69-1.27x; measured
        // while io_uring's ACCEPT still stalled the worker on 6.18, not
        // measured again since the listener is polled).
        let started = match socket::start_connect(upstream, addr) {
            Ok(false) if self.edge_triggered && !self.connect_needs_peer => {
                socket::connected_now(upstream).map(|done| done.map(|()| true))
            }
            started => Some(started),
        };
        match started {
            Some(Ok(true)) => self.connected(io),
            None | Some(Ok(false)) => Action::AwaitConnect,
            Some(Err(e)) => self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io),
        }
    }

    /// Test seam: treat the upstream as vsock, whose writable report may
    /// come before its connect (no socket on the test host does that).
    #[cfg(test)]
    pub fn confirm_connect_by_peer(&mut self) {
        self.connect_needs_peer = true;
    }

    /// How long the upstream connect took, once, after the transition that
    /// established it (whether the connect completed at once in
    /// [`Connection::start`] or later).
    pub fn take_connect_time(&mut self) -> Option<Duration> {
        self.connect_took.take()
    }

    /// What each direction waits for now (`None`: not started).
    pub fn waiting(&self, direction: Direction) -> Option<Wait> {
        self.waits[direction as usize]
    }

    /// What `readiness` of the connection's `side` socket means to it: the
    /// events to handle, in order (a second one only while the connection
    /// is still open after the first).
    pub fn on_ready(&self, side: Side, readiness: Readiness) -> [Option<Event>; 2] {
        match self.state {
            ConnState::ReadingHead { .. } if side == Side::Client && readiness.readable => {
                [Some(Event::ClientReadable), None]
            }
            ConnState::Connecting { .. } if side == Side::Upstream && readiness.writable => {
                [Some(Event::UpstreamWritable), None]
            }
            // Early client bytes wait: the pumps start after the connect.
            ConnState::Relaying => Direction::BOTH.map(|direction| {
                let waits_here = match self.waits[direction as usize] {
                    Some(Wait::Readable) => direction.source() == side && readiness.readable,
                    Some(Wait::Writable) => direction.destination() == side && readiness.writable,
                    _ => false,
                };
                waits_here.then_some(Event::Ready(direction))
            }),
            _ => [None, None],
        }
    }

    /// Notes what the directions wait for, as `action` (being carried out)
    /// says: [`Connection::on_ready`] and the yield queue read it.
    pub fn note_waits(&mut self, action: &Action) {
        if let Action::Wait(waits) = action {
            for (noted, wait) in self.waits.iter_mut().zip(waits) {
                if wait.is_some() {
                    *noted = *wait;
                }
            }
        }
    }

    /// Every transition after the start.
    pub fn handle(&mut self, event: Event, io: &mut Context<'_>) -> Action {
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
                match self.upstream.as_ref().and_then(|u| socket::finish_connect(u, self.connect_needs_peer))
                {
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

    fn run_one(
        &mut self,
        direction: Direction,
        completed: Option<Completed>,
        io: &mut Context<'_>,
    ) -> Action {
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
    fn read_head(&mut self, io: &mut Context<'_>) -> Action {
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
    fn refuse(
        &mut self,
        decision: Decision,
        outcome: Outcome,
        reason: String,
        io: &mut Context<'_>,
    ) -> Action {
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
    fn connected(&mut self, io: &mut Context<'_>) -> Action {
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
            // An upstream just connected has rarely sent anything yet: with
            // readiness reported while it lasts (io_uring polls), waiting
            // finds out without a read that would say EAGAIN (one system
            // call less per connection). Edge-triggered epoll reads first:
            // an edge before this wait would not come again.
            if direction == Direction::ToClient && self.reads_upstream_when_readable() {
                waits[direction as usize] = Some(Wait::Readable);
                continue;
            }
            match self.run(direction, None, io) {
                Ok(wait) => waits[direction as usize] = Some(wait),
                Err(e) => return self.fail(e, io),
            }
        }
        self.after_runs(waits, io)
    }

    /// Whether the direction from upstream copies or splices on level-triggered
    /// readiness (not the ring path, whose receive is its wait).
    fn reads_upstream_when_readable(&self) -> bool {
        !self.edge_triggered && matches!(&self.movers[Direction::ToClient as usize], Mover::Pump(_))
    }

    fn timed_out(&mut self, deadline: Instant, io: &mut Context<'_>) -> Action {
        let after = deadline.saturating_duration_since(self.opened);
        let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"));
        self.fail(ConnError::new(Side::Upstream, Op::Connect, e), io)
    }

    fn after_runs(&mut self, waits: [Option<Wait>; 2], io: &mut Context<'_>) -> Action {
        if self.movers.iter().all(Mover::is_finished) {
            self.close(Ending::Finished, io)
        } else {
            Action::Wait(waits)
        }
    }

    fn fail(&mut self, error: ConnError, io: &mut Context<'_>) -> Action {
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
    fn close(&mut self, ending: Ending, io: &mut Context<'_>) -> Action {
        self.state = ConnState::Closed;
        for mover in &mut self.movers {
            match mover {
                Mover::Pump(pump) => pump.release(io.pools),
                Mover::Completion(ring) => ring.release(),
            }
        }
        if let Ending::Failed(_) | Ending::Idle(_) = ending {
            self.reset();
        }
        Action::Close(ending)
    }
}

#[cfg(test)]
mod tests;
