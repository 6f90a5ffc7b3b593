//! One worker thread: the event loop every backend runs, over a driver.
//!
//! The loop owns what does not depend on how events arrive: the connection
//! slots, the deadlines the connections hand it, the queue of directions
//! that yielded with work left, spinning before a sleep, pausing accepts
//! when descriptors run out, and the stop: no new clients, a drain time for
//! the open ones, then a reset for the rest. Also the idle timeout, the
//! counters, and throttled warnings. A worker serves every service of its
//! relay: it watches every listener, one slab of connections.
//! What a new client becomes (the service's rules, its upstream socket and
//! data paths, a PROXY header) is `open.rs`; who may connect, `admission.rs`;
//! what is logged, `log.rs`; a client accepted when no upstream socket
//! could be opened for it waits (`waiting.rs`) instead of being reset.
//! Routed services' clients are handed to the router (`route/router.rs`)
//! once their head is read; its verdicts come back through this worker's
//! mailbox, which wakes it.
//! A driver (`driver/`) only arms interest, waits, and reports events.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::{SockAddr, Socket};

use crate::config::RelayConfig;
use crate::conn::{Action, ConnState, Connection, Context, Ending, Event};
use crate::driver::{Backend, Driver, DriverEvent, EpollDriver, UringDriver};
use crate::error::{ConnError, Error, Op, Side};
use crate::pool::Pools;
use crate::route::router::{Job, Mailbox, Router, Verdict};
use crate::route::Peer;
use crate::socket;
use crate::stats::{Failure, Stats};
use crate::vocab::{DataPath, Direction, Key, Readiness, Wait};
use admission::Refusal;
use log::Warnings;
use open::{NoSocket, Opened, Opener};
use waiting::{Waiter, Waiting};

mod admission;
mod log;
mod open;
#[cfg(test)]
mod tests;
mod waiting;

/// Pause before accepting again after running out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Idle pipes and buffers a worker keeps for reuse.
const POOL_MAX_IDLE: usize = 16;

/// What workers share: the stop flags and a way to wake each one.
#[derive(Debug)]
pub(crate) struct Control {
    stopping: AtomicBool,
    /// Set by a second stop: the drain ends now.
    cutting: AtomicBool,
    wakers: Vec<File>,
}

