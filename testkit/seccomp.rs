//! Runs a child process under a seccomp filter that refuses chosen system
//! calls with a chosen errno, everything else allowed: `io_uring_setup` as
//! Docker's default profile refuses it (the automatic fallback to the
//! portable backend), and `socket(AF_VSOCK, ...)` as a machine without a vsock
//! transport (`EAFNOSUPPORT`) or a container (`EPERM`) refuses it: the way a
//! tool that could open AF_VSOCK is run on this machine, where it must not.
//! Also limits a child's address space or open files, for the fault tests.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets in `struct seccomp_data`: the call's number, the architecture,
/// and the low 32 bits of the first argument (little-endian on both arches).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_OFFSET: u32 = 16;

/// What the filter refuses, each with the errno the call fails with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Denials {
    /// `io_uring_setup(2)`: no io_uring, as under Docker's default profile.
    pub io_uring_setup: Option<i32>,
    /// `socket(2)` and `socketpair(2)` with domain `AF_VSOCK`.
    pub vsock_socket: Option<i32>,
}

fn statement(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k }
}

fn install(denials: Denials) -> io::Result<()> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let refuse = |errno: i32| statement(ret, libc::SECCOMP_RET_ERRNO | errno as u32);
    let allow = statement(ret, libc::SECCOMP_RET_ALLOW);
    // A fixed-size program: a denial not asked for refuses with errno 0,
    // which is never reached (its call number is matched against -1).
    const NEVER: u32 = u32::MAX;
    let (uring_nr, uring_errno) = match denials.io_uring_setup {
        Some(errno) => (libc::SYS_io_uring_setup as u32, errno),
        None => (NEVER, 0),
    };
    let (socket_nr, socketpair_nr, vsock_errno) = match denials.vsock_socket {
        Some(errno) => (libc::SYS_socket as u32, libc::SYS_socketpair as u32, errno),
        None => (NEVER, NEVER, 0),
    };
    let mut program = [
        statement(load, ARCH_OFFSET),
        jump(AUDIT_ARCH, 1, 0),
        allow,
        statement(load, NR_OFFSET),
        jump(uring_nr, 0, 1),
        refuse(uring_errno),
        // socket or socketpair: look at the domain; anything else: allow.
        jump(socket_nr, 1, 0),
        jump(socketpair_nr, 0, 3),
        statement(load, ARG0_OFFSET),
        jump(libc::AF_VSOCK as u32, 0, 1),
        refuse(vsock_errno),
        allow,
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: prctl with these options reads only `fprog` and the program it
    // points to, both alive for the call.
    let failed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog as *const libc::sock_fprog)
                != 0
    };
    if failed {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `command`'s process start under the io_uring-denying filter
/// (`EPERM`, as Docker's default profile).
pub fn deny_io_uring(command: &mut Command) {
    deny(command, Denials { io_uring_setup: Some(libc::EPERM), ..Denials::default() });
}

/// Makes `command`'s process start under a filter refusing `denials`.
pub fn deny(command: &mut Command, denials: Denials) {
    // SAFETY: the closure runs between fork and exec; it only calls prctl,
    // which is async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || install(denials));
    }
}

/// Installs the filter on the calling process itself (inherited by every
/// child and kept across exec): for a wrapper that then execs a tool.
pub fn deny_self(denials: Denials) -> io::Result<()> {
    install(denials)
}

/// Makes `command`'s process start with at most `bytes` of address space
/// (`RLIMIT_AS`): a test's bound on the memory a refusal may take.
pub fn limit_address_space(command: &mut Command, bytes: u64) {
    limit(command, libc::RLIMIT_AS, bytes);
}

/// Makes `command`'s process start with at most `count` open files, soft
/// and hard (so that it cannot raise its own limit).
pub fn limit_open_files(command: &mut Command, count: u64) {
    limit(command, libc::RLIMIT_NOFILE, count);
}

#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

fn limit(command: &mut Command, resource: Resource, value: u64) {
    // SAFETY: the closure runs between fork and exec; it only calls
    // setrlimit, which is async-signal-safe, with a local it points to.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
            match libc::setrlimit(resource, &limit) {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
    }
}
