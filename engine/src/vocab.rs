//! The words the worker, a connection, its movers and the drivers share:
//! which connection ([`Key`]), which way ([`Direction`]), how a direction
//! moves its bytes ([`DataPath`]) and what it waits for ([`Wait`]), what a
//! socket is ready for ([`Readiness`]), what a ring operation reported
//! ([`Completed`]), and the ring data path's operations ([`BufferRingOps`]).
//! It imports nothing of the engine but [`Side`] and the ring buffer's
//! token (from the leaf `driver/buffers.rs`), so every other module points
//! down to it: worker -> conn -> movers -> vocab <- drivers.

use std::io;

use socket2::{Domain, Socket};

pub(crate) use crate::driver::buffers::ProvidedBuffer;
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
    Received { result: i32, buffer: Option<ProvidedBuffer> },
    /// A send: bytes sent (or a negative errno), and the slice it was
    /// given, handed back.
    Sent { result: i32, slice: BufferSlice },
}

/// The ring data path's operations (io_uring with a provided-buffer ring).
/// The same contract as [`crate::driver::Driver::watch`] holds for the
/// sockets; a send takes its buffer and its completion hands it back.
pub(crate) trait BufferRingOps {
    /// Receives from `src` into a buffer the kernel picks; reported as
    /// [`Completed::Received`].
    fn receive(&mut self, key: Key, direction: Direction, src: &Socket) -> io::Result<()>;

    /// Sends the bytes of `slice` to `dst`; reported as [`Completed::Sent`].
    fn send(&mut self, key: Key, direction: Direction, dst: &Socket, slice: BufferSlice) -> io::Result<()>;
}

/// Bytes in one buffer of the ring, owned: `len` of them from `offset`.
#[derive(Debug)]
pub(crate) struct BufferSlice {
    pub buffer: ProvidedBuffer,
    pub offset: u32,
    pub len: u32,
}

/// [`BufferRingOps`] for one direction of one connection: what a ring pump uses.
pub(crate) struct BufferIo<'a> {
    pub ops: &'a mut dyn BufferRingOps,
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

labelled! {
    /// How a direction moves its bytes.
    #[derive(Default)]
    pub enum DataPath as "data path" {
        /// Chosen per direction by the sockets' families: splice between TCP
        /// and Unix sockets; from or to vsock, copy while messages are small and
        /// splice while the source streams. vsock has no splice of its own: the
        /// kernel's copying fallback prepares pages for the pipe's whole free
        /// space on every call, which makes small messages several times slower
        /// than a plain copy, while bulk still moves fastest by splice (both
        /// measured in the vsock guest, `perf/results-vsock.md`).
        #[default]
        Auto = "auto", "splice between TCP and Unix sockets; where vsock is on either side, copy while messages are small and splice while the source streams";
        /// socket -> pipe -> socket with `splice(2)`: no copy through user space
        /// (a family that refuses splice, vsock before Linux 5.0, copies).
        Splice = "splice", "socket -> pipe -> socket with splice(2) everywhere";
        /// `read(2)` into a pooled buffer, then `send(2)`.
        Copy = "copy", "read(2) into a buffer, then send(2), everywhere";
        /// io_uring receives into the worker's provided-buffer ring and sends
        /// from it, completion-based (`completion_pump.rs`); copies where the backend
        /// has no buffer ring (epoll, or a kernel without DEFER_TASKRUN).
        Ring = "ring", "io_uring's shared buffer ring (copy on the portable backend)";
    }
}

impl DataPath {
    /// The path of a direction from a `source` socket to a `destination`
    /// socket of these families, where the driver does (`ring`) or does not
    /// have a buffer ring. `Auto` adapts where vsock is involved: from vsock
    /// for the splice fallback's cost, to vsock because a pipe -> vsock
    /// splice copies anyway, so small messages gain nothing from the pipe.
    pub(crate) fn for_direction(self, source: Domain, destination: Domain, ring: bool) -> DataPath {
        match self {
            DataPath::Auto if source == Domain::VSOCK || destination == Domain::VSOCK => DataPath::Auto,
            DataPath::Auto => DataPath::Splice,
            DataPath::Ring if !ring => DataPath::Copy,
            chosen => chosen,
        }
    }
}

/// What a pump waits for after a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The source has nothing more now.
    Readable,
    /// The destination cannot take more now.
    Writable,
    /// The run spent its budget with work left: run again after the others.
    Yield,
    /// EOF was passed on; nothing more will move in this direction.
    Finished,
    /// Operations of the ring data path are in flight: their completions
    /// will come, nothing to watch.
    Completion,
}

/// How a driver reports readiness: while it lasts (io_uring's polls) or
/// once per change (epoll's edges). One value per driver, given to each
/// connection when it is made: after a short read, a level-triggered
/// direction waits (an EOF behind the bytes shows at once), an
/// edge-triggered one reads again (that EOF would not be reported again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Level,
    Edge,
}
