//! The soak's verdict: every client connection explained, by cause, and the
//! explanation matched by the relays' own counters; no corrupted byte; no
//! growth of memory, descriptors or threads after warm-up; a bounded log.

use std::collections::BTreeMap;

use crate::soak::clients::{End, Kind, Record};
use crate::soak::upstream::Seen;

/// Why a client connection did not finish byte-exact, as the soak explains it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// The upstream server reset it (a restart or a mid-stream reset).
    UpstreamReset,
    /// It never reached the upstream (connect failed, no descriptor, refused).
    NotConnected,
    /// The routed port refused its CONNECT.
    RouteRefused,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::UpstreamReset => "upstream_reset",
            Cause::NotConnected => "not_connected",
            Cause::RouteRefused => "route_refused",
        }
    }
}

/// A client's record joined with what the upstream saw of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Exact,
    Failed(Cause),
    /// A byte differed (client or server side): the soak fails.
    Corrupted(String),
    /// Neither exact nor a failure the soak can explain: the soak fails.
    Unexplained(String),
}

/// Joins one client record with the server's view of the same connection.
pub fn judge(record: &Record, seen: Option<&Seen>) -> Verdict {
    let id = record.id;
    if let End::Corrupt { offset } = record.end {
        return Verdict::Corrupted(format!(
            "connection {id} ({}): byte {offset} received by the client differs",
            record.kind.label()
        ));
    }
    if let Some(Seen::Done { corrupt_at: Some(offset), .. }) = seen {
        return Verdict::Corrupted(format!(
            "connection {id} ({}): byte {offset} received by the upstream differs",
            record.kind.label()
        ));
    }
    match (&record.end, seen) {
        (End::Complete, Some(Seen::Done { up_bytes, .. })) => {
            if *up_bytes != record.sent {
                Verdict::Unexplained(format!(
                    "connection {id}: client sent {} bytes, upstream got {up_bytes}",
                    record.sent
                ))
            } else if record.received_sha256 != record.expected_sha256 {
                Verdict::Corrupted(format!("connection {id}: SHA-256 of the bytes received differs"))
            } else {
                Verdict::Exact
            }
        }
        (End::RouteRefused(_), None) => Verdict::Failed(Cause::RouteRefused),
        (End::Corrupt { .. }, _) => unreachable!("handled above"),
        (_, Some(Seen::Reset)) => Verdict::Failed(Cause::UpstreamReset),
        (End::Short { .. } | End::ConnectFailed(_), None) => Verdict::Failed(Cause::NotConnected),
        (end, seen) => Verdict::Unexplained(format!(
            "connection {id} ({}): client {end:?}, upstream {seen:?}",
            record.kind.label()
        )),
    }
}

/// The relays' counters the accounting needs (sums over services).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayCounts {
    /// The forwarder's accepted and refused clients.
    pub forward_accepted: u64,
    pub forward_refused: u64,
    /// Failures by cause label at the forwarder and the proxy.
    pub forward_failed: BTreeMap<String, u64>,
    pub proxy_failed: BTreeMap<String, u64>,
    /// The proxy's refusals by reason.
    pub proxy_refused: BTreeMap<String, u64>,
}

impl RelayCounts {
    /// Reads the sums from the two relays' `/metrics` texts.
    pub fn from_metrics(forward: &str, proxy: &str) -> RelayCounts {
        RelayCounts {
            forward_accepted: sum(forward, "vsock_relay_connections_accepted_total", None).values().sum(),
            forward_refused: sum(forward, "vsock_relay_connections_refused_total", None).values().sum(),
            forward_failed: sum(forward, "vsock_relay_connections_failed_total", Some("cause")),
            proxy_failed: sum(proxy, "vsock_relay_connections_failed_total", Some("cause")),
            proxy_refused: sum(proxy, "vsock_relay_connections_refused_total", Some("reason")),
        }
    }

