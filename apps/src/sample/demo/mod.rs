//! `vsock-relay demo`: the workshop's whole secure local channel in one
//! process, so a newcomer sees the product work with one command. The parent
//! side (a local HTTPS endpoint standing in for ip-ranges.amazonaws.com, the
//! allowlisted proxy, the client) and the enclave side (the forwarder, the
//! server) talk over AF_VSOCK loopback when the kernel has it, else over
//! Unix sockets in a temporary directory.

pub mod endpoint;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use vsock_relay_engine::endpoint::VSOCK_CID_ANY;
use vsock_relay_engine::{Endpoint, Host, IpFamily, Relay, Target};

use crate::bench;
use crate::relay::options::EngineArgs;
use crate::relay::proxy::{self, ProxySettings};
use crate::relay::services::{ServiceSpec, SpecUpstream};
use crate::sample::client::{self, Reply};
use crate::sample::ipranges::{Source, SourceSettings};
use crate::sample::serve::{self, Server};
pub use endpoint::HttpsEndpoint;

/// The bundled ip-ranges.json: the real schema, a handful of made-up-for-
/// the-demo entries (S3 and other services, several regions).
pub const SAMPLE_DOCUMENT: &[u8] = include_bytes!("ip-ranges.json");

/// The workshop's vsock port for the proxy (the server's is 5005).
const PROXY_PORT: u32 = 8001;
/// A second proxy for the throughput line, to a byte sink.
const BULK_PROXY_PORT: u32 = 8002;

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Region the client asks for (repeatable).
    #[arg(long = "region", value_name = "REGION", default_values = ["us-east-1", "eu-west-1"])]
    pub regions: Vec<String>,

    /// How the vsock hops are carried: `auto` uses AF_VSOCK loopback (CID 1)
    /// when the kernel has it (module vsock_loopback) and Unix sockets
    /// otherwise; `vsock` insists; `unix` never touches AF_VSOCK.
    #[arg(long, default_value = "auto")]
    pub transport: Transport,

    /// MiB pushed through forwarder + proxy for the throughput line (0: skip).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub throughput_mib: u64,

    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Auto,
    Vsock,
    Unix,
}

/// Whether AF_VSOCK loopback can be used, without opening a vsock socket.
fn vsock_loopback() -> Result<(), String> {
    let env = vsock_relay_engine::socket::NO_VSOCK_ENV;
    if std::env::var_os(env).is_some() {
        return Err(format!("AF_VSOCK is disabled here ({env} is set)"));
    }
    if !Path::new("/sys/module/vsock_loopback").exists() {
        return Err("this kernel has no AF_VSOCK loopback: module vsock_loopback is not loaded".into());
    }
    Ok(())
}

/// Where the two sides meet: listen on one endpoint, connect to the other.
struct Hop {
    listen: Endpoint,
    connect: Endpoint,
}

/// The hops of the channel, and the temporary directory of Unix sockets,
/// the CA file and the allowlist (removed on drop).
struct Layout {
    dir: PathBuf,
    vsock: bool,
}

