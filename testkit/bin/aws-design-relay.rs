//! The AWS-design baseline relay as a process, for perf/compare:
//! `aws-design-relay LISTEN_ADDR TARGET_ADDR [WORKERS]` (default 4 workers,
//! AWS's default). Runs until killed.

use std::net::SocketAddr;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [listen, target] => listen.parse().and_then(|l| target.parse().map(|t| (l, t, 4))).ok(),
        [listen, target, workers] => {
            (|| Some((listen.parse().ok()?, target.parse().ok()?, workers.parse().ok()?)))()
        }
        _ => None,
    };
    let Some((listen, target, workers)): Option<(SocketAddr, SocketAddr, usize)> = parsed else {
        eprintln!("usage: aws-design-relay LISTEN_ADDR TARGET_ADDR [WORKERS]  (addresses as IP:PORT)");
        return ExitCode::from(2);
    };
    match vsock_relay_testkit::baseline::Baseline::start_on(listen, target, workers.max(1)) {
        Ok(_) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("aws-design-relay: cannot listen on {listen}: {e}");
            ExitCode::from(1)
        }
    }
}
