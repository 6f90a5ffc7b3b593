//! The worker loop over a scripted driver: each test hands the worker
//! batches of events as a driver would, on real sockets (loopback TCP
//! clients, a Unix listener upstream), and looks at what the worker asked
//! the driver, what reached the peers and what was counted.
//!
//! Each test names the change to the worker it catches; each was seen to
//! fail with that change applied.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::config::Upstream;
use crate::conn::DECISION_TIMEOUT;
use crate::driver::buffers::Returns;
use crate::endpoint::{Endpoint, Host};
use crate::route::{Decision, Outcome, Route, RouteCounters, RouteKind};
use crate::sys;
use crate::target::Target;
use crate::vocab::Trigger;
use crate::vocab::{BufferSlice, Completed};
use std::rc::Rc;

/// The longest a scripted idle wait may sleep: a worker that asks for more
/// (or for no timeout at all) would hang a real driver's test.
const IDLE_BOUND: Duration = Duration::from_secs(2);
/// How long a peer waits for bytes the worker should have relayed.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// What the fake answers once its script is over: the loop ends with it.
const SCRIPT_ENDED: &str = "script ended";

/// What the worker asked of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Register(Key),
    AddUpstream(Key),
    Watch(Key, Side, Readiness),
    Release(Key),
    StopAccepting,
    PauseAccepting,
    ResumeAccepting,
    Wait(Option<Duration>),
}

/// One wait's worth of the script.
enum Step {
    /// Report these events at once.
    Events(Vec<DriverEvent>),
    /// Nothing happens: sleep for the timeout the worker asked for.
    Idle,
    /// Do something (stop the relay, say), then report the events it returns.
    Run(Box<dyn FnOnce() -> Vec<DriverEvent>>),
}

/// A driver whose events are scripted; it records every call.
struct Fake {
    script: VecDeque<Step>,
    calls: Vec<(Instant, Call)>,
    /// Answer of `release`: `true` as epoll, `false` as io_uring with
    /// operations in flight (the test then reports `Released`).
    release_at_once: bool,
    /// `add_upstream` fails (as epoll's registration can, out of memory).
    refuse_upstream: bool,
}

impl Fake {
    fn record(&mut self, call: Call) {
        self.calls.push((Instant::now(), call));
    }
}

impl Driver for Fake {
    fn trigger(&self) -> Trigger {
        Trigger::Level
    }

    fn register(&mut self, key: Key, _client: &Socket) -> io::Result<()> {
        self.record(Call::Register(key));
        Ok(())
    }

    fn add_upstream(&mut self, key: Key, _upstream: &Socket) -> io::Result<()> {
        self.record(Call::AddUpstream(key));
        match self.refuse_upstream {
            true => Err(io::Error::from_raw_os_error(libc::ENOMEM)),
            false => Ok(()),
        }
    }

    fn watch(&mut self, key: Key, _socket: &Socket, side: Side, wanted: Readiness) -> io::Result<()> {
        self.record(Call::Watch(key, side, wanted));
        Ok(())
    }

    fn release(&mut self, key: Key) -> io::Result<bool> {
        self.record(Call::Release(key));
        Ok(self.release_at_once)
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        self.record(Call::StopAccepting);
        Ok(())
    }

    fn pause_accepting(&mut self) {
        self.record(Call::PauseAccepting);
    }

    fn resume_accepting(&mut self) {
        self.record(Call::ResumeAccepting);
    }

    fn buffer_ring(&mut self) -> Option<&mut dyn crate::vocab::BufferRingOps> {
        None
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<DriverEvent>) -> io::Result<()> {
        self.record(Call::Wait(timeout));
        match self.script.pop_front() {
            None => Err(io::Error::other(SCRIPT_ENDED)),
            Some(Step::Events(batch)) => {
                events.extend(batch);
                Ok(())
            }
            Some(Step::Idle) => {
                let timeout = timeout.expect("the worker would wait forever");
                assert!(timeout <= IDLE_BOUND, "the worker would wait {timeout:?}");
                std::thread::sleep(timeout);
                Ok(())
            }
            Some(Step::Run(run)) => {
                events.extend(run());
                Ok(())
            }
        }
    }
}

