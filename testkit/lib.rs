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
/// built on first use with the profile of the running test, or taken from
/// `VSOCK_RELAY_BIN_DIR` when set (the vsock guest has no cargo).
///
/// The build names the running test target beside `--bins`: a build of the
/// binaries alone resolves dependency features without the
/// dev-dependencies (proptest asks for more of regex-syntax and rustix than
/// the binaries do), so it would compile those and everything above them a
/// second time. With a test target among its targets it resolves as the
/// `cargo test` that built this test did, and only our own binaries are
/// compiled. (`cargo test -p vsock-relay-testkit` resolves without the
/// other members' dev-dependencies: that one still compiles a few twice.)
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
        build.args(["build", "--quiet", "--bins"]);
        match test_target(&exe) {
            Some(test) => build.args(["--test", test]),
            None => build.arg("--tests"),
        };
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    dir.join(name)
}

/// The test target an executable of `target/<profile>/deps/` was built
/// from: its name without cargo's `-<hash>`.
fn test_target(exe: &std::path::Path) -> Option<&str> {
    let (target, hash) = exe.file_name()?.to_str()?.rsplit_once('-')?;
    (!target.is_empty() && hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(target)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::test_target;

    #[test]
    fn the_test_target_is_the_executable_name_without_the_hash() {
        let exe = Path::new("/x/target/debug/deps/integration-0123456789abcdef");
        assert_eq!(test_target(exe), Some("integration"));
        assert_eq!(test_target(Path::new("/x/deps/two-words-0123456789abcdef")), Some("two-words"));
        assert_eq!(test_target(Path::new("/x/target/debug/soak")), None);
        assert_eq!(test_target(Path::new("/x/deps/integration-nothex0123456789")), None);
    }
}
