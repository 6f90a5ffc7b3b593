//! What a relay is asked to do: [`RelayConfig`], built by the apps from
//! their command lines and handed to [`crate::Relay::start`]. A relay serves
//! one or more [`Service`]s (a listener, an upstream, rules for its clients)
//! with one set of workers. A service's upstream is a fixed [`Target`], or a
//! [`Route`]: each client names its destination, a policy decides.
//!
//! A service's rules for its clients are one type, [`ClientRules`], that
//! the command line and a services file fill too (each rule optional), so
//! that a new rule is a field here, its flag, its key in the file and the
//! place the engine applies it; [`ClientRules::or`] lays a service's own
//! rules over the command line's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::dns::DnsOptions;
use crate::driver::BackendChoice;
use crate::endpoint::Endpoint;
use crate::route::Route;
use crate::socket::SocketOptions;
use crate::target::Target;
use crate::vocab::DataPath;

/// Default capacity asked for each pooled pipe.
pub const DEFAULT_PIPE_BYTES: usize = 1 << 20;
/// Default bound on an upstream connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a stopping relay lets open connections finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a service takes new clients. Closed (a reload found its target
/// no longer allowed), it resets them; its open connections go on.
/// Clones share the state.
#[derive(Clone, Debug)]
pub struct Gate(Arc<AtomicBool>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(AtomicBool::new(true)))
    }
}

impl Gate {
    pub fn set_open(&self, open: bool) {
        self.0.store(open, Ordering::Relaxed);
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a service's clients go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// Every client to one target.
    Fixed(Target),
    /// Each client to the destination it names, if the route's policy allows it.
    Routed(Route),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Fixed(target) => target.endpoint().fmt(f),
            Upstream::Routed(route) => write!(f, "route {}", route.kind),
        }
    }
}

labelled! {
    /// The PROXY protocol header a relay sends first on each upstream connection.
    pub enum ProxyProtocol as "PROXY protocol version" {
        Off = "none", "no header";
        V2 = "v2", "version 2, binary: the client's address for a server that expects it";
    }
}

/// The rules for a service's clients, each one optional (`None`: not
/// given, the default the field names). The same type holds a service's
/// rules in the engine, the command line's and a services file's entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientRules {
    /// Only clients from these vsock CIDs are served (vsock listeners
    /// only); others are reset. `None`: any CID.
    pub allow_cids: Option<Vec<u32>>,
    /// Beyond this many open connections of this service (all workers), new
    /// clients are reset. `None`: no limit but the descriptors.
    pub max_connections: Option<u64>,
    /// A connection with no byte moved either way for this long is reset.
    /// `None` (like AWS's proxy): never.
    pub idle_timeout: Option<Duration>,
    /// A PROXY protocol header first on each upstream connection (the
    /// client's address, for a server behind the relay). `None`: none.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl ClientRules {
    /// These rules, each one not given here taken from `fallback`: how a
    /// services file's entry is laid over the command line's rules.
    #[must_use]
    pub fn or(self, fallback: ClientRules) -> ClientRules {
        ClientRules {
            allow_cids: self.allow_cids.or(fallback.allow_cids),
            max_connections: self.max_connections.or(fallback.max_connections),
            idle_timeout: self.idle_timeout.or(fallback.idle_timeout),
            proxy_protocol: self.proxy_protocol.or(fallback.proxy_protocol),
        }
    }

    /// Whether a PROXY protocol v2 header goes first upstream.
    pub fn sends_proxy_header(&self) -> bool {
        self.proxy_protocol == Some(ProxyProtocol::V2)
    }
}

/// One listener, where its clients go, and the rules for its clients.
#[derive(Clone, Debug)]
pub struct Service {
    /// The service's name in logs and metrics (default: the listen endpoint).
    pub name: String,
    pub listen: Endpoint,
    pub upstream: Upstream,
    pub rules: ClientRules,
    /// The clients were redirected to this listener (iptables `REDIRECT`):
    /// each connection's PROXY v2 header names where its client was going
    /// (`SO_ORIGINAL_DST`) instead of the listener, whatever
    /// `rules.proxy_protocol` says; a client whose original destination
    /// cannot be read is reset. The parent's `transparent` route reads it.
    pub transparent: bool,
    /// Closed: new clients are reset (see [`Gate`]).
    pub gate: Gate,
}

impl Service {
    pub fn new(listen: Endpoint, target: Target) -> Self {
        Service::with_upstream(listen, Upstream::Fixed(target))
    }

    /// A service whose clients name their destination.
    pub fn routed(listen: Endpoint, route: Route) -> Self {
        Service::with_upstream(listen, Upstream::Routed(route))
    }

    /// The service's route, if its clients name their destination.
    pub fn route(&self) -> Option<&Route> {
        match &self.upstream {
            Upstream::Routed(route) => Some(route),
            Upstream::Fixed(_) => None,
        }
    }

    fn with_upstream(listen: Endpoint, upstream: Upstream) -> Self {
        Service {
            name: listen.to_string(),
            listen,
            upstream,
            rules: ClientRules::default(),
            transparent: false,
            gate: Gate::default(),
        }
    }
}

/// Everything a relay needs to run.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// At least one; each gets its own listener, all share the workers.
    pub services: Vec<Service>,
    /// Worker threads, each with its own driver (an io_uring ring, or
    /// epoll); 0 means one per core.
    pub workers: usize,
    pub backend: BackendChoice,
    /// How each direction moves bytes: `Auto` (by the families of both its
    /// sides: adaptive where either is vsock, else splice), `Splice`, `Copy`
    /// or `Ring` everywhere.
    pub data_path: DataPath,
    pub pipe_bytes: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub socket: SocketOptions,
    /// Before sleeping, a worker polls for new events this long. On a VM a
    /// sleep and wake-up of the relay costs more than a request/response
    /// hop; spinning saves it for CPU. Zero (the default) never spins.
    pub spin: Duration,
    /// How routed services resolve their clients' destinations.
    pub dns: DnsOptions,
}

impl RelayConfig {
    /// A relay of one service.
    pub fn new(listen: Endpoint, target: Target) -> Self {
        RelayConfig::of(vec![Service::new(listen, target)])
    }

    /// A relay of these services, with default settings.
    pub fn of(services: Vec<Service>) -> Self {
        RelayConfig {
            services,
            workers: 0,
            backend: BackendChoice::Auto,
            data_path: DataPath::Auto,
            pipe_bytes: DEFAULT_PIPE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            socket: SocketOptions::default(),
            spin: Duration::ZERO,
            dns: DnsOptions::default(),
        }
    }

    /// The first service (a relay has at least one).
    pub fn service(&mut self) -> &mut Service {
        &mut self.services[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_own_rules_lie_over_the_fallbacks() {
        let fallback = ClientRules {
            allow_cids: Some(vec![3]),
            max_connections: Some(10),
            idle_timeout: None,
            proxy_protocol: Some(ProxyProtocol::V2),
        };
        let own = ClientRules {
            allow_cids: None,
            max_connections: Some(2),
            idle_timeout: Some(Duration::from_secs(1)),
            proxy_protocol: Some(ProxyProtocol::Off),
        };
        let merged = own.or(fallback);
        assert_eq!(merged.allow_cids, Some(vec![3]), "not given: the fallback's");
        assert_eq!((merged.max_connections, merged.idle_timeout), (Some(2), Some(Duration::from_secs(1))));
        assert!(!merged.sends_proxy_header(), "an explicit `none` beats the fallback's v2");
        assert!(!ClientRules::default().sends_proxy_header());
    }
}
