//! The soak: mixed traffic for a given time through the enclave's chain, the
//! forwarder (`vsock-relay forward`, TCP in) and the proxy (`vsock-relay
//! proxy`, a fixed service by name and a routed CONNECT service), to an
//! upstream server, while a seeded chaos schedule breaks things (see
//! [`chaos`]). At the end every client connection is accounted for against
//! the relays' own counters ([`account`]), and the relays' memory,
//! descriptors, threads and log rate, sampled every second, are judged.
//!
//! On the host, Unix sockets stand in for the vsock hop and the run lives in
//! a network namespace of its own (where `tc netem` may shape the upstream
//! link without touching the machine's); in the tests/vm guest the hop is
//! real vsock.

pub mod account;
pub mod chaos;
pub mod clients;
pub mod upstream;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::names::{Answer, NameServer};
use crate::traffic::Rng;
use account::{floor_growth, Accounting, RelayCounts};
use chaos::{Fault, Schedule};
use clients::{Kind, Live, Ports};
use upstream::Upstream;

/// The name the proxy's fixed service and the routed clients use.
const NAME: &str = "upstream.soak.test";
/// The two upstream addresses DNS moves between.
const UPSTREAM_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
/// Stated bounds, after warm-up: growth of the floor of each relay's RSS,
/// descriptors and threads; log lines per second over any 10 s window.
pub const RSS_GROWTH_KIB: f64 = 4096.0;
pub const FD_GROWTH: f64 = 16.0;
pub const THREAD_GROWTH: f64 = 2.0;
pub const LOG_LINES_PER_S: f64 = 50.0;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub seconds: u64,
    pub seed: u64,
    /// Where the logs, samples and summary go.
    pub out: PathBuf,
    /// `--backend` of both relays.
    pub backend: String,
    /// Traffic rate factor (1: the host's modest default).
    pub rate: f64,
    /// First of the TCP (and vsock) ports used.
    pub port_base: u16,
    /// Real vsock between forwarder and proxy (only in the tests/vm guest).
    pub vsock: bool,
    /// tc netem on the upstream link (needs the run's own network namespace).
    pub netem: bool,
    /// Test only: a hop before the forwarder flips one byte of one connection.
    pub inject_corruption: bool,
    /// The proxy's descriptor limit (the bursts go past it).
    pub proxy_open_files: u64,
}

impl Options {
    pub fn new(seconds: u64, seed: u64, out: PathBuf) -> Options {
        Options {
            seconds,
            seed,
            out,
            backend: "auto".into(),
            rate: 1.0,
            port_base: 17200,
            vsock: false,
            netem: false,
            inject_corruption: false,
            proxy_open_files: 384,
        }
    }
}

/// A run's phases, from its start.
struct Phases {
    warm_up: Duration,
    /// No new connection after this; faults stop a little before.
    traffic_end: Duration,
    length: Duration,
}

impl Phases {
    /// From 2 minutes on: 20 s to 5 min of warm-up and 30 s to let the last
    /// connections end; shorter runs (tests) in proportion.
    fn of(seconds: u64) -> Phases {
        let length = Duration::from_secs(seconds.max(20));
        let (warm_up, drain) = if seconds >= 120 {
            (Duration::from_secs((seconds / 10).clamp(20, 300)), Duration::from_secs(30))
        } else {
            (length / 6, length / 4)
        };
        Phases { warm_up, traffic_end: length - drain, length }
    }
}

/// What a run found.
pub struct Outcome {
    pub problems: Vec<String>,
    pub summary: serde_json::Value,
}

/// A relay child whose stderr lines are written to a file and counted.
struct Relay {
    child: Child,
    lines: Arc<AtomicU64>,
}

