//! Stamps what `--version` reports and cannot learn at run time: the git
//! commit the binaries were built from and the target triple. Outside a
//! git checkout (a source tarball) the commit is `unknown`, unless the
//! builder sets `VSOCK_RELAY_COMMIT`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=VSOCK_RELAY_COMMIT");
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=VSOCK_RELAY_TARGET={target}");
    let commit = std::env::var("VSOCK_RELAY_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=VSOCK_RELAY_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}

/// The checked-out commit (12 hex digits), and a rerun whenever HEAD moves:
/// a commit, checkout or reset writes the worktree's `logs/HEAD`.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    for file in ["HEAD", "logs/HEAD"] {
        // Only files that exist: cargo reruns for a missing one every build.
        let path = git(&["rev-parse", "--path-format=absolute", "--git-path", file]);
        if let Some(path) = path.filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty())
}
