//! The workshop's sample client, on the parent: sends a query to the
//! enclave's server, reads the reply to its end (the workshop's client
//! stopped at 1 KiB), and tells an answer from an error reply.

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use socket2::Socket;
use vsock_relay_engine::hint::{self, Step};
use vsock_relay_engine::socket::{self, SocketOptions};
use vsock_relay_engine::Endpoint;

use crate::relay::options::{parse_seconds, UsageError};

/// `vsock-relay client`'s options.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// CID PORT QUERY (the workshop's order), or only QUERY with --to.
    #[arg(value_name = "CID PORT QUERY", num_args = 1..=3, required = true)]
    pub args: Vec<String>,

    /// Where the server listens, any endpoint (then give only QUERY).
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Option<Endpoint>,

    /// Give up when the whole reply has not come within this many seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: f64,
}

impl ClientArgs {
    /// The server's endpoint and the query, from `CID PORT QUERY` or `--to`.
    fn target(self) -> Result<(Endpoint, String), UsageError> {
        match (self.args.as_slice(), self.to) {
            ([query], Some(to)) => Ok((to, query.clone())),
            ([cid, port, query], None) => {
                let cid = cid.parse().map_err(|_| UsageError(format!("`{cid}` is not a vsock CID")))?;
                let port = port.parse().map_err(|_| UsageError(format!("`{port}` is not a vsock port")))?;
                Ok((Endpoint::vsock(cid, port), query.clone()))
            }
            (_, Some(_)) => Err(UsageError("with --to, give only QUERY".into())),
            (_, None) => Err(UsageError("expected CID PORT QUERY, or --to ENDPOINT QUERY".into())),
        }
    }

    /// Asks, prints the answer; exit 1 on an error reply.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let timeout = Duration::from_secs_f64(self.timeout);
        let (to, query) = self.target()?;
        match ask(&to, &query, timeout)? {
            Reply::Answer(answer) => {
                // A closed stdout (`| head`) is not the client's failure.
                let _ = writeln!(std::io::stdout(), "{answer}");
                Ok(ExitCode::SUCCESS)
            }
            Reply::ServerError(error) => {
                eprintln!("vsock-relay client: error from the server: {error}");
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// A reply larger than this is not from the sample server.
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// What the server said.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer (a JSON list of prefixes, `[]` when none).
    Answer(String),
    /// The server's one-line error, without its `error: ` tag.
    ServerError(String),
}

/// Why there is no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {to}: {source}")]
    Connect { to: Endpoint, source: io::Error },
    #[error("no complete reply from {to} within {} s", .timeout.as_secs_f64())]
    Timeout { to: Endpoint, timeout: Duration },
    #[error("connection to {to} failed: {source}")]
    Io { to: Endpoint, source: io::Error },
    #[error("{to} closed the connection without a reply")]
    NoReply { to: Endpoint },
    #[error("reply from {to} is larger than {MAX_REPLY_BYTES} bytes")]
    TooLarge { to: Endpoint },
}

/// A blocking connection to `to`, tuned like the relay's sockets (TCP_NODELAY,
/// the vsock buffer size). The connect waits at most `timeout` (TCP, Unix;
/// vsock has its own connect timeout of 2 s).
pub fn connect(to: &Endpoint, timeout: Duration) -> io::Result<Socket> {
    try_connect(to, timeout).map_err(|e| hint::with_hint(Step::Connect, to, e))
}

fn try_connect(to: &Endpoint, timeout: Duration) -> io::Result<Socket> {
    let addr = socket::sockaddr(to)?;
    let options = SocketOptions::default();
    let stream = socket::socket_for(&addr, &options)?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.connect(&addr)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Sends `query` once, without closing the write side (as the workshop's
/// client does), and reads the reply until the server closes.
pub fn ask(to: &Endpoint, query: &str, timeout: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let stream = connect(to, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout { to: to.clone(), timeout }
        }
        _ => ClientError::Connect { to: to.clone(), source: e },
    })?;

    let failed = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout { to: to.clone(), timeout }
        }
        _ => ClientError::Io { to: to.clone(), source },
    };
    let mut stream = stream;
    stream.write_all(query.as_bytes()).map_err(failed)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout { to: to.clone(), timeout });
        }
        stream.set_read_timeout(Some(left)).map_err(failed)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
        }
        if reply.len() as u64 > MAX_REPLY_BYTES {
            return Err(ClientError::TooLarge { to: to.clone() });
        }
    }
    if reply.is_empty() {
        return Err(ClientError::NoReply { to: to.clone() });
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    Ok(match text.strip_prefix("error:") {
        Some(error) => Reply::ServerError(error.trim().to_string()),
        None => Reply::Answer(text),
    })
}
