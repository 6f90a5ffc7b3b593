//! `vsock-relay`: the relay engine's apps behind one command.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
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

fn start(command: Command) -> anyhow::Result<Relay> {
    match command {
        Command::Proxy { listen, workers, proxy } => proxy::start(&proxy.settings(listen, workers)),
        Command::Relay { listen, to, workers, engine } => {
            let target = Target::new(&to, &engine.dns(IpFamily::Any))
                .with_context(|| format!("cannot use --to {to}"))?;
            let mut config = RelayConfig::new(listen, target);
            config.workers = workers;
            engine.apply(&mut config);
            Ok(Relay::start(config)?)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging();
    match start(cli.command).and_then(run::until_signal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => run::fail("vsock-relay", e),
    }
}
