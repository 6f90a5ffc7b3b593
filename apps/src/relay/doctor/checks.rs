//! The checks of `vsock-relay doctor`, area by area: vsock, the backend,
//! limits, the proxy's config and listeners (parent), the forwardings and
//! the hosts file (enclave). Each returns report lines; none panics on what
//! it reads.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::endpoint::{Host, VSOCK_CID_ANY};
use vsock_relay_engine::hint::{self, Step};
use vsock_relay_engine::{machine, probe_uring, socket, DnsOptions, Endpoint, IpFamily, UringUnavailable};

use super::{Check, DoctorArgs, Side};
use crate::relay::allowlist::Allowlist;
use crate::relay::proxy::DEFAULT_CONFIG;
use crate::relay::services::{self, ServiceSpec};

/// Every check for `side`, in report order.
pub fn all(args: &DoctorArgs, side: Side) -> Vec<Check> {
    let mut checks = vsock(side);
    checks.push(backend());
    checks.push(data_path());
    let services = match side {
        Side::Parent => {
            let (mut lines, services) = config(args);
            checks.append(&mut lines);
            services
        }
        Side::Enclave => Vec::new(),
    };
    checks.append(&mut limits(args, &services));
    for spec in &services {
        checks.push(listen("listen", &spec.listen, args));
    }
    if side == Side::Enclave {
        checks.append(&mut forwardings(args));
    }
    checks
}

const TRANSPORTS: [&str; 3] = ["vmw_vsock_virtio_transport", "vhost_vsock", "vsock_loopback"];

/// `/dev/vsock`, the transports, the local CID, and whether this process
/// may make a vsock socket.
fn vsock(side: Side) -> Vec<Check> {
    let mut checks = Vec::new();
    let loaded: Vec<&str> = machine::VSOCK_MODULES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| machine::module_loaded(name))
        .collect();
    let has = |name: &str| loaded.contains(&name);
    let load = "load a transport: `modprobe vmw_vsock_virtio_transport` on a parent or in a VM, \
        `modprobe vhost_vsock` on a machine that runs VMs, `modprobe vsock_loopback` to test on one machine";
    checks.push(match Path::new("/dev/vsock").exists() {
        true => Check::ok("vsock", "/dev/vsock", "present"),
        false => Check::fail("vsock", "/dev/vsock", "missing: the vsock module is not loaded", load),
    });
    let listed = if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") };
    let transports = TRANSPORTS.iter().filter(|t| has(t)).count();
    checks.push(match (transports, side) {
        (0, _) => Check::fail("vsock", "transports", format!("loaded: {listed}; no transport"), load),
        (_, Side::Enclave) if !has("vmw_vsock_virtio_transport") && !has("vsock_loopback") => Check::fail(
            "vsock",
            "transports",
            format!("loaded: {listed}; no guest transport to reach the parent"),
            "an enclave reaches its parent through virtio vsock: its kernel needs CONFIG_VIRTIO_VSOCKETS=y",
        ),
        _ => Check::ok("vsock", "transports", format!("loaded: {listed}")),
    });
    if side == Side::Parent && has("vmw_vsock_virtio_transport") && has("vhost_vsock") {
        checks.push(Check::warn(
            "vsock",
            "routing",
            "both a guest (virtio) and a host (vhost_vsock) transport are loaded: a connection to a CID from 3 \
             goes to vhost_vsock's VMs, not to the enclaves",
            "connect to an enclave with the to-host flag: vsock:CID:PORT:to-host (or :to-host=auto)",
        ));
    }
    checks.push(match machine::local_cid() {
        Ok(Some(cid)) => Check::ok("vsock", "local CID", cid.to_string()),
        Ok(None) if has("vsock_loopback") => Check::ok("vsock", "local CID", "none but the loopback's, 1"),
        Ok(None) => Check::warn("vsock", "local CID", "none", load),
        Err(e) => Check::fail("vsock", "local CID", format!("cannot ask /dev/vsock: {e}"), load),
    });
    checks.push(match socket::probe_vsock_socket() {
        Ok(()) => Check::ok("vsock", "socket", "this process may make AF_VSOCK sockets"),
        Err(e) => {
            let (detail, fix) = split_hint(&e);
            let fix =
                fix.unwrap_or_else(|| "run doctor where the relay will run, with its privileges".into());
            Check::fail("vsock", "socket", format!("refused: {detail}"), fix)
        }
    });
    checks
}