impl Relay {
    fn spawn(mut command: Command, log: &Path) -> Result<Relay, String> {
        command.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| format!("cannot start {command:?}: {e}"))?;
        let lines = Arc::new(AtomicU64::new(0));
        let (counted, pipe) = (Arc::clone(&lines), child.stderr.take());
        let mut file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        std::thread::spawn(move || {
            let Some(pipe) = pipe else { return };
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = writeln!(file, "{line}");
            }
        });
        Ok(Relay { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status();
    }

    /// SIGTERM, then the exit code (killed after 15 s).
    fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One second's sample of a process: RSS (KiB), descriptors, threads.
fn sample(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

/// `/metrics` from a Unix socket.
fn scrape(path: &Path) -> Result<String, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| format!("scrape {}: {e}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("scrape {}: {e}", path.display()))?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("{what} not ready within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `tc` on the namespace's loopback: a prio qdisc whose third band (netem)
/// takes the packets to and from the upstream addresses only.
struct Netem;

impl Netem {
    fn tc(args: &str) -> Result<(), String> {
        let status = Command::new("tc").args(args.split_whitespace()).stderr(Stdio::null()).status();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("`tc {args}` exited {s}")),
            Err(e) => Err(format!("`tc` cannot run: {e}")),
        }
    }

    fn set_up() -> Result<Netem, String> {
        // Whether the kernel has netem (and prio) at all, before anything is set.
        for kind in ["netem", "prio"] {
            Netem::tc(&format!("qdisc add dev lo root handle 1: {kind}")).map_err(|_| {
                format!("this kernel has no `{kind}` qdisc (sch_{kind}): `tc qdisc add ... {kind}` fails")
            })?;
            Netem::tc("qdisc del dev lo root")?;
        }
        Netem::tc("qdisc add dev lo root handle 1: prio")?;
        Netem::tc("qdisc add dev lo parent 1:3 handle 30: netem delay 0ms")?;
        for way in ["dst", "src"] {
            Netem::tc(&format!(
                "filter add dev lo parent 1:0 protocol ip prio 1 u32 match ip {way} 127.0.0.2/31 flowid 1:3"
            ))?;
        }
        Ok(Netem)
    }

    fn impair(&self, loss_pct: u32, delay_ms: u32, reorder_pct: u32) -> Result<(), String> {
        Netem::tc(&format!(
            "qdisc change dev lo parent 1:3 handle 30: netem loss {loss_pct}% delay {delay_ms}ms reorder {reorder_pct}% 50%"
        ))
    }

    fn clear(&self) -> Result<(), String> {
        Netem::tc("qdisc change dev lo parent 1:3 handle 30: netem delay 0ms")
    }
}

/// Test only: a TCP hop that passes every connection on to `to`, flipping
/// one bit of byte 999 towards the client of the first connection whose
/// answer gets that far (whichever it is: which client connects when
/// depends on the machine's timing, and some carry fewer bytes).
fn corrupting_hop(listen: SocketAddr, to: SocketAddr) -> Result<(), String> {
    const FLIP_AT: u64 = 999;
    let listener = TcpListener::bind(listen).map_err(|e| format!("corrupting hop on {listen}: {e}"))?;
    let flipped = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(to) else { continue };
            for (from, into, flip) in [
                (client.try_clone(), server.try_clone(), None),
                (server.try_clone(), client.try_clone(), Some(flipped.clone())),
            ] {
                let (Ok(mut from), Ok(mut into)) = (from, into) else { continue };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut at = 0u64;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some(flipped) = &flip {
                            if (at..at + n as u64).contains(&FLIP_AT) && !flipped.swap(true, Ordering::SeqCst)
                            {
                                buf[(FLIP_AT - at) as usize] ^= 0x01;
                            }
                        }
                        at += n as u64;
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
        }
    });
    Ok(())
}

