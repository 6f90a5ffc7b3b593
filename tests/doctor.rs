//! `vsock-relay doctor` on the host: each broken setup a user meets first
//! gives its `fail` or `warn` line with the fix, in text and JSON, and the
//! exit code says whether something failed. vsock is refused here by a
//! seccomp filter (the kernel's own errno) or by the engine's switch; names
//! resolve through the test name server only.

use std::process::Command;
use std::time::{Duration, Instant};

use vsock_relay_testkit::names::{Answer, NameServer};
use vsock_relay_testkit::seccomp;

use crate::util::{foreign_listener, run_capturing_with, vsock_refused_by_seccomp, Output, Proc, TempDir};

fn doctor(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    run_capturing_with("vsock-relay", &all, Duration::from_secs(60), configure)
}

/// The report's line for `area` and `check` (text form), with its fix line.
fn line<'a>(out: &'a Output, area: &str, check: &str) -> (&'a str, Option<&'a str>) {
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&format!("{area:<8} {check}: "))))
        .unwrap_or_else(|| panic!("no `{area} {check}` line in:\n{}\n{}", out.stdout, out.stderr));
    let fix = lines.get(at + 1).map(|l| l.trim_start()).filter(|l| l.starts_with("fix: "));
    (lines[at], fix)
}

/// The JSON report's check for `area` and `check`.
fn json_check(out: &Output, area: &str, check: &str) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["area"] == area && c["check"] == check)
        .unwrap_or_else(|| panic!("no {area} {check} in {report}"))
        .clone()
}

#[test]
fn no_vsock_transport_and_io_uring_refused_are_named_with_their_fix() {
    let out = doctor(&["--side", "parent"], |command| {
        vsock_refused_by_seccomp(command, libc::EAFNOSUPPORT);
        seccomp::deny_io_uring(command);
    });
    assert_eq!(out.code, 1, "a failed check exits 1:\n{}", out.stdout);
    assert!(out.stdout.starts_with("vsock-relay doctor: parent side (given)\n"), "{}", out.stdout);
    let (socket, fix) = line(&out, "vsock", "socket");
    assert_eq!(
        socket,
        "fail  vsock    socket: refused: Address family not supported by protocol (os error 97)"
    );
    assert!(fix.unwrap().starts_with("fix: no vsock transport is loaded here"), "{fix:?}");
    let (uring, fix) = line(&out, "backend", "io_uring");
    assert!(
        uring.starts_with(
            "warn  backend  io_uring: portable (epoll) will run: a seccomp filter refuses io_uring_setup"
        ),
        "{uring}"
    );
    assert!(fix.unwrap().contains("the portable backend relays the same bytes"), "{fix:?}");
    let summary = out.stdout.lines().last().unwrap();
    assert!(summary.ends_with(" warn, 1 fail"), "only the socket fails here: {summary}");
}

#[test]
fn vsock_refused_by_seccomp_in_json() {
    let out = doctor(&["--side", "enclave", "--format", "json"], |command| {
        vsock_refused_by_seccomp(command, libc::EPERM)
    });
    assert_eq!(out.code, 1, "{}", out.stdout);
    let socket = json_check(&out, "vsock", "socket");
    assert_eq!(socket["status"], "fail");
    assert_eq!(socket["detail"], "refused: Operation not permitted (os error 1)");
    assert!(socket["fix"].as_str().unwrap().starts_with("a seccomp filter or container refuses AF_VSOCK"));
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(report["side"], "enclave");
    assert!(report["fail"].as_u64().unwrap() >= 1);
    let ok = json_check(&out, "vsock", "/dev/vsock");
    assert_eq!((ok["status"].as_str(), ok["fix"].is_null()), (Some("ok"), true), "{ok}");
}

