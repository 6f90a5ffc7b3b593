//! `--metrics ENDPOINT`: the relay's counters as Prometheus metrics, served
//! at `/metrics` over HTTP on a TCP or Unix endpoint.
//!
//! Nothing here touches the data path: workers keep their own counters
//! (`engine::stats`), and a scrape sums them and encodes the sums with
//! prometheus-client's text encoder (format 0.0.4, what Prometheus and
//! `promtool check metrics` read). The HTTP side is one route, written here
//! because it must also listen on Unix sockets, which the small HTTP server
//! crates do not.
//!
//! Each scrape connection is served on a thread of its own with a deadline
//! for the whole exchange, so a silent or slow client holds only itself. At
//! most [`MAX_CONNECTIONS`] are open: past that, the *oldest* is closed to
//! make room. A scrape is answered in milliseconds, so the oldest
//! connections are the ones that send nothing; closing the newest instead
//! would let a few hundred silent clients lock every real scrape out.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use socket2::Socket;
use vsock_relay_engine::stats::{HistogramSnapshot, CONNECT_BUCKETS, DURATION_BUCKETS};
use vsock_relay_engine::{
    socket, Decision, Endpoint, Failure, RefusedBy, Relay, Route, Service, Stats, Upstream,
};

/// A scrape connection is closed this long after its accept, whatever it
/// sent: the whole request read and the answer written within it.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Scrape connections open at once; a new one past this closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request head read.
const MAX_REQUEST_BYTES: u64 = 8 * 1024;

/// The relay's metrics, computed at each scrape.
#[derive(Debug)]
pub struct RelayMetrics {
    stats: Arc<Stats>,
    services: Vec<Service>,
    backend: String,
    data_path: String,
}

impl RelayMetrics {
    pub fn new(relay: &Relay) -> Self {
        RelayMetrics {
            stats: relay.stats(),
            services: relay.services().to_vec(),
            backend: relay.backend().to_string(),
            data_path: format!("{:?}", relay.data_path()).to_lowercase(),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("vsock_relay");
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut text = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in the labels, which are ours.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one metric family: a descriptor, then a sample per label set.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, Sample)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, sample) in samples {
        let mut labelled = metric.encode_family(&labels)?;
        match sample {
            Sample::Counter(value) => labelled.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            Sample::Gauge(value) => labelled.encode_gauge(&value)?,
            Sample::Histogram(sum, count, buckets) => {
                labelled.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?
            }
        }
    }
    Ok(())
}

