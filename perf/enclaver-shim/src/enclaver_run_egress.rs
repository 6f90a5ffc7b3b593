//! Enclaver's host-side egress proxy, as enclaver-run starts it (`run.rs`,
//! `start_egress_proxy`): `HostHttpProxy` listening on vsock (any CID) at
//! the egress port, reading each connection's JSON connect request and
//! connecting out over TCP ("host" meaning 127.0.0.1). As in enclaver, the
//! egress policy is enforced by the in-enclave proxy, not here.

use anyhow::Result;
use enclaver::proxy::egress_http::HostHttpProxy;
use enclaver_shim::{DEFAULT_VSOCK_PORT, parse};
use log::info;

const USAGE: &str = "usage: enclaver-run-egress [--vsock-port P (17002)] [-v]";

#[tokio::main]
async fn main() -> Result<()> {
    let flags = parse(std::env::args().skip(1), &["--vsock-port"]).map_err(|err| err.context(USAGE))?;
    enclaver::utils::init_logging(flags.verbosity);
    let vsock_port = flags.vsock_port.unwrap_or(DEFAULT_VSOCK_PORT);
    let proxy = HostHttpProxy::bind(vsock_port)?;
    info!("enclaver-run egress: vsock port {vsock_port} (any cid), connecting out over tcp");
    proxy.serve().await;
    Ok(())
}
