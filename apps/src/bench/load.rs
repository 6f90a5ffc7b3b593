//! The bench's workloads against a [`sink`](super::sink), directly or through
//! a relay: bulk streams, request/response round trips, connection churn,
//! and idle connections held open. Each worker is a thread with blocking
//! sockets: the load generator must be simple enough to trust.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use socket2::Socket;
use vsock_relay_engine::Endpoint;

use super::sink::{COUNT, ECHO};
use crate::sample::client;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_BYTES: usize = 256 * 1024;

/// Where the load goes: an endpoint (the sink, or a relay before it), and
/// optionally an HTTP CONNECT tunnel through it (a routed proxy) to the sink.
#[derive(Clone, Debug)]
pub struct Dial {
    pub to: Endpoint,
    /// `HOST:PORT` asked for in a CONNECT head before any load byte.
    pub tunnel: Option<String>,
}

impl Dial {
    pub fn direct(to: &Endpoint) -> Dial {
        Dial { to: to.clone(), tunnel: None }
    }
}

impl std::fmt::Display for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tunnel {
            Some(tunnel) => write!(f, "{tunnel} (CONNECT through {})", self.to),
            None => self.to.fmt(f),
        }
    }
}

fn open(dial: &Dial, mode: u8) -> io::Result<Socket> {
    let mut stream = client::connect(&dial.to, CONNECT_TIMEOUT)?;
    if let Some(tunnel) = &dial.tunnel {
        // As a client does: the head, then wait for the tunnel to open.
        stream.write_all(format!("CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n\r\n").as_bytes())?;
        let mut head = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 || head.len() > 4096 {
                return Err(io::Error::other(format!("no tunnel: {}", String::from_utf8_lossy(&head))));
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            return Err(io::Error::other(format!("no tunnel: {}", String::from_utf8_lossy(&head).trim())));
        }
    }
    stream.write_all(&[mode])?;
    Ok(stream)
}

/// Runs `work(i)` on `threads` threads released together; the results in
/// order, and the wall time from release to the last one's end.
fn in_parallel<T: Send + 'static>(
    threads: usize,
    work: impl Fn(usize) -> anyhow::Result<T> + Send + Sync + 'static,
) -> anyhow::Result<(Vec<T>, Duration)> {
    let work = Arc::new(work);
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (work, start) = (Arc::clone(&work), Arc::clone(&start));
            std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                start.wait();
                work(i)
            })
        })
        .collect::<Result<_, _>>()
        .context("cannot start the load threads")?;
    start.wait();
    let started = Instant::now();
    let mut results = Vec::with_capacity(threads);
    for handle in handles {
        results.push(handle.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??);
    }
    Ok((results, started.elapsed()))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e6
        };
        Latency { p50_us: at(0.50), p99_us: at(0.99), max_us: at(1.0) }
    }
}

#[derive(Debug, Serialize)]
pub struct BulkResult {
    pub streams: usize,
    pub bytes_per_stream: u64,
    pub seconds: f64,
    pub total_gib_per_s: f64,
    pub per_stream_gib_per_s: Vec<f64>,
}

/// `streams` connections, each announcing and sending `bytes` and waiting
/// for the sink's count: throughput counts only bytes the far end confirmed.
pub fn bulk(to: &Dial, streams: usize, bytes: u64) -> anyhow::Result<BulkResult> {
    let to = to.clone();
    let (per_stream, took) = in_parallel(streams, move |_| {
        let started = Instant::now();
        let mut stream = open(&to, COUNT).with_context(|| format!("cannot connect to {to}"))?;
        stream.write_all(&bytes.to_le_bytes())?;
        let chunk = vec![0xa5u8; WRITE_BYTES];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(WRITE_BYTES as u64) as usize;
            stream.write_all(&chunk[..n]).context("send failed")?;
            left -= n as u64;
        }
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).context("the sink did not confirm")?;
        anyhow::ensure!(
            u64::from_le_bytes(count) == bytes,
            "the sink got {} of {bytes} bytes",
            u64::from_le_bytes(count)
        );
        Ok(started.elapsed())
    })?;
    let gib = |b: u64, t: Duration| b as f64 / (1u64 << 30) as f64 / t.as_secs_f64();
    Ok(BulkResult {
        streams,
        bytes_per_stream: bytes,
        seconds: took.as_secs_f64(),
        total_gib_per_s: gib(bytes * streams as u64, took),
        per_stream_gib_per_s: per_stream.into_iter().map(|t| gib(bytes, t)).collect(),
    })
}

