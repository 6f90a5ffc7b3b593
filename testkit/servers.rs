//! Upstream servers for tests and benches, on loopback TCP or Unix sockets.
//! Each serves every connection on its own thread and stops when dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vsock_relay_engine::Endpoint;

use crate::traffic;

/// A connected stream of any family (AF_VSOCK only inside the vsock guest).
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Vsock(socket2::Socket),
}

impl Stream {
    pub fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
        match endpoint {
            Endpoint::Tcp { .. } => {
                let addr = vsock_relay_engine::socket::sockaddr(endpoint)?.as_socket().expect("tcp address");
                TcpStream::connect(addr).map(Stream::Tcp)
            }
            Endpoint::Unix { path } => UnixStream::connect(path).map(Stream::Unix),
            Endpoint::Vsock { cid, port, .. } => {
                crate::guest::require_vsock_guest();
                let socket = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None)?;
                socket.connect(&socket2::SockAddr::vsock(*cid, *port))?;
                Ok(Stream::Vsock(socket))
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Vsock(s) => s.try_clone().map(Stream::Vsock),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Vsock(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Vsock(s) => s.set_read_timeout(timeout),
        }
    }

    /// Closes with a reset (TCP `SO_LINGER {1, 0}`).
    pub fn reset(self) {
        match &self {
            Stream::Tcp(s) => socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).expect("set linger"),
            Stream::Vsock(s) => s.set_linger(Some(Duration::ZERO)).expect("set linger"),
            Stream::Unix(_) => {}
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(s) => (&*s).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Vsock(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Vsock(socket2::Socket, u32),
}

/// A server running `handler` for every connection on its own thread.
pub struct Server {
    endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on loopback TCP (port 0: any free port).
    pub fn tcp(handler: impl Fn(Stream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        Server::start(Listener::Tcp(listener), handler)
    }

    /// Listens on loopback TCP with room for `backlog` clients not yet
    /// accepted (the standard library's listener has 128): an upstream for
    /// bursts of new connections, which otherwise meet dropped SYNs and
    /// their one-second retransmit.
    pub fn tcp_with_backlog(backlog: i32, handler: impl Fn(Stream) + Send + Sync + 'static) -> Server {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("tcp socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        let address: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        socket.bind(&address.into()).expect("bind loopback");
        socket.listen(backlog).expect("listen");
        Server::start(Listener::Tcp(TcpListener::from(socket)), handler)
    }

    /// Listens on a Unix socket at `path`.
    pub fn unix(path: &Path, handler: impl Fn(Stream) + Send + Sync + 'static) -> Server {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind unix socket");
        Server::start(Listener::Unix(listener, path.to_path_buf()), handler)
    }

    /// Listens on AF_VSOCK `port` (any CID); clients reach it at CID 1.
    /// Only inside the vsock guest.
    pub fn vsock(port: u32, handler: impl Fn(Stream) + Send + Sync + 'static) -> Server {
        crate::guest::require_vsock_guest();
        let socket =
            socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None).expect("vsock socket");
        socket.bind(&socket2::SockAddr::vsock(libc::VMADDR_CID_ANY, port)).expect("bind vsock");
        socket.listen(1024).expect("listen vsock");
        Server::start(Listener::Vsock(socket, port), handler)
    }

    fn start(listener: Listener, handler: impl Fn(Stream) + Send + Sync + 'static) -> Server {
        let endpoint = match &listener {
            Listener::Tcp(l) => Endpoint::tcp(l.local_addr().unwrap()),
            Listener::Unix(_, path) => Endpoint::Unix { path: path.clone() },
            Listener::Vsock(_, port) => Endpoint::vsock(1, *port),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::spawn(move || loop {
            let stream = match &listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    s.set_nodelay(true).ok();
                    Stream::Tcp(s)
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Vsock(l, _) => l.accept().map(|(s, _)| Stream::Vsock(s)),
            };
            if stopping.load(Ordering::SeqCst) {
                if let Listener::Unix(_, path) = &listener {
                    let _ = std::fs::remove_file(path);
                }
                return;
            }
            match stream {
                Ok(stream) => {
                    let handler = Arc::clone(&handler);
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || handler(stream))
                        .expect("spawn handler");
                }
                Err(e) => {
                    eprintln!("test server accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Server { endpoint, stop, acceptor: Some(acceptor) }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        match &self.endpoint {
            Endpoint::Tcp { host: vsock_relay_engine::Host::Ip(ip), port } => SocketAddr::new(*ip, *port),
            other => panic!("{other} is not a TCP endpoint"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with one last connection.
        let _ = Stream::connect(&self.endpoint);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Echoes every byte back; passes EOF on as a half-close.
pub fn echo(mut stream: Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// What a [`twin`] server received on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Received data per connection id, filled by [`twin`].
pub type Ledger = Arc<Mutex<std::collections::HashMap<u64, io::Result<Received>>>>;

/// The server side of a two-way byte-exact check. The client first sends
/// 24 bytes: connection id, reply length and reply seed (little-endian u64s).
/// The server then sends the reply (seeded bytes, random write sizes) while
/// reading the client's data to EOF, records what it received under the id,
/// and half-closes after the reply.
pub fn twin(ledger: Ledger) -> impl Fn(Stream) + Send + Sync + 'static {
    move |mut stream: Stream| {
        let mut header = [0u8; 24];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let word = |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap());
        let (id, reply_len, reply_seed) = (word(0), word(1), word(2));
        let mut writer = stream.try_clone().expect("clone stream");
        let sender = std::thread::spawn(move || {
            let sent = traffic::send(&mut writer, reply_len, reply_seed);
            let _ = writer.shutdown(Shutdown::Write);
            sent
        });
        let received = traffic::receive(&mut stream).map(|(bytes, sha256)| Received { bytes, sha256 });
        let _ = sender.join();
        ledger.lock().unwrap().insert(id, received);
    }
}
