//! A relay built the way AWS's `vsock-proxy` is built, for side-by-side
//! numbers: one accept thread, a fixed pool of worker threads (a connection
//! holds a worker for its whole life), a readiness wait on both sockets, and
//! 8 KiB `read` + `write_all` copies. Like AWS's, EOF on either side ends the
//! connection (no half-close). It listens and connects on any endpoint
//! family, so it stands in for AWS's proxy on real vsock too.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use socket2::{SockAddr, Socket, Type};
use vsock_relay_engine::socket::{self, SocketOptions};
use vsock_relay_engine::Endpoint;

const BUFFER_BYTES: usize = 8192;

/// A running baseline relay; it runs until the process ends.
pub struct Baseline {
    /// Where it listens (the real port after port 0).
    pub endpoint: Endpoint,
}

impl Baseline {
    /// Listens on a free loopback port, forwarding to `target` with `workers`
    /// threads (AWS's default is 4).
    pub fn start(target: SocketAddr, workers: usize) -> SocketAddr {
        let baseline = Baseline::serve(&"tcp:127.0.0.1:0".parse().unwrap(), &Endpoint::tcp(target), workers)
            .expect("bind baseline");
        socket::sockaddr(&baseline.endpoint).unwrap().as_socket().unwrap()
    }

    /// Listens on `listen`, forwarding each client to `target` with `workers` threads.
    pub fn serve(listen: &Endpoint, target: &Endpoint, workers: usize) -> std::io::Result<Baseline> {
        let options =
            SocketOptions { tcp_nodelay: false, vsock_buffer_size: None, ..SocketOptions::default() };
        let listener = socket::listen(listen, &options)?;
        listener.set_nonblocking(false)?;
        let endpoint = socket::local_endpoint(&listener, listen)?;
        let target = socket::sockaddr(target)?;
        let (tx, rx) = mpsc::channel::<Socket>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            let rx = Arc::clone(&rx);
            let target = target.clone();
            std::thread::spawn(move || loop {
                let next = rx.lock().unwrap().recv();
                let Ok(client) = next else { return };
                if let Ok(server) = connect(&target) {
                    relay(client, server);
                }
            });
        }
        std::thread::spawn(move || {
            while let Ok((client, _)) = listener.accept() {
                if client.set_nonblocking(false).is_err() || tx.send(client).is_err() {
                    return;
                }
            }
        });
        Ok(Baseline { endpoint })
    }
}

fn connect(target: &SockAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(target.domain(), Type::STREAM, None)?;
    socket.connect(target)?;
    Ok(socket)
}

fn wait_readable(a: &Socket, b: &Socket) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `fds` is a valid array of two pollfds for the whole call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if n < 0 {
        return (true, true);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Moves one chunk; true when the connection is over.
fn transfer(mut src: &Socket, mut dst: &Socket, buf: &mut [u8]) -> bool {
    match src.read(buf) {
        Ok(0) | Err(_) => true,
        Ok(n) => dst.write_all(&buf[..n]).is_err(),
    }
}

fn relay(client: Socket, server: Socket) {
    let mut buf = [0u8; BUFFER_BYTES];
    loop {
        let (client_ready, server_ready) = wait_readable(&client, &server);
        if client_ready && transfer(&client, &server, &mut buf) {
            return;
        }
        if server_ready && transfer(&server, &client, &mut buf) {
            return;
        }
    }
}