#[derive(Debug, Serialize)]
pub struct RpcResult {
    pub connections: usize,
    pub requests_per_connection: usize,
    pub size: usize,
    pub requests_per_s: f64,
    pub latency: Latency,
    /// The slowest connection's wait for its first reply, from its connect
    /// attempt: a relay that queues connections behind busy threads shows
    /// here.
    pub first_reply_max_us: f64,
}

/// `connections` connections each doing `requests` round trips of `size`
/// bytes (write, then read the echo).
pub fn rpc(to: &Dial, connections: usize, requests: usize, size: usize) -> anyhow::Result<RpcResult> {
    let to = to.clone();
    let (results, took) = in_parallel(connections, move |_| {
        let opened = Instant::now();
        let mut stream = open(&to, ECHO).with_context(|| format!("cannot connect to {to}"))?;
        let (request, mut reply) = (vec![0x42u8; size], vec![0u8; size]);
        let mut samples = Vec::with_capacity(requests);
        let mut first_reply = None;
        for _ in 0..requests {
            let sent = Instant::now();
            stream.write_all(&request)?;
            stream.read_exact(&mut reply).context("no echo")?;
            samples.push(sent.elapsed());
            first_reply.get_or_insert_with(|| opened.elapsed());
        }
        Ok((first_reply.unwrap_or_default(), samples))
    })?;
    let first_reply_max = results.iter().map(|(first, _)| *first).max().unwrap_or_default();
    let samples = results.into_iter().map(|(_, samples)| samples);
    let total = connections * requests;
    Ok(RpcResult {
        connections,
        requests_per_connection: requests,
        size,
        requests_per_s: total as f64 / took.as_secs_f64(),
        latency: Latency::of(samples.flatten().collect()),
        first_reply_max_us: first_reply_max.as_secs_f64() * 1e6,
    })
}

#[derive(Debug, Serialize)]
pub struct ChurnResult {
    pub connections: usize,
    pub parallel: usize,
    pub connections_per_s: f64,
    /// Each connection from the connect call to its close.
    pub latency: Latency,
    /// Its parts: the connect call (the listener's kernel answers it, before
    /// any accept), the first round trip after it (through a relay: the
    /// accept, the upstream connect and both hops), and the close.
    pub connect: Latency,
    pub first_reply: Latency,
    pub close: Latency,
}

/// `connections` times: connect, exchange 64 bytes, close; `parallel` at a time.
pub fn churn(to: &Dial, connections: usize, parallel: usize) -> anyhow::Result<ChurnResult> {
    let to = to.clone();
    let (samples, took) = in_parallel(parallel, move |i| {
        let mine = connections / parallel + usize::from(i < connections % parallel);
        let mut samples = Vec::with_capacity(mine);
        let mut reply = [0u8; 64];
        for _ in 0..mine {
            let started = Instant::now();
            let mut stream = open(&to, ECHO).with_context(|| format!("cannot connect to {to}"))?;
            let connected = Instant::now();
            stream.write_all(&[0x17; 64])?;
            stream.read_exact(&mut reply).context("no echo")?;
            let replied = Instant::now();
            drop(stream);
            let closed = Instant::now();
            samples.push([closed - started, connected - started, replied - connected, closed - replied]);
        }
        Ok(samples)
    })?;
    let samples: Vec<[Duration; 4]> = samples.into_iter().flatten().collect();
    let part = |i: usize| Latency::of(samples.iter().map(|s| s[i]).collect());
    Ok(ChurnResult {
        connections,
        parallel,
        connections_per_s: connections as f64 / took.as_secs_f64(),
        latency: part(0),
        connect: part(1),
        first_reply: part(2),
        close: part(3),
    })
}

#[derive(Debug, Serialize)]
pub struct IdleResult {
    pub connections: usize,
    /// Connections that answered an echo end to end within the time limit.
    pub confirmed: usize,
    pub open_seconds: f64,
    /// New connections, opened while the idle ones were held, that got their
    /// echo within the time limit.
    pub new_served: usize,
    pub new_tried: usize,
}

