//! What a relay is asked to do: [`RelayConfig`], built by the apps from
//! their command lines and handed to [`crate::Relay::start`].

use std::time::Duration;

use crate::driver::BackendChoice;
use crate::endpoint::Endpoint;
use crate::pump::DataPath;
use crate::socket::SocketOptions;
use crate::target::Target;

/// Default capacity asked for each pooled pipe.
pub const DEFAULT_PIPE_BYTES: usize = 1 << 20;
/// Default bound on an upstream connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a stopping relay lets open connections finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a relay needs to run.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: Endpoint,
    pub target: Target,
    /// Worker threads, each with its own ring; 0 means one per core.
    pub workers: usize,
    pub backend: BackendChoice,
    /// How each direction moves bytes: `Auto` (by the source's family),
    /// `Splice` or `Copy` everywhere.
    pub data_path: DataPath,
    pub pipe_bytes: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub socket: SocketOptions,
    /// Only clients from these vsock CIDs are served (vsock listeners
    /// only); others are reset. `None`: any CID.
    pub allow_cids: Option<Vec<u32>>,
    /// Beyond this many open connections (all workers), new clients are
    /// reset. `None`: no limit but the descriptors.
    pub max_connections: Option<u64>,
    /// A connection with no byte moved either way for this long is reset.
    /// `None` (the default, like AWS's proxy): never.
    pub idle_timeout: Option<Duration>,
    /// Before sleeping, a worker polls for new events this long. On a VM a
    /// sleep and wake-up of the relay costs more than a request/response
    /// hop; spinning saves it for CPU. Zero (the default) never spins.
    pub spin: Duration,
}

impl RelayConfig {
    pub fn new(listen: Endpoint, target: Target) -> Self {
        RelayConfig {
            listen,
            target,
            workers: 0,
            backend: BackendChoice::Auto,
            data_path: DataPath::Auto,
            pipe_bytes: DEFAULT_PIPE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            socket: SocketOptions::default(),
            spin: Duration::ZERO,
            allow_cids: None,
            max_connections: None,
            idle_timeout: None,
        }
    }
}
