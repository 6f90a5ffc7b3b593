//! Who may open a connection: a service's per-client rules, applied right
//! after the accept (the service's gate, `--allow-cid`, `--max-connections`).
//! A refused client is reset, never served; the reason is counted and
//! logged (throttled).

use socket2::Socket;

use crate::config::Service;
use crate::stats::RefusedBy;

/// Why a client is reset right after its accept.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The service's target is no longer allowed (since a reload).
    Closed,
    Cid(u32),
    UnknownCid,
    OverLimit(u64),
    /// A redirected client whose original destination cannot be read.
    NoOriginalDestination,
}

impl Refusal {
    pub fn counted_as(&self) -> RefusedBy {
        match self {
            Refusal::Closed => RefusedBy::Allowlist,
            Refusal::Cid(_) | Refusal::UnknownCid => RefusedBy::Cid,
            Refusal::OverLimit(_) => RefusedBy::Limit,
            Refusal::NoOriginalDestination => RefusedBy::NoDestination,
        }
    }

    /// The log line's words.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Closed => "client refused: the service's target is no longer allowed (since a reload)",
            Refusal::Cid(_) => "client refused: its CID is not in --allow-cid",
            Refusal::UnknownCid => "client refused: its CID is unknown and --allow-cid is set",
            Refusal::OverLimit(_) => "client refused: --max-connections reached",
            Refusal::NoOriginalDestination => {
                "client refused: where it was going is unknown (not redirected here by iptables REDIRECT)"
            }
        }
    }
}

/// Whether the rules of `service`, with `active` connections open, refuse
/// this client.
pub(super) fn refusal(service: &Service, active: u64, client: &Socket) -> Option<Refusal> {
    if !service.gate.is_open() {
        return Some(Refusal::Closed);
    }
    if let Some(max) = service.rules.max_connections {
        if active >= max {
            return Some(Refusal::OverLimit(max));
        }
    }
    let allowed = service.rules.allow_cids.as_ref()?;
    match client.peer_addr().ok().and_then(|peer| peer.as_vsock_address()) {
        Some((cid, _)) if allowed.contains(&cid) => None,
        Some((cid, _)) => Some(Refusal::Cid(cid)),
        None => Some(Refusal::UnknownCid),
    }
}