/// A worker over the fake driver, serving one service whose upstream is a
/// Unix listener of the test's.
struct Harness {
    worker: Worker<Fake>,
    control: Arc<Control>,
    stats: Arc<Stats>,
    upstream: UnixListener,
    dir: PathBuf,
}

/// A connection the worker opened, with both peers.
struct Conn {
    key: Key,
    client: TcpStream,
    upstream: UnixStream,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    fn new(change: impl FnOnce(&mut RelayConfig)) -> Harness {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("worker-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upstream.sock");
        let upstream = UnixListener::bind(&path).unwrap();
        let listen = Endpoint::Tcp { host: Host::Ip([127, 0, 0, 1].into()), port: 0 };
        let mut config = RelayConfig::new(listen, Target::fixed(&Endpoint::Unix { path }).unwrap());
        change(&mut config);
        let eventfd = || File::from(sys::eventfd().unwrap());
        let control = Arc::new(Control::new(Vec::new()));
        let stats = Arc::new(Stats::new(vec!["test".into()], 1));
        let setup = WorkerSetup {
            index: 0,
            listeners: Vec::new(),
            wake: eventfd(),
            config: Arc::new(config),
            stats: Arc::clone(&stats),
            control: Arc::clone(&control),
            mailbox: Arc::new(Mailbox::new(eventfd())),
            router: None,
        };
        let fake = Fake {
            script: VecDeque::new(),
            calls: Vec::new(),
            release_at_once: true,
            refuse_upstream: false,
        };
        Harness { worker: Worker::new(fake, setup), control, stats, upstream, dir }
    }

    /// Runs the loop over `steps` until the script is over.
    fn run(&mut self, steps: Vec<Step>) {
        let ended = self.run_to_end(steps).expect_err("the loop ended before its script");
        assert_eq!(ended.to_string(), SCRIPT_ENDED, "the loop failed");
    }

    /// Runs the loop over `steps` until it returns.
    fn run_to_end(&mut self, steps: Vec<Step>) -> io::Result<()> {
        self.worker.driver.script.extend(steps);
        let result = self.worker.run();
        self.worker.driver.script.clear();
        result
    }

    /// Calls recorded from `from` on (an index into the calls so far).
    fn calls_since(&self, from: usize) -> Vec<Call> {
        self.worker.driver.calls[from..].iter().map(|(_, call)| *call).collect()
    }

    fn calls(&self) -> Vec<Call> {
        self.calls_since(0)
    }

    fn registered(&self) -> Vec<Key> {
        let keys = self.calls().into_iter().filter_map(|call| match call {
            Call::Register(key) => Some(key),
            _ => None,
        });
        keys.collect()
    }

    /// The next connection the worker made to the upstream.
    fn upstream_peer(&self) -> UnixStream {
        self.upstream.set_nonblocking(true).unwrap();
        let (peer, _) = self.upstream.accept().expect("the worker connected upstream");
        peer.set_nonblocking(false).unwrap();
        peer.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
        peer
    }

    /// Opens a connection through the worker.
    fn open(&mut self) -> Conn {
        let (accepted, client) = client();
        self.run(vec![Step::Events(vec![accepted])]);
        let key = *self.registered().last().unwrap();
        assert!(self.worker.slot(key).is_some_and(|slot| slot.conn.state == ConnState::Relaying));
        Conn { key, client, upstream: self.upstream_peer() }
    }
}

/// A client as the driver reports it accepted (loopback TCP), and its peer.
fn client() -> (DriverEvent, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    (DriverEvent::Accepted { service: 0, client: Ok(Socket::from(ours)) }, peer)
}

/// A stop (`Control::stop` or `Control::stop_now`) and the wake-up it causes.
fn stop(control: &Arc<Control>, how: fn(&Control)) -> Step {
    let control = Arc::clone(control);
    Step::Run(Box::new(move || {
        how(&control);
        vec![DriverEvent::Woken]
    }))
}

fn readable(key: Key, side: Side) -> DriverEvent {
    DriverEvent::Ready { key, side, readiness: Readiness::READABLE }
}

/// Ends a connection cleanly: the client's EOF, then the upstream closes;
/// returns the events that tell the worker.
fn finish(conn: Conn) -> (Vec<DriverEvent>, TcpStream) {
    conn.client.shutdown(Shutdown::Write).unwrap();
    drop(conn.upstream);
    (vec![readable(conn.key, Side::Client), readable(conn.key, Side::Upstream)], conn.client)
}

