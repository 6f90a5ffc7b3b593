//! Process glue shared by the binaries: logging (text or JSON), running a
//! relay until SIGINT/SIGTERM with SIGHUP as reload, and the exit code of a
//! failure.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;
use vsock_relay_engine::{Endpoint, Failure, Relay};

use crate::relay::metrics::MetricsServer;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event and line: `timestamp`, `level`, `target`,
    /// the event's fields (`message` among them) and, for a connection's
    /// lines, `span` with its `id`, `service`, `client` and `upstream`.
    Json,
}

/// Logs to stderr in `format`; `RUST_LOG` filters (default `level`).
/// A line that cannot be written (stderr's reader gone, as after
/// `| head -1`) is dropped: tracing-subscriber would otherwise report it with
/// `eprintln!`, which panics on that same stderr and took the signal thread
/// with it (the relay then ignored SIGTERM).
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
    };
}

/// A started relaying command: its relay and what the process adds to it.
pub struct Running {
    /// `None`: a proxy of DNS services alone (`proxy --route dns`), which
    /// answer on threads of their own.
    pub relay: Option<Relay>,
    /// The `/metrics` endpoint, with `--metrics`.
    pub metrics: Option<MetricsServer>,
    /// What SIGHUP does (the proxy re-reads its allowlist); `None`: SIGHUP
    /// is logged and ignored.
    pub reload: Option<Reload>,
}

/// A reload: called on the signal-watching thread for each SIGHUP.
pub type Reload = Box<dyn FnMut() + Send>;

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

/// Runs until SIGINT or SIGTERM, then lets open connections drain (a
/// second signal resets them); SIGHUP reloads. Logs the totals at the end.
pub fn until_signal(running: Running) -> anyhow::Result<()> {
    let Running { relay, metrics, mut reload } = running;
    let Some(relay) = relay else { return until_stopped(reload) };
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let stop = relay.stop_handle();
    let handle = signals.handle();
    let watcher = std::thread::spawn(move || {
        let mut stops = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                match reload.as_mut() {
                    Some(reload) => reload(),
                    None => tracing::info!(signal, "SIGHUP: nothing to reload for this command; ignored"),
                }
                continue;
            }
            stops += 1;
            if stops == 1 {
                tracing::info!(
                    signal,
                    "stopping: finishing open connections (signal again to reset them now)"
                );
                stop.stop();
            } else {
                tracing::warn!(signal, "second signal: resetting open connections now");
                stop.stop_now();
            }
        }
    });
    let (listen, stats) = (relay.local_endpoints().to_vec(), relay.stats());
    let result = relay.wait();
    let totals = stats.snapshot();
    let listen = listen.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    tracing::info!(
        accepted = totals.accepted,
        failed = totals.failed(),
        refused = totals.refused(),
        cut_by_drain = totals.failed_by(Failure::Drain),
        bytes_to_upstream = totals.bytes_to_upstream,
        bytes_to_client = totals.bytes_to_client,
        %listen,
        "relay stopped"
    );
    drop(metrics);
    handle.close();
    let _ = watcher.join();
    Ok(result?)
}

/// Blocks a process without a relay (DNS services alone) until SIGINT or
/// SIGTERM; SIGHUP reloads.
fn until_stopped(mut reload: Option<Reload>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    for signal in signals.forever() {
        if signal != SIGHUP {
            tracing::info!(signal, "stopping");
            break;
        }
        match reload.as_mut() {
            Some(reload) => reload(),
            None => tracing::info!(signal, "SIGHUP: nothing to reload for this command; ignored"),
        }
    }
    Ok(())
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
    // Not eprintln!: it panics when stderr is closed.
    let _ = writeln!(std::io::stderr(), "{program}: error: {line}");
    ExitCode::from(1)
}
