//! Errors that say what to do. A socket that cannot be opened, bound or
//! connected at start fails with the OS error, which names the symptom
//! (`Address family not supported by protocol`) but not the cause on this
//! machine (no vsock transport loaded). One table maps an errno, the family
//! and the step to the one thing to try; the OS error stays in the message,
//! the hint follows it.

use std::fmt;
use std::io;

use crate::endpoint::Endpoint;
use crate::machine;

/// What was being done with the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Opening and binding a listener.
    Listen,
    /// Connecting to a target.
    Connect,
}

/// Which endpoints a row is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Vsock,
    /// A vsock CID other than the host's (2) and the loopback (1): an enclave or a VM.
    VsockPeer,
    /// TCP on a port below 1024.
    TcpPrivileged,
    Tcp,
    Unix,
    Any,
}

/// One line of the table; the first row that matches is the hint.
struct Row {
    errno: i32,
    step: Step,
    scope: Scope,
    /// `{port}`, `{cid}`, `{local_cid}` and `{holder}` are filled in.
    hint: &'static str,
}

const NO_TRANSPORT: &str = "no vsock transport is loaded here: on a Nitro parent or in a VM, \
    `modprobe vmw_vsock_virtio_transport` (a parent also needs the nitro_enclaves driver); on a \
    machine that runs VMs, `modprobe vhost_vsock`; in an enclave image, a kernel built with \
    CONFIG_VIRTIO_VSOCKETS=y (nitro-cli's default kernels have it). `vsock-relay doctor` lists what \
    is loaded";

const TABLE: &[Row] = &[
    Row { errno: libc::EAFNOSUPPORT, step: Step::Listen, scope: Scope::Vsock, hint: NO_TRANSPORT },
    Row { errno: libc::EAFNOSUPPORT, step: Step::Connect, scope: Scope::Vsock, hint: NO_TRANSPORT },
    Row { errno: libc::ENODEV, step: Step::Listen, scope: Scope::Vsock, hint: NO_TRANSPORT },
    Row {
        errno: libc::ENODEV,
        step: Step::Connect,
        scope: Scope::Vsock,
        hint:
            "no loaded vsock transport reaches CID {cid}: a parent reaches its enclaves, and a VM its host, \
            through vmw_vsock_virtio_transport (`modprobe vmw_vsock_virtio_transport`); where vhost_vsock is \
            loaded too, a CID from 3 means this machine's own VMs: reach an enclave with \
            vsock:{cid}:{port}:to-host; `vsock-relay doctor` lists what is loaded",
    },
    Row { errno: libc::EPERM, step: Step::Listen, scope: Scope::Vsock, hint: VSOCK_REFUSED },
    Row { errno: libc::EPERM, step: Step::Connect, scope: Scope::Vsock, hint: VSOCK_REFUSED },
    Row {
        errno: libc::EADDRNOTAVAIL,
        step: Step::Listen,
        scope: Scope::Vsock,
        hint: "CID {cid} is not this machine's ({local_cid}): listen on vsock:any:{port}",
    },
    Row {
        errno: libc::EADDRNOTAVAIL,
        step: Step::Listen,
        scope: Scope::Tcp,
        hint: "that address is on no interface of this machine (`ip -brief address` lists them): \
            listen on one of those, or on 0.0.0.0",
    },
    Row {
        errno: libc::EADDRINUSE,
        step: Step::Listen,
        scope: Scope::Any,
        hint: "another process listens there: {holder}; stop it, or listen on another port",
    },
    Row {
        errno: libc::EACCES,
        step: Step::Listen,
        scope: Scope::TcpPrivileged,
        hint: "ports below 1024 need root or CAP_NET_BIND_SERVICE (systemd: \
            AmbientCapabilities=CAP_NET_BIND_SERVICE); or listen on a port from 1024",
    },
    Row {
        errno: libc::EACCES,
        step: Step::Listen,
        scope: Scope::Unix,
        hint: "this user may not create the socket file there: check the directory's owner and mode",
    },
    Row { errno: libc::ECONNREFUSED, step: Step::Connect, scope: Scope::VsockPeer, hint: VSOCK_NOBODY },
    Row { errno: libc::ECONNRESET, step: Step::Connect, scope: Scope::VsockPeer, hint: VSOCK_NOBODY },
    Row { errno: libc::ETIMEDOUT, step: Step::Connect, scope: Scope::VsockPeer, hint: VSOCK_NOBODY },
    Row { errno: libc::ECONNREFUSED, step: Step::Connect, scope: Scope::Vsock, hint: VSOCK_LOCAL_NOBODY },
    Row { errno: libc::ECONNRESET, step: Step::Connect, scope: Scope::Vsock, hint: VSOCK_LOCAL_NOBODY },
];