/// Runs the soak; `Err` when it could not be set up.
///
/// Its phases, each a function below: set-up (the upstream, its name, both
/// relays ready), traffic and chaos (the sampler, the client lanes, the
/// schedule's faults on this thread), teardown (traffic stopped, the relays'
/// counters scraped, the relays stopped), then the accounting of every
/// connection, the judgement of the relays' resources and the summary.
pub fn run(options: &Options) -> Result<Outcome, String> {
    let phases = Phases::of(options.seconds);
    let (rig, relays) = Rig::set_up(options)?;
    let schedule = announce_schedule(options, &phases)?;

    let started = Instant::now();
    let live = Arc::new(Live::default());
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let faults_done = Arc::new(AtomicU64::new(0));
    let sampler = Sampler::start(&options.out, &relays, &rig.upstream, started, &live, &faults_done)?;
    let lanes = start_lanes(options, &phases, started, &live, &stop_traffic, &rig.ports);
    let mut chaos = Chaos { options, rig: &rig, proxy: &relays.proxy, live: &live, started, dns_at: 0 };
    let faults = chaos.play(&schedule, &faults_done);

    std::thread::sleep(phases.traffic_end.saturating_sub(started.elapsed()));
    stop_traffic.store(true, Ordering::SeqCst);
    say(&format!("t={:.1}s traffic stops; waiting for open connections", started.elapsed().as_secs_f64()));
    for lane in lanes {
        let _ = lane.join();
    }
    // The relays count a close a moment after the client sees it.
    std::thread::sleep(Duration::from_secs(2).max(phases.length.saturating_sub(started.elapsed())));
    let ended = relays.tear_down(sampler, &options.out)?;
    let _ = std::fs::remove_dir_all(&rig.sockets);

    let upstream = rig.upstream.lock().unwrap_or_else(|p| p.into_inner());
    let mut findings = Findings::of(&options.out, &ended, &live, &upstream)?;
    let judged = judge_resources(&ended.rows, &phases, &mut findings.problems);
    let summary = summarize(options, &phases, &rig.notes, &findings, faults, &judged);
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(options.out.join("summary.json"), &text).map_err(|e| e.to_string())?;
    Ok(Outcome { problems: findings.problems, summary })
}

fn say(line: &str) {
    println!("soak: {line}");
}

/// What set-up starts for the whole run besides the relays: the upstream
/// server and the name server that names it, the allowlist the chaos
/// schedule breaks and restores, and the ports the clients connect to.
struct Rig {
    /// Why parts of the run are skipped here (in the summary).
    notes: Vec<String>,
    netem: Option<Netem>,
    /// The folder of the run's Unix sockets.
    sockets: PathBuf,
    upstream: Arc<Mutex<Upstream>>,
    names: NameServer,
    allowlist: PathBuf,
    valid_allowlist: String,
    ports: Ports,
}

/// The two relays under test and their metrics sockets.
struct Relays {
    proxy: Relay,
    forward: Relay,
    proxy_metrics: PathBuf,
    forward_metrics: PathBuf,
}

/// The relays' counters and the sampler's rows, taken at teardown.
struct Ended {
    forward_text: String,
    proxy_text: String,
    rows: Vec<String>,
    proxy_exit: Option<i32>,
    forward_exit: Option<i32>,
}

impl Rig {
    /// Set-up: the run's folders, netem where asked, the upstream and its
    /// name, the allowlist and services files, both relays ready, and the
    /// ports clients use (through a corrupting hop when the test asks).
    fn set_up(options: &Options) -> Result<(Rig, Relays), String> {
        std::fs::create_dir_all(&options.out).map_err(|e| format!("{}: {e}", options.out.display()))?;
        let sockets = std::env::temp_dir().join(format!("soak-{}-{}", std::process::id(), options.port_base));
        std::fs::create_dir_all(&sockets).map_err(|e| e.to_string())?;
        let (netem, notes) = netem_for(options);
        for note in &notes {
            say(note);
        }

        let upstream = Arc::new(Mutex::new(
            Upstream::start(&UPSTREAM_IPS.map(IpAddr::V4), options.port_base + 100)
                .map_err(|e| format!("upstream server: {e}"))?,
        ));
        let port = upstream.lock().unwrap_or_else(|p| p.into_inner()).port();
        let names = NameServer::start();
        names.set(NAME, Answer::Addresses(vec![IpAddr::V4(UPSTREAM_IPS[0])]));

        let allowlist = options.out.join("allowlist.yaml");
        let valid_allowlist = format!(
            "allowlist:\n- {{address: {NAME}, port: {port}}}\n- {{address: 127.0.0.2/31, port: {port}}}\n"
        );
        std::fs::write(&allowlist, &valid_allowlist).map_err(|e| e.to_string())?;
        let hops = if options.vsock {
            [format!("vsock:any:{}", options.port_base + 10), format!("vsock:any:{}", options.port_base + 11)]
        } else {
            [
                format!("unix:{}", sockets.join("fixed.sock").display()),
                format!("unix:{}", sockets.join("routed.sock").display()),
            ]
        };
        let services = options.out.join("services.yaml");
        std::fs::write(
            &services,
            format!(
                "services:\n- {{name: fixed, listen: '{}', address: {NAME}, port: {port}}}\n\
                 - {{name: routed, listen: '{}', route: connect}}\n",
                hops[0], hops[1]
            ),
        )
        .map_err(|e| e.to_string())?;
        let relays = Relays::start(options, &sockets, [&services, &allowlist], names.addr(), &hops)?;

        let fixed_addr: SocketAddr = ([127, 0, 0, 1], options.port_base).into();
        let mut ports = Ports {
            fixed: fixed_addr,
            routed: Some((([127, 0, 0, 1], options.port_base + 1).into(), format!("{NAME}:{port}"))),
        };
        if options.inject_corruption {
            let hop: SocketAddr = ([127, 0, 0, 1], options.port_base + 5).into();
            corrupting_hop(hop, fixed_addr)?;
            ports.fixed = hop;
            say(&format!(
                "test only: a hop on {hop} flips a bit of byte 999 towards the client, in the first connection whose answer gets that far"
            ));
        }
        let rig = Rig { notes, netem, sockets, upstream, names, allowlist, valid_allowlist, ports };
        Ok((rig, relays))
    }
}

