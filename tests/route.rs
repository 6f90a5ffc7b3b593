//! Routed egress: one proxy port for every allowed host (HTTP CONNECT,
//! SOCKS5, TLS SNI), through the enclave's forwarder as in production, with
//! real clients (curl, openssl, rustls, the sample server's HTTPS client).
//! Destinations are names of a name server the test runs; every refusal of
//! an address off loopback is tested in a network namespace with only
//! loopback, so a refusal that failed would reach nothing.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
use vsock_relay_apps::sample::ipranges::{Source, SourceSettings};
use vsock_relay_testkit::names::{Answer, NameServer};
use vsock_relay_testkit::servers::{echo, Server};
use vsock_relay_testkit::traffic::{expected_hash, Data};

use crate::ops::{value, wait_for_value, write_file};
use crate::util::{backend_arg, wait_for_unix, Proc, TempDir, BACKENDS};

const WEB: &str = "web.route.test";

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A routed proxy listening on a Unix socket in `dir`, and the enclave's
/// forwarder before it on a loopback TCP port.
struct Egress {
    proxy: Proc,
    _forward: Proc,
    /// The forwarder's port: where enclave applications point their proxy setting.
    port: u16,
}

fn egress(
    backend: &str,
    route: &str,
    dir: &TempDir,
    config: &str,
    names: &NameServer,
    extra: &[&str],
) -> Egress {
    let socket = dir.path(&format!("{route}.sock"));
    let socket_text = format!("unix:{}", socket.display());
    let dns = names.addr().to_string();
    let mut args = vec!["proxy", "--backend", backend, "--listen", &socket_text, "--route", route];
    args.extend(["--config", config, "--dns-server", &dns]);
    args.extend_from_slice(extra);
    let mut proxy = Proc::spawn_with("vsock-relay", &args, |c| {
        c.env("RUST_LOG", "info,vsock_relay_engine::route=debug");
    });
    proxy.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&socket, Duration::from_secs(10));
    let map = format!("tcp:127.0.0.1:0={socket_text}");
    let mut forward = Proc::spawn("vsock-relay", &["forward", "--backend", backend, "--map", &map]);
    let port = forward.logged_tcp_port();
    Egress { proxy, _forward: forward, port }
}

/// Runs curl; (exit code, stdout, stderr).
fn curl(args: &[&str]) -> (i32, String, String) {
    let output =
        Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("run curl");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
    if found.is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{tool} is missing, and CI must run this test");
    eprintln!("skipped: {tool} is not installed");
    false
}

/// The sample server's HTTPS client (ureq with rustls), set to use `proxy`.
fn fetch_through(proxy: &str, url: &str, ca: &Path) -> Result<usize, String> {
    let source = Source::new(SourceSettings {
        url: url.to_string(),
        ca_file: Some(ca.to_path_buf()),
        timeout: Duration::from_secs(10),
        cache_for: Duration::from_secs(1),
        proxy: Some(proxy.to_string()),
    })
    .map_err(|e| e.to_string())?;
    source.get().map(|prefixes| prefixes.region("us-east-1").len())
}

#[test]
fn curl_and_a_rust_client_reach_https_by_name_and_by_address_through_forwarder_and_proxy() {
    if !have("curl") {
        return;
    }
    for backend in BACKENDS {
        reach_https_on(backend_arg(backend));
    }
}

