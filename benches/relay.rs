//! Criterion comparisons: every workload of `vsock-relay bench` against
//! every way through, per family pair.
//!
//! Groups are named `PAIR/WORKLOAD` and benchmarks `PAIR/WORKLOAD/CASE`:
//! - PAIR: `tcp` and `unix` on the host (client and sink of one family);
//!   `vsock-tcp` (a vsock client, a TCP sink: the parent's proxy) and
//!   `tcp-vsock` (the enclave's forwarder) inside the vsock guest, chosen by
//!   `VSOCK_RELAY_BENCH_PAIRS` (comma-separated; default `tcp,unix`).
//! - WORKLOAD: `bulk-1` (one 64 MiB stream per iteration), `bulk-8` (8
//!   streams of 8 MiB; `VSOCK_RELAY_BENCH_BULK_MIB` changes the 64), `rpc-1` and `rpc-32` (64-byte round trips on 1 or 32
//!   connections; an iteration is one round trip per connection), `churn`
//!   (connect, 64-byte echo, close; 8 in parallel; an iteration is one
//!   connection). The workloads are the bench tool's own (`bench::load`).
//! - CASE: `direct` (client -> sink), the engine on each backend and data
//!   path (`uring-splice`, `uring-copy`, `uring-ring`, `portable-splice`,
//!   `portable-copy`, and `uring-auto`/`portable-auto` where vsock makes
//!   `auto` differ), and `aws-design`: the baseline relay built like AWS's
//!   vsock-proxy (thread per connection, 8 KiB copies, 4 workers). In
//!   `vsock-tcp`, where AWS's proxy itself fits, also `aws-w4` and
//!   `aws-w64`: AWS's released vsock-proxy at its default 4 workers and at
//!   64, when `VSOCK_RELAY_BENCH_AWS_PROXY` names the binary (a build that
//!   listens on any CID; perf/criterion-vsock packs it), else skipped with
//!   a message.
//!
//! After the runs (under `cargo bench`) it prints, per group, each case's
//! rate and its ratio to `direct`, to `aws-design` and to `aws-w4`, read from criterion's
//! estimates.

use std::ffi::OsStr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use vsock_relay_apps::bench::{load, sink};
use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, Relay, RelayConfig, Target};
use vsock_relay_testkit::baseline::Baseline;

/// Bytes per bulk iteration (`VSOCK_RELAY_BENCH_BULK_MIB`, default 64 MiB;
/// the emulated guest uses less).
fn bulk_bytes() -> u64 {
    let mib = std::env::var("VSOCK_RELAY_BENCH_BULK_MIB").ok().and_then(|v| v.parse::<u64>().ok());
    mib.filter(|&m| m > 0).unwrap_or(64) << 20
}
const MESSAGE: usize = 64;
const CHURN_PARALLEL: usize = 8;
const WORKLOADS: [&str; 5] = ["bulk-1", "bulk-8", "rpc-1", "rpc-32", "churn"];

/// The ways through for one family pair, and what keeps them running.
struct Pair {
    name: String,
    cases: Vec<(String, Endpoint)>,
    _relays: Vec<Relay>,
    _processes: Vec<Process>,
}

