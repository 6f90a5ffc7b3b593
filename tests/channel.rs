//! The workshop's secure local channel, each app a process of its own, with
//! Unix sockets standing in for the vsock hops: client -> server -> (HTTPS
//! through) forwarder -> proxy -> a local HTTPS endpoint. Also the server's
//! wire behaviour, many clients at once, the failures a user meets, and
//! `vsock-relay demo`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vsock_relay_apps::sample::client::{self, Reply};
use vsock_relay_apps::sample::demo::HttpsEndpoint;
use vsock_relay_engine::Endpoint;

use crate::util::{backend_arg, run_capturing, run_to_exit, wait_for_unix, Proc, TempDir, BACKENDS};

const US_EAST_1: &str = r#"["3.5.0.0/19", "52.216.0.0/15"]"#;
const EU_WEST_1: &str = r#"["3.5.64.0/21"]"#;
/// A region with enough prefixes for a reply over 5 KiB.
const BIG_REGION: &str = "ap-big-1";
const BIG_PREFIXES: usize = 400;

fn big_prefix(i: usize) -> String {
    format!("10.{}.{}.0/24", i / 256, i % 256)
}

/// An ip-ranges.json in the real schema: S3 and other services, three regions.
fn document() -> Vec<u8> {
    let entry = |prefix: &str, region: &str, service: &str| serde_json::json!({"ip_prefix": prefix, "region": region, "service": service, "network_border_group": region});
    let mut prefixes = vec![
        entry("3.5.0.0/19", "us-east-1", "S3"),
        entry("3.80.0.0/12", "us-east-1", "EC2"),
        entry("52.216.0.0/15", "us-east-1", "S3"),
        entry("3.5.64.0/21", "eu-west-1", "S3"),
        entry("34.240.0.0/13", "eu-west-1", "AMAZON"),
    ];
    prefixes.extend((0..BIG_PREFIXES).map(|i| entry(&big_prefix(i), BIG_REGION, "S3")));
    serde_json::to_vec(&serde_json::json!({
        "syncToken": "1795737600",
        "createDate": "2026-11-27-00-00-00",
        "prefixes": prefixes,
        "ipv6_prefixes": [],
    }))
    .unwrap()
}

/// What to break in a channel.
#[derive(Clone, Copy, Default)]
struct Faults {
    endpoint_down: bool,
    untrusted_certificate: bool,
    proxy_not_allowlisted: bool,
    forwarder_target_missing: bool,
}

/// The running channel: the endpoint in this process, the apps as processes.
struct Channel {
    endpoint: HttpsEndpoint,
    proxy: Option<Proc>,
    forwarder: Proc,
    server: Proc,
    server_socket: PathBuf,
    url: String,
    _dir: TempDir,
}

impl Channel {
    fn start(backend: &str, faults: Faults) -> Channel {
        let dir = TempDir::new("channel");
        let endpoint = HttpsEndpoint::start(document()).unwrap();
        let ca_file = dir.path("ca.pem");
        std::fs::write(&ca_file, endpoint.ca_pem()).unwrap();
        let upstream_port = if faults.endpoint_down { closed_port() } else { endpoint.port() };
        let allowed_port = if faults.proxy_not_allowlisted { 9 } else { upstream_port };
        let allowlist = dir.path("vsock-proxy.yaml");
        std::fs::write(&allowlist, format!("allowlist:\n- {{address: localhost, port: {allowed_port}}}\n"))
            .unwrap();

        let proxy_socket = dir.path("proxy.sock");
        let proxy_args = [
            "proxy",
            "--backend",
            backend,
            "--listen",
            &format!("unix:{}", proxy_socket.display()),
            "--config",
            &allowlist.display().to_string(),
            "localhost",
            &upstream_port.to_string(),
        ]
        .map(String::from);
        let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
        let proxy = if faults.proxy_not_allowlisted {
            let (code, stderr) = run_to_exit("vsock-relay", &proxy_args);
            assert_eq!(code, 1, "{stderr}");
            assert!(stderr.contains("are not allowed: localhost:"), "{stderr}");
            None
        } else {
            let proxy = Proc::spawn("vsock-relay", &proxy_args);
            wait_for_unix(&proxy_socket, Duration::from_secs(20));
            Some(proxy)
        };

        let forward_to =
            if faults.forwarder_target_missing { dir.path("nobody.sock") } else { proxy_socket.clone() };
        let mut forwarder = Proc::spawn(
            "vsock-relay",
            &[
                "forward",
                "--backend",
                backend,
                "--listen",
                "tcp:127.0.0.1:0",
                "--to",
                &format!("unix:{}", forward_to.display()),
            ],
        );
        let url = format!("https://localhost:{}/ip-ranges.json", forwarder.logged_tcp_port());

        let server_socket = dir.path("server.sock");
        let listen = format!("unix:{}", server_socket.display());
        let ca_file = ca_file.display().to_string();
        let mut server_args = vec!["serve", "--listen", &listen, "--url", &url, "--fetch-timeout", "5"];
        if !faults.untrusted_certificate {
            server_args.extend(["--ca-file", &ca_file]);
        }
        let server = Proc::spawn("vsock-relay", &server_args);
        wait_for_unix(&server_socket, Duration::from_secs(20));
        Channel { endpoint, proxy, forwarder, server, server_socket, url, _dir: dir }
    }

