//! The io_uring driver: one ring per worker; one-shot polls for the
//! connections' sockets and for each listener (one per service; `accept4`
//! takes the connection it announces, and what else the backlog holds up
//! to [`super::ACCEPTS_PER_WAKE`]), a poll on the worker's eventfd.
//!
//! Not io_uring's ACCEPT: traced in the guest on Linux 6.18 over vsock, a
//! multishot accept's completion did not end the worker's wait (median 3 ms
//! lost per connection), and a single-shot one that found no connection
//! slept inside the submission or held back the completions submitted
//! with it (1-5 ms per connection); a poll and `accept4` cost one system
//! call and wait for nothing.
//!
//! Every operation is named by its `user_data`: a [`Tag`] in the low byte,
//! the connection's slot index above it and its generation in the high half.
//! The driver counts each connection's operations in flight, so that after
//! [`Driver::release`] it can tell the worker when the kernel let go of the
//! sockets ([`DriverEvent::Released`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::Socket;

use super::ring::{Completion, Ring};
use super::{Driver, DriverEvent, ACCEPTS_PER_WAKE};
use crate::error::Side;
use crate::sys;
use crate::vocab::{BufferRingOps, BufferSlice, Completed, Direction, Key, Readiness, Trigger};

/// Submission queue size; completions get eight times as many slots.
const RING_ENTRIES: u32 = 512;
/// Buffers in the worker's provided-buffer ring, and the size of each: at
/// most 4 MiB of receive buffers per worker, touched only as bytes arrive.
const RING_BUFFERS: u16 = 64;
const RING_BUFFER_BYTES: u32 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Listener = 1,
    Wake,
    Cancel,
    ClientReadable,
    ClientWritable,
    UpstreamReadable,
    UpstreamWritable,
    ReceiveToUpstream,
    ReceiveToClient,
    SendToUpstream,
    SendToClient,
}

impl Tag {
    /// The operations that name a connection.
    const OPS: [Tag; 8] = [
        Tag::ClientReadable,
        Tag::ClientWritable,
        Tag::UpstreamReadable,
        Tag::UpstreamWritable,
        Tag::ReceiveToUpstream,
        Tag::ReceiveToClient,
        Tag::SendToUpstream,
        Tag::SendToClient,
    ];

    fn receive(direction: Direction) -> Tag {
        match direction {
            Direction::ToUpstream => Tag::ReceiveToUpstream,
            Direction::ToClient => Tag::ReceiveToClient,
        }
    }

    fn send(direction: Direction) -> Tag {
        match direction {
            Direction::ToUpstream => Tag::SendToUpstream,
            Direction::ToClient => Tag::SendToClient,
        }
    }

    /// The direction of a ring-path operation, and whether it is a send.
    fn transfer(self) -> Option<(Direction, bool)> {
        match self {
            Tag::ReceiveToUpstream => Some((Direction::ToUpstream, false)),
            Tag::ReceiveToClient => Some((Direction::ToClient, false)),
            Tag::SendToUpstream => Some((Direction::ToUpstream, true)),
            Tag::SendToClient => Some((Direction::ToClient, true)),
            _ => None,
        }
    }

    fn poll(side: Side, wanted: Readiness) -> Tag {
        match (side, wanted.writable) {
            (Side::Client, false) => Tag::ClientReadable,
            (Side::Client, true) => Tag::ClientWritable,
            (Side::Upstream, false) => Tag::UpstreamReadable,
            (Side::Upstream, true) => Tag::UpstreamWritable,
        }
    }

    /// What a poll of this tag waits for: (side, poll events, readiness).
    fn poll_target(self) -> Option<(Side, u32, Readiness)> {
        let (pollin, pollout) = (libc::POLLIN as u32, libc::POLLOUT as u32);
        match self {
            Tag::ClientReadable => Some((Side::Client, pollin, Readiness::READABLE)),
            Tag::ClientWritable => Some((Side::Client, pollout, Readiness::WRITABLE)),
            Tag::UpstreamReadable => Some((Side::Upstream, pollin, Readiness::READABLE)),
            Tag::UpstreamWritable => Some((Side::Upstream, pollout, Readiness::WRITABLE)),
            _ => None,
        }
    }

    /// This operation's bit in [`Ops::in_flight`].
    fn bit(self) -> u16 {
        1 << (self as u8)
    }

    fn user_data(self, key: Key) -> u64 {
        u64::from(key.generation) << 40 | u64::from(key.index) << 8 | self as u64
    }

    fn decode(user_data: u64) -> Option<(Tag, Key)> {
        let tag = [Tag::Listener, Tag::Wake, Tag::Cancel]
            .into_iter()
            .chain(Tag::OPS)
            .find(|t| *t as u64 == user_data & 0xff)?;
        // Truncation intended: the fields were packed from these widths.
        #[allow(clippy::cast_possible_truncation)]
        let key = Key { index: (user_data >> 8) as u32, generation: (user_data >> 40) as u32 };
        Some((tag, key))
    }
}