fn reach_https_on(backend: &str) {
    let bind = SocketAddr::new(loopback(1), 0);
    let https = HttpsEndpoint::start_at(bind, vec![WEB.into(), "127.0.0.1".into()], SAMPLE_DOCUMENT.to_vec())
        .unwrap();
    let port = https.port();
    let names = NameServer::start();
    names.set(WEB, Answer::Addresses(vec![loopback(1)]));
    names.set("elsewhere.example", Answer::Addresses(vec!["192.0.2.7".parse().unwrap()]));
    let dir = TempDir::new("route-https");
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, https.ca_pem()).unwrap();
    let ca_text = ca.display().to_string();
    let config = write_file(
        &dir,
        "egress.yaml",
        &format!("allowlist:\n- {{address: '*.route.test', port: {port}}}\n- {{address: 127.0.0.0/8, port: {port}}}\n"),
    );
    let metrics = dir.path("metrics.sock");
    let metrics_arg = format!("unix:{}", metrics.display());
    let mut connect = egress(backend, "connect", &dir, &config, &names, &["--metrics", &metrics_arg]);
    let mut socks = egress(backend, "socks5", &dir, &config, &names, &[]);
    let document = String::from_utf8_lossy(SAMPLE_DOCUMENT).into_owned();
    let http_proxy = format!("http://127.0.0.1:{}", connect.port);
    let socks_proxy = format!("127.0.0.1:{}", socks.port);

    // curl by name and by address, through CONNECT and through SOCKS5
    // (--socks5-hostname: the name is resolved by the proxy).
    for host in [WEB, "127.0.0.1"] {
        let url = format!("https://{host}:{port}/ip-ranges.json");
        let (code, body, err) = curl(&["--proxy", &http_proxy, "--cacert", &ca_text, &url]);
        assert_eq!(
            (code, body == document),
            (0, true),
            "{backend} CONNECT {url}: {err}\n{}",
            connect.proxy.stderr()
        );
        let (code, body, err) = curl(&["--socks5-hostname", &socks_proxy, "--cacert", &ca_text, &url]);
        assert_eq!(
            (code, body == document),
            (0, true),
            "{backend} SOCKS5 {url}: {err}\n{}",
            socks.proxy.stderr()
        );
    }
    // The sample server's Rust HTTPS client, set to use either proxy.
    let url = format!("https://{WEB}:{port}/ip-ranges.json");
    assert_eq!(fetch_through(&http_proxy, &url, &ca), Ok(3), "{backend}: {}", connect.proxy.stderr());
    let socks_url = format!("socks5h://{socks_proxy}");
    assert_eq!(fetch_through(&socks_url, &url, &ca), Ok(3), "{backend}: {}", socks.proxy.stderr());

    // Not allowed: the name at an address no entry holds, and an allowed
    // name on a port no entry has. CONNECT answers 403, SOCKS5 0x02, and
    // the proxy logs the destination; no connect is tried.
    let refused = format!("https://elsewhere.example:{port}/");
    let (code, _, err) = curl(&["--proxy", &http_proxy, "--cacert", &ca_text, &refused]);
    assert_eq!(code, 56, "{err}");
    assert!(err.contains("403"), "{err}");
    let (code, _, err) = curl(&["--socks5-hostname", &socks_proxy, &format!("https://{WEB}:{}/", port + 1)]);
    assert_eq!(code, 97, "{err}");
    assert!(err.contains("(2)"), "SOCKS5 reply 0x02, not allowed by ruleset: {err}");
    connect.proxy.wait_for_log(&format!("destination=elsewhere.example:{port}"), Duration::from_secs(5));
    let log = connect.proxy.stderr();
    assert!(log.contains("routed client refused") && log.contains("matches no entry"), "{log}");
    socks.proxy.wait_for_log(&format!("destination={WEB}:{}", port + 1), Duration::from_secs(5));

    // A name that does not exist: 502, the reason in the body.
    let (code, _, err) =
        curl(&["--proxy", &http_proxy, "--proxytunnel", "-v", &format!("http://missing.route.test:{port}/")]);
    assert_eq!(code, 56, "{err}");
    assert!(err.contains("502"), "{err}");

    // Counted by decision, and by the entry that allowed them (a refused
    // client's end is counted a moment after it has the answer).
    let service = format!("service=\"unix:{}\"", dir.path("connect.sock").display());
    let failed = format!("vsock_relay_connections_failed_total{{{service},cause=\"route\"}}");
    let text = wait_for_value(&metrics, &failed, 2);
    let routed = |decision: &str| {
        value(&text, &format!("vsock_relay_routed_total{{{service},decision=\"{decision}\"}}"))
    };
    assert_eq!((routed("allowed"), routed("not_allowed"), routed("unresolved")), (3, 1, 1), "{text}");
    let entry =
        format!("vsock_relay_routed_allowed_by_entry_total{{{service},entry=\"127.0.0.0/8:{port}\"}}");
    assert_eq!(value(&text, &entry), 3, "{text}");
}

