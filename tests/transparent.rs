//! Transparent egress with DNS answered by the parent, as an enclave uses
//! it: an "enclave" network namespace whose outgoing TCP legacy iptables
//! redirects to `vsock-relay forward --transparent`, and whose resolver is
//! `vsock-relay dns`; a "parent" namespace with the proxy's `dns` and
//! `transparent` services, a name server and HTTPS servers on addresses
//! off loopback. Unix sockets stand in for vsock between the two. Real
//! clients (curl, Python's urllib, `openssl s_client`) run with no proxy
//! variable and no hosts line. No packet leaves the machine: each
//! namespace has only its loopback interface.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use vsock_relay_apps::dns::answered::Answered;
use vsock_relay_apps::dns::server::{Answerer, DnsSettings, DEFAULT_RATE};
use vsock_relay_apps::relay::allowlist::Allowlist;
use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
use vsock_relay_engine::{DnsOptions, Peer};
use vsock_relay_testkit::names::{Answer, NameServer};
use vsock_relay_testkit::netns::in_empty_network;

use crate::ops::write_file;
use crate::util::{backend_arg, wait_for_unix, Proc, TempDir, BACKENDS};

const ALLOWED: &str = "web.transparent.test";
const METADATA: &str = "metadata.transparent.test";
const NOT_LISTED: &str = "elsewhere.example";
/// The allowed name's address, on the parent's loopback.
const WEB_ADDRESS: &str = "198.51.100.10";
/// An address no entry allows and no answered name explains.
const OTHER_ADDRESS: &str = "198.51.100.20";
/// The enclave's own address, the source of its default route via `lo`.
const ENCLAVE_ADDRESS: &str = "10.0.2.15";
/// Where the redirect sends the enclave's TCP (the transparent forwarder).
const CAPTURE_PORT: u16 = 8100;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

const ALLOWLIST: &str = "allowlist:\n- {address: '*.transparent.test', port: 443}\n";

/// The DNS service's answers, asked directly: an allowed name answered
/// and remembered for this client only, the metadata address withheld, a
/// name no entry names refused, a missing name NXDOMAIN.
#[test]
fn the_dns_service_answers_allowed_names_and_remembers_them_per_client() {
    let names = NameServer::start();
    names.set(ALLOWED, Answer::Addresses(vec![ip(WEB_ADDRESS), ip("2001:db8::10")]));
    names.set(METADATA, Answer::Addresses(vec![ip("169.254.169.254"), ip("127.0.0.1")]));
    names.set(NOT_LISTED, Answer::Addresses(vec![ip(OTHER_ADDRESS)]));
    let allowlist = Allowlist::parse(ALLOWLIST, Path::new("t.yaml")).unwrap();
    let answered = Arc::new(Answered::default());
    let settings = DnsSettings {
        allowlist: Arc::new(RwLock::new(allowlist)),
        dns: DnsOptions { servers: vec![names.addr()], ..DnsOptions::default() },
        answered: Arc::clone(&answered),
        rate: DEFAULT_RATE,
        allow_cids: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answerer = {
        let _in = runtime.enter();
        Answerer::new(settings).unwrap()
    };
    let ask = |name: &str, rtype: RecordType| {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.add_query(Query::query(Name::from_ascii(format!("{name}.")).unwrap(), rtype));
        let answer = runtime.block_on(answerer.answer(Peer::Cid(16), &query.to_vec().unwrap())).unwrap();
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, 4242);
        let addresses: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        (answer.metadata.response_code, addresses)
    };
    assert_eq!(ask(ALLOWED, RecordType::A), (ResponseCode::NoError, vec![ip(WEB_ADDRESS)]));
    assert_eq!(ask(ALLOWED, RecordType::AAAA), (ResponseCode::NoError, vec![ip("2001:db8::10")]));
    assert_eq!(
        ask(METADATA, RecordType::A),
        (ResponseCode::NoError, vec![]),
        "metadata and loopback withheld"
    );
    assert_eq!(ask(NOT_LISTED, RecordType::A), (ResponseCode::Refused, vec![]));
    assert_eq!(ask("missing.transparent.test", RecordType::A), (ResponseCode::NXDomain, vec![]));
    assert_eq!(answered.names(Peer::Cid(16), ip(WEB_ADDRESS)), vec![ALLOWED.to_string()]);
    assert_eq!(answered.names(Peer::Cid(16), ip("2001:db8::10")), vec![ALLOWED.to_string()]);
    assert!(answered.names(Peer::Cid(17), ip(WEB_ADDRESS)).is_empty(), "another enclave was told nothing");
    assert!(answered.names(Peer::Cid(16), ip("169.254.169.254")).is_empty(), "withheld, so not remembered");
    assert!(answered.names(Peer::Cid(16), ip(OTHER_ADDRESS)).is_empty(), "refused, so not remembered");
}

