//! The io_uring driver: one ring per worker; one-shot polls for the
//! connections' sockets, a multishot accept for the listener, a poll on the
//! worker's eventfd.
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

use super::{Driver, DriverEvent, Key, Readiness};
use crate::conn::Connection;
use crate::error::Side;
use crate::ring::{self, Completion, Ring};

/// Submission queue size; completions get eight times as many slots.
const RING_ENTRIES: u32 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Accept = 1,
    Wake,
    Cancel,
    ClientReadable,
    ClientWritable,
    UpstreamReadable,
    UpstreamWritable,
}

impl Tag {
    const POLLS: [Tag; 4] =
        [Tag::ClientReadable, Tag::ClientWritable, Tag::UpstreamReadable, Tag::UpstreamWritable];

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

    /// This poll's bit in [`Ops::in_flight`].
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    fn user_data(self, key: Key) -> u64 {
        u64::from(key.generation) << 40 | u64::from(key.index) << 8 | self as u64
    }

    fn decode(user_data: u64) -> Option<(Tag, Key)> {
        let tag = [Tag::Accept, Tag::Wake, Tag::Cancel]
            .into_iter()
            .chain(Tag::POLLS)
            .find(|t| *t as u64 == user_data & 0xff)?;
        // Truncation intended: the fields were packed from these widths.
        #[allow(clippy::cast_possible_truncation)]
        let key = Key { index: (user_data >> 8) as u32, generation: (user_data >> 40) as u32 };
        Some((tag, key))
    }
}

/// A key for the operations that name no connection.
const NO_CONNECTION: Key = Key { index: 0, generation: 0 };

/// The operations in flight on one connection slot.
#[derive(Clone, Copy, Debug, Default)]
struct Ops {
    generation: u32,
    in_flight: u8,
    released: bool,
}

/// The listener's multishot accept.
#[derive(Debug, Default)]
struct Accepting {
    armed: bool,
    paused: bool,
}

pub(crate) struct UringDriver {
    ring: Ring,
    /// Kept open while its accept may still complete; dropped after that
    /// once the relay stops.
    listener: Option<Socket>,
    stopping: bool,
    accepting: Accepting,
    wake: File,
    /// Indexed by connection slot.
    ops: Vec<Ops>,
    completions: Vec<Completion>,
}

impl UringDriver {
    pub fn new(listener: Socket, wake: File) -> io::Result<Self> {
        let mut driver = UringDriver {
            ring: Ring::new(RING_ENTRIES)?,
            listener: Some(listener),
            stopping: false,
            accepting: Accepting::default(),
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

    fn arm_accept(&mut self) -> io::Result<()> {
        let Some(listener) = &self.listener else { return Ok(()) };
        if self.accepting.armed || self.accepting.paused || self.stopping {
            return Ok(());
        }
        // SAFETY: the listener is dropped only once its accept completed
        // without `more` (see `complete`), or with the ring.
        unsafe { self.ring.accept_multishot(listener.as_fd(), Tag::Accept.user_data(NO_CONNECTION))? };
        self.accepting.armed = true;
        Ok(())
    }

    fn complete(&mut self, completion: Completion, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        let Some((tag, key)) = Tag::decode(completion.user_data) else {
            tracing::warn!(user_data = completion.user_data, "completion with an unknown tag ignored");
            return Ok(());
        };
        match tag {
            Tag::Accept => {
                if completion.result >= 0 {
                    events.push(DriverEvent::Accepted(Ok(ring::accepted_socket(&completion))));
                } else if completion.result != -libc::ECANCELED {
                    events.push(DriverEvent::Accepted(Err(io::Error::from_raw_os_error(-completion.result))));
                }
                if !completion.more {
                    self.accepting.armed = false;
                    if self.stopping {
                        self.listener = None;
                    }
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
            poll => {
                let Some((side, _, readiness)) = poll.poll_target() else { return Ok(()) };
                let Some(ops) =
                    self.ops.get_mut(key.index as usize).filter(|o| o.generation == key.generation)
                else {
                    tracing::warn!(?tag, ?key, "completion for an unknown connection ignored");
                    return Ok(());
                };
                ops.in_flight &= !poll.bit();
                if ops.released {
                    if ops.in_flight == 0 {
                        events.push(DriverEvent::Released(key));
                    }
                } else if completion.result != -libc::ECANCELED {
                    events.push(DriverEvent::Ready { key, side, readiness });
                }
                Ok(())
            }
        }
    }
}

impl Driver for UringDriver {
    fn register(&mut self, key: Key, _conn: &Connection) -> io::Result<()> {
        let index = key.index as usize;
        if self.ops.len() <= index {
            self.ops.resize(index + 1, Ops::default());
        }
        self.ops[index] = Ops { generation: key.generation, in_flight: 0, released: false };
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
        for tag in Tag::POLLS.into_iter().filter(|tag| in_flight & tag.bit() != 0) {
            self.ring.cancel(tag.user_data(key), Tag::Cancel.user_data(key))?;
        }
        Ok(in_flight == 0)
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        self.stopping = true;
        if self.accepting.armed {
            self.ring.cancel(Tag::Accept.user_data(NO_CONNECTION), Tag::Cancel.user_data(NO_CONNECTION))
        } else {
            self.listener = None;
            Ok(())
        }
    }

    fn pause_accepting(&mut self) {
        self.accepting.paused = true;
    }

    fn resume_accepting(&mut self) {
        self.accepting.paused = false;
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        self.arm_accept()?;
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