/// Reads an HTTP response head (through the blank line) byte by byte.
fn response_head(stream: &mut impl Read) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn a_connect_tunnel_carries_64_mib_byte_exact_with_the_bytes_sent_after_its_head() {
    for backend in BACKENDS.map(backend_arg) {
        let server = Server::tcp(echo);
        let echo_port = server.tcp_addr().port();
        let names = NameServer::start();
        let dir = TempDir::new("route-bulk");
        let config = write_file(
            &dir,
            "egress.yaml",
            &format!("allowlist:\n- {{address: 127.0.0.1, port: {echo_port}}}\n"),
        );
        let egress = egress(backend, "connect", &dir, &config, &names, &[]);
        let (len, seed) = (64u64 << 20, 23);
        let mut stream = TcpStream::connect(("127.0.0.1", egress.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            // The head and the first payload bytes in one write, before any
            // answer: they must reach the server after the tunnel opens.
            let mut chunk = vec![0u8; 64 << 10];
            let mut data = Data::new(seed);
            let mut first =
                format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n")
                    .into_bytes();
            data.fill(&mut chunk[..1000]);
            first.extend_from_slice(&chunk[..1000]);
            writer.write_all(&first)?;
            let mut left = len - 1000;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                data.fill(&mut chunk[..n]);
                writer.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            writer.shutdown(Shutdown::Write)
        });
        let head = response_head(&mut stream).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        let (received, hash) = vsock_relay_testkit::traffic::receive(&mut stream).unwrap();
        sending.join().unwrap().unwrap();
        assert_eq!(received, len, "{}", egress.proxy.stderr());
        assert_eq!(hash, expected_hash(len, seed), "bytes changed in the tunnel");
    }
}

/// What a routed proxy on `socket` answers to a CONNECT for `target`.
fn connect_answer(socket: &Path, target: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The reply code a SOCKS5 proxy on `socket` gives a CONNECT request whose
/// address part (type, address) is `address`, to port 80.
fn socks_reply(socket: &Path, address: &[u8]) -> u8 {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0], "no authentication chosen");
    let mut request = vec![5, 1, 0];
    request.extend_from_slice(address);
    request.extend_from_slice(&80u16.to_be_bytes());
    stream.write_all(&request).unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).unwrap();
    reply[1]
}

#[test]
fn the_metadata_service_and_names_resolving_to_it_are_refused_under_a_matching_wildcard() {
    vsock_relay_testkit::binary("vsock-relay");
    let isolated = vsock_relay_testkit::netns::in_empty_network(|| {
        for backend in BACKENDS {
            refuse_reserved_on(backend_arg(backend));
        }
    });
    if let Err(e) = isolated {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: no network namespace: {e}");
        eprintln!("skipped: cannot make a network namespace here ({e}); needs root");
    }
}

fn refuse_reserved_on(backend: &str) {
    let names = NameServer::start();
    names.set("imds.route.test", Answer::Addresses(vec!["169.254.169.254".parse().unwrap()]));
    names.set("imds6.route.test", Answer::Addresses(vec!["fd00:ec2::254".parse().unwrap()]));
    let dir = TempDir::new("route-reserved");
    let config = write_file(
        &dir,
        "egress.yaml",
        "allowlist:\n- {address: '*.route.test', port: 80}\n- {address: 0.0.0.0/0, port: 80}\n- {address: '::/0', port: 80}\n",
    );
    let mut connect = egress(backend, "connect", &dir, &config, &names, &[]);
    let socks = egress(backend, "socks5", &dir, &config, &names, &[]);
    let connect_socket = dir.path("connect.sock");
    for target in [
        "imds.route.test:80",
        "169.254.169.254:80",
        "imds6.route.test:80",
        "[fd00:ec2::254]:80",
        "[fe80::1]:80",
    ] {
        let answer = connect_answer(&connect_socket, target);
        assert!(answer.starts_with("HTTP/1.1 403 "), "{backend} {target}: {answer}");
    }
    let answer = connect_answer(&connect_socket, "imds.route.test:80");
    assert!(answer.contains("169.254.169.254") && answer.contains("link-local"), "{answer}");
    connect.proxy.wait_for_log("destination=imds.route.test:80", Duration::from_secs(5));
    let socks_socket = dir.path("socks5.sock");
    let mut by_name = vec![3, 15];
    by_name.extend_from_slice(b"imds.route.test");
    assert_eq!(socks_reply(&socks_socket, &by_name), 0x02, "{}", socks.proxy.stderr());
    assert_eq!(socks_reply(&socks_socket, &[1, 169, 254, 169, 254]), 0x02);
    assert!(!connect.proxy.stderr().contains("cannot reach the upstream"), "a connect was tried");
}

