//! The io_uring worker: one ring, one thread, many connections.
//!
//! Every operation in flight is named by its `user_data`: a [`Tag`] in the
//! low byte and a connection's slab index above it. A connection stays in the
//! slab until the kernel has completed every operation that names it, so a
//! late completion always finds its connection (perhaps closed) and is
//! harmless; only then are the sockets closed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::time::Instant;

use slab::Slab;
use socket2::Socket;

use super::{out_of_resources, WorkerCore, ACCEPT_RETRY};
use crate::conn::{Action, ConnState, Connection, Direction, Ending, Event};
use crate::pump::Wait;
use crate::relay::WorkerSetup;
use crate::ring::{self, Completion, Ring, Timer};
use crate::socket;

/// Submission queue size; completions get eight times as many slots.
const RING_ENTRIES: u32 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Accept = 1,
    AcceptRetry,
    Wake,
    Drain,
    PollToUpstream,
    PollToClient,
    Connect,
    ConnectTimeout,
    Cancel,
}

impl Tag {
    const ALL: [Tag; 9] = [
        Tag::Accept,
        Tag::AcceptRetry,
        Tag::Wake,
        Tag::Drain,
        Tag::PollToUpstream,
        Tag::PollToClient,
        Tag::Connect,
        Tag::ConnectTimeout,
        Tag::Cancel,
    ];

    fn user_data(self, index: usize) -> u64 {
        ((index as u64) << 8) | self as u64
    }

    fn decode(user_data: u64) -> Option<(Tag, usize)> {
        let tag = Tag::ALL.into_iter().find(|t| *t as u64 == user_data & 0xff)?;
        Some((tag, (user_data >> 8) as usize))
    }

    fn poll(direction: Direction) -> Tag {
        match direction {
            Direction::ToUpstream => Tag::PollToUpstream,
            Direction::ToClient => Tag::PollToClient,
        }
    }

    /// The bit of `Slot::in_flight` for a connection's own operations.
    fn bit(self) -> u8 {
        match self {
            Tag::PollToUpstream => 1,
            Tag::PollToClient => 2,
            Tag::Connect => 4,
            _ => 0,
        }
    }
}

struct Slot {
    conn: Connection,
    /// Bits of the operations in flight that name this connection.
    in_flight: u8,
}

struct Worker {
    core: WorkerCore,
    ring: Ring,
    listener: Option<Socket>,
    wake: File,
    conns: Slab<Slot>,
    /// Directions that yielded with work left, run after the completions.
    ready: Vec<(usize, u64, Direction)>,
    stopping: bool,
    drain_expired: bool,
}