/// Reads exactly `expected.len()` bytes from `peer` and compares.
fn receives(peer: &mut impl Read, expected: &[u8]) {
    let mut got = vec![0; expected.len()];
    peer.read_exact(&mut got).expect("the relayed bytes arrive");
    assert_eq!(got, expected);
}

/// Nothing waits to be read on `peer` (it stays open).
fn nothing_to_read(peer: &UnixStream) {
    peer.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match (&*peer).read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("expected nothing to read, got {other:?}"),
    }
    peer.set_nonblocking(false).unwrap();
}

/// The worker reset this client's connection (rather than ending it cleanly).
fn was_reset(peer: &mut TcpStream) {
    let mut rest = Vec::new();
    match peer.read_to_end(&mut rest) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?} after {rest:?}"),
    }
}

fn watches_of(calls: &[Call], key: Key) -> usize {
    calls.iter().filter(|call| matches!(call, Call::Watch(k, ..) if *k == key)).count()
}

/// Readiness reported for a connection that closed, its slot taken since by
/// a new one, does not run the new connection.
/// Catches: `slot()` without its generation check (the new connection's
/// bytes move on the old one's event).
#[test]
fn readiness_with_a_stale_generation_is_ignored() {
    let mut h = Harness::new(|_| {});
    let old = h.open();
    let old_key = old.key;
    let (closing, _) = finish(old);
    h.run(vec![Step::Events(closing)]);
    assert!(h.worker.conns.is_empty(), "the first connection closed");
    let mut new = h.open();
    assert_eq!(new.key.index, old_key.index, "the slot is reused");
    assert_ne!(new.key.generation, old_key.generation);

    new.client.write_all(b"hello").unwrap();
    h.run(vec![Step::Events(vec![readable(old_key, Side::Client)])]);
    nothing_to_read(&new.upstream);
    h.run(vec![Step::Events(vec![readable(new.key, Side::Client)])]);
    receives(&mut new.upstream, b"hello");
}

/// A completion for a connection that closed earlier in the same batch,
/// its slot taken in that batch by a new connection, is dropped.
/// Catches: the `Completed` arm looking the slot up by index alone
/// (`self.conns.get(key.index)` instead of `self.slot(key)`), or `slot()`
/// without its generation check: the new connection's direction then runs
/// and waits once more.
#[test]
fn a_completion_after_its_connection_closed_is_dropped() {
    let mut h = Harness::new(|_| {});
    let old = h.open();
    let old_key = old.key;
    let (mut batch, _old_client) = finish(old);
    let (accepted, _new_client) = client();
    batch.push(accepted);
    let returns = Rc::new(Returns::default());
    let slice = BufferSlice { buffer: returns.lend_for_test(3), offset: 0, len: 5 };
    let completed = Completed::Sent { result: 5, slice };
    batch.push(DriverEvent::Completed { key: old_key, direction: Direction::ToUpstream, completed });
    let from = h.worker.driver.calls.len();
    h.run(vec![Step::Events(batch)]);

    let new_key = *h.registered().last().unwrap();
    assert_eq!(new_key.index, old_key.index, "the slot was reused in the batch");
    assert_ne!(new_key, old_key);
    let calls = h.calls_since(from);
    // The new connection's start: each direction waits to read, once; the
    // slot is watched for nothing else.
    assert_eq!(watches_of(&calls, new_key), 2, "{calls:?}");
    let on_the_slot =
        calls.iter().filter(|call| matches!(call, Call::Watch(k, ..) if k.index == new_key.index));
    assert_eq!(on_the_slot.count(), 2, "{calls:?}");
    assert_eq!(h.worker.conns.len(), 1);
    assert_eq!(returns.take(), [3], "the stray completion's buffer went back to the ring");
}

