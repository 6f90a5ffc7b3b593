//! Typed errors. Engine errors say what was being done and, for a relayed
//! connection, which side failed: the client (who connected to us) or the
//! upstream (whom we connected to).

use std::fmt;
use std::io;

use crate::dns::DnsError;
use crate::driver::ring::Unavailable;
use crate::endpoint::Endpoint;

/// The two sides of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The peer that connected to the relay's listener.
    Client,
    /// The target the relay connected to on the client's behalf.
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// What the relay was doing on a side when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Connect,
    Shutdown,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Connect => "connect",
            Op::Shutdown => "shutdown",
        })
    }
}

/// A failure of one relayed connection. It ends that connection only.
#[derive(Debug, thiserror::Error)]
#[error("{side} {op} failed: {source}")]
pub struct ConnError {
    pub side: Side,
    pub op: Op,
    #[source]
    pub source: io::Error,
}

impl ConnError {
    pub fn new(side: Side, op: Op, source: io::Error) -> Self {
        ConnError { side, op, source }
    }
}

/// A failure that stops the relay (or keeps it from starting).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be set up.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    /// `allow_cids` was given for a listener that is not vsock.
    #[error("--allow-cid applies to vsock listeners only, not {0}")]
    AllowCidNeedsVsock(Endpoint),
    /// A name could not be resolved (at start; later failures only warn).
    #[error("cannot resolve `{name}`: {source}")]
    Resolve {
        name: String,
        #[source]
        source: DnsError,
    },
    /// The io_uring backend was asked for but cannot run here.
    #[error("the io_uring backend is unavailable: {0}")]
    UringUnavailable(Unavailable),
    /// A worker's event loop failed.
    #[error("worker {worker} failed: {source}")]
    Worker {
        worker: usize,
        #[source]
        source: io::Error,
    },
    /// A resource the relay needs at start (thread, eventfd) was refused.
    #[error("cannot start the relay: {0}")]
    Start(#[source] io::Error),
    /// A relay with no service.
    #[error("invalid relay configuration: no service to relay")]
    NoService,
    /// The connect timeout is zero: every connect would fail at once.
    #[error("invalid relay configuration: the connect timeout must be more than zero")]
    ZeroConnectTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_error_names_side_and_operation() {
        let err =
            ConnError::new(Side::Upstream, Op::Connect, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(err.to_string(), "upstream connect failed: connection refused");
        let err = ConnError::new(Side::Client, Op::Read, io::Error::from_raw_os_error(libc::ECONNRESET));
        assert!(err.to_string().starts_with("client read failed: Connection reset by peer"));
    }
}
