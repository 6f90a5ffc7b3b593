//! Name resolution with TTLs (hickory-resolver), for targets given by name.
//!
//! A [`Resolver`] runs on its own small runtime and is only ever called from
//! start-up code and from a target's refresh thread; routed services look up
//! their clients' destinations on the router's thread ([`lookup`]): never on
//! the accept or data path.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioResolver;

/// Why a name could not be resolved, or a resolver not set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The resolver's private runtime could not start.
    #[error("cannot start the resolver runtime: {0}")]
    Runtime(#[source] io::Error),
    /// `/etc/resolv.conf` could not be read or understood.
    #[error("cannot read the system DNS configuration: {0}")]
    SystemConfig(#[source] NetError),
    /// The resolver refused its configuration.
    #[error("cannot build the resolver: {0}")]
    Build(#[source] NetError),
    /// The lookup failed (no such name, no address record, no answer):
    /// what the name servers said, in words (both the A and the AAAA
    /// query were asked where the family allows).
    #[error("{0}")]
    Lookup(String),
    /// The name does not exist, or has no address record.
    #[error("{0}")]
    NoSuchName(String),
    /// The system resolver (used for fixed targets) failed.
    #[error(transparent)]
    System(io::Error),
    /// An IP literal of the other family than `-4`/`-6` asked for.
    #[error("{0} is not of the address family asked for")]
    WrongFamily(IpAddr),
    /// The name has addresses, but none of the family asked for.
    #[error("no address of the family asked for")]
    NoAddress,
}

/// Which address families a lookup may return.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamily {
    /// IPv4 first, then IPv6 (like AWS's proxy without `-4`/`-6`).
    #[default]
    Any,
    V4Only,
    V6Only,
}

impl IpFamily {
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            IpFamily::Any => true,
            IpFamily::V4Only => ip.is_ipv4(),
            IpFamily::V6Only => ip.is_ipv6(),
        }
    }
}

/// Where and how to resolve names.
#[derive(Clone, Debug, Default)]
pub struct DnsOptions {
    /// Name servers to ask instead of `/etc/resolv.conf`'s (tests, split DNS).
    pub servers: Vec<SocketAddr>,
    pub family: IpFamily,
}

/// The addresses of a name and how long they may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub addresses: Vec<IpAddr>,
    pub valid_until: Instant,
}

impl Resolution {
    pub fn ttl(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }
}

/// A blocking resolver.
pub struct Resolver {
    runtime: tokio::runtime::Runtime,
    resolver: TokioResolver,
    family: IpFamily,
}

impl Resolver {
    pub fn new(options: &DnsOptions) -> Result<Resolver, DnsError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DnsError::Runtime)?;
        let resolver = {
            let _guard = runtime.enter();
            build(options)?
        };
        Ok(Resolver { runtime, resolver, family: options.family })
    }

    /// Resolves `name` (an IP literal resolves to itself).
    pub fn resolve(&self, name: &str) -> Result<Resolution, DnsError> {
        self.runtime.block_on(lookup(&self.resolver, self.family, name))
    }
}

/// A hickory resolver for `options`, on the current tokio runtime. Its cache
/// (bounded in entries) keeps answers for their TTL.
pub fn build(options: &DnsOptions) -> Result<TokioResolver, DnsError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if options.servers.is_empty() {
        TokioResolver::builder(provider).map_err(DnsError::SystemConfig)?
    } else {
        let servers = options
            .servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_parts(None, vec![], servers), provider)
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.ip_strategy = match options.family {
        IpFamily::Any => LookupIpStrategy::Ipv4thenIpv6,
        IpFamily::V4Only => LookupIpStrategy::Ipv4Only,
        IpFamily::V6Only => LookupIpStrategy::Ipv6Only,
    };
    opts.timeout = Duration::from_secs(3);
    opts.attempts = 2;
    opts.cache_size = CACHE_ENTRIES;
    builder.build().map_err(DnsError::Build)
}

/// Names (and record types) a resolver's cache holds at most.
pub const CACHE_ENTRIES: u64 = 4096;

/// Looks `name` up with `resolver` (an IP literal resolves to itself),
/// keeping the addresses of `family`.
pub(crate) async fn lookup(
    resolver: &TokioResolver,
    family: IpFamily,
    name: &str,
) -> Result<Resolution, DnsError> {
    if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        if !family.admits(ip) {
            return Err(DnsError::WrongFamily(ip));
        }
        return Ok(Resolution {
            addresses: vec![ip],
            valid_until: Instant::now() + Duration::from_secs(86_400),
        });
    }
    let lookup = resolver.lookup_ip(name).await.map_err(|e| lookup_error(&e))?;
    let addresses: Vec<IpAddr> = lookup.iter().filter(|ip| family.admits(*ip)).collect();
    if addresses.is_empty() {
        return Err(DnsError::NoAddress);
    }
    Ok(Resolution { addresses, valid_until: lookup.valid_until() })
}

/// A failed lookup in the operator's words, instead of the resolver's debug
/// dump of the last query it made.
fn lookup_error(error: &NetError) -> DnsError {
    use hickory_resolver::net::DnsError as Answer;
    match error {
        NetError::Dns(Answer::NoRecordsFound(none)) if none.response_code == ResponseCode::NXDomain => {
            DnsError::NoSuchName("no such name (NXDOMAIN)".to_string())
        }
        NetError::Dns(Answer::NoRecordsFound(_)) => {
            DnsError::NoSuchName("the name has no address record (A/AAAA)".to_string())
        }
        NetError::Dns(Answer::ResponseCode(code)) => {
            DnsError::Lookup(format!("the name server answered {code}"))
        }
        NetError::Timeout => DnsError::Lookup("no answer from the name servers (timed out)".to_string()),
        other => DnsError::Lookup(other.to_string()),
    }
}
