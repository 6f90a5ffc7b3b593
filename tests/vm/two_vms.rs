//! Two VMs as on Nitro (tests/vm/two-vms.sh): the parent VM (CID 3) and the
//! enclave VM (CID 16), each with the virtio-vsock driver and no
//! vsock_loopback, joined by rust-vmm's vhost-device-vsock. Every connection
//! here crosses the two kernels' virtio transports and the device between
//! them, as an enclave's does on Nitro.
//!
//! Each VM runs one test of this module, chosen by its kernel command line
//! (`vsock_relay_role=two-vms-ROLE`): the parent runs the servers and relays,
//! the enclave runs the clients. For the cross-VM tests the enclave drives:
//! it opens the parent's control port once per scenario and sends
//! `SCENARIO BACKEND`; the parent sets the scenario up and answers `ready
//! PORT`; after the client side the enclave sends `done` and the parent
//! checks its side (what its servers received, the relay's counters and
//! memory) and answers `ok` or `fail REASON`. The enclave retries its first
//! connect for a bounded time: the two VMs boot at their own pace.
//!
//! In the workshop's channel and in transparent egress the enclave VM
//! runs no test here: dist/enclave/entry.sh is its PID 1 (tests/vm/init),
//! and the parent's test is the client: what an enclave's application gets
//! is the evidence (for transparent egress, the workshop's own server.py
//! and client.py, unchanged).
//!
//! The probe (`two-vms.sh probe`) runs no relay: the transport alone, in
//! writes of every size class, so that what the device loses is told apart
//! from what a relay does (it found the device's limits that two-vms.sh
//! patches).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, RelayConfig, Target};
use vsock_relay_testkit::exact::{cases, check_uploads, expected_uploads, run_clients};
use vsock_relay_testkit::guest::{on_kernel_command_line, require_vsock_guest};
use vsock_relay_testkit::servers::{echo, twin, Ledger, Server, Stream};
use vsock_relay_testkit::traffic;

use super::{relay, vsock_any, KillOnDrop, MIB};

const PARENT_CID: u32 = 3;
const ENCLAVE_CID: u32 = 16;
/// The parent's control port (cross-VM tests).
const CONTROL_PORT: u32 = 9000;
/// Where the parent hands the enclave its HTTPS stand-in's CA (channel).
const CA_PORT: u32 = 9100;
/// How long a VM waits for the other to come up.
const PEER_BOOT: Duration = Duration::from_secs(180);
/// The relay's resident memory while a reader stalls (the host tests' bound).
const STALLED_RSS_BOUND_KIB: u64 = 16 * 1024;

/// The scenarios, in the order the enclave runs them, each on both backends.
const SCENARIOS: [&str; 5] = ["exact-up", "exact-down", "half-close", "stalled", "allow-cid"];
const BACKENDS: [&str; 2] = ["uring", "portable"];

fn require_role(role: &str) {
    require_vsock_guest();
    assert!(
        on_kernel_command_line(&format!("vsock_relay_role={role}")),
        "not the {role} VM of tests/vm/two-vms.sh: {}",
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    );
}

fn parent(port: u32) -> Endpoint {
    Endpoint::vsock(PARENT_CID, port)
}

fn backend_named(name: &str) -> BackendChoice {
    match name {
        "uring" => BackendChoice::Uring,
        "portable" => BackendChoice::Portable,
        other => panic!("no backend `{other}`"),
    }
}

/// Connects to `to`, retrying for `within` while nothing listens there.
fn connect_within(to: &Endpoint, within: Duration) -> Stream {
    let deadline = Instant::now() + within;
    loop {
        match Stream::connect(to) {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "nothing listened on {to} within {within:?}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// One line-based exchange on a control connection.
struct Control {
    reader: BufReader<Stream>,
    writer: Stream,
}

impl Control {
    fn new(stream: Stream) -> Control {
        let writer = stream.try_clone().unwrap();
        Control { reader: BufReader::new(stream), writer }
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "the control connection ended: `{line}`");
        line.trim_end().to_string()
    }

    /// Expects `WORD ARG` and returns ARG.
    fn expect(&mut self, word: &str) -> String {
        let line = self.recv();
        match line.split_once(' ') {
            Some((w, arg)) if w == word => arg.to_string(),
            _ if line == word => String::new(),
            _ => panic!("expected `{word}` from the other VM, got `{line}`"),
        }
    }
}

/// A vsock listener of this VM (any CID), accepted from by hand: these
/// guests have no loopback transport for a server's wake-up connection.
fn vsock_listener(port: u32) -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None).unwrap();
    socket.bind(&socket2::SockAddr::vsock(libc::VMADDR_CID_ANY, port)).unwrap();
    socket.listen(128).unwrap();
    socket
}

