//! Counters of a relay, per service, kept apart from the logs.
//!
//! Each worker writes only its own cells (one per service, on a cache line
//! of its own): a plain load and store, no shared atomic on the data path.
//! Readers ([`Stats::snapshot`], a metrics scrape) sum the workers' cells.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

labelled! {
    /// Why a client was reset right after its accept.
    pub enum RefusedBy as "refusal" {
        Allowlist = "allowlist", "its target is no longer allowed since a reload";
        Cid = "cid", "its vsock CID is not allowed (--allow-cid)";
        Limit = "limit", "the service's limit was reached (--max-connections)";
        NoDestination = "no_destination", "a transparent forwarder's client was not redirected: its original destination is unknown";
    }
}

labelled! {
    /// Why a connection ended in failure.
    pub enum Failure as "failure cause" {
        Connect = "connect", "the upstream could not be reached (refused, unreachable, timed out)";
        Client = "client", "a read or write on the client's socket failed (a reset, mostly)";
        Upstream = "upstream", "a read or write on the upstream's socket failed after the connect";
        Idle = "idle", "reset by the idle timeout (--idle-timeout)";
        Drain = "drain", "still open when a stop's drain time ended (--drain-timeout)";
        Resources = "resources", "out of descriptors or memory: no upstream socket within the connect timeout, or a call on either socket failed for want of them";
        Route = "route", "routed: the head was bad or late, or its destination was refused";
    }
}

/// Upper bounds (seconds) of the upstream connect time histogram's buckets.
pub const CONNECT_BUCKETS: [f64; 12] =
    [0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];
/// Upper bounds (seconds) of the connection duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 12] =
    [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 86400.0];

/// Live counters of one relay: a cell per worker and service.
#[derive(Debug)]
pub struct Stats {
    services: Vec<String>,
    cells: Box<[Cell]>,
}

/// One worker's counters for one service. Written by that worker only.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Cell {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: [AtomicU64; RefusedBy::ALL.len()],
    failed: [AtomicU64; Failure::ALL.len()],
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    connect_time: Histogram<12>,
    duration: Histogram<12>,
}

#[derive(Debug)]
struct Histogram<const N: usize> {
    /// Observations per bucket (not cumulative), the last for +Inf.
    counts: [AtomicU64; N],
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// Adds to a counter that only this thread writes: no read-modify-write
/// instruction, readers on other threads see a whole value.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        match bounds.iter().position(|bound| seconds <= *bound) {
            Some(bucket) => bump(&self.counts[bucket], 1),
            None => bump(&self.over, 1),
        }
        bump(&self.sum_micros, u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    fn add_to(&self, snapshot: &mut HistogramSnapshot<N>) {
        for (total, count) in snapshot.counts.iter_mut().zip(&self.counts) {
            *total += count.load(Relaxed);
        }
        snapshot.over += self.over.load(Relaxed);
        snapshot.sum_micros += self.sum_micros.load(Relaxed);
    }
}

impl Cell {
    pub fn opened(&self) {
        bump(&self.accepted, 1);
        bump(&self.active, 1);
    }

    /// A connection ended after `lasted`, in failure or not.
    pub fn closed(&self, failure: Option<Failure>, lasted: Duration) {
        self.active.store(self.active.load(Relaxed).saturating_sub(1), Relaxed);
        if let Some(failure) = failure {
            bump(&self.failed[failure as usize], 1);
        }
        self.duration.observe(&DURATION_BUCKETS, lasted);
    }

    /// A client was counted as accepted but could not be served at all.
    pub fn dropped(&self, failure: Failure) {
        self.active.store(self.active.load(Relaxed).saturating_sub(1), Relaxed);
        bump(&self.failed[failure as usize], 1);
    }

    pub fn refused(&self, why: RefusedBy) {
        bump(&self.refused[why as usize], 1);
    }

    /// The upstream connect succeeded after `took`.
    pub fn connected(&self, took: Duration) {
        self.connect_time.observe(&CONNECT_BUCKETS, took);
    }

    pub fn moved(&self, to_upstream: u64, to_client: u64) {
        if to_upstream > 0 {
            bump(&self.bytes_to_upstream, to_upstream);
        }
        if to_client > 0 {
            bump(&self.bytes_to_client, to_client);
        }
    }

    fn add_to(&self, s: &mut StatsSnapshot) {
        s.accepted += self.accepted.load(Relaxed);
        s.active += self.active.load(Relaxed);
        for (total, count) in s.refused_by.iter_mut().zip(&self.refused) {
            *total += count.load(Relaxed);
        }
        for (total, count) in s.failed_by.iter_mut().zip(&self.failed) {
            *total += count.load(Relaxed);
        }
        s.bytes_to_upstream += self.bytes_to_upstream.load(Relaxed);
        s.bytes_to_client += self.bytes_to_client.load(Relaxed);
        self.connect_time.add_to(&mut s.connect_time);
        self.duration.add_to(&mut s.duration);
    }
}

