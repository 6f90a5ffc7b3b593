//! `vsock-relay bench`: a load generator and sink over any endpoint family,
//! in the spirit of iperf-vsock. Start a `sink`, point a workload at it
//! (directly, or through a relay), read the numbers; `--json` for scripts
//! (perf/compare runs every relay between the same two ends with it).

pub mod dns;
pub mod load;
pub mod sink;

use std::time::Duration;

use clap::{Args, Subcommand};
use vsock_relay_engine::Endpoint;

use load::Latency;

#[derive(Subcommand, Debug, Clone)]
pub enum Bench {
    /// The far end: counts (bulk) or echoes (rpc, churn, idle, burst) what each
    /// connection sends; the workloads say which with a first byte.
    Sink {
        /// Where to listen.
        #[arg(long, value_name = "ENDPOINT")]
        listen: Endpoint,
    },
    /// STREAMS connections sending BYTES each; throughput per stream and in
    /// total, counting only what the sink confirmed.
    Bulk {
        #[command(flatten)]
        common: Common,
        /// Parallel streams.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
        streams: u16,
        /// Bytes per stream (suffixes KiB, MiB, GiB).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        bytes: u64,
    },
    /// CONNECTIONS connections doing REQUESTS round trips of SIZE bytes
    /// each: requests/s, and p50, p99 and max latency.
    Rpc {
        #[command(flatten)]
        common: Common,
        /// Connections, each doing its round trips one after another.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
        connections: u16,
        /// Round trips per connection.
        #[arg(long, default_value_t = 1000)]
        requests: u32,
        /// Request (and echo) size (suffixes KiB, MiB).
        #[arg(long, default_value = "64", value_parser = parse_size)]
        size: u64,
    },
    /// CONNECTIONS times: open, exchange 64 bytes, close; PARALLEL at a
    /// time: connections/s and latency.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Connections opened and closed in all.
        #[arg(long, default_value_t = 2000)]
        connections: u32,
        /// Connections in flight at a time.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
        parallel: u16,
    },
    /// QUERIES lookups of NAME (type A), one at a time, as a stub resolver
    /// makes them, after one that warms the cache: latency and answers by
    /// response code. Not a sink workload: --to is a name server, the
    /// enclave's `vsock-relay dns` (udp:IP:PORT) or the parent's DNS service
    /// (a stream endpoint, DNS over TCP). Several --to take turns query by
    /// query (a result line each): their difference measured at the same
    /// moments.
    Dns {
        /// udp:IP:PORT, or tcp:, unix: or vsock: for DNS over a stream;
        /// repeat it to compare targets.
        #[arg(long, value_name = "TARGET", required = true)]
        to: Vec<dns::DnsTarget>,
        /// The name looked up (an allowed one, to measure answers).
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Lookups measured per target.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        queries: u32,
        /// One JSON object per target on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Opens CONNECTIONS connections (each confirmed with a 1-byte echo),
    /// holds them HOLD seconds and meanwhile checks that new connections are
    /// served. Prints "idle: holding ..." on stderr once all are open.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections opened and held.
        #[arg(long, default_value_t = 1000)]
        connections: u32,
        /// Seconds to hold them.
        #[arg(long, default_value_t = 5.0, value_parser = crate::relay::options::parse_seconds)]
        hold: f64,
        /// Seconds allowed for every connection to answer its echo.
        #[arg(long, default_value_t = 10.0, value_parser = crate::relay::options::parse_seconds)]
        limit: f64,
    },
    /// CONNECTIONS connections opened at once (a thread each), each sending
    /// one byte and waiting for its echo: how many were served, the time
    /// until the last was, and each failure by its cause.
    Burst {
        #[command(flatten)]
        common: Common,
        /// Connections in the burst.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        connections: u32,
        /// Seconds each connection is given, from its connect call to its echo.
        #[arg(long, default_value_t = 30.0, value_parser = crate::relay::options::parse_seconds)]
        limit: f64,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The sink, or a relay in front of it.
    #[arg(long, value_name = "ENDPOINT")]
    to: Endpoint,
    /// Open every connection as an HTTP CONNECT tunnel to HOST:PORT (the
    /// sink) through --to (a `proxy --route connect`), waiting for its
    /// `200` as a client does: what routing costs.
    #[arg(long, value_name = "HOST:PORT")]
    tunnel: Option<String>,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// A byte count: a number with an optional KiB, MiB or GiB suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit {
        "" | "B" => 0,
        "KiB" | "K" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        _ => return Err(format!("`{text}`: expected a number of bytes with an optional KiB, MiB or GiB")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a number of bytes"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n && *v > 0)
        .ok_or_else(|| format!("`{text}`: out of range"))
}

/// Runs a bench command; the sink runs until the process is stopped.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    let print = |common: &Common, value: serde_json::Value, text: String| {
        if common.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    };
    let dial = |common: &Common| load::Dial { to: common.to.clone(), tunnel: common.tunnel.clone() };
    match bench {
        Bench::Sink { listen } => {
            let local = sink::start(&listen)?;
            // The ready line, on stdout: scripts wait for it.
            println!("sink listening on {local}");
            crate::relay::run::serve_until_signal(&local)?;
        }
        Bench::Bulk { common, streams, bytes } => {
            let r = load::bulk(&dial(&common), streams.into(), bytes)?;
            let per_stream: Vec<String> = r.per_stream_gib_per_s.iter().map(|g| format!("{g:.2}")).collect();
            let text = format!(
                "bulk: {streams} stream(s) x {} to {}: {:.3} GiB/s in total ({:.2} s); per stream GiB/s: {}",
                human_bytes(bytes),
                dial(&common),
                r.total_gib_per_s,
                r.seconds,
                per_stream.join(" ")
            );
            print(&common, serde_json::json!({"bulk": r}), text);
        }
        Bench::Rpc { common, connections, requests, size } => {
            let r = load::rpc(&dial(&common), connections.into(), requests as usize, size as usize)?;
            let text = format!(
                "rpc: {connections} connection(s) x {requests} round trips of {} to {}: {:.0} requests/s; latency {}",
                human_bytes(size),
                dial(&common),
                r.requests_per_s,
                latency_text(&r.latency)
            );
            print(&common, serde_json::json!({"rpc": r}), text);
        }
        Bench::Churn { common, connections, parallel } => {
            let r = load::churn(&dial(&common), connections as usize, parallel.into())?;
            let text = format!(
                "churn: {connections} connections, {parallel} at a time, to {}: {:.0} connections/s; latency {}",
                dial(&common),
                r.connections_per_s,
                latency_text(&r.latency)
            );
            print(&common, serde_json::json!({"churn": r}), text);
        }
        Bench::Dns { to, name, queries, json } => {
            for r in dns::lookups(&to, &name, queries as usize)? {
                if json {
                    println!("{}", serde_json::json!({"dns": r}));
                } else {
                    let codes: Vec<String> = r.codes.iter().map(|(code, n)| format!("{code} {n}")).collect();
                    println!(
                        "dns: {queries} lookups of {name} at {}, one at a time: {} answered ({}); latency {}",
                        r.to,
                        r.answered,
                        codes.join(", "),
                        latency_text(&r.latency)
                    );
                }
            }
        }
        Bench::Idle { common, connections, hold, limit } => {
            let r = load::idle(
                &dial(&common),
                connections as usize,
                Duration::from_secs_f64(hold),
                Duration::from_secs_f64(limit),
            )?;
            let text = format!(
                "idle: {} connections to {} ({} answered within {limit} s, {:.2} s to open); new connections served while held: {} of {}",
                r.connections, dial(&common), r.confirmed, r.open_seconds, r.new_served, r.new_tried
            );
            print(&common, serde_json::json!({"idle": r}), text);
        }
        Bench::Burst { common, connections, limit } => {
            let r = load::burst(&dial(&common), connections as usize, Duration::from_secs_f64(limit))?;
            let failures: Vec<String> = r.failures.iter().map(|(cause, n)| format!("{n} {cause}")).collect();
            let text = format!(
                "burst: {} connections at once to {}: {} served in {:.2} s, {} failed{}{}",
                r.connections,
                dial(&common),
                r.served,
                r.all_served_seconds,
                r.failed,
                if failures.is_empty() { "" } else { ": " },
                failures.join(", ")
            );
            print(&common, serde_json::json!({"burst": r}), text);
        }
    }
    Ok(())
}

fn latency_text(l: &Latency) -> String {
    format!("p50 {:.1} us, p99 {:.1} us, max {:.1} us", l.p50_us, l.p99_us, l.max_us)
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1TB").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }
}