/// Runs `command` (a shell line) in a mount namespace of its own whose
/// /etc/resolv.conf is `resolv` (the enclave's: the DNS forwarder), with
/// no proxy variable.
fn in_enclave(resolv: &Path, line: &str, env: &[(&str, &str)]) -> Output {
    let script = format!("mount --bind '{}' /etc/resolv.conf && {line}", resolv.display());
    let mut command = Command::new("unshare");
    command.args(["-m", "sh", "-c", &script]);
    for variable in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY"]
    {
        command.env_remove(variable);
    }
    command.envs(env.iter().copied());
    command.output().expect("run a client in the enclave")
}

fn sh(line: &str) {
    let status = Command::new("sh").args(["-c", line]).status().expect("run sh");
    assert!(status.success(), "`{line}` failed");
}

/// What this test needs of the machine, or why it skips.
fn missing_tool() -> Option<&'static str> {
    ["iptables-legacy", "curl", "openssl", "python3", "unshare", "ip"].into_iter().find(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn applications_reach_allowed_names_unchanged_through_transparent_egress() {
    if let Some(tool) = missing_tool() {
        assert!(std::env::var_os("CI").is_none(), "{tool} is missing, and CI must run this test");
        eprintln!("skipped: {tool} is not installed (apt-get install iptables curl openssl)");
        return;
    }
    for backend in BACKENDS {
        transparent_egress_on(backend_arg(backend));
    }
}

fn transparent_egress_on(backend: &str) {
    let dir = TempDir::new("transparent");
    let dns_socket = dir.path("dns.sock");
    let capture_socket = dir.path("transparent.sock");
    let (dns_text, capture_text) =
        (format!("unix:{}", dns_socket.display()), format!("unix:{}", capture_socket.display()));
    let config = write_file(&dir, "parent.yaml", &format!(
        "{}services:\n- {{name: dns, listen: '{dns_text}', route: dns}}\n- {{name: transparent, listen: '{capture_text}', route: transparent}}\n",
        ALLOWLIST
    ));
    let Ok(parent) = in_empty_network(|| {
        sh(&format!("ip addr add {WEB_ADDRESS}/32 dev lo && ip addr add {OTHER_ADDRESS}/32 dev lo"));
        let web = SocketAddr::new(ip(WEB_ADDRESS), 443);
        let https =
            HttpsEndpoint::start_at(web, vec![ALLOWED.into(), METADATA.into()], SAMPLE_DOCUMENT.to_vec())
                .unwrap();
        let other = HttpsEndpoint::start_at(
            SocketAddr::new(ip(OTHER_ADDRESS), 443),
            vec![],
            SAMPLE_DOCUMENT.to_vec(),
        )
        .unwrap();
        let names = NameServer::start();
        names.set(ALLOWED, Answer::Addresses(vec![ip(WEB_ADDRESS)]));
        names.set(METADATA, Answer::Addresses(vec![ip("169.254.169.254")]));
        names.set(NOT_LISTED, Answer::Addresses(vec![ip(OTHER_ADDRESS)]));
        let name_server = names.addr().to_string();
        let args = [
            "proxy",
            "--backend",
            backend,
            "--services",
            &config,
            "--config",
            &config,
            "--dns-server",
            &name_server,
        ];
        let mut proxy = Proc::spawn_with("vsock-relay", &args, |c| {
            c.env("RUST_LOG", "info,vsock_relay_apps::dns=debug");
        });
        proxy.wait_for_log("relay listening", Duration::from_secs(20));
        (proxy, https, other, names)
    }) else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root and must run this test");
        eprintln!("skipped: no network namespace here (not root)");
        return;
    };
    let (mut proxy, https, other, _names) = parent;
    wait_for_unix(&dns_socket, Duration::from_secs(10));
    wait_for_unix(&capture_socket, Duration::from_secs(10));
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, https.ca_pem()).unwrap();
    let resolv = dir.path("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n").unwrap();
    let before = other.requests();
    let ca_text = ca.display().to_string();
    in_empty_network(|| {
        sh(&format!("ip addr add {ENCLAVE_ADDRESS}/32 dev lo && ip route add default dev lo src {ENCLAVE_ADDRESS}"));
        sh(&format!(
            "iptables-legacy -t nat -A OUTPUT -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports {CAPTURE_PORT}"
        ));
        let mut dns = Proc::spawn("vsock-relay", &["dns", "--listen", "udp:127.0.0.1:53", "--to", &dns_text]);
        dns.wait_for_log("listening", Duration::from_secs(20));
        let listen = format!("tcp:127.0.0.1:{CAPTURE_PORT}");
        let mut forward = Proc::spawn(
            "vsock-relay",
            &["forward", "--backend", backend, "--transparent", "--listen", &listen, "--to", &capture_text],
        );
        forward.wait_for_log("relay listening", Duration::from_secs(20));
        let document = String::from_utf8_lossy(SAMPLE_DOCUMENT).into_owned();
        let url = format!("https://{ALLOWED}/ip-ranges.json");

        let curl = in_enclave(&resolv, &format!("curl -sS --max-time 20 --cacert '{ca_text}' {url}"), &[]);
        assert_eq!(String::from_utf8_lossy(&curl.stdout), document, "curl: {}", String::from_utf8_lossy(&curl.stderr));

        let python = format!(
            "python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(\"{url}\", timeout=20).read().decode())'"
        );
        let urllib = in_enclave(&resolv, &python, &[("SSL_CERT_FILE", &ca_text)]);
        assert_eq!(String::from_utf8_lossy(&urllib.stdout), document, "urllib: {}", String::from_utf8_lossy(&urllib.stderr));

        let request = format!("GET /ip-ranges.json HTTP/1.1\\r\\nHost: {ALLOWED}\\r\\nConnection: close\\r\\n\\r\\n");
        let openssl = in_enclave(
            &resolv,
            &format!(
                "printf '{request}' | timeout 20 openssl s_client -quiet -verify_return_error -CAfile '{ca_text}' -servername {ALLOWED} -connect {ALLOWED}:443"
            ),
            &[],
        );
        let said = String::from_utf8_lossy(&openssl.stdout);
        assert!(said.starts_with("HTTP/1.1 200") && said.ends_with(&document), "openssl s_client: {said} {}",
            String::from_utf8_lossy(&openssl.stderr));

        // A name no entry allows does not resolve (REFUSED): curl's code 6.
        let refused = in_enclave(&resolv, &format!("curl -sS --max-time 20 https://{NOT_LISTED}/"), &[]);
        assert_eq!(refused.status.code(), Some(6), "{}", String::from_utf8_lossy(&refused.stderr));
        // An allowed name at the metadata address resolves to nothing.
        let metadata = in_enclave(&resolv, &format!("curl -sS --max-time 20 https://{METADATA}/"), &[]);
        assert_eq!(metadata.status.code(), Some(6), "{}", String::from_utf8_lossy(&metadata.stderr));

        // An address no entry allows and no answered name explains: closed
        // without a byte (redirected, so the connect itself succeeds).
        let mut stream = TcpStream::connect((ip(OTHER_ADDRESS), 443)).expect("the redirect accepts");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = stream.write_all(b"\x16\x03\x01\x00\x05hello");
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        assert!(got.is_empty(), "{} bytes from a refused destination", got.len());
        drop((dns, forward));
    })
    .expect("an enclave namespace");
    assert_eq!(other.requests(), before, "the refused address was never reached");
    assert!(https.requests() >= 3, "curl, urllib and openssl were served: {}", https.requests());
    proxy.wait_for_log(&format!("name={ALLOWED}"), Duration::from_secs(5));
    let log = proxy.stderr();
    assert!(log.contains("transparent: allowed by the name this client was answered"), "{log}");
    let refusal =
        log.lines().find(|line| line.contains("routed client refused") && line.contains(OTHER_ADDRESS));
    assert!(refusal.is_some_and(|line| line.contains("no name with this address")), "{log}");
}