/// A relay of another program, stopped with the run.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// AWS's released vsock-proxy (`binary`) at `workers` threads, listening on
/// `listen` (vsock) and proxying to the TCP `sink`, with an allowlist of the
/// sink alone.
fn aws_proxy(
    binary: &OsStr,
    listen: &Endpoint,
    sink: &Endpoint,
    workers: u32,
) -> Option<(Endpoint, Process)> {
    let (Endpoint::Vsock { port, .. }, Endpoint::Tcp { port: sink_port, .. }) = (listen, sink) else {
        return None;
    };
    let allowlist = std::env::temp_dir().join(format!("aws-allowlist-{}.yaml", std::process::id()));
    std::fs::write(&allowlist, format!("allowlist: [{{address: 127.0.0.1, port: {sink_port}}}]\n")).unwrap();
    let child = std::process::Command::new(binary)
        .args(["-w", &workers.to_string(), "--config"])
        .arg(&allowlist)
        .args([port.to_string(), "127.0.0.1".to_string(), sink_port.to_string()])
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", std::path::Path::new(binary).display()));
    let reach = reach(listen);
    // It listens a moment after its start.
    for _ in 0..100 {
        if load::rpc(&load::Dial::direct(&reach), 1, 1, MESSAGE).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((reach, Process(child)))
}

/// A listen endpoint of `family` (`tcp`, `unix`, `vsock`); `n` tells apart
/// the listeners of one run.
fn listen_on(family: &str, n: u32) -> Endpoint {
    match family {
        "tcp" => "tcp:127.0.0.1:0".parse().unwrap(),
        "unix" => {
            let dir = std::env::temp_dir().join(format!("vsock-relay-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Endpoint::Unix { path: dir.join(format!("{n}.sock")) }
        }
        "vsock" => {
            vsock_relay_testkit::guest::require_vsock_guest();
            Endpoint::vsock(vsock_relay_engine::endpoint::VSOCK_CID_ANY, 21_000 + n)
        }
        other => panic!("unknown family `{other}`"),
    }
}

/// Where a client connects to reach what listens on `local` (vsock: CID 1).
fn reach(local: &Endpoint) -> Endpoint {
    match local {
        Endpoint::Vsock { port, .. } => Endpoint::vsock(1, *port),
        other => other.clone(),
    }
}

/// Starts the sink, the relays and the baseline of one family pair; `index`
/// keeps its listeners apart from the other pairs'.
fn pair(index: u32, name: &str) -> Pair {
    let (client_family, sink_family) = name.split_once('-').unwrap_or((name, name));
    let listen_on = |family: &str, n: u32| listen_on(family, index * 100 + n);
    let sink = reach(&sink::start(&listen_on(sink_family, 0)).expect("start the sink"));
    // Direct over the pair's vsock side, if it has one: the figure a relay is held to.
    let direct = if client_family == "vsock" && sink_family != "vsock" {
        reach(&sink::start(&listen_on("vsock", 1)).expect("start the direct sink"))
    } else {
        sink.clone()
    };
    let mut paths = vec![
        ("uring-splice", BackendChoice::Uring, DataPath::Splice),
        ("uring-copy", BackendChoice::Uring, DataPath::Copy),
        ("uring-ring", BackendChoice::Uring, DataPath::Ring),
        ("portable-splice", BackendChoice::Portable, DataPath::Splice),
        ("portable-copy", BackendChoice::Portable, DataPath::Copy),
    ];
    if name.contains("vsock") {
        paths.insert(0, ("uring-auto", BackendChoice::Uring, DataPath::Auto));
        paths.push(("portable-auto", BackendChoice::Portable, DataPath::Auto));
    }
    let mut cases = vec![("direct".to_string(), direct)];
    let mut relays = Vec::new();
    for (n, (case, backend, path)) in (2..).zip(paths) {
        let mut config = RelayConfig::new(listen_on(client_family, n), Target::fixed(&sink).unwrap());
        config.backend = backend;
        config.data_path = path;
        let relay = Relay::start(config).unwrap_or_else(|e| panic!("{name}/{case}: {e}"));
        cases.push((case.to_string(), reach(relay.local_endpoint())));
        relays.push(relay);
    }
    let baseline =
        Baseline::serve(&listen_on(client_family, 99), &sink, 4).expect("start the AWS-design relay");
    cases.push(("aws-design".to_string(), reach(&baseline.endpoint)));
    let mut processes = Vec::new();
    if name == "vsock-tcp" {
        match std::env::var_os("VSOCK_RELAY_BENCH_AWS_PROXY").filter(|b| !b.is_empty()) {
            Some(binary) => {
                for (n, workers) in [(97, 4), (98, 64)] {
                    if let Some((endpoint, process)) =
                        aws_proxy(&binary, &listen_on("vsock", n), &sink, workers)
                    {
                        cases.push((format!("aws-w{workers}"), endpoint));
                        processes.push(process);
                    }
                }
            }
            None => eprintln!(
                "AWS's released vsock-proxy: VSOCK_RELAY_BENCH_AWS_PROXY is not set; its cases are skipped"
            ),
        }
    }
    Pair { name: name.to_string(), cases, _relays: relays, _processes: processes }
}

/// Runs `workload` on `to` for `iters` iterations; the time they took.
fn run(workload: &str, to: &Endpoint, iters: u64) -> Duration {
    let count = usize::try_from(iters).unwrap_or(usize::MAX);
    let to = &load::Dial::direct(to);
    let seconds = |rate: f64, done: usize| Duration::from_secs_f64(done as f64 / rate);
    let bulk = |streams: usize| {
        let mut took = Duration::ZERO;
        for _ in 0..iters {
            took += Duration::from_secs_f64(load::bulk(to, streams, bulk_bytes() / streams as u64)?.seconds);
        }
        Ok(took)
    };
    let outcome = match workload {
        "bulk-1" => bulk(1),
        "bulk-8" => bulk(8),
        "rpc-1" => load::rpc(to, 1, count, MESSAGE).map(|r| seconds(r.requests_per_s, count)),
        "rpc-32" => load::rpc(to, 32, count, MESSAGE).map(|r| seconds(r.requests_per_s, 32 * count)),
        "churn" => load::churn(to, count, CHURN_PARALLEL).map(|r| seconds(r.connections_per_s, count)),
        other => panic!("unknown workload `{other}`"),
    };
    outcome.unwrap_or_else(|e| panic!("{workload} to {to}: {e:#}"))
}

fn throughput(workload: &str) -> Throughput {
    match workload {
        "bulk-1" | "bulk-8" => Throughput::Bytes(bulk_bytes()),
        "rpc-32" => Throughput::Elements(32),
        _ => Throughput::Elements(1),
    }
}

fn bench_pair(c: &mut Criterion, pair: &Pair) {
    for workload in WORKLOADS {
        let mut group = c.benchmark_group(format!("{}/{workload}", pair.name));
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(throughput(workload));
        for (case, to) in &pair.cases {
            group.bench_function(BenchmarkId::from_parameter(case), |b| {
                b.iter_custom(|iters| run(workload, to, iters));
            });
        }
        group.finish();
    }
}

/// Mean seconds per iteration of a benchmark, from criterion's estimates.
fn mean_seconds(group: &str, case: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{}/{case}/new/estimates.json", group.replace('/', "_"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64().map(|ns| ns / 1e9)
}

/// Each case's rate and ratios, per group of this run.
fn summary(pairs: &[Pair]) {
    println!("\nsummary (rates from criterion's mean; x: ratio of rates)");
    println!(
        "{:<22} {:<16} {:>14} {:>9} {:>13} {:>9}",
        "group", "case", "rate", "x direct", "x aws-design", "x aws-w4"
    );
    for pair in pairs {
        for workload in WORKLOADS {
            let group = format!("{}/{workload}", pair.name);
            let per_iteration = match throughput(workload) {
                Throughput::Bytes(bytes) => bytes as f64 / f64::from(1 << 20),
                Throughput::Elements(n) => n as f64,
                _ => 1.0,
            };
            let unit = if workload.starts_with("bulk") { "MiB/s" } else { "/s" };
            let rate = |case: &str| mean_seconds(&group, case).map(|s| per_iteration / s);
            let (direct, aws, released) = (rate("direct"), rate("aws-design"), rate("aws-w4"));
            for (case, _) in &pair.cases {
                let Some(r) = rate(case) else { continue };
                let ratio = |base: Option<f64>| base.map_or("-".into(), |b| format!("{:.2}", r / b));
                println!(
                    "{group:<22} {case:<16} {:>14} {:>9} {:>13} {:>9}",
                    format!("{r:.0} {unit}"),
                    ratio(direct),
                    ratio(aws),
                    ratio(released)
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let names = std::env::var("VSOCK_RELAY_BENCH_PAIRS").unwrap_or_else(|_| "tcp,unix".into());
    let pairs: Vec<Pair> = (0..)
        .zip(names.split(',').map(str::trim).filter(|n| !n.is_empty()))
        .map(|(i, n)| pair(i, n))
        .collect();
    for pair in &pairs {
        bench_pair(&mut c, pair);
    }
    c.final_summary();
    // Under cargo-criterion the estimates live in its own store (and it
    // reports them itself): a table from files of an earlier run would lie.
    if std::env::var_os("CARGO_CRITERION_PORT").is_none() {
        summary(&pairs);
    }
}
