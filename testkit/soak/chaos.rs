//! The chaos schedule: faults at seeded random moments, printed before the
//! run so that a seed repeats it.

use std::fmt;
use std::time::Duration;

use crate::traffic::Rng;

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every open upstream connection reset, nothing listening for a while.
    UpstreamRestart { down: Duration },
    /// Some open upstream connections reset in mid-stream.
    UpstreamResets { count: usize, pick: u64 },
    /// The name moves to the other upstream address.
    DnsChange,
    /// The name server answers SERVFAIL for a while.
    DnsFailure { lasting: Duration },
    /// SIGHUP with a valid allowlist.
    ReloadValid,
    /// SIGHUP with an allowlist that does not parse.
    ReloadBroken,
    /// Many clients at once, past the proxy's descriptor limit.
    DescriptorBurst { clients: usize },
    /// tc netem loss, delay and reordering on the upstream link for a while.
    Netem { lasting: Duration, loss_pct: u32, delay_ms: u32, reorder_pct: u32 },
}

impl Fault {
    pub const KINDS: [&'static str; 8] = [
        "upstream_restart",
        "upstream_resets",
        "dns_change",
        "dns_failure",
        "reload_valid",
        "reload_broken",
        "descriptor_burst",
        "netem",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Fault::UpstreamRestart { .. } => "upstream_restart",
            Fault::UpstreamResets { .. } => "upstream_resets",
            Fault::DnsChange => "dns_change",
            Fault::DnsFailure { .. } => "dns_failure",
            Fault::ReloadValid => "reload_valid",
            Fault::ReloadBroken => "reload_broken",
            Fault::DescriptorBurst { .. } => "descriptor_burst",
            Fault::Netem { .. } => "netem",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::UpstreamRestart { down } => write!(f, "upstream_restart down={}ms", down.as_millis()),
            Fault::UpstreamResets { count, .. } => write!(f, "upstream_resets count={count}"),
            Fault::DnsFailure { lasting } => write!(f, "dns_failure for={}ms", lasting.as_millis()),
            Fault::DescriptorBurst { clients } => write!(f, "descriptor_burst clients={clients}"),
            Fault::Netem { lasting, loss_pct, delay_ms, reorder_pct } => write!(
                f,
                "netem for={}ms loss={loss_pct}% delay={delay_ms}ms reorder={reorder_pct}%",
                lasting.as_millis()
            ),
            other => f.write_str(other.kind()),
        }
    }
}

/// Faults at their moments (from the run's start), in order.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub faults: Vec<(Duration, Fault)>,
}

impl Schedule {
    /// Faults from `warm_up` until `quiet` before `length`, one every
    /// `mean_gap` on average, each kind in turn at a random moment, so that
    /// a short run still sees every kind.
    pub fn new(
        seed: u64,
        length: Duration,
        warm_up: Duration,
        quiet: Duration,
        mean_gap: Duration,
    ) -> Schedule {
        let mut rng = Rng::new(seed ^ 0xc4a0_5eed);
        let mut faults = Vec::new();
        let mut at = warm_up;
        let end = length.saturating_sub(quiet);
        let mut turn = 0usize;
        let gap_ms = mean_gap.as_millis().max(1) as u64;
        loop {
            at += Duration::from_millis(rng.between(gap_ms / 2, gap_ms * 3 / 2));
            if at >= end {
                break;
            }
            let ms = |rng: &mut Rng, low, high| Duration::from_millis(rng.between(low, high));
            let fault = match turn % Fault::KINDS.len() {
                0 => Fault::UpstreamResets { count: rng.between(1, 4) as usize, pick: rng.next_u64() },
                1 => Fault::DnsChange,
                2 => Fault::ReloadValid,
                3 => Fault::Netem {
                    lasting: ms(&mut rng, 3_000, 10_000),
                    loss_pct: rng.between(1, 3) as u32,
                    delay_ms: rng.between(2, 20) as u32,
                    reorder_pct: rng.between(5, 25) as u32,
                },
                4 => Fault::UpstreamRestart { down: ms(&mut rng, 300, 2_000) },
                5 => Fault::DnsFailure { lasting: ms(&mut rng, 2_000, 6_000) },
                6 => Fault::ReloadBroken,
                _ => Fault::DescriptorBurst { clients: rng.between(150, 300) as usize },
            };
            // After the first round, kinds come in random order.
            turn = if turn + 1 < Fault::KINDS.len() { turn + 1 } else { rng.between(0, 7) as usize + 8 };
            faults.push((at, fault));
        }
        Schedule { faults }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_schedule_and_a_short_run_sees_every_kind() {
        let make = |seed| {
            Schedule::new(
                seed,
                Duration::from_secs(120),
                Duration::from_secs(20),
                Duration::from_secs(25),
                Duration::from_secs(8),
            )
        };
        let (a, b) = (make(7), make(7));
        assert_eq!(a.faults, b.faults);
        assert_ne!(a.faults, make(8).faults);
        for kind in Fault::KINDS {
            assert!(a.faults.iter().any(|(_, f)| f.kind() == kind), "no {kind} in {:?}", a.faults);
        }
    }
}
