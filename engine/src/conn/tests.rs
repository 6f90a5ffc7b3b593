//! Every transition, on real sockets put in each state: Unix pairs for
//! relaying, a loopback listener that never accepts for a connect in
//! progress, a closed port for a refused connect.

use super::*;
use crate::driver::buffers::Returns;
use crate::endpoint::Host;
use crate::route::{Outcome, Route};
use crate::vocab::BufferSlice;
use socket2::{Domain, Type};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

const FAR: Duration = Duration::from_secs(60);

fn io(pools: &mut Pools) -> Context<'_> {
    Context::new(pools, None, Key { index: 0, generation: 0 })
}

fn pair() -> (Socket, UnixStream) {
    let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
    ours.set_nonblocking(true).unwrap();
    (ours, UnixStream::from(std::os::fd::OwnedFd::from(theirs)))
}

fn tcp_socket() -> Socket {
    Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).unwrap()
}

/// A fixed-target connection whose `upstream` socket will connect to
/// `address` by `deadline` ([`Connection::start`]), with readiness reported
/// as `trigger` says; and the client's peer.
fn connecting_as(
    trigger: Trigger,
    upstream: Socket,
    address: SockAddr,
    deadline: Instant,
) -> (Connection, UnixStream) {
    let (client, client_peer) = pair();
    let dial = Dial { socket: upstream, address, paths: [DataPath::Splice; 2], deadline };
    (Connection::new(1, client, Plan::Fixed(dial), trigger, Vec::new()), client_peer)
}

/// [`connecting_as`] with io_uring's level-triggered readiness.
fn connecting(upstream: Socket, address: SockAddr, deadline: Instant) -> (Connection, UnixStream) {
    connecting_as(Trigger::Level, upstream, address, deadline)
}

/// A fixed-target connection over an upstream socket that is connected
/// already (a pair: its connect is never started), moving bytes by `paths`.
fn connected(id: u64, client: Socket, upstream: Socket, paths: [DataPath; 2]) -> Connection {
    let dial = Dial { socket: upstream, address: never_dialed(), paths, deadline: Instant::now() + FAR };
    Connection::new(id, client, Plan::Fixed(dial), Trigger::Level, Vec::new())
}

/// The address of a dial that is never started (TEST-NET-1: routes nowhere).
fn never_dialed() -> SockAddr {
    SockAddr::from("192.0.2.1:9".parse::<std::net::SocketAddr>().unwrap())
}

