//! `vsock-relay forward`, the enclave forwarder, on the host: several
//! forwardings in one process (Unix/TCP stand-ins for the vsock hop), the
//! hosts-file step of the workshop's run.sh, and its usage errors.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use vsock_relay_testkit::servers::{Server, Stream};
use vsock_relay_testkit::traffic;

use crate::util::{backend_arg, run_to_exit, wait_for_unix, Proc, TempDir, BACKENDS};

/// A server that reads to EOF, then answers `name` and the byte count.
fn named(name: &'static str) -> Server {
    Server::tcp(move |mut stream| {
        let (bytes, _) = traffic::receive(&mut stream).unwrap();
        let _ = stream.write_all(format!("{name}:{bytes}").as_bytes());
    })
}

#[test]
fn several_mappings_in_one_process_with_half_close() {
    for backend in BACKENDS {
        let (a, b) = (named("A"), named("B"));
        let dir = TempDir::new("forward");
        let hosts = dir.path("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
        let map_a = format!("unix:{}={}", sock_a.display(), a.endpoint());
        let map_b = format!("unix:{}={}", sock_b.display(), b.endpoint());
        let hosts_arg = hosts.display().to_string();
        let args = [
            "forward",
            "--backend",
            backend_arg(backend),
            "--map",
            &map_a,
            "--map",
            &map_b,
            "--hosts",
            "ip-ranges.amazonaws.com",
            "--hosts-file",
            &hosts_arg,
        ];
        let mut forwarder = Proc::spawn("vsock-relay", &args);
        forwarder.wait_for_log("hosts entries added", Duration::from_secs(20));
        wait_for_unix(&sock_a, Duration::from_secs(5));
        wait_for_unix(&sock_b, Duration::from_secs(5));
        for (sock, expected) in [(&sock_a, "A:5000"), (&sock_b, "B:5000")] {
            let mut client = Stream::connect(&format!("unix:{}", sock.display()).parse().unwrap()).unwrap();
            traffic::send(&mut client, 5000, 1).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, expected, "{backend:?}");
        }
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 localhost\n127.0.0.1 ip-ranges.amazonaws.com\n"
        );
        drop(forwarder);
        // A second start adds nothing.
        let mut again = Proc::spawn("vsock-relay", &args);
        again.wait_for_log("relay listening", Duration::from_secs(20));
        assert!(!again.stderr().contains("hosts entries added"), "{}", again.stderr());
        assert_eq!(std::fs::read_to_string(&hosts).unwrap().matches("ip-ranges").count(), 1);
    }
}

#[test]
fn forward_usage_errors_exit_2() {
    let (code, stderr) = run_to_exit("vsock-relay", &["forward"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nothing to forward"), "{stderr}");
    let (code, stderr) = run_to_exit("vsock-relay", &["forward", "127.0.0.1", "443", "3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("expected LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT (4 values), got 3"),
        "{stderr}"
    );
    let (code, stderr) = run_to_exit("vsock-relay", &["forward", "localhost", "443", "3", "8001"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("LOCAL_IP `localhost` is not an IP address"), "{stderr}");
    let (code, stderr) = run_to_exit("vsock-relay", &["forward", "--map", "443"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("expected LISTEN=TO"), "{stderr}");
}

#[test]
fn hosts_file_not_writable_is_a_clear_error() {
    let (code, stderr) = run_to_exit(
        "vsock-relay",
        &[
            "forward",
            "--map",
            "unix:/nonexistent/x.sock=tcp:127.0.0.1:9",
            "--hosts",
            "a.example",
            "--hosts-file",
            "/proc/version",
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("vsock-relay: error: cannot add a.example to /proc/version"), "{stderr}");
}

/// In the enclave `lo` starts down; `--hosts` brings it up (tested in a
/// network namespace of our own, whose `lo` is down likewise).
#[test]
fn hosts_brings_a_down_loopback_up() {
    let dir = TempDir::new("forward-netns");
    let hosts = dir.path("hosts");
    let map = format!("unix:{}=tcp:127.0.0.1:9", dir.path("f.sock").display());
    let hosts_arg = hosts.display().to_string();
    let args = ["forward", "--map", &map, "--hosts", "ip-ranges.amazonaws.com", "--hosts-file", &hosts_arg];
    let Some(mut forwarder) = Proc::spawn_in_new_netns("vsock-relay", &args) else {
        let why = "cannot create a network namespace here (unshare -n and unshare -rn both refused)";
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: {why}");
        eprintln!("skipped: {why}");
        return;
    };
    forwarder.wait_for_log("relay listening", Duration::from_secs(20));
    let log = forwarder.stderr();
    assert!(log.contains("loopback interface brought up"), "{log}");
    assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.0.1 ip-ranges.amazonaws.com\n");
}
