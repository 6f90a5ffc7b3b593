//! Integration tests: the engine and the built binaries, over loopback TCP
//! and Unix sockets only. AF_VSOCK is never opened on the host; the real
//! vsock suite runs in the QEMU guest of tests/vm.

mod backend;
mod bench;
mod burst;
mod channel;
mod cli;
mod dns;
mod dns_forward;
mod doctor;
mod faults;
mod forward;
mod hints;
mod limits;
mod ops;
mod relay;
mod route;
mod scale;
mod soak;
mod transparent;
mod util;