/// A listener whose accept queue is full, so a new connect stays in progress.
fn unanswering_listener() -> (TcpListener, Vec<Socket>, SockAddr) {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the queue; further SYNs are dropped and their connects wait.
    let fillers: Vec<Socket> = (0..2)
        .map(|_| {
            let s = tcp_socket();
            let _ = s.connect(&addr);
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    (listener.into(), fillers, addr)
}

/// A connection relaying between two Unix pairs, and both peers.
fn relaying(pools: &mut Pools) -> (Connection, UnixStream, UnixStream) {
    let (client, client_peer) = pair();
    let (upstream, upstream_peer) = pair();
    let mut conn = connected(7, client, upstream, [DataPath::Copy; 2]);
    match conn.handle(Event::UpstreamWritable, &mut io(pools)) {
        Action::Wait([Some(Wait::Readable), Some(Wait::Readable)]) => {}
        other => panic!("expected both directions waiting to read, got {other:?}"),
    }
    assert_eq!(conn.state, ConnState::Relaying);
    (conn, client_peer, upstream_peer)
}

fn failed(action: Action) -> ConnError {
    match action {
        Action::Close(Ending::Failed(e)) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn start_with_an_immediate_connect_starts_relaying() {
    let dir = std::env::temp_dir().join(format!("conn-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("upstream.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let upstream = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
    let (mut conn, _peer) = connecting(upstream, SockAddr::unix(&path).unwrap(), Instant::now() + FAR);
    let mut pools = Pools::new(0, 4);
    let action = conn.start(&mut io(&mut pools));
    assert!(matches!(action, Action::Wait([Some(Wait::Readable), Some(Wait::Readable)])), "{action:?}");
    assert_eq!(conn.state, ConnState::Relaying);
    // The connect time is reported once, even without a later event.
    assert!(conn.take_connect_time().is_some());
    assert_eq!(conn.take_connect_time(), None);
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

/// epoll: a loopback connect is done before `connect` returns; the
/// connection relays at once instead of waiting for the writable edge.
/// io_uring (level-triggered) waits: its poll completes on submission.
#[test]
fn an_edge_triggered_loopback_connect_relays_at_once_and_a_level_triggered_one_waits() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = SockAddr::from(listener.local_addr().unwrap());
    let mut pools = Pools::new(0, 4);
    let (mut edge, _peer) = connecting_as(Trigger::Edge, tcp_socket(), addr.clone(), Instant::now() + FAR);
    let action = edge.start(&mut io(&mut pools));
    assert!(matches!(action, Action::Wait(_)), "{action:?}");
    assert_eq!(edge.state, ConnState::Relaying);
    let (mut level, _peer) = connecting(tcp_socket(), addr.clone(), Instant::now() + FAR);
    assert!(matches!(level.start(&mut io(&mut pools)), Action::AwaitConnect));
    // Still in progress (a full accept queue): the edge-triggered one waits too.
    let (_full, _fillers, unanswering) = unanswering_listener();
    let (mut edge, _peer) = connecting_as(Trigger::Edge, tcp_socket(), unanswering, Instant::now() + FAR);
    assert!(matches!(edge.start(&mut io(&mut pools)), Action::AwaitConnect));
}

#[test]
fn start_in_progress_awaits_then_writable_but_unconnected_waits_again() {
    let (_listener, _fillers, addr) = unanswering_listener();
    let (mut conn, _peer) = connecting(tcp_socket(), addr.clone(), Instant::now() + FAR);
    let mut pools = Pools::new(0, 4);
    assert!(matches!(conn.start(&mut io(&mut pools)), Action::AwaitConnect));
    conn.confirm_connect_by_peer();
    // A (spurious, as vsock's) writable report while the connect is still in flight.
    let action = conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
    assert!(matches!(action, Action::AwaitConnect), "{action:?}");
    assert!(matches!(conn.state, ConnState::Connecting { .. }));
}

#[test]
fn writable_but_unconnected_after_the_deadline_times_out() {
    let (_listener, _fillers, addr) = unanswering_listener();
    let (mut conn, _peer) = connecting(tcp_socket(), addr.clone(), Instant::now());
    let mut pools = Pools::new(0, 4);
    assert!(matches!(conn.start(&mut io(&mut pools)), Action::AwaitConnect));
    conn.confirm_connect_by_peer();
    let e = failed(conn.handle(Event::UpstreamWritable, &mut io(&mut pools)));
    assert_eq!((e.side, e.op, e.source.kind()), (Side::Upstream, Op::Connect, io::ErrorKind::TimedOut));
    assert_eq!(conn.state, ConnState::Closed);
}

#[test]
fn deadline_passed_while_connecting_times_out_with_the_timeout_in_the_message() {
    let (_listener, _fillers, addr) = unanswering_listener();
    let opened = Instant::now() - Duration::from_secs(3);
    let (mut conn, _peer) = connecting(tcp_socket(), addr.clone(), opened + Duration::from_secs(3));
    conn.opened = opened;
    let mut pools = Pools::new(0, 4);
    assert!(matches!(conn.start(&mut io(&mut pools)), Action::AwaitConnect));
    let e = failed(conn.handle(Event::DeadlinePassed, &mut io(&mut pools)));
    assert_eq!(e.to_string(), "upstream connect failed: no answer within 3s");
    assert_eq!(conn.state, ConnState::Closed);
}

#[test]
fn a_deadline_event_before_the_deadline_is_ignored() {
    // Deadlines of earlier states (the head's) come up after the state moved on.
    let (_listener, _fillers, addr) = unanswering_listener();
    let (mut conn, _peer) = connecting(tcp_socket(), addr.clone(), Instant::now() + FAR);
    let mut pools = Pools::new(0, 4);
    assert!(matches!(conn.start(&mut io(&mut pools)), Action::AwaitConnect));
    let action = conn.handle(Event::DeadlinePassed, &mut io(&mut pools));
    assert!(matches!(action, Action::Wait([None, None])), "{action:?}");
    assert!(matches!(conn.state, ConnState::Connecting { .. }));
}

#[test]
fn refused_connect_fails_on_the_upstream_side() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (mut conn, _peer) = connecting(tcp_socket(), port.into(), Instant::now() + FAR);
    let mut pools = Pools::new(0, 4);
    let action = match conn.start(&mut io(&mut pools)) {
        Action::AwaitConnect => {
            std::thread::sleep(Duration::from_millis(50));
            conn.handle(Event::UpstreamWritable, &mut io(&mut pools))
        }
        action => action,
    };
    let e = failed(action);
    assert_eq!(
        (e.side, e.op, e.source.kind()),
        (Side::Upstream, Op::Connect, io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(conn.state, ConnState::Closed);
}

#[test]
fn connect_result_after_the_end_is_ignored() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, client_peer, upstream_peer) = relaying(&mut pools);
    drop((client_peer, upstream_peer));
    let mut io = io(&mut pools);
    assert!(matches!(conn.handle(Event::Ready(Direction::ToUpstream), &mut io), Action::Wait(_)));
    assert!(matches!(
        conn.handle(Event::Ready(Direction::ToClient), &mut io),
        Action::Close(Ending::Finished)
    ));
    for event in [Event::UpstreamWritable, Event::DeadlinePassed, Event::Ready(Direction::ToClient)] {
        assert!(matches!(conn.handle(event, &mut io), Action::Wait([None, None])));
    }
    assert_eq!(conn.state, ConnState::Closed);
}

#[test]
fn readiness_while_connecting_is_ignored() {
    let (_listener, _fillers, addr) = unanswering_listener();
    let (mut conn, _peer) = connecting(tcp_socket(), addr.clone(), Instant::now() + FAR);
    let mut pools = Pools::new(0, 4);
    assert!(matches!(conn.start(&mut io(&mut pools)), Action::AwaitConnect));
    let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
    assert!(matches!(action, Action::Wait([None, None])));
    assert!(matches!(conn.state, ConnState::Connecting { .. }));
}

#[test]
fn relaying_moves_bytes_counts_them_and_ends_after_both_eofs() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, mut client_peer, mut upstream_peer) = relaying(&mut pools);
    let mut io = io(&mut pools);
    client_peer.write_all(b"ping").unwrap();
    let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
    assert!(matches!(action, Action::Wait([Some(Wait::Readable), None])), "{action:?}");
    let mut got = [0u8; 4];
    upstream_peer.read_exact(&mut got).unwrap();
    assert_eq!((&got, io.moved), (b"ping", [4, 0]));

    // Half-close from the client: passed on, the other direction still runs.
    client_peer.shutdown(Shutdown::Write).unwrap();
    let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
    assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])), "{action:?}");
    assert_eq!(upstream_peer.read(&mut got).unwrap(), 0, "EOF passed upstream");
    upstream_peer.write_all(b"pong").unwrap();
    upstream_peer.shutdown(Shutdown::Write).unwrap();
    // A short read emptied the socket: the EOF behind it comes with the next readiness.
    let action = conn.handle(Event::Ready(Direction::ToClient), &mut io);
    assert!(matches!(action, Action::Wait([None, Some(Wait::Readable)])), "{action:?}");
    let action = conn.handle(Event::Ready(Direction::ToClient), &mut io);
    assert!(matches!(action, Action::Close(Ending::Finished)), "{action:?}");
    assert_eq!((io.moved, conn.bytes()), ([4, 4], (4, 4)));
    assert_eq!(conn.state, ConnState::Closed);
    // The second EOF is passed on by closing the sockets, not by a shutdown before.
    client_peer.set_nonblocking(true).unwrap();
    let mut reply = [0u8; 8];
    assert_eq!(client_peer.read(&mut reply).unwrap(), 4);
    assert_eq!(&reply[..4], b"pong");
    let pending = client_peer.read(&mut reply).unwrap_err();
    assert_eq!(pending.kind(), io::ErrorKind::WouldBlock, "no shutdown before the close");
    drop(conn);
    assert_eq!(client_peer.read(&mut reply).unwrap(), 0, "EOF at the close");
}

