//! What the parent's DNS service told each client: per client (an
//! enclave's vsock CID, see [`Peer`]), the addresses it gave out for each
//! allowed name, until the answer's TTL plus a grace has passed.
//!
//! The `transparent` route reads it: a redirected connection to an address
//! that no address or CIDR entry allows is still allowed when this client
//! was told, lately, that a name the allowlist allows has that address. The
//! memory is per client so that a name answered to one enclave opens
//! nothing to another, and bounded in entries: when full, what expired goes
//! first, then what expires soonest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vsock_relay_engine::Peer;

/// Default time an answer is remembered after its TTL: clients keep
/// answers somewhat longer than told (connection pools, runtimes that
/// cache lookups), and a connection made then is still what was asked for.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Addresses remembered at most, for all clients together.
pub const MAX_ENTRIES: usize = 65_536;

/// The memory of one process's DNS service, shared with its `transparent`
/// services.
#[derive(Debug)]
pub struct Answered {
    grace: Duration,
    max_entries: usize,
    /// Per client and address: the names answered with it, and until when.
    by_client: Mutex<HashMap<Peer, Known>>,
}

/// What one client was told: per address, the names and until when.
type Known = HashMap<IpAddr, Vec<(String, Instant)>>;

impl Answered {
    pub fn new(grace: Duration, max_entries: usize) -> Self {
        Answered { grace, max_entries, by_client: Mutex::default() }
    }

    /// `client` was told that `name` has `addresses`, for `ttl`.
    pub fn remember(&self, client: Peer, name: &str, addresses: &[IpAddr], ttl: Duration) {
        let until = Instant::now() + ttl + self.grace;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = by_client.values().map(HashMap::len).sum();
        if held + addresses.len() > self.max_entries {
            make_room(&mut by_client, addresses.len(), self.max_entries);
        }
        let known = by_client.entry(client).or_default();
        for address in addresses {
            let names = known.entry(address.to_canonical()).or_default();
            match names.iter_mut().find(|(known, _)| *known == name) {
                Some((_, old)) => *old = (*old).max(until),
                None => names.push((name.clone(), until)),
            }
        }
    }

    /// The names `client` was told have `address`, while remembered.
    pub fn names(&self, client: Peer, address: IpAddr) -> Vec<String> {
        let now = Instant::now();
        let by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let Some(names) = by_client.get(&client).and_then(|known| known.get(&address.to_canonical())) else {
            return Vec::new();
        };
        names.iter().filter(|(_, until)| now < *until).map(|(name, _)| name.clone()).collect()
    }

    /// Addresses remembered now, for all clients (expired ones included
    /// until room is made).
    pub fn len(&self) -> usize {
        let by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        by_client.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Answered {
    fn default() -> Self {
        Answered::new(DEFAULT_GRACE, MAX_ENTRIES)
    }
}

/// Frees room for `wanted` more addresses: the expired names first, then
/// the addresses whose names expire soonest.
fn make_room(by_client: &mut HashMap<Peer, Known>, wanted: usize, max: usize) {
    let now = Instant::now();
    for known in by_client.values_mut() {
        known.retain(|_, names| {
            names.retain(|(_, until)| now < *until);
            !names.is_empty()
        });
    }
    by_client.retain(|_, known| !known.is_empty());
    let held: usize = by_client.values().map(HashMap::len).sum();
    let Some(excess) = (held + wanted).checked_sub(max).filter(|&excess| excess > 0) else { return };
    let mut latest: Vec<(Instant, Peer, IpAddr)> = by_client
        .iter()
        .flat_map(|(client, known)| {
            known.iter().map(move |(address, names)| {
                let until = names.iter().map(|(_, until)| *until).max().unwrap_or(now);
                (until, *client, *address)
            })
        })
        .collect();
    latest.sort_unstable();
    for (_, client, address) in latest.into_iter().take(excess) {
        if let Some(known) = by_client.get_mut(&client) {
            known.remove(&address);
        }
    }
    by_client.retain(|_, known| !known.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_name_answered_to_one_client_is_not_known_to_another() {
        let answered = Answered::default();
        answered.remember(Peer::Cid(16), "API.example.com.", &[ip("192.0.2.7")], Duration::from_secs(30));
        assert_eq!(answered.names(Peer::Cid(16), ip("192.0.2.7")), vec!["api.example.com".to_string()]);
        assert!(answered.names(Peer::Cid(17), ip("192.0.2.7")).is_empty(), "another enclave");
        assert!(answered.names(Peer::Local, ip("192.0.2.7")).is_empty(), "a local client");
        assert!(answered.names(Peer::Cid(16), ip("192.0.2.8")).is_empty(), "another address");
        assert_eq!(
            answered.names(Peer::Cid(16), ip("::ffff:192.0.2.7")),
            vec!["api.example.com".to_string()],
            "the IPv4-mapped form is the same address"
        );
    }

    #[test]
    fn an_answer_is_forgotten_after_its_ttl_and_grace() {
        let answered = Answered::new(Duration::from_millis(30), MAX_ENTRIES);
        answered.remember(Peer::Cid(5), "a.example", &[ip("192.0.2.1")], Duration::from_millis(20));
        assert_eq!(answered.names(Peer::Cid(5), ip("192.0.2.1")).len(), 1, "within the TTL");
        std::thread::sleep(Duration::from_millis(35));
        assert_eq!(answered.names(Peer::Cid(5), ip("192.0.2.1")).len(), 1, "within the grace");
        std::thread::sleep(Duration::from_millis(30));
        assert!(answered.names(Peer::Cid(5), ip("192.0.2.1")).is_empty(), "after TTL and grace");
    }

    #[test]
    fn two_names_with_one_address_are_both_known_and_refreshed_not_repeated() {
        let answered = Answered::default();
        let shared = [ip("2001:db8::1")];
        answered.remember(Peer::Cid(3), "a.example", &shared, Duration::from_secs(5));
        answered.remember(Peer::Cid(3), "b.example", &shared, Duration::from_secs(5));
        answered.remember(Peer::Cid(3), "a.example", &shared, Duration::from_secs(50));
        let mut names = answered.names(Peer::Cid(3), shared[0]);
        names.sort();
        assert_eq!(names, vec!["a.example".to_string(), "b.example".to_string()]);
        assert_eq!(answered.len(), 1);
    }

    #[test]
    fn the_memory_is_bounded_and_keeps_what_lasts_longest() {
        let answered = Answered::new(Duration::ZERO, 100);
        for i in 0..1_000u32 {
            let address = IpAddr::from((0xC000_0000u32 + i).to_be_bytes());
            let ttl = Duration::from_secs(u64::from(i) + 10);
            answered.remember(Peer::Cid(i % 7), &format!("n{i}.example"), &[address], ttl);
            assert!(answered.len() <= 100, "{} entries after {i}", answered.len());
        }
        let last = IpAddr::from((0xC000_0000u32 + 999).to_be_bytes());
        assert_eq!(answered.names(Peer::Cid(999 % 7), last), vec!["n999.example".to_string()]);
        let first = IpAddr::from(0xC000_0000u32.to_be_bytes());
        assert!(answered.names(Peer::Cid(0), first).is_empty(), "the soonest to expire went first");
    }
}