/// Accepts one connection; returns it with the peer's CID.
fn accept(listener: &socket2::Socket) -> (Stream, u32) {
    let (socket, addr) = listener.accept().unwrap();
    let (cid, _) = addr.as_vsock_address().expect("a vsock peer");
    (Stream::Vsock(socket), cid)
}

/// `vsock-relay ARGS` with `RUST_LOG=info`, once it logged that it listens;
/// its log is read on to the end by a thread (so it never blocks on it).
fn spawn_listening(binary: &str, args: &[&str]) -> Child {
    let mut child = Command::new(vsock_relay_testkit::binary(binary))
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("relay listening") {
        let mut line = String::new();
        assert!(lines.read_line(&mut line).unwrap() > 0, "{binary} {args:?} exited:\n{log}");
        log.push_str(&line);
    }
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    child
}

/// The resident set of process `pid`, KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------
// The workshop's channel across the two VMs

/// The parent's side of the channel; the enclave VM runs
/// dist/enclave/entry.sh as PID 1 (forwarder to CID 3 port 8001 and the
/// sample server on 5005). Here: the HTTPS stand-in for
/// ip-ranges.amazonaws.com, `vsock-proxy 8001 localhost PORT` as the
/// workshop's parent runs it, the stand-in's CA for the enclave on
/// [`CA_PORT`], and the workshop's client to CID 16, which must print the
/// exact answers.
#[test]
#[ignore = "runs only in the parent VM of tests/vm/two-vms.sh"]
fn parent_channel() {
    use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
    require_role("two-vms-parent-channel");
    let endpoint = HttpsEndpoint::start(SAMPLE_DOCUMENT.to_vec()).unwrap();
    let allowlist = std::env::temp_dir().join("parent-vsock-proxy.yaml");
    let port = endpoint.port().to_string();
    std::fs::write(&allowlist, format!("allowlist:\n- {{address: localhost, port: {port}}}\n")).unwrap();
    let _proxy = KillOnDrop(vec![spawn_listening(
        "vsock-proxy",
        &["8001", "localhost", &port, "--config", allowlist.to_str().unwrap()],
    )]);
    println!("[parent] vsock-proxy 8001 -> localhost:{port} listening; handing the enclave its CA");

    hand_out_ca(endpoint.ca_pem());
    // A parent that is also a vsock host (vhost_vsock loaded) reaches the
    // enclave only with the to-host flag; a plain parent, as Nitro's, without.
    let vhost = parent_is_vsock_host();
    let to = match vhost {
        true => format!("vsock:{ENCLAVE_CID}:5005:to-host"),
        false => format!("vsock:{ENCLAVE_CID}:5005"),
    };
    for (i, (region, expected)) in ANSWERS.into_iter().enumerate() {
        // The first waits for the entry script's server.
        let within = if i == 0 { Duration::from_secs(120) } else { Duration::from_secs(30) };
        let answer = client_answer(&to, region, within);
        println!("[parent] client --to {to} {region}: {}", answer.trim_end());
        assert_eq!(answer, expected, "{region}");
    }
    assert_eq!(
        endpoint.requests(),
        1,
        "the enclave's server fetched once, through its forwarder and the proxy"
    );
    if vhost {
        to_host_is_needed_and_doctor_says_so();
    }
}

/// The sample answers of [`SAMPLE_DOCUMENT`](vsock_relay_apps::sample::demo::SAMPLE_DOCUMENT),
/// as `vsock-relay client` prints them.
const ANSWERS: [(&str, &str); 3] = [
    ("us-east-1", "[\"3.5.0.0/19\", \"16.182.0.0/16\", \"52.216.0.0/15\"]\n"),
    ("eu-west-1", "[\"3.5.64.0/21\", \"52.218.0.0/17\"]\n"),
    ("mars-north-1", "[]\n"),
];

/// Hands the enclave VM the HTTPS stand-in's CA (PEM) on [`CA_PORT`], once
/// (its init asks until this listens), and checks that the enclave VM's
/// CID asked. Nothing goes to the enclave VM before it reached this VM:
/// the device (vhost-device-vsock 0.2.0) stalls for good on a packet for a
/// VM whose driver is not up yet.
fn hand_out_ca(ca: &str) {
    let listener = vsock_listener(CA_PORT);
    listener.set_read_timeout(Some(PEER_BOOT)).unwrap();
    let (mut stream, cid) = accept(&listener);
    let mut query = [0u8; 16];
    let _ = stream.read(&mut query);
    stream.write_all(ca.as_bytes()).unwrap();
    assert_eq!(cid, ENCLAVE_CID, "the CA went to the enclave VM's CID");
}