const VSOCK_LOCAL_NOBODY: &str = "nothing listens on vsock port {port} at CID {cid}: is the relay or \
    server there running?";

const VSOCK_REFUSED: &str = "a seccomp filter or container refuses AF_VSOCK sockets: Docker's \
    default profile does (run with a profile that allows socket family 40, AF_VSOCK); a systemd \
    unit with RestrictAddressFamilies= must list AF_VSOCK";

const VSOCK_NOBODY: &str = "nothing answers on vsock port {port} at CID {cid}: is the enclave \
    running (`nitro-cli describe-enclaves` shows its EnclaveCID) and listening on {port}? On a \
    parent that also loads vhost_vsock, connect with the to-host flag (vsock:{cid}:{port}:to-host)";

/// The scopes an endpoint falls in, most specific first.
fn scopes(endpoint: &Endpoint) -> Vec<Scope> {
    match endpoint {
        Endpoint::Vsock { cid, .. } if *cid > 2 && *cid != crate::endpoint::VSOCK_CID_ANY => {
            vec![Scope::VsockPeer, Scope::Vsock, Scope::Any]
        }
        Endpoint::Vsock { .. } => vec![Scope::Vsock, Scope::Any],
        Endpoint::Tcp { port, .. } if *port < 1024 => vec![Scope::TcpPrivileged, Scope::Tcp, Scope::Any],
        Endpoint::Tcp { .. } => vec![Scope::Tcp, Scope::Any],
        Endpoint::Unix { .. } => vec![Scope::Unix, Scope::Any],
    }
}

/// The table's hint for `errno` at `step` on `endpoint`, unfilled.
fn row(step: Step, endpoint: &Endpoint, errno: i32) -> Option<&'static str> {
    scopes(endpoint).into_iter().find_map(|scope| {
        TABLE.iter().find(|r| r.errno == errno && r.step == step && r.scope == scope).map(|r| r.hint)
    })
}

/// The hint for `error` at `step` on `endpoint`, its blanks filled in from
/// this machine (the local CID, the process holding a port), if the table
/// has one.
pub fn hint(step: Step, endpoint: &Endpoint, error: &io::Error) -> Option<String> {
    let template = row(step, endpoint, error.raw_os_error()?)?;
    let (cid, port) = match endpoint {
        Endpoint::Vsock { cid, port, .. } => (cid.to_string(), port.to_string()),
        Endpoint::Tcp { port, .. } => (String::new(), port.to_string()),
        Endpoint::Unix { .. } => (String::new(), String::new()),
    };
    let mut text = template.replace("{cid}", &cid).replace("{port}", &port);
    if text.contains("{local_cid}") {
        let local = match machine::local_cid() {
            Ok(Some(local)) => format!("the local CID is {local}"),
            Ok(None) => "this machine has no CID but the loopback's, 1".to_string(),
            Err(e) => format!("the local CID is unknown: /dev/vsock: {e}"),
        };
        text = text.replace("{local_cid}", &local);
    }
    if text.contains("{holder}") {
        let holder = match machine::listener(endpoint) {
            Some(Some(holder)) => holder.to_string(),
            _ => match endpoint {
                Endpoint::Tcp { port, .. } => format!("`ss -ltnp 'sport = :{port}'` shows which"),
                Endpoint::Unix { path } => format!("`ss -lxp src {}` shows which", path.display()),
                Endpoint::Vsock { port, .. } => format!("`ss -lp --vsock 'sport = :{port}'` shows which"),
            },
        };
        text = text.replace("{holder}", &holder);
    }
    Some(text)
}

/// An OS error with the hint for it: displays as `<OS error>. <hint>`, and
/// keeps the OS error as its source (its errno stays readable).
#[derive(Debug)]
pub struct Hinted {
    pub source: io::Error,
    pub hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}. {}", self.source, self.hint)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// `error` with its hint added to its text (same kind), or as it was when
