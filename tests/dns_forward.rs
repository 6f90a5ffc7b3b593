//! `vsock-relay dns`, the enclave's DNS forwarder, against a fake parent on
//! a Unix socket (standing in for vsock) that answers out of order: clients
//! on UDP and TCP get their answers with their own IDs, even two clients
//! with the same ID; large answers come back truncated over UDP and whole
//! over TCP; a dropped connection is made again and its queries re-sent
//! once; no parent means SERVFAIL in time; garbage is survived.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use vsock_relay_apps::dns::forwarder::stub_query;

use crate::util::{run_capturing, run_to_exit, Proc, TempDir};

/// How long the fake parent holds a query for a later one to overtake it,
/// in the tests that do not count on it.
const HOLD: Duration = Duration::from_millis(50);
/// A hold that ends only when the next query comes: every query is
/// answered after the one behind it (the test sends them in pairs).
const PAIRS: Duration = Duration::from_secs(600);

/// What the fake parent saw.
#[derive(Default)]
struct Seen {
    connections: usize,
    /// (upstream ID, name) of every query received.
    queries: Vec<(u16, String)>,
    /// Answers written before the answer to an earlier query.
    out_of_order: usize,
    once_dropped: bool,
}

/// A fake parent DNS service on a Unix socket. Each query is held until
/// the next one arrives (then the later is answered first) or `hold` passes.
/// `nK.test` answers A 10.0.0.K; `big.test` 100 A records; `once.test`
/// closes the connection the first time it is seen; `drop.test` every
/// time; other names NXDOMAIN.
fn fake_parent(path: &Path, hold: Duration) -> Arc<Mutex<Seen>> {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            shared.lock().unwrap().connections += 1;
            let seen = Arc::clone(&shared);
            std::thread::spawn(move || serve_parent_connection(stream, &seen, hold));
        }
    });
    seen
}

fn serve_parent_connection(mut stream: UnixStream, seen: &Mutex<Seen>, hold: Duration) {
    let (queries, received) = mpsc::channel();
    let mut reader = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        while let Some(frame) = read_frame(&mut reader) {
            if queries.send(frame).is_err() {
                return;
            }
        }
    });
    let mut held: Option<Message> = None;
    loop {
        let query = match received.recv_timeout(hold) {
            Ok(bytes) => Message::from_vec(&bytes).expect("the forwarder sends what parses"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(first) = held.take() {
                    write_frame(&mut stream, &parent_answer(&first));
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let name = query.queries[0].name().to_ascii();
        {
            let mut seen = seen.lock().unwrap();
            seen.queries.push((query.metadata.id, name.clone()));
            let drop_once = name == "once.test." && !std::mem::replace(&mut seen.once_dropped, true);
            if drop_once || name == "drop.test." {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
        match held.take() {
            Some(first) => {
                write_frame(&mut stream, &parent_answer(&query));
                write_frame(&mut stream, &parent_answer(&first));
                seen.lock().unwrap().out_of_order += 1;
            }
            None => held = Some(query),
        }
    }
}

fn parent_answer(query: &Message) -> Vec<u8> {
    let mut answer = Message::response(query.metadata.id, OpCode::Query);
    answer.add_queries(query.queries.iter().cloned());
    let name = query.queries[0].name().clone();
    let text = name.to_ascii();
    let a = |ip: Ipv4Addr| Record::from_rdata(name.clone(), 60, RData::A(A(ip)));
    if text == "big.test." {
        answer.add_answers((0..100).map(|i| a(Ipv4Addr::new(10, 1, 0, i))));
    } else if let Some(k) =
        text.strip_prefix('n').and_then(|t| t.strip_suffix(".test.")).and_then(|k| k.parse().ok())
    {
        answer.add_answer(a(Ipv4Addr::new(10, 0, 0, k)));
    } else {
        answer.metadata.response_code = ResponseCode::NXDomain;
    }
    answer.to_vec().unwrap()
}

fn read_frame(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).ok()?;
    Some(message)
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut framed = u16::try_from(message.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    framed
}

fn write_frame(stream: &mut impl Write, message: &[u8]) {
    let _ = stream.write_all(&frame(message));
}

fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
    stub_query(id, &Name::from_ascii(name).unwrap(), RecordType::A, edns).to_vec().unwrap()
}

fn addresses(answer: &Message) -> Vec<Ipv4Addr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(A(ip)) => Some(ip),
            _ => None,
        })
        .collect()
}