/// A TLS client configuration trusting the CAs in `pems`.
fn tls_client(pems: &[&str]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// GETs the document over TLS as `name` through a proxy at `port`, the
/// ClientHello sent `per_write` bytes at a time (each its own TCP segment).
fn get_over_tls(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    name: &str,
    per_write: usize,
) -> io::Result<String> {
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::clone(config), server_name).unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = Vec::new();
    tls.write_tls(&mut hello)?;
    for piece in hello.chunks(per_write) {
        tcp.write_all(piece)?;
        if per_write < hello.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut stream = rustls::StreamOwned::new(tls, tcp);
    stream.write_all(format!("GET /ip-ranges.json HTTP/1.1\r\nHost: {name}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    match stream.read_to_string(&mut response) {
        Ok(_) => Ok(response),
        // Some servers close without close_notify; what arrived counts.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !response.is_empty() => Ok(response),
        Err(e) => Err(e),
    }
}

#[test]
fn sni_routes_two_names_to_their_upstreams_and_closes_what_names_none() {
    for backend in BACKENDS {
        sni_on(backend_arg(backend));
    }
}

fn sni_on(backend: &str) {
    // Two upstreams on one port, at two loopback addresses.
    let (a, b) = loop {
        let a = HttpsEndpoint::start_at(
            SocketAddr::new(loopback(2), 0),
            vec!["a.route.test".into()],
            b"from a".to_vec(),
        )
        .unwrap();
        let at = SocketAddr::new(loopback(3), a.port());
        if let Ok(b) = HttpsEndpoint::start_at(at, vec!["b.route.test".into()], b"from b".to_vec()) {
            break (a, b);
        }
    };
    let port = a.port();
    let names = NameServer::start();
    names.set("a.route.test", Answer::Addresses(vec![loopback(2)]));
    names.set("b.route.test", Answer::Addresses(vec![loopback(3)]));
    let dir = TempDir::new("route-sni");
    let config =
        write_file(&dir, "sni.yaml", &format!("allowlist:\n- {{address: 127.0.0.0/8, port: {port}}}\n"));
    let dns = names.addr().to_string();
    let sni_port = port.to_string();
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &[
            "proxy",
            "--backend",
            backend,
            "--listen",
            "tcp:127.0.0.1:0",
            "--route",
            "sni",
            "--sni-port",
            &sni_port,
        ]
        .into_iter()
        .chain(["--config", &config, "--dns-server", &dns, "--head-timeout", "3"])
        .collect::<Vec<_>>(),
    );
    let proxy_port = proxy.logged_tcp_port();
    let client = tls_client(&[a.ca_pem(), b.ca_pem()]);
    // rustls: each name reaches its own upstream, also with the ClientHello
    // one byte per TCP segment.
    for (name, expected, per_write) in [("a.route.test", "from a", 1 << 20), ("b.route.test", "from b", 1)] {
        let response = get_over_tls(&client, proxy_port, name, per_write).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200 OK") && response.ends_with(expected),
            "{backend} {name}: {response}"
        );
    }
    // openssl s_client with -servername.
    if have("openssl") {
        let ca_b = dir.path("b.pem");
        std::fs::write(&ca_b, b.ca_pem()).unwrap();
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-ign_eof", "-verify_return_error", "-connect"])
            .arg(format!("127.0.0.1:{proxy_port}"))
            .args(["-servername", "b.route.test", "-CAfile"])
            .arg(&ca_b)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET /ip-ranges.json HTTP/1.1\r\nHost: b.route.test\r\n\r\n")
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.ends_with("from b"),
            "{backend} openssl: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // No server name (a client given an address sends none): closed.
    let by_address = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut tls = rustls::ClientConnection::new(Arc::clone(&client), by_address).unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tls.write_tls(&mut tcp).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(tcp.read(&mut buf), Ok(0)), "closed without an answer");
    proxy.wait_for_log("no server name", Duration::from_secs(5));
    // Not TLS at all: closed at once, well within the head timeout.
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: a.route.test\r\n\r\n").unwrap();
    assert!(matches!(tcp.read(&mut buf), Ok(0)), "closed");
    assert!(started.elapsed() < Duration::from_secs(3), "closed within the head timeout");
    // Silent: closed by the head timeout (3 s).
    let mut tcp = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    assert!(matches!(tcp.read(&mut buf), Ok(0)), "closed");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(2500) && waited < Duration::from_secs(6), "{waited:?}");
}

