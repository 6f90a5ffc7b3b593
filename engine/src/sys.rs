//! Raw system calls that neither `std` nor `socket2` wrap: pipes, splice,
//! a non-blocking accept, an exclusive epoll watch, a poll that does not
//! wait, eventfd, the vsock buffer option, the local vsock CID, vsock addresses
//! with the to-host flag, the open-files limit, bringing a network
//! interface up and a redirected connection's original destination. With `driver/ring.rs` and `driver/buffers.rs`
//! this is the engine's unsafe fence: every function here is safe to call and
//! each `unsafe` block says which invariant holds.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a non-blocking, close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe capacity of `bytes`; returns the capacity the kernel set.
pub fn set_pipe_size(pipe: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    let set = check(unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) })?;
    Ok(usize::try_from(set).unwrap_or_default())
}

/// One non-blocking `splice(2)` of at most `len` bytes from `from` to `to`.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets mean "use the file position"; the fds are borrowed
    // and so stay open for the duration of the call.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    // A negative count is the error return; the rest fits in usize.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Accepts a client of `listener` as a non-blocking, close-on-exec socket
/// in one system call (`accept4`; socket2's accept needs two `fcntl` more
/// per client to make it non-blocking).
pub fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers ask for no peer address; the listener is
    // borrowed and so stays open for the duration of the call.
    let fd = check(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 succeeded, so `fd` is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches `fd` in the epoll instance `epoll` for readable edges, reported
/// as `data`, with EPOLLEXCLUSIVE: a listener shared by every worker then
/// wakes one waiting worker per client, not all of them (mio has no flag
/// for it; it reads any registration's events alike).
pub fn epoll_add_exclusive(epoll: &impl AsRawFd, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
    // The flags are bit masks; the cast keeps their bits.
    #[allow(clippy::cast_sign_loss)]
    let events = (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32;
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: `event` is a valid epoll_event the kernel only reads; both
    // descriptors are borrowed (a wrong one is the kernel's EBADF, no more).
    check(unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) })?;
    Ok(())
}

/// The readiness `poll(2)` reports for `fd` now, without waiting: its
/// `revents` for `events`.
pub fn poll_now(fd: BorrowedFd<'_>, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut entry = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: `entry` is one valid pollfd the kernel writes `revents` of; the
    // descriptor is borrowed and so stays open for the duration of the call.
    check(unsafe { libc::poll(&mut entry, 1, 0) })?;
    Ok(entry.revents)
}

/// A non-blocking, close-on-exec eventfd, used to wake a worker.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: eventfd succeeded, so `fd` is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the vsock credit window (`SO_VM_SOCKETS_BUFFER_MAX_SIZE`, then
/// `SO_VM_SOCKETS_BUFFER_SIZE`) of an AF_VSOCK socket.
pub fn set_vsock_buffer_size(socket: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
    const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;
    for option in [SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE] {
        // SAFETY: the option value is a u64 that lives across the call, and
        // its exact size is passed.
        check(unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::AF_VSOCK,
                option,
                (&bytes as *const u64).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or_default(),
            )
        })?;
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: a relay needs two
/// descriptors per connection and the usual soft limit of 1024 is far too low.
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit read just above.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(limit.rlim_cur)
}

/// Brings a network interface up (`ip link set NAME up`); returns whether it
/// was down. The enclave starts with its loopback interface down.
pub fn interface_up(name: &str) -> io::Result<bool> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= request.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name `{name}`")));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into the
    // ifreq we own for the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) })?;
    // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    // IFF_UP is bit 0: it fits the short flags field.
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    if flags & up != 0 {
        return Ok(false);
    }
    request.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from the ifreq we own.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) })?;
    Ok(true)
}

/// This machine's vsock CID from `/dev/vsock` (`IOCTL_VM_SOCKETS_GET_LOCAL_CID`):
/// a character device, not a socket, so asking connects to nothing.
/// `u32::MAX` (`VMADDR_CID_ANY`) when no transport gives this machine a CID.
pub fn vsock_local_cid() -> io::Result<u32> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let device = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = u32::MAX;
    // SAFETY: this ioctl writes one u32 into the variable we pass, which
    // lives across the call; the device stays open for it.
    check(unsafe { libc::ioctl(device.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) })?;
    Ok(cid)
}

/// Where a TCP connection redirected to this socket (iptables `REDIRECT`)
/// was going: `SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6 (both
/// option 80, at the socket's own level). Connection tracking answers it;
/// a connection it does not track is `ENOENT`.
pub fn original_destination(socket: BorrowedFd<'_>, ipv6: bool) -> io::Result<std::net::SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let level = if ipv6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    let mut storage = socket2::SockAddrStorage::zeroed();
    let mut length = storage.size_of();
    // SAFETY: the option writes at most `length` bytes (a sockaddr_in or
    // sockaddr_in6) into the storage, which lives across the call, and sets
    // `length` to what it wrote.
    check(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut socket2::SockAddrStorage).cast(),
            &mut length,
        )
    })?;
    // SAFETY: getsockopt succeeded: the storage holds an address of `length` bytes.
    let address = unsafe { socket2::SockAddr::new(storage, length) };
    address.as_socket().ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// A vsock address with `VMADDR_FLAG_TO_HOST` set: connect through the guest
/// transport even where a host transport (vhost_vsock) is loaded too.
/// socket2's `SockAddr::vsock` leaves the flags zero and libc's
/// `sockaddr_vm` still calls the flags byte `svm_zero[0]` (Linux 5.11 named
/// it `svm_flags`), so the address is written here.
pub fn vsock_addr_to_host(cid: u32, port: u32) -> socket2::SockAddr {
    const VMADDR_FLAG_TO_HOST: u8 = 0x01;
    let mut storage = socket2::SockAddrStorage::zeroed();
    // SAFETY: sockaddr_vm is one of this platform's sockaddr types, which
    // the zeroed storage is large and aligned enough to hold.
    let address = unsafe { storage.view_as::<libc::sockaddr_vm>() };
    address.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    address.svm_cid = cid;
    address.svm_port = port;
    address.svm_zero[0] = VMADDR_FLAG_TO_HOST;
    let length = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or_default();
    // SAFETY: the storage holds an initialised sockaddr_vm of that length.
    unsafe { socket2::SockAddr::new(storage, length) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_to_host_address_differs_from_the_plain_one_in_its_flag_only() {
        let flagged = vsock_addr_to_host(16, 5005);
        let plain = socket2::SockAddr::vsock(16, 5005);
        assert_eq!(flagged.as_vsock_address(), Some((16, 5005)));
        assert_eq!(flagged.len(), plain.len());
        assert_ne!(flagged, plain, "the flags byte is set");
    }

    #[test]
    fn an_accepted_client_is_non_blocking_and_an_empty_queue_would_block() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let error = accept_nonblocking(listener.as_fd()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepted = accept_nonblocking(listener.as_fd()).unwrap();
        // SAFETY: F_GETFL reads the descriptor's flags only.
        let flags = unsafe { libc::fcntl(accepted.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "flags {flags:#x}");
    }
}
