//! The proxy: relays to allowlisted TCP services. Shared by `vsock-proxy`
//! (AWS's command line, one service) and `vsock-relay proxy` (any listen
//! endpoint, one service or a `--services` file of many).
//!
//! The allowlist is checked for the address each service connects to: at
//! start, whenever DNS moves a target (the target's vet), and at each
//! reload (SIGHUP), which re-reads the allowlist: a service whose target is
//! no longer allowed refuses new clients (its open connections go on) until
//! a later reload allows it again; a file that cannot be read or parsed is
//! refused and the allowlist in force stays.
//!
//! A routed service (`--route connect|socks5|sni`) has no fixed target:
//! each client names its destination, and the allowlist in force decides
//! for the address the connect will use (safe by default for loopback,
//! link-local and unspecified addresses, see `allowlist`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::route::{DEFAULT_HEAD_TIMEOUT, DEFAULT_SNI_PORT};
use vsock_relay_engine::socket::{self, SocketOptions};
use vsock_relay_engine::target::Vet;
use vsock_relay_engine::{
    Asked, ClientRules, Endpoint, Host, IpFamily, Policy, Route, RouteKind, Service, Target, Upstream,
};

use crate::dns::answered::{self, Answered, DEFAULT_GRACE};
use crate::dns::server::{self, DnsSettings, DEFAULT_RATE};

use crate::relay::allowlist::{Allowed, Allowlist};
use crate::relay::options::{parse_remote_host, parse_seconds, EngineArgs, Workers};
use crate::relay::run::{Reload, Running};
use crate::relay::services::{self, ServiceSpec, SpecUpstream};

/// `vsock-relay proxy`: the allowlisted proxy of `vsock-proxy`, listening on
/// any endpoint; or many such services from a `--services` file.
#[derive(Args, Clone, Debug)]
pub struct ProxyCommand {
    /// Where to listen (vsock-proxy listens on vsock:any:LOCAL_PORT).
    #[arg(long, value_name = "ENDPOINT", required_unless_present = "services", conflicts_with = "services")]
    pub listen: Option<Endpoint>,

    /// Host name or IP address of the server to proxy to (not an enclave CID).
    #[arg(value_name = "REMOTE_ADDR", value_parser = parse_remote_host,
        required_unless_present_any = ["services", "route"], conflicts_with_all = ["services", "route"])]
    pub remote_addr: Option<Host>,

    /// TCP port of the server to proxy to.
    #[arg(value_name = "REMOTE_PORT", required_unless_present_any = ["services", "route"])]
    pub remote_port: Option<u16>,

    /// Instead of REMOTE_ADDR REMOTE_PORT, send each client where it asks
    /// by the head it sends first, when the allowlist allows it. Loopback,
    /// link-local (the instance metadata service) and unspecified addresses
    /// only when an address or CIDR entry names them. `dns`: answer the
    /// enclave's DNS (from `vsock-relay dns`) for the names the allowlist
    /// allows, instead of relaying.
    #[arg(long, value_parser = route_values(), conflicts_with = "services")]
    pub route: Option<SpecRoute>,

    /// How long the DNS service remembers, after an answer's TTL, which
    /// addresses it gave a client for a name: a `transparent` service of
    /// the same process allows that client those addresses for that name.
    #[arg(long, default_value_t = DEFAULT_GRACE.as_secs_f64(), value_name = "SECONDS", value_parser = parse_seconds)]
    pub dns_grace: f64,

    /// DNS queries one client may ask a second (beyond: SERVFAIL at once).
    #[arg(long, default_value_t = DEFAULT_RATE, value_name = "QUERIES", value_parser = clap::value_parser!(u32).range(1..))]
    pub dns_rate: u32,

    /// With --route sni: the port every destination is reached on.
    #[arg(long, default_value_t = DEFAULT_SNI_PORT, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub sni_port: u16,

    /// Routed services: close a client that has not sent its whole head
    /// (its CONNECT or http:// request, SOCKS5 request or TLS ClientHello) this many
    /// seconds after connecting.
    #[arg(long, default_value_t = DEFAULT_HEAD_TIMEOUT.as_secs_f64(), value_name = "SECONDS", value_parser = parse_seconds)]
    pub head_timeout: f64,

    /// Serve every service listed under `services:` in this YAML file (each
    /// with listen, and address and port or a route, and optionally a name
    /// and its own client rules, keyed as their flags: `allow_cid: [16]`,
    /// `idle_timeout: 300`; docs/operations.md lists them), with one set of
    /// workers, instead of --listen REMOTE_ADDR REMOTE_PORT. It may be the
    /// --config file itself.
    #[arg(long, value_name = "FILE")]
    pub services: Option<PathBuf>,

    #[command(flatten)]
    pub workers: Workers,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