/// With io_uring's answer to `release` (operations still in flight), the
/// sockets stay open until the driver reports `Released`; a late
/// `Released` for a slot taken since leaves the new connection alone.
/// Catches: removing the slot on close whatever `release` answered (the
/// client sees its EOF before `Released`), and the `Released` arm removing
/// the slot without the generation check (the new connection is gone).
#[test]
fn sockets_close_once_released_and_a_late_release_spares_the_slot() {
    let mut h = Harness::new(|_| {});
    h.worker.driver.release_at_once = false;
    let old = h.open();
    let old_key = old.key;
    let (closing, mut old_client) = finish(old);
    h.run(vec![Step::Events(closing)]);
    assert!(h.calls().contains(&Call::Release(old_key)));
    assert_eq!(h.worker.conns.len(), 1, "the slot is kept until released");
    old_client.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match old_client.read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the client's socket closed before its release: {other:?}"),
    }
    h.run(vec![Step::Events(vec![DriverEvent::Released(old_key)])]);
    assert!(h.worker.conns.is_empty());
    old_client.set_nonblocking(false).unwrap();
    assert_eq!(old_client.read(&mut byte).unwrap(), 0, "closed once released");

    let mut new = h.open();
    assert_eq!(new.key.index, old_key.index);
    h.run(vec![Step::Events(vec![DriverEvent::Released(old_key)])]);
    assert_eq!(h.worker.conns.len(), 1, "a stale release removed the new connection");
    new.client.write_all(b"still here").unwrap();
    h.run(vec![Step::Events(vec![readable(new.key, Side::Client)])]);
    receives(&mut new.upstream, b"still here");
}

/// A direction that yielded (its run spent the budget, `Wait::Yield`) runs
/// again without any event, right after the next batch's events, and the
/// worker does not sleep meanwhile.
/// Catches: `carry_out` not queueing a `Wait::Yield` (the bytes never
/// move); `wait` ignoring the queue (its timeout is not zero); the loop
/// running the queue before the batch's events (the order of the watches).
#[test]
fn a_direction_that_yielded_runs_again_after_the_events() {
    let mut h = Harness::new(|_| {});
    let mut yielded = h.open();
    let mut other = h.open();
    yielded.client.write_all(b"queued").unwrap();
    other.client.write_all(b"ready").unwrap();
    // What a pump answers once it moved its budget with work left.
    h.worker.carry_out(yielded.key, Action::Wait([Some(Wait::Yield), None]), [0, 0]).unwrap();
    let from = h.worker.driver.calls.len();
    h.run(vec![Step::Events(vec![readable(other.key, Side::Client)])]);

    receives(&mut other.upstream, b"ready");
    receives(&mut yielded.upstream, b"queued");
    let calls = h.calls_since(from);
    assert_eq!(calls[0], Call::Wait(Some(Duration::ZERO)), "a queued direction: no sleep");
    let watched =
        |key| calls.iter().position(|call| *call == Call::Watch(key, Side::Client, Readiness::READABLE));
    let (other_at, yielded_at) = (watched(other.key), watched(yielded.key));
    assert!(other_at.is_some() && yielded_at.is_some(), "{calls:?}");
    assert!(other_at < yielded_at, "the yielded direction ran before the batch's events: {calls:?}");
    assert!(h.worker.ready.is_empty());
}

/// On a stop the worker stops accepting, resets a client accepted after
/// it, lets the open connection finish (its bytes still move) and returns
/// once it closed, with nothing counted as cut by the drain.
/// Catches: `on_stop` not calling `stop_accepting`; a client accepted
/// while stopping being served (`open` without the drain check); the drain
/// ending at the stop (`drain_deadline = Some(now)` always): the open
/// connection is then counted as `Failure::Drain`; the loop not returning
/// once the last connection closed (the script runs out first).
#[test]
fn a_stop_stops_accepting_and_lets_open_connections_finish() {
    let mut h = Harness::new(|config| config.drain_timeout = Duration::from_secs(60));
    let mut open = h.open();
    let (late, mut late_client) = client();
    let stop = stop(&h.control, Control::stop);
    open.client.write_all(b"after the stop").unwrap();
    let key = open.key;
    h.run(vec![stop, Step::Events(vec![late, readable(key, Side::Client)])]);
    receives(&mut open.upstream, b"after the stop");
    let (closing, _) = finish(open);
    h.run_to_end(vec![Step::Events(closing)]).expect("the drain ends once the last connection closed");

    let calls = h.calls();
    assert_eq!(calls.iter().filter(|call| **call == Call::StopAccepting).count(), 1);
    assert_eq!(h.registered(), vec![key], "a client accepted while stopping was served");
    was_reset(&mut late_client);
    let stats = h.stats.snapshot();
    assert_eq!((stats.accepted, stats.active, stats.failed()), (1, 0, 0), "{stats:?}");
}