/// netem where the options ask for it and the kernel has it, with the
/// notes on why not otherwise.
fn netem_for(options: &Options) -> (Option<Netem>, Vec<String>) {
    if !options.netem {
        let why =
            "netem faults skipped: no network namespace of the run's own (only there may tc shape loopback)";
        return (None, vec![why.into()]);
    }
    match Netem::set_up() {
        Ok(netem) => (Some(netem), Vec::new()),
        Err(why) => (None, vec![format!("netem faults skipped: {why}")]),
    }
}

impl Relays {
    /// The proxy (the services file's fixed and routed services, under its
    /// descriptor limit) and the forwarder in front of it (TCP on
    /// `port_base` and `port_base + 1` to the two hops), both ready: their
    /// metrics sockets there and one probe connection through the forwarder
    /// (the accounting counts it).
    fn start(
        options: &Options,
        sockets: &Path,
        [services, allowlist]: [&Path; 2],
        name_server: SocketAddr,
        hops: &[String; 2],
    ) -> Result<Relays, String> {
        let (proxy_metrics, forward_metrics) =
            (sockets.join("proxy-metrics.sock"), sockets.join("forward-metrics.sock"));
        let relay_binary = crate::binary("vsock-relay");
        let mut proxy_command = Command::new(&relay_binary);
        proxy_command.args(["proxy", "--services"]).arg(services).arg("--config").arg(allowlist).args([
            "--dns-server",
            &name_server.to_string(),
            "--metrics",
            &format!("unix:{}", proxy_metrics.display()),
            "--backend",
            &options.backend,
        ]);
        crate::seccomp::limit_open_files(&mut proxy_command, options.proxy_open_files);
        let (fixed_port, routed_port) = (options.port_base, options.port_base + 1);
        let to_hop = |hop: &str| hop.replace("vsock:any:", "vsock:1:");
        let mut forward_command = Command::new(&relay_binary);
        forward_command.args([
            "forward",
            "--listen",
            &format!("tcp:127.0.0.1:{fixed_port}"),
            "--to",
            &to_hop(&hops[0]),
            "--map",
            &format!("tcp:127.0.0.1:{routed_port}={}", to_hop(&hops[1])),
            "--metrics",
            &format!("unix:{}", forward_metrics.display()),
            "--backend",
            &options.backend,
        ]);
        crate::seccomp::limit_open_files(&mut forward_command, 16_384);
        if !options.vsock {
            for command in [&mut proxy_command, &mut forward_command] {
                command.env(vsock_relay_engine::socket::NO_VSOCK_ENV, "1");
            }
        }
        let proxy = Relay::spawn(proxy_command, &options.out.join("proxy.log"))?;
        let forward = Relay::spawn(forward_command, &options.out.join("forward.log"))?;
        wait_until("the relays' metrics", Duration::from_secs(20), || {
            proxy_metrics.exists() && forward_metrics.exists()
        })?;
        let fixed_addr: SocketAddr = ([127, 0, 0, 1], fixed_port).into();
        wait_until("the forwarder", Duration::from_secs(20), || TcpStream::connect(fixed_addr).is_ok())?;
        Ok(Relays { proxy, forward, proxy_metrics, forward_metrics })
    }

