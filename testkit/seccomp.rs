//! Runs a child process the way Docker's default seccomp profile would:
//! `io_uring_setup` fails with EPERM, everything else is allowed. Used to
//! prove the automatic fallback to the portable backend. Also limits a
//! child's address space or open files, for the fault tests.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn statement(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k }
}

fn install() -> io::Result<()> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut program = [
        statement(load, ARCH_OFFSET),
        jump(AUDIT_ARCH, 1, 0),
        statement(ret, libc::SECCOMP_RET_ALLOW),
        statement(load, NR_OFFSET),
        jump(libc::SYS_io_uring_setup as u32, 0, 1),
        statement(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        statement(ret, libc::SECCOMP_RET_ALLOW),
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

/// Makes `command`'s process start under the io_uring-denying filter.
pub fn deny_io_uring(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec; it only calls prctl,
    // which is async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(install);
    }
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