#[test]
fn a_failing_side_resets_both() {
    let mut pools = Pools::new(0, 4);
    let (client, mut client_peer) = pair();
    let (upstream, upstream_peer) = pair();
    let mut conn = connected(9, client, upstream, [DataPath::Copy; 2]);
    conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
    drop(upstream_peer);
    client_peer.write_all(&[0u8; 64 << 10]).unwrap();
    // The upstream is gone: writing to it fails and the whole connection ends.
    let mut action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
    for _ in 0..3 {
        if matches!(action, Action::Close(_)) {
            break;
        }
        action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io(&mut pools));
    }
    let e = failed(action);
    assert_eq!((e.side, e.op), (Side::Upstream, Op::Write));
    assert_eq!(conn.client.linger().unwrap(), Some(Duration::ZERO), "the client is reset");
    assert_eq!(
        conn.socket(Side::Upstream).unwrap().linger().unwrap(),
        Some(Duration::ZERO),
        "the upstream is reset"
    );
}

/// The driver side of the ring path, faked: records what the pumps
/// submit and keeps the slices sends took; the test plays the kernel and
/// feeds completions back.
#[derive(Default)]
struct FakeRing {
    returns: Rc<Returns>,
    received: Vec<Direction>,
    sent: Vec<(Direction, u16, u32, u32)>,
    /// What sends in flight took, oldest first (the kernel's until completed).
    sending: Vec<BufferSlice>,
    given_back: Vec<u16>,
}

