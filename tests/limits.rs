//! The stop and the per-client rules, through the binary on both backends:
//! a drain that never passes a reset off as a clean end (late clients,
//! connections cut when it ends, a second signal), `--max-connections`,
//! `--idle-timeout`, `--allow-cid` outside vsock, and warnings that a down
//! upstream cannot turn into one line per client.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock_relay_testkit::servers::{echo, Server, Stream};

use crate::util::{backend_arg, ping, ping_on, relay_process as relay, run_to_exit, BACKENDS};

/// SIGTERM starts a drain: open connections keep working, a client that
/// comes during the drain is refused or reset (never a clean end), a
/// second SIGTERM ends the drain at once, and the summary counts the
/// connection it cut.
#[test]
fn drain_resets_late_clients_and_a_second_signal_cuts_it_short() {
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let server = Server::tcp(echo);
        let to = format!("tcp:{}", server.tcp_addr());
        let (mut proxy, listen) = relay(backend, &to, &["-w", "2", "--drain-timeout", "60"]);
        let mut held = Stream::connect(&listen.parse().unwrap()).unwrap();
        held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(ping_on(&mut held).unwrap());

        // Clients arriving all along, before and after the stop.
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (stop, listen) = (Arc::clone(&stop), listen.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) && outcomes.len() < 2000 {
                    outcomes.push(ping(&listen).map_err(|e| e.kind()));
                }
                outcomes
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        proxy.signal("TERM");
        proxy.wait_for_log("stopping: finishing open connections", Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let outcomes = hammer.join().unwrap();
        assert!(outcomes.contains(&Ok(true)), "{backend}: some clients were served before the stop");
        assert!(
            !outcomes.contains(&Ok(false)),
            "{backend}: a client got a clean end of stream: {outcomes:?}"
        );
        assert!(outcomes.iter().any(Result::is_err), "{backend}: clients after the stop were refused");

        assert!(ping_on(&mut held).unwrap(), "{backend}: an open connection keeps working during the drain");
        assert!(proxy.running());
        proxy.signal("TERM");
        assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0), "{}", proxy.stderr());
        let mut rest = [0u8; 1];
        let cut = held.read(&mut rest);
        assert!(cut.is_err(), "{backend}: the connection cut by the drain is reset, got {cut:?}");
        let log = proxy.stderr();
        assert!(log.contains("second signal: resetting open connections now"), "{log}");
        assert!(log.contains("cut_by_drain=1"), "{log}");
    }
}

/// `--max-connections 2`: a third client is reset and logged; once one
/// closes, a new client is served.
#[test]
fn max_connections_resets_clients_beyond_it() {
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let server = Server::tcp(echo);
        let to = format!("tcp:{}", server.tcp_addr());
        let (proxy, listen) = relay(backend, &to, &["--max-connections", "2"]);
        let mut first = Stream::connect(&listen.parse().unwrap()).unwrap();
        let mut second = Stream::connect(&listen.parse().unwrap()).unwrap();
        for held in [&mut first, &mut second] {
            held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert!(ping_on(held).unwrap());
        }
        assert!(ping(&listen).is_err(), "{backend}: a third client is reset");
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(ping(&listen), Ok(true)) {
            assert!(Instant::now() < deadline, "{backend}: a client is served once one closed");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ping_on(&mut second).unwrap());
        let log = proxy.stderr();
        assert!(log.contains("client refused: --max-connections reached"), "{log}");
    }
}

/// `--idle-timeout 0.5`: a silent connection is reset after about that long;
/// one that keeps talking is not.
#[test]
fn idle_timeout_resets_silent_connections_only() {
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let server = Server::tcp(echo);
        let to = format!("tcp:{}", server.tcp_addr());
        let (_proxy, listen) = relay(backend, &to, &["--idle-timeout", "0.5"]);
        let mut silent = Stream::connect(&listen.parse().unwrap()).unwrap();
        let mut talking = Stream::connect(&listen.parse().unwrap()).unwrap();
        for stream in [&mut silent, &mut talking] {
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(ping_on(stream).unwrap());
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            assert!(ping_on(&mut talking).unwrap(), "{backend}: a talking connection stays");
            std::thread::sleep(Duration::from_millis(150));
        }
        let mut byte = [0u8; 1];
        let silent_end = silent.read(&mut byte);
        assert!(silent_end.is_err(), "{backend}: the silent connection is reset, got {silent_end:?}");
    }
}

/// A down upstream and 30 clients: one warning line names a client, the
/// others are counted (AWS's proxy, and this one before, wrote one per client).
#[test]
fn an_unreachable_upstream_logs_one_warning_with_the_client() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let to = format!("tcp:{closed}");
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let (proxy, listen) = relay(backend, &to, &["-w", "1"]);
        for _ in 0..30 {
            assert!(!matches!(ping(&listen), Ok(true)));
        }
        std::thread::sleep(Duration::from_millis(200));
        let log = proxy.stderr();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("cannot reach the upstream")).collect();
        assert_eq!(warnings.len(), 1, "{backend}: {log}");
        assert!(
            warnings[0].contains("client=tcp:127.0.0.1:"),
            "{backend}: the client is named: {}",
            warnings[0]
        );
    }
}

#[test]
fn allow_cid_on_a_listener_that_is_not_vsock_exits_1() {
    let (code, stderr) = run_to_exit(
        "vsock-relay",
        &["relay", "--listen", "tcp:127.0.0.1:0", "--to", "tcp:127.0.0.1:9", "--allow-cid", "3"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--allow-cid applies to vsock listeners only, not tcp:127.0.0.1:0"), "{stderr}");
}
