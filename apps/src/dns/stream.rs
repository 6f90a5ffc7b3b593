//! A stream socket of any endpoint family (vsock, TCP, Unix) as a tokio
//! stream. tokio has types for TCP and Unix sockets but none for AF_VSOCK,
//! and the DNS hop to the parent is vsock in an enclave (Unix sockets stand
//! in for it in tests). Sockets are made and connected by the engine's own
//! helpers (its address forms, `:to-host`, its refusal of vsock where
//! `VSOCK_RELAY_NO_VSOCK` is set), then handed to tokio: TCP as a
//! `TcpStream`, and Unix and vsock as a `UnixStream`, which for a connected
//! stream socket is only readiness plus read(2)/write(2)/shutdown(2), the
//! same calls for both families (its address methods are never called on a
//! vsock one). That keeps the apps free of `unsafe`, which wrapping a raw
//! descriptor in tokio's `AsyncFd` would need.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockRef, Socket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use vsock_relay_engine::endpoint::{Endpoint, Host};
use vsock_relay_engine::socket::{self, SocketOptions};

/// How long a vsock connect that reported writable too early is given
/// before its state is asked again (see [`socket::finish_connect`]).
const CONNECT_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// A connected stream socket registered with the runtime.
#[derive(Debug)]
pub enum SocketStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix or vsock (see the module docs).
    Local(UnixStream),
}

impl SocketStream {
    /// Wraps a connected socket (accepted or connected elsewhere); it is
    /// made non-blocking. Needs a tokio runtime with I/O enabled.
    pub fn new(socket: Socket) -> io::Result<SocketStream> {
        socket.set_nonblocking(true)?;
        let tcp = matches!(socket.domain()?, Domain::IPV4 | Domain::IPV6);
        let fd = OwnedFd::from(socket);
        Ok(if tcp {
            SocketStream::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?)
        } else {
            SocketStream::Local(UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?)
        })
    }

    /// Connects to `endpoint`. A TCP host name is resolved off the runtime's
    /// thread (the system resolver blocks). No timeout: the caller sets one.
    pub async fn connect(endpoint: &Endpoint) -> io::Result<SocketStream> {
        let addr = match endpoint {
            Endpoint::Tcp { host: Host::Name(_), .. } => {
                let endpoint = endpoint.clone();
                tokio::task::spawn_blocking(move || socket::sockaddr(&endpoint))
                    .await
                    .map_err(io::Error::other)??
            }
            _ => socket::sockaddr(endpoint)?,
        };
        let socket = socket::socket_for(&addr, &SocketOptions::default())?;
        let connected = socket::start_connect(&socket, &addr)?;
        let is_vsock = addr.domain() == Domain::VSOCK;
        let stream = SocketStream::new(socket)?;
        if !connected {
            loop {
                stream.writable().await?;
                match socket::finish_connect(&stream.sock_ref(), is_vsock) {
                    Some(result) => break result?,
                    None => tokio::time::sleep(CONNECT_RECHECK).await,
                }
            }
        }
        Ok(stream)
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            SocketStream::Tcp(stream) => stream.writable().await,
            SocketStream::Local(stream) => stream.writable().await,
        }
    }

    fn sock_ref(&self) -> SockRef<'_> {
        match self {
            SocketStream::Tcp(stream) => SockRef::from(stream),
            SocketStream::Local(stream) => SockRef::from(stream),
        }
    }
}

impl AsyncRead for SocketStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketStream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            SocketStream::Local(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SocketStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketStream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            SocketStream::Local(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketStream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            SocketStream::Local(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketStream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            SocketStream::Local(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn connects_to_a_unix_listener_and_moves_bytes_both_ways() {
        let dir = std::env::temp_dir().join(format!("dns-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let echo = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            std::io::Read::read_exact(&mut peer, &mut buf).unwrap();
            std::io::Write::write_all(&mut peer, &buf).unwrap();
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let echoed = runtime.block_on(async {
            let mut stream = SocketStream::connect(&Endpoint::Unix { path: path.clone() }).await.unwrap();
            stream.write_all(b"hello").await.unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await.unwrap();
            back
        });
        echo.join().unwrap();
        assert_eq!(echoed, b"hello");
        let refused =
            runtime.block_on(SocketStream::connect(&Endpoint::Unix { path: dir.join("none.sock") }));
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
