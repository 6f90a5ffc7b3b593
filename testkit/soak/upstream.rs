//! The soak's upstream server: checks every byte it receives against the
//! seeded stream the client names in its header, echoes or replies, and
//! records each connection's end in a ledger the accountant reads. The chaos
//! schedule restarts it (every open connection reset, the listeners closed
//! for a while) and resets chosen connections in mid-stream: a reset here is
//! a real TCP reset (`SO_LINGER 0`), as a crashed server gives.
//!
//! Client header (41 bytes, little-endian): id u64, mode u8 (0 echo, 1
//! reply), up length u64, up seed u64, reply length u64, reply seed u64.
//! Echo: every byte read is written back; at EOF, half-close. Reply: read to
//! EOF, then send the reply's seeded bytes and close.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::traffic::Data;

/// The header's length in bytes.
pub const HEADER_BYTES: usize = 41;
/// How often a blocked read or write looks at its reset flag.
const POLL: Duration = Duration::from_millis(200);

/// What a connection asks the server to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u64,
    pub echo: bool,
    pub up_len: u64,
    pub up_seed: u64,
    pub reply_len: u64,
    pub reply_seed: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..8].copy_from_slice(&self.id.to_le_bytes());
        bytes[8] = u8::from(!self.echo);
        for (i, word) in [self.up_len, self.up_seed, self.reply_len, self.reply_seed].iter().enumerate() {
            bytes[9 + i * 8..17 + i * 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8; HEADER_BYTES]) -> Header {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        Header {
            id: word(0),
            echo: bytes[8] == 0,
            up_len: word(9),
            up_seed: word(17),
            reply_len: word(25),
            reply_seed: word(33),
        }
    }
}

/// How one connection ended, as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Read to EOF and answered; `corrupt_at` is the first byte that differed
    /// from the seeded stream.
    Done { up_bytes: u64, corrupt_at: Option<u64> },
    /// Reset by the chaos schedule (a restart or a mid-stream reset).
    Reset,
    /// A read or write failed (the relay reset it).
    Failed(String),
}

#[derive(Default)]
struct State {
    ledger: Mutex<HashMap<u64, Seen>>,
    /// Open connections (after their header) and their reset flags.
    open: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// Connections reset before their header arrived.
    anonymous_resets: AtomicU64,
    /// Connections whose header never came (closed first).
    headless: AtomicU64,
    /// Set while the server is down: handlers before their header reset too.
    generation: AtomicU64,
}