/// A connection still open when the drain time is over is reset and
/// counted as cut by the drain; the worker sleeps until then, not longer.
/// Catches: `wait` leaving the drain deadline out of its timeout (the fake
/// refuses to wait forever); `abandon` not counting `Failure::Drain`;
/// `abandon` not resetting (the client reads a clean EOF).
#[test]
fn the_drain_time_over_resets_what_is_still_open() {
    let drain = Duration::from_millis(150);
    let mut h = Harness::new(|config| config.drain_timeout = drain);
    let mut open = h.open();
    let stop = stop(&h.control, Control::stop);
    let started = Instant::now();
    h.run_to_end(vec![stop, Step::Idle, Step::Idle, Step::Idle]).expect("the drain ends");
    assert!(started.elapsed() >= drain, "ended after {:?}", started.elapsed());
    assert_eq!(h.stats.snapshot().failed_by(Failure::Drain), 1);
    drop(h);
    was_reset(&mut open.client);
}

/// A second stop cuts the drain short: the open connection is reset at
/// once and counted as cut by the drain.
/// Catches: `on_stop` ignoring `cutting` (the worker goes on waiting for
/// the 60 s drain and the script runs out).
#[test]
fn a_second_stop_cuts_the_drain() {
    let mut h = Harness::new(|config| config.drain_timeout = Duration::from_secs(60));
    let mut open = h.open();
    let (stop, cut) = (stop(&h.control, Control::stop), stop(&h.control, Control::stop_now));
    h.run_to_end(vec![stop, cut]).expect("the cut ends the drain");
    let stats = h.stats.snapshot();
    assert_eq!((stats.failed_by(Failure::Drain), stats.failed()), (1, 1), "{stats:?}");
    drop(h);
    was_reset(&mut open.client);
}

/// Out of descriptors (EMFILE), the worker pauses accepting, sleeps no
/// longer than the retry pause, and resumes once it passed; then clients
/// are served again.
/// Catches: not calling `pause_accepting`; `expire` not resuming (or
/// resuming before the pause passed); `wait` leaving the pause out of its
/// timeout (the fake refuses to wait forever); `out_of_resources` without
/// EMFILE.
#[test]
fn running_out_of_descriptors_pauses_accepting_until_the_retry() {
    let mut h = Harness::new(|_| {});
    let emfile =
        DriverEvent::Accepted { service: 0, client: Err(io::Error::from_raw_os_error(libc::EMFILE)) };
    h.run(vec![Step::Events(vec![emfile]), Step::Idle]);
    let at = |wanted: Call| h.worker.driver.calls.iter().find(|(_, call)| *call == wanted).map(|(at, _)| *at);
    let paused = at(Call::PauseAccepting).expect("paused");
    let resumed = at(Call::ResumeAccepting).expect("resumed");
    assert!(resumed.duration_since(paused) >= ACCEPT_RETRY, "resumed after {:?}", resumed - paused);
    let calls = h.calls();
    let slept = calls.iter().find_map(|call| match call {
        Call::Wait(Some(timeout)) if !timeout.is_zero() => Some(*timeout),
        _ => None,
    });
    assert!(slept.is_some_and(|t| t <= ACCEPT_RETRY), "{calls:?}");
    h.open();
}

/// A failed accept that is about one client (it gave up first) does not
/// pause accepting.
/// Catches: `one_client` missing ECONNABORTED (every error pausing).
#[test]
fn a_failed_accept_of_one_client_does_not_pause() {
    let mut h = Harness::new(|_| {});
    let aborted =
        DriverEvent::Accepted { service: 0, client: Err(io::Error::from_raw_os_error(libc::ECONNABORTED)) };
    h.run(vec![Step::Events(vec![aborted])]);
    assert!(!h.calls().contains(&Call::PauseAccepting));
    assert_eq!(h.worker.accept_paused_until, None);
}

/// A listener in error (EINVAL: no longer listening) pauses accepting like
/// running out of descriptors: retried at once, it would fail at once again
/// and the worker would spin.
/// Catches: errors that are neither about resources nor about one client
/// taken for one client's (accepting again at once).
#[test]
fn a_listener_in_error_pauses_accepting() {
    let mut h = Harness::new(|_| {});
    let einval =
        DriverEvent::Accepted { service: 0, client: Err(io::Error::from_raw_os_error(libc::EINVAL)) };
    h.run(vec![Step::Events(vec![einval])]);
    assert!(h.calls().contains(&Call::PauseAccepting), "{:?}", h.calls());
    assert!(h.worker.accept_paused_until.is_some());
}

