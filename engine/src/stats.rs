//! Counters shared by every worker of a relay, kept apart from the logs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one relay. Read them with [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    failed: AtomicU64,
    cut_by_drain: AtomicU64,
    refused: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections open now (connecting or relaying).
    pub active: u64,
    /// Connections that ended in an error (upstream connect failure, reset,
    /// cut by the drain).
    pub failed: u64,
    /// Connections still open when a stop's drain ended, and so reset.
    pub cut_by_drain: u64,
    /// Clients reset right after their accept by an access rule
    /// (`--allow-cid`, `--max-connections`); not counted as accepted.
    pub refused: u64,
    /// Bytes delivered from clients to upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered from upstream to clients.
    pub bytes_to_client: u64,
}

impl Stats {
    pub fn opened(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
    }

    pub fn closed(&self, failed: bool) {
        self.active.fetch_sub(1, Relaxed);
        if failed {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    /// Connections open now (one load, for a check per accept).
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    /// `count` open connections were reset when the drain ended.
    pub fn cut_by_drain(&self, count: u64) {
        self.active.fetch_sub(count, Relaxed);
        self.failed.fetch_add(count, Relaxed);
        self.cut_by_drain.fetch_add(count, Relaxed);
    }

    pub fn moved(&self, to_upstream: u64, to_client: u64) {
        if to_upstream > 0 {
            self.bytes_to_upstream.fetch_add(to_upstream, Relaxed);
        }
        if to_client > 0 {
            self.bytes_to_client.fetch_add(to_client, Relaxed);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            failed: self.failed.load(Relaxed),
            cut_by_drain: self.cut_by_drain.load(Relaxed),
            refused: self.refused.load(Relaxed),
            bytes_to_upstream: self.bytes_to_upstream.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
        }
    }
}
