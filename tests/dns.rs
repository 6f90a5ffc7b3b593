//! DNS re-resolution through the proxy binary, with a name server the test
//! controls: the address follows a change after its TTL, a failing
//! resolver keeps the last good address instead of stopping the proxy, and
//! the allowlist holds for the address actually used, at start and after
//! every move.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use vsock_relay_testkit::names::{Answer, NameServer};
use vsock_relay_testkit::servers::Stream;

use crate::util::{backend_arg, wait_for_unix, Proc, TempDir, BACKENDS};

const NAME: &str = "upstream.relay.test";

/// A server on `ip:port` that answers every connection with `name`.
fn named_server(ip: Ipv4Addr, port: u16, name: &'static str) -> TcpListener {
    let listener = TcpListener::bind((ip, port)).unwrap();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for stream in accepting.incoming().flatten() {
            let mut stream = stream;
            let _ = std::io::Write::write_all(&mut stream, name.as_bytes());
        }
    });
    listener
}

fn ask(endpoint: &vsock_relay_engine::Endpoint) -> String {
    let mut stream = Stream::connect(endpoint).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Starts `vsock-relay proxy NAME port` on a Unix socket, asking the test's
/// name server, with `allowed` as the allowlist entry's address. `Err`: the
/// proxy exited (its code and stderr).
fn start_proxy(
    dir: &TempDir,
    backend: &str,
    names: &NameServer,
    allowed: &str,
    port: u16,
) -> Result<(Proc, vsock_relay_engine::Endpoint), (Option<i32>, String)> {
    let dns = names.addr();
    let cfg = dir.path("allow.yaml");
    std::fs::write(&cfg, format!("allowlist:\n- {{address: {allowed}, port: {port}}}\n")).unwrap();
    let listen = dir.path("proxy.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let (cfg_arg, dns_arg, port_arg) = (cfg.display().to_string(), dns.to_string(), port.to_string());
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &[
            "proxy",
            "--backend",
            backend,
            "--listen",
            &listen_arg,
            "--config",
            &cfg_arg,
            "--dns-server",
            &dns_arg,
            NAME,
            &port_arg,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy.stderr().contains("relay listening") {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50));
            return Err((status.code(), proxy.stderr()));
        }
        assert!(Instant::now() < deadline, "the proxy did not start:\n{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_unix(&listen, Duration::from_secs(5));
    Ok((proxy, listen_arg.parse().unwrap()))
}

/// The name has two addresses; only the second is allowlisted, and the
/// proxy would connect to the first: it refuses to start (AWS's rule; this
/// proxy used to pass when any address matched).
#[test]
fn a_name_whose_used_address_is_not_allowed_is_refused_at_start() {
    let names = NameServer::start();
    names.set(NAME, Answer::Addresses(vec![A_IP.into(), B_IP.into()]));
    let dir = TempDir::new("dns");
    let Err((code, stderr)) = start_proxy(&dir, "auto", &names, &B_IP.to_string(), 9) else {
        panic!("the proxy started although 127.0.0.2 is not allowlisted");
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: the given address and port are not allowed: {NAME}:9 (resolved to 127.0.0.2) matches no entry of"
        )),
        "{stderr}"
    );
    // The allowlisted address first: allowed.
    names.set(NAME, Answer::Addresses(vec![B_IP.into(), A_IP.into()]));
    let (proxy, _) = start_proxy(&dir, "auto", &names, &B_IP.to_string(), 9).unwrap();
    assert!(proxy.stderr().contains("allowed: address matches"), "{}", proxy.stderr());
}

/// The allowlist names an address; DNS later moves the name elsewhere: the
/// move is refused with an error log and the allowed address stays in use.
#[test]
fn a_dns_move_to_an_address_no_entry_allows_is_refused() {
    for backend in BACKENDS {
        let a = named_server(A_IP, 0, "A");
        let port = a.local_addr().unwrap().port();
        let _b = named_server(B_IP, port, "B");
        let names = NameServer::start();
        names.set(NAME, Answer::Addresses(vec![A_IP.into()]));
        let dir = TempDir::new("dns");
        let (mut proxy, endpoint) =
            start_proxy(&dir, backend_arg(backend), &names, &A_IP.to_string(), port).unwrap();
        assert_eq!(ask(&endpoint), "A");
        names.set(NAME, Answer::Addresses(vec![B_IP.into()]));
        proxy.wait_for_log("refusing the upstream's new address", Duration::from_secs(15));
        for _ in 0..3 {
            assert_eq!(ask(&endpoint), "A", "the last allowed address stays in use");
        }
        let log = proxy.stderr();
        assert!(log.contains("address=127.0.0.3 reason=the given address and port are not allowed"), "{log}");
        assert!(!log.contains("upstream address changed"), "{log}");
        // Back to an allowed address: nothing to refuse, still served.
        names.set(NAME, Answer::Addresses(vec![A_IP.into()]));
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(ask(&endpoint), "A");
        assert_eq!(log.matches("refusing the upstream's new address").count(), 1, "logged once: {log}");
    }
}

#[test]
fn proxy_follows_dns_changes_and_survives_resolver_failure() {
    for backend in BACKENDS {
        follows_dns(backend_arg(backend));
    }
}

fn follows_dns(backend: &str) {
    let a = named_server(Ipv4Addr::new(127, 0, 0, 2), 0, "A");
    let port = a.local_addr().unwrap().port();
    let _b = named_server(Ipv4Addr::new(127, 0, 0, 3), port, "B");
    let names = NameServer::start();
    names.set(NAME, Answer::Addresses(vec![A_IP.into()]));
    let dir = TempDir::new("dns");
    let (mut proxy, endpoint) = start_proxy(&dir, backend, &names, NAME, port).unwrap();
    assert_eq!(ask(&endpoint), "A");

    names.set(NAME, Answer::Addresses(vec![B_IP.into()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&endpoint) != "B" {
        assert!(Instant::now() < deadline, "the proxy never followed the new address:\n{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }

    names.set(NAME, Answer::ServerFailure);
    proxy.wait_for_log("keeping the last good address", Duration::from_secs(15));
    assert_eq!(ask(&endpoint), "B", "the last good address is still used");
    assert!(proxy.child.try_wait().unwrap().is_none(), "the proxy is still running");
    assert!(proxy.stderr().contains("upstream address changed"));
}
