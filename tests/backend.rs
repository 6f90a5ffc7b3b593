//! Backend choice: where io_uring is refused (Docker's default seccomp
//! profile returns EPERM for io_uring_setup), `auto` falls back to the
//! portable backend, says why, and relays byte-exact; `uring` refuses to run.

use std::sync::Arc;
use std::time::Duration;

use vsock_relay_testkit::exact::{cases, check_byte_exact};
use vsock_relay_testkit::seccomp::deny_io_uring;
use vsock_relay_testkit::servers::{twin, Ledger, Server};

use crate::util::{run_to_exit_with, wait_for_unix, Proc, TempDir};

#[test]
fn auto_falls_back_to_portable_when_io_uring_is_denied() {
    let ledger = Ledger::default();
    let server = Server::tcp(twin(Arc::clone(&ledger)));
    let dir = TempDir::new("seccomp");
    let listen = dir.path("relay.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let to_arg = server.endpoint().to_string();
    let mut relay = Proc::spawn_with(
        "vsock-relay",
        &["relay", "--backend", "auto", "--listen", &listen_arg, "--to", &to_arg],
        deny_io_uring,
    );
    relay.wait_for_log("relay listening", Duration::from_secs(20));
    let log = relay.stderr();
    assert!(
        log.contains(
            "backend chosen: portable, io_uring unavailable: io_uring_setup failed: Operation not permitted"
        ),
        "the log says which backend and why:\n{log}"
    );
    wait_for_unix(&listen, Duration::from_secs(5));
    check_byte_exact(&listen_arg.parse().unwrap(), &ledger, cases(32 << 20, 9));
}

#[test]
fn uring_backend_when_denied_is_a_clear_error() {
    let (code, stderr) = run_to_exit_with(
        "vsock-relay",
        &["relay", "--backend", "uring", "--listen", "tcp:127.0.0.1:0", "--to", "tcp:127.0.0.1:9"],
        deny_io_uring,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "vsock-relay: error: the io_uring backend is unavailable: io_uring_setup failed: Operation not permitted"
        ),
        "{stderr}"
    );
}
