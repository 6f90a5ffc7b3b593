//! Listening and connecting for every endpoint family, with the socket
//! options a relay wants. Sockets are always non-blocking: the backends wait
//! for readiness themselves.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::endpoint::{Endpoint, Host, ToHost};
use crate::hint::{self, Step};
use crate::machine;
use crate::sys;

/// The vsock credit window a relay asks for on each of its vsock sockets
/// (`SO_VM_SOCKETS_BUFFER_SIZE`; the kernel's default is 256 KiB, which AWS's
/// proxy keeps): how many bytes a peer may send ahead of the relay's reads.
/// With many streams at once a worker reaches each socket less often, and a
/// sender whose window is full waits for it; a larger window lets each
/// socket queue more between two visits. Measured in the vsock guest
/// (proxy alone, vsock -> TCP, 1 to 64 streams at once, 5 boots on 6.12
/// and 6.18; perf/results-vsock-streams.md): 4 MiB against 1 MiB moved
/// 1.01-1.25x as much at 1 to 16 streams (medians per kernel and backend)
/// with less relay CPU per GiB, and level at 64; the kernel's 256 KiB
/// was the slowest of the windows tried. The window is a bound, not an
/// allocation: it is used only by bytes queued for a reader, which a relay
/// whose upstream is slow leaves there (up to this much per connection).
pub const DEFAULT_VSOCK_BUFFER_BYTES: u64 = 4 << 20;

/// Options applied to every socket the relay opens or accepts.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// TCP_NODELAY on TCP sockets: a relay must not add Nagle delay to the
    /// small writes of request/response protocols (TLS handshakes).
    pub tcp_nodelay: bool,
    /// The vsock credit window in bytes (default 256 KiB in the kernel).
    pub vsock_buffer_size: Option<u64>,
    /// Listen backlog.
    pub backlog: i32,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            tcp_nodelay: true,
            vsock_buffer_size: Some(DEFAULT_VSOCK_BUFFER_BYTES),
            backlog: 1024,
        }
    }
}

/// Resolves a listen or connect endpoint to one socket address, using the
/// system resolver for a TCP host name (start-up only, never on the data path).
pub fn sockaddr(endpoint: &Endpoint) -> io::Result<SockAddr> {
    match endpoint {
        Endpoint::Vsock { cid, port, to_host } => Ok(match to_host {
            ToHost::Yes => sys::vsock_addr_to_host(*cid, *port),
            ToHost::Auto if machine::to_host_auto() => sys::vsock_addr_to_host(*cid, *port),
            ToHost::No | ToHost::Auto => SockAddr::vsock(*cid, *port),
        }),
        Endpoint::Unix { path } => SockAddr::unix(path),
        Endpoint::Tcp { host: Host::Ip(ip), port } => Ok(SocketAddr::new(*ip, *port).into()),
        Endpoint::Tcp { host: Host::Name(name), port } => (name.as_str(), *port)
            .to_socket_addrs()?
            .next()
            .map(SockAddr::from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("`{name}` has no address"))),
    }
}

/// Set in the environment, this refuses every AF_VSOCK socket: the test
/// harness sets it for the processes it starts on a development machine,
/// whose vsock leads to infrastructure that is not ours.
pub const NO_VSOCK_ENV: &str = "VSOCK_RELAY_NO_VSOCK";

fn new_socket(addr: &SockAddr) -> io::Result<Socket> {
    if addr.domain() == Domain::VSOCK && std::env::var_os(NO_VSOCK_ENV).is_some() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("AF_VSOCK is disabled here ({NO_VSOCK_ENV} is set)"),
        ));
    }
    let socket = Socket::new(addr.domain(), Type::STREAM.nonblocking().cloexec(), None)?;
    Ok(socket)
}

