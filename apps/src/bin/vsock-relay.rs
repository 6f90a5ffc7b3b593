//! `vsock-relay`: the relay engine's apps behind one command.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use vsock_relay_apps::forward::{ensure_hosts, parse_listen, parse_mapping, parse_positional, Mapping};
use vsock_relay_apps::options::EngineArgs;
use vsock_relay_apps::proxy::{self, ProxyArgs};
use vsock_relay_apps::run;
use vsock_relay_engine::{Endpoint, IpFamily, Relay, RelayConfig, Target};

/// Fast relays between AF_VSOCK, TCP and Unix sockets for AWS Nitro Enclaves.
///
/// Endpoints are written vsock:CID:PORT (CID may be `any`), tcp:HOST:PORT
/// (IPv6 in brackets) or unix:PATH. Logging: set RUST_LOG.
#[derive(Parser, Debug)]
#[command(name = "vsock-relay", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The allowlisted proxy of `vsock-proxy`, listening on any endpoint.
    Proxy {
        /// Where to listen (vsock-proxy listens on vsock:any:LOCAL_PORT).
        #[arg(long, value_name = "ENDPOINT")]
        listen: Endpoint,

        /// Worker threads (default: one per core).
        #[arg(short = 'w', long = "workers", default_value_t = 0, hide_default_value = true)]
        workers: usize,

        #[command(flatten)]
        proxy: ProxyArgs,
    },
    /// Enclave side: TCP listeners forwarding to vsock, replacing the
    /// workshop's traffic_forwarder.py (and its run.sh's hosts line).
    ///
    /// Workshop form: `vsock-relay forward 127.0.0.1 443 3 8001`. Several
    /// forwardings in one process: `--map 443=vsock:3:8001 --map ...`.
    Forward {
        /// The workshop's form: LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT.
        #[arg(value_name = "LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT", num_args = 0..)]
        positional: Vec<String>,

        /// Where to listen: an endpoint, or a bare port (TCP on 127.0.0.1).
        #[arg(long, value_name = "ENDPOINT", value_parser = parse_listen, requires = "to")]
        listen: Option<Endpoint>,

        /// Where to forward the connections of --listen.
        #[arg(long, value_name = "ENDPOINT", requires = "listen")]
        to: Option<Endpoint>,

        /// One more forwarding, LISTEN=TO (repeatable), e.g. 443=vsock:3:8001.
        #[arg(long = "map", value_name = "LISTEN=TO", value_parser = parse_mapping)]
        maps: Vec<Mapping>,

        /// Map NAME to 127.0.0.1 in the hosts file and bring the loopback
        /// interface up, as the workshop's run.sh does by hand (repeatable;
        /// adds nothing that is already there).
        #[arg(long = "hosts", value_name = "NAME")]
        hosts: Vec<String>,

        /// The hosts file --hosts edits.
        #[arg(long, default_value = "/etc/hosts", value_name = "FILE")]
        hosts_file: PathBuf,

        /// Worker threads per forwarding (default: one per core).
        #[arg(short = 'w', long = "workers", default_value_t = 0, hide_default_value = true)]
        workers: usize,

        #[command(flatten)]
        engine: EngineArgs,
    },
    /// A plain relay between any two endpoints, without an allowlist.
    Relay {
        /// Where to listen.
        #[arg(long, value_name = "ENDPOINT")]
        listen: Endpoint,

        /// Where to connect for each client (a TCP host name follows DNS).
        #[arg(long, value_name = "ENDPOINT")]
        to: Endpoint,

        /// Worker threads (default: one per core).
        #[arg(short = 'w', long = "workers", default_value_t = 0, hide_default_value = true)]
        workers: usize,

        #[command(flatten)]
        engine: EngineArgs,
    },
}

/// The forwardings a `forward` command asks for; a usage error when none.
fn forward_mappings(
    positional: &[String],
    listen: Option<Endpoint>,
    to: Option<Endpoint>,
    maps: Vec<Mapping>,
) -> Result<Vec<Mapping>, String> {
    let mut mappings = Vec::new();
    if !positional.is_empty() {
        mappings.push(parse_positional(positional)?);
    }
    if let (Some(listen), Some(to)) = (listen, to) {
        mappings.push(Mapping { listen, to });
    }
    mappings.extend(maps);
    if mappings.is_empty() {
        return Err("nothing to forward: give LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT, --listen and --to, or --map LISTEN=TO".into());
    }
    Ok(mappings)
}

fn forward(
    mappings: Vec<Mapping>,
    hosts: &[String],
    hosts_file: &Path,
    workers: usize,
    engine: &EngineArgs,
) -> anyhow::Result<Vec<Relay>> {
    if !hosts.is_empty() {
        if vsock_relay_engine::bring_up_loopback()
            .context("cannot bring the loopback interface up (run as root)")?
        {
            tracing::info!("loopback interface brought up");
        }
        let added = ensure_hosts(hosts_file, [127, 0, 0, 1].into(), hosts).map_err(anyhow::Error::msg)?;
        if !added.is_empty() {
            tracing::info!(file = %hosts_file.display(), names = %added.join(" "), "hosts entries added");
        }
    }
    let mut relays = Vec::with_capacity(mappings.len());
    for Mapping { listen, to } in mappings {
        let target =
            Target::new(&to, &engine.dns(IpFamily::Any)).with_context(|| format!("cannot use {to}"))?;
        let mut config = RelayConfig::new(listen, target);
        config.workers = workers;
        engine.apply(&mut config);
        relays.push(Relay::start(config)?);
    }
    Ok(relays)
}

/// A usage error found after parsing (exit 2, like clap's own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn start(command: Command) -> anyhow::Result<Vec<Relay>> {
    match command {
        Command::Proxy { listen, workers, proxy } => {
            Ok(vec![proxy::start(&proxy.settings(listen, workers))?])
        }
        Command::Relay { listen, to, workers, engine } => {
            let target = Target::new(&to, &engine.dns(IpFamily::Any))
                .with_context(|| format!("cannot use --to {to}"))?;
            let mut config = RelayConfig::new(listen, target);
            config.workers = workers;
            engine.apply(&mut config);
            Ok(vec![Relay::start(config)?])
        }
        Command::Forward { positional, listen, to, maps, hosts, hosts_file, workers, engine } => {
            let mappings = forward_mappings(&positional, listen, to, maps).map_err(UsageError)?;
            forward(mappings, &hosts, &hosts_file, workers, &engine)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging();
    match start(cli.command).and_then(run::until_signal_all) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast::<UsageError>() {
            Ok(UsageError(usage)) => {
                Cli::command().error(clap::error::ErrorKind::ValueValidation, usage).exit()
            }
            Err(e) => run::fail("vsock-relay", e),
        },
    }
}