    /// Teardown: both relays' counters scraped and saved, the sampler
    /// stopped, then both relays stopped with SIGTERM.
    fn tear_down(self, sampler: Sampler, out: &Path) -> Result<Ended, String> {
        let forward_text = scrape(&self.forward_metrics)?;
        let proxy_text = scrape(&self.proxy_metrics)?;
        std::fs::write(out.join("forward-metrics.txt"), &forward_text).map_err(|e| e.to_string())?;
        std::fs::write(out.join("proxy-metrics.txt"), &proxy_text).map_err(|e| e.to_string())?;
        let rows = sampler.stop();
        let proxy_exit = self.proxy.stop();
        let forward_exit = self.forward.stop();
        Ok(Ended { forward_text, proxy_text, rows, proxy_exit, forward_exit })
    }
}

/// The chaos schedule for the run's phases, printed and saved to
/// schedule.txt.
fn announce_schedule(options: &Options, phases: &Phases) -> Result<Schedule, String> {
    let schedule = Schedule::new(
        options.seed,
        phases.length,
        phases.warm_up,
        phases.length - phases.traffic_end + Duration::from_secs(5),
        Duration::from_secs(if options.seconds <= 300 { 7 } else { 20 }),
    );
    let mut printed = format!(
        "seed {} length {} s warm-up {} s\n",
        options.seed,
        phases.length.as_secs(),
        phases.warm_up.as_secs()
    );
    for (at, fault) in &schedule.faults {
        let _ = writeln!(printed, "t={:7.1}s {fault}", at.as_secs_f64());
    }
    print!("{printed}");
    std::fs::write(options.out.join("schedule.txt"), &printed).map_err(|e| e.to_string())?;
    Ok(schedule)
}

/// The sampler: one CSV row a second of both relays' resources and the
/// clients' progress, appended to samples.csv as it comes (a long run can
/// be watched).
struct Sampler {
    sampling: Arc<AtomicBool>,
    thread: JoinHandle<Vec<String>>,
}

