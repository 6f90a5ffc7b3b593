//! Counters shared by every worker of a relay, kept apart from the logs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one relay. Read them with [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    failed: AtomicU64,
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
    /// Connections that ended in an error (upstream connect failure, reset).
    pub failed: u64,
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
            bytes_to_upstream: self.bytes_to_upstream.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
        }
    }
}