/// A routed CONNECT proxy on loopback TCP in front of an echo server;
/// (proxy, its port, the echo server's port).
fn connect_proxy(
    backend: &str,
    names: &NameServer,
    dir: &TempDir,
    echo_port: u16,
    extra: &[&str],
) -> (Proc, u16) {
    let config = write_file(
        dir,
        "egress.yaml",
        &format!("allowlist:\n- {{address: 127.0.0.0/8, port: {echo_port}}}\n"),
    );
    let dns = names.addr().to_string();
    let mut args = vec!["proxy", "--backend", backend, "--listen", "tcp:127.0.0.1:0", "--route", "connect"];
    args.extend(["--config", &config, "--dns-server", &dns]);
    args.extend_from_slice(extra);
    let mut proxy = Proc::spawn("vsock-relay", &args);
    let port = proxy.logged_tcp_port();
    (proxy, port)
}

/// Opens a CONNECT tunnel to `target` and checks an echo through it.
fn tunnel_ping(proxy_port: u16, target: &str) -> io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", proxy_port))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())?;
    let head = response_head(&mut stream)?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(io::Error::other(head));
    }
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply)?;
    assert_eq!(&reply, b"ping");
    Ok(())
}

#[test]
fn a_thousand_slow_heads_do_not_delay_a_normal_client_and_a_huge_head_gets_431() {
    vsock_relay_engine::raise_open_files_limit().unwrap();
    for backend in BACKENDS.map(backend_arg) {
        let server = Server::tcp(echo);
        let echo_port = server.tcp_addr().port();
        let names = NameServer::start();
        let dir = TempDir::new("route-slow");
        let (proxy, port) = connect_proxy(backend, &names, &dir, echo_port, &[]);
        let head = format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n").into_bytes();
        let mut slow: Vec<TcpStream> =
            (0..1000).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        // One byte each per second, three rounds; a normal client after each.
        for round in 0..3 {
            for stream in &mut slow {
                stream.write_all(&head[round..=round]).unwrap();
            }
            let started = Instant::now();
            tunnel_ping(port, &format!("127.0.0.1:{echo_port}")).unwrap();
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "{backend}: a normal client took {took:?}\n{}",
                proxy.stderr()
            );
            std::thread::sleep(Duration::from_secs(1).saturating_sub(took));
        }
        drop(slow);
        // A 1 MiB head: 431 and a close, without reading the rest.
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let mut huge = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Padding: ".to_vec();
            huge.resize(1 << 20, b'a');
            let _ = writer.write_all(&huge); // the proxy closes before the end
        });
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{backend}: {answer}");
        sending.join().unwrap();
    }
}

