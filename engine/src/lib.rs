//! The vsock-relay engine: moves bytes between AF_VSOCK, TCP and Unix stream
//! sockets at nearly the speed of a direct connection.
//!
//! Layout, in the order data flows:
//! - [`endpoint`]: the one text form for every socket (`vsock:`, `tcp:`, `unix:`).
//! - [`socket`]: listen and connect with the options a relay wants.
//! - [`target`] and [`dns`]: where upstream connections go; names follow DNS TTLs.
//! - [`relay`]: a listener, a target and worker threads; what apps start.
//! - `backend`: how workers wait (io_uring); [`conn`] and [`pump`]: what they
//!   do with a connection, shared by every backend.
//! - [`pool`]: pipes and buffers lent to pumps only while bytes are in flight.
//! - [`stats`] and [`error`]: counters, and errors that say which side failed.
//!
//! `unsafe` lives in `ring` (io_uring submission) and `sys` (raw syscalls).

pub mod backend;
pub mod conn;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod pool;
pub mod pump;
pub mod relay;
mod ring;
pub mod socket;
pub mod stats;
mod sys;
pub mod target;

pub use backend::{Backend, BackendChoice};
pub use dns::{DnsOptions, IpFamily};
pub use endpoint::{Endpoint, Host};
pub use error::{ConnError, Error, Side};
pub use pump::DataPath;
pub use relay::{Relay, RelayConfig, StopHandle};
pub use stats::{Stats, StatsSnapshot};
pub use target::Target;

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