impl ProxyCommand {
    pub fn start(self) -> anyhow::Result<Running> {
        let route = self.route.map(|route| match route {
            SpecRoute::Relayed(RouteKind::Sni { .. }) => {
                SpecRoute::Relayed(RouteKind::Sni { port: self.sni_port })
            }
            other => other,
        });
        let specs = match (&self.services, self.listen, self.remote_addr, self.remote_port, route) {
            (Some(file), ..) => services::load(file)?,
            (None, Some(listen), _, _, Some(SpecRoute::Relayed(route))) => {
                let upstream = SpecUpstream::Routed { route, head_timeout: None };
                vec![ServiceSpec::single(listen, upstream)]
            }
            (None, Some(listen), _, _, Some(SpecRoute::Dns)) => {
                vec![ServiceSpec::single(listen, SpecUpstream::Dns)]
            }
            (None, Some(listen), Some(host), Some(port), None) => {
                vec![ServiceSpec::single(listen, SpecUpstream::Fixed { host, port })]
            }
            // clap requires them when --services is missing.
            _ => anyhow::bail!("give --listen REMOTE_ADDR REMOTE_PORT, or --services FILE"),
        };
        let mut settings = self.proxy.settings(specs, self.services, self.workers.workers);
        settings.head_timeout = self.head_timeout;
        settings.dns_grace = self.dns_grace;
        settings.dns_rate = self.dns_rate;
        start(&settings)
    }
}

/// AWS's default config path.
pub const DEFAULT_CONFIG: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

/// The proxy's allowlist and family options, as AWS's `vsock-proxy` has
/// them; shared by `vsock-proxy` and `vsock-relay proxy`.
#[derive(Args, Clone, Debug)]
pub struct ProxyArgs {
    /// Force the proxy to use IPv4 addresses only.
    #[arg(short = '4', long = "ipv4")]
    pub ipv4: bool,

    /// Force the proxy to use IPv6 addresses only.
    #[arg(short = '6', long = "ipv6", conflicts_with = "ipv4")]
    pub ipv6: bool,

    /// YAML file containing the services that can be forwarded (its
    /// `allowlist:`); re-read on SIGHUP.
    #[arg(long = "config", default_value = DEFAULT_CONFIG, value_name = "CONFIG_FILE")]
    pub config: PathBuf,

    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ProxyArgs {
    /// The proxy these options describe, serving `services` (read from
    /// `services_file`, if from a file) with `workers` threads (0: one per core).
    pub fn settings(
        self,
        services: Vec<ServiceSpec>,
        services_file: Option<PathBuf>,
        workers: usize,
    ) -> ProxySettings {
        ProxySettings {
            services,
            services_file,
            config: self.config,
            family: match (self.ipv4, self.ipv6) {
                (true, _) => IpFamily::V4Only,
                (_, true) => IpFamily::V6Only,
                _ => IpFamily::Any,
            },
            workers,
            head_timeout: DEFAULT_HEAD_TIMEOUT.as_secs_f64(),
            dns_grace: DEFAULT_GRACE.as_secs_f64(),
            dns_rate: DEFAULT_RATE,
            engine: self.engine,
        }
    }
}

impl ServiceSpec {
    /// The one service of a command line.
    pub fn single(listen: Endpoint, upstream: SpecUpstream) -> Self {
        ServiceSpec { name: None, listen, upstream, rules: ClientRules::default() }
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(name) => name.clone(),
    }
}

/// A proxy description from the command line or a services file, parsed
/// but not yet checked: [`start`] checks the targets against the allowlist.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub services: Vec<ServiceSpec>,
    /// Where `services` came from (a reload says when it changed).
    pub services_file: Option<PathBuf>,
    pub config: PathBuf,
    pub family: IpFamily,
    /// Worker threads (0: one per core).
    pub workers: usize,
    /// Routed services' head timeout, seconds (a service may set its own).
    pub head_timeout: f64,
    /// Seconds the DNS service remembers an answer after its TTL.
    pub dns_grace: f64,
    /// DNS queries per second per client.
    pub dns_rate: u32,
    pub engine: EngineArgs,
}

