//! The binaries' command-line contract: AWS's `vsock-proxy` options, messages
//! and exit codes (1: config or allowlist, 2: usage). `vsock-proxy` itself
//! listens on vsock, so on the host only its refusals run (and the harness
//! disables AF_VSOCK in every child); success goes through `vsock-relay
//! proxy`, which shares its code path.

use std::io::{Read, Write};
use std::time::Duration;

use vsock_relay_testkit::servers::{echo, Server, Stream};

use crate::util::{
    backend_arg, run_capturing, run_to_exit, run_to_exit_with, wait_for_unix, Proc, TempDir, BACKENDS,
};

fn config(dir: &TempDir, yaml: &str) -> String {
    let path = dir.path("vsock-proxy.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn assert_exit(binary: &str, args: &[&str], code: i32, message: &str) {
    let (got, stderr) = run_to_exit(binary, args);
    assert_eq!(got, code, "{binary} {args:?}: exit code; stderr:\n{stderr}");
    assert!(stderr.contains(message), "{binary} {args:?}: stderr lacks `{message}`:\n{stderr}");
}

/// Starts `vsock-relay proxy` on a Unix socket and checks it relays, on
/// every backend.
fn proxy_allows(remote: &str, allow: &str) {
    for backend in BACKENDS {
        proxy_allows_on(backend_arg(backend), remote, allow);
    }
}

fn proxy_allows_on(backend: &str, remote: &str, allow: &str) {
    proxy_relays_with(backend, remote, |port| format!("allowlist:\n- {{address: {allow}, port: {port}}}\n"));
}

/// Starts `vsock-relay proxy` with the config `yaml(port)` and checks it relays.
fn proxy_relays_with(backend: &str, remote: &str, yaml: impl Fn(u16) -> String) -> Proc {
    let server = Server::tcp(echo);
    let port = server.tcp_addr().port().to_string();
    let dir = TempDir::new("cli");
    let cfg = config(&dir, &yaml(server.tcp_addr().port()));
    let listen = dir.path("proxy.sock");
    let listen_arg = format!("unix:{}", listen.display());
    let mut proxy = Proc::spawn(
        "vsock-relay",
        &["proxy", "--backend", backend, "--listen", &listen_arg, "--config", &cfg, remote, &port],
    );
    proxy.wait_for_log("relay listening", Duration::from_secs(20));
    wait_for_unix(&listen, Duration::from_secs(5));
    let mut client = Stream::connect(&listen_arg.parse().unwrap()).unwrap();
    client.write_all(b"ping").unwrap();
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping", "{backend}: {remote}");
    assert!(proxy.stderr().contains(&format!("backend chosen: {}", backend.replace("uring", "io_uring"))));
    assert!(proxy.stderr().contains("allowed:"), "{}", proxy.stderr());
    proxy
}

/// What AWS's proxy reads, ours reads: a byte-order mark, fields it does
/// not know (named in a warning), a second YAML document (ignored).
#[test]
fn an_aws_valid_config_with_unknown_fields_is_accepted() {
    let proxy = proxy_relays_with("uring", "127.0.0.1", |port| {
        format!("\u{feff}# AWS's proxy reads this\nallowlist:\n- {{address: 127.0.0.1, port: {port}, comment: echo}}\nowner: ops\n---\nsecond: document\n")
    });
    let log = proxy.stderr();
    assert!(log.contains("ignoring unknown fields of the config") && log.contains("fields=owner"), "{log}");
    assert!(
        log.contains("ignoring unknown fields of an allowlist entry") && log.contains("fields=comment"),
        "{log}"
    );
    assert!(log.contains("more than one YAML document; reading the first only"), "{log}");
}

/// A hostile or broken config costs under a second and little memory: deep
/// nesting, an oversized file and an endless one are refused with exit 1.
#[test]
fn config_bounds_refuse_nested_oversized_and_endless_files_quickly() {
    let dir = TempDir::new("cli");
    let nested = config(&dir, &format!("allowlist: {}1{}\n", "{a: ".repeat(50_000), "}".repeat(50_000)));
    let big = dir.path("big.yaml");
    let entry = "- {address: 127.0.0.1, port: 443}\n";
    std::fs::write(&big, format!("allowlist:\n{}", entry.repeat((2 << 20) / entry.len()))).unwrap();
    let big = big.display().to_string();
    let cases = [
        (nested.as_str(), "nested deeper than 32 levels at line 1".to_string()),
        (big.as_str(), format!("the config file {big} is larger than 1048576 bytes")),
        ("/dev/zero", "the config file /dev/zero is larger than 1048576 bytes".to_string()),
    ];
    for (cfg, message) in cases {
        let started = std::time::Instant::now();
        let (code, stderr) =
            run_to_exit_with("vsock-proxy", &["8001", "127.0.0.1", "443", "--config", cfg], |c| {
                vsock_relay_testkit::seccomp::limit_address_space(c, 512 << 20);
            });
        let took = started.elapsed();
        assert_eq!(code, 1, "{cfg}: {stderr}");
        assert!(stderr.contains(&message), "{cfg}: stderr lacks `{message}`:\n{stderr}");
        assert!(took < Duration::from_secs(1), "{cfg}: refused after {took:?}");
    }
}

#[test]
fn host_allowed_by_name() {
    proxy_allows("localhost", "localhost");
}

#[test]
fn host_allowed_by_ip_either_way() {
    // AWS's proxy misses both of these.
    proxy_allows("localhost", "127.0.0.1");
    proxy_allows("127.0.0.1", "localhost");
}

#[test]
fn sigterm_stops_the_proxy_with_exit_0_and_a_summary() {
    let server = Server::tcp(echo);
    let port = server.tcp_addr().port().to_string();
    let dir = TempDir::new("cli");
    let cfg = config(&dir, &format!("allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n"));
    let listen_arg = format!("unix:{}", dir.path("proxy.sock").display());
    let mut proxy =
        Proc::spawn("vsock-relay", &["proxy", "--listen", &listen_arg, "--config", &cfg, "127.0.0.1", &port]);
    proxy.wait_for_log("relay listening", Duration::from_secs(20));
    let mut client = Stream::connect(&listen_arg.parse().unwrap()).unwrap();
    client.write_all(b"ping").unwrap();
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply).unwrap();
    drop(client);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{}", proxy.stderr());
    let log = proxy.stderr();
    assert!(log.contains("stopping: finishing open connections"), "{log}");
    assert!(log.contains("relay stopped accepted=1 failed=0 refused=0 cut_by_drain=0 bytes_to_upstream=4 bytes_to_client=4"), "{log}");
    assert!(!dir.path("proxy.sock").exists(), "the unix socket file is removed on exit");
}