impl Control {
    pub fn new(wakers: Vec<File>) -> Self {
        Control { stopping: AtomicBool::new(false), cutting: AtomicBool::new(false), wakers }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Stops, and resets the open connections instead of letting them drain.
    pub fn stop_now(&self) {
        self.cutting.store(true, Ordering::SeqCst);
        self.stop();
    }

    fn wake_all(&self) {
        for mut waker in &self.wakers {
            // An eventfd write fails only when the counter would overflow,
            // which means a wake-up is pending anyway.
            let _ = waker.write(&1u64.to_ne_bytes());
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn cutting(&self) -> bool {
        self.cutting.load(Ordering::SeqCst)
    }
}

/// What one worker gets.
pub(crate) struct WorkerSetup {
    pub index: usize,
    /// One per service, in the config's order.
    pub listeners: Vec<Socket>,
    /// The read side of this worker's waker in [`Control`].
    pub wake: File,
    pub config: Arc<RelayConfig>,
    pub stats: Arc<Stats>,
    pub control: Arc<Control>,
    /// Where the router's verdicts for this worker arrive.
    pub mailbox: Arc<Mailbox>,
    /// The relay's router, when it has routed services.
    pub router: Option<Arc<Router>>,
}

/// Runs a worker until the relay stops; a failure stops the other workers too.
pub(crate) fn run(backend: Backend, mut setup: WorkerSetup) -> Result<(), Error> {
    let (index, control) = (setup.index, Arc::clone(&setup.control));
    let listeners = std::mem::take(&mut setup.listeners);
    let wake = setup.wake.try_clone().map_err(|source| Error::Worker { worker: index, source })?;
    let result = match backend {
        Backend::Uring => UringDriver::new(listeners, wake, setup.config.data_path == DataPath::Ring)
            .and_then(|driver| Worker::new(driver, setup).run()),
        Backend::Portable => {
            EpollDriver::new(listeners, wake).and_then(|driver| Worker::new(driver, setup).run())
        }
    };
    result.map_err(|source| {
        tracing::error!(worker = index, error = %source, "worker failed; stopping the relay");
        control.stop();
        Error::Worker { worker: index, source }
    })
}

/// Is this accept error about resources (retry later) rather than one client?
fn out_of_resources(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Is this accept error about one client only (it left, or Linux passed on
/// a network error of its new socket, as accept(2) says it may), so that
/// the next client can be accepted at once?
fn one_client(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP
        )
    )
}

struct Slot {
    conn: Connection,
    /// Index of its service in the config.
    service: usize,
    /// When a byte last moved (set on every move; read by the idle sweep,
    /// which runs only with an idle timeout).
    last_active: Instant,
}

/// The counter a connection's ending goes to (`None`: not a failure). A
/// call that failed for want of descriptors or memory (a pipe that could
/// not be made, say) is the relay's shortage, whichever socket it was on.
fn failure_of(ending: &Ending) -> Option<Failure> {
    match ending {
        Ending::Finished => None,
        Ending::Failed(ConnError { source, .. }) if out_of_resources(source) => Some(Failure::Resources),
        Ending::Refused { .. } => Some(Failure::Route),
        Ending::Idle(_) => Some(Failure::Idle),
        Ending::Failed(ConnError { op: Op::Connect, .. }) => Some(Failure::Connect),
        Ending::Failed(ConnError { side: Side::Client, .. }) => Some(Failure::Client),
        Ending::Failed(ConnError { side: Side::Upstream, .. }) => Some(Failure::Upstream),
    }
}

struct Worker<D> {
    /// Declared first, so dropped first: the kernel lets go of every
    /// operation before the connections' sockets close.
    driver: D,
    conns: Slab<Slot>,
    /// Directions that yielded with work left, run after the events.
    ready: Vec<(Key, Direction)>,
    /// Heads, decisions and connects in progress, soonest deadline first
    /// (an entry whose connection moved on is dropped when it comes up).
    deadlines: BinaryHeap<Reverse<(Instant, Key)>>,
    mailbox: Arc<Mailbox>,
    router: Option<Arc<Router>>,
    verdicts: Vec<(Key, Verdict)>,
    accept_paused_until: Option<Instant>,
    /// Clients accepted while no upstream socket could be opened for them.
    waiting: Waiting<Socket>,
    /// A connection's sockets closed this round: waiting clients may get
    /// theirs now.
    freed: bool,
    /// Set once stopping: when the open connections are reset.
    drain_deadline: Option<Instant>,
    /// With an idle timeout: when to look for idle connections next.
    idle_sweep: Option<Instant>,
    /// How often to look (for the service with the shortest idle timeout).
    sweep_every: Option<Duration>,
    /// The loop's clock, read once per round (for `Slot::last_active`).
    now: Instant,
    warnings: Warnings,
    index: usize,
    /// Makes a connection of each new client.
    opener: Opener,
    config: Arc<RelayConfig>,
    stats: Arc<Stats>,
    control: Arc<Control>,
    pools: Pools,
}

impl<D: Driver> Worker<D> {
    fn new(mut driver: D, setup: WorkerSetup) -> Self {
        let WorkerSetup { index, config, stats, control, mailbox, router, .. } = setup;
        let sweep_every =
            config.services.iter().filter_map(|s| s.rules.idle_timeout).min().map(sweep_interval);
        let opener =
            Opener::new(Arc::clone(&config), index, driver.trigger(), driver.buffer_ring().is_some());
        Worker {
            driver,
            conns: Slab::new(),
            ready: Vec::new(),
            deadlines: BinaryHeap::new(),
            mailbox,
            router,
            verdicts: Vec::new(),
            accept_paused_until: None,
            waiting: Waiting::new(config.connect_timeout),
            freed: false,
            drain_deadline: None,
            idle_sweep: sweep_every.map(|every| Instant::now() + every),
            sweep_every,
            now: Instant::now(),
            warnings: Warnings::new(),
            index,
            opener,
            pools: Pools::new(config.pipe_bytes, POOL_MAX_IDLE),
            config,
            stats,
            control,
        }
    }

    fn run(&mut self) -> io::Result<()> {
        if self.control.stopping() {
            self.on_stop()?;
        }
        let mut events = Vec::new();
        let mut ready = Vec::new();
        loop {
            let now = Instant::now();
            if let Some(drain_deadline) = self.drain_deadline {
                if (self.conns.is_empty() && self.waiting.is_empty()) || drain_deadline <= now {
                    self.abandon();
                    return Ok(());
                }
            }
            self.wait(&mut events, now)?;
            self.now = Instant::now();
            for event in events.drain(..) {
                self.on_event(event)?;
            }
            if std::mem::take(&mut self.freed) && !self.waiting.is_empty() {
                self.retry_waiting()?;
            }
            self.expire(Instant::now())?;
            std::mem::swap(&mut ready, &mut self.ready);
            for (key, direction) in ready.drain(..) {
                if self.slot(key).is_some_and(|slot| slot.conn.waiting(direction) == Some(Wait::Yield)) {
                    self.dispatch(key, Event::Ready(direction))?;
                }
            }
        }
    }

    /// Waits for events until the next deadline (not at all when directions
    /// are queued); first polls for them during the configured spin time.
    fn wait(&mut self, events: &mut Vec<DriverEvent>, now: Instant) -> io::Result<()> {
        let timeout = if self.ready.is_empty() {
            let deadlines = [
                self.deadlines.peek().map(|Reverse((at, _))| *at),
                self.accept_paused_until,
                self.drain_deadline,
                self.idle_sweep,
                self.warnings.next_deadline(),
            ];
            deadlines.into_iter().flatten().min().map(|d| d.saturating_duration_since(now))
        } else {
            Some(Duration::ZERO)
        };
        let spin = self.config.spin;
        if !spin.is_zero() && timeout != Some(Duration::ZERO) {
            let until = now + spin;
            while Instant::now() < until {
                self.driver.wait(Some(Duration::ZERO), events)?;
                if !events.is_empty() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        self.driver.wait(timeout, events)
    }

    fn on_event(&mut self, event: DriverEvent) -> io::Result<()> {
        match event {
            DriverEvent::Accepted { service, client: Ok(client) } if self.drain_deadline.is_none() => {
                self.open(service, client)
            }
            // Accepted after the stop began (already queued): reset, so
            // that the client never takes it for a clean end of stream.
            DriverEvent::Accepted { client: Ok(client), .. } => {
                tracing::debug!(worker = self.index, "client accepted while stopping; reset");
                socket::reset(&client);
                Ok(())
            }
            // The client gave up before we accepted it, or similar.
            DriverEvent::Accepted { client: Err(error), .. } if one_client(&error) => {
                tracing::debug!(worker = self.index, %error, "accept failed");
                Ok(())
            }
            // Out of descriptors or memory, or the listener itself in error:
            // accepting again at once would fail again (and spin), so wait.
            DriverEvent::Accepted { client: Err(error), .. } => {
                if self.warnings.accept.admit(self.now, self.index) {
                    if out_of_resources(&error) {
                        tracing::warn!(worker = self.index, %error, "cannot accept: out of resources; retrying shortly");
                    } else {
                        tracing::warn!(worker = self.index, %error, "cannot accept: the listener failed; retrying shortly");
                    }
                }
                self.pause_accepting();
                Ok(())
            }
            DriverEvent::Woken => {
                if self.control.stopping() {
                    self.on_stop()?;
                }
                self.on_verdicts()
            }
            DriverEvent::Ready { key, side, readiness } => self.on_ready(key, side, readiness),
            DriverEvent::Completed { key, direction, completed } => {
                if self.slot(key).is_some_and(|slot| slot.conn.state == ConnState::Relaying) {
                    return self.dispatch(key, Event::Completed(direction, completed));
                }
                // Reaped before its connection closed, seen after: the
                // buffer it names belongs to nobody now, and goes back to
                // the ring as the completion is dropped here.
                drop(completed);
                Ok(())
            }
            DriverEvent::Released(key) => {
                if self.slot(key).is_some() {
                    self.remove(key);
                }
                Ok(())
            }
        }
    }

    /// Passes on the router's verdicts (for connections still waiting).
    fn on_verdicts(&mut self) -> io::Result<()> {
        let mut verdicts = std::mem::take(&mut self.verdicts);
        self.mailbox.take(&mut verdicts);
        for (key, verdict) in verdicts.drain(..) {
            if self.slot(key).is_some_and(|slot| matches!(slot.conn.state, ConnState::Deciding { .. })) {
                self.decided(key, verdict)?;
            }
        }
        self.verdicts = verdicts;
        Ok(())
    }

    /// A verdict for a connection waiting for one.
    fn decided(&mut self, key: Key, verdict: Verdict) -> io::Result<()> {
        self.dispatch(key, Event::Decided(verdict))
    }

    fn slot(&self, key: Key) -> Option<&Slot> {
        self.conns.get(key.index as usize).filter(|slot| generation(slot.conn.id) == key.generation)
    }

    fn slot_mut(&mut self, key: Key) -> Option<&mut Slot> {
        self.conns.get_mut(key.index as usize).filter(|slot| generation(slot.conn.id) == key.generation)
    }

    /// A socket is ready: the connect goes on, or the directions waiting on
    /// that socket for that readiness run.
    fn on_ready(&mut self, key: Key, side: Side, readiness: Readiness) -> io::Result<()> {
        let Some(slot) = self.slot(key) else { return Ok(()) };
        for event in slot.conn.on_ready(side, readiness).into_iter().flatten() {
            if self.slot(key).is_none_or(|slot| slot.conn.state == ConnState::Closed) {
                break;
            }
            self.dispatch(key, event)?;
        }
        Ok(())
    }

    /// Fires the deadlines that are due.
    fn expire(&mut self, now: Instant) -> io::Result<()> {
        while let Some(&Reverse((deadline, key))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            // An entry of a state the connection has left is stale: the
            // state it is in now has an entry of its own, if it waits.
            if self.slot(key).is_some_and(|slot| slot.conn.state.deadline().is_some_and(|due| due <= now)) {
                self.dispatch(key, Event::DeadlinePassed)?;
            }
        }
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.accept_paused_until = None;
            // Waiting clients first; one that must wait again pauses anew.
            self.retry_waiting()?;
            if self.accept_paused_until.is_none() {
                self.driver.resume_accepting();
            }
        }
        if let (Some(every), Some(sweep)) = (self.sweep_every, self.idle_sweep) {
            if sweep <= now {
                self.idle_sweep = Some(now + every);
                let services = &self.config.services;
                let idle: Vec<(Key, Duration)> = self
                    .conns
                    .iter()
                    .filter(|(_, slot)| slot.conn.state == ConnState::Relaying)
                    .filter_map(|(index, slot)| {
                        let idle = services[slot.service].rules.idle_timeout?;
                        (slot.last_active + idle <= now)
                            .then(|| key_of(index, &slot.conn).map(|key| (key, idle)))
                    })
                    .collect::<io::Result<_>>()?;
                for (key, idle) in idle {
                    self.dispatch(key, Event::IdleFor(idle))?;
                }
            }
        }
        for throttle in self.warnings.all() {
            throttle.flush(now, self.index);
        }
        Ok(())
    }

    /// Resets a refused client, counts it, and logs why (throttled).
    fn refuse(&mut self, service: usize, client: &Socket, refusal: &Refusal) {
        socket::reset(client);
        self.stats.cell(self.index, service).refused(refusal.counted_as());
        if self.warnings.refused.admit(self.now, self.index) {
            let client = log::peer_name(client);
            let service = &self.config.services[service].name;
            let (cid, max) = match *refusal {
                Refusal::Cid(cid) => (Some(cid), None),
                Refusal::OverLimit(max) => (None, Some(max)),
                Refusal::Closed | Refusal::UnknownCid | Refusal::NoOriginalDestination => (None, None),
            };
            tracing::warn!(worker = self.index, %client, %service, cid, max, "{}", refusal.reason());
        }
    }

    /// A new client of `service`: refused, waiting, or a connection in a slot.
    fn open(&mut self, service: usize, client: Socket) -> io::Result<()> {
        let opened = self.opener.open(service, client, self.stats.active(service));
        self.settle(service, opened, self.now, false)
    }

    /// Carries out what became of a client of `service` accepted at
    /// `since` (`retried`: it waited already, and waits again first in line).
    fn settle(&mut self, service: usize, opened: Opened, since: Instant, retried: bool) -> io::Result<()> {
        match opened {
            Opened::Refused { client, refusal } => {
                self.refuse(service, &client, &refusal);
                Ok(())
            }
            Opened::NoUpstreamSocket { client, failure } if out_of_resources(failure.error()) => {
                // Accepting more now would only take more descriptors.
                self.pause_accepting();
                let waiter = Waiter { service, client, since };
                if retried {
                    self.waiting.put_back(waiter);
                    return Ok(());
                }
                match self.waiting.push(waiter) {
                    Ok(()) => {
                        if self.warnings.no_upstream_socket.admit(self.now, self.index) {
                            let error = failure.explained();
                            tracing::warn!(worker = self.index, %error, "cannot open an upstream socket; the client waits for one, accepting paused");
                        }
                        Ok(())
                    }
                    Err(Waiter { client, .. }) => {
                        self.give_up(service, &client);
                        self.no_upstream_socket(failure);
                        Ok(())
                    }
                }
            }
            Opened::NoUpstreamSocket { client, failure } => {
                self.give_up(service, &client);
                self.no_upstream_socket(failure);
                Ok(())
            }
            Opened::Connection(conn) => {
                self.stats.cell(self.index, service).opened();
                self.insert(service, conn)
            }
        }
    }

    /// A client that will not get an upstream socket: reset, and counted as
    /// accepted and failed for want of resources.
    fn give_up(&self, service: usize, client: &Socket) {
        socket::reset(client);
        let cell = self.stats.cell(self.index, service);
        cell.opened();
        cell.dropped(Failure::Resources);
    }

    /// Tries the waiting clients again, oldest first, until one must wait
    /// again; those that waited their connect timeout are given up.
    fn retry_waiting(&mut self) -> io::Result<()> {
        let expired = self.waiting.expired(self.now);
        if !expired.is_empty() {
            tracing::warn!(
                worker = self.index,
                clients = expired.len(),
                "no upstream socket within the connect timeout; clients reset"
            );
        }
        for Waiter { service, client, .. } in expired {
            self.give_up(service, &client);
        }
        while let Some(Waiter { service, client, since }) = self.waiting.next() {
            let before = self.waiting.len();
            let opened = self.opener.open(service, client, self.stats.active(service));
            self.settle(service, opened, since, true)?;
            if self.waiting.len() > before {
                // It waits again: so do the ones after it.
                break;
            }
        }
        Ok(())
    }

    /// Stops accepting for a while (out of descriptors or memory, or the
    /// listener in error): accepting again at once would fail again.
    fn pause_accepting(&mut self) {
        if self.accept_paused_until.is_none() {
            self.accept_paused_until = Some(Instant::now() + ACCEPT_RETRY);
            self.driver.pause_accepting();
        }
    }

    /// Out of descriptors, most likely: this client is given up on, the
    /// others are served. Logged (throttled).
    fn no_upstream_socket(&mut self, failure: NoSocket) {
        if self.warnings.no_upstream_socket.admit(self.now, self.index) {
            let error = failure.explained();
            tracing::warn!(worker = self.index, %error, "cannot open an upstream socket; client reset");
        }
    }

    /// Drops a connection's slot, closing its sockets.
    fn remove(&mut self, key: Key) {
        self.conns.remove(key.index as usize);
        self.freed = true;
    }

    /// Puts a new connection in a slot, registers its client socket (a
    /// client that cannot be watched is reset), and carries out its first
    /// action.
    fn insert(&mut self, service: usize, conn: Connection) -> io::Result<()> {
        let entry = self.conns.vacant_entry();
        let key = key_of(entry.key(), &conn)?;
        let slot = entry.insert(Slot { conn, service, last_active: self.now });
        if let Err(e) = self.driver.register(key, &slot.conn.client) {
            return self.dispatch(key, Event::DriverFailed(ConnError::new(Side::Client, Op::Read, e)));
        }
        let first = slot.conn.first_action();
        self.carry_out(key, first, [0; 2])
    }

    /// Opens the upstream socket for the address the router allowed and
    /// starts its connect.
    fn dial(&mut self, key: Key, address: SockAddr) -> io::Result<()> {
        let slot = &mut self.conns[key.index as usize];
        match self.opener.dial(slot.service, address) {
            Ok(dial) => {
                slot.conn.dialed(dial);
                self.start_connect(key)
            }
            Err(failure) => {
                slot.conn.give_up();
                self.stats.cell(self.index, slot.service).dropped(Failure::Resources);
                if out_of_resources(failure.error()) {
                    self.pause_accepting();
                }
                self.no_upstream_socket(failure);
                self.forget(key)
            }
        }
    }

    /// Gives the driver the connection's upstream socket and starts its connect.
    fn start_connect(&mut self, key: Key) -> io::Result<()> {
        let slot = &mut self.conns[key.index as usize];
        let registered = match slot.conn.socket(Side::Upstream) {
            Some(upstream) => self.driver.add_upstream(key, upstream),
            None => Ok(()),
        };
        if let Err(e) = registered {
            return self.dispatch(key, Event::DriverFailed(ConnError::new(Side::Upstream, Op::Connect, e)));
        }
        let mut ctx = Context::new(&mut self.pools, self.driver.buffer_ring(), key);
        let action = slot.conn.start(&mut ctx);
        let moved = ctx.moved;
        self.carry_out(key, action, moved)
    }

    /// Drops a connection that never started (its sockets close now).
    fn forget(&mut self, key: Key) -> io::Result<()> {
        if self.driver.release(key)? {
            self.remove(key);
        }
        Ok(())
    }

    /// Runs a connection's state machine on `event` and carries out its answer.
    fn dispatch(&mut self, key: Key, event: Event) -> io::Result<()> {
        let mut ctx = Context::new(&mut self.pools, self.driver.buffer_ring(), key);
        let action = self.conns[key.index as usize].conn.handle(event, &mut ctx);
        let moved = ctx.moved;
        self.carry_out(key, action, moved)
    }

    fn carry_out(&mut self, key: Key, action: Action, moved: [u64; 2]) -> io::Result<()> {
        let slot = &mut self.conns[key.index as usize];
        let cell = self.stats.cell(self.index, slot.service);
        cell.moved(moved[0], moved[1]);
        if let Some(took) = slot.conn.take_connect_time() {
            cell.connected(took);
        }
        slot.conn.note_waits(&action);
        if moved != [0, 0] {
            slot.last_active = self.now;
        }
        let result = self.act(key, action);
        // After the action: a state it moved on from (a connect done at
        // once, a decision made from the cache) leaves no deadline behind.
        if let Some(deadline) = self.slot_mut(key).and_then(|slot| slot.conn.take_new_deadline()) {
            self.deadlines.push(Reverse((deadline, key)));
        }
        result
    }

    /// What the worker does for a connection's action.
    fn act(&mut self, key: Key, action: Action) -> io::Result<()> {
        let slot = &mut self.conns[key.index as usize];
        match action {
            Action::AwaitHead => self.driver.watch(key, &slot.conn.client, Side::Client, Readiness::READABLE),
            Action::Decide(destination) => {
                let (service, client) = (slot.service, Peer::of(&slot.conn.client));
                let Some(router) = self.router.clone() else { return Ok(()) };
                match router.decide_now(service, client, &destination) {
                    Some(verdict) => self.decided(key, verdict),
                    None => {
                        router.ask(Job { worker: self.index, key, service, client, destination });
                        Ok(())
                    }
                }
            }
            Action::StartConnect => self.start_connect(key),
            Action::Dial(address) => self.dial(key, address),
            Action::AwaitConnect => match slot.conn.socket(Side::Upstream) {
                Some(upstream) => self.driver.watch(key, upstream, Side::Upstream, Readiness::WRITABLE),
                None => Ok(()),
            },
            Action::Wait(waits) => {
                for (direction, wait) in Direction::BOTH.into_iter().zip(waits) {
                    let Some(wait) = wait else { continue };
                    let (side, wanted) = match wait {
                        Wait::Readable => (direction.source(), Readiness::READABLE),
                        Wait::Writable => (direction.destination(), Readiness::WRITABLE),
                        Wait::Yield => {
                            self.ready.push((key, direction));
                            continue;
                        }
                        Wait::Finished | Wait::Completion => continue,
                    };
                    if let Some(socket) = slot.conn.socket(side) {
                        self.driver.watch(key, socket, side, wanted)?;
                    }
                }
                Ok(())
            }
            Action::Close(ending) => {
                self.count_closed(key, &ending);
                if self.driver.release(key)? {
                    self.remove(key);
                }
                Ok(())
            }
        }
    }

    /// Counts a closed connection and logs it.
    fn count_closed(&mut self, key: Key, ending: &Ending) {
        let Slot { conn, service, .. } = &self.conns[key.index as usize];
        let lasted = conn.opened.elapsed();
        self.stats.cell(self.index, *service).closed(failure_of(ending), lasted);
        let service = &self.config.services[*service];
        log::closed(conn, service, ending, lasted, &mut self.warnings, self.now, self.index);
    }

    /// Stop accepting; open connections get the drain time to finish, or
    /// none once a second stop cut it short.
    fn on_stop(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.config.drain_timeout);
            tracing::debug!(worker = self.index, open = self.conns.len(), "stopping: no new connections");
            self.driver.stop_accepting()?;
        }
        if self.control.cutting() {
            self.drain_deadline = Some(now);
        }
        Ok(())
    }

    /// At the end of the drain time, connections still open are reset and
    /// counted as failed, cut by the drain.
    fn abandon(&mut self) {
        let open = self.conns.iter().filter(|(_, slot)| slot.conn.state != ConnState::Closed);
        let mut count = 0;
        for (_, slot) in open {
            slot.conn.reset();
            self.stats
                .cell(self.index, slot.service)
                .closed(Some(Failure::Drain), slot.conn.opened.elapsed());
            count += 1;
        }
        for Waiter { service, client, .. } in self.waiting.all() {
            socket::reset(&client);
            let cell = self.stats.cell(self.index, service);
            cell.opened();
            cell.closed(Some(Failure::Drain), Duration::ZERO);
            count += 1;
        }
        if count > 0 {
            tracing::info!(worker = self.index, open = count, "drain over; resetting open connections");
        }
    }
}

/// How often to look for idle connections: a quarter of the timeout, so a
/// connection is reset between 1 and 1.25 times the timeout after its last byte.
fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_millis(10))
}

/// The driver's key for the connection in slot `index`.
fn key_of(index: usize, conn: &Connection) -> io::Result<Key> {
    Ok(Key { index: u32::try_from(index).map_err(io::Error::other)?, generation: generation(conn.id) })
}

/// The generation of a connection in its key: the low 24 bits of its id
/// (all a driver's tag has room for; enough to tell reused slots apart).
fn generation(id: u64) -> u32 {
    u32::try_from(id & 0xff_ffff).unwrap_or_default()
}
