//! The proxy: a relay to one allowlisted TCP service. Shared by `vsock-proxy`
//! (AWS's command line) and `vsock-relay proxy` (any listen endpoint).

use std::path::PathBuf;

use anyhow::Context;
use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::{Endpoint, Host, IpFamily, Relay, RelayConfig, Target};

use crate::allowlist;
use crate::options::EngineArgs;

/// AWS's default config path.
pub const DEFAULT_CONFIG: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

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

/// Checks the allowlist, resolves the target and starts the relay.
pub fn start(settings: &ProxySettings) -> anyhow::Result<Relay> {
    let entries = allowlist::load(&settings.config)?;
    let dns = settings.engine.dns(settings.family);
    let resolver = Resolver::new(&dns).map_err(anyhow::Error::msg).context("cannot set up DNS resolution")?;
    let host_text = match &settings.host {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(name) => name.clone(),
    };
    let resolution = resolver
        .resolve(&host_text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot resolve REMOTE_ADDR `{host_text}`"))?;
    allowlist::check(
        &entries,
        &settings.host,
        settings.port,
        &resolution.addresses,
        &resolver,
        &settings.config,
    )?;

    let endpoint = Endpoint::Tcp { host: settings.host.clone(), port: settings.port };
    let target = match &settings.host {
        Host::Ip(_) => Target::fixed(&endpoint)?,
        Host::Name(_) => Target::follow(endpoint, settings.port, resolver, resolution),
    };
    let mut config = RelayConfig::new(settings.listen.clone(), target);
    config.workers = settings.workers;
    settings.engine.apply(&mut config);
    Ok(Relay::start(config)?)
}