/// With stderr's reader gone (`vsock-relay ... 2>&1 | head -1`), every log
/// line fails to be written; SIGTERM must still stop the relay, and its
/// workers must keep relaying meanwhile (no thread may die of a failed log).
#[test]
fn a_closed_stderr_neither_kills_a_thread_nor_blocks_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let server = Server::tcp(echo);
    let dir = TempDir::new("cli");
    let listen = format!("unix:{}", dir.path("relay.sock").display());
    let to = format!("tcp:127.0.0.1:{}", server.tcp_addr().port());
    let mut child = Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["relay", "--listen", &listen, "--to", &to])
        .env(vsock_relay_engine::socket::NO_VSOCK_ENV, "1")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    drop(stderr); // as `head -1` does
    wait_for_unix(&dir.path("relay.sock"), Duration::from_secs(20));
    // Each connection logs lines that now fail to be written.
    for _ in 0..3 {
        let mut client = Stream::connect(&listen.parse().unwrap()).unwrap();
        client.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ping", "relayed while its stderr is closed");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM did not stop a relay whose stderr is closed (first line: {first})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "first line: {first}");
}

#[test]
fn host_not_allowed_exits_1() {
    let dir = TempDir::new("cli");
    let cfg = config(&dir, "allowlist:\n- {address: localhost, port: 443}\n");
    assert_exit(
        "vsock-proxy",
        &["8001", "127.0.0.1", "444", "--config", &cfg],
        1,
        &format!("vsock-proxy: error: the given address and port are not allowed: 127.0.0.1:444 matches no entry of {cfg}"),
    );
}

