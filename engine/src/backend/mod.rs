//! Backends wait for readiness; the connection logic they drive (`conn.rs`,
//! `pump.rs`) exists once. `uring` is the fast path (io_uring polls, accepts
//! and timeouts); `portable` runs on epoll where io_uring is missing or
//! refused: the Linux 4.14 enclave kernel, Docker's default seccomp profile,
//! `kernel.io_uring_disabled`. Both call non-blocking splice or copy on the
//! worker thread; only how they learn that a socket is ready differs.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use crate::conn::{Action, Connection, Ending, Event};
use crate::error::{ConnError, Error, Op, Side};
use crate::pool::Pools;
use crate::relay::{Control, RelayConfig, WorkerSetup};
use crate::socket;
use crate::stats::Stats;

mod portable;
mod uring;

/// The backend a user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else portable.
    #[default]
    Auto,
    /// io_uring, or an error if the kernel refuses it.
    Uring,
    /// epoll, even where io_uring would work.
    Portable,
}

/// The backend a relay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Portable,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Uring => "io_uring",
            Backend::Portable => "portable",
        })
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "portable" | "epoll" => Ok(BackendChoice::Portable),
            other => Err(format!("unknown backend `{other}`; expected auto, uring or portable")),
        }
    }
}

/// Probes the kernel and picks the backend; says in one log line which and why.
pub fn choose(choice: BackendChoice) -> Result<Backend, Error> {
    if choice == BackendChoice::Portable {
        tracing::info!(backend = "portable", "backend chosen: portable (asked for)");
        return Ok(Backend::Portable);
    }
    // Probe on a thread of its own: the kernel ties a ring to the thread that
    // set it up, and tearing the probe ring down later would interrupt that
    // thread's blocking system calls (EINTR) when it is the caller's.
    let probe = std::thread::Builder::new()
        .name("io_uring-probe".into())
        .spawn(crate::ring::Ring::probe)
        .map_err(Error::Start)?
        .join()
        .unwrap_or_else(|_| Err("the io_uring probe panicked".into()));
    match (probe, choice) {
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

impl Backend {
    pub(crate) fn run_worker(self, setup: WorkerSetup) -> Result<(), Error> {
        let index = setup.index;
        let control = Arc::clone(&setup.control);
        let result = match self {
            Backend::Uring => uring::run(setup),
            Backend::Portable => portable::run(setup),
        };
        if let Err(source) = result {
            tracing::error!(worker = index, error = %source, "worker failed; stopping the relay");
            control.stop();
            return Err(Error::Worker { worker: index, source });
        }
        Ok(())
    }
}

/// Pause before accepting again after running out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Idle pipes and buffers a worker keeps for reuse.
const POOL_MAX_IDLE: usize = 16;

/// What every worker has, whatever its backend: configuration, counters,
/// pools, and the steps of a connection's life that do not depend on how
/// readiness arrives.
pub(crate) struct WorkerCore {
    pub index: usize,
    pub config: Arc<RelayConfig>,
    pub stats: Arc<Stats>,
    pub control: Arc<Control>,
    pub pools: Pools,
    next_id: u64,
}

/// Is this accept error about resources (retry later) rather than one client?
fn out_of_resources(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl WorkerCore {
    fn new(setup: &WorkerSetup) -> Self {
        WorkerCore {
            index: setup.index,
            config: Arc::clone(&setup.config),
            stats: Arc::clone(&setup.stats),
            control: Arc::clone(&setup.control),
            pools: Pools::new(setup.config.pipe_bytes, POOL_MAX_IDLE),
            next_id: (setup.index as u64) << 48,
        }
    }

    fn stop_requested(&self) -> bool {
        self.control.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A new client: opens the upstream socket and starts the connect.
    /// Returns the connection and whether the connect already finished
    /// (`Ok(true)`), is in progress (`Ok(false)`) or failed; `None` when the
    /// client was turned away for want of a socket.
    fn open(&mut self, client: Socket) -> Option<(Connection, io::Result<bool>)> {
        if let Err(e) = socket::tune(&client, &self.config.socket) {
            tracing::debug!(error = %e, "cannot tune an accepted socket");
        }
        self.stats.opened();
        let target = self.config.target.current();
        let upstream = match socket::socket_for(&target, &self.config.socket) {
            Ok(upstream) => upstream,
            Err(e) => {
                // Out of descriptors, most likely: reset this client, serve the others.
                tracing::warn!(worker = self.index, error = %e, "cannot open an upstream socket; client reset");
                let _ = client.set_linger(Some(Duration::ZERO));
                self.stats.closed(true);
                return None;
            }
        };
        self.next_id += 1;
        let started = socket::start_connect(&upstream, &target);
        Some((Connection::new(self.next_id, client, upstream, self.config.data_path), started))
    }

    /// Runs a connection's state machine and counts the bytes it moved.
    fn handle(&mut self, conn: &mut Connection, event: Event) -> Action {
        let mut moved = [0u64; 2];
        let action = conn.handle(event, &mut self.pools, &mut moved);
        self.stats.moved(moved[0], moved[1]);
        action
    }

    /// Counts a closed connection and logs its one line: a warning when the
    /// upstream could not be reached (the operator's first question when a
    /// chain of relays fails), else at debug level.
    fn closed(&self, conn: &Connection, ending: &Ending) {
        self.stats.closed(matches!(ending, Ending::Failed(_)));
        if let Ending::Failed(ConnError { side: Side::Upstream, op: Op::Connect, source }) = ending {
            tracing::warn!(worker = self.index, client = %conn.client_name,
                upstream = %self.config.target.endpoint(), error = %source, "cannot reach the upstream; client reset");
            return;
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let (to_upstream, to_client) = conn.bytes();
            let outcome = match ending {
                Ending::Finished => "finished".to_string(),
                Ending::Failed(e) => e.to_string(),
            };
            tracing::debug!(worker = self.index, id = conn.id, client = %conn.client_name,
                upstream = %self.config.target.endpoint(), to_upstream, to_client,
                ms = conn.opened.elapsed().as_millis() as u64, %outcome, "connection closed");
        }
    }

    /// At the end of the drain time, connections still open are reset.
    fn abandon<'a>(&self, open: impl Iterator<Item = &'a Connection>) {
        let mut count = 0;
        for conn in open {
            let _ = conn.client.set_linger(Some(Duration::ZERO));
            let _ = conn.upstream.set_linger(Some(Duration::ZERO));
            count += 1;
        }
        if count > 0 {
            tracing::info!(worker = self.index, open = count, "drain time over; resetting open connections");
        }
    }
}