/// What `--route` names: a route the relay serves, or the DNS service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecRoute {
    Relayed(RouteKind),
    Dns,
}

/// `--route`'s values: the relay's routes, and `dns`.
fn route_values() -> impl clap::builder::TypedValueParser<Value = SpecRoute> {
    use clap::builder::TypedValueParser;
    use vsock_relay_engine::labels::Labelled;
    let values = RouteKind::VALUES
        .iter()
        .map(|kind| {
            clap::builder::PossibleValue::new(kind.label())
                .aliases(kind.aliases().iter().copied())
                .help(kind.help())
        })
        .chain([clap::builder::PossibleValue::new("dns")
            .help("answer the enclave's DNS queries (vsock-relay dns) for the names the allowlist allows")]);
    clap::builder::PossibleValuesParser::new(values).try_map(|text| match text.as_str() {
        "dns" => Ok(SpecRoute::Dns),
        text => text.parse().map(SpecRoute::Relayed),
    })
}

/// Resolves every service's target, checks the address it will use against
/// the allowlist and starts one relay for all; a later DNS move is checked
/// again, and SIGHUP re-reads the allowlist.
pub fn start(settings: &ProxySettings) -> anyhow::Result<Running> {
    let allowlist = Arc::new(RwLock::new(Allowlist::load(&settings.config)?));
    let dns = settings.engine.dns(settings.family);
    let answered =
        Arc::new(Answered::new(Duration::from_secs_f64(settings.dns_grace), answered::MAX_ENTRIES));
    let mut services = Vec::with_capacity(settings.services.len());
    let mut dns_services = Vec::new();
    for spec in &settings.services {
        let service = match &spec.upstream {
            SpecUpstream::Fixed { host, port } => proxied_service(spec, host, *port, settings, &allowlist),
            SpecUpstream::Routed { route, head_timeout } => routed_service(
                spec,
                *route,
                head_timeout.unwrap_or(settings.head_timeout),
                settings,
                &allowlist,
                &answered,
            ),
            SpecUpstream::Dns => {
                dns_services.push(spec);
                continue;
            }
        };
        services.push(match settings.services.len() {
            1 => service?,
            _ => service.with_context(|| match &spec.name {
                Some(name) => format!("service `{name}` ({})", spec.listen),
                None => format!("service {}", spec.listen),
            })?,
        });
    }
    if services.is_empty() && settings.engine.metrics.is_some() {
        anyhow::bail!("--metrics needs a relayed service beside the DNS service (route: transparent, say)");
    }
    let mut answering = Vec::with_capacity(dns_services.len());
    for spec in dns_services {
        let listener = socket::listen(&spec.listen, &SocketOptions::default())
            .with_context(|| format!("cannot listen on {} for the DNS service", spec.listen))?;
        let dns_settings = DnsSettings {
            allowlist: Arc::clone(&allowlist),
            dns: dns.clone(),
            answered: Arc::clone(&answered),
            rate: settings.dns_rate,
            allow_cids: spec.rules.clone().or(settings.engine.rules()).allow_cids,
        };
        let local = socket::local_endpoint(&listener, &spec.listen)?;
        let server = server::start(listener, dns_settings)?;
        let name = spec.name.clone().unwrap_or_else(|| spec.listen.to_string());
        tracing::info!(service = %name, listen = %local, "DNS service: answering the names the allowlist allows");
        answering.push((name, server.counters));
    }
    let mut running = match services.is_empty() {
        true => Running { relay: None, metrics: None, reload: None },
        false => settings.engine.launch_with(services, settings.workers, settings.family, answering)?,
    };
    let resolver = Resolver::new(&dns).context("cannot set up DNS resolution")?;
    let relayed = settings.services.iter().filter(|spec| spec.upstream != SpecUpstream::Dns).cloned();
    let running_services = running.relay.as_ref().map(|relay| relay.services().to_vec()).unwrap_or_default();
    let checked: Vec<(ServiceSpec, Service)> = relayed.zip(running_services).collect();
    let reloader = Reloader { settings: settings.clone(), allowlist, resolver, services: checked };
    running.reload = Some(reloader.into_reload());
    Ok(running)
}

