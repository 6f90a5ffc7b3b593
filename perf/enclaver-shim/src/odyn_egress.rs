//! Enclaver's in-enclave egress proxy, as odyn runs it (odyn's
//! `egress.rs`): `EnclaveHttpProxy` on 127.0.0.1:PORT, an HTTP proxy
//! (CONNECT and absolute-form requests) that checks enclaver's egress policy
//! and carries each connection over vsock to the host-side proxy. Only the
//! start-up differs: odyn reads the port and policy from enclaver.yaml, this
//! reads them from flags; nothing of the proxy itself is changed here (the
//! CID it dials is set in enclaver's source by perf/build-enclaver).

use std::sync::Arc;

use anyhow::{Result, bail};
use enclaver::manifest::Egress;
use enclaver::policy::EgressPolicy;
use enclaver::proxy::egress_http::EnclaveHttpProxy;
use enclaver_shim::{DEFAULT_LISTEN_PORT, DEFAULT_VSOCK_PORT, parse};
use log::info;

const USAGE: &str = "usage: odyn-egress [--listen-port P (10000)] [--vsock-port P (17002)] \
                     (--allow-all | --allow PATTERN ... [--deny PATTERN ...]) [-v]";

#[tokio::main]
async fn main() -> Result<()> {
    let flags = parse(
        std::env::args().skip(1),
        &["--listen-port", "--vsock-port", "--allow", "--deny", "--allow-all"],
    )
    .map_err(|err| err.context(USAGE))?;
    let policy = match (flags.allow_all, flags.allow.is_empty()) {
        (true, true) if flags.deny.is_empty() => EgressPolicy::allow_all(),
        (false, false) => EgressPolicy::new(&Egress {
            proxy_port: flags.listen_port,
            allow: Some(flags.allow.clone()),
            deny: (!flags.deny.is_empty()).then(|| flags.deny.clone()),
        }),
        _ => bail!("give either --allow-all alone or --allow (with optional --deny)\n{USAGE}"),
    };
    enclaver::utils::init_logging(flags.verbosity);
    let listen_port = flags.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
    let vsock_port = flags.vsock_port.unwrap_or(DEFAULT_VSOCK_PORT);
    let proxy = EnclaveHttpProxy::bind(listen_port).await?;
    info!(
        "odyn egress: http proxy on 127.0.0.1:{listen_port}, to vsock cid {} port {vsock_port}",
        enclaver::vsock::VMADDR_CID_HOST
    );
    proxy.serve(vsock_port, Arc::new(policy)).await;
    Ok(())
}