/// Whether this process may make an AF_VSOCK socket: makes one, binds and
/// connects nothing, and closes it. `vsock-relay doctor`'s probe; the
/// error is the one a listener would meet (no transport, a seccomp filter,
/// [`NO_VSOCK_ENV`]), with its hint.
pub fn probe_vsock_socket() -> io::Result<()> {
    let any = Endpoint::vsock(crate::endpoint::VSOCK_CID_ANY, 0);
    new_socket(&SockAddr::vsock(crate::endpoint::VSOCK_CID_ANY, 0))
        .map(drop)
        .map_err(|e| hint::with_hint(Step::Listen, &any, e))
}

/// The socket family of an endpoint.
pub fn domain(endpoint: &Endpoint) -> Domain {
    match endpoint {
        Endpoint::Vsock { .. } => Domain::VSOCK,
        Endpoint::Tcp { host: Host::Ip(ip), .. } if ip.is_ipv6() => Domain::IPV6,
        Endpoint::Tcp { .. } => Domain::IPV4,
        Endpoint::Unix { .. } => Domain::UNIX,
    }
}

/// Applies [`SocketOptions`] to a socket its listener accepted, of the
/// listener's `family`: vsock sockets inherit the listener's buffer size,
/// so only TCP needs a call.
pub fn tune_accepted(socket: &Socket, family: Domain, options: &SocketOptions) -> io::Result<()> {
    match family {
        Domain::IPV4 | Domain::IPV6 if options.tcp_nodelay => socket.set_tcp_nodelay(true),
        _ => Ok(()),
    }
}

/// Applies [`SocketOptions`] to a connected or accepted socket.
pub fn tune(socket: &Socket, options: &SocketOptions) -> io::Result<()> {
    tune_family(socket, socket.domain()?, options)
}

fn tune_family(socket: &Socket, family: Domain, options: &SocketOptions) -> io::Result<()> {
    match family {
        Domain::IPV4 | Domain::IPV6 if options.tcp_nodelay => socket.set_tcp_nodelay(true),
        Domain::VSOCK => match options.vsock_buffer_size {
            Some(bytes) => sys::set_vsock_buffer_size(socket.as_fd(), bytes),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Opens a listening socket on `endpoint`. Never with SO_REUSEPORT: the
/// address has one owner, and a second listener gets "address in use"
/// (threads share the one socket instead). A failure keeps its OS error and
/// adds what to do about it ([`hint`]).
pub fn listen(endpoint: &Endpoint, options: &SocketOptions) -> io::Result<Socket> {
    open_listener(endpoint, options).map_err(|e| hint::with_hint(Step::Listen, endpoint, e))
}

fn open_listener(endpoint: &Endpoint, options: &SocketOptions) -> io::Result<Socket> {
    let addr = sockaddr(endpoint)?;
    if let Endpoint::Unix { path } = endpoint {
        remove_stale_unix_socket(path)?;
    }
    let socket = new_socket(&addr)?;
    if matches!(endpoint, Endpoint::Tcp { .. }) {
        socket.set_reuse_address(true)?;
        if let Endpoint::Tcp { host: Host::Ip(std::net::IpAddr::V6(_)), .. } = endpoint {
            socket.set_only_v6(true)?;
        }
    }
    if matches!(endpoint, Endpoint::Vsock { .. }) {
        // Accepted vsock sockets inherit the listener's buffer size.
        tune_family(&socket, Domain::VSOCK, options)?;
    }
    socket.bind(&addr)?;
    socket.listen(options.backlog)?;
    Ok(socket)
}

/// The endpoint a listener is actually bound to (the real port after port 0).
pub fn local_endpoint(listener: &Socket, requested: &Endpoint) -> io::Result<Endpoint> {
    let addr = listener.local_addr()?;
    Ok(match (requested, addr.as_socket(), addr.as_vsock_address()) {
        (Endpoint::Tcp { .. }, Some(sa), _) => Endpoint::tcp(sa),
        (Endpoint::Vsock { .. }, _, Some((cid, port))) => Endpoint::vsock(cid, port),
        _ => requested.clone(),
    })
}

/// A Unix socket file left behind by a process that died cannot be bound
/// again; remove it, but only when nobody is listening on it. A process
/// killed a moment ago may still listen for a few milliseconds (the kernel
/// tears its io_uring down asynchronously), so a live listener is asked
/// again for up to a second before bind is left to report it.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for _ in 0..20 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return Ok(());
        };
        if !meta.file_type().is_socket() {
            return Ok(()); // bind will report "address in use"; never delete a regular file
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return std::fs::remove_file(path),
            Err(_) => return Ok(()),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    Ok(())
}

/// A new non-blocking socket of `addr`'s family, tuned for relaying
/// (TCP_NODELAY and the vsock buffer size apply before the connect too).
pub fn socket_for(addr: &SockAddr, options: &SocketOptions) -> io::Result<Socket> {
    let socket = new_socket(addr)?;
    tune_family(&socket, addr.domain(), options)?;
    Ok(socket)
}

/// Starts a non-blocking connect. `Ok(true)`: connected already (Unix
/// sockets usually are); `Ok(false)`: in progress, so wait for writability
/// and then call [`finish_connect`].
pub fn start_connect(socket: &Socket, addr: &SockAddr) -> io::Result<bool> {
    match socket.connect(addr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        // vsock may answer EALREADY for a connect still in progress (seen on
        // virtio vsock in the guests of tests/vm: a second connect call
        // while the first is pending).
        Err(e) if e.raw_os_error() == Some(libc::EALREADY) => Ok(false),
        // A Unix listener with a full backlog refuses a non-blocking connect.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && addr.domain() == Domain::UNIX => {
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, "unix listener backlog is full"))
        }
        Err(e) => Err(e),
    }
}