#[test]
fn a_name_server_that_answers_after_2_s_delays_only_the_clients_waiting_for_that_name() {
    for backend in BACKENDS.map(backend_arg) {
        let server = Server::tcp(echo);
        let echo_port = server.tcp_addr().port();
        let names = NameServer::start();
        names.set_delayed("slow.route.test", Answer::Addresses(vec![loopback(1)]), Duration::from_secs(2));
        names.set("fast.route.test", Answer::Addresses(vec![loopback(1)]));
        let dir = TempDir::new("route-slow-dns");
        let (proxy, port) = connect_proxy(backend, &names, &dir, echo_port, &[]);
        let started = Instant::now();
        let slow_target = format!("slow.route.test:{echo_port}");
        let waiting = std::thread::spawn(move || tunnel_ping(port, &slow_target).map(|()| started.elapsed()));
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..5 {
            let asked = Instant::now();
            tunnel_ping(port, &format!("fast.route.test:{echo_port}")).unwrap();
            let took = asked.elapsed();
            assert!(took < Duration::from_secs(1), "{backend}: fast name took {took:?}\n{}", proxy.stderr());
        }
        assert!(
            started.elapsed() < Duration::from_millis(1900),
            "the fast clients were served while the slow one waited"
        );
        let slow_took = waiting.join().unwrap().unwrap();
        assert!(slow_took >= Duration::from_millis(1900), "{slow_took:?}");
    }
}

#[test]
fn a_routed_tunnel_sends_the_proxy_protocol_header_with_the_clients_address_first() {
    use vsock_relay_engine::proxy_header;
    for backend in BACKENDS.map(backend_arg) {
        // The upstream reads the header, then echoes.
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream_port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            let header = loop {
                let n = stream.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                if let Some(header) = proxy_header::parse(&got).unwrap() {
                    break header;
                }
            };
            let rest = got.split_off(header.length);
            stream.write_all(&rest).unwrap();
            tx.send(header).unwrap();
            let _ = std::io::copy(&mut stream.try_clone().unwrap(), &mut stream);
        });
        let names = NameServer::start();
        let dir = TempDir::new("route-ppv2");
        let (mut proxy, port) = connect_proxy(
            backend,
            &names,
            &dir,
            upstream_port,
            &["--proxy-protocol", "v2", "--log-format", "json"],
        );
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream
            .write_all(format!("CONNECT 127.0.0.1:{upstream_port} HTTP/1.1\r\n\r\nping").as_bytes())
            .unwrap();
        let head = response_head(&mut stream).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{}", proxy.stderr());
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ping");
        let header = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let (client, local) = header.addresses.expect("TCP addresses");
        assert_eq!(client, stream.local_addr().unwrap(), "the client's own address");
        assert_eq!(local, SocketAddr::from(([127, 0, 0, 1], port)), "the proxy's listening address");
        // The decision, logged as JSON: destination, address used, entry.
        let destination = format!("127.0.0.1:{upstream_port}");
        proxy.wait_for_log("\"decision\":\"allowed\"", Duration::from_secs(5));
        let log = proxy.stderr();
        let line: serde_json::Value = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == "routed")
            .unwrap_or_else(|| panic!("no routed line in:\n{log}"));
        assert_eq!(line["destination"], destination.as_str(), "{line}");
        assert_eq!(line["address"], destination.as_str(), "{line}");
        assert_eq!(line["rule"], format!("127.0.0.0/8:{upstream_port}").as_str(), "{line}");
    }
}

/// A loopback HTTP/1.1 server: reads one request (its head and a
/// `Content-Length` body), sends what it read on `received`, answers
/// [`HTTP_ANSWER`] and closes.
fn http_server(received: std::sync::mpsc::Sender<Vec<u8>>) -> Server {
    Server::tcp(move |mut stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let body = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .map_or(0, |len| len.trim().parse::<usize>().unwrap_or(0));
                if got.len() >= end + 4 + body {
                    break;
                }
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = received.send(got);
        let _ = stream.write_all(HTTP_ANSWER);
        let _ = stream.shutdown(Shutdown::Write);
    })
}

const HTTP_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

