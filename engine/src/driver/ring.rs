//! The io_uring ring of one worker: a thin face over submission, and with
//! `sys` the engine's unsafe fence.
//!
//! The operations submitted reference no user memory (polls, cancels), or
//! only the ring's own provided buffers (receives and sends of the ring
//! data path), which live as long as the ring. What the kernel does keep
//! after a submission is a descriptor number (and, for a send, which
//! buffer), so the functions that submit one are `unsafe fn`:
//! the caller promises the descriptor stays open until the operation's last
//! completion has been reaped (the io_uring driver keeps that promise; see
//! `driver::Driver`). A send's buffer cannot return to the ring early: the
//! send takes its token, which the driver holds until the completion.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::buffers::{BufferRing, ProvidedBuffer};

/// One completed operation. Neither `Copy` nor `Clone`: it may own a ring
/// buffer.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    /// The provided buffer a receive filled.
    pub buffer: Option<ProvidedBuffer>,
}

/// The opcodes the driver needs, probed at start.
const REQUIRED_OPCODES: [(u8, &str); 2] =
    [(opcode::PollAdd::CODE, "POLL_ADD"), (opcode::AsyncCancel::CODE, "ASYNC_CANCEL")];

/// The oldest kernel the driver runs on: a floor we test from, not a
/// requirement of each opcode (polls are 5.1, exclusive polls 5.9, timed
/// waits 5.11; the optional buffer ring wants DEFER_TASKRUN, 6.1). Older
/// kernels get the epoll driver.
const MIN_KERNEL: (u32, u32) = (5, 19);

/// `io_uring_enter` flag: collect completions (linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Why io_uring cannot run here.
#[derive(Debug)]
pub enum Unavailable {
    /// The kernel refused to set up a ring (missing, seccomp, sysctl).
    Setup(io::Error),
    /// The kernel would not say which opcodes it has.
    Probe(io::Error),
    /// An opcode the driver needs is missing.
    Opcode(&'static str),
    /// The kernel cannot wait with a timeout (IORING_FEAT_EXT_ARG, 5.11).
    NoTimedWait,
    /// The kernel is older than the driver needs.
    Kernel { major: u32, minor: u32 },
    /// The probe thread could not run.
    ProbeThread(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::Setup(e) => write!(f, "io_uring_setup failed: {e}"),
            Unavailable::Probe(e) => write!(f, "cannot probe io_uring opcodes: {e}"),
            Unavailable::Opcode(name) => write!(f, "the kernel lacks io_uring opcode {name}"),
            Unavailable::NoTimedWait => f.write_str("the kernel cannot wait on io_uring with a timeout"),
            Unavailable::Kernel { major, minor } => write!(
                f,
                "Linux {major}.{minor} is older than the io_uring backend supports ({}.{} or newer)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            Unavailable::ProbeThread(why) => write!(f, "the io_uring probe failed: {why}"),
        }
    }
}

/// The buffer group id of the worker's provided-buffer ring.
const BUFFER_GROUP: u16 = 0;

pub struct Ring {
    /// Declared first, so closed before `buffers` is freed.
    ring: IoUring,
    /// Set up with SINGLE_ISSUER and DEFER_TASKRUN: required by the buffers.
    deferred: bool,
    buffers: Option<BufferRing>,
}

impl Ring {
    /// A ring of `entries` submissions, with the setup flags that help a
    /// single-threaded event loop where the kernel accepts them.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let cq_entries = entries.saturating_mul(8);
        let deferred = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(entries);
        Ok(match deferred {
            Ok(ring) => Ring { ring, deferred: true, buffers: None },
            Err(_) => Ring {
                ring: IoUring::builder().setup_cqsize(cq_entries).build(entries)?,
                deferred: false,
                buffers: None,
            },
        })
    }

