//! Bursts of new connections, opened all at once, on both backends: every
//! client served byte-exact and the relay counting no failure, with as
//! many descriptors as the relay may take and with fewer than the burst
//! needs at once (as the soak's descriptor bursts do).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, Failure};
use vsock_relay_testkit::servers::{echo, Server, Stream};
use vsock_relay_testkit::traffic::Data;

use crate::ops::scrape;
use crate::util::{backend_arg, relay, Proc, TempDir, BACKENDS};

/// Bytes each client sends and must get back.
const PAYLOAD: usize = 2048;

/// How one client of a burst ended.
#[derive(Debug)]
enum Outcome {
    Served,
    Failed(String),
}

/// The seeded bytes client `id` sends.
fn payload(id: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PAYLOAD];
    Data::new(id.wrapping_mul(0x9e37_79b9) ^ 0xb0b5).fill(&mut bytes);
    bytes
}

/// One client: connects, sends its payload, reads it back whole, holds the
/// connection for `hold`, then half-closes and waits for the relay's end.
fn client(endpoint: &Endpoint, id: u64, hold: Duration) -> Outcome {
    let run = || -> std::io::Result<Option<String>> {
        let mut stream = Stream::connect(endpoint)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let sent = payload(id);
        stream.write_all(&sent)?;
        let mut echoed = vec![0u8; PAYLOAD];
        stream.read_exact(&mut echoed)?;
        if echoed != sent {
            return Ok(Some("echo differs".into()));
        }
        std::thread::sleep(hold);
        stream.shutdown(Shutdown::Write)?;
        let mut rest = [0u8; 1];
        match stream.read(&mut rest)? {
            0 => Ok(None),
            _ => Ok(Some("bytes after the echo".into())),
        }
    };
    match run() {
        Ok(None) => Outcome::Served,
        Ok(Some(why)) => Outcome::Failed(why),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// What a burst came to.
struct Burst {
    served: usize,
    failures: Vec<(u64, String)>,
    /// From the barrier's release to the last client's end.
    took: Duration,
}

/// `n` clients released at once (a thread each, small stacks), each
/// holding its connection for `hold` once served.
fn burst(endpoint: &Endpoint, n: usize, hold: Duration) -> Burst {
    let barrier = Arc::new(Barrier::new(n + 1));
    let threads: Vec<_> = (0..n as u64)
        .map(|id| {
            let (barrier, endpoint) = (Arc::clone(&barrier), endpoint.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    barrier.wait();
                    client(&endpoint, id, hold)
                })
                .expect("spawn a burst client")
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut result = Burst { served: 0, failures: Vec::new(), took: Duration::ZERO };
    for (id, thread) in threads.into_iter().enumerate() {
        match thread.join().expect("a burst client panicked") {
            Outcome::Served => result.served += 1,
            Outcome::Failed(why) => result.failures.push((id as u64, why)),
        }
    }
    result.took = started.elapsed();
    result
}

/// Raises this process's open-files limit to cover `needed`; false (and a
/// message) where the hard limit is lower.
fn descriptors_for(needed: u64) -> bool {
    let limit = vsock_relay_engine::raise_open_files_limit().unwrap();
    if limit < needed {
        eprintln!("skipped: {needed} open files needed, the hard limit is {limit}");
        return false;
    }
    true
}

/// 1,000 clients at once through an in-process relay (loopback TCP to an
/// echo server): all served on both backends, no failure counted.
#[test]
fn a_burst_of_a_thousand_is_served_on_both_backends() {
    const CLIENTS: usize = 1000;
    // Per client: its socket here, the server's thread socket, the relay's
    // two sockets and up to two pipes (four descriptors).
    if !descriptors_for(CLIENTS as u64 * 8 + 256) {
        return;
    }
    let mut took = Vec::new();
    for backend in BACKENDS {
        let server = Server::tcp_with_backlog(CLIENTS as i32 + 64, echo);
        let relay = relay("tcp:127.0.0.1:0", server.endpoint(), (backend, DataPath::Auto), |_| {});
        let endpoint = relay.local_endpoints()[0].clone();
        let result = burst(&endpoint, CLIENTS, Duration::ZERO);
        let stats = relay.stats();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.snapshot().active > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let totals = stats.snapshot();
        let name = backend_arg(backend);
        println!("{name}: {CLIENTS} clients at once served in {:?}", result.took);
        assert!(
            result.failures.is_empty(),
            "{name}: {} of {CLIENTS} clients failed, first: {:?}",
            result.failures.len(),
            &result.failures[..result.failures.len().min(5)]
        );
        assert_eq!(result.served, CLIENTS);
        assert_eq!(totals.accepted, CLIENTS as u64, "{name}");
        let failed: Vec<_> =
            Failure::ALL.iter().map(|f| (f.label(), totals.failed_by(*f))).filter(|(_, n)| *n > 0).collect();
        assert!(failed.is_empty(), "{name}: failures counted: {failed:?}");
        took.push((name, result.took));
    }
    println!("time to serve {CLIENTS} at once: {took:?}");
}

/// A burst of 300 clients that hold their connections for a second, to a
/// relay process with 384 descriptors (as the soak's proxy): they do not
/// all fit at once, so the ones beyond wait in the listener's backlog
/// until others end, and every one is served, on both backends.
#[test]
fn a_burst_past_the_descriptor_limit_waits_and_is_served() {
    const CLIENTS: usize = 300;
    if !descriptors_for(CLIENTS as u64 * 2 + 256) {
        return;
    }
    // Both backends first, then the verdict: the difference shows.
    let results: Vec<_> =
        BACKENDS.into_iter().map(|backend| burst_past_the_limit(backend, CLIENTS)).collect();
    for (name, result, failed, log) in &results {
        assert!(
            result.failures.is_empty(),
            "{name}: {} of {CLIENTS} clients failed, first: {:?}\nrelay failures: {failed:?}\n{log}",
            result.failures.len(),
            &result.failures[..result.failures.len().min(5)],
        );
        assert!(failed.is_empty(), "{name}: failures counted: {failed:?}");
    }
}

/// A burst of `clients` through a relay process with 384 descriptors: the
/// backend's name, the burst, the relay's failures by cause and its log.
fn burst_past_the_limit(
    backend: BackendChoice,
    clients: usize,
) -> (&'static str, Burst, Vec<(String, u64)>, String) {
    let name = backend_arg(backend);
    let server = Server::tcp(echo);
    let dir = TempDir::new("burst");
    let metrics = dir.path("metrics.sock");
    let metrics_arg = format!("unix:{}", metrics.display());
    let to = server.endpoint().to_string();
    let mut args = vec!["relay", "--backend", name, "--listen", "tcp:127.0.0.1:0", "--to", &to];
    args.extend(["-w", "2", "--metrics", &metrics_arg]);
    let mut proxy = Proc::spawn_with("vsock-relay", &args, |command| {
        vsock_relay_testkit::seccomp::limit_open_files(command, 384);
    });
    let port = proxy.logged_tcp_port();
    proxy.wait_for_log("serving metrics at /metrics", Duration::from_secs(20));
    let endpoint: Endpoint = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let result = burst(&endpoint, clients, Duration::from_secs(1));
    let failed = failures_counted(&scrape(&metrics));
    println!(
        "{name}: {clients} clients past 384 descriptors: {} served, {} failed in {:?}; relay failures {failed:?}",
        result.served,
        result.failures.len(),
        result.took
    );
    (name, result, failed, proxy.stderr())
}

/// The relay's failure counters that are not zero, by cause, summed over
/// its services, from a scrape.
fn failures_counted(metrics: &str) -> Vec<(String, u64)> {
    let mut counted: Vec<(String, u64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with("vsock_relay_connections_failed_total{")) {
        let Some((series, number)) = line.rsplit_once(' ') else { continue };
        let Some(cause) = series.split("cause=\"").nth(1).and_then(|rest| rest.split('"').next()) else {
            continue;
        };
        let number = number.parse::<f64>().unwrap_or_default() as u64;
        match counted.iter_mut().find(|(c, _)| c == cause) {
            Some((_, total)) => *total += number,
            None => counted.push((cause.to_string(), number)),
        }
    }
    counted.retain(|(_, n)| *n > 0);
    counted
}