/// Opens `connections` connections, confirms each end to end with a 1-byte
/// echo, holds them `hold`, and meanwhile checks that new connections are
/// served. Connections the far end does not confirm within `limit` count as
/// unconfirmed (a relay with a thread per connection serves few of them).
pub fn idle(to: &Dial, connections: usize, hold: Duration, limit: Duration) -> anyhow::Result<IdleResult> {
    let _ = vsock_relay_engine::raise_open_files_limit();
    let started = Instant::now();
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut stream =
            open(to, ECHO).with_context(|| format!("connection {i} of {connections} to {to}"))?;
        stream.write_all(b"?")?;
        held.push(stream);
    }
    let deadline = started + limit;
    let mut confirmed = 0;
    for stream in &mut held {
        if echoed(stream, deadline) {
            confirmed += 1;
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    eprintln!("idle: holding {connections} connections ({confirmed} confirmed) for {} s", hold.as_secs_f64());
    // Meanwhile, new connections must be served; three misses in a row
    // end the checks (a thread-per-connection relay would make each wait).
    let checks = 10u32;
    let hold_until = Instant::now() + hold;
    let (mut new_tried, mut new_served, mut misses) = (0, 0, 0);
    while new_tried < checks as usize && misses < 3 {
        new_tried += 1;
        let check_deadline = Instant::now() + Duration::from_secs(1);
        let served = open(to, ECHO)
            .is_ok_and(|mut stream| stream.write_all(b"!").is_ok() && echoed(&mut stream, check_deadline));
        if served {
            (new_served, misses) = (new_served + 1, 0);
        } else {
            misses += 1;
        }
        std::thread::sleep(hold / checks);
    }
    std::thread::sleep(hold_until.saturating_duration_since(Instant::now()));
    Ok(IdleResult { connections, confirmed, open_seconds, new_served, new_tried })
}

#[derive(Debug, Serialize)]
pub struct BurstResult {
    pub connections: usize,
    /// Connections that got their 1-byte echo within the time limit.
    pub served: usize,
    pub failed: usize,
    /// Failed connections by cause: the step that failed (`connect`,
    /// `send`, `echo`) and the error, e.g. `connect: Connection refused
    /// (os error 111)`, `echo: closed before the echo`, `echo: none within
    /// the limit`.
    pub failures: BTreeMap<String, usize>,
    /// From the release of every connection until the last served one got
    /// its echo: the time to serve the whole burst.
    pub all_served_seconds: f64,
    /// Each served connection, from its connect call to its echo.
    pub latency: Option<Latency>,
}

/// `connections` connections opened at once (a thread each, released
/// together): each connects, sends one byte, waits for its echo and closes.
/// Every connection ends served or failed with a cause, never the run:
/// a relay that drops part of a burst shows as counts, not as an error.
pub fn burst(to: &Dial, connections: usize, limit: Duration) -> anyhow::Result<BurstResult> {
    let _ = vsock_relay_engine::raise_open_files_limit();
    let to = to.clone();
    let (outcomes, _) = in_parallel(connections, move |_| {
        let started = Instant::now();
        let failed = |step: &str, e: &io::Error| -> Result<Duration, String> {
            Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("{step}: none within the limit")
                }
                io::ErrorKind::UnexpectedEof => format!("{step}: closed before the echo"),
                _ if e.raw_os_error().is_some() => format!("{step}: {e}"),
                kind => format!("{step}: {kind}"),
            })
        };
        let mut stream = match open(&to, ECHO) {
            Ok(stream) => stream,
            Err(e) => return Ok(failed("connect", &e)),
        };
        if let Err(e) = stream.write_all(b"!") {
            return Ok(failed("send", &e));
        }
        let left = (started + limit).saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut byte = [0u8; 1];
        let echoed = stream.set_read_timeout(Some(left)).and_then(|()| stream.read_exact(&mut byte));
        Ok(match echoed {
            Ok(()) => Ok(started.elapsed()),
            Err(e) => failed("echo", &e),
        })
    })?;
    let mut failures = BTreeMap::new();
    let mut served = Vec::with_capacity(connections);
    for outcome in outcomes {
        match outcome {
            Ok(took) => served.push(took),
            Err(cause) => *failures.entry(cause).or_insert(0) += 1,
        }
    }
    Ok(BurstResult {
        connections,
        served: served.len(),
        failed: connections - served.len(),
        failures,
        all_served_seconds: served.iter().max().copied().unwrap_or_default().as_secs_f64(),
        latency: (!served.is_empty()).then(|| Latency::of(served)),
    })
}

/// Whether one echoed byte comes back before `deadline` (past it: whether
/// it is there already).
fn echoed(stream: &mut Socket, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let ready =
        if left.is_zero() { stream.set_nonblocking(true) } else { stream.set_read_timeout(Some(left)) };
    let mut byte = [0u8; 1];
    let got = ready.is_ok() && matches!(stream.read(&mut byte), Ok(1));
    let _ = stream.set_nonblocking(false);
    got
}
