//! Drivers: how a worker learns that something happened. The worker loop
//! (`worker/`) exists once; a driver only arms interest, waits and hands
//! back [`DriverEvent`]s. `uring` is the fast path (io_uring polls, the
//! waits batched with their re-arming); `epoll` runs where io_uring is
//! missing or refused: the Linux 4.14 enclave kernel, Docker's default
//! seccomp profile, `kernel.io_uring_disabled`.
//!
//! The completion-based data path (an io_uring buffer ring) is one more set
//! of driver calls ([`BufferRingOps`]) and events, handled by the same loop.

use std::fmt;
use std::io;
use std::time::Duration;

use socket2::Socket;

use crate::error::{Error, Side};
use crate::vocab::{BufferRingOps, Completed, Direction, Key, Readiness, Trigger};
use ring::{Ring, Unavailable};

pub(crate) mod buffers;
mod epoll;
pub(crate) mod ring;
mod uring;

pub(crate) use epoll::EpollDriver;
pub(crate) use uring::UringDriver;

labelled! {
    /// The backend a user asks for.
    #[derive(Default)]
    pub enum BackendChoice as "backend" {
        #[default]
        Auto = "auto", "io_uring when the kernel allows it, else epoll (the log says why)";
        Uring = "uring" | "io_uring", "io_uring, or exit 1 when the kernel refuses it";
        Portable = "portable" | "epoll", "epoll, even where io_uring would work";
    }
}

labelled! {
    /// The backend a relay runs.
    pub enum Backend as "running backend" {
        Uring = "io_uring", "io_uring: readiness polls and operations batched with the waits";
        Portable = "portable", "epoll";
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whether this kernel lets this process use the io_uring backend (setup,
/// the opcodes it needs, timed waits, the minimum kernel), and if not why.
/// What [`choose`] decides by, public so `--version` reports the same
/// verdict without starting a relay. Opens no socket.
pub fn probe_uring() -> Result<(), Unavailable> {
    // Probe on a thread of its own: the kernel ties a ring to the thread that
    // set it up, and tearing the probe ring down later would interrupt that
    // thread's blocking system calls (EINTR) when it is the caller's.
    match std::thread::Builder::new().name("io_uring-probe".into()).spawn(Ring::probe) {
        Ok(thread) => thread.join().unwrap_or_else(|_| Err(Unavailable::ProbeThread("it panicked".into()))),
        Err(e) => Err(Unavailable::ProbeThread(e.to_string())),
    }
}

/// Probes the kernel and picks the backend; says in one log line which and why.
pub fn choose(choice: BackendChoice) -> Result<Backend, Error> {
    if choice == BackendChoice::Portable {
        tracing::info!(backend = "portable", "backend chosen: portable (asked for)");
        return Ok(Backend::Portable);
    }
    match (probe_uring(), choice) {
        (Ok(()), _) => {
            tracing::info!(backend = "io_uring", "backend chosen: io_uring (setup and opcode probe passed)");
            Ok(Backend::Uring)
        }
        (Err(why), BackendChoice::Uring) => Err(Error::UringUnavailable(why)),
        (Err(why), _) => {
            tracing::info!(backend = "portable", reason = %why, "backend chosen: portable, io_uring unavailable: {why}");
            Ok(Backend::Portable)
        }
    }
}

/// Most clients a driver accepts from one listener per wake-up: a burst is
/// taken in a few system calls without starving the connections already
/// open of their turn (the rest of the backlog waits for the next round).
pub(crate) const ACCEPTS_PER_WAKE: usize = 32;

/// What a driver hands back from a wait.
#[derive(Debug)]
pub(crate) enum DriverEvent {
    /// A service's listener produced a client (or an accept error).
    Accepted { service: usize, client: io::Result<Socket> },
    /// The worker's eventfd was written: look at the stop flag.
    Woken,
    /// A socket of a connection is ready as described.
    Ready { key: Key, side: Side, readiness: Readiness },
    /// A receive or send of the ring data path completed.
    Completed { key: Key, direction: Direction, completed: Completed },
    /// Every operation on a released connection has ended: its sockets may close.
    Released(Key),
}

/// How a worker waits. The contract between the loop and a driver:
///
/// - The loop calls [`Driver::register`] for a new connection (and
///   [`Driver::add_upstream`] once it has an upstream socket) and
///   [`Driver::watch`] whenever one of its directions waits for a socket;
///   a watch reports [`DriverEvent::Ready`] once (a driver may also report
///   readiness that was not asked for; the loop ignores what no direction
///   waits for).
/// - The loop keeps a connection's sockets open from `register` until
///   [`Driver::release`] returned `true` or the driver reported
///   [`DriverEvent::Released`] for it. The io_uring driver's safety rests on
///   this: the kernel may use a socket until its operation completes.
pub(crate) trait Driver {
    /// How readiness is reported: while it lasts (io_uring polls) or once
    /// per change (epoll's edges).
    fn trigger(&self) -> Trigger;

    /// Starts watching a new connection, its client socket first.
    fn register(&mut self, key: Key, client: &Socket) -> io::Result<()>;

    /// Adds a connection's upstream socket (opened at the accept, or once a
    /// routed connection's destination is decided).
    fn add_upstream(&mut self, key: Key, upstream: &Socket) -> io::Result<()>;

    /// Reports when `socket` (the connection's `side`) is ready as `wanted`.
    fn watch(&mut self, key: Key, socket: &Socket, side: Side, wanted: Readiness) -> io::Result<()>;

    /// The connection ended. `true`: its sockets may close now; `false`:
    /// wait for [`DriverEvent::Released`].
    fn release(&mut self, key: Key) -> io::Result<bool>;

    /// Stops accepting for good (the relay is stopping).
    fn stop_accepting(&mut self) -> io::Result<()>;

    /// Stops accepting until [`Driver::resume_accepting`] (out of descriptors).
    fn pause_accepting(&mut self);

    fn resume_accepting(&mut self);

    /// The ring data path's operations, where this driver has them.
    fn buffer_ring(&mut self) -> Option<&mut dyn BufferRingOps>;

    /// Submits what is pending and waits at most `timeout` (`None`: until
    /// something happens; zero: not at all) for events, appended to `events`.
    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<DriverEvent>) -> io::Result<()>;
}
