//! How one direction ends, for both movers (the readiness pump and the ring
//! pump): its stage, the one place the stage changes, and the one place EOF
//! is passed on to the destination.
//!
//! A direction is `Open` until its source says EOF, `Draining` while bytes
//! read before the EOF are still to be delivered, and `Finished` once they
//! are and the EOF was passed on: with `shutdown(SHUT_WR)` (a half-close:
//! the other direction goes on), or not at all when the other direction had
//! already finished, since the connection then closes both sockets at once
//! and the close ends the stream (on vsock, one packet instead of two).

use std::io;
use std::net::Shutdown;

use socket2::Socket;

use crate::error::{ConnError, Op, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Open,
    Draining,
    Finished,
}

/// What moves a direction's stage on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The source said EOF (a read of 0, or ENOTCONN on vsock).
    SourceEnded,
    /// Everything read was delivered after the EOF.
    Delivered,
}

#[derive(Debug)]
pub struct HalfClose {
    stage: Stage,
    /// Pass the EOF on with `shutdown(SHUT_WR)`.
    shutdown: bool,
}

impl HalfClose {
    pub fn new() -> Self {
        HalfClose { stage: Stage::Open, shutdown: true }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    pub fn is_finished(&self) -> bool {
        self.stage == Stage::Finished
    }

    /// The other direction finished: this one's EOF ends the connection,
    /// which closes both sockets; no shutdown first.
    pub fn end_with_close(&mut self) {
        self.shutdown = false;
    }

    /// The source said EOF.
    pub fn source_ended(&mut self) {
        self.step(Step::SourceEnded);
    }

    /// Everything read is delivered: if the source ended, pass the EOF on to
    /// `dst` (the `to` side) and finish. Returns whether the direction is
    /// finished.
    pub fn delivered(&mut self, dst: &Socket, to: Side) -> Result<bool, ConnError> {
        if self.stage != Stage::Draining {
            return Ok(self.is_finished());
        }
        self.step(Step::Delivered);
        if !self.shutdown {
            return Ok(true);
        }
        match dst.shutdown(Shutdown::Write) {
            // The destination already went away entirely: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(true),
            Err(e) => Err(ConnError::new(to, Op::Shutdown, e)),
            Ok(()) => Ok(true),
        }
    }

    /// The one match of the stage's transitions.
    fn step(&mut self, step: Step) {
        self.stage = match (self.stage, step) {
            (Stage::Open, Step::SourceEnded) => Stage::Draining,
            (Stage::Draining, Step::Delivered) => Stage::Finished,
            // A second EOF, or a delivery with no EOF yet: no change.
            (stage, _) => stage,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};
    use std::io::Read;

    #[test]
    fn stages_go_open_draining_finished_and_shutdown_passes_eof_on() {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        let mut half = HalfClose::new();
        assert!(!half.delivered(&ours, Side::Upstream).unwrap(), "no EOF yet");
        assert_eq!(half.stage(), Stage::Open);
        half.source_ended();
        half.source_ended();
        assert_eq!(half.stage(), Stage::Draining);
        assert!(half.delivered(&ours, Side::Upstream).unwrap());
        assert_eq!(half.stage(), Stage::Finished);
        let mut rest = Vec::new();
        (&theirs).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the peer saw EOF");
    }

    #[test]
    fn ending_with_close_sends_no_shutdown() {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut half = HalfClose::new();
        half.end_with_close();
        half.source_ended();
        assert!(half.delivered(&ours, Side::Client).unwrap());
        let error = (&theirs).read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "no EOF before the close");
    }
}