/// A DNS-over-TCP client of the parent's DNS service, from `source`.
fn dns_client(source: &str, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(ip(source), 0).into()).unwrap();
    socket.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

fn framed_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = Message::query();
    query.metadata.id = id;
    query.add_query(Query::query(Name::from_ascii(format!("{name}.")).unwrap(), RecordType::A));
    vsock_relay_apps::dns::frame::encode_frame(&query.to_vec().unwrap()).unwrap()
}

fn read_answer(stream: &mut TcpStream) -> Message {
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).expect("an answer's length");
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message).expect("an answer");
    Message::from_vec(&message).expect("an answer parses")
}

/// One client floods the DNS service with 10,000 queries a second for 5
/// seconds; another, asking once every 100 ms, is answered every time
/// (each answer's time is printed: the speed figure is the benchmark's
/// business, not this test's) and the service's memory stays bounded.
#[test]
fn a_flood_from_one_client_leaves_another_answered_and_memory_bounded() {
    let names = NameServer::start();
    names.set(ALLOWED, Answer::Addresses(vec![ip(WEB_ADDRESS)]));
    let dir = TempDir::new("dns-flood");
    let capture = format!("unix:{}", dir.path("transparent.sock").display());
    let config = write_file(&dir, "parent.yaml", &format!(
        "{ALLOWLIST}services:\n- {{name: dns, listen: 'tcp:127.0.0.1:0', route: dns}}\n- {{name: transparent, listen: '{capture}', route: transparent}}\n"
    ));
    let name_server = names.addr().to_string();
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &["proxy", "--services", &config, "--config", &config, "--dns-server", &name_server],
    );
    let port = proxy.logged_tcp_port();
    let before_kib = proxy.rss_kib();

    let mut flooder = dns_client("127.0.0.2", port);
    let mut flood_answers = flooder.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut answered, mut limited) = (0u32, 0u32);
        while answered + limited < 50_000 {
            match read_answer(&mut flood_answers).metadata.response_code {
                ResponseCode::NoError => answered += 1,
                ResponseCode::ServFail => limited += 1,
                other => panic!("the flood got {other:?}"),
            }
        }
        (answered, limited)
    });
    let flood = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        for batch in 0..500u32 {
            let due = started + Duration::from_millis(u64::from(batch) * 10);
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            let mut bytes = Vec::new();
            for i in 0..20u16 {
                bytes.extend_from_slice(&framed_query(i, ALLOWED));
            }
            for _ in 0..5 {
                flooder.write_all(&bytes).unwrap();
            }
        }
    });
    let mut other = dns_client("127.0.0.3", port);
    let mut times = Vec::new();
    for id in 0..45u16 {
        std::thread::sleep(Duration::from_millis(100));
        let asked = std::time::Instant::now();
        other.write_all(&framed_query(id, ALLOWED)).unwrap();
        let answer = read_answer(&mut other);
        times.push(asked.elapsed());
        assert_eq!((answer.metadata.id, answer.metadata.response_code), (id, ResponseCode::NoError));
        assert_eq!(answer.answers.len(), 1, "the other client's answer has the address");
    }
    flood.join().unwrap();
    let (answered, limited) = reader.join().unwrap();
    let after_kib = proxy.rss_kib();
    times.sort();
    eprintln!(
        "flood: {answered} answered, {limited} over the rate (SERVFAIL); the other client: median {:?}, max {:?}; \
         proxy RSS {before_kib} KiB before, {after_kib} KiB after",
        times[times.len() / 2],
        times[times.len() - 1],
    );
    assert!(limited > 0, "10,000 a second is over the default rate of 2,000");
    assert!(answered >= 2_000, "the flooder's own rate was answered: {answered}");
    assert!(after_kib < before_kib + 64 * 1024, "RSS grew from {before_kib} to {after_kib} KiB");
}