/// Sends `request` to the proxy on `port` and reads its answer to the end.
fn ask(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn plain_http_in_absolute_form_reaches_an_allowed_server_in_origin_form_and_others_get_403() {
    let curl_here = have("curl");
    for backend in BACKENDS.map(backend_arg) {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = http_server(tx);
        let port = server.tcp_addr().port();
        let names = NameServer::start();
        names.set(WEB, Answer::Addresses(vec![loopback(1)]));
        names.set("elsewhere.example", Answer::Addresses(vec!["192.0.2.7".parse().unwrap()]));
        let dir = TempDir::new("route-plain-http");
        let (mut proxy, proxy_port) = connect_proxy(backend, &names, &dir, port, &[]);

        // A raw client: the server gets the request in origin form (Host
        // from the URL, Proxy-* gone, Connection: close); the client gets
        // the server's response and nothing of the proxy's.
        let request = format!(
            "GET http://127.0.0.1:{port}/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\
             Proxy-Connection: Keep-Alive\r\nConnection: keep-alive\r\n\r\n"
        );
        let answer = ask(proxy_port, request.as_bytes());
        assert_eq!(answer.as_bytes(), HTTP_ANSWER, "{backend}: {answer}\n{}", proxy.stderr());
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let expected = format!(
            "GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(String::from_utf8_lossy(&got), expected, "{backend}");

        // By name, with a body sent in the same write as the head.
        let request = format!(
            "PUT http://{WEB}:{port}/file HTTP/1.1\r\nContent-Length: 5\r\nProxy-Authorization: Basic eDp5\r\n\r\nhello"
        );
        assert_eq!(ask(proxy_port, request.as_bytes()).as_bytes(), HTTP_ANSWER, "{backend}");
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let expected = format!(
            "PUT /file HTTP/1.1\r\nHost: {WEB}:{port}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        assert_eq!(String::from_utf8_lossy(&got), expected, "{backend}");

        // Not allowed (an address, a name at an address no entry holds, an
        // allowed address on another port): 403 as for CONNECT, no connect.
        for url in [
            format!("http://192.0.2.7:{port}/"),
            format!("http://elsewhere.example:{port}/"),
            format!("http://127.0.0.1:{}/", port ^ 1),
        ] {
            let answer = ask(proxy_port, format!("GET {url} HTTP/1.1\r\n\r\n").as_bytes());
            assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{backend} {url}: {answer}");
        }
        proxy.wait_for_log("destination=elsewhere.example", Duration::from_secs(5));
        // https:// in absolute form: 400, and why.
        let answer = ask(proxy_port, format!("GET https://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n").as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{backend}: {answer}");
        assert!(answer.contains("CONNECT tunnel"), "{backend}: {answer}");

        if curl_here {
            // curl with a proxy for an http:// URL sends the absolute form.
            let proxy_url = format!("http://127.0.0.1:{proxy_port}");
            let url = format!("http://{WEB}:{port}/from-curl");
            let (code, body, err) = curl(&["-x", &proxy_url, "--data-binary", "abc", &url]);
            assert_eq!((code, body.as_str()), (0, "hello\n"), "{backend}: {err}\n{}", proxy.stderr());
            let got = String::from_utf8_lossy(&rx.recv_timeout(Duration::from_secs(5)).unwrap()).into_owned();
            let start = format!("POST /from-curl HTTP/1.1\r\nHost: {WEB}:{port}\r\n");
            assert!(got.starts_with(&start), "{backend}: {got}");
            assert!(got.ends_with("\r\nConnection: close\r\n\r\nabc"), "{backend}: {got}");
            assert!(!got.to_ascii_lowercase().contains("proxy-"), "{backend}: {got}");
            let refused = format!("http://elsewhere.example:{port}/");
            let (code, status, err) =
                curl(&["-x", &proxy_url, "-w", "%{http_code}", "-o", "/dev/null", &refused]);
            assert_eq!((code, status.as_str()), (0, "403"), "{backend}: {err}");
        }
        assert!(rx.try_recv().is_err(), "{backend}: a refused request reached the server");
    }
}