impl Sampler {
    fn start(
        out: &Path,
        relays: &Relays,
        upstream: &Arc<Mutex<Upstream>>,
        started: Instant,
        live: &Arc<Live>,
        faults_done: &Arc<AtomicU64>,
    ) -> Result<Sampler, String> {
        let sampling = Arc::new(AtomicBool::new(true));
        let mut samples_file = std::fs::File::create(out.join("samples.csv")).map_err(|e| e.to_string())?;
        let (live, faults_done, upstream) = (Arc::clone(live), Arc::clone(faults_done), Arc::clone(upstream));
        let (pids, lines) = (
            [relays.proxy.pid(), relays.forward.pid()],
            [Arc::clone(&relays.proxy.lines), Arc::clone(&relays.forward.lines)],
        );
        let running = Arc::clone(&sampling);
        let thread = std::thread::spawn(move || {
            let mut rows = vec![
                "t_s,proxy_rss_kib,proxy_fds,proxy_threads,forward_rss_kib,forward_fds,forward_threads,client_bytes,connections,failed,faults,log_lines,upstream_open"
                    .to_string(),
            ];
            let _ = writeln!(samples_file, "{}", rows[0]);
            let mut next = Instant::now();
            while running.load(Ordering::SeqCst) {
                let (p, f) = (sample(pids[0]), sample(pids[1]));
                let open = upstream.lock().map(|u| u.open_now()).unwrap_or(0);
                rows.push(format!(
                    "{:.1},{},{},{},{},{},{},{},{},{},{},{},{open}",
                    started.elapsed().as_secs_f64(),
                    p.0,
                    p.1,
                    p.2,
                    f.0,
                    f.1,
                    f.2,
                    live.bytes.load(Ordering::Relaxed),
                    live.finished.load(Ordering::Relaxed),
                    live.failed.load(Ordering::Relaxed),
                    faults_done.load(Ordering::Relaxed),
                    lines[0].load(Ordering::Relaxed) + lines[1].load(Ordering::Relaxed),
                ));
                let _ = writeln!(samples_file, "{}", rows[rows.len() - 1]);
                next += Duration::from_secs(1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            rows
        });
        Ok(Sampler { sampling, thread })
    }

    /// Its rows, the header first.
    fn stop(self) -> Vec<String> {
        self.sampling.store(false, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

/// Lanes of traffic: (kind, lanes, pause between connections in ms).
const LANES: [(Kind, usize, u64); 6] = [
    (Kind::Bulk, 1, 1000),
    (Kind::Rpc, 2, 300),
    (Kind::Churn, 2, 100),
    (Kind::Idle, 8, 100),
    (Kind::HalfClose, 1, 200),
    (Kind::SlowReader, 1, 500),
];

/// One thread per lane, each running seeded clients one after another until
/// `stop`; a third of the connections routed.
fn start_lanes(
    options: &Options,
    phases: &Phases,
    started: Instant,
    live: &Arc<Live>,
    stop: &Arc<AtomicBool>,
    ports: &Ports,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for (lane, (kind, pause_ms)) in
        LANES.iter().flat_map(|(k, n, p)| (0..*n).map(move |_| (*k, *p))).enumerate()
    {
        let (live, stop, ports) = (Arc::clone(live), Arc::clone(stop), ports.clone());
        let pause = Duration::from_millis((pause_ms as f64 / options.rate) as u64);
        let seed = options.seed.wrapping_mul(1000).wrapping_add(lane as u64);
        let traffic_end = phases.traffic_end;
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::SeqCst) {
                let routed = rng.between(0, 3) == 0;
                let mut plan = clients::plan(kind, live.next_id(), routed, &mut rng);
                // An idle holder ends by the traffic's end.
                let left = traffic_end.saturating_sub(started.elapsed());
                plan.hold = plan.hold.min(left);
                clients::run(&plan, &ports, &live);
                std::thread::sleep(pause);
            }
        }));
    }
    threads
}

/// What the chaos schedule acts on.
struct Chaos<'a> {
    options: &'a Options,
    rig: &'a Rig,
    /// The relay the reloads signal.
    proxy: &'a Relay,
    live: &'a Arc<Live>,
    started: Instant,
    /// Which of [`UPSTREAM_IPS`] the name answers with now.
    dns_at: usize,
}