impl FakeRing {
    /// A receive's completion into buffer `id`, `result` bytes.
    fn received(&self, direction: Direction, result: i32, id: Option<u16>) -> Event {
        let buffer = id.map(|id| self.returns.lend_for_test(id));
        Event::Completed(direction, Completed::Received { result, buffer })
    }

    /// The completion of the oldest send in flight.
    fn sent(&mut self, direction: Direction, result: i32) -> Event {
        Event::Completed(direction, Completed::Sent { result, slice: self.sending.remove(0) })
    }

    /// Every buffer given back so far (a token dropped), in order.
    fn given_back(&mut self) -> &[u16] {
        self.given_back.extend(self.returns.take());
        &self.given_back
    }
}

impl BufferRingOps for FakeRing {
    fn receive(&mut self, _key: Key, direction: Direction, _src: &Socket) -> io::Result<()> {
        self.received.push(direction);
        Ok(())
    }

    fn send(&mut self, _key: Key, direction: Direction, _dst: &Socket, slice: BufferSlice) -> io::Result<()> {
        self.sent.push((direction, slice.buffer.id(), slice.offset, slice.len));
        self.sending.push(slice);
        Ok(())
    }
}

fn ring_io<'a>(pools: &'a mut Pools, ring: &'a mut FakeRing) -> Context<'a> {
    Context::new(pools, Some(ring), Key { index: 0, generation: 0 })
}