/// A connection's generation fits the 24 bits both drivers' packings keep
/// for it (see the property tests in `driver/uring.rs` and `driver/epoll.rs`).
#[test]
fn generations_fit_in_24_bits() {
    for id in [0, 1, 0xff_ffff, 0x100_0000, (1 << 48) + 5, u64::MAX] {
        assert!(generation(id) < 1 << 24, "{id:#x}");
        assert_eq!(u64::from(generation(id)), id & 0xff_ffff);
    }
}

/// The calls of the driver but its waits.
fn without_waits(calls: Vec<Call>) -> Vec<Call> {
    calls.into_iter().filter(|call| !matches!(call, Call::Wait(_))).collect()
}

/// A fixed target's plan opens the upstream socket with the connection: the
/// driver gets the client, then the upstream, then the connect starts (a
/// Unix upstream connects at once: relaying, with nothing left on a deadline).
#[test]
fn a_fixed_plan_registers_the_client_then_the_upstream_and_connects() {
    let mut h = Harness::new(|_| {});
    let mut conn = h.open();
    let calls = without_waits(h.calls());
    assert_eq!(calls[..2], [Call::Register(conn.key), Call::AddUpstream(conn.key)], "{calls:?}");
    assert!(h.worker.deadlines.is_empty(), "a connect done at once leaves no deadline behind");
    conn.client.write_all(b"fixed").unwrap();
    h.run(vec![Step::Events(vec![readable(conn.key, Side::Client)])]);
    receives(&mut conn.upstream, b"fixed");
}

/// A route's plan has no upstream socket until the router allows the
/// destination: the head is watched, each state's deadline is scheduled
/// once (the head's, the decision's, the connect's), and the verdict dials
/// the address it checked; the client is answered `200` and the route
/// counts the decision.
#[test]
fn a_routed_plan_gets_its_upstream_only_once_allowed() {
    let (mut h, counters) = routed_harness();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let (accepted, mut client) = client();
    h.run(vec![Step::Events(vec![accepted])]);
    let key = *h.registered().last().unwrap();
    let calls = without_waits(h.calls());
    assert_eq!(calls, [Call::Register(key), Call::Watch(key, Side::Client, Readiness::READABLE)]);
    assert!(matches!(h.worker.slot(key).unwrap().conn.state, ConnState::ReadingHead { .. }));
    assert_eq!(h.worker.deadlines.len(), 1, "the head's deadline");

    client.write_all(b"CONNECT upstream.test:443 HTTP/1.1\r\n\r\n").unwrap();
    h.run(vec![Step::Events(vec![readable(key, Side::Client)])]);
    assert!(matches!(h.worker.slot(key).unwrap().conn.state, ConnState::Deciding { .. }));
    assert_eq!(h.worker.deadlines.len(), 2, "the decision's deadline too");
    assert!(!without_waits(h.calls()).contains(&Call::AddUpstream(key)), "no upstream before the verdict");

    let verdict = Verdict::Allowed { address: target.local_addr().unwrap(), rule: "rule".into() };
    h.worker.decided(key, verdict).unwrap();
    assert!(without_waits(h.calls()).contains(&Call::AddUpstream(key)));
    assert_eq!((counters.decisions(Decision::Allowed), counters.by_rule()["rule"]), (1, 1));
    let writable = DriverEvent::Ready { key, side: Side::Upstream, readiness: Readiness::WRITABLE };
    h.run(vec![Step::Events(vec![writable])]);
    assert_eq!(h.worker.slot(key).unwrap().conn.state, ConnState::Relaying);
    let mut answer = [0u8; 39];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 Connection established\r\n\r\n");
    let _accepted_upstream = target.accept().unwrap();
}