impl Layout {
    fn new(vsock: bool) -> anyhow::Result<Layout> {
        let dir = std::env::temp_dir().join(format!("vsock-relay-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Layout { dir, vsock })
    }

    fn hop(&self, vsock_port: u32, unix_name: &str) -> Hop {
        if self.vsock {
            Hop {
                listen: Endpoint::vsock(VSOCK_CID_ANY, vsock_port),
                connect: Endpoint::vsock(1, vsock_port),
            }
        } else {
            let path = self.dir.join(unix_name);
            Hop { listen: Endpoint::Unix { path: path.clone() }, connect: Endpoint::Unix { path } }
        }
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo, writing each hop and the answers to `out`; fails when a
/// hop fails.
pub fn run(args: &DemoArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let vsock = match (args.transport, vsock_loopback()) {
        (Transport::Unix, _) => {
            writeln!(out, "vsock hops: Unix sockets (--transport unix)")?;
            false
        }
        (Transport::Vsock, Err(why)) => anyhow::bail!("--transport vsock: {why}"),
        (_, Ok(())) => true,
        (Transport::Auto, Err(why)) => {
            writeln!(out, "vsock hops: Unix sockets ({why})")?;
            false
        }
    };
    if vsock {
        writeln!(out, "vsock hops: AF_VSOCK loopback (CID 1)")?;
    }
    let layout = Layout::new(vsock)?;

    let endpoint = HttpsEndpoint::start(SAMPLE_DOCUMENT.to_vec())?;
    let ca_file = layout.dir.join("demo-ca.pem");
    std::fs::write(&ca_file, endpoint.ca_pem())?;
    // The bench's sink counts what the throughput line sends.
    let sink_port = tcp_port(&bench::sink::start(&loopback(0))?);
    let allowlist = layout.dir.join("vsock-proxy.yaml");
    std::fs::write(
        &allowlist,
        format!(
            "allowlist:\n- {{address: localhost, port: {}}}\n- {{address: localhost, port: {}}}\n",
            endpoint.port(),
            sink_port
        ),
    )?;

    let (proxy_hop, bulk_hop) =
        (layout.hop(PROXY_PORT, "proxy.sock"), layout.hop(BULK_PROXY_PORT, "bulk.sock"));
    let proxy = start_proxy(args, &proxy_hop, endpoint.port(), &allowlist)?;
    let bulk_proxy = start_proxy(args, &bulk_hop, sink_port, &allowlist)?;
    let forwarder = start_forwarder(args, &proxy_hop)?;
    let bulk_forwarder = start_forwarder(args, &bulk_hop)?;
    let forwarder_port = tcp_port(forwarder.local_endpoint());

    let server_hop = layout.hop(serve::DEFAULT_PORT, "server.sock");
    let url = format!("https://localhost:{forwarder_port}{}", endpoint::PATH);
    let source = Source::new(SourceSettings {
        url: url.clone(),
        ca_file: Some(ca_file),
        timeout: Duration::from_secs(10),
        cache_for: Duration::from_secs(300),
        proxy: None,
    })?;
    let server = Server::start(&server_hop.listen, source)?;

    writeln!(out)?;
    writeln!(
        out,
        "  parent   HTTPS endpoint  tcp:127.0.0.1:{}, standing in for ip-ranges.amazonaws.com",
        endpoint.port()
    )?;
    writeln!(out, "                           (bundled sample document, certificate made just now)")?;
    writeln!(
        out,
        "  parent   vsock-proxy     {} -> localhost:{}, allowlisted in {}",
        proxy.local_endpoint(),
        endpoint.port(),
        allowlist.display()
    )?;
    writeln!(out, "  enclave  forwarder       {} -> {}", forwarder.local_endpoint(), proxy_hop.connect)?;
    writeln!(out, "  enclave  server          {}, fetching {url}", server.local_endpoint())?;
    writeln!(out, "  parent   client          -> {}", server_hop.connect)?;
    writeln!(out)?;

    for region in &args.regions {
        match client::ask(&server_hop.connect, region, Duration::from_secs(30))? {
            Reply::Answer(answer) => writeln!(out, "client {region}: {answer}")?,
            Reply::ServerError(error) => anyhow::bail!("the server answered {region} with an error: {error}"),
        }
    }
    writeln!(
        out,
        "(the HTTPS endpoint was asked {} time(s): the server caches the document)",
        endpoint.requests()
    )?;

    if args.throughput_mib > 0 {
        let bytes = args.throughput_mib << 20;
        let direct = bench::load::bulk(&bench::load::Dial::direct(&loopback(sink_port)), 1, bytes)?;
        let chain = bench::load::bulk(&bench::load::Dial::direct(bulk_forwarder.local_endpoint()), 1, bytes)?;
        writeln!(out)?;
        writeln!(out,
            "throughput: {} MiB through forwarder + proxy ({} hop): {:.2} GiB/s, {:.2}x direct TCP in the same run ({:.2} GiB/s)",
            args.throughput_mib,
            if vsock { "vsock" } else { "Unix" },
            chain.total_gib_per_s,
            chain.total_gib_per_s / direct.total_gib_per_s,
            direct.total_gib_per_s,
        )?;
    }
    for relay in [forwarder, bulk_forwarder, proxy, bulk_proxy] {
        relay.shutdown()?;
    }
    Ok(())
}

fn start_proxy(args: &DemoArgs, hop: &Hop, port: u16, allowlist: &Path) -> anyhow::Result<Relay> {
    let upstream = SpecUpstream::Fixed { host: Host::Name("localhost".into()), port };
    let service = ServiceSpec::single(hop.listen.clone(), upstream);
    proxy::start(&ProxySettings {
        services: vec![service],
        services_file: None,
        config: allowlist.to_path_buf(),
        family: IpFamily::Any,
        workers: 1,
        head_timeout: vsock_relay_engine::route::DEFAULT_HEAD_TIMEOUT.as_secs_f64(),
        dns_grace: crate::dns::answered::DEFAULT_GRACE.as_secs_f64(),
        dns_rate: crate::dns::server::DEFAULT_RATE,
        engine: args.engine.clone(),
    })
    .and_then(|running| running.relay.ok_or_else(|| anyhow::anyhow!("the demo's proxy has no relay")))
}

fn start_forwarder(args: &DemoArgs, hop: &Hop) -> anyhow::Result<Relay> {
    args.engine.start(vec![args.engine.service(loopback(0), Target::fixed(&hop.connect)?)], 1)
}

/// The port of an endpoint the demo bound on TCP port 0 (forwarders, sink).
fn tcp_port(endpoint: &Endpoint) -> u16 {
    match endpoint {
        Endpoint::Tcp { port, .. } => *port,
        other => unreachable!("{other} is not a TCP listener"),
    }
}

/// 127.0.0.1:`port` as an endpoint.
fn loopback(port: u16) -> Endpoint {
    Endpoint::Tcp { host: Host::Ip([127, 0, 0, 1].into()), port }
}