/// A fake parent and the forwarder on a free port towards it.
struct Setup {
    /// Removed when the test ends (after the forwarder is killed).
    _dir: TempDir,
    parent: std::path::PathBuf,
    seen: Arc<Mutex<Seen>>,
    forwarder: Proc,
    port: u16,
}

/// Starts a fake parent holding queries `hold` (none: no parent yet) and
/// the forwarder towards it, with `extra` options.
fn start(tag: &str, hold: Option<Duration>, extra: &[&str]) -> Setup {
    let dir = TempDir::new(tag);
    let parent = dir.path("parent.sock");
    let seen = hold.map_or_else(Arc::default, |hold| fake_parent(&parent, hold));
    let to = format!("unix:{}", parent.display());
    let mut args = vec!["dns", "--listen", "udp:127.0.0.1:0", "--to", &to];
    args.extend_from_slice(extra);
    let mut forwarder = Proc::spawn("vsock-relay", &args);
    forwarder.wait_for_log("dns forwarder listening", Duration::from_secs(20));
    let log = forwarder.stderr();
    let mark = "listen=127.0.0.1:";
    let at = log.find(mark).unwrap_or_else(|| panic!("no listen address in:\n{log}")) + mark.len();
    let port = log[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap();
    Setup { _dir: dir, parent, seen, forwarder, port }
}

fn udp_client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    socket
}

fn udp_receive(socket: &UdpSocket) -> Message {
    let mut buf = [0u8; 65_535];
    let len = socket.recv(&mut buf).expect("an answer over UDP");
    Message::from_vec(&buf[..len]).unwrap()
}

fn udp_ask(port: u16, id: u16, name: &str, edns: Option<u16>) -> Message {
    let socket = udp_client();
    socket.send_to(&query(id, name, edns), ("127.0.0.1", port)).unwrap();
    udp_receive(&socket)
}

fn tcp_client(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn tcp_receive(stream: &mut TcpStream) -> Message {
    Message::from_vec(&read_frame(stream).expect("an answer over TCP")).unwrap()
}

#[test]
fn dns_forwarder_answers_each_client_with_its_own_id_in_any_order() {
    let setup = start("dns-fwd-ids", Some(PAIRS), &[]);
    let (seen, port) = (&setup.seen, setup.port);

    // Two UDP clients, one ID: each gets its own answer, with that ID.
    let (a, b) = (udp_client(), udp_client());
    a.send_to(&query(7, "n1.test.", None), ("127.0.0.1", port)).unwrap();
    b.send_to(&query(7, "n2.test.", None), ("127.0.0.1", port)).unwrap();
    let (answer_a, answer_b) = (udp_receive(&a), udp_receive(&b));
    assert_eq!((answer_a.metadata.id, addresses(&answer_a)), (7, vec![Ipv4Addr::new(10, 0, 0, 1)]));
    assert_eq!((answer_b.metadata.id, addresses(&answer_b)), (7, vec![Ipv4Addr::new(10, 0, 0, 2)]));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.queries.len(), 2);
        assert_ne!(seen.queries[0].0, seen.queries[1].0, "one ID in flight twice: {:?}", seen.queries);
        assert_eq!(seen.out_of_order, 1, "the parent answered the second query first");
    }

    // One TCP client, pipelined, the last query one byte per segment, and a
    // UDP client with the same ID as one of them at the same time.
    let mut tcp = tcp_client(port);
    let mut pipelined = frame(&query(1, "n3.test.", None));
    pipelined.extend(frame(&query(2, "n4.test.", None)));
    tcp.write_all(&pipelined).unwrap();
    let udp = udp_client();
    udp.send_to(&query(2, "n6.test.", None), ("127.0.0.1", port)).unwrap();
    for byte in frame(&query(3, "n5.test.", None)) {
        tcp.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got: Vec<(u16, Vec<Ipv4Addr>)> = (0..3)
        .map(|_| {
            let answer = tcp_receive(&mut tcp);
            (answer.metadata.id, addresses(&answer))
        })
        .collect();
    got.sort();
    let want = |id: u16, k: u8| (id, vec![Ipv4Addr::new(10, 0, 0, k)]);
    assert_eq!(got, vec![want(1, 3), want(2, 4), want(3, 5)]);
    let answer = udp_receive(&udp);
    assert_eq!((answer.metadata.id, addresses(&answer)), want(2, 6));
    assert_eq!(seen.lock().unwrap().out_of_order, 3, "every second query was answered first");
}

