//! One direction of a relayed connection: move bytes from a source socket to
//! a destination socket until the source says EOF, then pass the EOF on as
//! `shutdown(SHUT_WR)` (half-close).
//!
//! The pump is readiness-driven and backend-neutral: it makes non-blocking
//! system calls until one would block and then says what to wait for. The
//! backends only wait.
//!
//! Rules it keeps:
//! - It reads only into an empty pipe or buffer, and reads again only after
//!   the destination took everything: memory per direction is one pipe (or
//!   one buffer) at most, and only while data is in flight.
//! - Because the pipe is empty before each read, EAGAIN from the read means
//!   "source empty", never "pipe full" (which would make a read poll spin).
//! - Splice refused on the source's family (EINVAL: vsock before Linux 5.0)
//!   switches this direction to copying, once, without losing a byte.
//! - On the adaptive path (`Auto` from vsock) a direction copies while
//!   messages are small and splices while the source streams, switching on
//!   the size of each read.

use std::io::{self, Read};
use std::os::fd::AsFd;

use socket2::Socket;

use super::half_close::HalfClose;
use crate::error::{ConnError, Op, Side};
use crate::pool::{Buffer, Pipe, Pools};
use crate::vocab::{DataPath, Trigger, Wait};

/// On the adaptive path (`Auto` from vsock): a read of at least this many
/// bytes means the source streams (splice from then on); a splice of fewer
/// means small messages again (copy from then on).
const STREAMING_BYTES: usize = 32 * 1024;

/// Bytes one run may move before it yields, so that one bulk stream cannot
/// starve the other connections of its worker.
const RUN_BUDGET_BYTES: u64 = 8 << 20;

/// Length asked for per socket -> pipe splice: larger than any pipe, because
/// a pipe's capacity counts page slots, not bytes, and the kernel stops at
/// whichever comes first.
const SPLICE_REQUEST_BYTES: usize = 1 << 30;

#[derive(Debug)]
enum Held {
    Nothing,
    /// A pipe holding `pending` bytes not yet written.
    Pipe {
        pipe: Pipe,
        pending: usize,
    },
    /// A buffer whose bytes `start..end` are not yet written.
    Buffer {
        buffer: Buffer,
        start: usize,
        end: usize,
    },
}

/// One direction's state.
#[derive(Debug)]
pub struct Pump {
    from: Side,
    to: Side,
    path: DataPath,
    held: Held,
    /// Splice, rather than copy: always on `Splice`, never on `Copy`, and on
    /// `Auto` while the source streams.
    streaming: bool,
    /// The last read returned less than the buffer holds: the socket had
    /// nothing more then. (Not known for splice: a pipe may fill its slots
    /// with small packets before its bytes.)
    drained: bool,
    pub half_close: HalfClose,
    /// Bytes delivered to the destination so far.
    pub bytes: u64,
    /// Test seam: act as if the source's family refused splice (as vsock
    /// does before Linux 5.0), which no socket on the test host does.
    #[cfg(test)]
    refuse_splice: bool,
}

fn is_splice_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS))
}