/// What a listener's poll waits for: a connection to accept, waking one
/// worker of those that share the listener (io_uring's poll takes
/// EPOLLEXCLUSIVE since Linux 5.9).
// The flags are bit masks; the casts keep their bits.
#[allow(clippy::cast_sign_loss)]
const LISTENER_EVENTS: u32 = libc::POLLIN as u32 | libc::EPOLLEXCLUSIVE as u32;

/// What a listener's poll completion brings: the connection `accept4` took,
/// an error for the worker (the poll's, or the listener's own: the worker
/// waits before it tries again), or nothing (another worker took the
/// connection, or the client left first).
fn accept_announced(listener: &Socket, result: i32) -> Option<io::Result<Socket>> {
    if result == -libc::ECANCELED {
        return None;
    }
    if result < 0 {
        return Some(Err(io::Error::from_raw_os_error(-result)));
    }
    if result & i32::from(libc::POLLIN) == 0 {
        // POLLERR or POLLHUP and nothing to accept.
        let error = listener.take_error().ok().flatten();
        return Some(Err(
            error.unwrap_or_else(|| io::Error::other("the listener reported an error or a hang-up"))
        ));
    }
    match sys::accept_nonblocking(listener.as_fd()) {
        Ok(client) => Some(Ok(Socket::from(client))),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Takes what a listener's poll completion announced, then goes on
/// accepting (non-blocking) until the backlog is empty, an accept fails or
/// `bound` clients were taken; hands each to `accepted`. An error ends the
/// round: the worker decides whether to pause.
fn accept_burst(listener: &Socket, result: i32, bound: usize, mut accepted: impl FnMut(io::Result<Socket>)) {
    let Some(first) = accept_announced(listener, result) else { return };
    let mut failed = first.is_err();
    accepted(first);
    for _ in 1..bound {
        if failed {
            return;
        }
        match sys::accept_nonblocking(listener.as_fd()) {
            Ok(client) => accepted(Ok(Socket::from(client))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return,
            Err(e) => {
                failed = true;
                accepted(Err(e));
            }
        }
    }
}

/// A key for the operations that name no connection.
const NO_CONNECTION: Key = Key { index: 0, generation: 0 };

/// The key of a service's listener poll: its index in the slot's place.
fn listener_key(service: usize) -> Key {
    Key { index: u32::try_from(service).unwrap_or(u32::MAX), generation: 0 }
}

/// The operations in flight on one connection slot.
#[derive(Debug, Default)]
struct Ops {
    generation: u32,
    in_flight: u16,
    released: bool,
    /// What each direction's send in flight sends: held here while the
    /// kernel reads it, handed back with the completion (or dropped, so
    /// given back, if the connection was released meanwhile).
    sending: [Option<BufferSlice>; 2],
}

/// A service's listener and its poll.
#[derive(Debug)]
struct Listening {
    /// Kept open while its poll may still complete; dropped after that
    /// once the relay stops.
    socket: Option<Socket>,
    armed: bool,
}

pub(crate) struct UringDriver {
    /// Declared before `listeners`, so closed first: a listener whose poll
    /// was never reaped (the worker returned first) outlives the ring.
    ring: Ring,
    /// Indexed by service.
    listeners: Vec<Listening>,
    stopping: bool,
    accept_paused: bool,
    wake: File,
    /// Indexed by connection slot.
    ops: Vec<Ops>,
    completions: Vec<Completion>,
}

impl UringDriver {
    /// With `buffers`, sets up the provided-buffer ring of the ring data
    /// path (without it where the kernel refuses: that path then copies).
    pub fn new(listeners: Vec<Socket>, wake: File, buffers: bool) -> io::Result<Self> {
        let mut ring = Ring::new(RING_ENTRIES)?;
        if buffers {
            if let Err(e) = ring.register_buffers(RING_BUFFERS, RING_BUFFER_BYTES) {
                tracing::debug!(error = %e, "no provided-buffer ring; the ring data path copies");
            }
        }
        let mut driver = UringDriver {
            ring,
            listeners: listeners
                .into_iter()
                .map(|socket| Listening { socket: Some(socket), armed: false })
                .collect(),
            stopping: false,
            accept_paused: false,
            wake,
            ops: Vec::new(),
            completions: Vec::with_capacity(RING_ENTRIES as usize),
        };
        driver.arm_wake()?;
        Ok(driver)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        // SAFETY: the eventfd is owned by this driver, which owns the ring:
        // it closes only when the ring is gone.
        unsafe { self.ring.poll(self.wake.as_fd(), libc::POLLIN as u32, Tag::Wake.user_data(NO_CONNECTION)) }
    }

    fn arm_listeners(&mut self) -> io::Result<()> {
        if self.accept_paused || self.stopping {
            return Ok(());
        }
        for (service, listening) in self.listeners.iter_mut().enumerate() {
            let Some(socket) = listening.socket.as_ref().filter(|_| !listening.armed) else { continue };
            // SAFETY: the listener is dropped only once its poll completed
            // (see `complete`), or with the ring.
            unsafe {
                self.ring.poll(
                    socket.as_fd(),
                    LISTENER_EVENTS,
                    Tag::Listener.user_data(listener_key(service)),
                )?
            };
            listening.armed = true;
        }
        Ok(())
    }

    fn complete(&mut self, completion: Completion, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        let Some((tag, key)) = Tag::decode(completion.user_data) else {
            tracing::warn!(user_data = completion.user_data, "completion with an unknown tag ignored");
            return Ok(());
        };
        match tag {
            Tag::Listener => {
                let service = key.index as usize;
                let Some(listening) = self.listeners.get_mut(service) else { return Ok(()) };
                listening.armed = false;
                if self.stopping {
                    listening.socket = None;
                } else if let Some(listener) = &listening.socket {
                    accept_burst(listener, completion.result, ACCEPTS_PER_WAKE, |client| {
                        events.push(DriverEvent::Accepted { service, client });
                    });
                }
                Ok(())
            }
            Tag::Wake => {
                let mut count = [0u8; 8];
                let _ = self.wake.read(&mut count);
                events.push(DriverEvent::Woken);
                self.arm_wake()
            }
            // Its outcome shows on the operation it targets.
            Tag::Cancel => Ok(()),
            op => {
                let Some(ops) =
                    self.ops.get_mut(key.index as usize).filter(|o| o.generation == key.generation)
                else {
                    tracing::warn!(?tag, ?key, "completion for an unknown connection ignored");
                    return Ok(());
                };
                ops.in_flight &= !op.bit();
                let sent = match op.transfer() {
                    Some((direction, true)) => ops.sending[direction as usize].take(),
                    _ => None,
                };
                if ops.released {
                    // Nobody owns the buffers named here any more: dropped,
                    // they go back to the ring.
                    drop((sent, completion.buffer));
                    if ops.in_flight == 0 {
                        events.push(DriverEvent::Released(key));
                    }
                    return Ok(());
                }
                let result = completion.result;
                let completed = match (op.transfer(), sent) {
                    (Some((direction, false)), _) => {
                        Some((direction, Completed::Received { result, buffer: completion.buffer }))
                    }
                    (Some((direction, true)), Some(slice)) => {
                        Some((direction, Completed::Sent { result, slice }))
                    }
                    (Some((_, true)), None) => {
                        tracing::warn!(?key, "send completion without its buffer ignored");
                        None
                    }
                    (None, _) => None,
                };
                match (completed, op.poll_target()) {
                    (Some((direction, completed)), _) => {
                        events.push(DriverEvent::Completed { key, direction, completed });
                    }
                    (None, Some((side, _, readiness))) if result != -libc::ECANCELED => {
                        events.push(DriverEvent::Ready { key, side, readiness });
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }
}

impl Driver for UringDriver {
    fn trigger(&self) -> Trigger {
        Trigger::Level
    }

    fn add_upstream(&mut self, _key: Key, _upstream: &Socket) -> io::Result<()> {
        Ok(())
    }

    fn register(&mut self, key: Key, _client: &Socket) -> io::Result<()> {
        let index = key.index as usize;
        if self.ops.len() <= index {
            self.ops.resize_with(index + 1, Ops::default);
        }
        self.ops[index] = Ops { generation: key.generation, ..Ops::default() };
        Ok(())
    }

    fn watch(&mut self, key: Key, socket: &Socket, side: Side, wanted: Readiness) -> io::Result<()> {
        let tag = Tag::poll(side, wanted);
        let Some((_, events, _)) = tag.poll_target() else { return Ok(()) };
        // SAFETY: the worker keeps the connection's sockets open until this
        // driver reports it released, which waits for every poll on it to
        // complete (the `Driver` contract).
        unsafe { self.ring.poll(socket.as_fd(), events, tag.user_data(key))? };
        self.ops[key.index as usize].in_flight |= tag.bit();
        Ok(())
    }

    fn release(&mut self, key: Key) -> io::Result<bool> {
        let ops = &mut self.ops[key.index as usize];
        ops.released = true;
        let in_flight = ops.in_flight;
        for tag in Tag::OPS.into_iter().filter(|tag| in_flight & tag.bit() != 0) {
            self.ring.cancel(tag.user_data(key), Tag::Cancel.user_data(key))?;
        }
        Ok(in_flight == 0)
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        self.stopping = true;
        for (service, listening) in self.listeners.iter_mut().enumerate() {
            if listening.armed {
                let poll = Tag::Listener.user_data(listener_key(service));
                self.ring.cancel(poll, Tag::Cancel.user_data(NO_CONNECTION))?;
            } else {
                listening.socket = None;
            }
        }
        Ok(())
    }

    fn buffer_ring(&mut self) -> Option<&mut dyn BufferRingOps> {
        if self.ring.has_buffers() {
            Some(self)
        } else {
            None
        }
    }

    fn pause_accepting(&mut self) {
        self.accept_paused = true;
    }

    fn resume_accepting(&mut self) {
        self.accept_paused = false;
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        self.arm_listeners()?;
        self.ring.wait(timeout)?;
        let mut completions = std::mem::take(&mut self.completions);
        self.ring.reap(&mut completions);
        for completion in completions.drain(..) {
            self.complete(completion, events)?;
        }
        self.completions = completions;
        Ok(())
    }
}

impl BufferRingOps for UringDriver {
    fn receive(&mut self, key: Key, direction: Direction, src: &Socket) -> io::Result<()> {
        let tag = Tag::receive(direction);
        // SAFETY: the worker keeps the connection's sockets open until this
        // driver reports it released (the `Driver` contract).
        unsafe { self.ring.receive(src.as_fd(), tag.user_data(key))? };
        self.ops[key.index as usize].in_flight |= tag.bit();
        Ok(())
    }

    fn send(&mut self, key: Key, direction: Direction, dst: &Socket, slice: BufferSlice) -> io::Result<()> {
        let tag = Tag::send(direction);
        // SAFETY: the socket as for `receive`; the buffer's token is held in
        // `Ops::sending` until this send's completion is reaped (see
        // `complete`), so the buffer cannot return to the ring before.
        unsafe { self.ring.send(dst.as_fd(), &slice.buffer, slice.offset, slice.len, tag.user_data(key))? };
        let ops = &mut self.ops[key.index as usize];
        ops.in_flight |= tag.bit();
        ops.sending[direction as usize] = Some(slice);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A non-blocking loopback TCP listener with `queued` clients in its
    /// backlog (the clients returned, to keep them open).
    fn listener_with(queued: usize) -> (Socket, Vec<std::net::TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let clients = (0..queued).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
        (Socket::from(std::os::fd::OwnedFd::from(listener)), clients)
    }

    fn burst(listener: &Socket, bound: usize) -> usize {
        let mut taken = 0;
        accept_burst(listener, i32::from(libc::POLLIN), bound, |client| {
            client.unwrap();
            taken += 1;
        });
        taken
    }

    /// One poll completion takes the backlog up to the bound, and stops
    /// when it is empty; what the bound left is taken by the next.
    /// Catches: one accept per completion (as before), or an unbounded loop.
    #[test]
    fn a_listener_wake_takes_a_bounded_burst() {
        let (listener, _clients) = listener_with(5);
        assert_eq!(burst(&listener, 3), 3);
        assert_eq!(burst(&listener, 3), 2, "the rest, then the empty backlog ends the round");
        assert_eq!(burst(&listener, 3), 0);
    }

    /// Every tag: the three that name no connection, then the operations.
    fn every_tag() -> Vec<Tag> {
        [Tag::Listener, Tag::Wake, Tag::Cancel].into_iter().chain(Tag::OPS).collect()
    }

    #[test]
    fn each_tag_has_a_bit_of_its_own_in_the_in_flight_mask() {
        let tags = every_tag();
        let mut seen = 0u16;
        for tag in &tags {
            assert_eq!(seen & tag.bit(), 0, "{tag:?} shares its bit");
            seen |= tag.bit();
        }
        assert_eq!(seen.count_ones() as usize, tags.len());
    }

    proptest! {
        /// Any slot index and any generation the worker makes (the low 24
        /// bits of a connection's id, `worker::generation`) come back as packed.
        #[test]
        fn user_data_decodes_to_its_tag_and_key(
            tag in proptest::sample::select(every_tag()),
            index in any::<u32>(),
            generation in 0u32..1 << 24,
        ) {
            let key = Key { index, generation };
            prop_assert_eq!(Tag::decode(tag.user_data(key)), Some((tag, key)));
        }

        /// A low byte that is no tag is refused, whatever is above it.
        #[test]
        fn user_data_without_a_tag_decodes_to_nothing(low in any::<u8>(), high in any::<u64>()) {
            prop_assume!(!every_tag().iter().any(|tag| *tag as u8 == low));
            prop_assert_eq!(Tag::decode(high << 8 | u64::from(low)), None);
        }
    }
}
