//! Network namespaces for tests whose failure could send a packet off the
//! machine (a refusal of the instance metadata address that did not
//! happen): the test runs where only loopback exists, so a connect that
//! should never have been tried reaches nothing.

use std::io;

/// Runs `f` on a thread of its own in a new network namespace with only
/// the loopback interface, up. Threads, sockets and processes `f` starts
/// are in that namespace too. `Err` when a namespace cannot be made here
/// (it needs root, or a user namespace).
pub fn in_empty_network<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only
                // this thread (a new one, owned by this scope) to a new
                // namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                vsock_relay_engine::bring_up_loopback()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
