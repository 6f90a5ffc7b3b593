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
//! - A buffer goes back to the ring once its last byte was sent; at close,
//!   every buffer not used by a send still in the kernel goes back (the
//!   driver returns that one when the send completes). A receive completion
//!   that reaches a connection after its close brings a buffer nobody else
//!   owns: the worker gives it back.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;

use socket2::Socket;

use super::pump::Wait;
use crate::error::{ConnError, Op, Side};
use crate::vocab::{BufferIo, BufferSlice, Completed};

/// Buffers one direction may hold (received, not yet sent).
const MAX_HELD: usize = 2;

#[derive(Debug)]
pub struct RingPump {
    from: Side,
    to: Side,
    /// Buffers received and not wholly sent, oldest first: (id, length).
    held: VecDeque<(u16, u32)>,
    /// Bytes of the oldest buffer already sent.
    sent: u32,
    receiving: bool,
    sending: bool,
    eof: bool,
    finished: bool,
    /// Pass EOF on with `shutdown(SHUT_WR)` (see `Pump::half_close`).
    pub half_close: bool,
    /// Bytes delivered to the destination so far.
    pub bytes: u64,
}

fn os_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl RingPump {
    pub fn new(from: Side, to: Side) -> Self {
        RingPump {
            from,
            to,
            held: VecDeque::with_capacity(MAX_HELD),
            sent: 0,
            receiving: false,
            sending: false,
            eof: false,
            finished: false,
            half_close: true,
            bytes: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Submits what can be submitted now: the next send, the next receive,
    /// or, with everything delivered after EOF, the half-close.
    pub fn step(&mut self, src: &Socket, dst: &Socket, io: &mut BufferIo<'_>) -> Result<Wait, ConnError> {
        if self.finished {
            return Ok(Wait::Finished);
        }
        if let (false, Some(&(buffer, len))) = (self.sending, self.held.front()) {
            let slice = BufferSlice { buffer, offset: self.sent, len: len - self.sent };
            io.send(dst, slice).map_err(|e| ConnError::new(self.to, Op::Write, e))?;
            self.sending = true;
        }
        if !self.receiving && !self.eof && self.held.len() < MAX_HELD {
            io.receive(src).map_err(|e| ConnError::new(self.from, Op::Read, e))?;
            self.receiving = true;
        }
        if self.eof && self.held.is_empty() && !self.sending {
            self.finished = true;
            if !self.half_close {
                return Ok(Wait::Finished);
            }
            return match dst.shutdown(Shutdown::Write) {
                // The destination already went away entirely: nothing left to tell it.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                    Err(ConnError::new(self.to, Op::Shutdown, e))
                }
                _ => Ok(Wait::Finished),
            };
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
                self.receiving = false;
                match (result, buffer) {
                    (1.., Some(buffer)) => self.held.push_back((buffer, result.unsigned_abs())),
                    (0, _) => {
                        self.eof = true;
                        if let Some(buffer) = buffer {
                            io.give_back(buffer);
                        }
                    }
                    // A vsock socket whose peer closed can answer ENOTCONN.
                    (_, _) if result == -libc::ENOTCONN => self.eof = true,
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
            Completed::Sent { result } => {
                self.sending = false;
                let Some(&(buffer, len)) = self.held.front() else {
                    return Err(ConnError::new(
                        self.to,
                        Op::Write,
                        io::Error::other("a send completed unasked"),
                    ));
                };
                match result {
                    1.. => {
                        let n = result.unsigned_abs();
                        self.sent += n;
                        self.bytes += u64::from(n);
                        delivered = u64::from(n);
                        if self.sent >= len {
                            self.held.pop_front();
                            self.sent = 0;
                            io.give_back(buffer);
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

    /// At close: gives back every buffer no send in flight uses. A send
    /// whose completion the driver reaped but this pump has not seen yet is
    /// over: its buffer goes back too.
    pub fn release(&mut self, io: &mut BufferIo<'_>) {
        let keep = usize::from(self.sending && io.sending());
        for (buffer, _) in self.held.drain(keep..) {
            io.give_back(buffer);
        }
    }
}