#[test]
fn ring_path_receives_sends_in_order_gives_buffers_back_and_half_closes() {
    let (mut pools, mut ring) = (Pools::new(0, 4), FakeRing::default());
    let (client, _client_peer) = pair();
    let (upstream, mut upstream_peer) = pair();
    let mut conn = connected(3, client, upstream, [DataPath::Ring; 2]);
    let action = conn.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut ring));
    assert!(matches!(action, Action::Wait([Some(Wait::Completion), Some(Wait::Completion)])), "{action:?}");
    assert_eq!(ring.received, [Direction::ToUpstream, Direction::ToClient], "both directions receive");

    let up = Direction::ToUpstream;
    // Two buffers arrive: one send in flight at a time, oldest first;
    // with two held, no further receive.
    let event = ring.received(up, 100, Some(7));
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    let event = ring.received(up, 50, Some(9));
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    assert_eq!(ring.sent, [(up, 7, 0, 100)]);
    assert_eq!(ring.received.len(), 3, "a receive after the first buffer, none with two held");
    // A short send: the rest of the same buffer goes next.
    let event = ring.sent(up, 60);
    let mut io = ring_io(&mut pools, &mut ring);
    conn.handle(event, &mut io);
    assert_eq!(io.moved, [60, 0]);
    assert_eq!(ring.sent.last(), Some(&(up, 7, 60, 40)));
    assert!(ring.given_back().is_empty());
    let event = ring.sent(up, 40);
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    assert_eq!(ring.sent.last(), Some(&(up, 9, 0, 50)));
    assert_eq!(ring.given_back(), [7], "a buffer wholly sent goes back");
    assert_eq!(ring.received.len(), 4, "one buffer held again: receive");
    // EOF while a send is in flight: the half-close waits for it.
    let event = ring.received(up, 0, None);
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    let mut got = [0u8; 1];
    upstream_peer.set_nonblocking(true).unwrap();
    assert!(upstream_peer.read(&mut got).is_err(), "no EOF before the last send completed");
    let event = ring.sent(up, 50);
    let action = conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])), "{action:?}");
    assert_eq!(upstream_peer.read(&mut got).unwrap(), 0, "EOF passed upstream");
    assert_eq!(conn.bytes(), (150, 0));
    assert_eq!(ring.given_back(), [7, 9]);
}

#[test]
fn ring_path_failure_resets_and_gives_back_what_no_send_uses() {
    let (mut pools, mut ring) = (Pools::new(0, 4), FakeRing::default());
    let (client, _client_peer) = pair();
    let (upstream, _upstream_peer) = pair();
    let mut conn = connected(4, client, upstream, [DataPath::Ring; 2]);
    conn.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut ring));
    let down = Direction::ToClient;
    let event = ring.received(down, 10, Some(1));
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    let event = ring.received(down, 10, Some(2));
    conn.handle(event, &mut ring_io(&mut pools, &mut ring));
    // At close, a send still in the kernel keeps its buffer (its token is
    // the driver's) until its completion; the held ones go back at once.
    let (client, _peer_a) = pair();
    let (upstream, _peer_b) = pair();
    let mut other = connected(5, client, upstream, [DataPath::Ring; 2]);
    let mut other_ring = FakeRing::default();
    other.handle(Event::UpstreamWritable, &mut ring_io(&mut pools, &mut other_ring));
    let event = other_ring.received(down, 10, Some(4));
    other.handle(event, &mut ring_io(&mut pools, &mut other_ring));
    let event = other_ring.received(down, 10, Some(6));
    other.handle(event, &mut ring_io(&mut pools, &mut other_ring));
    let e = other_ring.received(Direction::ToUpstream, -libc::ECONNRESET, None);
    failed(other.handle(e, &mut ring_io(&mut pools, &mut other_ring)));
    assert_eq!(other_ring.given_back(), [6], "buffer 4 is still being sent");
    drop(other_ring.sent(down, 10));
    assert_eq!(other_ring.given_back(), [6, 4], "back with its send's completion");
    // The client side fails a send: the whole connection ends with a reset.
    let sent = ring.sent(down, -libc::EPIPE);
    let e = failed(conn.handle(sent, &mut ring_io(&mut pools, &mut ring)));
    assert_eq!((e.side, e.op), (Side::Client, Op::Write));
    assert_eq!(ring.given_back(), [1, 2], "both buffers back (the failed send is over)");
    assert_eq!(conn.client.linger().unwrap(), Some(Duration::ZERO));
    assert_eq!(conn.state, ConnState::Closed);
}

