//! The state of one relayed connection and every transition it makes.
//!
//! Primer:
//! - A connection is a client socket (accepted) and an upstream socket (ours,
//!   connected on the client's behalf), with two movers: client -> upstream
//!   and upstream -> client (`pump.rs`, readiness-driven splice or copy;
//!   `completion_pump.rs`, io_uring's buffer ring).
//! - It is made whole in one step, [`Connection::new`], from its [`Plan`]: a
//!   fixed target's upstream socket is open from the start, a route's comes
//!   once the router allowed the destination ([`Connection::dialed`]). How
//!   the driver reports readiness ([`Trigger`]) is given once, there.
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
//!   SOCKS reply code) and closed, never reset, so the client reads why. The
//!   head's protocol (reading, answering, counting the route's decisions)
//!   is `routed.rs`; the transitions stay here. Head bytes past the head
//!   (pipelined TLS, a peeked ClientHello) and a PROXY protocol header are
//!   the prelude: sent upstream before any relayed byte.
//! - A state with a deadline ([`ConnState::deadline`]) hands it to the
//!   worker once ([`Connection::take_new_deadline`]); the worker only
//!   schedules it.

use std::io;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket};

use crate::error::{ConnError, Op, Side};
use crate::pool::Pools;
use crate::route::router::Verdict;
use crate::route::{Decision, Destination, Route};
use crate::socket;
use crate::vocab::{BufferIo, BufferRingOps, Completed, DataPath, Direction, Key, Readiness, Trigger, Wait};
use completion_pump::CompletionPump;
use pump::Pump;
use routed::{HeadStep, Routed};

mod completion_pump;
mod half_close;
mod pump;
mod routed;

/// Longest a routed connection waits for the router's verdict: its lookup
/// timeout and time for the policy check.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(8);

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

impl ConnState {
    /// When this state gives up waiting (`None`: it waits on no deadline).
    pub fn deadline(self) -> Option<Instant> {
        match self {
            ConnState::ReadingHead { deadline }
            | ConnState::Deciding { deadline }
            | ConnState::Connecting { deadline } => Some(deadline),
            ConnState::Relaying | ConnState::Closed => None,
        }
    }
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
    /// The driver would not watch one of its sockets.
    DriverFailed(ConnError),
}

/// What a transition may use besides the connection: the worker's pools,
/// its driver's buffer ring (if any), and where to count bytes moved.
pub struct Context<'a> {
    pub pools: &'a mut Pools,
    pub buffer_ring: Option<&'a mut dyn BufferRingOps>,
    /// This connection's key in the driver (names its ring operations).
    pub key: Key,
    /// Bytes delivered by each direction (to upstream, to the client).
    pub moved: [u64; 2],
}

impl<'a> Context<'a> {
    pub fn new(pools: &'a mut Pools, buffer_ring: Option<&'a mut dyn BufferRingOps>, key: Key) -> Self {
        Context { pools, buffer_ring, key, moved: [0; 2] }
    }
}

/// An upstream socket opened for a connection, and the connect to make on
/// it: where, each direction's data path (to upstream, to the client), and
/// until when.
#[derive(Debug)]
pub struct Dial {
    pub socket: Socket,
    pub address: SockAddr,
    pub paths: [DataPath; 2],
    pub deadline: Instant,
}

/// How a new connection reaches its upstream.
#[derive(Debug)]
pub enum Plan {
    /// A fixed target: its upstream socket is open, [`Connection::start`]
    /// connects it.
    Fixed(Dial),
    /// A route: the client's head names the destination, read until
    /// `head_deadline` ([`Action::AwaitHead`] first); the router decides,
    /// and [`Connection::dialed`] gives it the upstream socket.
    Routed { routed: Routed, head_deadline: Instant },
}