    fn server_endpoint(&self) -> String {
        format!("unix:{}", self.server_socket.display())
    }

    /// Runs `vsock-relay client --to SERVER QUERY`.
    fn client(&self, query: &str) -> crate::util::Output {
        let to = self.server_endpoint();
        run_capturing(
            "vsock-relay",
            &["client", "--timeout", "20", "--to", &to, query],
            Duration::from_secs(30),
        )
    }

    /// Asserts that every app of the channel still runs.
    fn assert_running(&mut self) {
        for (name, proc) in [
            ("proxy", self.proxy.as_mut()),
            ("forwarder", Some(&mut self.forwarder)),
            ("server", Some(&mut self.server)),
        ] {
            if let Some(proc) = proc {
                assert!(proc.running(), "the {name} stopped:\n{}", proc.stderr());
            }
        }
    }
}

/// A TCP port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn whole_channel_answers_two_regions_and_an_unknown_one() {
    for backend in BACKENDS {
        let mut channel = Channel::start(backend_arg(backend), Faults::default());
        for (region, expected) in [("us-east-1", US_EAST_1), ("eu-west-1", EU_WEST_1), ("mars-north-1", "[]")]
        {
            let out = channel.client(region);
            assert_eq!(
                (out.code, out.stdout.as_str()),
                (0, format!("{expected}\n").as_str()),
                "{}",
                out.stderr
            );
        }
        // One fetch served all three: the document is cached.
        assert_eq!(channel.endpoint.requests(), 1);
        channel.assert_running();
        let log = channel.server.stderr();
        assert!(log.contains("fetched ip-ranges"), "{log}");
    }
}

