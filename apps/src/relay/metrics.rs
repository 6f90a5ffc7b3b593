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
use vsock_relay_engine::labels::Labelled;
use vsock_relay_engine::stats::{HistogramSnapshot, CONNECT_BUCKETS, DURATION_BUCKETS};
use vsock_relay_engine::target::DnsCounters;

use crate::dns::server::{DnsDecision, QueryCounters};
use vsock_relay_engine::{
    socket, Decision, Endpoint, Failure, RefusedBy, Relay, Route, Service, Stats, StatsSnapshot, Upstream,
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
    /// The DNS services beside the relay (`route: dns`): name, counters.
    dns_services: Vec<(String, Arc<QueryCounters>)>,
    backend: String,
    data_path: String,
}

impl RelayMetrics {
    pub fn new(relay: &Relay, dns_services: Vec<(String, Arc<QueryCounters>)>) -> Self {
        RelayMetrics {
            stats: relay.stats(),
            services: relay.services().to_vec(),
            dns_services,
            backend: relay.backend().to_string(),
            data_path: relay.data_path().label().to_string(),
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

/// A sample's labels: `service` first, then the family's own.
type Labels = Vec<(&'static str, String)>;

enum Sample {
    Counter(u64),
    Gauge(i64),
    /// Sum, count, buckets (not cumulative).
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// What one scrape reads of one service.
struct ServiceScrape<'a> {
    name: &'a str,
    stats: StatsSnapshot,
    dns: DnsCounters,
    route: Option<&'a Route>,
}

/// One metric family of the table: written once per scrape, with one
/// service's samples after another's.
struct Family {
    name: &'static str,
    help: String,
    kind: MetricType,
    /// Written only when a service is routed (its samples come from routes).
    routed: bool,
    /// A service's samples, each with its labels beside `service`.
    samples: fn(&ServiceScrape) -> Vec<(Labels, Sample)>,
}

impl Family {
    fn new(
        name: &'static str,
        help: impl Into<String>,
        kind: MetricType,
        samples: fn(&ServiceScrape) -> Vec<(Labels, Sample)>,
    ) -> Self {
        Family { name, help: help.into(), kind, routed: false, samples }
    }

    fn routed(self) -> Self {
        Family { routed: true, ..self }
    }
}

/// The per-service metric families, in the order they are written (the
/// `build` family, not per service, comes first). A family labelled by an
/// engine enum takes its labels and their meaning from the enum's table.
fn families() -> Vec<Family> {
    use MetricType::{Counter, Gauge, Histogram};
    vec![
        Family::new(
            "connections_accepted",
            "Client connections accepted (refused ones are not).",
            Counter,
            |s| one(Sample::Counter(s.stats.accepted)),
        ),
        Family::new(
            "connections_active",
            "Client connections open now (connecting or relaying).",
            Gauge,
            |s| one(Sample::Gauge(i64::try_from(s.stats.active).unwrap_or(i64::MAX))),
        ),
        Family::new(
            "connections_refused",
            help_by::<RefusedBy>("Clients reset right after their accept, by reason"),
            Counter,
            |s| by_label("reason", |why| s.stats.refused_by(why)),
        ),
        Family::new(
            "connections_failed",
            help_by::<Failure>("Connections that ended in failure, by cause"),
            Counter,
            |s| by_label("cause", |cause| s.stats.failed_by(cause)),
        ),
        Family::new("bytes", "Bytes delivered, by direction.", Counter, |s| {
            [("to_upstream", s.stats.bytes_to_upstream), ("to_client", s.stats.bytes_to_client)]
                .into_iter()
                .map(|(direction, bytes)| {
                    (vec![("direction", direction.to_string())], Sample::Counter(bytes))
                })
                .collect()
        }),
        Family::new(
            "upstream_connect_seconds",
            "Time from accept to an established upstream connection.",
            Histogram,
            |s| one(histogram(&CONNECT_BUCKETS, &s.stats.connect_time)),
        ),
        Family::new(
            "connection_duration_seconds",
            "Time from accept to close, per connection.",
            Histogram,
            |s| one(histogram(&DURATION_BUCKETS, &s.stats.duration)),
        ),
        Family::new(
            "upstream_address_changes",
            "Times a DNS refresh moved the upstream to a new address.",
            Counter,
            |s| one(Sample::Counter(s.dns.changes)),
        ),
        Family::new(
            "dns_failures",
            "DNS refreshes that failed (the last good address stayed in use).",
            Counter,
            |s| one(Sample::Counter(s.dns.lookup_failures)),
        ),
        Family::new(
            "upstream_moves_refused",
            "DNS refreshes whose new address the allowlist refused (the last allowed one stayed in use).",
            Counter,
            |s| one(Sample::Counter(s.dns.moves_refused)),
        ),
        Family::new("routed", help_by::<Decision>("Routed clients, by decision"), Counter, |s| {
            match s.route {
                Some(route) => by_label("decision", |d| route.counters.decisions(d)),
                None => Vec::new(),
            }
        })
        .routed(),
        Family::new(
            "routed_allowed_by_entry",
            "Routed clients allowed, by the allowlist entry that allowed them (address:port).",
            Counter,
            |s| {
                let by_rule = s.route.map(|route| route.counters.by_rule()).unwrap_or_default();
                by_rule.into_iter().map(|(rule, n)| (vec![("entry", rule)], Sample::Counter(n))).collect()
            },
        )
        .routed(),
    ]
}

/// A family's help that names each of its labels with what it means:
/// "`what`: a (help), b (help)."
fn help_by<T: Labelled>(what: &str) -> String {
    let labels: Vec<String> = T::VALUES.iter().map(|v| format!("{} ({})", v.label(), v.help())).collect();
    format!("{what}: {}.", labels.join(", "))
}

/// A service's one sample, with no label beside `service`.
fn one(sample: Sample) -> Vec<(Labels, Sample)> {
    vec![(Vec::new(), sample)]
}

/// A counter per value of a labelled enum, under the label `key`.
fn by_label<T: Labelled>(key: &'static str, count: impl Fn(T) -> u64) -> Vec<(Labels, Sample)> {
    T::VALUES
        .iter()
        .map(|&value| (vec![(key, value.label().to_string())], Sample::Counter(count(value))))
        .collect()
}

/// Writes one metric family: a descriptor, then a sample per label set.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, Sample)>,
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
        let info = vec![
            ("backend", self.backend.clone()),
            ("data_path", self.data_path.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ];
        let help = "The running relay: version, backend and data path.";
        family(&mut encoder, "build", help, MetricType::Gauge, [(info, Sample::Gauge(1))])?;
        let services: Vec<ServiceScrape> = self
            .services
            .iter()
            .enumerate()
            .map(|(i, service)| ServiceScrape {
                name: &service.name,
                stats: self.stats.service_snapshot(i),
                dns: match &service.upstream {
                    Upstream::Fixed(target) => target.dns_counters(),
                    Upstream::Routed(_) => DnsCounters::default(),
                },
                route: service.route(),
            })
            .collect();
        let any_routed = services.iter().any(|s| s.route.is_some());
        for Family { name, help, kind, routed, samples } in families() {
            if routed && !any_routed {
                continue;
            }
            let all = services.iter().flat_map(|service| {
                samples(service).into_iter().map(|(mut labels, sample)| {
                    labels.insert(0, ("service", service.name.to_string()));
                    (labels, sample)
                })
            });
            family(&mut encoder, name, &help, kind, all)?;
        }
        if !self.dns_services.is_empty() {
            let samples = self.dns_services.iter().flat_map(|(service, counters)| {
                by_label("decision", |d| counters.decisions(d)).into_iter().map(|(mut labels, sample)| {
                    labels.insert(0, ("service", service.clone()));
                    (labels, sample)
                })
            });
            family(&mut encoder, DNS_FAMILY, &dns_help(), MetricType::Counter, samples)?;
        }
        Ok(())
    }
}

/// The DNS services' family: queries by decision.
const DNS_FAMILY: &str = "dns_queries";

fn dns_help() -> String {
    help_by::<DnsDecision>("DNS queries of the enclave answered by the parent (route: dns), by decision")
}

/// The metrics endpoint: a thread answering scrapes until the process ends.
pub struct MetricsServer {
    local: Endpoint,
}

impl MetricsServer {
    /// Listens on `endpoint` (TCP or Unix) and serves `/metrics` from
    /// `relay` and the DNS services beside it.
    pub fn start(
        endpoint: &Endpoint,
        relay: &Relay,
        dns_services: Vec<(String, Arc<QueryCounters>)>,
    ) -> anyhow::Result<MetricsServer> {
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
        let metrics = Arc::new(RelayMetrics::new(relay, dns_services));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn help_of(name: &str) -> String {
        families().into_iter().find(|f| f.name == name).map(|f| f.help).unwrap_or_default()
    }

    /// Every label of a labelled family with its meaning in the HELP line:
    /// a cause added to the engine's table without its help fails here.
    fn names_every_label<T: Labelled>(family: &str) {
        let help = help_of(family);
        for value in T::VALUES {
            assert!(!value.help().is_empty(), "{} `{}` has no help", T::WHAT, value.label());
            let named = format!("{} ({})", value.label(), value.help());
            assert!(help.contains(&named), "the help of {family} lacks `{named}`: {help}");
        }
    }

    #[test]
    fn labelled_families_explain_every_label() {
        names_every_label::<Failure>("connections_failed");
        names_every_label::<RefusedBy>("connections_refused");
        names_every_label::<Decision>("routed");
        for value in DnsDecision::VALUES {
            assert!(dns_help().contains(&format!("{} ({})", value.label(), value.help())));
        }
    }

    /// docs/operations.md lists every family and every label the code writes.
    #[test]
    fn the_operations_guide_lists_every_family_and_label() {
        let docs = include_str!("../../../docs/operations.md");
        for family in families() {
            let series = format!("`vsock_relay_{}", family.name);
            assert!(docs.contains(&series), "docs/operations.md lacks {series}");
        }
        assert!(
            docs.contains(&format!("`vsock_relay_{DNS_FAMILY}")),
            "docs/operations.md lacks {DNS_FAMILY}"
        );
        let labels = Failure::LABELS
            .iter()
            .chain(&RefusedBy::LABELS)
            .chain(&Decision::LABELS)
            .chain(&DnsDecision::LABELS);
        for label in labels {
            assert!(docs.contains(&format!("`{label}`")), "docs/operations.md lacks the label `{label}`");
        }
    }
}
