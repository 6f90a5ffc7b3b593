//! A relay built the way AWS's `vsock-proxy` is built, for side-by-side
//! numbers: one accept thread, a fixed pool of worker threads (a connection
//! holds a worker for its whole life), a readiness wait on both sockets, and
//! 8 KiB `read` + `write_all` copies. Like AWS's, EOF on either side ends the
//! connection (no half-close).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

const BUFFER_BYTES: usize = 8192;

/// A running baseline relay; it runs until the process ends.
pub struct Baseline {
    pub addr: SocketAddr,
}

impl Baseline {
    /// Listens on a free loopback port, forwarding to `target` with `workers`
    /// threads (AWS's default is 4).
    pub fn start(target: SocketAddr, workers: usize) -> Baseline {
        Baseline::start_on("127.0.0.1:0".parse().unwrap(), target, workers).expect("bind baseline")
    }

    /// Like [`Baseline::start`], listening on `listen`.
    pub fn start_on(listen: SocketAddr, target: SocketAddr, workers: usize) -> std::io::Result<Baseline> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel::<TcpStream>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            let rx = Arc::clone(&rx);
            std::thread::spawn(move || loop {
                let next = rx.lock().unwrap().recv();
                let Ok(client) = next else { return };
                if let Ok(server) = TcpStream::connect(target) {
                    relay(client, server);
                }
            });
        }
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if tx.send(client).is_err() {
                    return;
                }
            }
        });
        Ok(Baseline { addr })
    }
}

fn wait_readable(a: &TcpStream, b: &TcpStream) -> (bool, bool) {
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
fn transfer(src: &mut TcpStream, dst: &mut TcpStream, buf: &mut [u8]) -> bool {
    match src.read(buf) {
        Ok(0) | Err(_) => true,
        Ok(n) => dst.write_all(&buf[..n]).is_err(),
    }
}

fn relay(mut client: TcpStream, mut server: TcpStream) {
    let mut buf = [0u8; BUFFER_BYTES];
    loop {
        let (client_ready, server_ready) = wait_readable(&client, &server);
        if client_ready && transfer(&mut client, &mut server, &mut buf) {
            return;
        }
        if server_ready && transfer(&mut server, &mut client, &mut buf) {
            return;
        }
    }
}