    fn proxy(&self, cause: &str) -> u64 {
        self.proxy_failed.get(cause).copied().unwrap_or(0)
    }

    fn forward(&self, cause: &str) -> u64 {
        self.forward_failed.get(cause).copied().unwrap_or(0)
    }
}

/// Sums a counter's samples by one label's value (all under "" without one).
fn sum(metrics: &str, name: &str, by: Option<&str>) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let key = by
            .and_then(|label| {
                let start = series.find(&format!("{label}=\""))? + label.len() + 2;
                let len = series[start..].find('"')?;
                Some(series[start..start + len].to_string())
            })
            .unwrap_or_default();
        *sums.entry(key).or_insert(0) += value as u64;
    }
    sums
}

/// One line of the accounting: what the clients counted, what the relays counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub what: &'static str,
    pub clients: u64,
    pub relays: u64,
}

/// The accounting of a whole run.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    pub by_kind: BTreeMap<&'static str, KindTally>,
    pub causes: BTreeMap<&'static str, u64>,
    pub corrupted: Vec<String>,
    pub unexplained: Vec<String>,
    pub matches: Vec<Match>,
}

/// Connections and bytes of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindTally {
    pub connections: u64,
    pub exact: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Accounting {
    /// Judges every record (`seen` gives the upstream's view of an id) and
    /// matches the causes with the relays' counters. `anonymous_resets`:
    /// upstream connections reset before their header (the proxy counts
    /// them as upstream failures; their clients never reached the server).
    /// `probes`: connections the soak made to see the forwarder ready.
    pub fn new(
        records: &[Record],
        seen: impl Fn(u64) -> Option<Seen>,
        relays: &RelayCounts,
        anonymous_resets: u64,
        probes: u64,
    ) -> Accounting {
        let mut accounting = Accounting::default();
        for kind in Kind::ALL {
            accounting.by_kind.insert(kind.label(), KindTally::default());
        }
        for record in records {
            let verdict = judge(record, seen(record.id).as_ref());
            let tally = accounting.by_kind.entry(record.kind.label()).or_default();
            tally.connections += 1;
            tally.bytes_sent += record.sent;
            tally.bytes_received += record.received;
            match verdict {
                Verdict::Exact => tally.exact += 1,
                Verdict::Failed(cause) => {
                    tally.failed += 1;
                    *accounting.causes.entry(cause.label()).or_insert(0) += 1;
                }
                Verdict::Corrupted(why) => accounting.corrupted.push(why),
                Verdict::Unexplained(why) => accounting.unexplained.push(why),
            }
        }
        let cause = |c: Cause| accounting.causes.get(c.label()).copied().unwrap_or(0);
        let refused: u64 = relays.proxy_refused.values().sum();
        accounting.matches = vec![
            Match {
                what: "connections (clients made, and the readiness probe; forwarder accepted + refused)",
                clients: records.iter().filter(|r| !matches!(r.end, End::ConnectFailed(_))).count() as u64 + probes,
                relays: relays.forward_accepted + relays.forward_refused,
            },
            Match {
                what: "reset by upstream (clients + resets before a header; proxy failed{upstream})",
                clients: cause(Cause::UpstreamReset) + anonymous_resets,
                relays: relays.proxy("upstream"),
            },
            // A refused CONNECT is counted by the cause behind it (connect
            // when the upstream is down, route when DNS fails). The proxy's
            // `client` failures belong here too: the soak's clients never
            // abort on their own, and the proxy counts `client` when the
            // forwarder's hop closed before the upstream was reached (seen
            // under the descriptor bursts, when the proxy accepts late).
            Match {
                what: "never reached upstream or CONNECT refused, less resets before a header (clients; \
                       failed{connect,resources,route,client} of the proxy, failed{connect,resources} of the forwarder, refusals)",
                clients: (cause(Cause::NotConnected) + cause(Cause::RouteRefused)).saturating_sub(anonymous_resets),
                relays: relays.proxy("connect")
                    + relays.proxy("resources")
                    + relays.proxy("route")
                    + relays.proxy("client")
                    + relays.forward("connect")
                    + relays.forward("resources")
                    + relays.forward_refused
                    + refused,
            },
        ];
        accounting
    }

    /// Every problem found; empty when the run is accounted for.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.corrupted.is_empty() {
            problems.push(format!(
                "{} corrupted connection(s), first: {}",
                self.corrupted.len(),
                self.corrupted[0]
            ));
        }
        if !self.unexplained.is_empty() {
            problems.push(format!(
                "{} connection(s) unaccounted for, first: {}",
                self.unexplained.len(),
                self.unexplained[0]
            ));
        }
        for m in &self.matches {
            if m.clients != m.relays {
                problems.push(format!("{}: clients {} != relays {}", m.what, m.clients, m.relays));
            }
        }
        problems
    }
}

