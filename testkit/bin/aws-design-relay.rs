//! The AWS-design baseline relay as a process, for perf/compare:
//! `aws-design-relay LISTEN TARGET [WORKERS]` (default 4 workers, AWS's
//! default), each address an endpoint (`vsock:any:8001`, `tcp:HOST:PORT`,
//! `unix:PATH`) or a plain IP:PORT. Runs until killed.

use std::net::SocketAddr;
use std::process::ExitCode;

use vsock_relay_engine::Endpoint;
use vsock_relay_testkit::baseline::Baseline;

fn endpoint(text: &str) -> Option<Endpoint> {
    text.parse().ok().or_else(|| text.parse::<SocketAddr>().ok().map(Endpoint::tcp))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [listen, target] => (|| Some((endpoint(listen)?, endpoint(target)?, 4)))(),
        [listen, target, workers] => {
            (|| Some((endpoint(listen)?, endpoint(target)?, workers.parse().ok()?)))()
        }
        _ => None,
    };
    let Some((listen, target, workers)): Option<(Endpoint, Endpoint, usize)> = parsed else {
        eprintln!("usage: aws-design-relay LISTEN TARGET [WORKERS]  (endpoints, or IP:PORT)");
        return ExitCode::from(2);
    };
    match Baseline::serve(&listen, &target, workers.max(1)) {
        Ok(_) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("aws-design-relay: cannot listen on {listen} (to {target}): {e}");
            ExitCode::from(1)
        }
    }
}
