//! The soak's clients: connections of six kinds (and the bursts of the
//! chaos schedule), each through the forwarder's fixed port or its routed
//! (HTTP CONNECT) port, every byte compared with the seeded stream it should
//! be and hashed both ways. Each connection leaves one [`Record`].

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::soak::upstream::Header;
use crate::traffic::{Data, Rng};

/// A client gives up on a read or write that makes no progress this long.
const STUCK: Duration = Duration::from_secs(60);

/// What a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Megabytes echoed, both directions at once.
    Bulk,
    /// Round trips of small requests.
    Rpc,
    /// Connect, 64 bytes there and back, close.
    Churn,
    /// Connect, hold 5-30 s silent, one byte there and back.
    Idle,
    /// Send, half-close, and only then read the server's reply.
    HalfClose,
    /// A megabyte or two of reply read in small slow reads.
    SlowReader,
    /// Part of a descriptor-exhaustion burst of the chaos schedule.
    Burst,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::Bulk, Kind::Rpc, Kind::Churn, Kind::Idle, Kind::HalfClose, Kind::SlowReader, Kind::Burst];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Bulk => "bulk",
            Kind::Rpc => "rpc",
            Kind::Churn => "churn",
            Kind::Idle => "idle",
            Kind::HalfClose => "half_close",
            Kind::SlowReader => "slow_reader",
            Kind::Burst => "burst",
        }
    }
}

/// How a client ended its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte back as expected, then the end of stream.
    Complete,
    /// Fewer bytes than expected (each one right), then an end or an error.
    Short { error: Option<String> },
    /// A byte that differed from the seeded stream (or one too many).
    Corrupt { offset: u64 },
    /// The routed port answered the CONNECT with something other than 200.
    RouteRefused(String),
    /// The forwarder's port refused the connect.
    ConnectFailed(String),
}

/// One client connection's story.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub routed: bool,
    pub end: End,
    /// Bytes written (after the header) and their SHA-256.
    pub sent: u64,
    pub sent_sha256: [u8; 32],
    /// Bytes read back and their SHA-256; what was expected of both.
    pub received: u64,
    pub received_sha256: [u8; 32],
    pub expected_received: u64,
    pub expected_sha256: [u8; 32],
}

/// Where the clients connect.
#[derive(Clone, Debug)]
pub struct Ports {
    pub fixed: SocketAddr,
    /// The routed port and the CONNECT target (`host:port`).
    pub routed: Option<(SocketAddr, String)>,
}

/// What the clients have done so far, shared with the sampler.
#[derive(Default)]
pub struct Live {
    pub records: Mutex<Vec<Record>>,
    pub bytes: AtomicU64,
    pub finished: AtomicU64,
    pub failed: AtomicU64,
    next_id: AtomicU64,
}

