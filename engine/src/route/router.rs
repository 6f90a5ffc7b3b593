//! The router: where routed clients may go, decided off the worker threads.
//!
//! A worker that has read a client's head hands the destination to the
//! router and goes on with its other connections. The router thread runs a
//! small tokio runtime: each destination is looked up with hickory's async
//! resolver (one cache for the relay, bounded in entries, answers kept for
//! their TTL), the service's policy is asked on the runtime's blocking
//! threads (an allowlist entry given by name may need a lookup of its own),
//! and the answer goes back to the worker's [`Mailbox`], waking it. A slow
//! name server delays only the clients waiting for its names. Lookups in
//! flight are bounded, and each is bounded in time.
//!
//! Most destinations need none of that: an address, or a name looked up
//! recently (kept in the router's own small cache for its TTL), with a
//! policy that decides without a lookup of its own. The worker then decides
//! at once ([`Router::decide_now`]), without a hop to another thread.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use tokio::sync::mpsc;

use super::{Asked, Destination, Outcome, Peer, Policy, Route};
use crate::dns::{self, DnsError, DnsOptions, IpFamily};
use crate::endpoint::Host;
use crate::error::Error;
use crate::vocab::Key;

/// Lookups (and policy checks) in flight at most; a client beyond is told
/// the lookup failed.
pub const MAX_IN_FLIGHT: usize = 256;
/// Longest a destination's lookup may take, all attempts together.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a policy check may take (it may resolve allowlist entries).
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(2);
/// Threads that may run policy checks at once.
const POLICY_THREADS: usize = 8;

/// A destination to decide on, for connection `key` of `worker`, whose
/// client is `client`.
#[derive(Debug)]
pub(crate) struct Job {
    pub worker: usize,
    pub key: Key,
    pub service: usize,
    pub client: Peer,
    pub destination: Destination,
}

/// What the router decided for one connection.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Connect to `address` (the address the policy checked); `rule`
    /// allowed it.
    Allowed { address: SocketAddr, rule: String },
    /// Tell the client `outcome` and close; `reason` for the reply and the log.
    Refused { outcome: Outcome, reason: String },
}

/// A worker's inbox of verdicts; delivering one wakes the worker.
#[derive(Debug)]
pub(crate) struct Mailbox {
    verdicts: Mutex<Vec<(Key, Verdict)>>,
    waker: File,
}

impl Mailbox {
    pub fn new(waker: File) -> Self {
        Mailbox { verdicts: Mutex::new(Vec::new()), waker }
    }

