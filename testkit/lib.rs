//! What the integration tests and the benches share: reproducible traffic
//! with its SHA-256, servers that check what they receive, the relay
//! binaries, and the AWS-design baseline relay the benches compare against.
//!
//! Everything here speaks TCP and Unix sockets only: no AF_VSOCK on the host.

pub mod baseline;
pub mod seccomp;
pub mod servers;
pub mod traffic;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of one of the workspace's binaries (`vsock-relay`, `vsock-proxy`),
/// built on first use with the profile of the running test or bench.
pub fn binary(name: &str) -> PathBuf {
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