impl Live {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn push(&self, record: Record) {
        self.bytes.fetch_add(record.sent + record.received, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
        if record.end != End::Complete {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.records.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    }
}

/// One planned connection.
#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: Kind,
    pub routed: bool,
    pub header: Header,
    /// Request sizes of an echo connection, one round trip each (empty for
    /// a reply connection; one entry holding the whole of a bulk echo).
    pub rounds: Vec<u64>,
    /// Silence after the header (idle holders, bursts).
    pub hold: Duration,
}

/// A connection of `kind` with sizes drawn from `rng`.
pub fn plan(kind: Kind, id: u64, routed: bool, rng: &mut Rng) -> Plan {
    let mut plan = Plan {
        kind,
        routed,
        header: Header {
            id,
            echo: true,
            up_len: 0,
            up_seed: rng.next_u64(),
            reply_len: 0,
            reply_seed: rng.next_u64(),
        },
        rounds: Vec::new(),
        hold: Duration::ZERO,
    };
    match kind {
        Kind::Bulk => plan.rounds = vec![rng.between(64 << 10, 2 << 20)],
        Kind::Rpc => plan.rounds = (0..rng.between(10, 100)).map(|_| rng.between(16, 4096)).collect(),
        Kind::Churn => plan.rounds = vec![64],
        Kind::Idle => {
            plan.rounds = vec![1];
            plan.hold = Duration::from_millis(rng.between(5_000, 30_000));
        }
        Kind::Burst => {
            plan.rounds = vec![1];
            plan.hold = Duration::from_millis(2_000);
        }
        Kind::HalfClose => {
            plan.header.echo = false;
            plan.header.up_len = rng.between(0, 64 << 10);
            plan.header.reply_len = rng.between(0, 1 << 20);
        }
        Kind::SlowReader => {
            plan.header.echo = false;
            plan.header.up_len = 1024;
            plan.header.reply_len = rng.between(1 << 20, 2 << 20);
        }
    }
    if plan.header.echo {
        plan.header.up_len = plan.rounds.iter().sum();
    }
    plan
}

/// Runs one planned connection and records it in `live`.
pub fn run(plan: &Plan, ports: &Ports, live: &Live) {
    let mut record = Record {
        id: plan.header.id,
        kind: plan.kind,
        routed: plan.routed,
        end: End::Complete,
        sent: 0,
        sent_sha256: [0; 32],
        received: 0,
        received_sha256: [0; 32],
        expected_received: if plan.header.echo { plan.header.up_len } else { plan.header.reply_len },
        expected_sha256: [0; 32],
    };
    record.end = match connect(plan, ports) {
        Ok(Ok(stream)) => exchange(plan, stream, &mut record),
        Ok(Err(end)) => end,
        Err(e) => End::ConnectFailed(e.to_string()),
    };
    live.push(record);
}

/// Connects (through a CONNECT head on the routed port); the inner `Err`
/// is how a refused or cut CONNECT ended.
fn connect(plan: &Plan, ports: &Ports) -> io::Result<Result<TcpStream, End>> {
    let (addr, target) = match (&ports.routed, plan.routed) {
        (Some((addr, target)), true) => (*addr, Some(target)),
        _ => (ports.fixed, None),
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STUCK))?;
    stream.set_write_timeout(Some(STUCK))?;
    let Some(target) = target else { return Ok(Ok(stream)) };
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    if let Err(e) = stream.write_all(head.as_bytes()) {
        return Ok(Err(End::Short { error: Some(format!("CONNECT: {e}")) }));
    }
    // The answer's head, byte by byte: nothing of the tunnel is read ahead.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") && answer.len() < 4096 {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(Err(End::Short { error: Some("CONNECT: no answer".into()) })),
            Ok(_) => answer.push(byte[0]),
            Err(e) => return Ok(Err(End::Short { error: Some(format!("CONNECT: {e}")) })),
        }
    }
    let status = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(Ok(stream))
    } else {
        Ok(Err(End::RouteRefused(status)))
    }
}

/// What a stream should bring: its expected bytes, hashed as they come.
struct Expect {
    data: Data,
    scratch: Vec<u8>,
    expected_hash: Sha256,
    got_hash: Sha256,
    got: u64,
}

impl Expect {
    fn new(seed: u64) -> Expect {
        Expect {
            data: Data::new(seed),
            scratch: Vec::new(),
            expected_hash: Sha256::new(),
            got_hash: Sha256::new(),
            got: 0,
        }
    }

    /// Checks `bytes`; `Err(offset)` at the first one that differs.
    fn take(&mut self, bytes: &[u8]) -> Result<(), u64> {
        self.scratch.resize(bytes.len(), 0);
        self.data.fill(&mut self.scratch);
        self.expected_hash.update(&self.scratch);
        self.got_hash.update(bytes);
        if let Some(i) = bytes.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            return Err(self.got + i as u64);
        }
        self.got += bytes.len() as u64;
        Ok(())
    }

    /// Hashes expected bytes never received (for the record's expected hash).
    fn finish(mut self, expected_len: u64, record: &mut Record) {
        record.received = self.got;
        record.received_sha256 = self.got_hash.clone().finalize().into();
        let mut left = expected_len.saturating_sub(self.got);
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.data.fill(&mut buf[..n]);
            self.expected_hash.update(&buf[..n]);
            left -= n as u64;
        }
        record.expected_sha256 = self.expected_hash.finalize().into();
    }
}

/// A writer of the seeded stream.
struct Send {
    data: Data,
    hash: Sha256,
    sent: u64,
}

impl Send {
    fn new(seed: u64) -> Send {
        Send { data: Data::new(seed), hash: Sha256::new(), sent: 0 }
    }

    fn write(&mut self, stream: &mut TcpStream, len: u64, sizes: &mut Rng) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = sizes.between(1, buf.len() as u64).min(left) as usize;
            self.data.fill(&mut buf[..n]);
            stream.write_all(&buf[..n])?;
            self.hash.update(&buf[..n]);
            self.sent += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    fn finish(self, record: &mut Record) {
        record.sent = self.sent;
        record.sent_sha256 = self.hash.finalize().into();
    }
}