/// Counter samples labelled by service and one more label, `key`:
/// `counts(i)` gives service i's (label value, count) pairs.
fn counters_by<'a, const N: usize>(
    names: &[&'a str],
    key: &'static str,
    counts: impl Fn(usize) -> [(&'static str, u64); N],
) -> Vec<(Labels<'a>, Sample)> {
    names
        .iter()
        .enumerate()
        .flat_map(|(i, name)| {
            counts(i).map(|(value, count)| (vec![("service", *name), (key, value)], Sample::Counter(count)))
        })
        .collect()
}

enum Sample {
    Counter(u64),
    Gauge(i64),
    /// Sum, count, buckets (not cumulative).
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// A histogram sample: per-bucket counts (the encoder makes them
/// cumulative), the last bucket +Inf.
fn histogram<const N: usize>(bounds: &[f64; N], snapshot: &HistogramSnapshot<N>) -> Sample {
    let mut buckets: Vec<(f64, u64)> = bounds.iter().copied().zip(snapshot.counts).collect();
    buckets.push((f64::INFINITY, snapshot.over));
    // Micros to seconds: the precision lost is far below a scrape's interest.
    #[allow(clippy::cast_precision_loss)]
    let sum = snapshot.sum_micros as f64 / 1e6;
    Sample::Histogram(sum, snapshot.count(), buckets)
}

impl Collector for RelayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshots: Vec<_> = (0..self.services.len()).map(|i| self.stats.service_snapshot(i)).collect();
        let names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        let per_service = |value: &dyn Fn(usize) -> Sample| {
            names.iter().enumerate().map(|(i, name)| (vec![("service", *name)], value(i))).collect::<Vec<_>>()
        };
        let info = vec![
            ("backend", self.backend.as_str()),
            ("data_path", self.data_path.as_str()),
            ("version", env!("CARGO_PKG_VERSION")),
        ];
        family(
            &mut encoder,
            "build",
            "The running relay: version, backend and data path.",
            MetricType::Gauge,
            [(info, Sample::Gauge(1))],
        )?;
        family(
            &mut encoder,
            "connections_accepted",
            "Client connections accepted (refused ones are not).",
            MetricType::Counter,
            per_service(&|i| Sample::Counter(snapshots[i].accepted)),
        )?;
        family(
            &mut encoder,
            "connections_active",
            "Client connections open now (connecting or relaying).",
            MetricType::Gauge,
            per_service(&|i| Sample::Gauge(i64::try_from(snapshots[i].active).unwrap_or(i64::MAX))),
        )?;
        let refused = counters_by(&names, "reason", |i| {
            RefusedBy::ALL.map(|why| (why.label(), snapshots[i].refused_by(why)))
        });
        family(&mut encoder, "connections_refused",
            "Clients reset right after their accept: allowlist (target no longer allowed since a reload), cid (--allow-cid), limit (--max-connections).",
            MetricType::Counter, refused)?;
        let failed = counters_by(&names, "cause", |i| {
            Failure::ALL.map(|cause| (cause.label(), snapshots[i].failed_by(cause)))
        });
        family(&mut encoder, "connections_failed",
            "Connections that ended in failure: connect (upstream unreachable), client or upstream (read/write error), idle (--idle-timeout), drain (cut at stop), resources (no socket).",
            MetricType::Counter, failed)?;
        let bytes = counters_by(&names, "direction", |i| {
            [("to_upstream", snapshots[i].bytes_to_upstream), ("to_client", snapshots[i].bytes_to_client)]
        });
        family(&mut encoder, "bytes", "Bytes delivered, by direction.", MetricType::Counter, bytes)?;
        family(
            &mut encoder,
            "upstream_connect_seconds",
            "Time from accept to an established upstream connection.",
            MetricType::Histogram,
            per_service(&|i| histogram(&CONNECT_BUCKETS, &snapshots[i].connect_time)),
        )?;
        family(
            &mut encoder,
            "connection_duration_seconds",
            "Time from accept to close, per connection.",
            MetricType::Histogram,
            per_service(&|i| histogram(&DURATION_BUCKETS, &snapshots[i].duration)),
        )?;
        let dns: Vec<_> = self
            .services
            .iter()
            .map(|s| match &s.upstream {
                Upstream::Fixed(target) => target.dns_counters(),
                Upstream::Routed(_) => Default::default(),
            })
            .collect();
        family(
            &mut encoder,
            "upstream_address_changes",
            "Times a DNS refresh moved the upstream to a new address.",
            MetricType::Counter,
            per_service(&|i| Sample::Counter(dns[i].changes)),
        )?;
        family(
            &mut encoder,
            "dns_failures",
            "DNS refreshes that failed (the last good address stayed in use).",
            MetricType::Counter,
            per_service(&|i| Sample::Counter(dns[i].lookup_failures)),
        )?;
        family(
            &mut encoder,
            "upstream_moves_refused",
            "DNS refreshes whose new address the allowlist refused (the last allowed one stayed in use).",
            MetricType::Counter,
            per_service(&|i| Sample::Counter(dns[i].moves_refused)),
        )?;
        let routes: Vec<(&str, &Route)> =
            self.services.iter().filter_map(|s| Some((s.name.as_str(), s.route()?))).collect();
        if routes.is_empty() {
            return Ok(());
        }
        let decisions = routes.iter().flat_map(|(name, route)| {
            Decision::ALL.map(|d| {
                (
                    vec![("service", *name), ("decision", d.label())],
                    Sample::Counter(route.counters.decisions(d)),
                )
            })
        });
        family(&mut encoder, "routed",
            "Routed clients by decision: allowed, not_allowed (the allowlist), unresolved (no such name, lookup failed), bad_head (malformed, unsupported, too large), head_timeout.",
            MetricType::Counter, decisions)?;
        let by_rule: Vec<(String, String, u64)> = routes
            .iter()
            .flat_map(|(name, route)| {
                route.counters.by_rule().into_iter().map(|(rule, n)| (name.to_string(), rule, n))
            })
            .collect();
        family(
            &mut encoder,
            "routed_allowed_by_entry",
            "Routed clients allowed, by the allowlist entry that allowed them (address:port).",
            MetricType::Counter,
            by_rule.iter().map(|(name, rule, n)| {
                (vec![("service", name.as_str()), ("entry", rule.as_str())], Sample::Counter(*n))
            }),
        )?;
        Ok(())
    }
}

/// The metrics endpoint: a thread answering scrapes until the process ends.
pub struct MetricsServer {
    local: Endpoint,
}

impl MetricsServer {
    /// Listens on `endpoint` (TCP or Unix) and serves `/metrics` from `relay`.
    pub fn start(endpoint: &Endpoint, relay: &Relay) -> anyhow::Result<MetricsServer> {
        if let Endpoint::Vsock { .. } = endpoint {
            anyhow::bail!("--metrics {endpoint}: metrics are served on tcp: or unix: endpoints");
        }
        let options = socket::SocketOptions::default();
        let listener = socket::listen(endpoint, &options)
            .and_then(|listener| {
                listener.set_nonblocking(false)?;
                Ok(listener)
            })
            .with_context(|| format!("cannot serve metrics on {endpoint}"))?;
        let local = socket::local_endpoint(&listener, endpoint)?;
        let metrics = Arc::new(RelayMetrics::new(relay));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, &metrics))
            .context("cannot start the metrics thread")?;
        tracing::info!(metrics = %local, "serving metrics at /metrics");
        Ok(MetricsServer { local })
    }

    /// The endpoint served (with the real port after port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Endpoint::Unix { path } = &self.local {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The open scrape connections, oldest first: a handle to close each one,