impl Plan {
    /// The plan of a new client of `route`: its head first, within the
    /// route's head timeout.
    pub fn route(route: &Route) -> Plan {
        Plan::Routed { routed: Routed::new(route), head_deadline: Instant::now() + route.head_timeout }
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

    /// Both directions, by their data paths (to upstream, to the client).
    fn both(paths: [DataPath; 2]) -> [Mover; 2] {
        [
            Mover::new(Side::Client, Side::Upstream, paths[0]),
            Mover::new(Side::Upstream, Side::Client, paths[1]),
        ]
    }

    fn is_finished(&self) -> bool {
        match self {
            Mover::Pump(pump) => pump.is_finished(),
            Mover::Completion(pump) => pump.is_finished(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Mover::Pump(pump) => pump.bytes,
            Mover::Completion(pump) => pump.bytes,
        }
    }

    /// The other direction finished: this one's EOF ends the connection,
    /// and closing the sockets passes it on (no `shutdown` first).
    fn end_with_close(&mut self) {
        match self {
            Mover::Pump(pump) => pump.half_close.end_with_close(),
            Mover::Completion(pump) => pump.half_close.end_with_close(),
        }
    }

    fn release(&mut self, pools: &mut Pools) {
        match self {
            Mover::Pump(pump) => pump.release(pools),
            Mover::Completion(pump) => pump.release(),
        }
    }
}

/// The upstream side of a connection, from its dial on: the socket, where
/// it connects, and both directions' movers (they need both sockets).
#[derive(Debug)]
struct Upstream {
    socket: Socket,
    /// Where to connect, until [`Connection::start`] does (boxed and then
    /// dropped: an address is 136 bytes, an idle connection should not
    /// carry it).
    address: Option<Box<SockAddr>>,
    /// When the connect began, and how long it took once it is established
    /// (taken once, for the connect-time histogram).
    connect_started: Instant,
    connect_took: Option<Duration>,
    /// Writable is no proof of a connect here (vsock): ask for the peer too.
    connect_needs_peer: bool,
    /// Each direction's mover (to upstream, to the client).
    movers: [Mover; 2],
}

impl Upstream {
    fn of(dial: Dial) -> (Upstream, Instant) {
        let Dial { socket, address, paths, deadline } = dial;
        let upstream = Upstream {
            socket,
            connect_needs_peer: address.domain() == Domain::VSOCK,
            address: Some(Box::new(address)),
            connect_started: Instant::now(),
            connect_took: None,
            movers: Mover::both(paths),
        };
        (upstream, deadline)
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
    Decide(Destination),
    /// The upstream socket is open: give it to the driver, then
    /// [`Connection::start`] it.
    StartConnect,
    /// Open an upstream socket for `address` (the router allowed it), give
    /// it to [`Connection::dialed`] and [`Connection::start`] it.
    Dial(SockAddr),
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
    /// The client's address as text, for the log line (empty unless debug
    /// logging is on: it costs a system call per connection).
    pub client_name: String,
    pub opened: Instant,
    pub state: ConnState,
    /// How the driver reports readiness; one value for the connection's life.
    trigger: Trigger,
    /// For a fixed target from the start; for a routed connection once the
    /// router allowed its destination.
    upstream: Option<Upstream>,
    /// Routed connections only: the head, its answers, the route's counters.
    routed: Option<Box<Routed>>,
    /// Bytes sent upstream before the client's (a PROXY protocol header,
    /// bytes the client sent after its head).
    prelude: Vec<u8>,
    /// How many of the prelude's first bytes are not the client's (the
    /// PROXY protocol header): the rest counts as bytes delivered upstream.
    prelude_ours: usize,
    /// What each direction waits for (`None`: not started).
    waits: [Option<Wait>; 2],
    /// The deadline of a state just entered, for the worker to schedule
    /// (taken once).
    new_deadline: Option<Instant>,
}

impl Connection {
    /// A connection of an accepted `client`, reaching its upstream as
    /// `plan` says, with readiness reported as `trigger` says. `proxy_header`
    /// (empty for none) goes upstream before any byte of the client's.
    pub fn new(id: u64, client: Socket, plan: Plan, trigger: Trigger, proxy_header: Vec<u8>) -> Self {
        let client_name = match tracing::enabled!(tracing::Level::DEBUG) {
            true => socket::peer_name(&client).unwrap_or_default(),
            false => String::new(),
        };
        let (state, upstream, routed) = match plan {
            Plan::Fixed(dial) => {
                let (upstream, deadline) = Upstream::of(dial);
                (ConnState::Connecting { deadline }, Some(upstream), None)
            }
            Plan::Routed { routed, head_deadline } => {
                (ConnState::ReadingHead { deadline: head_deadline }, None, Some(Box::new(routed)))
            }
        };
        Connection {
            id,
            client,
            client_name,
            opened: Instant::now(),
            state,
            trigger,
            upstream,
            routed,
            prelude_ours: proxy_header.len(),
            prelude: proxy_header,
            waits: [None, None],
            new_deadline: state.deadline(),
        }
    }

    /// Gives a routed connection the upstream socket opened for the address
    /// the router allowed: it is connecting from now on;
    /// [`Connection::start`] begins the connect once the driver has the
    /// socket.
    pub fn dialed(&mut self, dial: Dial) {
        let (upstream, deadline) = Upstream::of(dial);
        self.upstream = Some(upstream);
        self.enter(ConnState::Connecting { deadline });
    }

    /// What the worker does first with a new connection, once the driver
    /// watches its client: read a routed head, or connect a fixed target.
    pub fn first_action(&self) -> Action {
        match self.state {
            ConnState::ReadingHead { .. } => Action::AwaitHead,
            _ => Action::StartConnect,
        }
    }

    fn enter(&mut self, state: ConnState) {
        self.state = state;
        self.new_deadline = state.deadline();
    }

    /// The deadline of the state the last transition entered, once: the
    /// worker schedules a [`Event::DeadlinePassed`] for it.
    pub fn take_new_deadline(&mut self) -> Option<Instant> {
        self.new_deadline.take()
    }

    /// What a routed client asked for, once its head named it.
    pub fn destination(&self) -> Option<&str> {
        self.routed.as_ref().and_then(|routed| routed.destination())
    }

    /// Bytes delivered (to upstream, to the client).
    pub fn bytes(&self) -> (u64, u64) {
        match &self.upstream {
            Some(Upstream { movers: [to_upstream, to_client], .. }) => {
                (to_upstream.bytes(), to_client.bytes())
            }
            None => (0, 0),
        }
    }

    /// The socket of `side` (the upstream's once there is one).
    pub fn socket(&self, side: Side) -> Option<&Socket> {
        match side {
            Side::Client => Some(&self.client),
            Side::Upstream => self.upstream.as_ref().map(|upstream| &upstream.socket),
        }
    }

    /// Arms a reset on both sockets (`SO_LINGER {1, 0}`): closing them then
    /// sends RST, so neither peer takes the end for a clean end of stream.
    /// A client that was answered (a routed refusal) is closed normally, so
    /// that it reads the answer.
    pub fn reset(&self) {
        if !self.routed.as_ref().is_some_and(|routed| routed.answered()) {
            socket::reset(&self.client);
        }
        if let Some(upstream) = &self.upstream {
            socket::reset(&upstream.socket);
        }
    }

    /// Runs a direction: a readiness pump until it would block, a ring pump
    /// on a completion (`completed`) or to submit what it can (`None`).
    fn run(
        &mut self,
        direction: Direction,
        completed: Option<Completed>,
        ctx: &mut Context<'_>,
    ) -> Result<Wait, ConnError> {
        let Some(Upstream { socket: upstream, movers, .. }) = &mut self.upstream else {
            let e = io::Error::other("relaying without an upstream socket");
            return Err(ConnError::new(Side::Upstream, Op::Write, e));
        };
        let upstream = &*upstream;
        if direction == Direction::ToUpstream && !self.prelude.is_empty() {
            match upstream.send(&self.prelude) {
                Ok(sent) => {
                    self.prelude.drain(..sent);
                    // The client's bytes among them were delivered.
                    ctx.moved[0] += (sent.saturating_sub(self.prelude_ours)) as u64;
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
        let (wait, n) = match (&mut movers[direction as usize], ctx.buffer_ring.as_deref_mut()) {
            (Mover::Pump(pump), _) => pump.run(src, dst, ctx.pools, self.trigger)?,
            (Mover::Completion(pump), Some(ops)) => {
                let mut buffers = BufferIo { ops, key: ctx.key, direction };
                match completed {
                    Some(completed) => pump.complete(completed, src, dst, &mut buffers)?,
                    None => (pump.step(src, dst, &mut buffers)?, 0),
                }
            }
            (Mover::Completion(_), None) => {
                let e = io::Error::other("the ring data path without a buffer ring");
                return Err(ConnError::new(direction.source(), Op::Read, e));
            }
        };
        ctx.moved[direction as usize] += n;
        if movers[direction as usize].is_finished() {
            movers[1 - direction as usize].end_with_close();
        }
        Ok(wait)
    }

    /// Starts the upstream connect (after [`Connection::new`] with a fixed
    /// plan, or [`Connection::dialed`]), once the driver has the socket.
    pub fn start(&mut self, ctx: &mut Context<'_>) -> Action {
        let Some((upstream, address)) = self.upstream.as_mut().and_then(|u| u.address.take().map(|a| (u, a)))
        else {
            let e = io::Error::other("no upstream socket to connect");
            return self.fail(ConnError::new(Side::Upstream, Op::Connect, e), ctx);
        };
        upstream.connect_started = Instant::now();
        // With epoll, a connect done already (loopback) goes on now rather
        // than after a wait (measured: churn 1.01-1.30x on 6.18). io_uring's
        // poll of a connected socket completes within the submission that
        // arms it, so there the extra call only costs (0.69-1.27x; measured
        // while io_uring's ACCEPT still stalled the worker on 6.18, not
        // measured again since the listener is polled).
        let started = match socket::start_connect(&upstream.socket, &address) {
            Ok(false) if self.trigger == Trigger::Edge && !upstream.connect_needs_peer => {
                socket::connected_now(&upstream.socket).map(|done| done.map(|()| true))
            }
            started => Some(started),
        };
        match started {
            Some(Ok(true)) => self.connected(ctx),
            None | Some(Ok(false)) => Action::AwaitConnect,
            Some(Err(e)) => self.fail(ConnError::new(Side::Upstream, Op::Connect, e), ctx),
        }
    }

    /// Test seam: treat the upstream as vsock, whose writable report may
    /// come before its connect (no socket on the test host does that).
    #[cfg(test)]
    pub fn confirm_connect_by_peer(&mut self) {
        if let Some(upstream) = &mut self.upstream {
            upstream.connect_needs_peer = true;
        }
    }

    /// How long the upstream connect took, once, after the transition that
    /// established it (whether the connect completed at once in
    /// [`Connection::start`] or later).
    pub fn take_connect_time(&mut self) -> Option<Duration> {
        self.upstream.as_mut().and_then(|upstream| upstream.connect_took.take())
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
    pub fn handle(&mut self, event: Event, ctx: &mut Context<'_>) -> Action {
        match (self.state, event) {
            // More of the head: a whole head goes to the router.
            (ConnState::ReadingHead { .. }, Event::ClientReadable) => {
                self.head_step(ctx, |routed, client| routed.read(client))
            }
            (ConnState::ReadingHead { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                let after = deadline.saturating_duration_since(self.opened);
                self.head_step(ctx, |routed, client| routed.head_timed_out(client, after))
            }
            // The router's verdict: connect to the address it checked, or
            // tell the client why not.
            (ConnState::Deciding { .. }, Event::Decided(Verdict::Allowed { address, rule })) => {
                if let Some(routed) = &self.routed {
                    routed.allowed(&rule);
                }
                Action::Dial(SockAddr::from(address))
            }
            (ConnState::Deciding { .. }, Event::Decided(Verdict::Refused { outcome, reason })) => {
                self.head_step(ctx, |routed, client| routed.refused(client, outcome, reason))
            }
            (ConnState::Deciding { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                self.head_step(ctx, |routed, client| routed.undecided(client))
            }
            // Writable: connected, refused, or (vsock) not yet: then wait
            // again while the deadline allows.
            (ConnState::Connecting { deadline }, Event::UpstreamWritable) => {
                let finished = self
                    .upstream
                    .as_ref()
                    .and_then(|u| socket::finish_connect(&u.socket, u.connect_needs_peer));
                match finished {
                    Some(Ok(())) => self.connected(ctx),
                    Some(Err(e)) => self.fail(ConnError::new(Side::Upstream, Op::Connect, e), ctx),
                    None if Instant::now() < deadline => Action::AwaitConnect,
                    None => self.timed_out(deadline, ctx),
                }
            }
            (ConnState::Connecting { deadline }, Event::DeadlinePassed) if Instant::now() >= deadline => {
                self.timed_out(deadline, ctx)
            }
            // A direction may move again, or one of its operations completed.
            (ConnState::Relaying, Event::Ready(direction))
                if !self.upstream.as_ref().is_some_and(|u| u.movers[direction as usize].is_finished()) =>
            {
                self.run_one(direction, None, ctx)
            }
            (ConnState::Relaying, Event::Completed(direction, completed)) => {
                self.run_one(direction, Some(completed), ctx)
            }
            (ConnState::Relaying, Event::IdleFor(idle)) => self.close(Ending::Idle(idle), ctx),
            // As any failure: closed and reset, a routed client told where
            // its connect failed.
            (state, Event::DriverFailed(error)) if state != ConnState::Closed => self.fail(error, ctx),
            // Late or stray events (readiness while connecting, a deadline
            // after the connect, anything after the end): nothing to do.
            (state, event) => {
                tracing::trace!(id = self.id, ?state, ?event, "event ignored");
                Action::Wait([None, None])
            }
        }
    }

    /// A step of the routed head (`step` on its routed part and the
    /// client's socket), then what follows from where the head stands.
    fn head_step(
        &mut self,
        ctx: &mut Context<'_>,
        step: impl FnOnce(&mut Routed, &Socket) -> HeadStep,
    ) -> Action {
        let head = match self.routed.as_mut() {
            Some(routed) => step(routed, &self.client),
            None => HeadStep::Failed(routed::no_head()),
        };
        self.after_head(head, ctx)
    }

    /// Carries on after the routed head said something: wait for more, ask
    /// the router, or close.
    fn after_head(&mut self, read: HeadStep, ctx: &mut Context<'_>) -> Action {
        match read {
            HeadStep::More => Action::AwaitHead,
            HeadStep::Named { destination, after } => {
                self.prelude.extend_from_slice(&after);
                // The router bounds its lookups; this bounds the whole decision.
                self.enter(ConnState::Deciding { deadline: Instant::now() + DECISION_TIMEOUT });
                Action::Decide(destination)
            }
            HeadStep::Silent => self.close(Ending::Finished, ctx),
            HeadStep::Refused { decision, reason } => self.close(Ending::Refused { decision, reason }, ctx),
            HeadStep::Failed(error) => self.fail(error, ctx),
        }
    }

    fn run_one(
        &mut self,
        direction: Direction,
        completed: Option<Completed>,
        ctx: &mut Context<'_>,
    ) -> Action {
        match self.run(direction, completed, ctx) {
            Ok(wait) => {
                let mut waits = [None, None];
                waits[direction as usize] = Some(wait);
                self.after_runs(waits, ctx)
            }
            Err(e) => self.fail(e, ctx),
        }
    }

    /// No upstream socket could be opened (out of descriptors): a routed
    /// client is told, others are reset. The caller counts it.
    pub fn give_up(&mut self) {
        if let Some(routed) = self.routed.as_mut() {
            routed.out_of_resources(&self.client);
        }
        self.enter(ConnState::Closed);
        self.reset();
    }

    /// The upstream accepted: answer a routed client, then start both pumps
    /// (either side may already have sent bytes or even EOF).
    fn connected(&mut self, ctx: &mut Context<'_>) -> Action {
        self.enter(ConnState::Relaying);
        let Some(upstream) = self.upstream.as_mut() else {
            let e = io::Error::other("connected without an upstream socket");
            return self.fail(ConnError::new(Side::Upstream, Op::Connect, e), ctx);
        };
        upstream.connect_took = Some(upstream.connect_started.elapsed());
        if let Some(routed) = self.routed.as_mut() {
            let bound = upstream.socket.local_addr().ok().and_then(|a| a.as_socket());
            if let Err(e) = routed.connected(&self.client, bound) {
                return self.fail(e, ctx);
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
            match self.run(direction, None, ctx) {
                Ok(wait) => waits[direction as usize] = Some(wait),
                Err(e) => return self.fail(e, ctx),
            }
        }
        self.after_runs(waits, ctx)
    }

    /// Whether the direction from upstream copies or splices on level-triggered
    /// readiness (not the ring path, whose receive is its wait).
    fn reads_upstream_when_readable(&self) -> bool {
        self.trigger == Trigger::Level
            && matches!(&self.upstream, Some(Upstream { movers: [_, Mover::Pump(_)], .. }))
    }

    fn timed_out(&mut self, deadline: Instant, ctx: &mut Context<'_>) -> Action {
        let after = deadline.saturating_duration_since(self.opened);
        let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"));
        self.fail(ConnError::new(Side::Upstream, Op::Connect, e), ctx)
    }

    fn after_runs(&mut self, waits: [Option<Wait>; 2], ctx: &mut Context<'_>) -> Action {
        if self.upstream.as_ref().is_some_and(|u| u.movers.iter().all(Mover::is_finished)) {
            self.close(Ending::Finished, ctx)
        } else {
            Action::Wait(waits)
        }
    }

    fn fail(&mut self, error: ConnError, ctx: &mut Context<'_>) -> Action {
        // A routed client whose upstream could not be reached is told why.
        if let (Some(routed), ConnState::Connecting { .. }, Op::Connect) =
            (self.routed.as_mut(), self.state, error.op)
        {
            routed.connect_failed(&self.client, &error.source);
        }
        self.close(Ending::Failed(error), ctx)
    }

    /// Marks the connection closed, gives back pooled pipes, buffers and
    /// ring buffers, and arms a reset when it failed. The sockets close when
    /// dropped.
    fn close(&mut self, ending: Ending, ctx: &mut Context<'_>) -> Action {
        self.enter(ConnState::Closed);
        for mover in self.upstream.iter_mut().flat_map(|u| &mut u.movers) {
            mover.release(ctx.pools);
        }
        if let Ending::Failed(_) | Ending::Idle(_) = ending {
            self.reset();
        }
        Action::Close(ending)
    }
}

#[cfg(test)]
mod tests;
