//! The workshop's sample enclave server: a client sends a region name, the
//! server answers with the S3 prefixes of that region from AWS's
//! ip-ranges.json, fetched over HTTPS through the forwarder and the parent's
//! vsock-proxy, then closes. One thread per client: a query is one small
//! request and one small reply, so the relay engine is not needed here.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use socket2::Socket;
use vsock_relay_engine::socket::{self, SocketOptions};
use vsock_relay_engine::{proxy_header, Endpoint};

use crate::relay::options::parse_seconds;
use crate::sample::ipranges::{self, Source, SourceSettings};

/// The workshop's server port.
pub const DEFAULT_PORT: u32 = 5005;

/// A query is the client's first message; region names are short.
const MAX_QUERY_BYTES: usize = 1024;

/// The longest PROXY protocol header read: a v2 header with TCP addresses
/// is 28 or 52 bytes; room for a few extensions (TLVs).
const MAX_PROXY_HEADER_BYTES: usize = 512;

/// How long a client may take to send its query, and to read the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server reads and discards after its reply, at most.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// Clients served at once; more get a "busy" reply instead of a thread.
const MAX_CLIENTS: usize = 1024;

/// `vsock-relay serve`'s options.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// vsock port to listen on, any CID (default 5005); or use --listen.
    #[arg(value_name = "PORT", conflicts_with = "listen")]
    pub port: Option<u32>,

    /// Where to listen: any endpoint.
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Option<Endpoint>,

    /// The document to fetch (an https URL).
    #[arg(long, default_value = ipranges::DEFAULT_URL, value_name = "URL")]
    pub url: String,

    /// Also trust the CA certificates in this PEM file (besides the public
    /// roots built in).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// Keep a fetched document this many seconds before fetching it again.
    /// While a refetch runs or fails, every client gets the last good copy;
    /// after a failure the next fetch waits 5 s, doubling while failures go
    /// on (up to 5 min).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub cache_seconds: f64,

    /// Give up on a fetch after this many seconds (the waiting clients get
    /// an error line).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub fetch_timeout: f64,

    /// Fetch through this proxy: `http://HOST:PORT` (HTTP CONNECT) or
    /// `socks5h://HOST:PORT` (names resolved by the proxy), e.g. the
    /// enclave's forwarder to the parent's `vsock-relay proxy --route`.
    /// Without it, no proxy is used (proxy variables of the environment
    /// are ignored).
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,

    /// Expect a PROXY protocol v2 header first on each connection (sent by
    /// a relay with --proxy-protocol v2) and log the client address it
    /// carries; a connection without one is refused.
    #[arg(long)]
    pub proxy_protocol: bool,
}

impl ServeArgs {
    /// Serves until SIGINT or SIGTERM.
    pub fn run(self) -> anyhow::Result<()> {
        let listen = self.listen();
        let proxy_protocol = self.proxy_protocol;
        let server = Server::start_with(&listen, Source::new(self.source_settings())?, proxy_protocol)?;
        crate::relay::run::serve_until_signal(server.local_endpoint())
    }

    /// `--listen`, else vsock `PORT` (default 5005) on any CID.
    pub fn listen(&self) -> Endpoint {
        self.listen.clone().unwrap_or(Endpoint::vsock(
            vsock_relay_engine::endpoint::VSOCK_CID_ANY,
            self.port.unwrap_or(DEFAULT_PORT),
        ))
    }

    pub fn source_settings(self) -> SourceSettings {
        SourceSettings {
            url: self.url,
            ca_file: self.ca_file,
            timeout: Duration::from_secs_f64(self.fetch_timeout),
            cache_for: Duration::from_secs_f64(self.cache_seconds),
            proxy: self.proxy,
        }
    }
}

/// A running server. It serves until the process exits.
pub struct Server {
    local: Endpoint,
}

impl Server {
    /// Listens on `listen` and serves every client on a thread of its own.
    pub fn start(listen: &Endpoint, source: Source) -> anyhow::Result<Server> {
        Server::start_with(listen, source, false)
    }

