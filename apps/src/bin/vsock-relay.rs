//! `vsock-relay`: the relay engine's apps behind one command.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use std::time::Duration;

use vsock_relay_apps::bench::{self, Bench};
use vsock_relay_apps::client::{self, Reply};
use vsock_relay_apps::demo::{self, DemoArgs};
use vsock_relay_apps::forward::{ensure_hosts, parse_listen, parse_mapping, parse_positional, Mapping};
use vsock_relay_apps::ipranges::Source;
use vsock_relay_apps::options::{parse_seconds, EngineArgs};
use vsock_relay_apps::proxy::{self, ProxyArgs};
use vsock_relay_apps::run;
use vsock_relay_apps::serve::{ServeArgs, Server};
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
    /// Enclave side: the workshop's sample server. A client sends a region
    /// name; the answer is the S3 prefixes of that region in AWS's
    /// ip-ranges.json, fetched over HTTPS (through the forwarder and the
    /// parent's vsock-proxy), as a JSON list; a failure is one line starting
    /// with `error:`.
    ///
    /// Workshop form: `vsock-relay serve 5005` (vsock, any CID).
    Serve(ServeArgs),
    /// Parent side: the workshop's sample client. Sends QUERY (a region
    /// name) to the server, prints the reply, exits 1 on an error reply, a
    /// refused connection or a timeout.
    ///
    /// Workshop form: `vsock-relay client ENCLAVE_CID 5005 us-east-1`.
    Client {
        /// CID PORT QUERY (the workshop's order), or only QUERY with --to.
        #[arg(value_name = "CID PORT QUERY", num_args = 1..=3, required = true)]
        args: Vec<String>,

        /// Where the server listens, any endpoint (then give only QUERY).
        #[arg(long, value_name = "ENDPOINT")]
        to: Option<Endpoint>,

        /// Give up when the whole reply has not come within this many seconds.
        #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_seconds)]
        timeout: f64,
    },
    /// The whole secure local channel on this machine, in one process: a
    /// local HTTPS endpoint standing in for ip-ranges.amazonaws.com, the
    /// proxy, the forwarder, the server and the client; then a throughput
    /// line through forwarder + proxy. Ends by itself.
    Demo(DemoArgs),
    /// Load generator and sink, over any endpoint family: `bench sink`,
    /// then `bench bulk|rpc|churn|idle --to` the sink or a relay before it.
    #[command(subcommand)]
    Bench(Bench),
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

/// The client's server endpoint and query from `CID PORT QUERY` or `--to`.
fn client_target(args: &[String], to: Option<Endpoint>) -> Result<(Endpoint, String), UsageError> {
    match (args, to) {
        ([query], Some(to)) => Ok((to, query.clone())),
        ([cid, port, query], None) => {
            let cid = cid.parse().map_err(|_| UsageError(format!("`{cid}` is not a vsock CID")))?;
            let port = port.parse().map_err(|_| UsageError(format!("`{port}` is not a vsock port")))?;
            Ok((Endpoint::Vsock { cid, port }, query.clone()))
        }
        (_, Some(_)) => Err(UsageError("with --to, give only QUERY".into())),
        (_, None) => Err(UsageError("expected CID PORT QUERY, or --to ENDPOINT QUERY".into())),
    }
}

fn run_client(args: &[String], to: Option<Endpoint>, timeout: f64) -> anyhow::Result<ExitCode> {
    let (to, query) = client_target(args, to)?;
    match client::ask(&to, &query, Duration::from_secs_f64(timeout))? {
        Reply::Answer(answer) => {
            // A closed stdout (`| head`) is not the client's failure.
            let _ = writeln!(std::io::stdout(), "{answer}");
            Ok(ExitCode::SUCCESS)
        }
        Reply::ServerError(error) => {
            eprintln!("vsock-relay client: error from the server: {error}");
            Ok(ExitCode::from(1))
        }
    }
}

fn run_server(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let listen = args.listen();
    let source = Source::new(args.source_settings())?;
    let server = Server::start(&listen, source)?;
    run::serve_until_signal(server.local_endpoint())?;
    Ok(ExitCode::SUCCESS)
}

fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    let relays = match command {
        Command::Client { args, to, timeout } => return run_client(&args, to, timeout),
        Command::Serve(args) => return run_server(args),
        Command::Bench(bench) => return bench::run(bench).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => {
            return demo::run(&args, &mut std::io::stdout().lock()).map(|()| ExitCode::SUCCESS)
        }
        Command::Proxy { listen, workers, proxy } => vec![proxy::start(&proxy.settings(listen, workers))?],
        Command::Relay { listen, to, workers, engine } => {
            let target = Target::new(&to, &engine.dns(IpFamily::Any))
                .with_context(|| format!("cannot use --to {to}"))?;
            let mut config = RelayConfig::new(listen, target);
            config.workers = workers;
            engine.apply(&mut config);
            vec![Relay::start(config)?]
        }
        Command::Forward { positional, listen, to, maps, hosts, hosts_file, workers, engine } => {
            let mappings = forward_mappings(&positional, listen, to, maps).map_err(UsageError)?;
            forward(mappings, &hosts, &hosts_file, workers, &engine)?
        }
    };
    run::until_signal_all(relays)?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        // The demo's output is its story; the client's is its answer.
        Command::Demo(_) | Command::Client { .. } | Command::Bench(_) => run::init_logging_at("warn"),
        _ => run::init_logging(),
    }
    let program = match &cli.command {
        Command::Client { .. } => "vsock-relay client",
        Command::Demo(_) => "vsock-relay demo",
        Command::Serve(_) => "vsock-relay serve",
        Command::Bench(_) => "vsock-relay bench",
        _ => "vsock-relay",
    };
    match run_command(cli.command) {
        Ok(code) => code,
        Err(e) => match e.downcast::<UsageError>() {
            Ok(UsageError(usage)) => {
                Cli::command().error(clap::error::ErrorKind::ValueValidation, usage).exit()
            }
            Err(e) => run::fail(program, e),
        },
    }
}
