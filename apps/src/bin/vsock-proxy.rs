//! `vsock-proxy`: a drop-in for AWS's Nitro Enclaves vsock proxy. Same
//! command line, same YAML allowlist; see the README for what it fixes.
//! The command line and its start are in `relay::dropin`.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use vsock_relay_apps::about;
use vsock_relay_apps::relay::dropin::Cli;

fn main() -> ExitCode {
    about::parse::<Cli>().run()
}
