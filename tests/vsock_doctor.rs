//! First contact on real vsock (the guest of tests/vm, `vsock_loopback`
//! only): `vsock-relay doctor` on both sides, the to-host flag, and the
//! hints of connect failures as a user meets them.

use std::io::{Read, Write};
use std::process::Command;

use vsock_relay_testkit::guest::require_vsock_guest;
use vsock_relay_testkit::names::{Answer, NameServer};
use vsock_relay_testkit::servers::{echo, Server, Stream};

use super::{io_uring_disabled, vsock};

/// `vsock-relay ARGS` to its end: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vsock_relay_testkit::binary("vsock-relay")).args(args).output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Doctor's verdicts in the guest: every line `ok`, except io_uring's,
/// which warns where the io_uring backend cannot run: naming the sysctl in
/// the pass with io_uring disabled, the kernel's lack on an older kernel
/// (5.10: older than the backend supports).
fn assert_all_ok(report: &serde_json::Value) {
    for check in report["checks"].as_array().unwrap() {
        let io_uring = check["check"] == "io_uring";
        if io_uring && io_uring_disabled() {
            assert_eq!(check["status"], "warn", "{check}");
            assert!(check["detail"].as_str().unwrap().contains("kernel.io_uring_disabled is 2"), "{check}");
        } else if io_uring && super::uring_unavailable().is_some() {
            assert_eq!(check["status"], "warn", "{check}");
            assert!(check["detail"].as_str().unwrap().contains("the kernel is older"), "{check}");
        } else {
            assert_eq!(check["status"], "ok", "{check}");
        }
    }
}

fn detail<'a>(report: &'a serde_json::Value, check: &str) -> &'a str {
    let found = report["checks"].as_array().unwrap().iter().find(|c| c["check"] == check);
    found.unwrap_or_else(|| panic!("no {check} in {report}"))["detail"].as_str().unwrap()
}

