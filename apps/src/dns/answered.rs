//! What the parent's DNS service told each client: per client (an
//! enclave's vsock CID, see [`Peer`]), the addresses it gave out for each
//! allowed name, until the answer's TTL plus a grace has passed.
//!
//! The `transparent` route reads it: a redirected connection to an address
//! that no address or CIDR entry allows is still allowed when this client
//! was told, lately, that a name the allowlist allows has that address. The
//! memory is per client so that a name answered to one enclave opens
//! nothing to another, and bounded three ways, so that neither its size nor
//! the work of a lookup grows with what a client asks: names per address
//! (a wildcard entry over a CDN gives many names few addresses), pairs of
//! name and address per client (one client cannot push out another's), and
//! pairs in all. When a bound is reached, what expired goes first, then
//! what expires soonest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vsock_relay_engine::Peer;

/// Default time an answer is remembered after its TTL: clients keep
/// answers somewhat longer than told (connection pools, runtimes that
/// cache lookups), and a connection made then is still what was asked for.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Pairs of name and address remembered at most, for all clients together.
pub const MAX_ENTRIES: usize = 65_536;
/// Pairs one client may hold (an eighth of all).
const MAX_PER_CLIENT: usize = MAX_ENTRIES / 8;
/// Names remembered for one address of one client.
const MAX_NAMES_PER_ADDRESS: usize = 16;

/// The memory of one process's DNS service, shared with its `transparent`
/// services.
#[derive(Debug)]
pub struct Answered {
    grace: Duration,
    max_entries: usize,
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    by_client: HashMap<Peer, Known>,
    /// Pairs held, all clients together.
    pairs: usize,
}

/// What one client was told: per address, the names and until when.
#[derive(Debug, Default)]
struct Known {
    by_address: HashMap<IpAddr, Vec<(String, Instant)>>,
    pairs: usize,
}

impl Answered {
    pub fn new(grace: Duration, max_entries: usize) -> Self {
        Answered { grace, max_entries, inner: Mutex::default() }
    }

    /// `client` was told that `name` has `addresses`, for `ttl`.
    pub fn remember(&self, client: Peer, name: &str, addresses: &[IpAddr], ttl: Duration) {
        let now = Instant::now();
        let until = now + ttl + self.grace;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let per_client = (self.max_entries / 8).clamp(1, MAX_PER_CLIENT);
        let mut memory = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if memory.pairs + addresses.len() > self.max_entries {
            memory.make_room(None, addresses.len(), self.max_entries, now);
        }
        if memory.by_client.get(&client).is_some_and(|known| known.pairs + addresses.len() > per_client) {
            memory.make_room(Some(client), addresses.len(), per_client, now);
        }
        let Memory { by_client, pairs } = &mut *memory;
        let known = by_client.entry(client).or_default();
        for address in addresses {
            let names = known.by_address.entry(address.to_canonical()).or_default();
            let before = names.len();
            names.retain(|(_, until)| now < *until);
            match names.iter_mut().find(|(known, _)| *known == name) {
                Some((_, old)) => *old = (*old).max(until),
                None => {
                    if names.len() >= MAX_NAMES_PER_ADDRESS {
                        // The one that expires soonest makes way.
                        if let Some(soonest) = (0..names.len()).min_by_key(|&i| names[i].1) {
                            names.swap_remove(soonest);
                        }
                    }
                    names.push((name.clone(), until));
                }
            }
            // `before` pairs were counted; `after` are held now.
            let after = names.len();
            known.pairs = known.pairs - before + after;
            *pairs = *pairs - before + after;
        }
    }

    /// The names `client` was told have `address`, while remembered (at
    /// most a few: see the module docs).
    pub fn names(&self, client: Peer, address: IpAddr) -> Vec<String> {
        let now = Instant::now();
        let memory = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(names) =
            memory.by_client.get(&client).and_then(|known| known.by_address.get(&address.to_canonical()))
        else {
            return Vec::new();
        };
        names.iter().filter(|(_, until)| now < *until).map(|(name, _)| name.clone()).collect()
    }