/// The least-squares slope of `ys` over `xs` (per unit of x).
pub fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len().min(ys.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Growth of a sampled series after warm-up: the slope of its per-window
/// minima (ten windows), times the post-warm-up length, and no more than
/// the last window's minimum above the first's. Minima, because a burst of
/// connections lifts the samples for seconds without a leak; a leak lifts
/// the floor. The cap, because a bounded pool that grew in a late burst and
/// then shrank back (the router's policy threads live 10 s after their
/// last job: a burst at 73 s of a 2-minute run kept three of them through
/// two windows) tilts the slope, while a leak is still there at the end.
pub fn floor_growth(times: &[f64], values: &[f64], warm_up: f64) -> f64 {
    let points: Vec<(f64, f64)> =
        times.iter().copied().zip(values.iter().copied()).filter(|(t, _)| *t >= warm_up).collect();
    if points.len() < 20 {
        return 0.0;
    }
    let span = points[points.len() - 1].0 - points[0].0;
    let chunk = points.len().div_ceil(10);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for window in points.chunks(chunk) {
        let (t, v) = window.iter().fold((0.0, f64::MAX), |(t, v), p| (t + p.0, v.min(p.1)));
        xs.push(t / window.len() as f64);
        ys.push(v);
    }
    let still_there = ys[ys.len() - 1] - ys[0];
    (slope(&xs, &ys) * span).min(still_there)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, end: End) -> Record {
        Record {
            id,
            kind: Kind::Bulk,
            routed: false,
            end,
            sent: 10,
            sent_sha256: [1; 32],
            received: 10,
            received_sha256: [2; 32],
            expected_received: 10,
            expected_sha256: [2; 32],
        }
    }

    #[test]
    fn verdicts() {
        let done = Seen::Done { up_bytes: 10, corrupt_at: None };
        assert_eq!(judge(&record(1, End::Complete), Some(&done)), Verdict::Exact);
        let mut bad = record(2, End::Complete);
        bad.received_sha256 = [3; 32];
        assert!(matches!(judge(&bad, Some(&done)), Verdict::Corrupted(_)));
        let flipped = Seen::Done { up_bytes: 10, corrupt_at: Some(4) };
        assert!(matches!(judge(&record(3, End::Complete), Some(&flipped)), Verdict::Corrupted(_)));
        assert!(matches!(
            judge(&record(4, End::Corrupt { offset: 7 }), Some(&Seen::Reset)),
            Verdict::Corrupted(_)
        ));
        let short = End::Short { error: None };
        assert_eq!(
            judge(&record(5, short.clone()), Some(&Seen::Reset)),
            Verdict::Failed(Cause::UpstreamReset)
        );
        assert_eq!(judge(&record(6, short.clone()), None), Verdict::Failed(Cause::NotConnected));
        // Short while the upstream finished normally: bytes lost in a relay.
        assert!(matches!(judge(&record(7, short), Some(&done)), Verdict::Unexplained(_)));
        // Complete at the client, never seen upstream: impossible unless lying.
        assert!(matches!(judge(&record(8, End::Complete), None), Verdict::Unexplained(_)));
    }

    /// The CI soak's guard: a corrupted byte, a connection nobody can
    /// explain, or a relay counter that disagrees with the clients each
    /// make the run fail.
    #[test]
    fn a_corrupted_or_unaccounted_connection_fails_the_accounting() {
        let done = Seen::Done { up_bytes: 10, corrupt_at: None };
        let relays = RelayCounts { forward_accepted: 3, ..RelayCounts::default() };
        let records = [record(1, End::Complete), record(2, End::Complete), record(3, End::Complete)];
        let all_done = |_| Some(done.clone());
        assert_eq!(Accounting::new(&records, all_done, &relays, 0, 0).problems(), Vec::<String>::new());
        let mut corrupt = records.clone();
        corrupt[1].received_sha256[0] ^= 1;
        let problems = Accounting::new(&corrupt, all_done, &relays, 0, 0).problems();
        assert!(problems.iter().any(|p| p.contains("corrupted")), "{problems:?}");
        // A connection the relays never saw, or failed without counting it.
        let problems =
            Accounting::new(&records, all_done, &RelayCounts { forward_accepted: 2, ..relays.clone() }, 0, 0)
                .problems();
        assert!(problems.iter().any(|p| p.contains("clients 3 != relays 2")), "{problems:?}");
        let mut short = records.clone();
        short[2].end = End::Short { error: None };
        let problems =
            Accounting::new(&short, |id| if id == 3 { None } else { Some(done.clone()) }, &relays, 0, 0)
                .problems();
        assert!(problems.iter().any(|p| p.contains("clients 1 != relays 0")), "{problems:?}");
    }

    #[test]
    fn counters_are_summed_by_label() {
        let text = "vsock_relay_connections_failed_total{service=\"a\",cause=\"connect\"} 2\n\
                    vsock_relay_connections_failed_total{service=\"b\",cause=\"connect\"} 3\n\
                    vsock_relay_connections_failed_total{service=\"b\",cause=\"upstream\"} 1\n";
        let sums = sum(text, "vsock_relay_connections_failed_total", Some("cause"));
        assert_eq!(sums.get("connect"), Some(&5));
        assert_eq!(sums.get("upstream"), Some(&1));
    }

    #[test]
    fn floor_growth_sees_a_leak_not_a_burst() {
        let times: Vec<f64> = (0..600).map(f64::from).collect();
        let flat_with_bursts: Vec<f64> =
            times.iter().map(|t| if (*t as u64) % 97 < 5 { 900.0 } else { 100.0 }).collect();
        assert!(floor_growth(&times, &flat_with_bursts, 60.0).abs() < 1.0);
        let leak: Vec<f64> = times.iter().map(|t| 100.0 + t / 10.0).collect();
        assert!((floor_growth(&times, &leak, 60.0) - 54.0).abs() < 6.0);
    }

    /// The CI soak that failed on this: threads 9, then 12 from 76 s to
    /// 95 s after a burst at 73 s (a pool's idle threads), then 7 to the end.
    #[test]
    fn floor_growth_ignores_a_late_bump_that_went_back() {
        let times: Vec<f64> = (0..=120).map(f64::from).collect();
        let threads: Vec<f64> = times
            .iter()
            .map(|t| match *t as u64 {
                0..=5 => 7.0,
                76..=95 => 12.0,
                96..=120 => 7.0,
                _ => 9.0,
            })
            .collect();
        assert!(floor_growth(&times, &threads, 8.0) <= 0.0);
        // The same bump that stays to the end is growth.
        let stays: Vec<f64> = times.iter().map(|t| if *t >= 76.0 { 12.0 } else { 9.0 }).collect();
        assert!(floor_growth(&times, &stays, 8.0) >= 2.9);
    }
}
