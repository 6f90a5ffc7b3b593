//! `vsock-relay`: the relay engine's apps behind one command. Each
//! subcommand's options and start-up live in its own module; this file only
//! dispatches and turns the outcome into an exit code.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use vsock_relay_apps::about;
use vsock_relay_apps::bench::{self, Bench};
use vsock_relay_apps::dns::forwarder::DnsArgs;
use vsock_relay_apps::relay::doctor::DoctorArgs;
use vsock_relay_apps::relay::forward::ForwardArgs;
use vsock_relay_apps::relay::options::{RelayArgs, UsageError};
use vsock_relay_apps::relay::proxy::ProxyCommand;
use vsock_relay_apps::relay::run::{self, LogFormat};
use vsock_relay_apps::sample::client::ClientArgs;
use vsock_relay_apps::sample::demo::{self, DemoArgs};
use vsock_relay_apps::sample::serve::ServeArgs;

/// Fast relays between AF_VSOCK, TCP and Unix sockets for AWS Nitro Enclaves.
///
/// Endpoints are written vsock:CID:PORT (CID may be `any`), tcp:HOST:PORT
/// (IPv6 in brackets) or unix:PATH. Logging: set RUST_LOG.
#[derive(Parser, Debug)]
#[command(name = "vsock-relay", version)]
struct Cli {
    /// Log lines as text, or as one JSON object per line.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The allowlisted proxy of `vsock-proxy`, listening on any endpoint.
    Proxy(ProxyCommand),
    /// Enclave side: TCP listeners forwarding to vsock, replacing the
    /// workshop's traffic_forwarder.py (and its run.sh's hosts line).
    ///
    /// Workshop form: `vsock-relay forward 127.0.0.1 443 3 8001`. Several
    /// forwardings in one process: `--map 443=vsock:3:8001 --map ...`.
    Forward(ForwardArgs),
    /// Enclave side: the enclave's resolver. Answers DNS on UDP and TCP at
    /// --listen by sending every query over one connection to the parent's
    /// DNS service (`route: dns`), which answers by its allowlist.
    ///
    /// `vsock-relay dns --listen udp:127.0.0.1:53 --to vsock:3:8053
    /// --resolv-conf` (--resolv-conf REPLACES /etc/resolv.conf with
    /// `nameserver 127.0.0.1`). Every query gets an answer: SERVFAIL when
    /// the parent is unreachable or slow (--query-timeout); UDP answers
    /// above the client's size come back truncated, so it asks over TCP.
    Dns(DnsArgs),
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
    Client(ClientArgs),
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
    Relay(RelayArgs),
    /// Checks this machine (vsock transports and CID, the backend, limits)
    /// and, on the parent, the proxy's config and services files; in the
    /// enclave, its forwardings and hosts file. One line per check, `ok`,
    /// `warn` or `fail` with the one thing to do; exit 1 when one fails.
    ///
    /// Opens no vsock connection unless --connect asks it to.
    Doctor(DoctorArgs),
    /// Prints the completion script for SHELL on stdout. The packages
    /// install these already; by hand, e.g.
    /// `vsock-relay completions bash > ~/.local/share/bash-completion/completions/vsock-relay`.
    Completions {
        /// The shell to complete in.
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
}

impl Command {
    /// The name its one-line errors start with.
    fn program(&self) -> &'static str {
        match self {
            Command::Client(_) => "vsock-relay client",
            Command::Demo(_) => "vsock-relay demo",
            Command::Serve(_) => "vsock-relay serve",
            Command::Bench(_) => "vsock-relay bench",
            Command::Doctor(_) => "vsock-relay doctor",
            _ => "vsock-relay",
        }
    }

    /// Its name on the command line.
    fn name(&self) -> &'static str {
        match self {
            Command::Proxy(_) => "proxy",
            Command::Forward(_) => "forward",
            Command::Dns(_) => "dns",
            Command::Serve(_) => "serve",
            Command::Client(_) => "client",
            Command::Demo(_) => "demo",
            Command::Bench(_) => "bench",
            Command::Relay(_) => "relay",
            Command::Doctor(_) => "doctor",
            Command::Completions { .. } => "completions",
        }
    }

    fn run(self) -> anyhow::Result<ExitCode> {
        let running = match self {
            Command::Client(args) => return args.run(),
            Command::Serve(args) => return args.run().map(|()| ExitCode::SUCCESS),
            Command::Dns(args) => return args.run().map(|()| ExitCode::SUCCESS),
            Command::Bench(bench) => return bench::run(bench).map(|()| ExitCode::SUCCESS),
            Command::Doctor(args) => return args.run(&mut std::io::stdout().lock()),
            Command::Demo(args) => {
                return demo::run(&args, &mut std::io::stdout().lock()).map(|()| ExitCode::SUCCESS)
            }
            Command::Completions { shell } => {
                about::completions(shell, &mut Cli::command(), &mut std::io::stdout().lock())
                    .map_err(|e| anyhow::anyhow!("cannot write the completion script: {e}"))?;
                return Ok(ExitCode::SUCCESS);
            }
            Command::Proxy(args) => args.start()?,
            Command::Relay(args) => args.start()?,
            Command::Forward(args) => args.start()?,
        };
        run::until_signal(running)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn main() -> ExitCode {
    if let Some(code) = about::generate_docs_if_asked(Cli::command) {
        return code;
    }
    let cli = about::parse::<Cli>();
    match &cli.command {
        // The demo's output is its story; the client's is its answer.
        Command::Demo(_) | Command::Client(_) | Command::Bench(_) | Command::Doctor(_) => {
            run::init_logging("warn", cli.log_format)
        }
        _ => run::init_logging("info", cli.log_format),
    }
    let (program, name) = (cli.command.program(), cli.command.name());
    match cli.command.run() {
        Ok(code) => code,
        Err(e) => match e.downcast::<UsageError>() {
            // Reported as clap reports its own: the subcommand's usage line, exit 2.
            Ok(UsageError(usage)) => {
                let mut command = Cli::command();
                command.build();
                let subcommand = command.find_subcommand_mut(name).expect("a subcommand of the CLI");
                subcommand.error(clap::error::ErrorKind::ValueValidation, usage).exit()
            }
            Err(e) => run::fail(program, e),
        },
    }
}
