//! The words the worker, a connection, its movers and the drivers share:
//! which connection ([`Key`]), which way ([`Direction`]), what a socket is
//! ready for ([`Readiness`]), what a ring operation reported
//! ([`Completed`]), and the ring data path's operations ([`RingOps`]).
//! It imports nothing of the engine but [`Side`], so every other module
//! points down to it: worker -> conn -> movers -> vocab <- drivers.

use std::io;

use socket2::Socket;

use crate::error::Side;

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

/// Names a connection in a driver's bookkeeping: its slot in the worker
/// and the low bits of its id, so an event for a connection that is gone
/// (its slot reused since) is recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub index: u32,
    pub generation: u32,
}

/// Readiness reported for one socket of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Readiness {
    pub readable: bool,
    pub writable: bool,
}

impl Readiness {
    pub const READABLE: Readiness = Readiness { readable: true, writable: false };
    pub const WRITABLE: Readiness = Readiness { readable: false, writable: true };
    pub const BOTH: Readiness = Readiness { readable: true, writable: true };
}

/// What a completion reported.
#[derive(Clone, Copy, Debug)]
pub enum Completed {
    /// A receive: bytes (or a negative errno) and the buffer it filled.
    Received { result: i32, buffer: Option<u16> },
    /// A send: bytes sent (or a negative errno).
    Sent { result: i32 },
}

/// The ring data path's operations (io_uring with a provided-buffer ring).
/// The same contract as [`Driver::watch`] holds for the sockets; a buffer
/// named in a send must not be given back before the send completed.
pub(crate) trait RingOps {
    /// Receives from `src` into a buffer the kernel picks; reported as
    /// [`DriverEvent::Completed`] with [`Completed::Received`].
    fn receive(&mut self, key: Key, direction: Direction, src: &Socket) -> io::Result<()>;

    /// Sends the bytes of `slice` to `dst`; reported as [`Completed::Sent`].
    fn send(&mut self, key: Key, direction: Direction, dst: &Socket, slice: BufferSlice) -> io::Result<()>;

    /// Puts a buffer its owner is done with back in the ring.
    fn give_back(&mut self, buffer: u16);

    /// Whether this direction's send is still the kernel's (its completion
    /// not reaped yet): the driver then gives its buffer back when it is.
    fn sending(&self, key: Key, direction: Direction) -> bool;
}

/// Bytes in one buffer of the ring: `len` of them from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BufferSlice {
    pub buffer: u16,
    pub offset: u32,
    pub len: u32,
}

/// [`RingOps`] for one direction of one connection: what a ring pump uses.
pub(crate) struct BufferIo<'a> {
    pub ops: &'a mut dyn RingOps,
    pub key: Key,
    pub direction: Direction,
}

impl BufferIo<'_> {
    pub fn receive(&mut self, src: &Socket) -> io::Result<()> {
        self.ops.receive(self.key, self.direction, src)
    }

    pub fn send(&mut self, dst: &Socket, slice: BufferSlice) -> io::Result<()> {
        self.ops.send(self.key, self.direction, dst, slice)
    }

    pub fn give_back(&mut self, buffer: u16) {
        self.ops.give_back(buffer);
    }

    pub fn sending(&self) -> bool {
        self.ops.sending(self.key, self.direction)
    }
}
