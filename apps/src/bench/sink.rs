//! The bench's far end. Each connection starts with one mode byte:
//! [`COUNT`], followed by a byte count N (8 bytes, little endian), reads N
//! bytes (or to EOF) and answers how many it got (8 bytes), so a bulk sender
//! knows every byte arrived without needing half-close from the relay in
//! between (AWS's design has none); [`ECHO`] sends back what it reads until
//! EOF. A thread per connection with a small stack: the sink must hold
//! thousands of idle connections and never be the bottleneck of one fast
//! stream. A thread whose connection ended waits for the next one instead
//! of exiting (up to `MAX_WAITING` threads): in the vsock guest, starting a
//! thread and its buffer for every connection cost the sink more CPU than
//! the relays under test spend on one, and that shared cost hid their
//! differences in churn.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use socket2::Socket;
use vsock_relay_engine::socket::{self, SocketOptions};
use vsock_relay_engine::Endpoint;

/// Mode byte: count N bytes (N follows), answer the count.
pub const COUNT: u8 = b'C';
/// Mode byte: echo until EOF.
pub const ECHO: u8 = b'E';

const READ_BYTES: usize = 256 * 1024;

/// The sink's own vsock credit window, fixed (not the relay's default, which
/// may change): the `direct` rows of the vsock benchmarks stay comparable
/// across builds.
const VSOCK_WINDOW_BYTES: u64 = 1 << 20;

/// Threads kept waiting for a next connection, at most.
const MAX_WAITING: usize = 64;

/// Listens on `listen` and serves until the process ends; returns the bound
/// endpoint once listening (port 0 gets a real port).
pub fn start(listen: &Endpoint) -> anyhow::Result<Endpoint> {
    let _ = vsock_relay_engine::raise_open_files_limit();
    let options = SocketOptions {
        backlog: 4096,
        vsock_buffer_size: Some(VSOCK_WINDOW_BYTES),
        ..SocketOptions::default()
    };
    let listener = socket::listen(listen, &options).with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(false)?;
    let local = socket::local_endpoint(&listener, listen)?;
    let waiting = Waiting::new();
    std::thread::Builder::new().name("sink-accept".into()).spawn(move || loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = socket::tune(&stream, &options);
                let Some(stream) = waiting.hand_over(stream) else { continue };
                let waiting = waiting.clone();
                let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                    let mut buf = vec![0u8; READ_BYTES];
                    let mut next = Some(stream);
                    while let Some(stream) = next {
                        let _ = serve(stream, &mut buf);
                        next = waiting.next();
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "sink: cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "sink: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })?;
    Ok(local)
}

/// Connection threads between connections, and the queue that hands them
/// the next one. Each waiting thread is counted once before it waits, and
/// each connection handed over takes one count, so none waits unserved.
#[derive(Clone)]
struct Waiting {
    count: Arc<AtomicUsize>,
    sender: mpsc::Sender<Socket>,
    receiver: Arc<Mutex<mpsc::Receiver<Socket>>>,
}

impl Waiting {
    fn new() -> Self {
        let (sender, receiver) = mpsc::channel();
        Waiting { count: Arc::new(AtomicUsize::new(0)), sender, receiver: Arc::new(Mutex::new(receiver)) }
    }

    /// Gives `stream` to a waiting thread, or back if none waits.
    fn hand_over(&self, stream: Socket) -> Option<Socket> {
        match self.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)) {
            Ok(_) => self.sender.send(stream).err().map(|unsent| unsent.0),
            Err(_) => Some(stream),
        }
    }

    /// Waits for the next connection; None once enough threads wait (a
    /// burst's threads do not stay parked) or the sink is gone.
    fn next(&self) -> Option<Socket> {
        if self.count.load(Ordering::Acquire) >= MAX_WAITING {
            return None;
        }
        self.count.fetch_add(1, Ordering::AcqRel);
        let receiver = self.receiver.lock().ok()?;
        receiver.recv().ok()
    }
}

fn serve(mut stream: Socket, buf: &mut [u8]) -> io::Result<()> {
    let mut mode = [0u8; 1];
    if stream.read(&mut mode)? == 0 {
        return Ok(());
    }
    match mode[0] {
        COUNT => {
            let mut expected = [0u8; 8];
            stream.read_exact(&mut expected)?;
            let expected = u64::from_le_bytes(expected);
            let mut count = 0u64;
            while count < expected {
                let want = (expected - count).min(buf.len() as u64) as usize;
                match stream.read(&mut buf[..want]) {
                    Ok(0) => break,
                    Ok(n) => count += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            stream.write_all(&count.to_le_bytes())?;
        }
        ECHO => loop {
            match stream.read(buf) {
                Ok(0) => break,
                Ok(n) => stream.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        },
        _ => return Ok(()),
    }
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    //! The sink on loopback TCP: connections one after another are served by
    //! the thread the first one started, in either mode, and many at once
    //! each get a thread.

    use super::*;
    use std::net::TcpStream;

    fn sink() -> std::net::SocketAddr {
        let endpoint: Endpoint = "tcp:127.0.0.1:0".parse().unwrap();
        match start(&endpoint).unwrap() {
            Endpoint::Tcp { port, .. } => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            other => panic!("a TCP sink listens on TCP, not {other}"),
        }
    }

    fn echo(to: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(to).unwrap();
        stream.write_all(&[ECHO]).unwrap();
        stream.write_all(payload).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).unwrap();
        back
    }

    fn count(to: std::net::SocketAddr, bytes: usize) -> u64 {
        let mut stream = TcpStream::connect(to).unwrap();
        stream.write_all(&[COUNT]).unwrap();
        stream.write_all(&(bytes as u64).to_le_bytes()).unwrap();
        stream.write_all(&vec![7u8; bytes]).unwrap();
        let mut answer = [0u8; 8];
        stream.read_exact(&mut answer).unwrap();
        u64::from_le_bytes(answer)
    }

    #[test]
    fn connections_one_after_another_and_at_once_are_all_served() {
        let to = sink();
        for round in 0..20u8 {
            let payload: Vec<u8> = (0..100).map(|i| i ^ round).collect();
            assert_eq!(echo(to, &payload), payload, "echo, round {round}");
            assert_eq!(count(to, 300_000), 300_000, "count, round {round}");
        }
        let at_once: Vec<_> =
            (0..80u8).map(|i| std::thread::spawn(move || echo(to, &[i; 1000]) == vec![i; 1000])).collect();
        assert!(at_once.into_iter().all(|t| t.join().unwrap()), "every concurrent echo came back whole");
    }
}