impl Chaos<'_> {
    /// The schedule, on this thread: each fault at its time, said and
    /// logged to faults.log; the faults applied, by kind (netem's only
    /// where netem is).
    fn play(&mut self, schedule: &Schedule, faults_done: &AtomicU64) -> BTreeMap<&'static str, u64> {
        let mut faults_by_kind: BTreeMap<&'static str, u64> = Fault::KINDS.iter().map(|k| (*k, 0)).collect();
        let mut fault_log = String::new();
        for (at, fault) in &schedule.faults {
            std::thread::sleep(at.saturating_sub(self.started.elapsed()));
            let effect = self.apply(*fault);
            if !(fault.kind() == "netem" && self.rig.netem.is_none()) {
                *faults_by_kind.entry(fault.kind()).or_insert(0) += 1;
            }
            faults_done.fetch_add(1, Ordering::Relaxed);
            let line = format!("t={:7.1}s {fault}: {effect}", self.started.elapsed().as_secs_f64());
            say(&line);
            fault_log.push_str(&line);
            fault_log.push('\n');
        }
        let _ = std::fs::write(self.options.out.join("faults.log"), &fault_log);
        faults_by_kind
    }

    /// One fault, done (and undone where it lasts); what it did.
    fn apply(&mut self, fault: Fault) -> String {
        let rig = self.rig;
        match fault {
            Fault::UpstreamRestart { down } => {
                let reset = rig.upstream.lock().unwrap_or_else(|p| p.into_inner()).restart(down);
                format!("{reset} open connection(s) reset")
            }
            Fault::UpstreamResets { count, pick } => {
                let reset = rig.upstream.lock().unwrap_or_else(|p| p.into_inner()).reset_open(count, pick);
                format!("{reset} connection(s) reset")
            }
            Fault::DnsChange => {
                self.dns_at = 1 - self.dns_at;
                rig.names.set(NAME, Answer::Addresses(vec![IpAddr::V4(UPSTREAM_IPS[self.dns_at])]));
                format!("{NAME} -> {}", UPSTREAM_IPS[self.dns_at])
            }
            Fault::DnsFailure { lasting } => {
                rig.names.set(NAME, Answer::ServerFailure);
                std::thread::sleep(lasting);
                rig.names.set(NAME, Answer::Addresses(vec![IpAddr::V4(UPSTREAM_IPS[self.dns_at])]));
                "SERVFAIL, then answers again".into()
            }
            Fault::ReloadValid => {
                let _ = std::fs::write(&rig.allowlist, &rig.valid_allowlist);
                self.proxy.signal("HUP");
                "SIGHUP, valid allowlist".into()
            }
            Fault::ReloadBroken => {
                let _ = std::fs::write(&rig.allowlist, "allowlist: [ {address: \n");
                self.proxy.signal("HUP");
                std::thread::sleep(Duration::from_secs(1));
                let _ = std::fs::write(&rig.allowlist, &rig.valid_allowlist);
                "SIGHUP, broken allowlist (then the file restored)".into()
            }
            Fault::DescriptorBurst { clients: n } => self.burst(n),
            Fault::Netem { lasting, loss_pct, delay_ms, reorder_pct } => match &rig.netem {
                Some(netem) => {
                    let applied = netem.impair(loss_pct, delay_ms, reorder_pct);
                    std::thread::sleep(lasting);
                    let cleared = netem.clear();
                    match applied.and(cleared) {
                        Ok(()) => "applied, then cleared".into(),
                        Err(e) => format!("tc failed: {e}"),
                    }
                }
                None => "skipped (no netem here)".into(),
            },
        }
    }

    /// `n` clients at once, past the proxy's descriptor limit; back when
    /// all have ended.
    fn burst(&self, n: usize) -> String {
        let burst: Vec<_> = (0..n)
            .map(|i| {
                let (live, ports) = (Arc::clone(self.live), self.rig.ports.clone());
                let mut rng =
                    Rng::new(self.options.seed ^ (i as u64) ^ self.started.elapsed().as_nanos() as u64);
                std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                    let plan = clients::plan(Kind::Burst, live.next_id(), false, &mut rng);
                    clients::run(&plan, &ports, &live);
                })
            })
            .collect();
        for thread in burst.into_iter().flatten() {
            let _ = thread.join();
        }
        format!("{n} clients at once past the proxy's {} descriptors", self.options.proxy_open_files)
    }
}

/// Every connection accounted for against the relays' counters, and what
/// does not add up.
struct Findings {
    counts: RelayCounts,
    accounting: Accounting,
    anonymous_resets: u64,
    problems: Vec<String>,
}

impl Findings {
    /// The accounting, with failures.csv: every connection that did not end
    /// byte-exact, with both sides' view; a relay that did not exit 0 at
    /// SIGTERM is a problem too.
    fn of(out: &Path, ended: &Ended, live: &Live, upstream: &Upstream) -> Result<Findings, String> {
        let counts = RelayCounts::from_metrics(&ended.forward_text, &ended.proxy_text);
        let records = live.records.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut failures = String::from("id,kind,routed,client_end,upstream_saw\n");
        for record in records.iter().filter(|r| r.end != clients::End::Complete) {
            let end = format!("{:?}", record.end).replace(',', ";");
            let seen = format!("{:?}", upstream.seen(record.id)).replace(',', ";");
            let _ =
                writeln!(failures, "{},{},{},{end},{seen}", record.id, record.kind.label(), record.routed);
        }
        std::fs::write(out.join("failures.csv"), failures).map_err(|e| e.to_string())?;
        let accounting =
            Accounting::new(&records, |id| upstream.seen(id), &counts, upstream.anonymous_resets(), 1);
        let mut problems = accounting.problems();
        for (name, exit) in [("proxy", ended.proxy_exit), ("forwarder", ended.forward_exit)] {
            if exit != Some(0) {
                problems.push(format!("the {name} exited {exit:?} at SIGTERM (expected 0)"));
            }
        }
        Ok(Findings { counts, accounting, anonymous_resets: upstream.anonymous_resets(), problems })
    }
}

/// The relays' resources and log rate as judged.
struct Judged {
    resources: serde_json::Map<String, serde_json::Value>,
    /// Log lines per second, the most over any 10 s window.
    max_rate: f64,
}