#[test]
fn dns_forwarder_truncates_large_udp_answers_and_tcp_gets_them_whole() {
    let setup = start("dns-fwd-big", Some(HOLD), &[]);
    let port = setup.port;

    let small = udp_ask(port, 11, "big.test.", None);
    assert!(small.metadata.truncation, "TC set for a 512-byte client");
    assert!(small.answers.is_empty());
    assert_eq!((small.metadata.id, small.queries[0].name().to_ascii()), (11, "big.test.".to_string()));

    let edns = udp_ask(port, 12, "big.test.", Some(4096));
    assert!(!edns.metadata.truncation);
    assert_eq!(addresses(&edns).len(), 100, "an EDNS client of 4096 bytes gets it whole over UDP");

    let mut tcp = tcp_client(port);
    tcp.write_all(&frame(&query(13, "big.test.", None))).unwrap();
    let whole = tcp_receive(&mut tcp);
    assert!(!whole.metadata.truncation);
    assert_eq!((whole.metadata.id, addresses(&whole).len()), (13, 100));
}

#[test]
fn dns_forwarder_reconnects_and_resends_once_when_the_parent_drops() {
    let mut setup = start("dns-fwd-drop", Some(HOLD), &[]);
    let (seen, port) = (Arc::clone(&setup.seen), setup.port);
    let forwarder = &mut setup.forwarder;

    // Dropped once with the query in flight: sent again on the new
    // connection, and answered.
    let answer = udp_ask(port, 21, "once.test.", None);
    assert_eq!((answer.metadata.id, answer.metadata.response_code), (21, ResponseCode::NXDomain));
    // Dropped on both connections: SERVFAIL, without waiting for the timeout.
    let started = Instant::now();
    let answer = udp_ask(port, 22, "drop.test.", None);
    assert_eq!((answer.metadata.id, answer.metadata.response_code), (22, ResponseCode::ServFail));
    assert!(started.elapsed() < Duration::from_secs(4), "SERVFAIL took {:?}", started.elapsed());
    // Later queries are answered.
    let answer = udp_ask(port, 23, "n9.test.", None);
    assert_eq!(addresses(&answer), vec![Ipv4Addr::new(10, 0, 0, 9)]);

    let seen_queries = seen.lock().unwrap().queries.iter().filter(|(_, n)| n == "drop.test.").count();
    assert_eq!(seen_queries, 2, "a query lost with a connection is re-sent once, not more");
    assert!(seen.lock().unwrap().connections >= 4, "a connection per drop");
    assert!(forwarder.stderr().contains("reconnecting"), "{}", forwarder.stderr());
    forwarder.signal("TERM");
    assert_eq!(forwarder.wait_exit(Duration::from_secs(10)), Some(0));
    let log = forwarder.stderr();
    assert!(log.contains("dns forwarder stopped") && log.contains("servfail=1"), "{log}");
}

#[test]
fn dns_forwarder_without_a_parent_answers_servfail_in_time_then_recovers() {
    let setup = start("dns-fwd-none", None, &["--query-timeout", "1"]);
    let (parent, port) = (&setup.parent, setup.port);

    let started = Instant::now();
    let answer = udp_ask(port, 31, "n1.test.", Some(1232));
    let took = started.elapsed();
    assert_eq!((answer.metadata.id, answer.metadata.response_code), (31, ResponseCode::ServFail));
    assert!(answer.edns.is_some(), "an EDNS query gets an OPT record back");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "SERVFAIL after {took:?}");

    // The parent comes up: within the backoff's 2 s, queries are answered.
    let _seen = fake_parent(parent, HOLD);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = udp_ask(port, 32, "n2.test.", None);
        if answer.metadata.response_code == ResponseCode::NoError {
            assert_eq!(addresses(&answer), vec![Ipv4Addr::new(10, 0, 0, 2)]);
            break;
        }
        assert!(Instant::now() < deadline, "no answer after the parent came up");
    }
}