/// The server, on one port of several loopback addresses.
pub struct Upstream {
    addrs: Vec<SocketAddr>,
    state: Arc<State>,
    listeners: Vec<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Upstream {
    /// Listens on `port` (0: any free port, the same on every address) of each of `ips`.
    pub fn start(ips: &[std::net::IpAddr], port: u16) -> io::Result<Upstream> {
        let mut upstream = Upstream { addrs: Vec::new(), state: Arc::default(), listeners: Vec::new() };
        let mut port = port;
        for ip in ips {
            let listener = TcpListener::bind(SocketAddr::new(*ip, port))?;
            port = listener.local_addr()?.port();
            upstream.addrs.push(listener.local_addr()?);
            upstream.serve(listener);
        }
        Ok(upstream)
    }

    pub fn port(&self) -> u16 {
        self.addrs[0].port()
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let (stopping, state) = (Arc::clone(&stop), Arc::clone(&self.state));
        let acceptor = std::thread::spawn(move || loop {
            let accepted = listener.accept();
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            match accepted {
                Ok((stream, _)) => {
                    let state = Arc::clone(&state);
                    let spawned = std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || handle(stream, &state));
                    if spawned.is_err() {
                        eprintln!("soak upstream: cannot start a handler thread");
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        });
        self.listeners.push((stop, acceptor));
    }

    fn close_listeners(&mut self) {
        for (stop, _acceptor) in self.listeners.drain(..) {
            stop.store(true, Ordering::SeqCst);
        }
        for addr in &self.addrs {
            // Wakes each acceptor, which then closes its listener.
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        // The acceptors are not joined: each returns at its next accept.
    }

    /// A restart: every open connection reset, nothing listening for `down`.
    /// Returns how many open connections were reset.
    pub fn restart(&mut self, down: Duration) -> usize {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        let reset = self.reset_open(usize::MAX, 0);
        self.close_listeners();
        std::thread::sleep(down);
        let addrs = self.addrs.clone();
        for addr in addrs {
            // The old listener closes when its acceptor wakes; retry a moment.
            let mut tries = 0;
            loop {
                match TcpListener::bind(addr) {
                    Ok(listener) => {
                        self.serve(listener);
                        break;
                    }
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        eprintln!("soak upstream: cannot listen again on {addr}: {e}");
                        break;
                    }
                }
            }
        }
        reset
    }

    /// Resets up to `count` open connections (picked by `pick`); returns how many.
    pub fn reset_open(&self, count: usize, pick: u64) -> usize {
        let open = self.state.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<u64> = open.keys().copied().collect();
        ids.sort_unstable();
        let n = count.min(ids.len());
        let start = if ids.is_empty() { 0 } else { (pick % ids.len() as u64) as usize };
        for i in 0..n {
            open[&ids[(start + i) % ids.len()]].store(true, Ordering::SeqCst);
        }
        n
    }

    /// How connection `id` ended, if the server saw it.
    pub fn seen(&self, id: u64) -> Option<Seen> {
        self.state.ledger.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Connections reset before their header arrived.
    pub fn anonymous_resets(&self) -> u64 {
        self.state.anonymous_resets.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_now(&self) -> usize {
        self.state.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.close_listeners();
    }
}

/// Why a handler stopped before its end.
enum Stop {
    Reset,
    Io(io::Error),
}

/// A socket whose blocking calls wake every [`POLL`] to look at a reset flag.
struct Watched {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Watched {
    /// One read or write, retried past its timeouts until it moves bytes,
    /// fails, or the reset flag is set.
    fn watch(&mut self, mut op: impl FnMut(&mut TcpStream) -> io::Result<usize>) -> Result<usize, Stop> {
        loop {
            if self.reset.load(Ordering::SeqCst) {
                return Err(Stop::Reset);
            }
            match op(&mut self.stream) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Stop::Io(e)),
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        self.watch(|stream| stream.read(buf))
    }

    fn write_all(&mut self, mut buf: &[u8]) -> Result<(), Stop> {
        while !buf.is_empty() {
            match self.watch(|stream| stream.write(buf))? {
                0 => return Err(Stop::Io(ErrorKind::WriteZero.into())),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }
}

/// Compares received bytes with the seeded stream.
struct Checker {
    expected: Data,
    scratch: Vec<u8>,
    bytes: u64,
    corrupt_at: Option<u64>,
}

impl Checker {
    fn new(seed: u64) -> Checker {
        Checker { expected: Data::new(seed), scratch: Vec::new(), bytes: 0, corrupt_at: None }
    }

    fn check(&mut self, got: &[u8]) {
        self.scratch.resize(got.len(), 0);
        self.expected.fill(&mut self.scratch);
        if self.corrupt_at.is_none() {
            if let Some(i) = got.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.corrupt_at = Some(self.bytes + i as u64);
            }
        }
        self.bytes += got.len() as u64;
    }
}

fn handle(stream: TcpStream, state: &State) {
    let generation = state.generation.load(Ordering::SeqCst);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(POLL));
    // Before its header, a connection is reset by a restart through the
    // generation: it has no id to be picked by yet.
    let reset = Arc::new(AtomicBool::new(false));
    let mut socket = Watched { stream, reset: Arc::clone(&reset) };
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        if state.generation.load(Ordering::SeqCst) != generation {
            reset.store(true, Ordering::SeqCst);
        }
        match socket.read(&mut header[got..]) {
            Ok(0) => {
                state.headless.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => got += n,
            Err(Stop::Reset) => {
                state.anonymous_resets.fetch_add(1, Ordering::SeqCst);
                return abort(socket.stream);
            }
            Err(Stop::Io(_)) => {
                state.headless.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
    let header = Header::decode(&header);
    {
        let mut open = state.open.lock().unwrap_or_else(|p| p.into_inner());
        if state.generation.load(Ordering::SeqCst) != generation {
            reset.store(true, Ordering::SeqCst);
        }
        open.insert(header.id, Arc::clone(&reset));
    }
    let outcome = exchange(&mut socket, &header);
    // The end is decided under the lock the chaos sets flags under, so a
    // reset either happened (and is recorded) or did not.
    let mut open = state.open.lock().unwrap_or_else(|p| p.into_inner());
    open.remove(&header.id);
    let seen = match outcome {
        // Its end was sent: a reset flag set since comes too late.
        Ok(checker) => Seen::Done { up_bytes: checker.bytes, corrupt_at: checker.corrupt_at },
        Err(Stop::Reset) => Seen::Reset,
        Err(Stop::Io(e)) => Seen::Failed(e.to_string()),
    };
    let abort_it = seen == Seen::Reset;
    state.ledger.lock().unwrap_or_else(|p| p.into_inner()).insert(header.id, seen);
    drop(open);
    if abort_it {
        abort(socket.stream);
    }
}

/// The connection's exchange; the socket is closed by the caller (a normal
/// close after a normal end).
fn exchange(socket: &mut Watched, header: &Header) -> Result<Checker, Stop> {
    let mut checker = Checker::new(header.up_seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.read(&mut buf)?;
        if n == 0 {
            break;
        }
        checker.check(&buf[..n]);
        if header.echo {
            socket.write_all(&buf[..n])?;
        }
    }
    if !header.echo {
        let mut data = Data::new(header.reply_seed);
        let mut left = header.reply_len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            data.fill(&mut buf[..n]);
            socket.write_all(&buf[..n])?;
            left -= n as u64;
        }
    }
    if socket.reset.load(Ordering::SeqCst) {
        return Err(Stop::Reset);
    }
    let _ = socket.stream.shutdown(Shutdown::Write);
    Ok(checker)
}

/// Closes with a TCP reset.
fn abort(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
