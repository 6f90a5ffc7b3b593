//! Command-line options shared by the apps, and the checks that turn what a
//! user typed into engine settings before any socket opens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use vsock_relay_engine::endpoint::{parse_host, Host};
use vsock_relay_engine::labels::{Labelled, UnknownLabel};
use vsock_relay_engine::{
    BackendChoice, ClientRules, DataPath, DnsOptions, Endpoint, IpFamily, ProxyProtocol, Relay, RelayConfig,
    Service, Target, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_PIPE_BYTES,
};

use crate::dns::server::QueryCounters;
use crate::relay::metrics::MetricsServer;
use crate::relay::run::Running;

/// `-w/--workers` of `vsock-relay`'s relaying commands.
#[derive(Args, Clone, Copy, Debug)]
pub struct Workers {
    /// Worker threads, each an event loop serving any number of connections
    /// (default: one per core).
    #[arg(short = 'w', long = "workers", default_value_t = 0, hide_default_value = true)]
    pub workers: usize,
}

/// Tuning options every relaying app accepts.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// The event loop's backend.
    #[arg(long, default_value = BackendChoice::default().label(), value_parser = labels::<BackendChoice>())]
    pub backend: BackendChoice,

    /// Give up on an upstream connect after this many seconds; that one
    /// client is reset, the others are unaffected.
    #[arg(long, default_value_t = DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_name = "SECONDS", value_parser = parse_seconds)]
    pub connect_timeout: f64,

    /// How each direction moves bytes (vsock's splice is a slow copying
    /// fallback in the kernel, hence `auto`; the others force one path, for
    /// comparison).
    #[arg(long, default_value = DataPath::default().label(), value_parser = labels::<DataPath>())]
    pub data_path: DataPath,

    /// Capacity of each pooled pipe, in KiB (the kernel caps it at
    /// /proc/sys/fs/pipe-max-size).
    #[arg(long, default_value_t = DEFAULT_PIPE_KIB, value_name = "KIB", value_parser = clap::value_parser!(u32).range(4..=1048576))]
    pub pipe_kib: u32,

    /// Before sleeping, each worker polls for new events this many
    /// microseconds: cuts the latency a relay adds to request/response
    /// traffic on VMs (where a thread's sleep and wake-up costs 10-20 us), at
    /// the price of CPU; the README's Performance section has the
    /// measurements. 0 (the default) never spins.
    #[arg(long, default_value_t = 0, value_name = "US", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub spin_us: u32,

    /// Serve only clients from these vsock CIDs (vsock listeners only);
    /// others are reset and logged. AWS's proxy serves any enclave on the host.
    #[arg(long = "allow-cid", value_name = "CID[,CID...]", value_delimiter = ',')]
    pub allow_cids: Vec<u32>,

    /// While this many connections are open (all workers together), reset
    /// new clients at once and log it (default: no limit but descriptors).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,

    /// Reset a connection when no byte moved either way for this many
    /// seconds (default: never, like AWS's proxy).
    #[arg(long, value_name = "SECONDS", value_parser = parse_idle_seconds)]
    pub idle_timeout: Option<f64>,

    /// On SIGTERM or SIGINT, stop accepting and give open connections this
    /// many seconds to finish, then reset them; a second signal resets them
    /// at once.
    #[arg(long, default_value_t = DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_name = "SECONDS", value_parser = parse_seconds)]
    pub drain_timeout: f64,

    /// Ask this DNS server (IP:PORT, repeatable) instead of /etc/resolv.conf.
    #[arg(long = "dns-server", value_name = "IP:PORT")]
    pub dns_servers: Vec<SocketAddr>,

    /// Serve Prometheus metrics over HTTP at /metrics on this endpoint
    /// (tcp:127.0.0.1:9464, unix:PATH): connections, refusals and failures
    /// by cause, bytes, connect and duration histograms, DNS changes, per
    /// service. Off by default.
    #[arg(long, value_name = "ENDPOINT")]
    pub metrics: Option<Endpoint>,

    /// Send a PROXY protocol header first on each upstream connection, so
    /// that the server behind the relay learns the client's address (`v2`:
    /// haproxy's binary format; the server must expect it, e.g. `vsock-relay
    /// serve --proxy-protocol`). Clients that are not TCP are sent as UNSPEC.
    #[arg(long, value_parser = labels::<ProxyProtocol>())]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `--pipe-kib`'s default: the engine's pipe size in KiB.