/// An error as (the OS error, its hint if it has one).
fn split_hint(error: &std::io::Error) -> (String, Option<String>) {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<hint::Hinted>()) {
        Some(hinted) => (hinted.source.to_string(), Some(hinted.hint.clone())),
        None => (error.to_string(), None),
    }
}

/// The backend `--backend auto` will choose, and why.
fn backend() -> Check {
    let disabled = read_number("/proc/sys/kernel/io_uring_disabled");
    match probe_uring() {
        Ok(()) => Check::ok("backend", "io_uring", "chosen: setup and opcode probe passed"),
        Err(why) => {
            let cause = match (&why, disabled) {
                (_, Some(level)) if level > 0 => format!("kernel.io_uring_disabled is {level}"),
                (UringUnavailable::Setup(e), _) if e.raw_os_error() == Some(libc::EPERM) => {
                    "a seccomp filter refuses io_uring_setup (Docker's default profile does)".to_string()
                }
                (UringUnavailable::Setup(e), _) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    "this kernel has no io_uring".to_string()
                }
                (UringUnavailable::Kernel { .. }, _) => {
                    "the kernel is older than the io_uring backend needs".into()
                }
                _ => "the probe failed".to_string(),
            };
            Check::warn(
                "backend",
                "io_uring",
                format!("portable (epoll) will run: {cause} ({why})"),
                "nothing is needed: the portable backend relays the same bytes, with more system calls; for \
                 io_uring, run on Linux 5.19+ with kernel.io_uring_disabled=0 and a seccomp profile allowing \
                 io_uring_setup, io_uring_enter and io_uring_register",
            )
        }
    }
}

/// What `--data-path auto` does per family.
fn data_path() -> Check {
    Check::ok(
        "backend",
        "data path",
        "auto: splice between TCP and Unix sockets; copy, switching to splice while the source streams, \
         where vsock is on either side",
    )
}

/// The proxy's config and services files. Returns the services read.
fn config(args: &DoctorArgs) -> (Vec<Check>, Vec<ServiceSpec>) {
    let mut checks = Vec::new();
    let config = args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    });
    if let Some(path) = &config {
        match Allowlist::load(path) {
            Ok(list) => {
                checks.push(Check::ok(
                    "config",
                    path.display().to_string(),
                    format!("parses: {} allowlist entries", list.entries.len()),
                ));
                checks.append(&mut allowlist_names(&list, args));
            }
            Err(e) => checks.push(Check::fail(
                "config",
                path.display().to_string(),
                e.to_string(),
                "fix the file at the line and column named; AWS's format is `allowlist:` followed by \
                 `- {address: HOST, port: PORT}` items",
            )),
        }
    }
    let mut services = Vec::new();
    if let Some(path) = &args.services {
        match services::load(path) {
            Ok(read) => {
                checks.push(Check::ok(
                    "config",
                    path.display().to_string(),
                    format!("parses: {} services", read.len()),
                ));
                services = read;
            }
            Err(e) => checks.push(Check::fail(
                "config",
                path.display().to_string(),
                e.to_string(),
                "fix the `services:` list (each item: listen, and address and port or route)",
            )),
        }
    }
    (checks, services)
}

/// Each allowlist entry given by name, resolved as the proxy resolves it
/// (its resolver, its name servers, its timeout).
fn allowlist_names(list: &Allowlist, args: &DoctorArgs) -> Vec<Check> {
    let names: Vec<(&str, u16)> =
        list.entries.iter().filter_map(|e| Some((e.host_name()?, e.port))).collect();
    if names.is_empty() {
        return Vec::new();
    }
    let options = DnsOptions { servers: args.dns_servers.clone(), family: IpFamily::Any };
    let resolver = match Resolver::new(&options) {
        Ok(resolver) => resolver,
        Err(e) => {
            return vec![Check::fail(
                "dns",
                "resolver",
                e.to_string(),
                "give the name servers with --dns-server IP:PORT, or fix /etc/resolv.conf",
            )]
        }
    };
    names
        .into_iter()
        .map(|(name, port)| {
            let check = format!("{name}:{port}");
            match resolver.resolve(name) {
                Ok(found) => {
                    let addresses: Vec<String> = found.addresses.iter().map(IpAddr::to_string).collect();
                    let ttl = found.ttl().as_secs();
                    Check::ok("dns", check, format!("resolves to {} (TTL {ttl} s)", addresses.join(", ")))
                }
                Err(e) => Check::fail(
                    "dns",
                    check,
                    format!("resolves to nothing: {e}"),
                    "check the name's spelling and that this machine's name servers answer for it \
                     (`getent ahosts NAME`); until then this entry allows nothing",
                ),
            }
        })
        .collect()
}