#[test]
fn bad_yaml_exits_1() {
    let dir = TempDir::new("cli");
    let cfg = config(&dir, "allowlist: [ {address: localhost, port: 443\n");
    assert_exit(
        "vsock-proxy",
        &["8001", "localhost", "443", "--config", &cfg],
        1,
        &format!("error: bad YAML in {cfg}"),
    );
}

#[test]
fn missing_allowlist_field_exits_1() {
    let dir = TempDir::new("cli");
    let cfg = config(&dir, "services:\n- {address: localhost, port: 443}\n");
    assert_exit(
        "vsock-proxy",
        &["8001", "localhost", "443", "--config", &cfg],
        1,
        "has no `allowlist` field",
    );
}

#[test]
fn bad_allowlist_entry_exits_1() {
    let dir = TempDir::new("cli");
    let cfg = config(&dir, "allowlist:\n- {address: localhost}\n");
    assert_exit("vsock-proxy", &["8001", "localhost", "443", "--config", &cfg], 1, "missing field `port`");
}

#[test]
fn missing_config_file_exits_1() {
    assert_exit(
        "vsock-proxy",
        &["8001", "localhost", "443", "--config", "/nonexistent/vsock-proxy.yaml"],
        1,
        "cannot read the config file /nonexistent/vsock-proxy.yaml",
    );
}

#[test]
fn bad_ports_exit_2() {
    assert_exit("vsock-proxy", &["port", "localhost", "443"], 2, "invalid value 'port' for '<LOCAL_PORT>'");
    assert_exit(
        "vsock-proxy",
        &["8001", "localhost", "70000"],
        2,
        "invalid value '70000' for '<REMOTE_PORT>'",
    );
    assert_exit("vsock-proxy", &["8001", "localhost", "-1"], 2, "error:");
}

#[test]
fn ipv4_only_refuses_an_ipv6_target_with_exit_1() {
    let dir = TempDir::new("cli");
    let cfg = config(&dir, "allowlist:\n- {address: \"::1\", port: 443}\n");
    assert_exit(
        "vsock-proxy",
        &["-4", "8001", "::1", "443", "--config", &cfg],
        1,
        "vsock-proxy: error: cannot resolve REMOTE_ADDR `::1`: ::1 is not of the address family asked for",
    );
}

#[test]
fn ipv4_with_ipv6_exits_2() {
    assert_exit("vsock-proxy", &["-4", "-6", "8001", "localhost", "443"], 2, "cannot be used with");
}

#[test]
fn zero_workers_exits_2() {
    assert_exit(
        "vsock-proxy",
        &["-w", "0", "8001", "localhost", "443"],
        2,
        "the number of workers must not be 0",
    );
}

#[test]
fn bare_number_remote_addr_exits_2() {
    assert_exit("vsock-proxy", &["8001", "3", "443"], 2, "`3` is a bare number, not a host");
}