#[allow(clippy::cast_possible_truncation)] // 1 MiB in KiB: 1024.
const DEFAULT_PIPE_KIB: u32 = (DEFAULT_PIPE_BYTES / 1024) as u32;

/// clap's parser for an engine enum declared by its table (`labelled!`):
/// its labels (and aliases) are the possible values, each with its help,
/// which `--help` and a usage error list.
pub fn labels<T>() -> impl TypedValueParser<Value = T>
where
    T: Labelled + std::str::FromStr<Err = UnknownLabel> + Clone + Send + Sync,
{
    let values = T::VALUES.iter().map(|value| {
        PossibleValue::new(value.label()).aliases(value.aliases().iter().copied()).help(value.help())
    });
    PossibleValuesParser::new(values).try_map(|text| text.parse::<T>())
}

/// A usage error found after parsing (the binary exits 2, like clap's own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `vsock-relay relay`: a plain relay between any two endpoints.
#[derive(Args, Clone, Debug)]
pub struct RelayArgs {
    /// Where to listen.
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Endpoint,

    /// Where to connect for each client (a TCP host name follows DNS).
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Endpoint,

    #[command(flatten)]
    pub workers: Workers,

    #[command(flatten)]
    pub engine: EngineArgs,
}

impl RelayArgs {
    pub fn start(self) -> anyhow::Result<Running> {
        let target = Target::new(&self.to, &self.engine.dns(IpFamily::Any))
            .map_err(|e| anyhow::Error::new(e).context(format!("cannot use --to {}", self.to)))?;
        self.engine.launch(vec![self.engine.service(self.listen, target)], self.workers.workers)
    }
}

/// A positive number of seconds, at most an hour.
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s <= 3600.0 => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds between 0 and 3600")),
    }
}

/// A positive number of seconds, at most a week.
pub fn parse_idle_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s <= 604_800.0 => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds between 0 and 604800 (a week)")),
    }
}

impl EngineArgs {
    pub fn dns(&self, family: IpFamily) -> DnsOptions {
        DnsOptions { servers: self.dns_servers.clone(), family }
    }

    /// A service listening on `listen` and forwarding to `target`, with
    /// these options' client rules.
    pub fn service(&self, listen: Endpoint, target: Target) -> Service {
        Service { rules: self.rules(), ..Service::new(listen, target) }
    }

    /// The client rules these options give every service (a services
    /// file's entry may give its own, laid over them).
    pub fn rules(&self) -> ClientRules {
        ClientRules {
            allow_cids: (!self.allow_cids.is_empty()).then(|| self.allow_cids.clone()),
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout.map(Duration::from_secs_f64),
            proxy_protocol: self.proxy_protocol,
        }
    }

    /// The one way from command-line options to a relay: `services` served
    /// by `workers` threads (0: one per core), tuned by these options.
    pub fn start(&self, services: Vec<Service>, workers: usize) -> anyhow::Result<Relay> {
        self.start_with(services, workers, IpFamily::Any)
    }

    /// [`EngineArgs::start`], routed destinations resolved in `family`.
    pub fn start_with(
        &self,
        services: Vec<Service>,
        workers: usize,
        family: IpFamily,
    ) -> anyhow::Result<Relay> {
        let mut config = RelayConfig::of(services);
        config.dns = self.dns(family);
        config.workers = workers;
        config.backend = self.backend;
        config.connect_timeout = Duration::from_secs_f64(self.connect_timeout);
        config.data_path = self.data_path;
        config.pipe_bytes = self.pipe_kib as usize * 1024;
        config.spin = Duration::from_micros(self.spin_us.into());
        config.drain_timeout = Duration::from_secs_f64(self.drain_timeout);
        Ok(Relay::start(config)?)
    }