/// The guest has the vsock core and the loopback transport (tests/vm/init
/// loads them), no guest or host transport, so no CID but the loopback's:
/// doctor must say exactly that, on both sides, and find everything `ok`.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn doctor_on_both_sides_is_all_ok_with_the_guests_transports_and_cid() {
    require_vsock_guest();
    let names = NameServer::start();
    names.set("kms.example", Answer::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    let dir = std::env::temp_dir().join("doctor-guest");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vsock-proxy.yaml");
    std::fs::write(
        &config,
        "allowlist:\n- {address: kms.example, port: 443}\n- {address: 127.0.0.1, port: 9}\n\
         services:\n- {listen: 'vsock:any:29100', address: kms.example, port: 443}\n",
    )
    .unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost kms.example\n").unwrap();
    let (config, hosts) = (config.display().to_string(), hosts.display().to_string());
    let dns = names.addr().to_string();
    let _parent_proxy = Server::vsock(29_101, echo);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let map = format!("tcp:127.0.0.1:{free}=vsock:1:29101");

    let parent =
        ["doctor", "--side", "parent", "--config", &config, "--services", &config, "--dns-server", &dns];
    let enclave = [
        "doctor",
        "--side",
        "enclave",
        "--map",
        &map,
        "--connect",
        "--hosts",
        "kms.example",
        "--hosts-file",
        &hosts,
    ];
    for args in [&parent[..], &enclave[..]] {
        let (code, text, stderr) = run(args);
        eprintln!("[guest] vsock-relay {}:\n{text}{stderr}", args.join(" "));
        let mut json_args = args.to_vec();
        json_args.extend(["--format", "json"]);
        let (json_code, json, _) = run(&json_args);
        let report: serde_json::Value =
            serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_all_ok(&report);
        assert_eq!((code, json_code), (0, 0), "nothing fails:\n{text}");
        assert_eq!(report["fail"], 0);
        // What the guest has: tests/vm/init loads vsock and vsock_loopback.
        assert_eq!(detail(&report, "transports"), "loaded: vsock, vsock_loopback");
        let cid = detail(&report, "local CID");
        assert!(
            cid == "1" || cid == "none but the loopback's, 1",
            "the guest's CID is the loopback's: {cid}"
        );
        assert_eq!(detail(&report, "socket"), "this process may make AF_VSOCK sockets");
        // The only warn is io_uring's where it cannot run (assert_all_ok).
        let io_uring_warns = io_uring_disabled() || super::uring_unavailable().is_some();
        assert!(!text.contains("\nwarn") || io_uring_warns, "{text}");
    }
    let (_, text, _) = run(&parent);
    assert!(text.contains("ok    dns      kms.example:443: resolves to 127.0.0.1 (TTL "), "{text}");
    assert!(text.contains("ok    listen   vsock:any:29100: a vsock port: not probed"), "{text}");
    let (_, text, _) = run(&enclave);
    assert!(
        text.contains(&format!("ok    forward  tcp:127.0.0.1:{free} -> vsock:1:29101: the target answers")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `:to-host` writes VMADDR_FLAG_TO_HOST into the address: the kernel
/// accepts it (an unknown flag would be EINVAL) and, CID 1 being the
/// loopback's, still connects through vsock_loopback. That the flag picks
/// the guest transport over vhost_vsock needs two VMs (issue 26's harness).
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn the_to_host_flag_is_accepted_and_connects() {
    require_vsock_guest();
    // VMADDR_FLAG_TO_HOST is Linux 5.11's (5.10's guest took the flag on a
    // blocking connect but its relay's upstream read an empty stream).
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if vsock_relay_engine::machine::kernel_version(&release) < (5, 11) {
        eprintln!("SKIPPED here: the to-host flag needs Linux 5.11 or newer; this is {}", release.trim());
        return;
    }
    let _server = Server::vsock(29_110, echo);
    for to in ["vsock:1:29110:to-host", "vsock:1:29110:to-host=auto"] {
        let mut client = Stream::connect(&to.parse().unwrap()).unwrap_or_else(|e| panic!("{to}: {e}"));
        client.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ping", "{to}");
    }
    // Through a relay too: the engine's connect path builds the same address.
    let mut relay = Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["relay", "--listen", "vsock:any:29111", "--to", "vsock:1:29110:to-host"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut client = super::connect_when_listening(&mut relay, &vsock(29_111));
    client.write_all(b"pong").unwrap();
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply).unwrap();
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(&reply, b"pong");
}

/// Connect failures the client meets, each with its hint: a CID no loaded
/// transport reaches (ENODEV: the guest has no virtio transport) and a port
/// nobody listens on.
#[test]
#[ignore = "needs the vsock guest: tests/vm/run.sh"]
fn connect_failures_carry_their_hints() {
    require_vsock_guest();
    let (code, _, stderr) = run(&["client", "16", "29120", "us-east-1", "--timeout", "5"]);
    eprintln!("[guest] vsock-relay client 16 29120 us-east-1:\n{stderr}");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "cannot connect to vsock:16:29120: No such device (os error 19). no loaded vsock transport reaches CID 16"
        ),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["client", "1", "29121", "us-east-1", "--timeout", "5"]);
    eprintln!("[guest] vsock-relay client 1 29121 us-east-1:\n{stderr}");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nothing listens on vsock port 29121 at CID 1"), "{stderr}");
    let (code, _, stderr) = run(&["relay", "--listen", "vsock:7:29122", "--to", "tcp:127.0.0.1:9"]);
    eprintln!("[guest] vsock-relay relay --listen vsock:7:29122:\n{stderr}");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        // The OS text is musl's here ("Address not available").
        stderr.contains("cannot listen on vsock:7:29122: ")
            && stderr.contains(
                " (os error 99). CID 7 is not this machine's ("
            )
            // 6.x names the loopback's CID 1 as the local one; 5.10 has none.
            && stderr.contains("): listen on vsock:any:29122"),
        "{stderr}"
    );
}