#[test]
fn a_finished_direction_ignores_readiness() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, client_peer, _upstream_peer) = relaying(&mut pools);
    client_peer.shutdown(Shutdown::Write).unwrap();
    let mut io = io(&mut pools);
    let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
    assert!(matches!(action, Action::Wait([Some(Wait::Finished), None])));
    let action = conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
    assert!(matches!(action, Action::Wait([None, None])));
    assert_eq!(conn.state, ConnState::Relaying);
}

/// A routed connection's client and its peer, reading a head of `kind`.
fn routed(kind: crate::route::RouteKind, deadline: Instant) -> (Connection, UnixStream) {
    routed_on(&Route::new(kind, Arc::new(|_: &crate::route::Asked<'_>, _| None)), deadline)
}

/// A routed connection of `route` (whose counters the test reads) and its client's peer.
fn routed_on(route: &Route, deadline: Instant) -> (Connection, UnixStream) {
    let (client, client_peer) = pair();
    let plan = Plan::Routed { routed: Routed::new(route), head_deadline: deadline };
    (Connection::new(7, client, plan, Trigger::Level, Vec::new()), client_peer)
}

fn allowed(address: &str) -> Event {
    Event::Decided(Verdict::Allowed { address: address.parse().unwrap(), rule: "rule".into() })
}

/// Attaches a connected Unix pair as the upstream; its peer.
fn dial_connected(conn: &mut Connection) -> UnixStream {
    let (upstream, upstream_peer) = pair();
    let dial = Dial {
        socket: upstream,
        address: never_dialed(),
        paths: [DataPath::Copy; 2],
        deadline: Instant::now() + FAR,
    };
    conn.dialed(dial);
    upstream_peer
}

#[test]
fn a_connect_head_in_pieces_is_decided_then_answered_200_with_the_pipelined_bytes_sent_first() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
    client_peer.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\n").unwrap();
    assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
    assert!(matches!(conn.state, ConnState::ReadingHead { .. }));
    client_peer.write_all(b"Host: api.example.com\r\n\r\nclient hello").unwrap();
    let action = conn.handle(Event::ClientReadable, &mut io(&mut pools));
    let Action::Decide(destination) = action else { panic!("{action:?}") };
    assert_eq!(destination, Destination { host: Host::Name("api.example.com".into()), port: 443 });
    assert!(matches!(conn.state, ConnState::Deciding { .. }));
    assert_eq!(conn.destination(), Some("api.example.com:443"));
    // Allowed: connect to the address the router checked.
    let action = conn.handle(allowed("192.0.2.1:443"), &mut io(&mut pools));
    let Action::Dial(address) = action else { panic!("{action:?}") };
    assert_eq!(address.as_socket(), Some("192.0.2.1:443".parse().unwrap()));
    let mut upstream_peer = dial_connected(&mut conn);
    let mut io = io(&mut pools);
    let action = conn.handle(Event::UpstreamWritable, &mut io);
    assert!(matches!(action, Action::Wait(_)), "{action:?}");
    assert_eq!(conn.state, ConnState::Relaying);
    let mut answer = [0u8; 39];
    client_peer.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 Connection established\r\n\r\n");
    let mut first = [0u8; 12];
    upstream_peer.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"client hello", "bytes after the head go upstream first");
    // Then it relays as any connection does.
    client_peer.write_all(b"more").unwrap();
    conn.handle(Event::Ready(Direction::ToUpstream), &mut io);
    let mut more = [0u8; 4];
    upstream_peer.read_exact(&mut more).unwrap();
    assert_eq!((&more, io.moved[0]), (b"more", 12 + 4), "the client's bytes after its head count too");
}

#[test]
fn a_refused_destination_is_answered_403_and_closed_without_a_reset() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
    client_peer.write_all(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").unwrap();
    assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::Decide(_)));
    let verdict = Verdict::Refused { outcome: Outcome::NotAllowed, reason: "no entry".into() };
    let action = conn.handle(Event::Decided(verdict), &mut io(&mut pools));
    let Action::Close(Ending::Refused { decision: Decision::NotAllowed, reason }) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reason, "no entry");
    assert_eq!(conn.client.linger().unwrap(), None, "not reset: the client reads the answer");
    drop(conn);
    let mut answer = String::new();
    client_peer.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n") && answer.ends_with("no entry\n"), "{answer}");
}