    /// [`EngineArgs::start`], plus the metrics endpoint when asked for: a
    /// command that runs until a signal.
    pub fn launch(&self, services: Vec<Service>, workers: usize) -> anyhow::Result<Running> {
        self.launch_with(services, workers, IpFamily::Any, Vec::new())
    }

    /// [`EngineArgs::launch`], routed destinations resolved in `family`.
    pub fn launch_with(
        &self,
        services: Vec<Service>,
        workers: usize,
        family: IpFamily,
        dns_services: Vec<(String, Arc<QueryCounters>)>,
    ) -> anyhow::Result<Running> {
        let relay = self.start_with(services, workers, family)?;
        let metrics = self
            .metrics
            .as_ref()
            .map(|endpoint| MetricsServer::start(endpoint, &relay, dns_services))
            .transpose()?;
        Ok(Running { relay: Some(relay), metrics, reload: None })
    }
}

/// Parses REMOTE_ADDR: a host name or an IP address. A bare number is
/// refused: it is almost always an enclave CID typed in the wrong place, and
/// the system resolver would quietly turn `3` into 0.0.0.3.
pub fn parse_remote_host(text: &str) -> Result<Host, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{text}` is a bare number, not a host. REMOTE_ADDR is the TCP server to proxy to \
             (a host name or an IP address); an enclave CID does not go here"
        ));
    }
    let bracketed =
        if text.contains(':') && !text.starts_with('[') { format!("[{text}]") } else { text.to_string() };
    parse_host(&bracketed).ok_or_else(|| format!("`{text}` is neither a host name nor an IP address"))
}

/// Parses `-w/--num_workers`: a positive count.
pub fn parse_workers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("the number of workers must not be 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a number of workers")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_host_accepts_names_and_ips_and_refuses_bare_numbers() {
        assert_eq!(
            parse_remote_host("kms.us-east-1.amazonaws.com"),
            Ok(Host::Name("kms.us-east-1.amazonaws.com".into()))
        );
        assert_eq!(parse_remote_host("127.0.0.1"), Ok(Host::Ip("127.0.0.1".parse().unwrap())));
        assert_eq!(parse_remote_host("::1"), Ok(Host::Ip("::1".parse().unwrap())));
        assert!(parse_remote_host("3").unwrap_err().contains("bare number"));
        assert!(parse_remote_host("bad host").unwrap_err().contains("neither a host name"));
    }

    /// The flags give the engine's client rules; what a flag defaults to is
    /// the engine's constant; an enum's values are its table's.
    #[test]
    fn flags_give_client_rules_and_default_to_the_engines_constants() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            engine: EngineArgs,
        }
        use clap::Parser;
        let flags = [
            "t",
            "--allow-cid",
            "3,4",
            "--idle-timeout",
            "2.5",
            "--proxy-protocol",
            "v2",
            "--backend",
            "epoll",
        ];
        let engine = Cli::try_parse_from(flags).unwrap().engine;
        let rules = ClientRules {
            allow_cids: Some(vec![3, 4]),
            max_connections: None,
            idle_timeout: Some(Duration::from_secs_f64(2.5)),
            proxy_protocol: Some(ProxyProtocol::V2),
        };
        assert_eq!(engine.rules(), rules);
        assert_eq!(engine.backend, BackendChoice::Portable, "an alias of the table");
        let defaults = Cli::try_parse_from(["t"]).unwrap().engine;
        assert_eq!(defaults.rules(), ClientRules::default());
        assert_eq!(Duration::from_secs_f64(defaults.connect_timeout), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(Duration::from_secs_f64(defaults.drain_timeout), DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(defaults.pipe_kib as usize * 1024, DEFAULT_PIPE_BYTES);
        assert_eq!((defaults.backend, defaults.data_path), (BackendChoice::Auto, DataPath::Auto));
        let error = Cli::try_parse_from(["t", "--data-path", "zero"]).err().map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(error.contains("[possible values: auto, splice, copy, ring]"), "{error}");
    }

    #[test]
    fn workers_must_be_positive() {
        assert_eq!(parse_workers("4"), Ok(4));
        assert_eq!(parse_workers("0").unwrap_err(), "the number of workers must not be 0");
        assert!(parse_workers("x").is_err());
    }
}
