//! Operations: Prometheus metrics checked against the traffic that made
//! them, JSON logs, many services in one process, SIGHUP reload, and the
//! systemd unit.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock_relay_testkit::exact::{cases, check_byte_exact};
use vsock_relay_testkit::servers::{echo, twin, Ledger, Server, Stream};
use vsock_relay_testkit::traffic::{self, hex};

use crate::util::{backend_arg, ping, ping_on, run_to_exit, wait_for_unix, Proc, TempDir, BACKENDS};

/// A TCP port with nothing listening (bound, then let go).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `/metrics` of the relay serving metrics on the Unix socket `path`.
pub(crate) fn scrape(path: &Path) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of one series (`name{labels}`) in a scrape.
pub(crate) fn value(metrics: &str, series: &str) -> u64 {
    let line = metrics
        .lines()
        .find(|line| line.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no series `{series}` in:\n{metrics}"));
    let number: f64 = line[series.len()..].trim().parse().unwrap();
    number as u64
}

/// Scrapes until `series` has `expected` (the relay counts a close a moment
/// after the client sees it); fails after 10 s.
pub(crate) fn wait_for_value(metrics: &Path, series: &str, expected: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(metrics);
        if value(&text, series) == expected {
            return text;
        }
        assert!(Instant::now() < deadline, "`{series}` never reached {expected}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `len` bytes to an echo through `endpoint`, half-closes, and
/// checks that exactly those bytes came back.
fn echo_exactly(endpoint: &str, len: usize) {
    let mut stream = Stream::connect(&endpoint.parse().unwrap()).unwrap();
    let sent: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    stream.write_all(&sent).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back, sent);
}

/// promtool: target/tools/bin (tests/tools/fetch.sh puts it there), else PATH.
fn promtool() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let fetched = target.join("tools/bin/promtool");
    if fetched.exists() {
        return Some(fetched);
    }
    let on_path = Command::new("promtool").arg("--version").output();
    on_path.is_ok_and(|o| o.status.success()).then(|| PathBuf::from("promtool"))
}

/// Runs a checker (promtool, systemd-analyze): whether it passed, and all
/// it said (stdout then stderr).
fn checker_output(command: &mut Command) -> (bool, String) {
    let output = command.output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), said)
}

/// Under CI a missing tool is a failure (its fetch step ran); elsewhere
/// the check is skipped, saying so.
fn missing_tool(tool: &str, how: &str) {
    assert!(std::env::var_os("CI").is_none(), "{tool} is missing under CI: {how}");
    eprintln!("SKIPPED: {tool} not found ({how})");
}

