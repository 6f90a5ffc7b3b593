//! Process glue shared by the binaries: logging, running a relay until
//! SIGINT/SIGTERM, and the exit code of a failure.

use std::io::IsTerminal;
use std::process::ExitCode;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;
use vsock_relay_engine::{Endpoint, Relay};

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    init_logging_at("info");
}

/// Logs to stderr; `RUST_LOG` filters (default `level`).
pub fn init_logging_at(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs `relay` until SIGINT or SIGTERM, then lets open connections drain.
pub fn until_signal(relay: Relay) -> anyhow::Result<()> {
    until_signal_all(vec![relay])
}

/// Blocks until SIGINT or SIGTERM, for a server that is not a relay and
/// listens on `listen`; then removes its Unix socket file, if it has one.
pub fn serve_until_signal(listen: &Endpoint) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "stopping");
    }
    if let Endpoint::Unix { path } = listen {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Runs several relays (one per mapping) until SIGINT or SIGTERM; a relay
/// that fails stops the others too.
pub fn until_signal_all(relays: Vec<Relay>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let stops: Vec<_> = relays.iter().map(|r| r.stop_handle()).collect();
    let watched_stops = stops.clone();
    let handle = signals.handle();
    let watcher = std::thread::spawn(move || {
        let mut received = signals.forever();
        if let Some(signal) = received.next() {
            tracing::info!(signal, "stopping: finishing open connections (signal again to reset them now)");
            watched_stops.iter().for_each(|s| s.stop());
        }
        if let Some(signal) = received.next() {
            tracing::warn!(signal, "second signal: resetting open connections now");
            watched_stops.iter().for_each(|s| s.stop_now());
        }
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for relay in relays {
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let (listen, stats) = (relay.local_endpoint().clone(), relay.stats());
            let result = relay.wait();
            let totals = stats.snapshot();
            tracing::info!(
                accepted = totals.accepted,
                failed = totals.failed,
                refused = totals.refused,
                cut_by_drain = totals.cut_by_drain,
                bytes_to_upstream = totals.bytes_to_upstream,
                bytes_to_client = totals.bytes_to_client,
                %listen,
                "relay stopped"
            );
            let _ = done.send(result);
        });
    }
    drop(done_tx);
    let mut first_error = None;
    for result in done_rx {
        if let Err(e) = result {
            stops.iter().for_each(|s| s.stop());
            first_error.get_or_insert(e);
        }
    }
    handle.close();
    let _ = watcher.join();
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// Prints a failure as one line (its causes after colons, each once) and
/// returns exit code 1.
pub fn fail(program: &str, error: anyhow::Error) -> ExitCode {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    eprintln!("{program}: error: {line}");
    ExitCode::from(1)
}
