//! `vsock-proxy`: a drop-in for AWS's Nitro Enclaves vsock proxy. Same
//! command line, same YAML allowlist; see the README for what it fixes.
//! Its command line lives in the library, not in `bin/vsock-proxy.rs`, so
//! that `vsock-relay` can write its manual page beside its own.

use std::process::ExitCode;

use crate::relay::options::{parse_remote_host, parse_workers};
use crate::relay::proxy::{self, ProxyArgs};
use crate::relay::run::{self, LogFormat};
use crate::relay::services::{ServiceSpec, SpecUpstream};
use clap::Parser;
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
#[command(name = "vsock-proxy", version, after_long_help = INSTALLED)]
pub struct Cli {
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
    #[arg(long, default_value = "text")]
    log_format: LogFormat,

    #[command(flatten)]
    proxy: ProxyArgs,
}

/// Where the packages put this binary, and why not where AWS's is.
const INSTALLED: &str = "The .rpm and .deb packages install this drop-in as \
/usr/libexec/vsock-relay/vsock-proxy: /usr/bin/vsock-proxy belongs to AWS's \
aws-nitro-enclaves-cli package and stays untouched. The unit vsock-relay-proxy@.service \
runs the same proxy as `vsock-relay proxy`.";

/// The file name of this command's manual page: its own, beside AWS's command.
pub const MAN_PAGE: &str = "vsock-relay-vsock-proxy";

impl Cli {
    /// Runs the proxy until a signal; the exit code of the outcome.
    pub fn run(self) -> ExitCode {
        let cli = self;
        run::init_logging("info", cli.log_format);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let listen = Endpoint::vsock(VSOCK_CID_ANY, cli.local_port);
        let upstream = SpecUpstream::Fixed { host: cli.remote_addr, port: cli.remote_port };
        let service = ServiceSpec::single(listen, upstream);
        let settings = cli.proxy.settings(vec![service], None, cli.num_workers.min(cores));
        match proxy::start(&settings).and_then(run::until_signal) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => run::fail("vsock-proxy", e),
        }
    }
}