fn parent_is_vsock_host() -> bool {
    on_kernel_command_line("vsock_relay_vhost=1")
}

/// With vhost_vsock loaded beside the guest transport, a connect to CID 16
/// without the flag goes to this VM's own (absent) guests and fails; with
/// `:to-host` it reached the enclave above; `:to-host=auto` sets the flag
/// only on a Nitro parent (nitro_enclaves loaded), so here it fails too; and
/// `doctor` warns that connections to an enclave need the flag.
fn to_host_is_needed_and_doctor_says_so() {
    for to in [format!("vsock:{ENCLAVE_CID}:5005"), format!("vsock:{ENCLAVE_CID}:5005:to-host=auto")] {
        let out = Command::new(vsock_relay_testkit::binary("vsock-relay"))
            .args(["client", "--timeout", "10", "--to", &to, "us-east-1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!(
            "[parent] client --to {to} (vhost_vsock loaded): {:?} {}",
            out.status.code(),
            stderr.trim_end()
        );
        assert!(!out.status.success(), "{to} reached the enclave without the to-host flag: {stderr}");
    }
    let out = Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(["doctor", "--side", "parent"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("[parent] vsock-relay doctor --side parent:\n{report}");
    let routing = report
        .lines()
        .find(|line| line.contains("routing"))
        .unwrap_or_else(|| panic!("no routing line:\n{report}"));
    assert!(routing.trim_start().starts_with("warn"), "{routing}");
    assert!(report.contains("vsock:CID:PORT:to-host"), "the fix named:\n{report}");
    assert!(report.contains("vhost_vsock"), "the transports named:\n{report}");
}

/// `vsock-relay client --to TO QUERY`'s answer, asked until the server
/// listens (for `within`).
fn client_answer(to: &str, query: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new(vsock_relay_testkit::binary("vsock-relay"))
            .args(["client", "--to", to, query])
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(Instant::now() < deadline, "client --to {to} {query}: {stderr}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------
// Transparent egress: the workshop's own application, unchanged

/// The remote host the workshop's server.py fetches from.
const REMOTE_HOST: &str = "ip-ranges.amazonaws.com";
/// Where the parent VM's HTTPS stand-in for [`REMOTE_HOST`] listens: off
/// loopback, as a real host is (TEST-NET-2, on this VM's `lo`).
const REMOTE_ADDRESS: &str = "198.51.100.10";
/// The enclave VM's `vsock-relay serve` (the workshop's server.py has 5005).
const SERVE_PORT: u32 = 5006;
/// How long the first answer may take: the enclave VM boots, starts its
/// egress and Python under emulation.
const FIRST_ANSWER: Duration = Duration::from_secs(180);
/// What the workshop's client.py prints of its server.py's answer (`str()`
/// of a list), per region.
const WORKSHOP_ANSWERS: [(&str, &str); 2] = [
    ("us-east-1", "Received from server: ['3.5.0.0/19', '16.182.0.0/16', '52.216.0.0/15']"),
    ("eu-west-1", "Received from server: ['3.5.64.0/21', '52.218.0.0/17']"),
];

/// The parent's side of transparent egress; the enclave VM runs
/// dist/enclave/entry.sh as PID 1 with `EGRESS=transparent` and the
/// workshop's server.py (tests/vm/init): no hosts line, no port mapping, no
/// proxy variable. Here: the HTTPS stand-in on [`REMOTE_ADDRESS`], a name
/// server answering [`REMOTE_HOST`] with it, and one `vsock-relay proxy`
/// with the `dns` (vsock port 8053) and `transparent` (8001) services, whose
/// allowlist names only `ip-ranges.amazonaws.com:443`. Then
/// `vsock-relay client` asks the enclave's `vsock-relay serve` and the
/// workshop's client.py, unchanged under Debian's Python, asks its
/// server.py: both must print the region's prefixes, fetched through the
/// enclave's DNS and redirect, allowed by the name the parent answered.
#[test]
#[ignore = "runs only in the parent VM of tests/vm/two-vms.sh"]
fn parent_transparent() {
    use std::net::{IpAddr, SocketAddr};
    use vsock_relay_apps::sample::demo::{HttpsEndpoint, SAMPLE_DOCUMENT};
    use vsock_relay_testkit::names::{Answer, NameServer};
    require_role("two-vms-parent-transparent");
    assert!(!parent_is_vsock_host(), "client.py cannot set VMADDR_FLAG_TO_HOST: no vhost_vsock here");
    let address: IpAddr = REMOTE_ADDRESS.parse().unwrap();
    let added = Command::new("ip").args(["addr", "add", &format!("{address}/32"), "dev", "lo"]).status();
    assert!(added.is_ok_and(|s| s.success()), "ip addr add {address}/32 dev lo");
    let endpoint = HttpsEndpoint::start_at(
        SocketAddr::new(address, 443),
        vec![REMOTE_HOST.into()],
        SAMPLE_DOCUMENT.to_vec(),
    )
    .unwrap();
    let names = NameServer::start();
    names.set(REMOTE_HOST, Answer::Addresses(vec![address]));

    let config = std::env::temp_dir().join("parent-egress.yaml");
    std::fs::write(
        &config,
        format!(
            "allowlist:\n- {{address: {REMOTE_HOST}, port: 443}}\nservices:\n\
             - {{name: dns, listen: 'vsock:any:8053', route: dns}}\n\
             - {{name: transparent, listen: 'vsock:any:8001', route: transparent}}\n"
        ),
    )
    .unwrap();
    let log_path = std::env::temp_dir().join("parent-proxy.log");
    let config_text = config.to_str().unwrap();
    let name_server = names.addr().to_string();
    let args = ["proxy", "--services", config_text, "--config", config_text, "--dns-server", &name_server];
    let _proxy = KillOnDrop(vec![Command::new(vsock_relay_testkit::binary("vsock-relay"))
        .args(args)
        .env("RUST_LOG", "info,vsock_relay_apps::dns=debug")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap()]);
    let proxy_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy_log().contains("relay listening") {
        assert!(Instant::now() < deadline, "vsock-relay {args:?} did not listen:\n{}", proxy_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("[parent] vsock-relay {}", args.join(" "));
    println!("[parent] {REMOTE_HOST} at {address}:443 (the HTTPS stand-in), named by {name_server}");
    hand_out_ca(endpoint.ca_pem());

    // `vsock-relay serve` without --hosts: once it answers, the enclave's
    // egress is up.
    let serve = format!("vsock:{ENCLAVE_CID}:{SERVE_PORT}");
    for (i, (region, expected)) in ANSWERS.into_iter().enumerate() {
        let within = if i == 0 { FIRST_ANSWER } else { Duration::from_secs(30) };
        let answer = client_answer(&serve, region, within);
        println!("[parent] vsock-relay client --to {serve} {region}: {}", answer.trim_end());
        assert_eq!(answer, expected, "{region}");
    }
    if std::path::Path::new("/workshop/client.py").exists() {
        for (region, expected) in WORKSHOP_ANSWERS {
            let said = workshop_client(region, Duration::from_secs(120));
            println!("[parent] python3 client.py client {ENCLAVE_CID} 5005 {region}:\n{}", said.trim_end());
            assert!(said.lines().any(|line| line == expected), "{region}: expected `{expected}`");
        }
    } else {
        // two-vms.sh did not find the workshop's files beside the checkout:
        // the enclave runs `vsock-relay serve` on 5005 in server.py's place
        // (it fetches once, as server.py would for the first query).
        println!(
            "[parent] NOTE: the workshop's client.py and server.py were not packed (VSOCK_RELAY_WORKSHOP)"
        );
        let stand_in = format!("vsock:{ENCLAVE_CID}:5005");
        for (region, expected) in ANSWERS.into_iter().take(WORKSHOP_ANSWERS.len()) {
            let answer = client_answer(&stand_in, region, Duration::from_secs(120));
            println!("[parent] vsock-relay client --to {stand_in} {region}: {}", answer.trim_end());
            assert_eq!(answer, expected, "{region}");
        }
    }
    // serve keeps the document for a while; server.py fetches per query.
    let fetches = match std::path::Path::new("/workshop/client.py").exists() {
        true => 1 + WORKSHOP_ANSWERS.len(),
        false => 2,
    };
    assert_eq!(endpoint.requests(), fetches as u64, "the stand-in's fetches");

    let log = proxy_log();
    let allowed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("transparent: allowed by the name this client was answered"))
        .collect();
    for line in &allowed {
        println!("[parent] proxy: {line}");
    }
    assert_eq!(allowed.len(), fetches, "one allowed connection per fetch:\n{log}");
    let attributed = format!("name={REMOTE_HOST}");
    assert!(
        allowed.iter().all(|line| line.contains(&attributed) && line.contains(REMOTE_ADDRESS)),
        "each attributed to {REMOTE_HOST} at {REMOTE_ADDRESS}"
    );
    assert!(!log.contains("refused"), "nothing refused:\n{log}");
}

/// `python3 /workshop/client.py client 16 5005 REGION` (the workshop's
/// client, unchanged), run again while it fails (the enclave's server.py
/// not listening yet) for at most `within`; its output.
fn workshop_client(region: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new("python3")
            .args(["/workshop/client.py", "client", &ENCLAVE_CID.to_string(), "5005", region])
            .output()
            .expect("python3 (the transparent image's)");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && said.contains("Received from server: ") {
            return said;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(Instant::now() < deadline, "client.py {region}: {said}{stderr}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------
// Cross-VM tests

/// The enclave's side: every scenario on both backends, each a client here
/// and a relay in the parent VM.
#[test]
#[ignore = "runs only in the enclave VM of tests/vm/two-vms.sh"]
fn enclave_suite() {
    require_role("two-vms-enclave-suite");
    let mut failures = Vec::new();
    let mut first = true;
    for scenario in SCENARIOS {
        for backend in BACKENDS {
            let within = if first { PEER_BOOT } else { Duration::from_secs(10) };
            first = false;
            let mut control = Control::new(connect_within(&parent(CONTROL_PORT), within));
            control.send(&format!("{scenario} {backend}"));
            let started = Instant::now();
            let client = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                enclave_scenario(scenario, backend, &mut control)
            }));
            let verdict = match client {
                Ok(()) => control.recv(),
                Err(panic) => format!("fail in the enclave: {}", panic_text(&panic)),
            };
            println!("[enclave] {scenario} {backend}: {verdict} ({:.1} s)", started.elapsed().as_secs_f64());
            if verdict != "ok" {
                failures.push(format!("{scenario} {backend}: {verdict}"));
            }
        }
    }
    let mut control = Control::new(connect_within(&parent(CONTROL_PORT), Duration::from_secs(10)));
    control.send("finish 0");
    assert!(failures.is_empty(), "cross-VM scenarios failed:\n{}", failures.join("\n"));
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// The parent's side: serves the enclave's scenarios until it says `finish`;
/// passes when every scenario passed here and every one was asked for.
#[test]
#[ignore = "runs only in the parent VM of tests/vm/two-vms.sh"]
fn parent_suite() {
    require_role("two-vms-parent-suite");
    let listener = vsock_listener(CONTROL_PORT);
    // Bounded: an enclave that stops asking fails this side too.
    listener.set_read_timeout(Some(PEER_BOOT)).unwrap();
    println!("[parent] control port {CONTROL_PORT} listening");
    let mut served = Vec::new();
    let mut failures = Vec::new();
    loop {
        let (stream, cid) = accept(&listener);
        assert_eq!(cid, ENCLAVE_CID, "the control connection comes from the enclave VM's CID");
        let mut control = Control::new(stream);
        let request = control.recv();
        let (scenario, backend) = request.split_once(' ').expect("SCENARIO BACKEND");
        if scenario == "finish" {
            break;
        }
        let (scenario, backend) = (scenario.to_string(), backend.to_string());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parent_scenario(&scenario, backend_named(&backend), &mut control)
        }));
        let verdict = match outcome {
            Ok(()) => "ok".to_string(),
            Err(panic) => format!("fail in the parent: {}", panic_text(&panic).replace('\n', " ")),
        };
        println!("[parent] {scenario} {backend}: {verdict}");
        // The enclave may have gone after its own failure.
        let _ = control.writer.write_all(format!("{verdict}\n").as_bytes());
        if verdict != "ok" {
            failures.push(format!("{scenario} {backend}: {verdict}"));
        }
        served.push(format!("{scenario} {backend}"));
    }
    let expected: Vec<String> =
        SCENARIOS.iter().flat_map(|s| BACKENDS.iter().map(move |b| format!("{s} {b}"))).collect();
    assert_eq!(served, expected, "the scenarios the enclave asked for");
    assert!(failures.is_empty(), "cross-VM scenarios failed:\n{}", failures.join("\n"));
}

/// Each scenario's ports: its own range, so no relay of an earlier one is
/// in the way.
fn base_port(scenario: &str, backend: BackendChoice) -> u32 {
    let index = SCENARIOS.iter().position(|s| *s == scenario).expect("a scenario") as u32;
    20_000 + index * 100 + if backend == BackendChoice::Portable { 50 } else { 0 }
}

const EXACT_MAX: u64 = 2 * MIB;

/// The parent's side of one scenario (panics on a failed check).
fn parent_scenario(scenario: &str, backend: BackendChoice, control: &mut Control) {
    let base = base_port(scenario, backend);
    match scenario {
        // enclave -> (vsock) relay -> (TCP) twin server, 64 connections,
        // SHA-256 both ways: the way vsock-proxy carries an enclave's calls.
        "exact-up" => {
            let ledger = Ledger::default();
            let server = Server::tcp(twin(Arc::clone(&ledger)));
            let relay = relay(vsock_any(base), server.endpoint(), backend, DataPath::Auto);
            control.send(&format!("ready {base}"));
            control.expect("done");
            check_uploads(&ledger, &expected_uploads(&cases(EXACT_MAX, 21)));
            assert_eq!(relay.stats().snapshot().failed(), 0);
        }
        // (TCP) relay -> (vsock) twin server in the enclave: the parent's
        // clients into the enclave, connecting to CID 16.
        "exact-down" => {
            let port = control.expect("ready").parse::<u32>().unwrap();
            let to = Endpoint::vsock(ENCLAVE_CID, port);
            let relay = relay("tcp:127.0.0.1:0".parse().unwrap(), &to, backend, DataPath::Auto);
            run_clients(relay.local_endpoint(), cases(EXACT_MAX, 22));
            assert_eq!(relay.stats().snapshot().failed(), 0);
        }
        // Half-close both ways: the client's first (it still gets the
        // whole reply), then the upstream's (it still gets the whole upload).
        "half-close" => {
            let replier = Server::tcp(|mut stream| {
                let (bytes, _) = traffic::receive(&mut stream).unwrap();
                traffic::send(&mut stream, MIB + bytes, 42).unwrap();
            });
            let (tx, rx) = mpsc::channel();
            let tx = Mutex::new(tx);
            let sender = Server::tcp(move |mut stream| {
                traffic::send(&mut stream, MIB, 5).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                tx.lock().unwrap().send(traffic::receive(&mut stream).unwrap()).unwrap();
            });
            let relay_a = relay(vsock_any(base), replier.endpoint(), backend, DataPath::Auto);
            let relay_b = relay(vsock_any(base + 1), sender.endpoint(), backend, DataPath::Auto);
            control.send(&format!("ready {base}"));
            control.expect("done");
            let received = rx.recv_timeout(Duration::from_secs(60)).expect("the upstream's upload");
            assert_eq!(received, (2 * MIB, traffic::expected_hash(2 * MIB, 6)), "what the upstream received");
            for relay in [relay_a, relay_b] {
                assert_eq!(relay.stats().snapshot().failed(), 0);
            }
        }
        // A reader that stops: the relay process holds the enclave's client
        // back with its memory bounded, then delivers every byte.
        "stalled" => {
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let (done_tx, done_rx) = mpsc::channel();
            let (go_rx, done_tx) = (Mutex::new(go_rx), Mutex::new(done_tx));
            let stalled = Server::tcp(move |mut stream| {
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(120));
                done_tx.lock().unwrap().send(traffic::receive(&mut stream).unwrap()).unwrap();
            });
            let target = stalled.endpoint().to_string();
            let backend_name = if backend == BackendChoice::Portable { "portable" } else { "uring" };
            let listen = format!("vsock:any:{base}");
            let relay = KillOnDrop(vec![spawn_listening(
                "vsock-relay",
                &["relay", "--listen", &listen, "--to", &target, "--backend", backend_name],
            )]);
            control.send(&format!("ready {base}"));
            control.expect("stalled");
            let rss = rss_kib(relay.0[0].id());
            go_tx.send(()).unwrap();
            control.send(&format!("rss {rss}"));
            control.expect("done");
            let received =
                done_rx.recv_timeout(Duration::from_secs(120)).expect("the stalled reader's bytes");
            assert_eq!(received, (STALLED_BYTES, traffic::expected_hash(STALLED_BYTES, 9)));
            assert!(rss < STALLED_RSS_BOUND_KIB, "the relay held {rss} KiB while the reader stalled");
            println!("[parent] stalled {backend_name}: relay RSS {rss} KiB while the reader stalled");
        }
        // --allow-cid 16 admits the enclave; a relay allowing only CID 17
        // refuses it (counted, never accepted).
        "allow-cid" => {
            let server = Server::tcp(echo);
            let start = |port: u32, cid: u32| {
                let mut config = RelayConfig::new(vsock_any(port), Target::fixed(server.endpoint()).unwrap());
                config.backend = backend;
                config.service().rules.allow_cids = Some(vec![cid]);
                vsock_relay_engine::Relay::start(config).unwrap()
            };
            let (admits, refuses) = (start(base, ENCLAVE_CID), start(base + 1, ENCLAVE_CID + 1));
            control.send(&format!("ready {base}"));
            control.expect("done");
            let admitted = admits.stats().snapshot();
            assert_eq!((admitted.accepted, admitted.refused()), (1, 0), "--allow-cid {ENCLAVE_CID}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while refuses.stats().snapshot().refused() == 0 {
                assert!(Instant::now() < deadline, "the refusal of CID {ENCLAVE_CID} is counted");
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(refuses.stats().snapshot().accepted, 0, "--allow-cid {}", ENCLAVE_CID + 1);
        }
        other => panic!("no scenario `{other}`"),
    }
}

const STALLED_BYTES: u64 = 32 * MIB;

/// The enclave's side of one scenario (panics on a failed check).
fn enclave_scenario(scenario: &str, backend: &str, control: &mut Control) {
    match scenario {
        "exact-up" => {
            let port = control.expect("ready").parse().unwrap();
            run_clients(&parent(port), cases(EXACT_MAX, 21));
            control.send("done");
        }
        "exact-down" => {
            // A twin server for the 64 connections the parent's relay opens.
            let ledger = Ledger::default();
            let port = base_port("exact-down", backend_named(backend)) + 10;
            let listener = vsock_listener(port);
            // Bounded: a parent that never connects fails the scenario.
            listener.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let serving = {
                let ledger = Arc::clone(&ledger);
                std::thread::spawn(move || {
                    let handlers: Vec<_> = (0..64)
                        .map(|_| {
                            let (stream, cid) = accept(&listener);
                            assert_eq!(cid, PARENT_CID, "the parent's relay connects from CID 3");
                            let handler = twin(Arc::clone(&ledger));
                            std::thread::spawn(move || handler(stream))
                        })
                        .collect();
                    for handler in handlers {
                        handler.join().unwrap();
                    }
                })
            };
            control.send(&format!("ready {port}"));
            serving.join().expect("the enclave's twin server");
            check_uploads(&ledger, &expected_uploads(&cases(EXACT_MAX, 22)));
        }
        "half-close" => {
            let base: u32 = control.expect("ready").parse().unwrap();
            let mut client = Stream::connect(&parent(base)).unwrap();
            traffic::send(&mut client, 1000, 7).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let reply = traffic::receive(&mut client).unwrap();
            assert_eq!(
                reply,
                (MIB + 1000, traffic::expected_hash(MIB + 1000, 42)),
                "the reply after a half-close"
            );

            let mut client = Stream::connect(&parent(base + 1)).unwrap();
            let first = traffic::receive(&mut client).unwrap();
            assert_eq!(
                first,
                (MIB, traffic::expected_hash(MIB, 5)),
                "what came before the upstream's half-close"
            );
            traffic::send(&mut client, 2 * MIB, 6).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            control.send("done");
        }
        "stalled" => {
            let port = control.expect("ready").parse().unwrap();
            let mut client = Stream::connect(&parent(port)).unwrap();
            let writer = std::thread::spawn(move || {
                let sent = traffic::send(&mut client, STALLED_BYTES, 9).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
                sent
            });
            std::thread::sleep(Duration::from_secs(3));
            assert!(!writer.is_finished(), "the client pushed {STALLED_BYTES} B into a stalled reader");
            control.send("stalled");
            let rss = control.expect("rss");
            println!("[enclave] held back; the parent's relay held {rss} KiB");
            writer.join().expect("the client's writes");
            control.send("done");
        }
        "allow-cid" => {
            let base: u32 = control.expect("ready").parse().unwrap();
            let mut admitted = Stream::connect(&parent(base)).unwrap();
            admitted.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            admitted.write_all(b"cid?").unwrap();
            let mut reply = [0u8; 4];
            admitted.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"cid?", "served with --allow-cid {ENCLAVE_CID}");
            drop(admitted);
            let refused = Stream::connect(&parent(base + 1));
            if let Ok(mut refused) = refused {
                refused.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = refused.write_all(b"cid?");
                let mut reply = [0u8; 4];
                let got = refused.read(&mut reply);
                assert!(matches!(got, Ok(0) | Err(_)), "CID {ENCLAVE_CID} refused, got {got:?}");
            }
            control.send("done");
        }
        other => panic!("no scenario `{other}`"),
    }
}

// ---------------------------------------------------------------------------
// The transport alone: no relay, the two VMs' sockets and the device

/// The parent's probe port.
const PROBE_PORT: u32 = 9200;
/// Write sizes of the probe: below, at and above one receive buffer of the
/// guest driver (4 KiB), up to one whole packet (64 KiB) and beyond.
const PROBE_WRITES: [usize; 7] = [512, 4096, 4097, 16 * 1024, 32 * 1024, 64 * 1024, 256 * 1024];
const PROBE_BYTES: u64 = MIB;

/// Writes `len` seeded bytes in writes of exactly `size` bytes; returns their SHA-256.
fn send_in_writes(stream: &mut Stream, len: u64, size: usize, seed: u64) -> [u8; 32] {
    let mut data = vec![0u8; len as usize];
    traffic::Data::new(seed).fill(&mut data);
    for chunk in data.chunks(size) {
        stream.write_all(chunk).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    traffic::expected_hash(len, seed)
}

/// The parent's probe side: per connection a header (direction, bytes,
/// write size, seed); `U` reads to EOF and answers count and SHA-256, `D`
/// writes the bytes in writes of that size.
#[test]
#[ignore = "runs only in the parent VM of tests/vm/two-vms.sh"]
fn parent_probe() {
    require_role("two-vms-parent-probe");
    let listener = vsock_listener(PROBE_PORT);
    listener.set_read_timeout(Some(PEER_BOOT)).unwrap();
    println!("[parent] probe port {PROBE_PORT} listening");
    loop {
        let (mut stream, _) = accept(&listener);
        let mut header = [0u8; 25];
        if stream.read_exact(&mut header).is_err() {
            continue;
        }
        let word = |i: usize| u64::from_le_bytes(header[1 + 8 * i..9 + 8 * i].try_into().unwrap());
        let (len, size, seed) = (word(0), word(1) as usize, word(2));
        match header[0] {
            b'F' => break,
            b'U' => {
                std::thread::spawn(move || {
                    let (got, hash) = traffic::receive(&mut stream).unwrap_or((u64::MAX, [0; 32]));
                    let _ = stream.write_all(&got.to_le_bytes());
                    let _ = stream.write_all(&hash);
                });
            }
            b'D' => {
                std::thread::spawn(move || send_in_writes(&mut stream, len, size, seed));
            }
            other => panic!("probe: no direction `{}`", other as char),
        }
    }
}

/// One probe connection from the enclave: `up` sends, else receives;
/// `Ok(())` when the other side got (or sent) every byte intact.
fn probe_one(up: bool, len: u64, size: usize, seed: u64) -> Result<(), String> {
    let mut stream = Stream::connect(&parent(PROBE_PORT)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut header = vec![if up { b'U' } else { b'D' }];
    for word in [len, size as u64, seed] {
        header.extend_from_slice(&word.to_le_bytes());
    }
    stream.write_all(&header).map_err(|e| format!("header: {e}"))?;
    let expected = traffic::expected_hash(len, seed);
    let (got, hash) = if up {
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_in_writes(&mut writer, len, size, seed));
        let mut answer = [0u8; 40];
        stream.read_exact(&mut answer).map_err(|e| format!("the parent's count: {e}"))?;
        sender.join().map_err(|_| "send".to_string())?;
        (u64::from_le_bytes(answer[..8].try_into().unwrap()), answer[8..].try_into().unwrap())
    } else {
        traffic::receive(&mut stream).map_err(|e| format!("receive: {e}"))?
    };
    match (got, hash) {
        (got, hash) if got == len && hash == expected => Ok(()),
        (got, _) if got == len => Err("every byte counted, SHA-256 differs".into()),
        (got, _) => Err(format!("{got} of {len} bytes")),
    }
}

/// The enclave's probe: 1 MiB each way in writes of each size of
/// [`PROBE_WRITES`], one connection at a time; then 8, 32 and 64
/// connections at once; prints a line per case and fails if any lost bytes.
#[test]
#[ignore = "runs only in the enclave VM of tests/vm/two-vms.sh"]
fn enclave_probe() {
    require_role("two-vms-enclave-probe");
    drop(connect_within(&parent(PROBE_PORT), PEER_BOOT));
    let mut failures = Vec::new();
    let mut report = |what: String, outcome: Result<(), String>, started: Instant| {
        let verdict = outcome.clone().err().unwrap_or_else(|| "ok".into());
        println!("[enclave] probe {what}: {verdict} ({:.1} s)", started.elapsed().as_secs_f64());
        if outcome.is_err() {
            failures.push(format!("{what}: {verdict}"));
        }
    };
    for up in [true, false] {
        for size in PROBE_WRITES {
            let started = Instant::now();
            let way = if up { "enclave->parent" } else { "parent->enclave" };
            report(
                format!("{way} writes of {size} B"),
                probe_one(up, PROBE_BYTES, size, size as u64),
                started,
            );
        }
    }
    for at_once in [8usize, 32, 64] {
        for up in [true, false] {
            let started = Instant::now();
            let threads: Vec<_> = (0..at_once)
                .map(|i| std::thread::spawn(move || probe_one(up, 256 * 1024, 1 + i * 997, i as u64)))
                .collect();
            let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let bad: Vec<_> = outcomes.iter().filter_map(|o| o.clone().err()).collect();
            let way = if up { "enclave->parent" } else { "parent->enclave" };
            let outcome = if bad.is_empty() {
                Ok(())
            } else {
                Err(format!("{} failed: {}", bad.len(), bad.join("; ")))
            };
            report(format!("{at_once} at once {way}, 256 KiB each"), outcome, started);
        }
    }
    let mut finish = Stream::connect(&parent(PROBE_PORT)).unwrap();
    let _ = finish.write_all(&[b'F'; 25]);
    assert!(failures.is_empty(), "the transport lost bytes:\n{}", failures.join("\n"));
}
