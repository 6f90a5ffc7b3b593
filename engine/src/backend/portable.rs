//! The portable worker: epoll (through mio) for kernels without io_uring.
//!
//! Each socket is registered once, edge-triggered, for reading and writing;
//! an event runs every direction that waits on that socket. Edge triggering
//! loses nothing because a pump only waits after a call would block; a pump
//! that yields with work left is queued and run after the current events.
//! The only timers (connect timeouts, all of one length; accept retry; drain)
//! become the `epoll_wait` timeout.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::Socket;

use super::{out_of_resources, WorkerCore, ACCEPT_RETRY};
use crate::conn::{Action, ConnState, Connection, Direction, Ending, Event};
use crate::error::Side;
use crate::pump::Wait;
use crate::relay::WorkerSetup;
use crate::socket;

const LISTENER: Token = Token(usize::MAX);
const WAKE: Token = Token(usize::MAX - 1);
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// A socket's token: the connection's slab index, which side, and the low
/// bits of its id, so that an event for a closed connection whose slot was
/// reused in the same batch is recognised and dropped.
fn token(index: usize, id: u64, side: Side) -> Token {
    let side = match side {
        Side::Client => 0,
        Side::Upstream => 1,
    };
    Token(((id as usize & 0xff_ffff) << 40) | (index << 1) | side)
}

fn decode(token: Token) -> (usize, u64, Side) {
    let side = if token.0 & 1 == 0 { Side::Client } else { Side::Upstream };
    ((token.0 & ((1 << 40) - 1)) >> 1, (token.0 >> 40) as u64, side)
}

struct Slot {
    conn: Connection,
    /// What each direction waits for (`None`: finished, or not started).
    waits: [Option<Wait>; 2],
}

struct Worker {
    core: WorkerCore,
    poll: Poll,
    listener: Option<Socket>,
    wake: File,
    conns: Slab<Slot>,
    /// Directions that yielded with work left.
    ready: Vec<(usize, u64, Direction)>,
    /// Pending connects in deadline order (one timeout length for all).
    connect_deadlines: VecDeque<(Instant, usize, u64)>,
    accept_retry_at: Option<Instant>,
    stopping: bool,
    drain_deadline: Option<Instant>,
}