/// The process (EMFILE) or the system (ENFILE) has no descriptor left.
fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Pump {
    /// A pump moving bytes `from` one side `to` the other by `path`
    /// (resolved with [`DataPath::for_direction`]; `Auto` adapts: it copies
    /// small messages and splices streams; `Ring` copies here).
    pub fn new(from: Side, to: Side, path: DataPath) -> Self {
        Pump {
            from,
            to,
            path,
            held: Held::Nothing,
            streaming: path == DataPath::Splice,
            drained: false,
            half_close: HalfClose::new(),
            bytes: 0,
            #[cfg(test)]
            refuse_splice: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.half_close.is_finished()
    }

    #[cfg(test)]
    pub fn path(&self) -> DataPath {
        self.path
    }

    /// Moves bytes until a call would block, EOF is passed on, or the budget
    /// is spent, readiness being reported as `trigger` says. Returns what to
    /// wait for and the bytes moved in this run.
    pub fn run(
        &mut self,
        src: &Socket,
        dst: &Socket,
        pools: &mut Pools,
        trigger: Trigger,
    ) -> Result<(Wait, u64), ConnError> {
        let mut moved = 0u64;
        loop {
            match self.flush(dst) {
                Ok(0) => {}
                Ok(n) => {
                    moved += n as u64;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Wait::Writable, moved)),
                Err(e) => return Err(ConnError::new(self.to, Op::Write, e)),
            }
            // Everything read so far is delivered.
            self.release(pools);
            if self.half_close.delivered(dst, self.to)? {
                return Ok((Wait::Finished, moved));
            }
            if moved >= RUN_BUDGET_BYTES {
                return Ok((Wait::Yield, moved));
            }
            // A read that did not fill the buffer emptied the socket of
            // bytes: with level-triggered readiness (io_uring polls), wait
            // rather than ask again; an EOF queued behind the bytes shows as
            // readable at once. Edge-triggered epoll would not report that
            // EOF again, so there the pump reads until the socket says so.
            if std::mem::take(&mut self.drained) && trigger == Trigger::Level {
                return Ok((Wait::Readable, moved));
            }
            match self.fill(src, pools) {
                Ok(0) => self.half_close.source_ended(),
                // A vsock socket whose peer closed can answer ENOTCONN
                // instead of 0: the same end of stream.
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => self.half_close.source_ended(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release(pools);
                    return Ok((Wait::Readable, moved));
                }
                Err(e) if self.streaming && is_splice_unsupported(&e) => {
                    tracing::debug!(from = %self.from, error = %e, "splice refused; this direction copies");
                    self.release(pools);
                    self.path = DataPath::Copy;
                    self.streaming = false;
                }
                Err(e) => {
                    self.release(pools);
                    return Err(ConnError::new(self.from, Op::Read, e));
                }
            }
        }
    }

    /// Writes held bytes to the destination; `Ok(0)` when nothing is held.
    fn flush(&mut self, dst: &Socket) -> io::Result<usize> {
        let n = match &mut self.held {
            Held::Pipe { pipe, pending } if *pending > 0 => {
                let n = pipe.drain_to(dst.as_fd(), *pending)?;
                *pending -= n;
                n
            }
            Held::Buffer { buffer, start, end } if *start < *end => {
                let n = dst.send_with_flags(&buffer[*start..*end], libc::MSG_NOSIGNAL)?;
                *start += n;
                n
            }
            _ => return Ok(0),
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "destination accepted no bytes"));
        }
        self.bytes += n as u64;
        Ok(n)
    }

    /// Reads from the source into an empty pipe or buffer. Where no pipe
    /// can be made for want of descriptors, this read copies (a buffer takes
    /// none); the next one tries a pipe again.
    fn fill(&mut self, src: &Socket, pools: &mut Pools) -> io::Result<usize> {
        if matches!(self.path, DataPath::Splice | DataPath::Auto) && self.streaming {
            #[cfg(test)]
            if self.refuse_splice {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let pipe = match std::mem::replace(&mut self.held, Held::Nothing) {
                Held::Pipe { pipe, .. } => Ok(pipe),
                _ => pools.take_pipe(),
            };
            match pipe {
                Ok(pipe) => return self.splice_into(pipe, src),
                Err(e) if is_out_of_descriptors(&e) => {
                    tracing::debug!(from = %self.from, error = %e, "no pipe; this read copies");
                }
                Err(e) => return Err(e),
            }
        }
        let mut buffer = match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Buffer { buffer, .. } => buffer,
            _ => pools.take_buffer(),
        };
        let result = (&*src).read(&mut buffer);
        let end = *result.as_ref().unwrap_or(&0);
        self.drained = end > 0 && end < buffer.len();
        self.held = Held::Buffer { buffer, start: 0, end };
        if self.path == DataPath::Auto && end >= STREAMING_BYTES {
            self.streaming = true;
        }
        result
    }

    /// Splices from the source into `pipe`, which this direction then holds.
    fn splice_into(&mut self, pipe: Pipe, src: &Socket) -> io::Result<usize> {
        let result = pipe.fill_from(src.as_fd(), SPLICE_REQUEST_BYTES);
        let pending = *result.as_ref().unwrap_or(&0);
        self.held = Held::Pipe { pipe, pending };
        if self.path == DataPath::Auto && pending > 0 && pending < STREAMING_BYTES {
            self.streaming = false;
        }
        result
    }

    /// Gives an empty pipe or buffer back to the pool. One still holding
    /// bytes is kept (or, at close, dropped with them).
    pub fn release(&mut self, pools: &mut Pools) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Pipe { pipe, pending: 0 } => pools.give_pipe(pipe),
            Held::Buffer { buffer, start, end } if start == end => pools.give_buffer(buffer),
            Held::Nothing => {}
            other => self.held = other,
        }
    }

    /// Bytes read from the source and not yet written.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        match &self.held {
            Held::Nothing => 0,
            Held::Pipe { pending, .. } => *pending,
            Held::Buffer { start, end, .. } => end - start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Socket, UnixStream) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        a.set_nonblocking(true).unwrap();
        (a, UnixStream::from(std::os::fd::OwnedFd::from(b)))
    }

    fn relays_and_half_closes(path: DataPath) {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(64 * 1024, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, path);

        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap().0, Wait::Readable);
        let idle = if path == DataPath::Splice { (1, 0) } else { (0, 1) };
        assert_eq!(pools.idle(), idle, "an idle direction gave its pipe or buffer back");
        src_peer.write_all(b"hello relay").unwrap();
        let (wait, moved) = pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap();
        assert_eq!((wait, moved), (Wait::Readable, 11));
        assert_eq!(pump.pending(), 0);
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap().0, Wait::Finished);
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello relay");
        assert_eq!(pump.bytes, 11);
    }

    #[test]
    fn splice_path_relays_and_half_closes() {
        relays_and_half_closes(DataPath::Splice);
    }

    #[test]
    fn copy_path_relays_and_half_closes() {
        relays_and_half_closes(DataPath::Copy);
    }

    #[test]
    fn adaptive_path_copies_small_messages_and_splices_streams() {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(64 * 1024, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Auto);
        src_peer.write_all(b"small").unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 5));
        assert!(!pump.drained, "waits after a short read without reading again");
        assert_eq!((pump.streaming, pools.idle()), (false, (0, 1)), "a small message is copied");
        src_peer.write_all(&[7u8; 100 * 1024]).unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 100 * 1024));
        assert!(pump.streaming, "a large read means the source streams");
        src_peer.write_all(b"tiny").unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 4));
        assert_eq!((pump.streaming, pools.idle()), (false, (1, 1)), "a small splice goes back to copying");
        src_peer.write_all(b"again").unwrap();
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 5));
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Finished, 0));
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).unwrap();
        let mut expected = b"small".to_vec();
        expected.extend_from_slice(&[7u8; 100 * 1024]);
        expected.extend_from_slice(b"tinyagain");
        assert_eq!(got, expected);
    }

    #[test]
    fn edge_triggered_pump_reads_the_eof_behind_a_short_read() {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(0, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Copy);
        src_peer.write_all(b"last words").unwrap();
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        // No edge will report that EOF again: it must be read in this run.
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Edge).unwrap(), (Wait::Finished, 10));
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
    }

    #[test]
    fn refused_splice_switches_the_direction_to_copy_without_losing_bytes() {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(0, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Splice);
        pump.refuse_splice = true;
        src_peer.write_all(b"first bytes").unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 11));
        assert_eq!(pump.path(), DataPath::Copy);
        src_peer.write_all(b", then more").unwrap();
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        // The short read emptied the socket; the EOF comes with the next run.
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 11));
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap().0, Wait::Finished);
        let mut got = String::new();
        dst_peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, "first bytes, then more");
        assert_eq!(pools.idle(), (0, 1), "no pipe was taken; the copy buffer went back");
    }

    /// No descriptor for a pipe (EMFILE): the direction copies this read
    /// instead of failing the connection, and splices again once pipes can
    /// be made.
    /// Catches: the pipe's EMFILE ending the connection (counted as the
    /// client's failure, as it was before).
    #[test]
    fn no_descriptor_for_a_pipe_copies_instead() {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(64 * 1024, 4);
        pools.refuse_pipes = true;
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Splice);
        src_peer.write_all(b"no pipe").unwrap();
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Readable, 7));
        assert_eq!((pump.path(), pools.idle()), (DataPath::Splice, (0, 1)), "copied, still a splice path");
        pools.refuse_pipes = false;
        src_peer.write_all(b", then a pipe").unwrap();
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        // A splice's length says nothing of the socket being empty: the
        // pump reads on, to the EOF.
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap(), (Wait::Finished, 13));
        assert_eq!(pools.idle(), (1, 1), "spliced through a pipe this time");
        let mut got = String::new();
        dst_peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, "no pipe, then a pipe");
    }

    #[test]
    fn full_destination_waits_for_writable_and_keeps_the_bytes() {
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        let mut pools = Pools::new(1 << 20, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Splice);
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            src_peer.write_all(&data).unwrap();
            data
        });
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut saw_writable = false;
        let mut rounds = 0;
        while received.len() < 4 << 20 {
            rounds += 1;
            assert!(rounds < 1_000_000, "stuck at {} bytes, pending {}", received.len(), pump.pending());
            let (wait, _) = pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap();
            if wait == Wait::Writable {
                saw_writable = true;
                assert!(pump.pending() > 0, "a full destination leaves bytes held");
            }
            // Drain only once the destination has filled up.
            if saw_writable {
                dst_peer.set_nonblocking(true).unwrap();
                while let Ok(n @ 1..) = dst_peer.read(&mut chunk) {
                    received.extend_from_slice(&chunk[..n]);
                }
            }
        }
        assert_eq!(received, writer.join().unwrap());
    }

    #[test]
    fn closed_source_finishes_and_gives_its_pipe_back() {
        let (src, src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        drop(src_peer);
        let mut pools = Pools::new(0, 4);
        let mut pump = Pump::new(Side::Client, Side::Upstream, DataPath::Splice);
        assert_eq!(pump.run(&src, &dst, &mut pools, Trigger::Level).unwrap().0, Wait::Finished);
        assert!(pump.is_finished());
        assert_eq!(pools.idle(), (1, 0), "the pipe went back to the pool");
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
    }
}
