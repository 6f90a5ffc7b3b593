//! `vsock-proxy`: a drop-in for AWS's Nitro Enclaves vsock proxy. Same
//! command line, same YAML allowlist; see the README for what it fixes.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use vsock_relay_apps::options::parse_workers;
use vsock_relay_apps::proxy::{self, ProxyArgs};
use vsock_relay_apps::run;
use vsock_relay_engine::endpoint::VSOCK_CID_ANY;
use vsock_relay_engine::Endpoint;

/// Vsock-TCP proxy: forwards connections from enclaves (vsock LOCAL_PORT)
/// to one allowlisted TCP service (REMOTE_ADDR:REMOTE_PORT).
///
/// Logging: set RUST_LOG (error, warn, info, debug). Exit status: 0 after
/// SIGINT/SIGTERM (a second signal ends the drain at once), 1 when the config
/// or allowlist refuses the target or the port is in use, 2 on a usage error.
#[derive(Parser, Debug)]
#[command(name = "vsock-proxy", version, about, long_about)]
struct Cli {
    /// Worker threads, each an event loop serving any number of connections
    /// (AWS's proxy: the maximum number of simultaneous connections). Capped
    /// at the number of cores.
    #[arg(short = 'w', long = "num_workers", default_value = "4", value_parser = parse_workers)]
    num_workers: usize,

    /// Local vsock port to listen on for incoming connections.
    #[arg(value_name = "LOCAL_PORT")]
    local_port: u32,

    #[command(flatten)]
    proxy: ProxyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listen = Endpoint::Vsock { cid: VSOCK_CID_ANY, port: cli.local_port };
    let settings = cli.proxy.settings(listen, cli.num_workers.min(cores));
    match proxy::start(&settings).and_then(run::until_signal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => run::fail("vsock-proxy", e),
    }
}