/// the table has none.
pub fn with_hint(step: Step, endpoint: &Endpoint, error: io::Error) -> io::Error {
    match hint(step, endpoint, &error) {
        Some(hint) => io::Error::new(error.kind(), Hinted { source: error, hint }),
        None => error,
    }
}

/// The errno of an error [`with_hint`] made, or of a plain OS error.
pub fn raw_os_error(error: &io::Error) -> Option<i32> {
    error.raw_os_error().or_else(|| {
        error.get_ref().and_then(|inner| inner.downcast_ref::<Hinted>()).and_then(|h| h.source.raw_os_error())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(text: &str) -> Endpoint {
        text.parse().unwrap()
    }

    #[test]
    fn the_table_answers_each_startup_errno() {
        let listen = |text: &str, errno| row(Step::Listen, &ep(text), errno);
        let connect = |text: &str, errno| row(Step::Connect, &ep(text), errno);
        assert!(listen("vsock:any:8000", libc::EAFNOSUPPORT).unwrap().contains("no vsock transport"));
        assert!(listen("vsock:any:8000", libc::ENODEV).unwrap().contains("modprobe vhost_vsock"));
        assert!(connect("vsock:16:8000", libc::EAFNOSUPPORT).unwrap().contains("CONFIG_VIRTIO_VSOCKETS"));
        assert!(connect("vsock:16:8000", libc::ENODEV)
            .unwrap()
            .contains("no loaded vsock transport reaches CID"));
        assert!(listen("vsock:any:8000", libc::EPERM).unwrap().contains("seccomp"));
        assert!(listen("vsock:5:8000", libc::EADDRNOTAVAIL).unwrap().contains("{local_cid}"));
        assert!(listen("tcp:10.9.9.9:80", libc::EADDRNOTAVAIL).unwrap().contains("no interface"));
        for endpoint in ["tcp:127.0.0.1:8000", "unix:/run/x.sock", "vsock:any:8000"] {
            assert!(listen(endpoint, libc::EADDRINUSE).unwrap().contains("{holder}"), "{endpoint}");
        }
        assert!(listen("tcp:0.0.0.0:443", libc::EACCES).unwrap().contains("CAP_NET_BIND_SERVICE"));
        assert_eq!(listen("tcp:0.0.0.0:8443", libc::EACCES), None, "EACCES above 1024 is something else");
        assert!(listen("unix:/run/x.sock", libc::EACCES).unwrap().contains("directory"));
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::ETIMEDOUT] {
            assert!(connect("vsock:16:5005", errno).unwrap().contains("nitro-cli describe-enclaves"));
        }
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET] {
            assert!(connect("vsock:1:5005", errno).unwrap().contains("is the relay or server there running"));
        }
        assert_eq!(connect("tcp:127.0.0.1:80", libc::ECONNREFUSED), None, "TCP says enough itself");
        assert_eq!(listen("vsock:any:8000", libc::ECONNREFUSED), None);
    }

    #[test]
    fn hints_are_filled_in_and_keep_the_os_error() {
        let error =
            with_hint(Step::Connect, &ep("vsock:16:5005"), io::Error::from_raw_os_error(libc::ECONNRESET));
        let text = error.to_string();
        assert!(
            text.starts_with(
                "Connection reset by peer (os error 104). nothing answers on vsock port 5005 at CID 16"
            ),
            "{text}"
        );
        assert!(text.contains("vsock:16:5005:to-host"), "{text}");
        assert_eq!(raw_os_error(&error), Some(libc::ECONNRESET));
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        let plain =
            with_hint(Step::Listen, &ep("tcp:127.0.0.1:8000"), io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(plain.raw_os_error(), Some(libc::EMFILE), "no hint: the error is untouched");
    }

    #[test]
    fn a_held_port_names_its_holder() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = Endpoint::tcp(held.local_addr().unwrap());
        let text = hint(Step::Listen, &endpoint, &io::Error::from_raw_os_error(libc::EADDRINUSE)).unwrap();
        assert!(text.contains(&format!("PID {} (", std::process::id())), "{text}");
        drop(held);
        let text = hint(Step::Listen, &endpoint, &io::Error::from_raw_os_error(libc::EADDRINUSE)).unwrap();
        assert!(text.contains("`ss -ltnp 'sport = :"), "{text}");
    }
}
