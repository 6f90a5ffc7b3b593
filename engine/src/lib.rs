//! The vsock-relay engine: moves bytes between AF_VSOCK, TCP and Unix stream
//! sockets at nearly the speed of a direct connection.
//!
//! Layout, in the order data flows (docs/ARCHITECTURE.md has the picture):
//! - [`endpoint`]: the one text form for every socket (`vsock:`, `tcp:`, `unix:`).
//! - [`socket`]: listen and connect with the options a relay wants.
//! - [`target`] and [`dns`]: where upstream connections go; names follow DNS TTLs.
//! - [`route`]: services whose clients name their destination (HTTP
//!   CONNECT, SOCKS5, TLS SNI), decided by a policy off the workers;
//!   [`proxy_header`]: the PROXY protocol v2 header.
//! - `config` and `relay`: what apps describe ([`RelayConfig`]) and start
//!   ([`Relay`]): services (a listener and a target each), worker threads.
//! - `worker`: the one event loop each worker thread runs, over a driver
//!   (`driver/`: io_uring or epoll) that only waits and reports events.
//! - `conn`: what a worker does with a connection (its states, and each
//!   direction's mover: splice or copy, or the io_uring buffer ring), the
//!   same for every driver.
//! - `vocab`: the words worker, connections and drivers share; imports
//!   point one way, down to it (`.ci/module-cycles` checks).
//! - `pool`: pipes and buffers lent to pumps only while bytes are in flight.
//! - [`labels`]: enums the outside world reads by name (metric labels,
//!   command-line values), each declared from one table of labels and help.
//! - [`stats`] and [`error`]: counters, and errors that say which side failed;
//!   [`hint`]: what to do about a socket that would not open, bind or
//!   connect, from what [`machine`] reads of this machine's vsock and sockets.
//!
//! `unsafe` lives in `driver/ring.rs` (io_uring submission),
//! `driver/buffers.rs` (the provided buffer ring) and `sys` (raw syscalls);
//! the io_uring driver calls the ring's `unsafe fn`s under the contract of
//! the driver trait.

#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_lossless
)]

// First: its `labelled!` declares the enums of the modules below.
#[macro_use]
pub mod labels;

mod config;
mod conn;
pub mod dns;
mod driver;
pub mod endpoint;
pub mod error;
pub mod hint;
pub mod machine;
mod pool;
pub mod proxy_header;
mod relay;
pub mod route;
pub mod socket;
pub mod stats;
mod sys;
pub mod target;
mod throttle;
mod vocab;
mod worker;

pub use config::{
    ClientRules, Gate, ProxyProtocol, RelayConfig, Service, Upstream, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_PIPE_BYTES,
};
pub use dns::{DnsOptions, IpFamily};
pub use driver::ring::Unavailable as UringUnavailable;
pub use driver::{probe_uring, Backend, BackendChoice};
pub use endpoint::{Endpoint, Host};
pub use error::{ConnError, Error, Side};
pub use relay::{Relay, StopHandle};
pub use route::{Asked, Decision, Peer, Policy, Route, RouteKind};
pub use stats::{Failure, RefusedBy, Stats, StatsSnapshot};
pub use target::Target;
pub use vocab::DataPath;

/// Raises the soft open-files limit to the hard limit (see [`Relay::start`],
/// which does it too); for tools and tests that open many sockets themselves.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    sys::raise_open_files_limit()
}

/// Brings the loopback interface up if it is down (the enclave boots with
/// it down); returns whether it changed anything.
pub fn bring_up_loopback() -> std::io::Result<bool> {
    sys::interface_up("lo")
}