    /// [`Server::start`]; with `proxy_protocol`, each client's connection
    /// starts with a PROXY protocol v2 header.
    pub fn start_with(listen: &Endpoint, source: Source, proxy_protocol: bool) -> anyhow::Result<Server> {
        let listener = socket::listen(listen, &SocketOptions::default())
            .with_context(|| format!("cannot listen on {listen}"))?;
        listener.set_nonblocking(false)?;
        let local = socket::local_endpoint(&listener, listen)?;
        let source = Arc::new(source);
        tracing::info!(listen = %local, url = %source.url(), "serving S3 prefixes by region");
        std::thread::Builder::new()
            .name("serve-accept".into())
            .spawn(move || accept_loop(&listener, &source, proxy_protocol))
            .context("cannot start the accept thread")?;
        Ok(Server { local })
    }

    /// The endpoint the server listens on (the real port after port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }
}

fn accept_loop(listener: &Socket, source: &Arc<Source>, proxy_protocol: bool) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of file descriptors or memory: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = socket::describe(&peer);
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "too many clients; refusing one");
            // No wait for the client here: the accept loop must go on.
            let _ = (&client).write_all(b"error: server busy, try again");
            continue;
        }
        let (source, active_now) = (Arc::clone(source), Arc::clone(&active));
        let spawned = std::thread::Builder::new().name("serve-client".into()).spawn(move || {
            if let Err(e) = serve_one(client, &source, &peer, proxy_protocol) {
                tracing::debug!(%peer, error = %e, "client went away");
            }
            active_now.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start a client thread");
        }
    }
}

/// Reads one query, answers it, closes.
fn serve_one(mut client: Socket, source: &Source, peer: &str, proxy_protocol: bool) -> io::Result<()> {
    client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = [0u8; MAX_PROXY_HEADER_BYTES + MAX_QUERY_BYTES];
    // The workshop's client sends once and waits without closing its write
    // side, so the query is what the first read returns (after the PROXY
    // header, if one is expected).
    let first = if proxy_protocol { MAX_PROXY_HEADER_BYTES } else { MAX_QUERY_BYTES };
    let mut n = client.read(&mut buf[..first])?;
    let mut start = 0;
    let mut peer = peer.to_string();
    if proxy_protocol {
        let header = loop {
            match proxy_header::parse(&buf[..n]) {
                Ok(Some(header)) => break header,
                Ok(None) if n < MAX_PROXY_HEADER_BYTES => {
                    match client.read(&mut buf[n..MAX_PROXY_HEADER_BYTES])? {
                        0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                        more => n += more,
                    }
                }
                Ok(None) => {
                    return finish(client, "error: a PROXY protocol header longer than this server reads")
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "refused: --proxy-protocol expects a PROXY protocol v2 header first");
                    return finish(client, &format!("error: {e} (this server expects one first)"));
                }
            }
        };
        if let Some((client_address, _)) = header.addresses {
            tracing::info!(relay = %peer, client = %client_address, "client address from the PROXY protocol header");
            peer = format!("tcp:{client_address}");
        }
        start = header.length;
        if start == n {
            let end = buf.len().min(n + MAX_QUERY_BYTES);
            n += client.read(&mut buf[n..end])?;
        }
    }
    let query = String::from_utf8_lossy(&buf[start..n]);
    let region = query.trim();
    let answer = if region.is_empty() {
        "error: empty query: send a region name such as us-east-1".to_string()
    } else {
        match source.get() {
            Ok(prefixes) => {
                let found = prefixes.region(region);
                tracing::info!(peer = %peer, region = %region.escape_debug(), prefixes = found.len(), "answered");
                ipranges::reply(found)
            }
            Err(error) => {
                tracing::warn!(%peer, region = %region.escape_debug(), %error, "cannot answer");
                format!("error: {error}")
            }
        }
    };
    finish(client, &answer)
}

/// Sends the reply, signals its end, and waits for the client to close, so
/// that unread query bytes cannot turn the close into a reset that would
/// destroy the reply in flight.
fn finish(mut client: Socket, answer: &str) -> io::Result<()> {
    client.write_all(answer.as_bytes())?;
    client.shutdown(Shutdown::Write)?;
    // Bounded in time and bytes: a client that keeps sending cannot keep
    // the thread.
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_DRAIN_BYTES {
        match client.read(&mut sink)? {
            0 => break,
            n => drained += n,
        }
    }
    Ok(())
}