fn exchange(plan: &Plan, mut stream: TcpStream, record: &mut Record) -> End {
    let header = plan.header;
    if let Err(e) = stream.write_all(&header.encode()) {
        Send::new(header.up_seed).finish(record);
        let expect = Expect::new(if header.echo { header.up_seed } else { header.reply_seed });
        expect.finish(record.expected_received, record);
        return End::Short { error: Some(format!("header: {e}")) };
    }
    std::thread::sleep(plan.hold);
    let mut sizes = Rng::new(header.up_seed ^ 0x5eed);
    if header.echo && plan.kind != Kind::Bulk {
        round_trips(plan, stream, record, &mut sizes)
    } else {
        streamed(plan, stream, record, sizes)
    }
}

/// Echo rounds one after another: write a request, read it back.
fn round_trips(plan: &Plan, mut stream: TcpStream, record: &mut Record, sizes: &mut Rng) -> End {
    let mut send = Send::new(plan.header.up_seed);
    let mut expect = Expect::new(plan.header.up_seed);
    let mut buf = vec![0u8; 8192];
    let mut end = None;
    'rounds: for &size in &plan.rounds {
        if let Err(e) = send.write(&mut stream, size, sizes) {
            end = Some(End::Short { error: Some(e.to_string()) });
            break;
        }
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            match stream.read(&mut buf[..n]) {
                Ok(0) => {
                    end = Some(End::Short { error: None });
                    break 'rounds;
                }
                Ok(got) => {
                    if let Err(offset) = expect.take(&buf[..got]) {
                        end = Some(End::Corrupt { offset });
                        break 'rounds;
                    }
                    left -= got as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    end = Some(End::Short { error: Some(e.to_string()) });
                    break 'rounds;
                }
            }
        }
    }
    let end = end.unwrap_or_else(|| {
        let _ = stream.shutdown(Shutdown::Write);
        read_to_end(&mut stream, &mut expect, plan.header.up_len, Duration::ZERO)
    });
    send.finish(record);
    expect.finish(record.expected_received, record);
    end
}

/// A writer thread and a reader at once (bulk echo), or the write, the
/// half-close and then the reply (reply connections).
fn streamed(plan: &Plan, mut stream: TcpStream, record: &mut Record, mut sizes: Rng) -> End {
    let header = plan.header;
    let Ok(mut writer) = stream.try_clone() else {
        return End::Short { error: Some("cannot clone the socket".into()) };
    };
    let wrote = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&wrote);
    let sender = std::thread::spawn(move || {
        let mut send = Send::new(header.up_seed);
        let result = send.write(&mut writer, header.up_len, &mut sizes);
        let _ = writer.shutdown(Shutdown::Write);
        done.store(true, Ordering::SeqCst);
        (send, result)
    });
    if plan.kind == Kind::HalfClose {
        // The reply comes only after our half-close; read it a moment later.
        while !wrote.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (seed, len) =
        if header.echo { (header.up_seed, header.up_len) } else { (header.reply_seed, header.reply_len) };
    let pause = if plan.kind == Kind::SlowReader { Duration::from_millis(10) } else { Duration::ZERO };
    let mut expect = Expect::new(seed);
    let mut end = read_to_end(&mut stream, &mut expect, len, pause);
    if end != End::Complete {
        // Unblock a writer stuck on a connection that is over.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let (send, written) =
        sender.join().unwrap_or_else(|_| (Send::new(0), Err(io::Error::other("writer panicked"))));
    if let (End::Complete, Err(e)) = (&end, written) {
        end = End::Short { error: Some(format!("write: {e}")) };
    }
    send.finish(record);
    expect.finish(record.expected_received, record);
    end
}

/// Reads to the end of stream, `len` bytes expected; `pause` between reads
/// of a slow reader (16 KiB each).
fn read_to_end(stream: &mut TcpStream, expect: &mut Expect, len: u64, pause: Duration) -> End {
    let mut buf = vec![0u8; if pause.is_zero() { 256 * 1024 } else { 16 * 1024 }];
    loop {
        match stream.read(&mut buf) {
            Ok(0) if expect.got == len => return End::Complete,
            Ok(0) => return End::Short { error: None },
            Ok(n) => {
                if expect.got + n as u64 > len {
                    // One byte more than the stream has: corrupted.
                    return End::Corrupt { offset: len };
                }
                if let Err(offset) = expect.take(&buf[..n]) {
                    return End::Corrupt { offset };
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return End::Short { error: Some(e.to_string()) },
        }
        std::thread::sleep(pause);
    }
}