/// A worker serving one routed (CONNECT) service, and its route's counters.
fn routed_harness() -> (Harness, Arc<RouteCounters>) {
    let route = Route::new(RouteKind::Connect, Arc::new(|_: &crate::route::Asked<'_>, _| None));
    let counters = Arc::clone(&route.counters);
    let h = Harness::new(|config| config.services[0].upstream = Upstream::Routed(route));
    (h, counters)
}

/// A routed client whose head is read (the router is asked: this harness
/// has none, so it stays deciding); its key.
fn deciding(h: &mut Harness, client: &mut TcpStream, accepted: DriverEvent) -> Key {
    h.run(vec![Step::Events(vec![accepted])]);
    let key = *h.registered().last().unwrap();
    client.write_all(b"CONNECT upstream.test:443 HTTP/1.1\r\n\r\n").unwrap();
    h.run(vec![Step::Events(vec![readable(key, Side::Client)])]);
    assert!(matches!(h.worker.slot(key).unwrap().conn.state, ConnState::Deciding { .. }));
    key
}

/// A socket the driver will not watch fails its connection as any failure
/// does, once: the routed client is told (`502`, not a reset), and with the
/// release still pending (io_uring), the deadlines that come up later do
/// nothing.
/// Catches: the worker closing the connection behind the state machine's
/// back (its state, and so its deadlines, left as they were).
#[test]
fn a_socket_the_driver_will_not_watch_fails_its_connection_once() {
    let (mut h, counters) = routed_harness();
    h.worker.driver.refuse_upstream = true;
    h.worker.driver.release_at_once = false;
    let (accepted, mut client) = client();
    let key = deciding(&mut h, &mut client, accepted);
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let verdict = Verdict::Allowed { address: target.local_addr().unwrap(), rule: "rule".into() };
    h.worker.decided(key, verdict).unwrap();
    assert_eq!(h.worker.slot(key).unwrap().conn.state, ConnState::Closed, "the release is pending");
    h.worker.expire(Instant::now() + Duration::from_secs(3600)).unwrap();
    let stats = h.stats.snapshot();
    // The driver's ENOMEM is the relay's shortage, not the upstream's.
    assert_eq!((stats.failed_by(Failure::Resources), stats.failed()), (1, 1), "{stats:?}");
    assert_eq!(counters.decisions(Decision::Allowed), 1);
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
}

/// A router's refusal for lack of an answer counts as `unresolved`, and so
/// does a decision that did not come in time.
#[test]
fn no_answer_and_no_decision_in_time_count_as_unresolved() {
    let (mut h, counters) = routed_harness();
    let (accepted, mut first) = client();
    let key = deciding(&mut h, &mut first, accepted);
    let verdict = Verdict::Refused { outcome: Outcome::LookupFailed, reason: "SERVFAIL".into() };
    h.worker.decided(key, verdict).unwrap();
    let (accepted, mut late) = client();
    let key = deciding(&mut h, &mut late, accepted);
    // Its decision deadline, as if the 8 s had passed.
    h.worker.conns[key.index as usize].conn.state = ConnState::Deciding { deadline: Instant::now() };
    h.worker.expire(Instant::now() + DECISION_TIMEOUT).unwrap();
    assert_eq!(counters.decisions(Decision::Unresolved), 2);
    assert_eq!(h.stats.snapshot().failed_by(Failure::Route), 2);
}

/// An ending for want of descriptors or memory is the relay's shortage
/// (`resources`), whichever socket the call was on; other failures keep
/// their side's cause.
/// Catches: a pipe that could not be made for the client's direction
/// counted as `failed{client}` (as the soak found).
#[test]
fn a_shortage_is_counted_as_resources_whichever_side() {
    let failed = |side, op, errno| {
        failure_of(&Ending::Failed(ConnError::new(side, op, io::Error::from_raw_os_error(errno))))
    };
    for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
        assert_eq!(failed(Side::Client, Op::Read, errno), Some(Failure::Resources));
        assert_eq!(failed(Side::Upstream, Op::Write, errno), Some(Failure::Resources));
        assert_eq!(failed(Side::Upstream, Op::Connect, errno), Some(Failure::Resources));
    }
    assert_eq!(failed(Side::Client, Op::Read, libc::ECONNRESET), Some(Failure::Client));
    assert_eq!(failed(Side::Upstream, Op::Read, libc::ECONNRESET), Some(Failure::Upstream));
    assert_eq!(failed(Side::Upstream, Op::Connect, libc::ECONNREFUSED), Some(Failure::Connect));
}