#[test]
fn dns_forwarder_survives_garbage_and_answers_afterwards() {
    let mut setup = start("dns-fwd-garbage", Some(HOLD), &[]);
    let port = setup.port;

    let udp = udp_client();
    let target = ("127.0.0.1", port);
    let mut response = query(41, "n1.test.", None);
    response[2] |= 0x80;
    let mut noise = vec![0u8; 0];
    let mut x: u32 = 12_345;
    for _ in 0..700 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        noise.push(x.to_be_bytes()[1]);
    }
    for junk in [&b"\x00\x01\x02"[..], &response, &noise[..5], &noise] {
        udp.send_to(junk, target).unwrap();
    }
    // A header whose question is cut short: FORMERR, with its ID.
    let cut = query(42, "n1.test.", None);
    udp.send_to(&cut[..cut.len() - 3], target).unwrap();
    let mut formerr = udp_receive(&udp);
    if formerr.metadata.id != 42 {
        // The noise happened to parse as a header: its FORMERR came first.
        formerr = udp_receive(&udp);
    }
    assert_eq!((formerr.metadata.id, formerr.metadata.response_code), (42, ResponseCode::FormErr));

    // TCP: a garbled frame gets FORMERR, a zero-length frame closes.
    let mut tcp = tcp_client(port);
    tcp.write_all(&frame(&cut[..cut.len() - 3])).unwrap();
    assert_eq!(tcp_receive(&mut tcp).metadata.response_code, ResponseCode::FormErr);
    tcp.write_all(&[0, 0]).unwrap();
    assert!(read_frame(&mut tcp).is_none(), "a zero-length frame closes the connection");
    let mut tcp = tcp_client(port);
    tcp.write_all(&frame(&[0u8; 5000])).unwrap();
    assert!(read_frame(&mut tcp).is_none(), "a frame above 4096 bytes closes the connection");

    let answer = udp_ask(port, 43, "n7.test.", None);
    assert_eq!((answer.metadata.id, addresses(&answer)), (43, vec![Ipv4Addr::new(10, 0, 0, 7)]));
    let mut tcp = tcp_client(port);
    tcp.write_all(&frame(&query(44, "n8.test.", None))).unwrap();
    assert_eq!(addresses(&tcp_receive(&mut tcp)), vec![Ipv4Addr::new(10, 0, 0, 8)]);
    assert!(setup.forwarder.running());
}

#[test]
fn dns_forwarder_resolv_conf_needs_port_53() {
    let (code, stderr) = run_to_exit(
        "vsock-relay",
        &["dns", "--listen", "udp:127.0.0.1:5353", "--to", "unix:/nonexistent", "--resolv-conf"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--resolv-conf needs --listen on port 53"), "{stderr}");
}

#[test]
fn bench_dns_times_lookups_through_the_forwarder_over_udp_and_tcp() {
    let setup = start("dns-bench", Some(Duration::ZERO), &[]);
    let (udp, tcp) = (format!("udp:127.0.0.1:{}", setup.port), format!("tcp:127.0.0.1:{}", setup.port));
    let run = |name: &str, targets: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["bench", "dns", "--name", name, "--queries", "40", "--json"];
        for target in targets {
            args.extend(["--to", target]);
        }
        let out = run_capturing("vsock-relay", &args, Duration::from_secs(60));
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        out.stdout
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["dns"].clone())
            .collect()
    };
    // Two targets take turns: a result each, in the order given.
    let both = run("n7.test.", &[&udp, &tcp]);
    let unknown = run("unknown.test.", &[&udp]);
    for (dns, to, code) in
        [(&both[0], &udp, "NoError"), (&both[1], &tcp, "NoError"), (&unknown[0], &udp, "NXDomain")]
    {
        assert_eq!(dns["to"].as_str(), Some(to.as_str()), "{dns}");
        assert_eq!((dns["queries"].as_u64(), dns["answered"].as_u64()), (Some(40), Some(40)), "{dns}");
        assert_eq!(dns["codes"][code].as_u64(), Some(40), "every answer {code}: {dns}");
        let (p50, max) =
            (dns["latency"]["p50_us"].as_f64().unwrap(), dns["latency"]["max_us"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= max, "{dns}");
    }
    assert_eq!((both.len(), unknown.len()), (2, 1));
    // The warming query and the 40 per target: 3 x 41 reached the parent.
    assert_eq!(setup.seen.lock().unwrap().queries.len(), 3 * 41);
}

#[test]
fn bench_dns_without_an_answer_fails_and_says_where() {
    // A UDP port nobody answers on.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = format!("udp:{}", silent.local_addr().unwrap());
    let out = run_capturing(
        "vsock-relay",
        &["bench", "dns", "--to", &to, "--name", "a.test.", "--queries", "1"],
        Duration::from_secs(30),
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains(&format!("no query to {to} was answered")), "{}", out.stderr);
}
