//! `vsock-proxy`: a drop-in for AWS's Nitro Enclaves vsock proxy. Same
//! command line, same YAML allowlist; see the README for what it fixes.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use vsock_relay_apps::relay::options::{parse_remote_host, parse_workers};
use vsock_relay_apps::relay::proxy::{self, ProxyArgs};
use vsock_relay_apps::relay::run::{self, LogFormat};
use vsock_relay_apps::relay::services::{ServiceSpec, SpecUpstream};
use vsock_relay_engine::endpoint::VSOCK_CID_ANY;
use vsock_relay_engine::{Endpoint, Host};

/// Vsock-TCP proxy: forwards connections from enclaves (vsock LOCAL_PORT)
/// to one allowlisted TCP service (REMOTE_ADDR:REMOTE_PORT).
///
/// Logging: set RUST_LOG (error, warn, info, debug). SIGHUP re-reads the
/// allowlist. Exit status: 0 after SIGINT/SIGTERM (a second signal ends the
/// drain at once), 1 when the config or allowlist refuses the target or the
/// port is in use, 2 on a usage error.
#[derive(Parser, Debug)]
#[command(name = "vsock-proxy", version)]
struct Cli {
    /// Worker threads, each an event loop serving any number of connections
    /// (AWS's proxy: the maximum number of simultaneous connections). Capped
    /// at the number of cores.
    #[arg(short = 'w', long = "num_workers", default_value = "4", value_parser = parse_workers)]
    num_workers: usize,

    /// Local vsock port to listen on for incoming connections.
    #[arg(value_name = "LOCAL_PORT")]
    local_port: u32,

    /// Host name or IP address of the server to proxy to (not an enclave CID).
    #[arg(value_name = "REMOTE_ADDR", value_parser = parse_remote_host)]
    remote_addr: Host,

    /// TCP port of the server to proxy to.
    #[arg(value_name = "REMOTE_PORT")]
    remote_port: u16,

    /// Log lines as text, or as one JSON object per line.
    #[arg(long, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,

    #[command(flatten)]
    proxy: ProxyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging("info", cli.log_format);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listen = Endpoint::Vsock { cid: VSOCK_CID_ANY, port: cli.local_port };
    let upstream = SpecUpstream::Fixed { host: cli.remote_addr, port: cli.remote_port };
    let service = ServiceSpec::single(listen, upstream);
    let settings = cli.proxy.settings(vec![service], None, cli.num_workers.min(cores));
    match proxy::start(&settings).and_then(run::until_signal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => run::fail("vsock-proxy", e),
    }
}
