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
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::Socket;

use super::{Driver, DriverEvent, ACCEPTS_PER_WAKE};
use crate::error::Side;
use crate::sys;
use crate::vocab::{Key, Readiness, Trigger};

const WAKE: Token = Token(usize::MAX);
/// Listeners count down from here (service 0 first); connection tokens
/// use at most 56 bits, so the two never meet.
const FIRST_LISTENER: usize = usize::MAX - 1;

fn listener_token(service: usize) -> Token {
    Token(FIRST_LISTENER - service)
}

/// The service of a listener's token, if it is one.
fn listener_of(token: Token, services: usize) -> Option<usize> {
    FIRST_LISTENER.checked_sub(token.0).filter(|service| *service < services)
}
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
    /// Indexed by service; `None` once stopped.
    listeners: Vec<Option<Socket>>,
    /// Per listener: it may have clients waiting (edge-triggered: accept
    /// until it says WouldBlock, or the next edge may never come).
    accept_pending: Vec<bool>,
    accept_paused: bool,
    wake: File,
}

impl EpollDriver {
    pub fn new(listeners: Vec<Socket>, wake: File) -> io::Result<Self> {
        let poll = Poll::new()?;
        for (service, listener) in listeners.iter().enumerate() {
            let token = listener_token(service);
            sys::epoll_add_exclusive(&poll, listener.as_fd(), token.0 as u64)?;
        }
        poll.registry().register(&mut SourceFd(&wake.as_raw_fd()), WAKE, Interest::READABLE)?;
        Ok(EpollDriver {
            poll,
            ready: Events::with_capacity(EVENTS_PER_WAIT),
            accept_pending: vec![true; listeners.len()],
            listeners: listeners.into_iter().map(Some).collect(),
            accept_paused: false,
            wake,
        })
    }

    /// Accepts on every listener until its queue is empty, an accept
    /// fails (the worker decides whether to pause; otherwise the next wait
    /// tries again) or [`ACCEPTS_PER_WAKE`] were taken (the rest are taken
    /// in the next round, after the events of this one).
    fn accept_all(&mut self, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        for (service, listener) in self.listeners.iter().enumerate() {
            let Some(listener) = listener else { continue };
            let mut bound = ACCEPTS_PER_WAKE;
            while self.accept_pending[service] && !self.accept_paused && bound > 0 {
                bound -= 1;
                match sys::accept_nonblocking(listener.as_fd()) {
                    Ok(client) => {
                        events.push(DriverEvent::Accepted { service, client: Ok(Socket::from(client)) });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.accept_pending[service] = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        events.push(DriverEvent::Accepted { service, client: Err(e) });
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Driver for EpollDriver {
    fn trigger(&self) -> Trigger {
        Trigger::Edge
    }

    fn register(&mut self, key: Key, client: &Socket) -> io::Result<()> {
        let both = Interest::READABLE | Interest::WRITABLE;
        self.poll.registry().register(&mut SourceFd(&client.as_raw_fd()), token(key, Side::Client), both)
    }

    fn add_upstream(&mut self, key: Key, upstream: &Socket) -> io::Result<()> {
        let both = Interest::READABLE | Interest::WRITABLE;
        self.poll.registry().register(&mut SourceFd(&upstream.as_raw_fd()), token(key, Side::Upstream), both)
    }

    fn watch(&mut self, _key: Key, _socket: &Socket, _side: Side, _wanted: Readiness) -> io::Result<()> {
        Ok(())
    }

    fn release(&mut self, _key: Key) -> io::Result<bool> {
        Ok(true)
    }

    fn buffer_ring(&mut self) -> Option<&mut dyn crate::vocab::BufferRingOps> {
        None
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        for listener in self.listeners.iter_mut().filter_map(Option::take) {
            self.poll.registry().deregister(&mut SourceFd(&listener.as_raw_fd()))?;
        }
        Ok(())
    }

    fn pause_accepting(&mut self) {
        self.accept_paused = true;
    }

    fn resume_accepting(&mut self) {
        self.accept_paused = false;
        self.accept_pending.fill(true);
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
            if let Some(service) = listener_of(event.token(), self.listeners.len()) {
                self.accept_pending[service] = true;
                listener_ready = true;
                continue;
            }
            match event.token() {
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
            self.accept_all(events)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(upstream: bool) -> Side {
        if upstream {
            Side::Upstream
        } else {
            Side::Client
        }
    }

    proptest! {
        /// Any slot index below 2^31 (the token has 31 bits for it) and any
        /// generation come back as packed.
        #[test]
        fn a_connection_token_decodes_to_its_key_and_side(
            index in 0u32..1 << 31,
            generation in any::<u32>(),
            upstream in any::<bool>(),
        ) {
            let key = Key { index, generation };
            prop_assert_eq!(decode(token(key, side(upstream))), (key, side(upstream)));
        }

        /// Every service's listener token, the first one's included.
        #[test]
        fn a_listener_token_names_its_service(services in 1usize..1 << 16, pick in any::<usize>()) {
            for service in [0, services - 1, pick % services] {
                prop_assert_eq!(listener_of(listener_token(service), services), Some(service));
                prop_assert_ne!(listener_token(service), WAKE);
            }
        }

        /// With the generations the worker makes (24 bits, `worker::generation`),
        /// a connection's token is never a listener's nor the waker's.
        #[test]
        fn a_connection_token_is_never_a_listener_or_the_waker(
            index in 0u32..1 << 31,
            generation in 0u32..1 << 24,
            upstream in any::<bool>(),
            services in 1usize..1 << 16,
        ) {
            let token = token(Key { index, generation }, side(upstream));
            prop_assert_eq!(listener_of(token, services), None);
            prop_assert_ne!(token, WAKE);
        }
    }
}