    /// Registers a provided-buffer ring of `count` buffers of `bytes` each
    /// for [`Ring::receive`]. Needs DEFER_TASKRUN (Linux 6.1) and buffer
    /// rings (5.19).
    pub fn register_buffers(&mut self, count: u16, bytes: u32) -> io::Result<()> {
        if !self.deferred {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the ring has no DEFER_TASKRUN"));
        }
        let buffers = BufferRing::new(count, bytes)?;
        // SAFETY: the entries live in `buffers`, which this ring keeps until
        // it is closed (field order), page-aligned as the kernel requires.
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                buffers.ring_address(),
                buffers.count(),
                BUFFER_GROUP,
                0,
            )?
        };
        self.buffers = Some(buffers);
        Ok(())
    }

    pub fn has_buffers(&self) -> bool {
        self.buffers.is_some()
    }

    /// One receive from `fd` into a buffer the kernel picks from the ring;
    /// its completion names the buffer.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until this receive's completion has been reaped.
    pub unsafe fn receive(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let bytes = self.buffers.as_ref().map_or(0, BufferRing::buffer_bytes);
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), bytes)
            .buf_group(BUFFER_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        self.push(&entry)
    }

    /// Sends `len` bytes of `buffer`, from `offset`, to `fd`.
    ///
    /// # Safety
    ///
    /// `fd` must stay open, and `buffer`'s token must be kept (not dropped),
    /// until this send's completion has been reaped.
    pub unsafe fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        buffer: &ProvidedBuffer,
        offset: u32,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let Some(buffers) = &self.buffers else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no buffer ring"));
        };
        let len = len.min(buffers.buffer_bytes().saturating_sub(offset));
        let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), buffers.address_of(buffer, offset), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Checks that this kernel lets us set up a ring with every opcode and
    /// feature the driver uses, and is recent enough (`MIN_KERNEL`).
    pub fn probe() -> Result<(), Unavailable> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers =
            release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
        let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let ring = IoUring::new(8).map_err(Unavailable::Setup)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(Unavailable::Probe)?;
        if let Some((_, name)) = REQUIRED_OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(Unavailable::Opcode(name));
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(Unavailable::NoTimedWait);
        }
        if (major, minor) < MIN_KERNEL {
            return Err(Unavailable::Kernel { major, minor });
        }
        Ok(())
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the memory an entry built in this module references
            // is the ring's own: a send's bytes in the provided-buffer ring,
            // mapped as long as the ring, whose token the caller keeps until
            // the completion (`Ring::send`); a receive's buffer is picked by
            // the kernel from those it was given. Descriptors are kept open
            // by the callers of the `unsafe fn`s, as their contracts say.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The queue is full: hand what is queued to the kernel, retry.
            self.ring.submit()?;
        }
    }

    /// A one-shot poll for `events` (POLLIN, POLLOUT) on `fd`.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until this poll's completion has been reaped
    /// (after a cancel, too: the cancelled poll still completes).
    pub unsafe fn poll(&mut self, fd: BorrowedFd<'_>, events: u32, user_data: u64) -> io::Result<()> {
        self.push(&opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events).build().user_data(user_data))
    }

    /// Asks the kernel to cancel the operation submitted with `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.push(&opcode::AsyncCancel::new(target).build().user_data(user_data))
    }

    /// Submits what is queued and waits for a completion: at most `timeout`
    /// (`None`: as long as it takes). With `Some(ZERO)` it only lets the
    /// kernel post finished work (with DEFER_TASKRUN it does so only when
    /// asked) and never sleeps.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if let Some(buffers) = &mut self.buffers {
            buffers.publish();
        }
        let result = match timeout {
            None => self.ring.submit_and_wait(1).map(drop),
            Some(Duration::ZERO) => self.ring.submit().and_then(|_| {
                // SAFETY: an enter with GETEVENTS, nothing to submit, no
                // minimum and no argument passes no memory to the kernel.
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None) }
                    .map(drop)
            }),
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args).map(drop)
            }
        };
        match result {
            // Timed out, interrupted by a signal, or the completion queue is
            // full: either way the caller reaps completions and comes back.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(()),
            other => other,
        }
    }

    /// Moves every available completion into `out`; a receive's buffer
    /// comes as a token its owner holds.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let buffers = &self.buffers;
        out.extend(self.ring.completion().map(|cqe| {
            Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                buffer: cqueue::buffer_select(cqe.flags())
                    .and_then(|id| buffers.as_ref().map(|buffers| buffers.lend(id))),
            }
        }));
    }
}