pub(crate) fn run(setup: WorkerSetup) -> io::Result<()> {
    let mut ring = Ring::new(RING_ENTRIES)?;
    ring.set_timer(Timer::Connect, setup.config.connect_timeout);
    ring.set_timer(Timer::AcceptRetry, ACCEPT_RETRY);
    ring.set_timer(Timer::Drain, setup.config.drain_timeout);
    let mut worker = Worker {
        core: WorkerCore::new(&setup),
        ring,
        listener: Some(setup.listener),
        wake: setup.wake,
        conns: Slab::new(),
        ready: Vec::new(),
        stopping: false,
        drain_expired: false,
    };
    worker.run()
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        self.arm_accept()?;
        self.ring.poll(self.wake.as_fd(), libc::POLLIN as u32, Tag::Wake.user_data(0))?;
        if self.core.stop_requested() {
            self.begin_stop()?;
        }
        let mut completions = Vec::with_capacity(RING_ENTRIES as usize);
        let mut ready = Vec::new();
        loop {
            if self.stopping && (self.conns.is_empty() || self.drain_expired) {
                let open = self.conns.iter().map(|(_, slot)| &slot.conn);
                self.core.abandon(open.filter(|conn| conn.state != ConnState::Closed));
                return Ok(());
            }
            self.wait()?;
            self.ring.reap(&mut completions);
            for completion in completions.drain(..) {
                self.complete(completion)?;
            }
            std::mem::swap(&mut ready, &mut self.ready);
            for (index, id, direction) in ready.drain(..) {
                let still_waiting = self.conns.get(index).is_some_and(|slot| {
                    slot.conn.id == id && slot.in_flight & Tag::poll(direction).bit() == 0
                });
                if still_waiting {
                    self.dispatch(index, Event::Ready(direction))?;
                }
            }
        }
    }

    /// Submits, then waits for completions unless work is ready; first
    /// polls for them during the configured spin time.
    fn wait(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() {
            return self.ring.submit_and_wait(0);
        }
        let spin = self.core.config.spin;
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            while Instant::now() < until {
                if self.ring.poll_completions()? {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        self.ring.submit_and_wait(1)
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        match &self.listener {
            Some(listener) => self.ring.accept_multishot(listener.as_fd(), Tag::Accept.user_data(0)),
            None => Ok(()),
        }
    }

    fn complete(&mut self, completion: Completion) -> io::Result<()> {
        let Some((tag, index)) = Tag::decode(completion.user_data) else {
            tracing::warn!(user_data = completion.user_data, "completion with an unknown tag ignored");
            return Ok(());
        };
        match tag {
            Tag::Accept => self.on_accept(completion),
            Tag::AcceptRetry => self.arm_accept(),
            Tag::Wake => {
                let mut count = [0u8; 8];
                let _ = self.wake.read(&mut count);
                if self.core.stop_requested() {
                    self.begin_stop()
                } else {
                    self.ring.poll(self.wake.as_fd(), libc::POLLIN as u32, Tag::Wake.user_data(0))
                }
            }
            Tag::Drain => {
                self.drain_expired = true;
                Ok(())
            }
            // Their outcome shows on the operation they target.
            Tag::Cancel | Tag::ConnectTimeout => Ok(()),
            Tag::PollToUpstream | Tag::PollToClient | Tag::Connect => {
                let Some(slot) = self.conns.get_mut(index) else {
                    tracing::warn!(?tag, index, "completion for an unknown connection ignored");
                    return Ok(());
                };
                slot.in_flight &= !tag.bit();
                if slot.conn.state == ConnState::Closed {
                    if slot.in_flight == 0 {
                        self.conns.remove(index);
                    }
                    return Ok(());
                }
                let event = match tag {
                    Tag::Connect if completion.result == -libc::ECANCELED => {
                        Event::ConnectTimedOut(self.core.config.connect_timeout)
                    }
                    Tag::Connect => match socket::finish_connect(&slot.conn.upstream) {
                        Some(result) => Event::Connected(result),
                        // Not connected yet: wait again, within the timeout.
                        None if slot.conn.opened.elapsed() < self.core.config.connect_timeout => {
                            return self.arm_connect(index);
                        }
                        None => Event::ConnectTimedOut(self.core.config.connect_timeout),
                    },
                    Tag::PollToUpstream => Event::Ready(Direction::ToUpstream),
                    _ => Event::Ready(Direction::ToClient),
                };
                self.dispatch(index, event)
            }
        }
    }

    fn on_accept(&mut self, completion: Completion) -> io::Result<()> {
        if completion.result >= 0 {
            let client = ring::accepted_socket(&completion);
            if !self.stopping {
                self.open(client)?;
            }
        } else if completion.result != -libc::ECANCELED {
            let error = io::Error::from_raw_os_error(-completion.result);
            if out_of_resources(&error) {
                tracing::warn!(worker = self.core.index, %error, "cannot accept: out of resources; retrying shortly");
                if !completion.more && !self.stopping {
                    return self.ring.timeout(Timer::AcceptRetry, Tag::AcceptRetry.user_data(0));
                }
            } else {
                tracing::debug!(worker = self.core.index, %error, "accept failed");
            }
        }
        if !completion.more && !self.stopping {
            self.arm_accept()?;
        }
        Ok(())
    }

    /// A new client: start the upstream connect.
    fn open(&mut self, client: Socket) -> io::Result<()> {
        let Some((conn, started)) = self.core.open(client) else { return Ok(()) };
        let index = self.conns.insert(Slot { conn, in_flight: 0 });
        match started {
            Ok(false) => self.arm_connect(index),
            Ok(true) => self.dispatch(index, Event::Connected(Ok(()))),
            Err(e) => self.dispatch(index, Event::Connected(Err(e))),
        }
    }

    /// Waits for the upstream connect to finish, bounded by the connect timeout.
    fn arm_connect(&mut self, index: usize) -> io::Result<()> {
        let slot = &mut self.conns[index];
        slot.in_flight |= Tag::Connect.bit();
        self.ring.poll_with_timeout(
            slot.conn.upstream.as_fd(),
            libc::POLLOUT as u32,
            Tag::Connect.user_data(index),
            Timer::Connect,
            Tag::ConnectTimeout.user_data(index),
        )
    }

    /// Runs a connection's state machine on `event` and carries out its answer.
    fn dispatch(&mut self, index: usize, event: Event) -> io::Result<()> {
        let slot = &mut self.conns[index];
        match self.core.handle(&mut slot.conn, event) {
            Action::Wait(waits) => {
                for (direction, wait) in Direction::BOTH.into_iter().zip(waits) {
                    let (events, wait) = match wait {
                        Some(wait @ Wait::Readable) => (libc::POLLIN, wait),
                        Some(wait @ Wait::Writable) => (libc::POLLOUT, wait),
                        Some(Wait::Yield) => {
                            self.ready.push((index, slot.conn.id, direction));
                            continue;
                        }
                        Some(Wait::Finished) | None => continue,
                    };
                    let tag = Tag::poll(direction);
                    let fd = slot.conn.socket_for(direction, wait).as_fd();
                    self.ring.poll(fd, events as u32, tag.user_data(index))?;
                    slot.in_flight |= tag.bit();
                }
                Ok(())
            }
            Action::Close(ending) => self.close(index, ending),
        }
    }

    /// Logs and counts a closed connection, cancels what is in flight on it,
    /// and drops it (closing its sockets) once nothing is.
    fn close(&mut self, index: usize, ending: Ending) -> io::Result<()> {
        let slot = &self.conns[index];
        self.core.closed(&slot.conn, &ending);
        let in_flight = slot.in_flight;
        for tag in [Tag::PollToUpstream, Tag::PollToClient, Tag::Connect] {
            if in_flight & tag.bit() != 0 {
                self.ring.cancel(tag.user_data(index), Tag::Cancel.user_data(index))?;
            }
        }
        if in_flight == 0 {
            self.conns.remove(index);
        }
        Ok(())
    }

    /// Stop accepting; open connections get the drain timeout to finish.
    fn begin_stop(&mut self) -> io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        self.stopping = true;
        tracing::debug!(worker = self.core.index, open = self.conns.len(), "stopping: no new connections");
        if self.listener.take().is_some() {
            self.ring.cancel(Tag::Accept.user_data(0), Tag::Cancel.user_data(0))?;
        }
        self.ring.timeout(Timer::Drain, Tag::Drain.user_data(0))
    }
}