/// `proxy --route dns` alone: a process of one DNS service, no relay; it
/// answers over TCP and stops on SIGTERM.
#[test]
fn a_dns_service_alone_answers_and_stops_on_a_signal() {
    let names = NameServer::start();
    names.set(ALLOWED, Answer::Addresses(vec![ip(WEB_ADDRESS)]));
    let dir = TempDir::new("dns-alone");
    let config = write_file(&dir, "allowlist.yaml", ALLOWLIST);
    let name_server = names.addr().to_string();
    let args = [
        "proxy",
        "--listen",
        "tcp:127.0.0.1:0",
        "--route",
        "dns",
        "--config",
        &config,
        "--dns-server",
        &name_server,
    ];
    let mut proxy = Proc::spawn("vsock-relay", &args);
    proxy.wait_for_log("DNS service: answering", Duration::from_secs(20));
    let log = proxy.stderr();
    let mark = "listen=tcp:127.0.0.1:";
    let at = log.find(mark).expect("the DNS service's port") + mark.len();
    let port: u16 = log[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap();
    let mut client = dns_client("127.0.0.1", port);
    client.write_all(&framed_query(5, ALLOWED)).unwrap();
    client.write_all(&framed_query(6, NOT_LISTED)).unwrap();
    let mut answers = [read_answer(&mut client), read_answer(&mut client)];
    answers.sort_by_key(|a| a.metadata.id);
    assert_eq!(answers[0].metadata.response_code, ResponseCode::NoError);
    assert_eq!(answers[0].answers.len(), 1);
    assert_eq!(answers[1].metadata.response_code, ResponseCode::Refused);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{}", proxy.stderr());
}