/// A listen endpoint: free, held by a running relay, or held by another process.
fn listen(area: &'static str, endpoint: &Endpoint, args: &DoctorArgs) -> Check {
    let check = endpoint.to_string();
    match machine::listener(endpoint) {
        _ if matches!(endpoint, Endpoint::Vsock { .. }) => Check::ok(
            area,
            check,
            "a vsock port: not probed (doctor binds no vsock socket; `ss -lp --vsock` lists listeners)",
        ),
        None => Check::ok(area, check, "free"),
        Some(Some(holder)) if matches!(holder.name.as_str(), "vsock-relay" | "vsock-proxy") => {
            let metrics = args.metrics.as_ref().map(|at| match ask_metrics(at) {
                Ok(()) => format!("; its metrics answer on {at}"),
                Err(e) => format!("; its metrics on {at} do not answer: {e}"),
            });
            Check::ok(
                area,
                check,
                format!("held by a running relay, {holder}{}", metrics.unwrap_or_default()),
            )
        }
        Some(holder) => {
            let holder =
                holder.map_or_else(|| "a process /proc does not show".to_string(), |h| h.to_string());
            let fix =
                hint::hint(Step::Listen, endpoint, &std::io::Error::from_raw_os_error(libc::EADDRINUSE))
                    .unwrap_or_else(|| "stop it, or listen on another port".into());
            Check::fail(area, check, format!("held by {holder}"), fix)
        }
    }
}

/// GET /metrics from a running relay: does it answer 200?
fn ask_metrics(at: &Endpoint) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = crate::sample::client::connect(at, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    match &head[9..12] {
        b"200" => Ok(()),
        status => Err(std::io::Error::other(format!("HTTP {}", String::from_utf8_lossy(status)))),
    }
}

/// Open files, pipes and the listen backlog against what the relay will ask.
fn limits(args: &DoctorArgs, services: &[ServiceSpec]) -> Vec<Check> {
    let mut checks = Vec::new();
    let per_service: Option<u64> = services.iter().map(|s| s.rules.max_connections).sum();
    let connections = args.max_connections.or(per_service.filter(|_| !services.is_empty()));
    if let Some((soft, hard)) = open_files_limit() {
        // The relay raises the soft limit to the hard one at start.
        let detail = format!("RLIMIT_NOFILE {soft} soft, {hard} hard (the relay raises soft to hard)");
        checks.push(match connections {
            Some(n) if hard < n.saturating_mul(2) + 64 => Check::fail(
                "limits",
                "open files",
                format!("{detail}: too few for {n} connections (two descriptors each)"),
                format!("raise the hard limit to {} (systemd: LimitNOFILE=)", n.saturating_mul(2) + 64),
            ),
            Some(n) => Check::ok("limits", "open files", format!("{detail}: enough for {n} connections")),
            None => Check::ok(
                "limits",
                "open files",
                format!("{detail}: up to {} connections", hard.saturating_sub(64) / 2),
            ),
        });
    }
    if let Some(max) = read_number("/proc/sys/fs/pipe-max-size") {
        let wanted = u64::from(args.pipe_kib) * 1024;
        checks.push(match wanted > max {
            true => Check::warn(
                "limits",
                "pipe size",
                format!("fs.pipe-max-size is {max} bytes, --pipe-kib asks {wanted}: pipes stay smaller"),
                format!("`sysctl -w fs.pipe-max-size={wanted}`, or --pipe-kib {}", max / 1024),
            ),
            false => Check::ok(
                "limits",
                "pipe size",
                format!("fs.pipe-max-size {max} bytes, --pipe-kib {}", args.pipe_kib),
            ),
        });
    }
    if let Some(somaxconn) = read_number("/proc/sys/net/core/somaxconn") {
        checks.push(match somaxconn < 1024 {
            true => Check::warn(
                "limits",
                "listen backlog",
                format!("net.core.somaxconn is {somaxconn}: the relay's backlog of 1024 is cut to it"),
                "`sysctl -w net.core.somaxconn=4096` for bursts of new connections",
            ),
            false => Check::ok("limits", "listen backlog", format!("net.core.somaxconn {somaxconn}")),
        });
    }
    checks
}

