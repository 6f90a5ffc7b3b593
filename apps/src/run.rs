//! Process glue shared by the binaries: logging, running a relay until
//! SIGINT/SIGTERM, and the exit code of a failure.

use std::io::IsTerminal;
use std::process::ExitCode;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;
use vsock_relay_engine::Relay;

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs `relay` until SIGINT or SIGTERM, then lets open connections drain.
pub fn until_signal(relay: Relay) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let stop = relay.stop_handle();
    let stats = relay.stats();
    let handle = signals.handle();
    let watcher = std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            tracing::info!(signal, "stopping: finishing open connections");
            stop.stop();
        }
    });
    let result = relay.wait();
    handle.close();
    let _ = watcher.join();
    let totals = stats.snapshot();
    tracing::info!(
        accepted = totals.accepted,
        failed = totals.failed,
        bytes_to_upstream = totals.bytes_to_upstream,
        bytes_to_client = totals.bytes_to_client,
        "relay stopped"
    );
    Ok(result?)
}

/// Prints a failure as one line and returns exit code 1.
pub fn fail(program: &str, error: anyhow::Error) -> ExitCode {
    eprintln!("{program}: error: {error:#}");
    ExitCode::from(1)
}