/// under an id its thread removes when done.
#[derive(Default)]
struct Open {
    next_id: u64,
    connections: VecDeque<(u64, Socket)>,
}

fn serve(listener: &Socket, metrics: &Arc<RelayMetrics>) {
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        match listener.accept() {
            Ok((client, _)) => start_answer(client, metrics, &open),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot accept; retrying in a second");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Registers `client` (closing the oldest connection when at the bound) and
/// answers it on a thread of its own.
fn start_answer(client: Socket, metrics: &Arc<RelayMetrics>, open: &Arc<Mutex<Open>>) {
    let Ok(handle) = client.try_clone() else {
        tracing::debug!("metrics: cannot duplicate a scrape socket; closed");
        return;
    };
    let id = {
        let mut open = open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if open.connections.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = open.connections.pop_front() {
                // Wakes its thread's read with an end of stream.
                let _ = oldest.shutdown(Shutdown::Both);
                tracing::debug!(
                    limit = MAX_CONNECTIONS,
                    "metrics: too many scrape connections; closed the oldest"
                );
            }
        }
        open.next_id += 1;
        let id = open.next_id;
        open.connections.push_back((id, handle));
        id
    };
    let (metrics, registry) = (Arc::clone(metrics), Arc::clone(open));
    let answering =
        std::thread::Builder::new().name("metrics-scrape".into()).stack_size(128 * 1024).spawn(move || {
            if let Err(e) = answer(client, &metrics) {
                tracing::debug!(error = %e, "metrics request failed");
            }
            let mut open = registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            open.connections.retain(|(other, _)| *other != id);
        });
    if let Err(e) = answering {
        tracing::warn!(error = %e, "metrics: cannot start a thread for a scrape; closed");
        let mut open = open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.connections.retain(|(other, _)| *other != id);
    }
}

/// A socket whose reads and writes all end by one deadline.
struct Deadlined<'a> {
    socket: &'a Socket,
    deadline: Instant,
}

impl Deadlined<'_> {
    /// Sets both timeouts to what is left before the deadline.
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "scrape deadline passed"));
        }
        self.socket.set_read_timeout(Some(left))?;
        self.socket.set_write_timeout(Some(left))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        (&*self.socket).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        (&*self.socket).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Answers one HTTP/1.x request and closes, all within [`CONNECTION_DEADLINE`].
fn answer(client: Socket, metrics: &Arc<RelayMetrics>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let mut client = Deadlined { socket: &client, deadline: Instant::now() + CONNECTION_DEADLINE };
    let mut head = BufReader::new(Read::take(&mut client, MAX_REQUEST_BYTES));
    let mut request_line = String::new();
    head.read_line(&mut request_line)?;
    // Read the headers to their end, so the client sees no reset.
    let mut line = String::new();
    while head.read_line(&mut line)? > 2 {
        line.clear();
    }
    drop(head);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            ("200 OK", prometheus_client::encoding::prometheus_text::CONTENT_TYPE, metrics.render())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "only /metrics is served here\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "use GET\n".to_string()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    client.write_all(response.as_bytes())
}