    fn deliver(&self, key: Key, verdict: Verdict) {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner()).push((key, verdict));
        // Fails only when the counter would overflow: a wake-up is pending then.
        let _ = (&self.waker).write(&1u64.to_ne_bytes());
    }

    /// Takes every verdict delivered so far.
    pub fn take(&self, into: &mut Vec<(Key, Verdict)>) {
        into.append(&mut self.verdicts.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// What the router knows of one service: its name (for the log) and its
/// route, if its clients name their destination.
#[derive(Debug)]
pub(crate) struct ServiceRoute {
    pub name: String,
    pub route: Option<Route>,
}

/// The router of a relay; dropping it ends its thread.
pub(crate) struct Router {
    jobs: mpsc::UnboundedSender<Job>,
    shared: Arc<Shared>,
}

impl Router {
    /// Starts the router thread for a relay's `services` (in the config's
    /// order), resolving as `dns` says; answers go to `mailboxes` (one per
    /// worker).
    pub fn start(
        dns: &DnsOptions,
        services: Vec<ServiceRoute>,
        mailboxes: Vec<Arc<Mailbox>>,
    ) -> Result<Router, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(POLICY_THREADS)
            .thread_name("router-policy")
            .build()
            .map_err(Error::Start)?;
        let resolver = {
            let _guard = runtime.enter();
            dns::build(dns)
                .map_err(|source| Error::Resolve { name: "(routed destinations)".into(), source })?
        };
        let (jobs, mut incoming) = mpsc::unbounded_channel::<Job>();
        let shared =
            Arc::new(Shared { resolver, family: dns.family, services, mailboxes, recent: RwLock::default() });
        let router_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("router".into())
            .spawn(move || {
                let in_flight = Arc::new(AtomicUsize::new(0));
                runtime.block_on(async {
                    while let Some(job) = incoming.recv().await {
                        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                            let reason = format!("{MAX_IN_FLIGHT} lookups in flight; try again");
                            shared.answer(job, Verdict::Refused { outcome: Outcome::LookupFailed, reason });
                            continue;
                        }
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let (shared, in_flight) = (Arc::clone(&shared), Arc::clone(&in_flight));
                        tokio::spawn(async move {
                            let verdict = shared.decide(&job).await;
                            shared.answer(job, verdict);
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(Error::Start)?;
        Ok(Router { jobs, shared: router_shared })
    }

    /// Decides on the calling (worker) thread when that needs no lookup: the
    /// destination is an address or a name resolved recently, and the policy
    /// decides without blocking. `None`: ask the router ([`Router::ask`]).
    pub fn decide_now(&self, service: usize, client: Peer, destination: &Destination) -> Option<Verdict> {
        let route = self.shared.route(service)?;
        let Destination { host, port } = destination;
        let address = match host {
            Host::Ip(ip) => *ip,
            Host::Name(name) => self.shared.recent_address(name)?,
        };
        let port = *port;
        let verdict = match (route.policy)(&Asked { client, host, port, address }, false)? {
            Ok(rule) => Verdict::Allowed { address: SocketAddr::new(address, port), rule },
            Err(reason) => Verdict::Refused { outcome: Outcome::NotAllowed, reason },
        };
        self.shared.log(service, host, port, &verdict);
        Some(verdict)
    }

    /// Asks for a decision; the answer arrives in the job's worker's mailbox.
    pub fn ask(&self, job: Job) {
        // Fails only after the router thread ended (the relay is stopping):
        // the connection then meets its decision deadline.
        let _ = self.jobs.send(job);
    }
}

struct Shared {
    resolver: TokioResolver,
    family: IpFamily,
    /// Per service, in the config's order.
    services: Vec<ServiceRoute>,
    mailboxes: Vec<Arc<Mailbox>>,
    /// Names looked up lately: the address used and until when it may be.
    recent: RwLock<HashMap<String, (IpAddr, Instant)>>,
}

impl Shared {
    fn route(&self, service: usize) -> Option<&Route> {
        self.services.get(service)?.route.as_ref()
    }

    async fn decide(&self, job: &Job) -> Verdict {
        let Some(route) = self.route(job.service) else {
            return Verdict::Refused { outcome: Outcome::Failed, reason: "not a routed service".into() };
        };
        let Destination { host, port } = &job.destination;
        let address = match host {
            Host::Ip(ip) => *ip,
            Host::Name(name) => match self.resolve(name).await {
                Ok(ip) => ip,
                Err((outcome, reason)) => return Verdict::Refused { outcome, reason },
            },
        };
        let (policy, host, port, client): (Policy, Host, u16, Peer) =
            (Arc::clone(&route.policy), host.clone(), *port, job.client);
        let check =
            tokio::task::spawn_blocking(move || policy(&Asked { client, host: &host, port, address }, true));
        match tokio::time::timeout(POLICY_TIMEOUT, check).await {
            Ok(Ok(Some(Ok(rule)))) => Verdict::Allowed { address: SocketAddr::new(address, port), rule },
            Ok(Ok(Some(Err(reason)))) => Verdict::Refused { outcome: Outcome::NotAllowed, reason },
            Ok(Ok(None)) => Verdict::Refused { outcome: Outcome::Failed, reason: "the policy did not decide".into() },
            Ok(Err(e)) => {
                Verdict::Refused { outcome: Outcome::Failed, reason: format!("the policy check failed: {e}") }
            }
            Err(_) => Verdict::Refused {
                outcome: Outcome::LookupFailed,
                reason: format!("no policy decision within {POLICY_TIMEOUT:?} (an allowlist entry's name did not resolve)"),
            },
        }
    }

    /// The address a destination's name resolves to (the first of its family).
    async fn resolve(&self, name: &str) -> Result<IpAddr, (Outcome, String)> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, dns::lookup(&self.resolver, self.family, name)).await {
            Ok(Ok(resolution)) => {
                let address = resolution.addresses[0];
                self.remember(name, address, resolution.valid_until);
                Ok(address)
            }
            Ok(Err(e @ (DnsError::NoSuchName(_) | DnsError::NoAddress | DnsError::WrongFamily(_)))) => {
                Err((Outcome::NoSuchName, format!("{name}: {e}")))
            }
            Ok(Err(e)) => Err((Outcome::LookupFailed, format!("{name}: {e}"))),
            Err(_) => Err((Outcome::LookupFailed, format!("{name}: no answer within {LOOKUP_TIMEOUT:?}"))),
        }
    }

    /// The address `name` resolved to, while its TTL lasts.
    fn recent_address(&self, name: &str) -> Option<IpAddr> {
        let recent = self.recent.read().unwrap_or_else(|e| e.into_inner());
        recent.get(name).filter(|(_, until)| Instant::now() < *until).map(|(address, _)| *address)
    }

    fn remember(&self, name: &str, address: IpAddr, until: Instant) {
        let mut recent = self.recent.write().unwrap_or_else(|e| e.into_inner());
        let bound = usize::try_from(dns::CACHE_ENTRIES).unwrap_or(usize::MAX);
        if recent.len() >= bound {
            let now = Instant::now();
            recent.retain(|_, (_, until)| now < *until);
            if recent.len() >= bound {
                recent.clear();
            }
        }
        recent.insert(name.to_string(), (address, until));
    }

    /// Logs a decision: the destination asked for, the address used, and the
    /// entry that allowed it or why not.
    fn log(&self, service: usize, host: &Host, port: u16, verdict: &Verdict) {
        let service = self.services.get(service).map_or("", |s| s.name.as_str());
        let destination = format!("{host}:{port}");
        match verdict {
            Verdict::Allowed { address, rule } => {
                tracing::info!(%service, %destination, %address, %rule, decision = "allowed", "routed")
            }
            Verdict::Refused { outcome, reason } => {
                tracing::info!(%service, %destination, decision = ?outcome, %reason, "routed client refused")
            }
        }
    }

    fn answer(&self, job: Job, verdict: Verdict) {
        self.log(job.service, &job.destination.host, job.destination.port, &verdict);
        if let Some(mailbox) = self.mailboxes.get(job.worker) {
            mailbox.deliver(job.key, verdict);
        }
    }
}
