//! The io_uring ring of one worker: a safe face over submission.
//!
//! Only operations that reference no user memory are submitted (polls,
//! multishot accept, cancels), except timeouts, whose `timespec` lives in
//! this struct for the ring's whole life. So no buffer is ever lent to the
//! kernel, and an operation still in flight when its connection is gone can
//! do no harm: its completion is matched by `user_data` and ignored.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use socket2::Socket;

/// One completed operation.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    /// A multishot operation stays armed and will complete again.
    pub more: bool,
}

/// The timers a worker uses; each has one `timespec` slot in the ring.
#[derive(Clone, Copy, Debug)]
pub enum Timer {
    /// Bounds an upstream connect (linked to its poll).
    Connect = 0,
    /// Delay before accepting again after the process ran out of descriptors.
    AcceptRetry = 1,
    /// How long a stopping worker waits for connections to finish.
    Drain = 2,
}

/// The opcodes the backend needs, probed at start.
const REQUIRED_OPCODES: [(u8, &str); 6] = [
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Nop::CODE, "NOP"),
];

/// `io_uring_enter` flag: collect completions (linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

pub struct Ring {
    ring: IoUring,
    /// Read by the kernel when a timeout is submitted; boxed so the address
    /// is stable while the `Ring` moves.
    timers: Box<[types::Timespec; 3]>,
}

impl Ring {
    /// A ring of `entries` submissions, with the setup flags that help a
    /// single-threaded event loop where the kernel accepts them.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let cq_entries = entries.saturating_mul(8);
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(cq_entries).build(entries))?;
        Ok(Ring { ring, timers: Box::new([types::Timespec::new(); 3]) })
    }

    /// Checks that this kernel lets us set up a ring with every opcode the
    /// backend uses, and is recent enough for multishot accept (5.19).
    pub fn probe() -> Result<(), String> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers =
            release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("cannot probe io_uring opcodes: {e}"))?;
        if let Some((_, name)) = REQUIRED_OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(format!("the kernel lacks io_uring opcode {name}"));
        }
        if version < (5, 19) {
            return Err(format!(
                "Linux {}.{} has no multishot accept (5.19 or newer needed)",
                version.0, version.1
            ));
        }
        Ok(())
    }

    pub fn set_timer(&mut self, timer: Timer, after: Duration) {
        self.timers[timer as usize] = types::Timespec::from(after);
    }

    fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: the entries reference no user memory except a timer's
            // timespec, which lives in `self.timers` as long as the ring.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            if pushed.is_ok() {
                return Ok(());
            }
            // The queue is full: hand what is queued to the kernel, retry.
            self.ring.submit()?;
        }
    }

    /// A one-shot poll for `events` (POLLIN, POLLOUT) on `fd`.
    pub fn poll(&mut self, fd: BorrowedFd<'_>, events: u32, user_data: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events).build().user_data(user_data);
        self.push(&[entry])
    }

    /// A one-shot poll that is cancelled (completes with ECANCELED) if it has
    /// not fired within `timer`'s duration.
    pub fn poll_with_timeout(
        &mut self,
        fd: BorrowedFd<'_>,
        events: u32,
        user_data: u64,
        timer: Timer,
        timeout_user_data: u64,
    ) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events)
            .build()
            .user_data(user_data)
            .flags(squeue::Flags::IO_LINK);
        let timeout =
            opcode::LinkTimeout::new(&self.timers[timer as usize]).build().user_data(timeout_user_data);
        self.push(&[poll, timeout])
    }

    /// A standalone timeout that completes (with ETIME) after `timer`'s duration.
    pub fn timeout(&mut self, timer: Timer, user_data: u64) -> io::Result<()> {
        let entry = opcode::Timeout::new(&self.timers[timer as usize]).build().user_data(user_data);
        self.push(&[entry])
    }

    /// A multishot accept: one completion per accepted connection, each a new
    /// non-blocking, close-on-exec socket.
    pub fn accept_multishot(&mut self, listener: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push(&[entry])
    }

    /// Asks the kernel to cancel the operation submitted with `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.push(&[opcode::AsyncCancel::new(target).build().user_data(user_data)])
    }

    /// Submits what is queued and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            // Interrupted by a signal, or the completion queue is full: either
            // way the caller reaps completions and comes back.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and lets the kernel post finished work (with
    /// DEFER_TASKRUN it does so only when asked), without sleeping; whether
    /// any completion is waiting.
    pub fn poll_completions(&mut self) -> io::Result<bool> {
        self.submit_and_wait(0)?;
        // SAFETY: an enter with GETEVENTS, nothing to submit, no minimum and
        // no argument passes no memory to the kernel.
        match unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None) } {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        Ok(!self.ring.completion().is_empty())
    }

    /// Moves every available completion into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.ring.completion().map(|cqe| Completion {
            user_data: cqe.user_data(),
            result: cqe.result(),
            more: cqueue::more(cqe.flags()),
        }));
    }
}

/// The socket created by a successful accept completion.
pub fn accepted_socket(completion: &Completion) -> Socket {
    debug_assert!(completion.result >= 0);
    // SAFETY: a non-negative accept result is a descriptor the kernel just
    // created for this process; nothing else owns it.
    Socket::from(unsafe { OwnedFd::from_raw_fd(completion.result) })
}
