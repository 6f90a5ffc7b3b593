//! The proxy: a relay to one allowlisted TCP service. Shared by `vsock-proxy`
//! (AWS's command line) and `vsock-relay proxy` (any listen endpoint).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::target::Vet;
use vsock_relay_engine::{Endpoint, Host, IpFamily, Relay, Target};

use crate::allowlist::{Allowed, Allowlist};
use crate::options::{parse_remote_host, EngineArgs, Workers};

/// `vsock-relay proxy`: the allowlisted proxy of `vsock-proxy`, listening on any endpoint.
#[derive(Args, Clone, Debug)]
pub struct ProxyCommand {
    /// Where to listen (vsock-proxy listens on vsock:any:LOCAL_PORT).
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Endpoint,

    #[command(flatten)]
    pub workers: Workers,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

impl ProxyCommand {
    pub fn start(self) -> anyhow::Result<Relay> {
        start(&self.proxy.settings(self.listen, self.workers.workers))
    }
}

/// AWS's default config path.
pub const DEFAULT_CONFIG: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

/// The proxy's target and allowlist options, as AWS's `vsock-proxy` has
/// them; shared by `vsock-proxy` and `vsock-relay proxy`.
#[derive(Args, Clone, Debug)]
pub struct ProxyArgs {
    /// Force the proxy to use IPv4 addresses only.
    #[arg(short = '4', long = "ipv4")]
    pub ipv4: bool,

    /// Force the proxy to use IPv6 addresses only.
    #[arg(short = '6', long = "ipv6", conflicts_with = "ipv4")]
    pub ipv6: bool,

    /// YAML file containing the services that can be forwarded.
    #[arg(long = "config", default_value = DEFAULT_CONFIG, value_name = "CONFIG_FILE")]
    pub config: PathBuf,

    /// Host name or IP address of the server to proxy to (not an enclave CID).
    #[arg(value_name = "REMOTE_ADDR", value_parser = parse_remote_host)]
    pub remote_addr: Host,

    /// TCP port of the server to proxy to.
    #[arg(value_name = "REMOTE_PORT")]
    pub remote_port: u16,

    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ProxyArgs {
    /// The proxy these options describe, listening on `listen` with `workers`
    /// threads (0: one per core).
    pub fn settings(self, listen: Endpoint, workers: usize) -> ProxySettings {
        ProxySettings {
            listen,
            host: self.remote_addr,
            port: self.remote_port,
            config: self.config,
            family: match (self.ipv4, self.ipv6) {
                (true, _) => IpFamily::V4Only,
                (_, true) => IpFamily::V6Only,
                _ => IpFamily::Any,
            },
            workers,
            engine: self.engine,
        }
    }
}

/// A validated proxy description.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub listen: Endpoint,
    pub host: Host,
    pub port: u16,
    pub config: PathBuf,
    pub family: IpFamily,
    /// Worker threads (0: one per core).
    pub workers: usize,
    pub engine: EngineArgs,
}

/// Resolves the target, checks the address it will use against the
/// allowlist and starts the relay; a later DNS move is checked again.
pub fn start(settings: &ProxySettings) -> anyhow::Result<Relay> {
    let allowlist = Allowlist::load(&settings.config)?;
    let dns = settings.engine.dns(settings.family);
    let resolver = Resolver::new(&dns).context("cannot set up DNS resolution")?;
    let host_text = match &settings.host {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(name) => name.clone(),
    };
    let resolution =
        resolver.resolve(&host_text).with_context(|| format!("cannot resolve REMOTE_ADDR `{host_text}`"))?;
    let (host, port) = (settings.host.clone(), settings.port);
    let allowed = allowlist.admits(&host, port, resolution.addresses[0], &resolver)?;
    let vet: Option<Vet> = match allowed {
        Allowed::ByName(entry) => {
            tracing::info!(address = %entry.address, port, "allowed: host name matches");
            None
        }
        Allowed::ByAddress(entry) => {
            tracing::info!(address = %entry.address, port, used = %resolution.addresses[0], "allowed: address matches");
            Some(Box::new(move |resolver: &Resolver, address| {
                allowlist.admits(&host, port, address, resolver).map(drop).map_err(|e| e.to_string())
            }))
        }
    };

    let endpoint = Endpoint::Tcp { host: settings.host.clone(), port: settings.port };
    let target = match &settings.host {
        Host::Ip(_) => Target::fixed(&endpoint)?,
        Host::Name(_) => Target::follow(endpoint, settings.port, resolver, resolution, vet),
    };
    settings.engine.start(settings.listen.clone(), target, settings.workers)
}
