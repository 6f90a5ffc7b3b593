//! The guard around AF_VSOCK in tests: vsock on a development or CI machine
//! leads to infrastructure that is not ours, so tests open vsock sockets only
//! inside the QEMU guest of tests/vm, whose kernel command line carries
//! [`GUEST_FLAG`].

/// Set on the guest's kernel command line by tests/vm/run.sh.
pub const GUEST_FLAG: &str = "vsock_relay_guest=1";

/// Whether this process runs inside the tests/vm guest.
pub fn in_vsock_guest() -> bool {
    on_kernel_command_line(GUEST_FLAG)
}

/// Whether `word` (`name=value`) is one of the kernel command line's words:
/// how tests/vm tells a guest its role and settings.
pub fn on_kernel_command_line(word: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|line| line.split_whitespace().any(|w| w == word))
}

/// Panics unless inside the guest: a vsock test asked to run elsewhere
/// refuses instead of opening AF_VSOCK.
pub fn require_vsock_guest() {
    assert!(
        in_vsock_guest(),
        "refusing to open AF_VSOCK: not inside the tests/vm guest (no `{GUEST_FLAG}` in /proc/cmdline); \
         run the vsock suite with tests/vm/run.sh"
    );
}