    /// Pairs of name and address remembered now, for all clients (expired
    /// ones included until room is made).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).pairs
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

impl Memory {
    /// Frees room for `wanted` more pairs under `bound`, in one client's
    /// memory or in all: the expired first, then what expires soonest, an
    /// eighth of the bound at once (so that a full memory is not sorted
    /// again at every answer).
    fn make_room(&mut self, only: Option<Peer>, wanted: usize, bound: usize, now: Instant) {
        let mut freed = 0;
        for (client, known) in &mut self.by_client {
            if only.is_some_and(|only| only != *client) {
                continue;
            }
            known.by_address.retain(|_, names| {
                let before = names.len();
                names.retain(|(_, until)| now < *until);
                freed += before - names.len();
                known.pairs -= before - names.len();
                !names.is_empty()
            });
        }
        self.pairs -= freed;
        let held = match only {
            Some(client) => self.by_client.get(&client).map_or(0, |known| known.pairs),
            None => self.pairs,
        };
        let target = bound.saturating_sub(bound / 8).min(bound.saturating_sub(wanted));
        if held > target {
            let mut soonest: Vec<(Instant, Peer, IpAddr, usize)> = self
                .by_client
                .iter()
                .filter(|(client, _)| only.is_none_or(|only| only == **client))
                .flat_map(|(client, known)| {
                    known.by_address.iter().flat_map(move |(address, names)| {
                        names.iter().enumerate().map(move |(i, (_, until))| (*until, *client, *address, i))
                    })
                })
                .collect();
            soonest.sort_unstable();
            let mut gone: HashMap<(Peer, IpAddr), Vec<usize>> = HashMap::new();
            for (_, client, address, i) in soonest.into_iter().take(held - target) {
                gone.entry((client, address)).or_default().push(i);
            }
            for ((client, address), mut indexes) in gone {
                let Some(known) = self.by_client.get_mut(&client) else { continue };
                let Some(names) = known.by_address.get_mut(&address) else { continue };
                indexes.sort_unstable_by(|a, b| b.cmp(a));
                for i in indexes {
                    names.swap_remove(i);
                    known.pairs -= 1;
                    self.pairs -= 1;
                }
                if names.is_empty() {
                    known.by_address.remove(&address);
                }
            }
        }
        self.by_client.retain(|_, known| known.pairs > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nth(i: u32) -> IpAddr {
        IpAddr::from((0xC000_0000u32 + i).to_be_bytes())
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
        assert_eq!(answered.len(), 2);
    }

    #[test]
    fn many_names_on_one_address_keep_a_few_and_the_memory_does_not_grow() {
        let answered = Answered::default();
        let cdn = [ip("198.51.100.1")];
        for i in 0..10_000u32 {
            answered.remember(Peer::Cid(3), &format!("b{i}.cdn.example"), &cdn, Duration::from_secs(300));
        }
        assert_eq!(answered.len(), MAX_NAMES_PER_ADDRESS, "names per address are bounded");
        let names = answered.names(Peer::Cid(3), cdn[0]);
        assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
        assert!(names.contains(&"b9999.cdn.example".to_string()), "the latest is kept");
    }

    #[test]
    fn the_memory_is_bounded_and_keeps_what_lasts_longest() {
        let answered = Answered::new(Duration::ZERO, 100);
        for i in 0..1_000u32 {
            let ttl = Duration::from_secs(u64::from(i) + 10);
            answered.remember(Peer::Cid(i % 7), &format!("n{i}.example"), &[nth(i)], ttl);
            assert!(answered.len() <= 100, "{} entries after {i}", answered.len());
        }
        assert_eq!(answered.names(Peer::Cid(999 % 7), nth(999)), vec!["n999.example".to_string()]);
        assert!(answered.names(Peer::Cid(0), nth(0)).is_empty(), "the soonest to expire went first");
    }

    #[test]
    fn one_client_filling_its_share_does_not_push_out_another() {
        let answered = Answered::new(Duration::ZERO, 800);
        answered.remember(Peer::Cid(16), "kept.example", &[ip("192.0.2.1")], Duration::from_secs(1));
        for i in 0..5_000u32 {
            answered.remember(Peer::Cid(17), &format!("n{i}.example"), &[nth(i)], Duration::from_secs(300));
        }
        assert!(
            answered.len() <= 800 / 8 + 1,
            "{} pairs: the flooding client holds its share",
            answered.len()
        );
        assert_eq!(answered.names(Peer::Cid(16), ip("192.0.2.1")), vec!["kept.example".to_string()]);
    }
}