/// The engine's service for a routed `spec`: each client's destination is
/// checked against the allowlist in force when it asks.
fn routed_service(
    spec: &ServiceSpec,
    kind: RouteKind,
    head_timeout: f64,
    settings: &ProxySettings,
    allowlist: &Arc<RwLock<Allowlist>>,
    answered: &Arc<Answered>,
) -> anyhow::Result<Service> {
    let policy = match kind {
        RouteKind::Transparent => transparent_policy(Arc::clone(allowlist), Arc::clone(answered)),
        _ => named_policy(settings, allowlist)?,
    };
    let mut route = Route::new(kind, policy);
    route.head_timeout = Duration::from_secs_f64(head_timeout);
    tracing::info!(route = %kind, config = %settings.config.display(),
        "routed: each client's destination is checked against the allowlist in force");
    Ok(as_specified(Service::routed(spec.listen.clone(), route), spec, &settings.engine))
}

/// The policy of a route whose clients name their destination: the
/// allowlist in force, entries given by name resolved when needed.
fn named_policy(settings: &ProxySettings, allowlist: &Arc<RwLock<Allowlist>>) -> anyhow::Result<Policy> {
    // For allowlist entries given by name; the router resolves destinations.
    let resolver = Mutex::new(
        Resolver::new(&settings.engine.dns(settings.family)).context("cannot set up DNS resolution")?,
    );
    let shared = Arc::clone(allowlist);
    Ok(Arc::new(move |asked: &Asked<'_>, may_block| {
        // The resolver is asked only for entries given by name, and only
        // when no entry allows the destination by itself; on a worker
        // (`may_block` false) that means: decide on the router's threads.
        let mut blocked = false;
        let mut resolve = |name: &str| {
            if !may_block {
                blocked = true;
                return Vec::new();
            }
            let resolver = resolver.lock().unwrap_or_else(|e| e.into_inner());
            resolver.resolve(name).map(|found| found.addresses).unwrap_or_default()
        };
        let verdict = read(&shared).admits_routed(asked.host, asked.port, asked.address, &mut resolve);
        match verdict {
            Err(_) if blocked => None,
            verdict => Some(verdict.map_err(|e| e.to_string())),
        }
    }))
}

/// The policy of the `transparent` route: the destination is an address
/// (where the client was going). Allowed when an address or CIDR entry
/// allows it, or when the DNS service told this client, lately, that a
/// name an entry allows has this address; entries given by name are not
/// resolved (the address must have come from our own answer). Never blocks.
fn transparent_policy(allowlist: Arc<RwLock<Allowlist>>, answered: Arc<Answered>) -> Policy {
    Arc::new(move |asked: &Asked<'_>, _may_block| {
        let allowlist = read(&allowlist);
        let (port, address) = (asked.port, asked.address);
        let by_address = allowlist.admits_routed(asked.host, port, address, &mut |_| Vec::new());
        let Err(refusal) = by_address else { return Some(by_address.map_err(|e| e.to_string())) };
        let names = answered.names(asked.client, address);
        for name in &names {
            if let Ok(rule) =
                allowlist.admits_routed(&Host::Name(name.clone()), port, address, &mut |_| Vec::new())
            {
                tracing::info!(client = %asked.client, destination = %SocketAddr::new(address, port), %name, %rule,
                    "transparent: allowed by the name this client was answered");
                return Some(Ok(rule));
            }
        }
        let why = match names.is_empty() {
            true => format!("{refusal}; and the DNS service gave {} no name with this address", asked.client),
            false => format!(
                "{refusal}; names answered with it ({}) are not allowed on port {port}",
                names.join(", ")
            ),
        };
        Some(Err(why))
    })
}

