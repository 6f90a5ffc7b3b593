//! The upstream a relay connects to: a fixed address, or a host name whose
//! address is refreshed in the background when its DNS TTL runs out.
//!
//! Workers read the current address with one uncontended lock per
//! connection; resolution never happens on the accept or data path. A failed
//! refresh keeps the last good address and logs a warning (AWS's proxy dies
//! there), then retries with a growing delay. A [`Vet`] (the proxy's
//! allowlist) may refuse a new address: the last vetted one stays in use.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use socket2::SockAddr;

use crate::dns::{DnsError, DnsOptions, Resolution, Resolver};
use crate::endpoint::{Endpoint, Host};
use crate::error::Error;
use crate::socket;

/// Shortest pause between two lookups, whatever the TTL says (TTL 0 exists).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest an address is used without asking again.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Longest pause between retries of a failing lookup.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// Decides whether a refresh may switch to a new address; `Err` says why
/// not. Runs on the refresh thread, with the target's resolver at hand (an
/// allowlist entry given by name is resolved again each time).
pub type Vet = Box<dyn Fn(&Resolver, IpAddr) -> Result<(), String> + Send>;

/// Where upstream connections go. Cheap to clone; clones share the address.
#[derive(Clone)]
pub struct Target {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    current: RwLock<SockAddr>,
    changes: AtomicU64,
    lookup_failures: AtomicU64,
    moves_refused: AtomicU64,
    /// Dropping the last `Target` drops this sender, which ends the refresh thread.
    _stop_refresh: Option<mpsc::Sender<()>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.shared.endpoint)
    }
}

impl Target {
    /// A target that never changes address (vsock, unix, TCP to an IP, or a
    /// name resolved once by the system resolver).
    pub fn fixed(endpoint: &Endpoint) -> Result<Target, Error> {
        let addr = socket::sockaddr(endpoint)
            .map_err(|e| Error::Resolve { name: endpoint.to_string(), source: DnsError::System(e) })?;
        Ok(Target::with(endpoint.clone(), addr, None))
    }

    /// A target for `endpoint`: fixed unless it is a TCP host name, which is
    /// resolved now with `dns` and refreshed whenever its TTL expires.
    pub fn new(endpoint: &Endpoint, dns: &DnsOptions) -> Result<Target, Error> {
        let Endpoint::Tcp { host: Host::Name(name), port } = endpoint else {
            return Target::fixed(endpoint);
        };
        let resolve_error = |source| Error::Resolve { name: name.clone(), source };
        let resolver = Resolver::new(dns).map_err(resolve_error)?;
        let first = resolver.resolve(name).map_err(resolve_error)?;
        Ok(Target::follow(endpoint.clone(), *port, resolver, first, None))
    }

    /// A target for a name already resolved to `first` by `resolver` (whose
    /// first address the caller vetted, if it vets): connections go to the
    /// first address of each resolution that `vet` lets through.
    pub fn follow(
        endpoint: Endpoint,
        port: u16,
        resolver: Resolver,
        first: Resolution,
        vet: Option<Vet>,
    ) -> Target {
        let name = match &endpoint {
            Endpoint::Tcp { host, .. } => host.to_string(),
            other => other.to_string(),
        };
        let (stop_tx, stop_rx) = mpsc::channel();
        let target = Target::with(endpoint, sockaddr(first.addresses[0], port), Some(stop_tx));
        tracing::info!(%name, address = %first.addresses[0], ttl_s = first.ttl().as_secs(), "upstream resolved");
        let weak = Arc::downgrade(&target.shared);
        let spawned = std::thread::Builder::new().name("dns-refresh".into()).spawn(move || {
            let mut wait = first.ttl().clamp(MIN_REFRESH, MAX_REFRESH);
            let mut retry = MIN_REFRESH;
            // Logged once while DNS keeps answering it.
            let mut last_refused = None;
            loop {
                match stop_rx.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Some(shared) = weak.upgrade() else { return };
                match resolver.resolve(&name) {
                    Ok(resolution) => {
                        let address = resolution.addresses[0];
                        let next = sockaddr(address, port);
                        let kept = shared.current.read().unwrap_or_else(|e| e.into_inner()).clone();
                        if kept.as_socket() != next.as_socket() {
                            match vet.as_ref().map_or(Ok(()), |vet| vet(&resolver, address)) {
                                Ok(()) => {
                                    tracing::info!(%name, %address, "upstream address changed");
                                    *shared.current.write().unwrap_or_else(|e| e.into_inner()) = next;
                                    shared.changes.fetch_add(1, Relaxed);
                                    last_refused = None;
                                }
                                Err(reason) => {
                                    shared.moves_refused.fetch_add(1, Relaxed);
                                    if last_refused != Some(address) {
                                        tracing::error!(%name, %address, %reason, kept = %socket::describe(&kept),
                                            "refusing the upstream's new address; keeping the last allowed one");
                                        last_refused = Some(address);
                                    }
                                }
                            }
                        }
                        wait = resolution.ttl().clamp(MIN_REFRESH, MAX_REFRESH);
                        retry = MIN_REFRESH;
                    }
                    Err(reason) => {
                        shared.lookup_failures.fetch_add(1, Relaxed);
                        let kept =
                            socket::describe(&shared.current.read().unwrap_or_else(|e| e.into_inner()));
                        tracing::warn!(%name, %reason, %kept, retry_s = retry.as_secs(),
                            "re-resolving the upstream failed; keeping the last good address");
                        wait = retry;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the DNS refresh thread; the address will not follow DNS");
        }
        target
    }

    fn with(endpoint: Endpoint, addr: SockAddr, stop: Option<mpsc::Sender<()>>) -> Target {
        Target {
            shared: Arc::new(Shared {
                endpoint,
                current: RwLock::new(addr),
                changes: AtomicU64::new(0),
                lookup_failures: AtomicU64::new(0),
                moves_refused: AtomicU64::new(0),
                _stop_refresh: stop,
            }),
        }
    }

    /// What the DNS refresh did so far (all zero for a fixed target).
    pub fn dns_counters(&self) -> DnsCounters {
        DnsCounters {
            changes: self.shared.changes.load(Relaxed),
            lookup_failures: self.shared.lookup_failures.load(Relaxed),
            moves_refused: self.shared.moves_refused.load(Relaxed),
        }
    }

    /// The address to connect to now.
    pub fn current(&self) -> SockAddr {
        self.shared.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The endpoint as configured (a name stays a name).
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }
}

/// Counts of a target's DNS refreshes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// Times the address in use changed.
    pub changes: u64,
    /// Refreshes whose lookup failed (the last good address stayed).
    pub lookup_failures: u64,
    /// Refreshes whose new address the vet refused (the last allowed stayed).
    pub moves_refused: u64,
}

fn sockaddr(ip: IpAddr, port: u16) -> SockAddr {
    SockAddr::from(SocketAddr::new(ip, port))
}