#[test]
fn an_unreachable_upstream_is_answered_502_by_socks_code_and_a_late_verdict_is_ignored() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Socks5, Instant::now() + FAR);
    client_peer.write_all(&[5, 1, 0]).unwrap();
    assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
    let mut choice = [0u8; 2];
    client_peer.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0], "the greeting is answered: no authentication");
    client_peer.write_all(&[5, 1, 0, 1, 192, 0, 2, 1, 0, 80]).unwrap();
    let action = conn.handle(Event::ClientReadable, &mut io(&mut pools));
    assert!(matches!(action, Action::Decide(Destination { host: Host::Ip(_), port: 80 })), "{action:?}");
    conn.handle(allowed("192.0.2.1:80"), &mut io(&mut pools));
    // A refused connect: told as SOCKS reply 0x05, no reset of the client.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    conn.dialed(Dial {
        socket: tcp_socket(),
        address: port.into(),
        paths: [DataPath::Copy; 2],
        deadline: Instant::now() + FAR,
    });
    let mut action = conn.start(&mut io(&mut pools));
    if let Action::AwaitConnect = action {
        std::thread::sleep(Duration::from_millis(50));
        action = conn.handle(Event::UpstreamWritable, &mut io(&mut pools));
    }
    assert_eq!(failed(action).op, Op::Connect);
    let mut reply = [0u8; 10];
    client_peer.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..2], [5, 0x05], "connection refused");
    assert_eq!(conn.client.linger().unwrap(), None);
    let late = conn.handle(allowed("192.0.2.1:80"), &mut io(&mut pools));
    assert!(matches!(late, Action::Wait([None, None])), "{late:?}");
}