/// `service` named as `spec` says, with the spec's own client rules laid
/// over the command line's.
fn as_specified(mut service: Service, spec: &ServiceSpec, engine: &EngineArgs) -> Service {
    if let Some(name) = &spec.name {
        service.name = name.clone();
    }
    service.rules = spec.rules.clone().or(engine.rules());
    service
}

/// The engine's service for `spec` (to `host:port`), once its target's
/// address is allowed.
fn proxied_service(
    spec: &ServiceSpec,
    host: &Host,
    port: u16,
    settings: &ProxySettings,
    allowlist: &Arc<RwLock<Allowlist>>,
) -> anyhow::Result<Service> {
    let resolver =
        Resolver::new(&settings.engine.dns(settings.family)).context("cannot set up DNS resolution")?;
    let host_text = host_text(host);
    let resolution =
        resolver.resolve(&host_text).with_context(|| format!("cannot resolve REMOTE_ADDR `{host_text}`"))?;
    let used = resolution.addresses[0];
    match read(allowlist).admits(host, port, used, &resolver)? {
        Allowed::ByName(entry) => {
            tracing::info!(address = %entry.address, port, "allowed: host name matches")
        }
        Allowed::ByAddress(entry) => {
            tracing::info!(address = %entry.address, port, %used, "allowed: address matches");
        }
    }
    // Every DNS move is checked against the allowlist in force then (a
    // reload may have changed it since).
    let (shared, vetted) = (Arc::clone(allowlist), host.clone());
    let vet: Vet = Box::new(move |resolver: &Resolver, address| {
        read(&shared).admits(&vetted, port, address, resolver).map(drop).map_err(|e| e.to_string())
    });
    let endpoint = Endpoint::Tcp { host: host.clone(), port };
    let target = match host {
        Host::Ip(_) => Target::fixed(&endpoint)?,
        Host::Name(_) => Target::follow(endpoint, port, resolver, resolution, Some(vet)),
    };
    Ok(as_specified(Service::new(spec.listen.clone(), target), spec, &settings.engine))
}

fn read(allowlist: &RwLock<Allowlist>) -> std::sync::RwLockReadGuard<'_, Allowlist> {
    allowlist.read().unwrap_or_else(|e| e.into_inner())
}

/// What SIGHUP does to a running proxy.
struct Reloader {
    settings: ProxySettings,
    allowlist: Arc<RwLock<Allowlist>>,
    resolver: Resolver,
    /// Each spec with its running service (name, target, gate).
    services: Vec<(ServiceSpec, Service)>,
}

impl Reloader {
    fn into_reload(mut self) -> Reload {
        Box::new(move || self.reload())
    }

    fn reload(&mut self) {
        let config = &self.settings.config;
        let fresh = match Allowlist::load(config) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the allowlist in force stays");
                return;
            }
        };
        if let Some(file) = &self.settings.services_file {
            match services::load(file) {
                Ok(specs) if specs == self.settings.services => {}
                Ok(_) => tracing::warn!(file = %file.display(),
                    "the services file changed: listeners, targets and options change at a restart, not at a reload"),
                Err(e) => {
                    tracing::warn!(error = %e, "the services file no longer reads; a restart would fail")
                }
            }
        }
        for (spec, Service { name, upstream, gate, .. }) in &self.services {
            // A routed service's policy reads the allowlist in force.
            let (Upstream::Fixed(target), SpecUpstream::Fixed { host, port }) = (upstream, &spec.upstream)
            else {
                continue;
            };
            let used: Option<IpAddr> = target.current().as_socket().map(|address| address.ip());
            let verdict = used.map(|ip| fresh.admits(host, *port, ip, &self.resolver));
            let remote = host_text(host);
            match verdict {
                // The gate moves before the line is logged: what the line
                // says holds once it can be read.
                Some(Ok(_)) if !gate.is_open() => {
                    gate.set_open(true);
                    tracing::info!(service = %name, %remote, port, "allowed again: serving new clients");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) if gate.is_open() => {
                    gate.set_open(false);
                    tracing::error!(service = %name, error = %e,
                        "no longer allowed: new clients are refused, open connections go on");
                }
                Some(Err(_)) | None => gate.set_open(false),
            }
        }
        let entries = fresh.entries.len();
        *self.allowlist.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        tracing::info!(config = %config.display(), entries, "reloaded the allowlist");
    }
}