/// After a pending connect became writable: did it succeed? `None` when it
/// is still in progress. A connecting vsock socket can report writable
/// before it is connected, so for vsock (`ask_peer`) the peer is asked too:
/// a system call per connection that TCP needs not make (it reports
/// writable only once connected or failed).
pub fn finish_connect(socket: &Socket, ask_peer: bool) -> Option<io::Result<()>> {
    match socket.take_error() {
        Err(e) | Ok(Some(e)) => Some(Err(e)),
        Ok(None) if !ask_peer => Some(Ok(())),
        Ok(None) => match socket.peer_addr() {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
            result => Some(result.map(drop)),
        },
    }
}

/// Right after a TCP or Unix connect said "in progress": is it done
/// already? On loopback the handshake completes before `connect` returns,
/// so an epoll relay can go on at once instead of after its next wait
/// (`poll` with no wait; one call wasted where the upstream is far).
/// `None`: still in progress. Never for vsock, whose writable report may
/// come before the connect (see [`finish_connect`]).
pub fn connected_now(socket: &Socket) -> Option<io::Result<()>> {
    let revents = match sys::poll_now(socket.as_fd(), libc::POLLOUT) {
        Ok(revents) => revents,
        Err(e) => return Some(Err(e)),
    };
    if revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        finish_connect(socket, false)
    } else if revents & libc::POLLOUT != 0 {
        Some(Ok(()))
    } else {
        None
    }
}

/// Arms a reset: with `SO_LINGER {1, 0}`, closing the socket sends RST
/// instead of FIN. An error only means the socket is already gone.
pub fn reset(socket: &Socket) {
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
}

/// A connected socket's peer as text (a system call), if it has one.
pub fn peer_name(socket: &Socket) -> Option<String> {
    socket.peer_addr().ok().map(|addr| describe(&addr))
}

/// A socket address as text, in the endpoint form where it has one.
pub fn describe(addr: &SockAddr) -> String {
    endpoint_of(addr).map_or_else(|| "unix:(unnamed)".to_string(), |endpoint| endpoint.to_string())
}

/// The endpoint of a socket address (`None` for an unnamed Unix socket).
pub fn endpoint_of(addr: &SockAddr) -> Option<Endpoint> {
    if let Some(sa) = addr.as_socket() {
        Some(Endpoint::tcp(sa))
    } else if let Some((cid, port)) = addr.as_vsock_address() {
        Some(Endpoint::vsock(cid, port))
    } else {
        addr.as_pathname().map(|path| Endpoint::Unix { path: path.to_path_buf() })
    }
}
