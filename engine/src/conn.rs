//! The state of one relayed connection and every transition it makes.
//!
//! Primer:
//! - A connection is a client socket (accepted) and an upstream socket (ours,
//!   connected on the client's behalf), with two pumps: client -> upstream
//!   and upstream -> client.
//! - EOF read on one side becomes `shutdown(SHUT_WR)` on the other; the
//!   connection ends cleanly once both directions passed their EOF on.
//! - Any error ends the whole connection with a reset on both sides
//!   (`SO_LINGER {1, 0}` then close), so that a peer never mistakes a failure
//!   for a clean end of stream.
//! - The connection owns its sockets; the pumps own their pipes or buffers
//!   only while bytes are in flight. The backend decides when the sockets
//!   may close (after the kernel let go of every operation on them).

use std::io;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::error::{ConnError, Op, Side};
use crate::pool::Pools;
use crate::pump::{DataPath, Pump, Wait};

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
#[derive(Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted; the upstream connect is in flight.
    Connecting,
    /// Both sockets connected; the pumps run until each passed on its EOF.
    Relaying,
    /// Ended; the backend closes the sockets once nothing refers to them.
    Closed,
}

/// What happened to a connection, as the backend saw it.
#[derive(Debug)]
pub enum Event {
    /// The upstream connect finished (successfully or not).
    Connected(io::Result<()>),
    /// The upstream connect did not finish within the timeout.
    ConnectTimedOut(Duration),
    /// A direction's awaited readiness arrived (or it yielded and may go on).
    Ready(Direction),
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both directions passed their EOF on.
    Finished,
    /// One side failed; both sides are reset.
    Failed(ConnError),
}

/// What the backend must do next for a connection.
#[derive(Debug)]
pub enum Action {
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
    pub upstream: Socket,
    pub state: ConnState,
    pub opened: Instant,
    /// The client's address as text, for the log line (empty unless debug
    /// logging is on: it costs a system call per connection).
    pub client_name: String,
    to_upstream: Pump,
    to_client: Pump,
}

impl Connection {
    /// A connection whose upstream connect was started.
    pub fn new(id: u64, client: Socket, upstream: Socket, path: DataPath) -> Self {
        let client_name = match tracing::enabled!(tracing::Level::DEBUG) {
            true => client.peer_addr().map(|a| crate::socket::describe(&a)).unwrap_or_default(),
            false => String::new(),
        };
        Connection {
            client_name,
            id,
            client,
            upstream,
            state: ConnState::Connecting,
            opened: Instant::now(),
            to_upstream: Pump::new(Side::Client, Side::Upstream, path),
            to_client: Pump::new(Side::Upstream, Side::Client, path),
        }
    }

    pub fn pump(&self, direction: Direction) -> &Pump {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }

    /// Bytes delivered (to upstream, to the client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.to_upstream.bytes, self.to_client.bytes)
    }

    /// The socket a direction waits on for `wait`.
    pub fn socket_for(&self, direction: Direction, wait: Wait) -> &Socket {
        let side = match wait {
            Wait::Writable => direction.destination(),
            _ => direction.source(),
        };
        match side {
            Side::Client => &self.client,
            Side::Upstream => &self.upstream,
        }
    }

    fn run(&mut self, direction: Direction, pools: &mut Pools) -> Result<(Wait, u64), ConnError> {
        match direction {
            Direction::ToUpstream => self.to_upstream.run(&self.client, &self.upstream, pools),
            Direction::ToClient => self.to_client.run(&self.upstream, &self.client, pools),
        }
    }

    /// Every transition of a connection. `moved` receives the bytes each
    /// direction delivered, for the counters.
    pub fn handle(&mut self, event: Event, pools: &mut Pools, moved: &mut [u64; 2]) -> Action {
        let action = match (&self.state, event) {
            // The upstream accepted: start both pumps (either side may already
            // have sent bytes or even EOF).
            (ConnState::Connecting, Event::Connected(Ok(()))) => {
                self.state = ConnState::Relaying;
                let mut waits = [None, None];
                for (i, direction) in Direction::BOTH.into_iter().enumerate() {
                    match self.run(direction, pools) {
                        Ok((wait, n)) => {
                            moved[i] += n;
                            waits[i] = Some(wait);
                        }
                        Err(e) => return self.close(Ending::Failed(e), pools),
                    }
                }
                self.after_runs(waits)
            }
            // Refused, unreachable, or timed out: this connection only ends.
            (ConnState::Connecting, Event::Connected(Err(e))) => {
                Action::Close(Ending::Failed(ConnError::new(Side::Upstream, Op::Connect, e)))
            }
            (ConnState::Connecting, Event::ConnectTimedOut(after)) => {
                let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"));
                Action::Close(Ending::Failed(ConnError::new(Side::Upstream, Op::Connect, e)))
            }
            // A direction may move again.
            (ConnState::Relaying, Event::Ready(direction)) if !self.pump(direction).is_finished() => {
                match self.run(direction, pools) {
                    Ok((wait, n)) => {
                        moved[direction as usize] += n;
                        let mut waits = [None, None];
                        waits[direction as usize] = Some(wait);
                        self.after_runs(waits)
                    }
                    Err(e) => Action::Close(Ending::Failed(e)),
                }
            }
            // Late or duplicate readiness (a finished direction, a closed
            // connection, a connect result after the timeout): nothing to do.
            (state, event) => {
                tracing::trace!(id = self.id, ?state, ?event, "event ignored");
                Action::Wait([None, None])
            }
        };
        match action {
            Action::Close(ending) => self.close(ending, pools),
            wait => wait,
        }
    }

    fn after_runs(&self, waits: [Option<Wait>; 2]) -> Action {
        if self.to_upstream.is_finished() && self.to_client.is_finished() {
            Action::Close(Ending::Finished)
        } else {
            Action::Wait(waits)
        }
    }

    /// Marks the connection closed, gives back pooled resources, and arms a
    /// reset on both sockets when it failed. The sockets close when dropped.
    fn close(&mut self, ending: Ending, pools: &mut Pools) -> Action {
        self.state = ConnState::Closed;
        self.to_upstream.release(pools);
        self.to_client.release(pools);
        if let Ending::Failed(_) = ending {
            // Errors here only mean the socket is already gone.
            let _ = self.client.set_linger(Some(Duration::ZERO));
            let _ = self.upstream.set_linger(Some(Duration::ZERO));
        }
        Action::Close(ending)
    }
}
