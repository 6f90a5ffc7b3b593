//! `no-vsock [--errno N] COMMAND [ARGS...]`: runs COMMAND under a seccomp
//! filter that refuses every AF_VSOCK socket (errno N, default EPERM) and
//! io_uring (whose socket operation would go around a filter on `socket(2)`).
//! The way a tool that could open AF_VSOCK (vhost-device-vsock) is run on a
//! machine where it must not; the filter is kept by every child.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use vsock_relay_testkit::seccomp::{deny_self, Denials};

const USAGE: &str = "usage: no-vsock [--errno N] COMMAND [ARGS...]";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut errno = libc::EPERM;
    if args.first().map(String::as_str) == Some("--errno") {
        match args.get(1).and_then(|n| n.parse::<i32>().ok()).filter(|n| (1..4096).contains(n)) {
            Some(n) => errno = n,
            None => {
                eprintln!("no-vsock: --errno takes a number from 1 to 4095\n{USAGE}");
                return ExitCode::from(2);
            }
        }
        args.drain(..2);
    }
    let Some((program, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let denials = Denials { io_uring_setup: Some(libc::EPERM), vsock_socket: Some(errno) };
    if let Err(e) = deny_self(denials) {
        eprintln!("no-vsock: cannot install the seccomp filter: {e}");
        return ExitCode::from(1);
    }
    eprintln!(
        "no-vsock: running {program} with AF_VSOCK sockets refused ({}) and io_uring refused",
        std::io::Error::from_raw_os_error(errno)
    );
    let e = Command::new(program).args(rest).exec();
    eprintln!("no-vsock: cannot run {program}: {e}");
    ExitCode::from(127)
}
