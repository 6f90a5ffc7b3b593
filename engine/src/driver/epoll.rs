//! The epoll driver (through mio), for kernels without io_uring.
//!
//! Each socket is registered once, edge-triggered, for reading and writing,
//! so [`Driver::watch`] has nothing to do: an edge reports the socket ready
//! both ways and the worker runs every direction that waits on it. Edge
//! triggering loses nothing because a pump only waits after a call would
//! block. Closing a descriptor removes it from epoll, so a released
//! connection may close at once.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::Socket;

use super::{Driver, DriverEvent, Key, Readiness};
use crate::conn::Connection;
use crate::error::Side;

const LISTENER: Token = Token(usize::MAX);
const WAKE: Token = Token(usize::MAX - 1);
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// A socket's token: the connection's key and which side.
fn token(key: Key, side: Side) -> Token {
    let side = match side {
        Side::Client => 0,
        Side::Upstream => 1,
    };
    Token((key.generation as usize) << 32 | (key.index as usize) << 1 | side)
}

fn decode(token: Token) -> (Key, Side) {
    let side = if token.0 & 1 == 0 { Side::Client } else { Side::Upstream };
    // Truncation intended: the fields were packed from these widths.
    #[allow(clippy::cast_possible_truncation)]
    let key = Key { index: (token.0 >> 1) as u32 & 0x7fff_ffff, generation: (token.0 >> 32) as u32 };
    (key, side)
}

pub(crate) struct EpollDriver {
    poll: Poll,
    ready: Events,
    listener: Option<Socket>,
    /// The listener may have clients waiting (edge-triggered: accept until
    /// it says WouldBlock, or the next edge may never come).
    accept_pending: bool,
    accept_paused: bool,
    wake: File,
}

impl EpollDriver {
    pub fn new(listener: Socket, wake: File) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)?;
        poll.registry().register(&mut SourceFd(&wake.as_raw_fd()), WAKE, Interest::READABLE)?;
        Ok(EpollDriver {
            poll,
            ready: Events::with_capacity(EVENTS_PER_WAIT),
            listener: Some(listener),
            accept_pending: true,
            accept_paused: false,
            wake,
        })
    }

    /// Accepts until the queue is empty or an accept fails (the worker
    /// decides whether to pause; otherwise the next wait tries again).
    fn accept_all(&mut self, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        while self.accept_pending && !self.accept_paused {
            let Some(listener) = &self.listener else { return Ok(()) };
            match listener.accept() {
                Ok((client, _)) => {
                    client.set_nonblocking(true)?;
                    events.push(DriverEvent::Accepted(Ok(client)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.accept_pending = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    events.push(DriverEvent::Accepted(Err(e)));
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

impl Driver for EpollDriver {
    fn edge_triggered(&self) -> bool {
        true
    }

    fn register(&mut self, key: Key, conn: &Connection) -> io::Result<()> {
        let both = Interest::READABLE | Interest::WRITABLE;
        for side in [Side::Client, Side::Upstream] {
            let fd = conn.socket(side).as_raw_fd();
            self.poll.registry().register(&mut SourceFd(&fd), token(key, side), both)?;
        }
        Ok(())
    }

    fn watch(&mut self, _key: Key, _socket: &Socket, _side: Side, _wanted: Readiness) -> io::Result<()> {
        Ok(())
    }

    fn release(&mut self, _key: Key) -> io::Result<bool> {
        Ok(true)
    }

    fn ring_ops(&mut self) -> Option<&mut dyn super::RingOps> {
        None
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        if let Some(listener) = self.listener.take() {
            self.poll.registry().deregister(&mut SourceFd(&listener.as_raw_fd()))?;
        }
        Ok(())
    }

    fn pause_accepting(&mut self) {
        self.accept_paused = true;
    }

    fn resume_accepting(&mut self) {
        self.accept_paused = false;
        self.accept_pending = true;
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        self.accept_all(events)?;
        let timeout = if events.is_empty() { timeout } else { Some(Duration::ZERO) };
        match self.poll.poll(&mut self.ready, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            result => result?,
        }
        let mut listener_ready = false;
        for event in self.ready.iter() {
            match event.token() {
                LISTENER => listener_ready = true,
                WAKE => {
                    let mut count = [0u8; 8];
                    let _ = (&self.wake).read(&mut count);
                    events.push(DriverEvent::Woken);
                }
                token => {
                    let (key, side) = decode(token);
                    events.push(DriverEvent::Ready { key, side, readiness: Readiness::BOTH });
                }
            }
        }
        if listener_ready {
            self.accept_pending = true;
            self.accept_all(events)?;
        }
        Ok(())
    }
}