/// Resources after warm-up, and the log rate, judged between warm-up and
/// the traffic's end (the drain after it only lowers the figures); what
/// exceeds its bound is added to `problems`.
fn judge_resources(rows: &[String], phases: &Phases, problems: &mut Vec<String>) -> Judged {
    let traffic_end = phases.traffic_end.as_secs_f64();
    let table: Vec<Vec<f64>> = rows
        .iter()
        .skip(1)
        .map(|r| r.split(',').map(|v| v.parse().unwrap_or(0.0)).collect::<Vec<f64>>())
        .filter(|r| r[0] <= traffic_end)
        .collect();
    let column = |i: usize| table.iter().map(|r| r[i]).collect::<Vec<f64>>();
    let times = column(0);
    let warm = phases.warm_up.as_secs_f64();
    let mut resources = serde_json::Map::new();
    for (name, i, bound) in [
        ("proxy_rss_kib", 1, RSS_GROWTH_KIB),
        ("proxy_fds", 2, FD_GROWTH),
        ("proxy_threads", 3, THREAD_GROWTH),
        ("forward_rss_kib", 4, RSS_GROWTH_KIB),
        ("forward_fds", 5, FD_GROWTH),
        ("forward_threads", 6, THREAD_GROWTH),
    ] {
        let values = column(i);
        let growth = floor_growth(&times, &values, warm);
        let max = values.iter().copied().fold(0.0, f64::max);
        let after: Vec<f64> =
            times.iter().zip(&values).filter(|(t, _)| **t >= warm).map(|(_, v)| *v).collect();
        let slope_per_min =
            account::slope(&times.iter().copied().filter(|t| *t >= warm).collect::<Vec<_>>(), &after) * 60.0;
        if growth > bound {
            problems.push(format!("{name}: its floor grew by {growth:.1} after warm-up (bound {bound})"));
        }
        resources.insert(
            name.into(),
            serde_json::json!({"max": max, "floor_growth": growth, "bound": bound, "slope_per_min": slope_per_min}),
        );
    }
    let lines = column(11);
    let max_rate = (10..lines.len())
        .map(|i| (lines[i] - lines[i - 10]) / (times[i] - times[i - 10]).max(1.0))
        .fold(0.0, f64::max);
    if max_rate > LOG_LINES_PER_S {
        problems.push(format!("log lines: {max_rate:.1}/s over a 10 s window (bound {LOG_LINES_PER_S})"));
    }
    Judged { resources, max_rate }
}

/// summary.json's content.
fn summarize(
    options: &Options,
    phases: &Phases,
    notes: &[String],
    findings: &Findings,
    faults: BTreeMap<&'static str, u64>,
    judged: &Judged,
) -> serde_json::Value {
    let (accounting, counts) = (&findings.accounting, &findings.counts);
    serde_json::json!({
        "seed": options.seed,
        "seconds": phases.length.as_secs(),
        "warm_up_s": phases.warm_up.as_secs(),
        "backend": options.backend,
        "transport": if options.vsock { "vsock" } else { "unix" },
        "notes": notes,
        "connections": accounting.by_kind.iter().map(|(k, t)| (k.to_string(), serde_json::json!({
            "connections": t.connections, "exact": t.exact, "failed": t.failed,
            "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
        }))).collect::<serde_json::Map<_, _>>(),
        "client_causes": accounting.causes,
        "anonymous_resets": findings.anonymous_resets,
        "relay": {
            "forward_accepted": counts.forward_accepted, "forward_refused": counts.forward_refused,
            "forward_failed": counts.forward_failed, "proxy_failed": counts.proxy_failed,
            "proxy_refused": counts.proxy_refused,
        },
        "matches": accounting.matches.iter().map(|m| serde_json::json!({"what": m.what, "clients": m.clients, "relays": m.relays})).collect::<Vec<_>>(),
        "corrupted": accounting.corrupted.len(),
        "unexplained": accounting.unexplained,
        "faults": faults,
        "resources": judged.resources,
        "log_lines_per_s_max_10s": judged.max_rate,
        "log_lines_bound": LOG_LINES_PER_S,
        "problems": findings.problems,
    })
}
