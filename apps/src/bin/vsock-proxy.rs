//! `vsock-proxy`: a drop-in for AWS's Nitro Enclaves vsock proxy. Same
//! command line, same YAML allowlist; see the README for what it fixes.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vsock_relay_apps::options::{parse_remote_host, parse_workers, EngineArgs};
use vsock_relay_apps::proxy::{self, ProxySettings, DEFAULT_CONFIG};
use vsock_relay_apps::run;
use vsock_relay_engine::{Endpoint, Host, IpFamily};

/// Vsock-TCP proxy: forwards connections from enclaves (vsock LOCAL_PORT)
/// to one allowlisted TCP service (REMOTE_ADDR:REMOTE_PORT).
///
/// Logging: set RUST_LOG (error, warn, info, debug). Exit status: 0 after
/// SIGINT/SIGTERM, 1 when the config or allowlist refuses the target, 2 on a
/// usage error.
#[derive(Parser, Debug)]
#[command(name = "vsock-proxy", version, about, long_about)]
struct Cli {
    /// Force the proxy to use IPv4 addresses only.
    #[arg(short = '4', long = "ipv4")]
    ipv4: bool,

    /// Force the proxy to use IPv6 addresses only.
    #[arg(short = '6', long = "ipv6", conflicts_with = "ipv4")]
    ipv6: bool,

    /// Worker threads, each an event loop serving any number of connections
    /// (AWS's proxy: the maximum number of simultaneous connections). Capped
    /// at the number of cores.
    #[arg(short = 'w', long = "num_workers", default_value = "4", value_parser = parse_workers)]
    num_workers: usize,

    /// YAML file containing the services that can be forwarded.
    #[arg(long = "config", default_value = DEFAULT_CONFIG, value_name = "CONFIG_FILE")]
    config: PathBuf,

    /// Local vsock port to listen on for incoming connections.
    #[arg(value_name = "LOCAL_PORT")]
    local_port: u32,

    /// Host name or IP address of the server to proxy to (not an enclave CID).
    #[arg(value_name = "REMOTE_ADDR", value_parser = parse_remote_host)]
    remote_addr: Host,

    /// TCP port of the server to proxy to.
    #[arg(value_name = "REMOTE_PORT")]
    remote_port: u16,

    #[command(flatten)]
    engine: EngineArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = ProxySettings {
        listen: Endpoint::Vsock { cid: vsock_relay_engine::endpoint::VSOCK_CID_ANY, port: cli.local_port },
        host: cli.remote_addr,
        port: cli.remote_port,
        config: cli.config,
        family: match (cli.ipv4, cli.ipv6) {
            (true, _) => IpFamily::V4Only,
            (_, true) => IpFamily::V6Only,
            _ => IpFamily::Any,
        },
        workers: cli.num_workers.min(cores),
        engine: cli.engine,
    };
    match proxy::start(&settings).and_then(run::until_signal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => run::fail("vsock-proxy", e),
    }
}