pub(crate) fn write_file(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A proxy of two services (one config file holds the allowlist and the
/// services): `echo` (at most one connection) and `dead` (an upstream that
/// refuses). Every counter is checked against what the test did, during
/// the traffic and after it; the text passes `promtool check metrics`.
#[test]
fn metrics_count_exactly_the_connections_and_bytes_made() {
    for backend in BACKENDS {
        metrics_count_exactly_on(backend_arg(backend));
    }
}

fn metrics_count_exactly_on(backend: &str) {
    let server = Server::tcp(echo);
    let (port, dead) = (server.tcp_addr().port(), dead_port());
    let dir = TempDir::new("metrics");
    let (echo_sock, dead_sock, metrics) =
        (dir.path("echo.sock"), dir.path("dead.sock"), dir.path("metrics.sock"));
    let config = write_file(
        &dir,
        "proxy.yaml",
        &format!(
            "allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n- {{address: 127.0.0.1, port: {dead}}}\n\
             services:\n\
             - {{name: echo, listen: 'unix:{}', address: 127.0.0.1, port: {port}, max_connections: 1}}\n\
             - {{name: dead, listen: 'unix:{}', address: 127.0.0.1, port: {dead}}}\n",
            echo_sock.display(),
            dead_sock.display()
        ),
    );
    let metrics_arg = format!("unix:{}", metrics.display());
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &[
            "proxy",
            "--backend",
            backend,
            "--services",
            &config,
            "--config",
            &config,
            "--metrics",
            &metrics_arg,
        ],
    );
    // Listening before it logs this (no probe connection: it would count).
    proxy.wait_for_log("serving metrics at /metrics", Duration::from_secs(20));
    let echo_arg = format!("unix:{}", echo_sock.display());
    let dead_arg = format!("unix:{}", dead_sock.display());

    // During traffic: one connection open, 4 bytes each way.
    let mut open = Stream::connect(&echo_arg.parse().unwrap()).unwrap();
    assert!(ping_on(&mut open).unwrap());
    // The relay counts bytes a moment after the client has them.
    wait_for_value(&metrics, r#"vsock_relay_bytes_total{service="echo",direction="to_client"}"#, 4);
    let during = wait_for_value(&metrics, r#"vsock_relay_connections_active{service="echo"}"#, 1);
    assert_eq!(value(&during, r#"vsock_relay_connections_accepted_total{service="echo"}"#), 1);
    assert_eq!(value(&during, r#"vsock_relay_bytes_total{service="echo",direction="to_upstream"}"#), 4);
    assert_eq!(value(&during, r#"vsock_relay_bytes_total{service="echo",direction="to_client"}"#), 4);
    assert_eq!(value(&during, r#"vsock_relay_upstream_connect_seconds_count{service="echo"}"#), 1);

    // A second client while the one allowed is open: refused by the limit.
    assert!(!matches!(ping(&echo_arg), Ok(true)), "a client beyond max_connections is refused");
    wait_for_value(&metrics, r#"vsock_relay_connections_refused_total{service="echo",reason="limit"}"#, 1);
    drop(open);
    wait_for_value(&metrics, r#"vsock_relay_connections_active{service="echo"}"#, 0);

    // Three more, one at a time, 1000 bytes each way.
    for _ in 0..3 {
        echo_exactly(&echo_arg, 1000);
        wait_for_value(&metrics, r#"vsock_relay_connections_active{service="echo"}"#, 0);
    }
    // One to the upstream that refuses.
    assert!(!matches!(ping(&dead_arg), Ok(true)));
    let after = wait_for_value(
        &metrics,
        r#"vsock_relay_connections_failed_total{service="dead",cause="connect"}"#,
        1,
    );

    let expected = [
        (r#"vsock_relay_connections_accepted_total{service="echo"}"#, 4),
        (r#"vsock_relay_connections_active{service="echo"}"#, 0),
        (r#"vsock_relay_connections_refused_total{service="echo",reason="limit"}"#, 1),
        (r#"vsock_relay_connections_refused_total{service="echo",reason="cid"}"#, 0),
        (r#"vsock_relay_connections_refused_total{service="echo",reason="allowlist"}"#, 0),
        (r#"vsock_relay_connections_failed_total{service="echo",cause="connect"}"#, 0),
        (r#"vsock_relay_connections_failed_total{service="echo",cause="client"}"#, 0),
        (r#"vsock_relay_connections_failed_total{service="echo",cause="upstream"}"#, 0),
        (r#"vsock_relay_bytes_total{service="echo",direction="to_upstream"}"#, 3004),
        (r#"vsock_relay_bytes_total{service="echo",direction="to_client"}"#, 3004),
        (r#"vsock_relay_upstream_connect_seconds_count{service="echo"}"#, 4),
        (r#"vsock_relay_upstream_connect_seconds_bucket{service="echo",le="+Inf"}"#, 4),
        (r#"vsock_relay_connection_duration_seconds_count{service="echo"}"#, 4),
        (r#"vsock_relay_connections_accepted_total{service="dead"}"#, 1),
        (r#"vsock_relay_connections_active{service="dead"}"#, 0),
        (r#"vsock_relay_connections_failed_total{service="dead",cause="connect"}"#, 1),
        (r#"vsock_relay_bytes_total{service="dead",direction="to_upstream"}"#, 0),
        (r#"vsock_relay_upstream_connect_seconds_count{service="dead"}"#, 0),
        (r#"vsock_relay_connection_duration_seconds_count{service="dead"}"#, 1),
        (r#"vsock_relay_upstream_address_changes_total{service="echo"}"#, 0),
        (r#"vsock_relay_dns_failures_total{service="echo"}"#, 0),
    ];
    for (series, count) in expected {
        assert_eq!(value(&after, series), count, "{backend}: {series}\n{after}");
    }
    let backend_label = if backend == "uring" { "io_uring" } else { "portable" };
    let build = format!(
        r#"vsock_relay_build{{backend="{backend_label}",data_path="auto",version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&after, &build), 1, "{after}");

    match promtool() {
        Some(promtool) => {
            let text = dir.path("metrics.txt");
            std::fs::write(&text, &after).unwrap();
            let (passed, said) = checker_output(
                Command::new(promtool).args(["check", "metrics"]).stdin(std::fs::File::open(&text).unwrap()),
            );
            assert!(passed, "promtool check metrics:\n{said}\n{after}");
            assert_eq!(said.trim(), "", "promtool has remarks:\n{after}");
        }
        None => missing_tool("promtool", "run tests/tools/fetch.sh target/tools"),
    }

    // Anything but GET /metrics gets a plain answer.
    let mut stream = UnixStream::connect(&metrics).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404 Not Found"), "{response}");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{}", proxy.stderr());
    assert!(!metrics.exists(), "the metrics socket file is removed at exit");
}

/// `--log-format json`: every line is one JSON object; a connection's
/// lines carry its span (id, service, client, upstream).
/// Many clients that connect to `--metrics` and send nothing (as a port
/// scanner or a stuck scraper does) must not delay a real scrape: each is
/// served on its own with a deadline, and past the bound the oldest ones
/// are closed.
#[test]
fn a_scrape_is_answered_within_a_second_while_256_silent_clients_are_connected() {
    let server = Server::tcp(echo);
    let dir = TempDir::new("silent-scrapers");
    let metrics = dir.path("metrics.sock");
    let metrics_arg = format!("unix:{}", metrics.display());
    let listen = format!("unix:{}", dir.path("relay.sock").display());
    let to = format!("tcp:{}", server.tcp_addr());
    let _relay = Proc::spawn(
        "vsock-relay",
        &["relay", "--listen", &listen, "--to", &to, "--metrics", &metrics_arg, "-w", "1"],
    );
    wait_for_unix(&metrics, Duration::from_secs(10));
    let silent: Vec<UnixStream> = (0..256).map(|_| UnixStream::connect(&metrics).unwrap()).collect();
    // Let the endpoint accept them all before the scrape queues behind them.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let body = scrape(&metrics);
    let took = started.elapsed();
    assert!(body.contains("vsock_relay_connections_accepted"), "{body}");
    assert!(took < Duration::from_secs(1), "a scrape took {took:?} with 256 silent clients connected");
    // The oldest silent clients were closed to stay within the bound: the
    // first one reads an end of stream (or a reset), well before the 5 s
    // deadline would have closed it.
    let mut first = &silent[0];
    first.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut byte = [0u8; 1];
    match first.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest silent client was not closed at the bound: {other:?}"),
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_the_connection_fields() {
    let dir = TempDir::new("json");
    let listen = dir.path("relay.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let dead = format!("tcp:127.0.0.1:{}", dead_port());
    let server = Server::tcp(echo);
    let echo_arg = server.endpoint().to_string();
    let second = dir.path("second.sock");
    let second_arg = format!("unix:{}", second.display());
    let mut relay = Proc::spawn_with(
        "vsock-relay",
        &[
            "--log-format",
            "json",
            "forward",
            "--listen",
            &listen_arg,
            "--to",
            &dead,
            "--map",
            &format!("{second_arg}={echo_arg}"),
        ],
        |command| {
            command.env("RUST_LOG", "debug");
        },
    );
    relay.wait_for_log("relay listening", Duration::from_secs(20));
    assert!(!matches!(ping(&listen_arg), Ok(true)));
    relay.wait_for_log("cannot reach the upstream", Duration::from_secs(10));
    assert!(ping(&second_arg).unwrap());
    relay.wait_for_log("connection closed", Duration::from_secs(10));
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
    let log = relay.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}")))
        .collect();
    let find = |message: &str| {
        lines.iter().find(|l| l["message"] == message).unwrap_or_else(|| panic!("no `{message}` in:\n{log}"))
    };
    let unreachable = find("cannot reach the upstream; client reset");
    assert_eq!(unreachable["level"], "WARN");
    assert!(unreachable["timestamp"].is_string());
    let span = &unreachable["span"];
    assert_eq!(span["name"], "conn");
    assert_eq!(span["service"], listen_arg.as_str());
    assert_eq!(span["upstream"], dead.as_str());
    assert!(span["client"].as_str().is_some_and(|c| c.starts_with("unix:")), "{span}");
    assert!(span["id"].as_u64().is_some(), "{span}");
    assert!(unreachable["error"].as_str().is_some_and(|e| e.contains("refused")), "{unreachable}");
    let closed = find("connection closed");
    assert_eq!(closed["level"], "DEBUG");
    assert_eq!(closed["span"]["service"], second_arg.as_str());
    assert_eq!(closed["span"]["upstream"], echo_arg.as_str());
    assert_eq!(
        (closed["to_upstream"].as_u64(), closed["to_client"].as_u64()),
        (Some(4), Some(4)),
        "{closed}"
    );
    assert_ne!(closed["span"]["id"], unreachable["span"]["id"]);
    let stopped = find("relay stopped");
    assert_eq!((stopped["accepted"].as_u64(), stopped["failed"].as_u64()), (Some(2), Some(1)), "{stopped}");
}

/// Two services in one process, each relaying byte-exact; a services file
/// with one target the allowlist refuses does not start, and says which.
#[test]
fn two_services_in_one_process_relay_byte_exact_and_a_refused_one_stops_the_start() {
    let (first_ledger, second_ledger) = (Ledger::default(), Ledger::default());
    let first = Server::tcp(twin(Arc::clone(&first_ledger)));
    let second = Server::tcp(twin(Arc::clone(&second_ledger)));
    let (first_port, second_port) = (first.tcp_addr().port(), second.tcp_addr().port());
    let dir = TempDir::new("services");
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let services = |allowed: &str| {
        format!(
            "allowlist:\n{allowed}services:\n\
             - {{name: a, listen: 'unix:{}', address: localhost, port: {first_port}}}\n\
             - {{name: b, listen: 'unix:{}', address: 127.0.0.1, port: {second_port}}}\n",
            a.display(),
            b.display()
        )
    };
    // Only the first is allowed: exit 1, naming the second.
    let config =
        write_file(&dir, "one.yaml", &services(&format!("- {{address: localhost, port: {first_port}}}\n")));
    let (code, stderr) = run_to_exit("vsock-relay", &["proxy", "--services", &config, "--config", &config]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("error: service `b` (unix:{}): the given address and port are not allowed: 127.0.0.1:{second_port}", b.display())),
        "{stderr}"
    );
    // Both allowed (a by a wildcard of localhost's kind, b by a range).
    let allowed = format!(
        "- {{address: localhost, port: {first_port}}}\n- {{address: 127.0.0.0/8, port: {second_port}}}\n"
    );
    let config = write_file(&dir, "both.yaml", &services(&allowed));
    for backend in BACKENDS {
        let mut proxy = Proc::spawn(
            "vsock-relay",
            &[
                "proxy",
                "--backend",
                backend_arg(backend),
                "-w",
                "2",
                "--services",
                &config,
                "--config",
                &config,
            ],
        );
        proxy.wait_for_log("service=b", Duration::from_secs(20));
        wait_for_unix(&b, Duration::from_secs(5));
        let (a_arg, b_arg) = (format!("unix:{}", a.display()), format!("unix:{}", b.display()));
        let checks = [(a_arg, Arc::clone(&first_ledger), 11), (b_arg, Arc::clone(&second_ledger), 12)].map(
            |(endpoint, ledger, seed)| {
                std::thread::spawn(move || {
                    check_byte_exact(&endpoint.parse().unwrap(), &ledger, cases(8 << 20, seed))
                })
            },
        );
        for check in checks {
            check.join().expect("byte-exact through both services at once");
        }
        first_ledger.lock().unwrap().clear();
        second_ledger.lock().unwrap().clear();
        let log = proxy.stderr();
        assert_eq!(log.matches("relay listening").count(), 2, "{log}");
        proxy.signal("TERM");
        assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{}", proxy.stderr());
    }
}

/// SIGHUP re-reads the allowlist: a broken file is refused and the old one
/// stays; a target removed from it refuses new clients while an open
/// transfer goes on byte-exact; put back, it serves again.
#[test]
fn sighup_reloads_the_allowlist_without_dropping_connections() {
    for backend in BACKENDS {
        reload_on(backend_arg(backend));
    }
}

fn reload_on(backend: &str) {
    let server = Server::tcp(echo);
    let port = server.tcp_addr().port();
    let dir = TempDir::new("reload");
    let listen = dir.path("proxy.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let services = format!("services:\n- {{listen: '{listen_arg}', address: 127.0.0.1, port: {port}}}\n");
    let allowing = format!("allowlist:\n- {{address: 127.0.0.0/8, port: {port}}}\n{services}");
    let config = write_file(&dir, "proxy.yaml", &allowing);
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &["proxy", "--backend", backend, "--services", &config, "--config", &config],
    );
    proxy.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&listen, Duration::from_secs(5));
    assert!(ping(&listen_arg).unwrap());

    // A broken file: refused, the old allowlist stays in force.
    write_file(&dir, "proxy.yaml", "allowlist: [ {address: 127.0.0.1\n");
    proxy.signal("HUP");
    proxy.wait_for_log("reload refused: the allowlist in force stays", Duration::from_secs(10));
    assert!(ping(&listen_arg).unwrap(), "still served after a refused reload");

    // An open transfer: half of it before the reload, half after.
    let mut open = Stream::connect(&listen_arg.parse().unwrap()).unwrap();
    let mut reader = open.try_clone().unwrap();
    let received = std::thread::spawn(move || traffic::receive(&mut reader).unwrap());
    let (total, seed) = (8u64 << 20, 77);
    let mut source = traffic::Data::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut send = |stream: &mut Stream, count: u64| {
        for _ in 0..count {
            source.fill(&mut chunk);
            stream.write_all(&chunk).unwrap();
        }
    };
    send(&mut open, 4);
    write_file(
        &dir,
        "proxy.yaml",
        &format!("allowlist:\n- {{address: 127.0.0.1, port: {}}}\n{services}", port + 1),
    );
    proxy.signal("HUP");
    proxy.wait_for_log("no longer allowed: new clients are refused", Duration::from_secs(10));
    let refused = ping(&listen_arg);
    assert!(!matches!(refused, Ok(true)), "{backend}: a new client is refused after the reload: {refused:?}");
    proxy.wait_for_log("client refused: the service's target is no longer allowed", Duration::from_secs(10));
    send(&mut open, 4);
    open.shutdown(Shutdown::Write).unwrap();
    let (bytes, hash) = received.join().unwrap();
    assert_eq!(bytes, total, "{backend}: the open transfer came back whole");
    assert_eq!(hex(&hash), hex(&traffic::expected_hash(total, seed)), "{backend}: byte-exact");

    // Allowed again.
    write_file(&dir, "proxy.yaml", &allowing);
    proxy.signal("HUP");
    proxy.wait_for_log("allowed again: serving new clients", Duration::from_secs(10));
    assert!(ping(&listen_arg).unwrap());
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{}", proxy.stderr());
    assert!(proxy.stderr().contains("refused=1"), "{}", proxy.stderr());
}

/// The systemd unit passes `systemd-analyze verify` with its binary in
/// place, and has the hardening and reload it promises.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string("dist/systemd/vsock-relay-proxy@.service").unwrap();
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_VSOCK AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return missing_tool("systemd-analyze", "install Debian's systemd package");
    }
    let dir = TempDir::new("systemd");
    let binary = vsock_relay_testkit::binary("vsock-relay");
    let here = unit.replace("/usr/local/bin/vsock-relay", &binary.display().to_string());
    std::fs::write(dir.path("vsock-relay-proxy@.service"), here).unwrap();
    std::os::unix::fs::symlink("vsock-relay-proxy@.service", dir.path("vsock-relay-proxy@kms.service"))
        .unwrap();
    let (passed, said) = checker_output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path("vsock-relay-proxy@kms.service"))
            .env("SYSTEMD_LOG_COLOR", "0"),
    );
    assert!(passed, "systemd-analyze verify failed:\n{said}");
    let about_ours: Vec<&str> = said.lines().filter(|l| l.contains("vsock-relay-proxy@")).collect();
    assert!(about_ours.is_empty(), "systemd-analyze has remarks on the unit:\n{said}");
}