#[test]
fn a_head_not_whole_by_its_deadline_is_closed_and_a_bad_one_at_once() {
    let mut pools = Pools::new(0, 4);
    let (mut conn, mut client_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
    client_peer.write_all(b"CONNECT a.example:443").unwrap();
    assert!(matches!(conn.handle(Event::ClientReadable, &mut io(&mut pools)), Action::AwaitHead));
    // The deadline has not passed: nothing happens.
    let action = conn.handle(Event::DeadlinePassed, &mut io(&mut pools));
    assert!(matches!(action, Action::Wait([None, None])), "{action:?}");
    let (mut late, _late_peer) = routed(crate::route::RouteKind::Connect, Instant::now());
    let action = late.handle(Event::DeadlinePassed, &mut io(&mut pools));
    assert!(
        matches!(action, Action::Close(Ending::Refused { decision: Decision::HeadTimeout, .. })),
        "{action:?}"
    );
    // Not TLS on an SNI route: closed at once, with nothing sent.
    let (mut sni, mut sni_peer) = routed(crate::route::RouteKind::Sni { port: 443 }, Instant::now() + FAR);
    sni_peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let action = sni.handle(Event::ClientReadable, &mut io(&mut pools));
    assert!(
        matches!(action, Action::Close(Ending::Refused { decision: Decision::BadHead, .. })),
        "{action:?}"
    );
    drop(sni);
    let mut rest = Vec::new();
    sni_peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // A client that connects and closes without a word is no failure.
    let (mut probe, probe_peer) = routed(crate::route::RouteKind::Connect, Instant::now() + FAR);
    probe_peer.shutdown(Shutdown::Write).unwrap();
    let action = probe.handle(Event::ClientReadable, &mut io(&mut pools));
    assert!(matches!(action, Action::Close(Ending::Finished)), "{action:?}");
}

/// `Connection::new` makes a whole connection from its plan: a fixed target
/// connects (its upstream socket and movers there from the start), a route
/// reads its head with no upstream socket; either way the deadline of the
/// state it starts in is handed to the worker once.
#[test]
fn a_plan_makes_a_whole_connection_in_one_step() {
    let deadline = Instant::now() + FAR;
    let (fixed, _peer) = connecting(tcp_socket(), never_dialed(), deadline);
    let mut fixed = fixed;
    assert_eq!(fixed.state, ConnState::Connecting { deadline });
    assert!(matches!(fixed.first_action(), Action::StartConnect));
    assert!(fixed.socket(Side::Upstream).is_some());
    assert_eq!((fixed.take_new_deadline(), fixed.take_new_deadline()), (Some(deadline), None));
    assert_eq!((fixed.bytes(), fixed.destination()), ((0, 0), None));

    let (mut routed, _peer) = routed(crate::route::RouteKind::Connect, deadline);
    assert_eq!(routed.state, ConnState::ReadingHead { deadline });
    assert!(matches!(routed.first_action(), Action::AwaitHead));
    assert!(routed.socket(Side::Upstream).is_none());
    assert_eq!((routed.take_new_deadline(), routed.take_new_deadline()), (Some(deadline), None));
    assert_eq!(ConnState::Relaying.deadline(), None);
}

/// A PROXY protocol header given to the constructor goes upstream before
/// any byte of the client's and is not counted as the client's.
#[test]
fn the_proxy_header_goes_first_and_is_not_counted_as_the_clients() {
    let (client, mut client_peer) = pair();
    let (upstream, mut upstream_peer) = pair();
    let dial = Dial {
        socket: upstream,
        address: never_dialed(),
        paths: [DataPath::Copy; 2],
        deadline: Instant::now() + FAR,
    };
    let mut conn = Connection::new(2, client, Plan::Fixed(dial), Trigger::Level, b"HEADER".to_vec());
    client_peer.write_all(b"payload").unwrap();
    let mut pools = Pools::new(0, 4);
    let mut io = io(&mut pools);
    conn.handle(Event::UpstreamWritable, &mut io);
    let mut got = [0u8; 13];
    upstream_peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HEADERpayload");
    assert_eq!(io.moved[0], 7, "only the client's bytes count");
}

/// The route counts each decision where it is made: a bad head, a refused
/// destination, a head that timed out.
#[test]
fn the_route_counts_its_decisions_as_they_are_made() {
    let route = Route::new(crate::route::RouteKind::Connect, Arc::new(|_: &crate::route::Asked<'_>, _| None));
    let mut pools = Pools::new(0, 4);
    let (mut bad, mut peer) = routed_on(&route, Instant::now() + FAR);
    peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(matches!(
        bad.handle(Event::ClientReadable, &mut io(&mut pools)),
        Action::Close(Ending::Refused { .. })
    ));
    let (mut refused, mut peer) = routed_on(&route, Instant::now() + FAR);
    peer.write_all(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n").unwrap();
    refused.handle(Event::ClientReadable, &mut io(&mut pools));
    let verdict = Verdict::Refused { outcome: Outcome::NotAllowed, reason: "no entry".into() };
    refused.handle(Event::Decided(verdict), &mut io(&mut pools));
    let (mut late, _peer) = routed_on(&route, Instant::now());
    late.handle(Event::DeadlinePassed, &mut io(&mut pools));
    let counted = [Decision::BadHead, Decision::NotAllowed, Decision::HeadTimeout, Decision::Allowed]
        .map(|decision| route.counters.decisions(decision));
    assert_eq!(counted, [1, 1, 1, 0]);
}
