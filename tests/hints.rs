//! Start-up failures say what to do: the OS error, then the hint of the
//! engine's errno table (engine/src/hint.rs), as a user meets them. A
//! machine without a vsock transport and a container refusing AF_VSOCK are
//! the kernel's own refusals under a seccomp filter; the process never
//! gets an AF_VSOCK socket.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{foreign_listener, run_capturing_with, run_to_exit, vsock_refused_by_seccomp};

/// `vsock-relay relay --listen vsock:any:18000` under a filter refusing
/// AF_VSOCK with `errno`: exit 1 and its one error line.
fn vsock_listen_refused_with(errno: i32) -> String {
    let out = run_capturing_with(
        "vsock-relay",
        &["relay", "--listen", "vsock:any:18000", "--to", "tcp:127.0.0.1:9"],
        Duration::from_secs(30),
        |command| vsock_refused_by_seccomp(command, errno),
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    out.stderr
}

#[test]
fn no_vsock_transport_says_which_module_to_load() {
    let stderr = vsock_listen_refused_with(libc::EAFNOSUPPORT);
    assert!(
        stderr.contains(
            "error: cannot listen on vsock:any:18000: Address family not supported by protocol (os error 97). \
             no vsock transport is loaded here: on a Nitro parent or in a VM, `modprobe vmw_vsock_virtio_transport`"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("`modprobe vhost_vsock`") && stderr.contains("CONFIG_VIRTIO_VSOCKETS=y"),
        "{stderr}"
    );
}

#[test]
fn vsock_refused_by_a_container_says_how_to_allow_it() {
    let stderr = vsock_listen_refused_with(libc::EPERM);
    assert!(
        stderr.contains(
            "error: cannot listen on vsock:any:18000: Operation not permitted (os error 1). \
             a seccomp filter or container refuses AF_VSOCK sockets"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("RestrictAddressFamilies="), "{stderr}");
}

/// A port held by a process that is not a relay: the error names it by PID.
#[test]
fn a_taken_port_names_the_process_holding_it() {
    let (mut holder, port) = foreign_listener();
    let listen = format!("tcp:127.0.0.1:{}", port);
    let (code, stderr) =
        run_to_exit("vsock-relay", &["relay", "--listen", &listen, "--to", "tcp:127.0.0.1:9"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 1, "{stderr}");
    let expected = format!(
        "error: cannot listen on {listen}: Address already in use (os error 98). \
         another process listens there: PID {} (python3",
        holder.id()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn an_address_not_on_this_machine_says_where_to_look() {
    let (code, stderr) =
        run_to_exit("vsock-relay", &["relay", "--listen", "tcp:192.0.2.1:18000", "--to", "tcp:127.0.0.1:9"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "cannot listen on tcp:192.0.2.1:18000: Cannot assign requested address (os error 99). \
             that address is on no interface of this machine (`ip -brief address` lists them)"
        ),
        "{stderr}"
    );
}

/// A port below 1024 for a user without CAP_NET_BIND_SERVICE (the test runs
/// the relay as `nobody` with setpriv; skipped where that is not possible).
#[test]
fn a_privileged_port_says_which_capability_it_needs() {
    let binary = vsock_relay_testkit::binary("vsock-relay");
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !as_nobody.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot run {} as nobody with setpriv here", binary.display());
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&binary)
        .args(["relay", "--listen", "tcp:127.0.0.1:1", "--to", "tcp:127.0.0.1:9"])
        .env(vsock_relay_engine::socket::NO_VSOCK_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "cannot listen on tcp:127.0.0.1:1: Permission denied (os error 13). \
             ports below 1024 need root or CAP_NET_BIND_SERVICE"
        ),
        "{stderr}"
    );
}