/// Each allowlist name resolves with the proxy's resolver and name server:
/// a name with no address is named, a slow one is bounded by the proxy's
/// DNS timeout, addresses and ranges need no lookup.
#[test]
fn allowlist_names_resolve_or_are_named() {
    let names = NameServer::start();
    names.set("good.example", Answer::Addresses(vec!["192.0.2.10".parse().unwrap()]));
    names.set_delayed(
        "slow.example",
        Answer::Addresses(vec!["192.0.2.11".parse().unwrap()]),
        Duration::from_secs(30),
    );
    let dir = TempDir::new("doctor-dns");
    let config = dir.path("vsock-proxy.yaml");
    std::fs::write(
        &config,
        "allowlist:\n- {address: good.example, port: 443}\n- {address: missing.example, port: 443}\n\
         - {address: slow.example, port: 443}\n- {address: 10.0.0.0/8, port: 443}\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let server = names.addr().to_string();
    let started = Instant::now();
    let out = doctor(&["--side", "parent", "--config", &config, "--dns-server", &server], |_| {});
    let took = started.elapsed();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(
        line(&out, "config", &config).0,
        format!("ok    config   {config}: parses: 4 allowlist entries")
    );
    let (good, fix) = line(&out, "dns", "good.example:443");
    assert!(good.starts_with("ok    dns      good.example:443: resolves to 192.0.2.10 (TTL "), "{good}");
    assert_eq!(fix, None);
    let (missing, fix) = line(&out, "dns", "missing.example:443");
    assert_eq!(missing, "fail  dns      missing.example:443: resolves to nothing: no such name (NXDOMAIN)");
    assert!(fix.unwrap().contains("until then this entry allows nothing"));
    let (slow, _) = line(&out, "dns", "slow.example:443");
    assert!(slow.starts_with("fail  dns      slow.example:443: resolves to nothing: no answer"), "{slow}");
    assert!(took < Duration::from_secs(20), "the proxy's DNS timeout bounds a slow name: {took:?}");
    assert!(!out.stdout.contains("10.0.0.0/8"), "a range is not looked up:\n{}", out.stdout);
}

/// A services file whose listen port another process holds: named by PID;
/// a port a running relay holds is that relay's; a free port is free.
#[test]
fn a_held_listen_port_names_its_process() {
    let (mut holder, port) = foreign_listener();
    let mut relay =
        Proc::spawn("vsock-relay", &["relay", "--listen", "tcp:127.0.0.1:0", "--to", "tcp:127.0.0.1:9"]);
    let relay_port = relay.logged_tcp_port();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = TempDir::new("doctor-held");
    let services = dir.path("services.yaml");
    let (held, running, free) = (
        format!("tcp:127.0.0.1:{}", port),
        format!("tcp:127.0.0.1:{relay_port}"),
        format!("tcp:127.0.0.1:{free}"),
    );
    std::fs::write(
        &services,
        format!(
            "services:\n- {{listen: '{held}', address: 192.0.2.1, port: 443}}\n\
             - {{listen: '{running}', address: 192.0.2.1, port: 443}}\n\
             - {{listen: '{free}', address: 192.0.2.1, port: 443}}\n"
        ),
    )
    .unwrap();
    let services = services.display().to_string();
    let text = doctor(&["--side", "parent", "--services", &services], |_| {});
    let json = doctor(&["--side", "parent", "--services", &services, "--format", "json"], |_| {});
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(text.code, 1, "{}", text.stdout);
    let (line_held, fix) = line(&text, "listen", &held);
    assert!(
        line_held.starts_with(&format!("fail  listen   {held}: held by PID {} (python3", holder.id())),
        "{line_held}"
    );
    assert!(fix.unwrap().contains("stop it, or listen on another port"));
    let (line_running, _) = line(&text, "listen", &running);
    assert_eq!(
        line_running,
        format!("ok    listen   {running}: held by a running relay, PID {} (vsock-relay)", relay.child.id())
    );
    assert_eq!(line(&text, "listen", &free).0, format!("ok    listen   {free}: free"));
    let held_json = json_check(&json, "listen", &held);
    assert_eq!(held_json["status"], "fail");
    assert!(held_json["detail"].as_str().unwrap().starts_with(&format!("held by PID {}", holder.id())));
}

/// A config that does not parse is a `fail` line naming the file, the line
/// and the column, not a crash.
#[test]
fn a_config_that_does_not_parse_is_named_with_line_and_column() {
    let dir = TempDir::new("doctor-yaml");
    let config = dir.path("vsock-proxy.yaml");
    std::fs::write(
        &config,
        "allowlist:\n- {address: a.example, port: 443\n- {address: b.example, port: 443}\n",
    )
    .unwrap();
    let config = config.display().to_string();
    for format in ["text", "json"] {
        let out = doctor(&["--side", "parent", "--config", &config, "--format", format], |_| {});
        assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
        let check = match format {
            "text" => line(&out, "config", &config).0.to_string(),
            _ => json_check(&out, "config", &config)["detail"].as_str().unwrap().to_string(),
        };
        assert!(
            check.contains(&format!("bad YAML in {config}")) && check.contains("line 3 column"),
            "{check}"
        );
    }
}

/// The enclave side: a forwarding's listener and the hosts file; no vsock
/// connection without --connect.
#[test]
fn enclave_forwardings_and_hosts_names() {
    let dir = TempDir::new("doctor-enclave");
    let hosts = dir.path("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 kms.example\n10.1.1.1 s3.example\n").unwrap();
    let hosts = hosts.display().to_string();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let map = format!("tcp:127.0.0.1:{free}=vsock:3:8001");
    let args = [
        "--side",
        "enclave",
        "--map",
        &map,
        "--hosts",
        "kms.example",
        "--hosts",
        "s3.example",
        "--hosts",
        "sts.example",
        "--hosts-file",
        &hosts,
    ];
    let out = doctor(&args, |_| {});
    assert_eq!(out.code, 1, "{}", out.stdout);
    let listen = format!("tcp:127.0.0.1:{free}");
    assert_eq!(line(&out, "forward", &listen).0, format!("ok    forward  {listen}: free"));
    assert_eq!(
        line(&out, "forward", &format!("{listen} -> vsock:3:8001")).0,
        format!("ok    forward  {listen} -> vsock:3:8001: target not tried (--connect tries it)")
    );
    let kms = format!("kms.example in {hosts}");
    assert_eq!(
        line(&out, "hosts", &kms).0,
        format!("ok    hosts    {kms}: maps to 127.0.0.1, where a forwarding listens")
    );
    let s3 = format!("s3.example in {hosts}");
    let (s3_line, fix) = line(&out, "hosts", &s3);
    assert_eq!(s3_line, format!("fail  hosts    {s3}: maps to 10.1.1.1, where no forwarding listens"));
    assert_eq!(fix, Some("fix: map it to a forwarding's address: `127.0.0.1 s3.example`"));
    let sts = format!("sts.example in {hosts}");
    assert!(line(&out, "hosts", &sts).0.starts_with("fail"), "{}", out.stdout);
}
