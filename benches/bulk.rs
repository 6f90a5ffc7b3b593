//! One bulk stream, client -> relay -> server, on loopback TCP.
//!
//! Cases (each moves `BULK_BYTES` per iteration):
//! - `direct`: client -> server, no relay (the ceiling);
//! - `uring-splice`: through the engine's io_uring backend, splice path;
//! - `uring-copy`: through the engine's io_uring backend, copy path;
//! - `portable-splice`: through the engine's epoll backend, splice path;
//! - `aws-design`: through the baseline relay built like AWS's vsock-proxy
//!   (thread per connection, poll, 8 KiB read + write_all).
//!
//! After the runs it prints each case's throughput as a ratio to `direct`,
//! to `uring-splice` and to `aws-design`, read from criterion's estimates.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};
use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, Relay, RelayConfig, Target};
use vsock_relay_testkit::baseline::Baseline;
use vsock_relay_testkit::servers::{Server, Stream};
use vsock_relay_testkit::traffic::Data;

const BULK_BYTES: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const CASES: [&str; 5] = ["direct", "uring-splice", "uring-copy", "portable-splice", "aws-design"];

/// Reads the announced byte count, then acknowledges with one byte.
fn sink(mut stream: Stream) {
    let mut header = [0u8; 8];
    if stream.read_exact(&mut header).is_err() {
        return;
    }
    let mut left = u64::from_le_bytes(header);
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        match stream.read(&mut buf[..CHUNK.min(left as usize)]) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n as u64,
        }
    }
    let _ = stream.write_all(&[1]);
}

fn push(to: SocketAddr, payload: &[u8]) {
    let mut stream = TcpStream::connect(to).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.write_all(&BULK_BYTES.to_le_bytes()).unwrap();
    let mut left = BULK_BYTES;
    while left > 0 {
        let n = (payload.len() as u64).min(left) as usize;
        stream.write_all(&payload[..n]).unwrap();
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).unwrap();
}

fn engine_relay(to: SocketAddr, backend: BackendChoice, path: DataPath) -> (Relay, SocketAddr) {
    let mut config =
        RelayConfig::new("tcp:127.0.0.1:0".parse().unwrap(), Target::fixed(&Endpoint::tcp(to)).unwrap());
    config.backend = backend;
    config.data_path = path;
    config.workers = 1;
    let relay = Relay::start(config).expect("start relay");
    let addr = vsock_relay_engine::socket::sockaddr(relay.local_endpoint()).unwrap().as_socket().unwrap();
    (relay, addr)
}

fn bulk(c: &mut Criterion) {
    let server = Server::tcp(sink);
    let direct = server.tcp_addr();
    let (_splice, splice) = engine_relay(direct, BackendChoice::Uring, DataPath::Splice);
    let (_copy, copy) = engine_relay(direct, BackendChoice::Uring, DataPath::Copy);
    let (_portable, portable) = engine_relay(direct, BackendChoice::Portable, DataPath::Splice);
    let baseline = Baseline::start(direct, 4);
    let mut payload = vec![0u8; CHUNK];
    Data::new(1).fill(&mut payload);

    let mut group = c.benchmark_group("bulk");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Bytes(BULK_BYTES));
    for (case, addr) in CASES.into_iter().zip([direct, splice, copy, portable, baseline]) {
        group.bench_function(BenchmarkId::from_parameter(case), |b| b.iter(|| push(addr, &payload)));
    }
    group.finish();
}

/// Mean seconds per iteration of a case, from criterion's estimates file.
fn mean_seconds(case: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/bulk/{case}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let mean = &text[text.find("\"mean\"")?..];
    let estimate = &mean[mean.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = estimate.find([',', '}'])?;
    estimate[..end].trim().parse::<f64>().ok().map(|ns| ns / 1e9)
}

fn summary() {
    let gib_per_s = |case| mean_seconds(case).map(|s| BULK_BYTES as f64 / s / f64::from(1 << 30));
    let (Some(direct), Some(uring), Some(aws)) =
        (gib_per_s("direct"), gib_per_s("uring-splice"), gib_per_s("aws-design"))
    else {
        return;
    };
    println!("\nbulk summary ({} GiB, one stream, loopback TCP)", BULK_BYTES >> 30);
    println!(
        "{:<16} {:>8} {:>9} {:>15} {:>13}",
        "case", "GiB/s", "x direct", "x uring-splice", "x aws-design"
    );
    for case in CASES {
        if let Some(rate) = gib_per_s(case) {
            println!(
                "{case:<16} {rate:>8.2} {:>9.2} {:>15.2} {:>13.2}",
                rate / direct,
                rate / uring,
                rate / aws
            );
        }
    }
}

criterion_group!(benches, bulk);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
