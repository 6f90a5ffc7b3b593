//! Clients accepted while no upstream socket could be opened for them (the
//! process is out of descriptors): kept, oldest first, instead of reset.
//!
//! Why: each accept that succeeds takes the descriptor a closing connection
//! just gave back, so the upstream socket after it fails. Resetting that
//! client frees the descriptor again and the next accept takes it: a worker
//! that resets would go through its whole backlog, resetting every client
//! that did not fit (measured on io_uring, which accepts one client per
//! listener wake: 120 of a 300-client burst against a 384-descriptor
//! limit, where they only had to wait a second). A waiting client holds
//! one descriptor and gets its upstream socket as soon as connections
//! close; the worker stops accepting meanwhile, so the rest wait in the
//! listener's backlog, which costs the relay nothing. A client waits at
//! most its connect timeout; then it is reset and counted as `resources`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most clients one worker keeps waiting; past it a client is reset.
/// (Each holds a descriptor, and the worker stops accepting as the first
/// one waits: only a batch of accepts reaches this.)
pub(super) const MAX_WAITING: usize = 1024;

/// One client waiting for an upstream socket.
#[derive(Debug)]
pub(super) struct Waiter<C> {
    pub service: usize,
    pub client: C,
    /// When it was accepted.
    pub since: Instant,
}

/// The waiting clients of one worker, oldest first. Generic over the
/// client so that its rules are tested without sockets.
#[derive(Debug)]
pub(super) struct Waiting<C> {
    queue: VecDeque<Waiter<C>>,
    /// How long a client may wait (the connect timeout).
    patience: Duration,
}

impl<C> Waiting<C> {
    pub fn new(patience: Duration) -> Self {
        Waiting { queue: VecDeque::new(), patience }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// A new waiter, after the others; handed back when the queue is full.
    pub fn push(&mut self, waiter: Waiter<C>) -> Result<(), Waiter<C>> {
        if self.queue.len() >= MAX_WAITING {
            return Err(waiter);
        }
        self.queue.push_back(waiter);
        Ok(())
    }

    /// A waiter taken by [`Waiting::next`] that must wait again: first in
    /// line again, where it was.
    pub fn put_back(&mut self, waiter: Waiter<C>) {
        self.queue.push_front(waiter);
    }

    /// The oldest waiter, to try again.
    pub fn next(&mut self) -> Option<Waiter<C>> {
        self.queue.pop_front()
    }

    /// Takes out the waiters that waited their whole patience by `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<Waiter<C>> {
        let patience = self.patience;
        let (expired, kept) = self.queue.drain(..).partition(|waiter| waiter.since + patience <= now);
        self.queue = kept;
        expired.into()
    }

    /// Takes out every waiter (the worker is done).
    pub fn all(&mut self) -> impl Iterator<Item = Waiter<C>> + '_ {
        self.queue.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(client: u32, since: Instant) -> Waiter<u32> {
        Waiter { service: 0, client, since }
    }

    /// Clients come back in the order they were accepted, and one put back
    /// is first in line again.
    #[test]
    fn the_oldest_waits_least() {
        let now = Instant::now();
        let mut waiting = Waiting::new(Duration::from_secs(5));
        for client in 0..3 {
            waiting.push(waiter(client, now)).unwrap();
        }
        let first = waiting.next().unwrap();
        assert_eq!(first.client, 0);
        waiting.put_back(first);
        let order: Vec<u32> = std::iter::from_fn(|| waiting.next()).map(|w| w.client).collect();
        assert_eq!(order, [0, 1, 2]);
        assert!(waiting.is_empty());
    }

    /// Only the clients that waited their whole patience expire, wherever
    /// they are in the queue; the others keep their order.
    #[test]
    fn a_client_waits_at_most_its_patience() {
        let start = Instant::now();
        let patience = Duration::from_secs(5);
        let mut waiting = Waiting::new(patience);
        waiting.push(waiter(0, start + Duration::from_secs(2))).unwrap();
        waiting.push(waiter(1, start)).unwrap();
        waiting.push(waiter(2, start + Duration::from_secs(1))).unwrap();
        assert!(waiting.expired(start + patience - Duration::from_millis(1)).is_empty());
        let expired: Vec<u32> = waiting.expired(start + patience).into_iter().map(|w| w.client).collect();
        assert_eq!(expired, [1]);
        let left: Vec<u32> = waiting.all().map(|w| w.client).collect();
        assert_eq!(left, [0, 2]);
    }

    /// The queue holds at most `MAX_WAITING`; the next is handed back.
    #[test]
    fn a_full_queue_hands_the_client_back() {
        let now = Instant::now();
        let mut waiting = Waiting::new(Duration::from_secs(5));
        for client in 0..MAX_WAITING {
            waiting.push(waiter(u32::try_from(client).unwrap(), now)).unwrap();
        }
        let refused = waiting.push(waiter(u32::MAX, now)).unwrap_err();
        assert_eq!(refused.client, u32::MAX);
        assert_eq!(waiting.len(), MAX_WAITING);
    }
}