/// A histogram's counts at one moment, per bucket (not cumulative).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot<const N: usize> {
    pub counts: [u64; N],
    /// Observations above the last bound.
    pub over: u64,
    pub sum_micros: u64,
}

impl<const N: usize> Default for HistogramSnapshot<N> {
    fn default() -> Self {
        HistogramSnapshot { counts: [0; N], over: 0, sum_micros: 0 }
    }
}

impl<const N: usize> HistogramSnapshot<N> {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }
}

/// A copy of the counters at one moment (of one service, or all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted since start (refused clients are not).
    pub accepted: u64,
    /// Connections open now (connecting or relaying).
    pub active: u64,
    /// Clients reset right after their accept, by [`RefusedBy`] cause.
    pub refused_by: [u64; RefusedBy::ALL.len()],
    /// Connections that ended in failure, by [`Failure`] cause.
    pub failed_by: [u64; Failure::ALL.len()],
    /// Bytes delivered from clients to upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered from upstream to clients.
    pub bytes_to_client: u64,
    /// Upstream connect times (of the connects that succeeded).
    pub connect_time: HistogramSnapshot<12>,
    /// How long connections lasted, from accept to close.
    pub duration: HistogramSnapshot<12>,
}

impl StatsSnapshot {
    /// Connections that ended in an error (any [`Failure`]).
    pub fn failed(&self) -> u64 {
        self.failed_by.iter().sum()
    }

    /// Clients refused (any [`RefusedBy`]).
    pub fn refused(&self) -> u64 {
        self.refused_by.iter().sum()
    }

    pub fn failed_by(&self, failure: Failure) -> u64 {
        self.failed_by[failure as usize]
    }

    pub fn refused_by(&self, why: RefusedBy) -> u64 {
        self.refused_by[why as usize]
    }
}

impl Stats {
    pub(crate) fn new(services: Vec<String>, workers: usize) -> Self {
        let cells = (0..services.len() * workers).map(|_| Cell::default()).collect();
        Stats { services, cells }
    }

    pub(crate) fn cell(&self, worker: usize, service: usize) -> &Cell {
        &self.cells[worker * self.services.len() + service]
    }

    /// The services' names, in their configured order.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Open connections of `service` now, all workers together.
    pub fn active(&self, service: usize) -> u64 {
        self.cells.iter().skip(service).step_by(self.services.len()).map(|c| c.active.load(Relaxed)).sum()
    }

    /// The counters of one service.
    pub fn service_snapshot(&self, service: usize) -> StatsSnapshot {
        let mut snapshot = StatsSnapshot::default();
        for cell in self.cells.iter().skip(service).step_by(self.services.len()) {
            cell.add_to(&mut snapshot);
        }
        snapshot
    }

    /// The counters of every service together.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snapshot = StatsSnapshot::default();
        for cell in self.cells.iter() {
            cell.add_to(&mut snapshot);
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables that size the per-cause arrays: every value in `ALL` at
    /// its own index, with a label and a help line.
    #[test]
    fn every_cause_has_its_index_label_and_help() {
        for (index, cause) in Failure::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, index);
            assert!(!cause.label().is_empty() && !cause.help().is_empty(), "{cause:?}");
        }
        for (index, why) in RefusedBy::ALL.iter().enumerate() {
            assert_eq!(*why as usize, index);
            assert!(!why.label().is_empty() && !why.help().is_empty(), "{why:?}");
        }
        assert_eq!("route".parse(), Ok(Failure::Route));
    }

    #[test]
    fn cells_sum_per_service_and_in_total() {
        let stats = Stats::new(vec!["a".into(), "b".into()], 2);
        stats.cell(0, 0).opened();
        stats.cell(1, 0).opened();
        stats.cell(1, 1).opened();
        stats.cell(0, 0).moved(10, 20);
        stats.cell(1, 0).moved(1, 2);
        stats.cell(1, 0).connected(Duration::from_micros(700));
        stats.cell(1, 0).closed(Some(Failure::Client), Duration::from_secs(2));
        stats.cell(0, 1).refused(RefusedBy::Cid);
        let a = stats.service_snapshot(0);
        assert_eq!((a.accepted, a.active, a.bytes_to_upstream, a.bytes_to_client), (2, 1, 11, 22));
        assert_eq!((a.failed(), a.failed_by(Failure::Client), a.refused()), (1, 1, 0));
        assert_eq!(a.connect_time.counts[2], 1, "700 us falls in the 1 ms bucket");
        assert_eq!((a.duration.counts[5], a.duration.sum_micros), (1, 2_000_000));
        let b = stats.service_snapshot(1);
        assert_eq!((b.accepted, b.active, b.refused_by(RefusedBy::Cid)), (1, 1, 1));
        assert_eq!(stats.active(0), 1);
        assert_eq!(stats.snapshot().accepted, 3);
    }
}
