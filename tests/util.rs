//! Helpers shared by the integration tests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vsock_relay_engine::{BackendChoice, DataPath, Endpoint, Relay, RelayConfig, Target};
use vsock_relay_testkit::seccomp::Denials;
use vsock_relay_testkit::servers::Stream;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("vsock-relay-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The backends every relaying test runs on.
pub const BACKENDS: [BackendChoice; 2] = [BackendChoice::Uring, BackendChoice::Portable];

/// Every backend with every data path (the ring path is io_uring's).
pub const VARIANTS: [(BackendChoice, DataPath); 5] = [
    (BackendChoice::Uring, DataPath::Splice),
    (BackendChoice::Uring, DataPath::Copy),
    (BackendChoice::Uring, DataPath::Ring),
    (BackendChoice::Portable, DataPath::Splice),
    (BackendChoice::Portable, DataPath::Copy),
];

/// The `--backend` value of a choice, for the binaries.
pub fn backend_arg(backend: BackendChoice) -> &'static str {
    backend.label()
}

/// Starts an in-process relay from `listen` to `to`.
pub fn relay(
    listen: &str,
    to: &Endpoint,
    (backend, path): (BackendChoice, DataPath),
    tune: impl FnOnce(&mut RelayConfig),
) -> Relay {
    let target = Target::fixed(to).unwrap();
    let mut config = RelayConfig::new(listen.parse().unwrap(), target);
    config.backend = backend;
    config.data_path = path;
    config.workers = 2;
    tune(&mut config);
    Relay::start(config).unwrap()
}

/// What every binary started on the host gets: AF_VSOCK refused (this
/// machine's vsock leads to infrastructure that is not ours), no stdin.
/// A command that [`vsock_refused_by_seccomp`] set up keeps its filter
/// instead of the engine's switch.
fn host_safe(command: &mut Command) -> &mut Command {
    let switch = vsock_relay_engine::socket::NO_VSOCK_ENV;
    if !command.get_envs().any(|(name, _)| name == switch) {
        command.env(switch, "1");
    }
    command.stdin(Stdio::null())
}

/// Makes `command` start under a seccomp filter that refuses every AF_VSOCK
/// socket with `errno` (no transport: EAFNOSUPPORT; a container: EPERM), so
/// that it meets the kernel's refusal instead of the engine's switch. The
/// filter is in place from before exec: the process can never open one.
pub fn vsock_refused_by_seccomp(command: &mut Command, errno: i32) {
    let denials = Denials { vsock_socket: Some(errno), ..Denials::default() };
    vsock_relay_testkit::seccomp::deny(command, denials);
    command.env_remove(vsock_relay_engine::socket::NO_VSOCK_ENV);
}

/// A child process killed when dropped; its stderr is collected.
pub struct Proc {
    pub child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    pub fn spawn(binary: &str, args: &[&str]) -> Proc {
        Proc::spawn_with(binary, args, |_| {})
    }

    /// Like [`Proc::spawn`], with a last say on the command.
    pub fn spawn_with(binary: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Proc {
        let mut command = Command::new(vsock_relay_testkit::binary(binary));
        configure(&mut command);
        command.args(args);
        Proc::launch(command)
    }

    /// Starts a binary in a network namespace of its own (`unshare -n`),
    /// whose loopback interface is down; `None` when namespaces cannot be
    /// made here (not root).
    pub fn spawn_in_new_netns(binary: &str, args: &[&str]) -> Option<Proc> {
        // As root, a network namespace alone; otherwise inside a user
        // namespace of our own too, where we hold CAP_NET_ADMIN over it.
        let flags = ["-n", "-rn"].into_iter().find(|flags| {
            Command::new("unshare").args([flags, "true"]).status().is_ok_and(|s| s.success())
        })?;
        let mut command = Command::new("unshare");
        command.arg(flags).arg(vsock_relay_testkit::binary(binary)).args(args);
        Some(Proc::launch(command))
    }

    fn launch(mut command: Command) -> Proc {
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = host_safe(&mut command).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc { child, stderr }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the process logged a line containing `needle`.
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("process exited ({status}) before logging `{needle}`:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "no `{needle}` within {within:?}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.unwrap().success(), "kill -{name} failed");
    }

    /// Waits for the process to exit (failing after `within`); its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50)); // let the stderr reader finish
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit within {within:?}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion with a time limit: (exit code, stderr).
pub fn run_to_exit(binary: &str, args: &[&str]) -> (i32, String) {
    run_to_exit_with(binary, args, |_| {})
}

/// Like [`run_to_exit`], with a last say on the command.
pub fn run_to_exit_with(binary: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> (i32, String) {
    let mut proc = Proc::spawn_with(binary, args, configure);
    let code = proc.wait_exit(Duration::from_secs(30));
    (code.unwrap_or(-1), proc.stderr())
}

/// Waits until something listens on a Unix socket path.
pub fn wait_for_unix(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {} after {within:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a finished process printed.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a binary to completion within `limit` (killed and failed after it),
/// capturing both output streams.
pub fn run_capturing(binary: &str, args: &[&str], limit: Duration) -> Output {
    run_capturing_with(binary, args, limit, |_| {})
}

/// Like [`run_capturing`], with a last say on the command.
pub fn run_capturing_with(
    binary: &str,
    args: &[&str],
    limit: Duration,
    configure: impl FnOnce(&mut Command),
) -> Output {
    let mut command = Command::new(vsock_relay_testkit::binary(binary));
    configure(command.args(args));
    let mut child = host_safe(&mut command).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary} {args:?} still running after {limit:?}:\n{}", stderr.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

impl Proc {
    /// The TCP port a relay logged it listens on (it was asked for port 0),
    /// from a text or a JSON log line.
    pub fn logged_tcp_port(&mut self) -> u16 {
        const MARKS: [&str; 2] = ["listen=tcp:127.0.0.1:", "\"listen\":\"tcp:127.0.0.1:"];
        self.wait_for_log("relay listening", Duration::from_secs(20));
        let log = self.stderr();
        let (at, mark) = MARKS
            .iter()
            .find_map(|mark| log.find(mark).map(|at| (at, mark)))
            .unwrap_or_else(|| panic!("no listening TCP port in:\n{log}"));
        let digits: String = log[at + mark.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Starts `vsock-relay relay` on a free loopback port towards `to`, with
/// `extra` options; returns it and its endpoint.
pub fn relay_process(backend: &str, to: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["relay", "--backend", backend, "--listen", "tcp:127.0.0.1:0", "--to", to];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn("vsock-relay", &args);
    let listen = format!("tcp:127.0.0.1:{}", proc.logged_tcp_port());
    (proc, listen)
}

/// One echo exchange (through an echo server): `Ok(true)` when "ping" came back, `Ok(false)` on a
/// clean end of stream before it, `Err` on a reset or refusal.
pub fn ping(endpoint: &str) -> io::Result<bool> {
    let mut stream = Stream::connect(&endpoint.parse().unwrap())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    ping_on(&mut stream)
}

pub fn ping_on(stream: &mut Stream) -> io::Result<bool> {
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    match stream.read_exact(&mut reply) {
        Ok(()) => Ok(&reply == b"ping"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A process that is not a relay (python3) listening on a free TCP port of
/// 127.0.0.1 for a minute: (the process, its port).
pub fn foreign_listener() -> (Child, u16) {
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n\
             print(s.getsockname()[1], flush=True)\ntime.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut port).unwrap();
    (holder, port.trim().parse().expect("python3 printed its port"))
}
