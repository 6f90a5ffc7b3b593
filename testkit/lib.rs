//! What the integration tests and the benches share: reproducible traffic
//! with its SHA-256, servers that check what they receive, the relay
//! binaries, the AWS-design baseline relay the benches compare against, a
//! name server the tests control, and network namespaces of their own.
//!
//! Everything here speaks TCP and Unix sockets, and AF_VSOCK only inside the
//! QEMU guest of tests/vm (see [`guest`]).

pub mod baseline;
pub mod exact;
pub mod guest;
pub mod names;
pub mod netns;
pub mod seccomp;
pub mod servers;
pub mod soak;
pub mod traffic;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of one of the workspace's binaries (`vsock-relay`, `vsock-proxy`),
/// built on first use with the profile of the running test or bench, or
/// taken from `VSOCK_RELAY_BIN_DIR` when set (the vsock guest has no cargo).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("VSOCK_RELAY_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test>-<hash>
        let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "vsock-relay-apps", "--bins"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    dir.join(name)
}