/// The enclave's forwardings: listeners free, targets answering (with
/// --connect), and the hosts file mapping --hosts names to them.
fn forwardings(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    for mapping in &args.maps {
        checks.push(listen("forward", &mapping.listen, args));
        let check = format!("{} -> {}", mapping.listen, mapping.to);
        checks.push(match (&mapping.to, args.connect) {
            (_, false) => Check::ok("forward", check, "target not tried (--connect tries it)"),
            (to, true) => match crate::sample::client::connect(to, Duration::from_secs(5)) {
                Ok(_) => Check::ok("forward", check, "the target answers"),
                Err(e) => {
                    let (detail, fix) = split_hint(&e);
                    let fix = fix.unwrap_or_else(|| format!("start the parent's proxy on {to}"));
                    Check::fail("forward", check, format!("cannot connect: {detail}"), fix)
                }
            },
        });
        if let Endpoint::Vsock { cid, .. } = mapping.to {
            if cid != 3 && cid != VSOCK_CID_ANY && cid != 1 {
                checks.push(Check::warn(
                    "forward",
                    format!("{} CID", mapping.to),
                    format!("CID {cid}: an enclave reaches its parent at CID 3"),
                    format!("forward to vsock:3:PORT unless {cid} is meant"),
                ));
            }
        }
    }
    let text = std::fs::read_to_string(&args.hosts_file).unwrap_or_default();
    let listening: Vec<IpAddr> = args
        .maps
        .iter()
        .filter_map(|m| match &m.listen {
            Endpoint::Tcp { host: Host::Ip(ip), .. } => Some(*ip),
            _ => None,
        })
        .collect();
    for name in &args.hosts {
        let mapped = hosts_address(&text, name);
        let check = format!("{name} in {}", args.hosts_file.display());
        checks.push(match mapped {
            Some(ip) if listening.is_empty() || listening.iter().any(|l| *l == ip || l.is_unspecified()) => {
                Check::ok("hosts", check, format!("maps to {ip}, where a forwarding listens"))
            }
            Some(ip) => Check::fail(
                "hosts",
                check,
                format!("maps to {ip}, where no forwarding listens"),
                format!("map it to a forwarding's address: `{} {name}`", listening[0]),
            ),
            None => Check::fail(
                "hosts",
                check,
                "not mapped: the name resolves past the forwarder".to_string(),
                format!("`vsock-relay forward --hosts {name}` adds it, or add `127.0.0.1 {name}`"),
            ),
        });
    }
    checks
}

/// The address the hosts file maps `name` to (its first line for it).
fn hosts_address(text: &str, name: &str) -> Option<IpAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split('#').next().unwrap_or("").split_whitespace();
        let ip = words.next()?.parse().ok()?;
        words.any(|w| w.eq_ignore_ascii_case(name)).then_some(ip)
    })
}

/// A number in a /proc file.
fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// This process's open-files limit (soft, hard) from /proc/self/limits.
fn open_files_limit() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    let number = |word: Option<&str>| match word? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((number(numbers.next())?, number(numbers.next())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_map_names() {
        let text = "127.0.0.1 localhost\n127.0.0.2 kms.example # forwarder\n";
        assert_eq!(hosts_address(text, "KMS.example"), Some([127, 0, 0, 2].into()));
        assert_eq!(hosts_address(text, "forwarder"), None, "a comment is no name");
        assert_eq!(hosts_address(text, "other"), None);
    }

    #[test]
    fn hints_split_from_the_os_error() {
        let endpoint: Endpoint = "vsock:any:1".parse().unwrap();
        let hinted = hint::with_hint(Step::Listen, &endpoint, std::io::Error::from_raw_os_error(libc::EPERM));
        let (error, fix) = split_hint(&hinted);
        assert_eq!(error, "Operation not permitted (os error 1)");
        assert!(fix.unwrap().starts_with("a seccomp filter or container refuses AF_VSOCK"));
        assert_eq!(split_hint(&std::io::Error::other("refused")), ("refused".into(), None));
    }
}