/// The workshop's client sends once and waits without closing its write
/// side; the workshop's client cut replies at 1 KiB, ours reads to the end.
#[test]
fn workshop_wire_behaviour_and_a_5_kib_answer() {
    let channel = Channel::start("auto", Faults::default());
    let ask_raw = |query: &[u8]| {
        let mut stream = UnixStream::connect(&channel.server_socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.write_all(query).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    };
    assert_eq!(ask_raw(b"us-east-1"), US_EAST_1);
    assert_eq!(ask_raw(b"eu-west-1\n"), EU_WEST_1, "the query is trimmed");

    let big = ask_raw(BIG_REGION.as_bytes());
    assert!(big.len() > 5 * 1024, "{} bytes", big.len());
    let prefixes: Vec<String> = serde_json::from_str(&big).unwrap();
    let expected: Vec<String> = (0..BIG_PREFIXES).map(big_prefix).collect();
    assert_eq!(prefixes, expected);

    let out = channel.client(BIG_REGION);
    assert_eq!((out.code, out.stdout.trim_end()), (0, big.as_str()), "{}", out.stderr);
}

#[test]
fn fifty_clients_at_once() {
    let channel = Channel::start("auto", Faults::default());
    let to: Endpoint = channel.server_endpoint().parse().unwrap();
    let start = std::sync::Arc::new(std::sync::Barrier::new(50));
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let (to, start) = (to.clone(), std::sync::Arc::clone(&start));
            std::thread::spawn(move || {
                let (region, expected) =
                    if i % 2 == 0 { ("us-east-1", US_EAST_1) } else { ("eu-west-1", EU_WEST_1) };
                start.wait();
                let reply = client::ask(&to, region, Duration::from_secs(30)).unwrap();
                assert_eq!(reply, Reply::Answer(expected.to_string()), "client {i}");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    // The clients that waited for the first fetch shared it.
    assert_eq!(channel.endpoint.requests(), 1);
}

/// A failure reaches the client as one line and exit 1; the apps go on.
fn assert_one_line_error(faults: Faults, reason: &str) -> Channel {
    let mut channel = Channel::start("auto", faults);
    for _ in 0..2 {
        let started = Instant::now();
        let out = channel.client("us-east-1");
        assert_eq!(out.code, 1, "stdout: {}\nstderr: {}", out.stdout, out.stderr);
        assert_eq!(out.stdout, "");
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        let expected = format!("vsock-relay client: error from the server: cannot fetch {}: ", channel.url);
        assert!(out.stderr.starts_with(&expected), "{}", out.stderr);
        assert!(out.stderr.contains(reason), "expected `{reason}`: {}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }
    channel.assert_running();
    channel
}

/// How the server words a connection the channel closed.
const CHANNEL_CLOSED: &str =
    "(the channel closed the connection: check the forwarder and the parent's vsock-proxy)";

#[test]
fn endpoint_down_is_a_one_line_error() {
    let channel = assert_one_line_error(Faults { endpoint_down: true, ..Faults::default() }, CHANNEL_CLOSED);
    let log = channel.proxy.as_ref().unwrap().stderr();
    assert!(log.contains("Connection refused"), "the proxy's log says which hop failed:\n{log}");
}

#[test]
fn untrusted_certificate_is_a_one_line_error() {
    assert_one_line_error(
        Faults { untrusted_certificate: true, ..Faults::default() },
        "invalid peer certificate: UnknownIssuer (the certificate is not trusted: add its CA with --ca-file)",
    );
}

#[test]
fn proxy_not_allowlisting_the_host_is_a_one_line_error() {
    assert_one_line_error(Faults { proxy_not_allowlisted: true, ..Faults::default() }, CHANNEL_CLOSED);
}

#[test]
fn forwarder_target_missing_is_a_one_line_error() {
    let channel =
        assert_one_line_error(Faults { forwarder_target_missing: true, ..Faults::default() }, CHANNEL_CLOSED);
    let log = channel.forwarder.stderr();
    assert!(log.contains("nobody.sock"), "the forwarder's log says which hop failed:\n{log}");
}

#[test]
fn client_refused_timeout_and_usage() {
    let dir = TempDir::new("client");
    let nobody = format!("unix:{}", dir.path("nobody.sock").display());
    let out =
        run_capturing("vsock-relay", &["client", "--to", &nobody, "us-east-1"], Duration::from_secs(30));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(&format!("vsock-relay client: error: cannot connect to {nobody}: ")),
        "{}",
        out.stderr
    );

    // A server that accepts and never answers.
    let silent_path = dir.path("silent.sock");
    let silent = std::os::unix::net::UnixListener::bind(&silent_path).unwrap();
    let to = format!("unix:{}", silent_path.display());
    let started = Instant::now();
    let out = run_capturing(
        "vsock-relay",
        &["client", "--timeout", "1", "--to", &to, "us-east-1"],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains(&format!("no complete reply from {to} within 1 s")), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    drop(silent);

    for (args, message) in [
        (&["client", "16", "5005"][..], "expected CID PORT QUERY"),
        (&["client", "--to", &to, "16", "us-east-1"][..], "with --to, give only QUERY"),
        (&["client", "x", "5005", "us-east-1"][..], "`x` is not a vsock CID"),
    ] {
        let (code, stderr) = run_to_exit("vsock-relay", args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn serve_refuses_bad_settings() {
    let dir = TempDir::new("serve");
    let listen = format!("unix:{}", dir.path("s.sock").display());
    for (args, message) in [
        (vec!["--url", "http://ip-ranges.amazonaws.com/ip-ranges.json"], "expected https://HOST[:PORT]/PATH"),
        (vec!["--ca-file", "/nonexistent/ca.pem"], "cannot read --ca-file /nonexistent/ca.pem"),
        (vec!["--ca-file", "/proc/version"], "no certificate in --ca-file /proc/version"),
    ] {
        let mut all = vec!["serve", "--listen", &listen];
        all.extend(args);
        let (code, stderr) = run_to_exit("vsock-relay", &all);
        assert_eq!(code, 1, "{all:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(message), "{all:?}: {stderr}");
    }
}

#[test]
fn an_empty_query_gets_an_error_line() {
    let channel = Channel::start("auto", Faults::default());
    let out = channel.client("  ");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("error from the server: empty query"), "{}", out.stderr);
}

#[test]
fn demo_exits_0_with_the_expected_prefixes() {
    let out = run_capturing("vsock-relay", &["demo", "--throughput-mib", "64"], Duration::from_secs(120));
    assert_eq!(out.code, 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    for line in [
        "vsock hops: Unix sockets (AF_VSOCK is disabled here (VSOCK_RELAY_NO_VSOCK is set))",
        r#"client us-east-1: ["3.5.0.0/19", "16.182.0.0/16", "52.216.0.0/15"]"#,
        r#"client eu-west-1: ["3.5.64.0/21", "52.218.0.0/17"]"#,
    ] {
        assert!(out.stdout.lines().any(|l| l == line), "no line `{line}` in:\n{}", out.stdout);
    }
    assert!(
        out.stdout.contains("throughput: 64 MiB through forwarder + proxy (Unix hop): "),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr, "", "the demo's story is on stdout");
}

/// The sample server's document source for `endpoint`, trusting its
/// certificate (written to `dir` as the --ca-file), caching for `cache_for`.
fn source_trusting(
    endpoint: &HttpsEndpoint,
    dir: &TempDir,
    cache_for: Duration,
) -> vsock_relay_apps::sample::ipranges::Source {
    use vsock_relay_apps::sample::ipranges::{Source, SourceSettings};
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, endpoint.ca_pem()).unwrap();
    Source::new(SourceSettings {
        url: format!("https://localhost:{}/ip-ranges.json", endpoint.port()),
        ca_file: Some(ca),
        timeout: Duration::from_secs(5),
        cache_for,
        proxy: None,
    })
    .unwrap()
}

/// While a refetch fails, every client gets the last good copy, and the
/// failure is remembered: one fetch per retry interval, not one per client
/// (clients used to get the error, and every wave refetched).
#[test]
fn serve_keeps_answering_from_the_last_good_copy_while_refetches_fail() {
    use std::sync::Arc;
    use vsock_relay_apps::sample::ipranges::RETRY_AFTER_FAILURE;

    let endpoint = HttpsEndpoint::start(document()).unwrap();
    let dir = TempDir::new("serve-cache");
    let cache_for = Duration::from_millis(300);
    let source = Arc::new(source_trusting(&endpoint, &dir, cache_for));
    let wave = |clients: usize| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let source = Arc::clone(&source);
                std::thread::spawn(move || source.get().map(|p| p.region("us-east-1").to_vec()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    };
    let good = vec!["3.5.0.0/19".to_string(), "52.216.0.0/15".to_string()];
    assert!(wave(8).iter().all(|r| r.as_ref() == Ok(&good)));
    assert_eq!(endpoint.requests(), 1, "a burst costs one fetch");

    endpoint.set_failing(true);
    std::thread::sleep(cache_for + Duration::from_millis(100));
    let started = Instant::now();
    for _ in 0..3 {
        let replies = wave(8);
        assert!(replies.iter().all(|r| r.as_ref() == Ok(&good)), "{replies:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(started.elapsed() < RETRY_AFTER_FAILURE);
    assert_eq!(endpoint.requests(), 2, "one failed refetch within the retry interval");

    // After the interval, one more try; when it succeeds, the copy is fresh again.
    endpoint.set_failing(false);
    std::thread::sleep(RETRY_AFTER_FAILURE.saturating_sub(started.elapsed()) + Duration::from_millis(200));
    assert!(wave(8).iter().all(|r| r.as_ref() == Ok(&good)));
    assert_eq!(endpoint.requests(), 3);
}

/// A self-signed certificate marked as a CA (what `openssl req -x509` makes
/// by default) served as the server's own is refused by rustls
/// (CaUsedAsEndEntity) even when given to --ca-file: the hint says why and
/// what to do, instead of "add its CA with --ca-file".
#[test]
fn a_ca_certificate_served_as_the_servers_own_gets_its_own_hint() {
    let endpoint = HttpsEndpoint::start_with_a_ca_as_server_certificate(document()).unwrap();
    let dir = TempDir::new("ca-as-server");
    let source = source_trusting(&endpoint, &dir, Duration::from_secs(60));
    let error = source.get().unwrap_err();
    assert!(error.contains("CaUsedAsEndEntity"), "{error}");
    assert!(error.contains("the server presents a CA certificate as its own"), "{error}");
    assert!(!error.contains("add its CA with --ca-file"), "{error}");
}
