//! One direction on the ring data path: completion-based receives into the
//! worker's provided-buffer ring, and sends from those buffers (io_uring
//! only). Where the readiness pumps (`pump.rs`) make system calls and then
//! wait, this one submits operations and reacts to their completions, so a
//! message costs one trip through the ring instead of a poll, a read, a
//! write and a read that would block.
//!
//! Rules it keeps:
//! - At most [`MAX_HELD`] buffers per direction: a receive is submitted only
//!   while fewer are held, so a slow destination holds back its source
//!   (backpressure) and cannot drain the worker's ring.
//! - One send in flight per direction, from the oldest buffer: bytes leave
//!   in the order they came.
//! - Buffers are owned tokens (`driver/buffers.rs`): a receive's completion
//!   brings one, a send takes the oldest and its completion hands it back
//!   with what is left to send. A buffer wholly sent, or still held when the
//!   connection closes, is dropped, which gives it back to the ring; nothing
//!   here gives buffers back by hand.

use std::collections::VecDeque;
use std::io;

use socket2::Socket;

use super::half_close::{HalfClose, Stage};
use crate::error::{ConnError, Op, Side};
use crate::vocab::{BufferIo, BufferSlice, Completed, Wait};

/// Buffers one direction may hold (received, not yet sent).
const MAX_HELD: usize = 2;

/// A direction's operation in flight, if any, of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct InFlight {
    receive: bool,
    send: bool,
}

#[derive(Debug)]
pub struct CompletionPump {
    from: Side,
    to: Side,
    /// Bytes received and not yet sent, oldest first (the one a send in
    /// flight took is the driver's until its completion).
    held: VecDeque<BufferSlice>,
    in_flight: InFlight,
    pub half_close: HalfClose,
    /// Bytes delivered to the destination so far.
    pub bytes: u64,
}

fn os_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl CompletionPump {
    pub fn new(from: Side, to: Side) -> Self {
        CompletionPump {
            from,
            to,
            held: VecDeque::with_capacity(MAX_HELD),
            in_flight: InFlight::default(),
            half_close: HalfClose::new(),
            bytes: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.half_close.is_finished()
    }

    /// Buffers this direction holds, the one a send in flight took included.
    fn holding(&self) -> usize {
        self.held.len() + usize::from(self.in_flight.send)
    }

    /// Submits what can be submitted now: the next send, the next receive,
    /// or, with everything delivered after EOF, the half-close.
    pub fn step(&mut self, src: &Socket, dst: &Socket, io: &mut BufferIo<'_>) -> Result<Wait, ConnError> {
        if self.is_finished() {
            return Ok(Wait::Finished);
        }
        if !self.in_flight.send {
            if let Some(slice) = self.held.pop_front() {
                io.send(dst, slice).map_err(|e| ConnError::new(self.to, Op::Write, e))?;
                self.in_flight.send = true;
            }
        }
        let open = self.half_close.stage() == Stage::Open;
        if !self.in_flight.receive && open && self.holding() < MAX_HELD {
            io.receive(src).map_err(|e| ConnError::new(self.from, Op::Read, e))?;
            self.in_flight.receive = true;
        }
        if self.holding() == 0 && self.half_close.delivered(dst, self.to)? {
            return Ok(Wait::Finished);
        }
        Ok(Wait::Completion)
    }

    /// Takes a completion of this direction's receive or send, then steps.
    /// Returns what to wait for and the bytes delivered by this completion.
    pub fn complete(
        &mut self,
        completed: Completed,
        src: &Socket,
        dst: &Socket,
        io: &mut BufferIo<'_>,
    ) -> Result<(Wait, u64), ConnError> {
        let mut delivered = 0;
        match completed {
            Completed::Received { result, buffer } => {
                self.in_flight.receive = false;
                match (result, buffer) {
                    (1.., Some(buffer)) => {
                        self.held.push_back(BufferSlice { buffer, offset: 0, len: result.unsigned_abs() });
                    }
                    (0, _) => self.half_close.source_ended(),
                    // A vsock socket whose peer closed can answer ENOTCONN.
                    (_, _) if result == -libc::ENOTCONN => self.half_close.source_ended(),
                    (_, _) if result == -libc::ENOBUFS => {
                        // Every buffer of the ring is in use: try again after the others.
                        return Ok((Wait::Yield, 0));
                    }
                    (1.., None) => {
                        let e = io::Error::other("a receive completed without a buffer");
                        return Err(ConnError::new(self.from, Op::Read, e));
                    }
                    _ => return Err(ConnError::new(self.from, Op::Read, os_error(result))),
                }
            }
            Completed::Sent { result, mut slice } => {
                if !self.in_flight.send {
                    let e = io::Error::other("a send completed unasked");
                    return Err(ConnError::new(self.to, Op::Write, e));
                }
                self.in_flight.send = false;
                match result {
                    1.. => {
                        let n = result.unsigned_abs().min(slice.len);
                        self.bytes += u64::from(n);
                        delivered = u64::from(n);
                        slice.offset += n;
                        slice.len -= n;
                        // The rest goes first next; a buffer wholly sent is
                        // dropped here, which gives it back to the ring.
                        if slice.len > 0 {
                            self.held.push_front(slice);
                        }
                    }
                    0 => {
                        let e = io::Error::new(io::ErrorKind::WriteZero, "destination accepted no bytes");
                        return Err(ConnError::new(self.to, Op::Write, e));
                    }
                    _ => return Err(ConnError::new(self.to, Op::Write, os_error(result))),
                }
            }
        }
        self.step(src, dst, io).map(|wait| (wait, delivered))
    }

    /// At close: drops the buffers held, which gives them back to the ring
    /// now (the one a send in flight took goes back with its completion).
    pub fn release(&mut self) {
        self.held.clear();
    }
}