#[test]
fn help_explains_the_contract() {
    let out = run_capturing("vsock-proxy", &["--help"], Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let help = out.stdout;
    for needle in [
        "<LOCAL_PORT>",
        "<REMOTE_ADDR>",
        "<REMOTE_PORT>",
        "--ipv4",
        "--ipv6",
        "--num_workers",
        "--config",
        "/etc/nitro_enclaves/vsock-proxy.yaml",
        "RUST_LOG",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn relay_rejects_bad_endpoints_with_exit_2() {
    assert_exit(
        "vsock-relay",
        &["relay", "--listen", "tcp:127.0.0.1:99999", "--to", "unix:/x"],
        2,
        "bad port `99999`",
    );
    assert_exit(
        "vsock-relay",
        &["relay", "--listen", "udp:1:2", "--to", "unix:/x"],
        2,
        "unknown family `udp`",
    );
}

/// One owner per listening address: a second relay on the same TCP port or
/// Unix path exits 1 with "address in use", naming the first by PID (every TCP listener used
/// SO_REUSEPORT, so a second instance silently took part of the clients),
/// while the first, with several workers sharing the port, keeps serving.
#[test]
fn a_second_instance_on_the_same_address_exits_1_address_in_use() {
    let server = Server::tcp(echo);
    let to = format!("tcp:{}", server.tcp_addr());
    let dir = TempDir::new("cli");
    let unix = format!("unix:{}", dir.path("relay.sock").display());
    for backend in BACKENDS {
        let backend = backend_arg(backend);
        let mut first = Proc::spawn(
            "vsock-relay",
            &["relay", "--backend", backend, "-w", "2", "--listen", "tcp:127.0.0.1:0", "--to", &to],
        );
        let tcp = format!("tcp:127.0.0.1:{}", first.logged_tcp_port());
        let mut first_unix =
            Proc::spawn("vsock-relay", &["relay", "--backend", backend, "--listen", &unix, "--to", &to]);
        first_unix.wait_for_log("relay listening", Duration::from_secs(20));
        for (listen, holder) in [(&tcp, first.child.id()), (&unix, first_unix.child.id())] {
            let (code, stderr) =
                run_to_exit("vsock-relay", &["relay", "--backend", backend, "--listen", listen, "--to", &to]);
            assert_eq!(code, 1, "{backend} {listen}: {stderr}");
            // The OS error, then who holds the address (errno -> hint).
            let expected = format!(
                "error: cannot listen on {listen}: Address already in use (os error 98). \
                 another process listens there: PID {holder} (vsock-relay); stop it, or listen on another port"
            );
            assert!(stderr.contains(&expected), "{backend} {listen}: {stderr}");
        }
        for listen in [&tcp, &unix] {
            for _ in 0..8 {
                let mut client = Stream::connect(&listen.parse().unwrap()).unwrap();
                client.write_all(b"ping").unwrap();
                let mut reply = [0u8; 4];
                client.read_exact(&mut reply).unwrap();
                assert_eq!(&reply, b"ping");
            }
        }
        assert!(first.running() && first_unix.running());
    }
}

/// First contact: `-h` and `--help` describe a binary the same way (the
/// short form is the first paragraph of the long one); a usage error of a
/// subcommand shows that subcommand's usage line and exits 2.
#[test]
fn help_forms_agree_and_usage_errors_name_the_subcommand() {
    for binary in ["vsock-proxy", "vsock-relay"] {
        let short = run_capturing(binary, &["-h"], Duration::from_secs(10));
        let long = run_capturing(binary, &["--help"], Duration::from_secs(10));
        assert_eq!((short.code, long.code), (0, 0));
        // clap drops the first paragraph's final period in the short form.
        let first = |text: &str| text.lines().next().unwrap_or_default().trim_end_matches('.').to_string();
        assert_eq!(first(&short.stdout), first(&long.stdout), "{binary}: -h and --help differ");
        assert!(
            !first(&short.stdout).contains("built on the relay engine"),
            "{binary}: the crate description"
        );
    }
    for (args, usage) in [
        (&["forward", "127.0.0.1", "443"][..], "Usage: vsock-relay forward"),
        (&["client", "3"][..], "Usage: vsock-relay client"),
    ] {
        let out = run_capturing("vsock-relay", args, Duration::from_secs(10));
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(usage), "{args:?}: no `{usage}` in:\n{}", out.stderr);
    }
}

/// `bench sink` and `demo --transport unix` say they are ready / which hops
/// they use on their first line of stdout.
#[test]
fn sink_and_demo_print_their_first_line() {
    use std::io::BufRead;
    let dir = TempDir::new("ready");
    let listen = format!("unix:{}", dir.path("sink.sock").display());
    let mut sink = std::process::Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["bench", "sink", "--listen", &listen])
        .env(vsock_relay_engine::socket::NO_VSOCK_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(sink.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(line.trim_end(), format!("sink listening on {listen}"));

    let demo = run_capturing(
        "vsock-relay",
        &["demo", "--transport", "unix", "--throughput-mib", "0"],
        Duration::from_secs(60),
    );
    assert_eq!(demo.code, 0, "{}", demo.stderr);
    assert_eq!(
        demo.stdout.lines().next(),
        Some("vsock hops: Unix sockets (--transport unix)"),
        "{}",
        demo.stdout
    );
}

/// `--version` (and `-V`) of both binaries: the version, the commit, the
/// target and the backends this kernel allows, by the engine's probe.
#[test]
fn version_says_commit_target_and_backends() {
    for binary in ["vsock-proxy", "vsock-relay"] {
        for flag in ["--version", "-V"] {
            let out = run_capturing(binary, &[flag], Duration::from_secs(10));
            assert_eq!(out.code, 0, "{binary} {flag}: {}", out.stderr);
            let lines: Vec<&str> = out.stdout.lines().collect();
            assert_eq!(lines.first(), Some(&format!("{binary} {}", env!("CARGO_PKG_VERSION")).as_str()));
            let field = |name: &str| lines.iter().find_map(|l| l.strip_prefix(name)).map(str::trim);
            let commit =
                field("commit:").unwrap_or_else(|| panic!("{binary} {flag}: no commit:\n{}", out.stdout));
            assert!(
                commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
                "{binary} {flag}: commit `{commit}`"
            );
            let target = field("target:").unwrap_or_default();
            assert!(target.contains("-linux-"), "{binary} {flag}: target `{target}`");
            let backends = field("backends:").unwrap_or_default();
            assert!(
                backends == "io_uring, portable (epoll)"
                    || backends.starts_with("portable (epoll); io_uring unavailable: "),
                "{binary} {flag}: backends `{backends}`"
            );
        }
    }
}

/// `completions SHELL` prints each shell's script for vsock-relay, naming
/// the subcommands; an unknown shell is a usage error.
#[test]
fn completions_print_each_shells_script() {
    for (shell, start) in [
        ("bash", "_vsock__relay() {"),
        ("zsh", "#compdef vsock-relay"),
        ("fish", "# Print an optspec for argparse"),
    ] {
        let out = run_capturing("vsock-relay", &["completions", shell], Duration::from_secs(10));
        assert_eq!(out.code, 0, "{shell}: {}", out.stderr);
        assert!(out.stdout.starts_with(start), "{shell}:\n{}", out.stdout);
        for subcommand in ["proxy", "forward", "relay", "completions"] {
            assert!(out.stdout.contains(subcommand), "{shell}: no `{subcommand}`");
        }
        assert!(!out.stdout.contains("generate-docs"), "{shell}: the hidden generator is completed");
    }
    let out = run_capturing("vsock-relay", &["completions", "tcsh"], Duration::from_secs(10));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("invalid value 'tcsh'"), "{}", out.stderr);
}

/// `--generate-docs DIR` (dist/build's) writes a manual page for
/// vsock-relay, each subcommand and the drop-in proxy, and the completion
/// scripts `completions` prints; without DIR it is a usage error.
#[test]
fn generate_docs_writes_pages_and_completions() {
    let dir = TempDir::new("docs");
    let out_dir = dir.path("out");
    let out = run_capturing(
        "vsock-relay",
        &["--generate-docs", &out_dir.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut pages: Vec<String> = std::fs::read_dir(out_dir.join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    let mut expected: Vec<String> = [
        "",
        "-bench",
        "-bench-bulk",
        "-bench-burst",
        "-bench-churn",
        "-bench-dns",
        "-bench-idle",
        "-bench-rpc",
    ]
    .iter()
    .chain(&[
        "-bench-sink",
        "-client",
        "-completions",
        "-demo",
        "-dns",
        "-doctor",
        "-forward",
        "-proxy",
        "-relay",
        "-serve",
    ])
    .chain(&["-vsock-proxy"])
    .map(|s| format!("vsock-relay{s}.1"))
    .collect();
    expected.sort();
    assert_eq!(pages, expected);
    let page = std::fs::read_to_string(out_dir.join("man/vsock-relay-vsock-proxy.1")).unwrap();
    assert!(page.contains(".TH vsock-relay-vsock-proxy 1"), "{page}");
    assert!(page.contains("/usr/libexec/vsock\\-relay/vsock\\-proxy"), "{page}");
    for (shell, file) in [("bash", "vsock-relay.bash"), ("zsh", "_vsock-relay"), ("fish", "vsock-relay.fish")]
    {
        let printed = run_capturing("vsock-relay", &["completions", shell], Duration::from_secs(10));
        let written = std::fs::read_to_string(out_dir.join("completions").join(file)).unwrap();
        assert_eq!(written, printed.stdout, "{shell}");
    }
    let out = run_capturing("vsock-relay", &["--generate-docs"], Duration::from_secs(10));
    assert_eq!((out.code, out.stderr.trim()), (2, "usage: vsock-relay --generate-docs DIR"));
}
