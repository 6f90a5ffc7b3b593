//! The words the worker, a connection, its movers and the drivers share:
//! which connection ([`Key`]), which way ([`Direction`]), what a socket is
//! ready for ([`Readiness`]), what a ring operation reported
//! ([`Completed`]), and the ring data path's operations ([`RingOps`]).
//! It imports nothing of the engine but [`Side`] and the ring buffer's
//! token (from the leaf `driver/buffers.rs`), so every other module points
//! down to it: worker -> conn -> movers -> vocab <- drivers.

use std::io;

use socket2::Socket;

pub(crate) use crate::driver::buffers::RingBuffer;
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

/// What a completion of the ring data path reported. It owns the buffer it
/// names: dropping it gives the buffer back to the ring.
#[derive(Debug)]
pub enum Completed {
    /// A receive: bytes (or a negative errno) and the buffer it filled.
    Received { result: i32, buffer: Option<RingBuffer> },
    /// A send: bytes sent (or a negative errno), and the slice it was
    /// given, handed back.
    Sent { result: i32, slice: BufferSlice },
}

/// The ring data path's operations (io_uring with a provided-buffer ring).
/// The same contract as [`crate::driver::Driver::watch`] holds for the
/// sockets; a send takes its buffer and its completion hands it back.
pub(crate) trait RingOps {
    /// Receives from `src` into a buffer the kernel picks; reported as
    /// [`Completed::Received`].
    fn receive(&mut self, key: Key, direction: Direction, src: &Socket) -> io::Result<()>;

    /// Sends the bytes of `slice` to `dst`; reported as [`Completed::Sent`].
    fn send(&mut self, key: Key, direction: Direction, dst: &Socket, slice: BufferSlice) -> io::Result<()>;
}

/// Bytes in one buffer of the ring, owned: `len` of them from `offset`.
#[derive(Debug)]
pub(crate) struct BufferSlice {
    pub buffer: RingBuffer,
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
}