pub(crate) fn run(setup: WorkerSetup) -> io::Result<()> {
    let mut worker = Worker {
        core: WorkerCore::new(&setup),
        poll: Poll::new()?,
        listener: Some(setup.listener),
        wake: setup.wake,
        conns: Slab::new(),
        ready: Vec::new(),
        connect_deadlines: VecDeque::new(),
        accept_retry_at: None,
        stopping: false,
        drain_deadline: None,
    };
    worker.run()
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        if let Some(listener) = &self.listener {
            self.poll.registry().register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )?;
        }
        self.poll.registry().register(&mut SourceFd(&self.wake.as_raw_fd()), WAKE, Interest::READABLE)?;
        if self.core.stop_requested() {
            self.begin_stop()?;
        }
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        let mut ready = Vec::new();
        loop {
            let now = Instant::now();
            if self.stopping && (self.conns.is_empty() || self.drain_deadline.is_some_and(|d| d <= now)) {
                let open = self.conns.iter().map(|(_, slot)| &slot.conn);
                self.core.abandon(open.filter(|conn| conn.state != ConnState::Closed));
                return Ok(());
            }
            match self.wait(&mut events, now) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all()?,
                    WAKE => {
                        let mut count = [0u8; 8];
                        let _ = self.wake.read(&mut count);
                        if self.core.stop_requested() {
                            self.begin_stop()?;
                        }
                    }
                    token => self.on_socket(token)?,
                }
            }
            self.expire(Instant::now())?;
            std::mem::swap(&mut ready, &mut self.ready);
            for (index, id, direction) in ready.drain(..) {
                let yielded = self.conns.get(index).is_some_and(|slot| {
                    slot.conn.id == id && slot.waits[direction as usize] == Some(Wait::Yield)
                });
                if yielded {
                    self.dispatch(index, Event::Ready(direction))?;
                }
            }
        }
    }

    /// Waits for events until the next timer; first polls for them during
    /// the configured spin time.
    fn wait(&mut self, events: &mut Events, now: Instant) -> io::Result<()> {
        let timeout = self.next_timeout(now);
        let spin = self.core.config.spin;
        if !spin.is_zero() && timeout != Some(Duration::ZERO) {
            let until = now + spin;
            while Instant::now() < until {
                self.poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        self.poll.poll(events, timeout)
    }

    /// How long epoll may sleep: until the nearest timer, or not at all
    /// when directions are queued.
    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadlines =
            [self.connect_deadlines.front().map(|d| d.0), self.accept_retry_at, self.drain_deadline];
        deadlines.into_iter().flatten().min().map(|d| d.saturating_duration_since(now))
    }

    /// Fires the timers that are due.
    fn expire(&mut self, now: Instant) -> io::Result<()> {
        while let Some(&(deadline, index, id)) = self.connect_deadlines.front() {
            if deadline > now {
                break;
            }
            self.connect_deadlines.pop_front();
            let still_connecting = self
                .conns
                .get(index)
                .is_some_and(|s| s.conn.id == id && s.conn.state == ConnState::Connecting);
            if still_connecting {
                self.dispatch(index, Event::ConnectTimedOut(self.core.config.connect_timeout))?;
            }
        }
        if self.accept_retry_at.is_some_and(|at| at <= now) {
            self.accept_retry_at = None;
            self.accept_all()?;
        }
        Ok(())
    }

    /// Accepts until the queue is empty (edge-triggered: no second chance).
    fn accept_all(&mut self) -> io::Result<()> {
        while !self.stopping && self.accept_retry_at.is_none() {
            let Some(listener) = &self.listener else { return Ok(()) };
            match listener.accept() {
                Ok((client, _)) => {
                    client.set_nonblocking(true)?;
                    self.open(client)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if out_of_resources(&e) => {
                    tracing::warn!(worker = self.core.index, error = %e, "cannot accept: out of resources; retrying shortly");
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                }
                // The client gave up before we accepted it, or similar.
                Err(e) => tracing::debug!(worker = self.core.index, error = %e, "accept failed"),
            }
        }
        Ok(())
    }

    /// A new client: register both sockets and start the upstream connect.
    fn open(&mut self, client: Socket) -> io::Result<()> {
        let Some((conn, started)) = self.core.open(client) else { return Ok(()) };
        let (id, client_fd, upstream_fd) = (conn.id, conn.client.as_raw_fd(), conn.upstream.as_raw_fd());
        let index = self.conns.insert(Slot { conn, waits: [None, None] });
        let both = Interest::READABLE | Interest::WRITABLE;
        let registry = self.poll.registry();
        let registered =
            registry.register(&mut SourceFd(&client_fd), token(index, id, Side::Client), both).and_then(
                |()| registry.register(&mut SourceFd(&upstream_fd), token(index, id, Side::Upstream), both),
            );
        let event = match (registered, started) {
            (Err(e), _) | (Ok(()), Err(e)) => Event::Connected(Err(e)),
            (Ok(()), Ok(true)) => Event::Connected(Ok(())),
            (Ok(()), Ok(false)) => {
                let deadline = Instant::now() + self.core.config.connect_timeout;
                self.connect_deadlines.push_back((deadline, index, id));
                return Ok(());
            }
        };
        self.dispatch(index, event)
    }

    /// A socket became readable, writable, or failed.
    fn on_socket(&mut self, token: Token) -> io::Result<()> {
        let (index, id_bits, side) = decode(token);
        let Some(slot) = self.conns.get(index) else { return Ok(()) };
        if slot.conn.id & 0xff_ffff != id_bits {
            return Ok(()); // a connection closed earlier in this batch
        }
        match slot.conn.state {
            ConnState::Connecting if side == Side::Upstream => {
                match socket::finish_connect(&slot.conn.upstream) {
                    // Not connected yet: the next edge will say when.
                    None => Ok(()),
                    Some(result) => self.dispatch(index, Event::Connected(result)),
                }
            }
            // Early client bytes wait: the pumps start after the connect.
            ConnState::Connecting => Ok(()),
            ConnState::Relaying => {
                for direction in Direction::BOTH {
                    let waits_here = match slot_wait(&self.conns, index, direction) {
                        Some(Wait::Readable) => direction.source() == side,
                        Some(Wait::Writable) => direction.destination() == side,
                        _ => false,
                    };
                    if waits_here {
                        self.dispatch(index, Event::Ready(direction))?;
                    }
                }
                Ok(())
            }
            ConnState::Closed => Ok(()),
        }
    }

    /// Runs a connection's state machine on `event` and records what it waits for.
    fn dispatch(&mut self, index: usize, event: Event) -> io::Result<()> {
        let Some(slot) = self.conns.get_mut(index) else { return Ok(()) };
        match self.core.handle(&mut slot.conn, event) {
            Action::Wait(waits) => {
                for (direction, wait) in Direction::BOTH.into_iter().zip(waits) {
                    let Some(wait) = wait else { continue };
                    slot.waits[direction as usize] = Some(wait);
                    if wait == Wait::Yield {
                        self.ready.push((index, slot.conn.id, direction));
                    }
                }
                Ok(())
            }
            Action::Close(ending) => {
                self.close(index, ending);
                Ok(())
            }
        }
    }

    /// Logs and counts a closed connection and closes its sockets (closing
    /// a descriptor removes it from epoll).
    fn close(&mut self, index: usize, ending: Ending) {
        let slot = self.conns.remove(index);
        self.core.closed(&slot.conn, &ending);
    }

    fn begin_stop(&mut self) -> io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        self.stopping = true;
        tracing::debug!(worker = self.core.index, open = self.conns.len(), "stopping: no new connections");
        if let Some(listener) = self.listener.take() {
            self.poll.registry().deregister(&mut SourceFd(&listener.as_raw_fd()))?;
        }
        self.drain_deadline = Some(Instant::now() + self.core.config.drain_timeout);
        Ok(())
    }
}

fn slot_wait(conns: &Slab<Slot>, index: usize, direction: Direction) -> Option<Wait> {
    conns.get(index).and_then(|slot| slot.waits[direction as usize])
}
