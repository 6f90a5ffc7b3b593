//! `vsock-relay doctor`: the first-hour self-check on a parent instance or in
//! an enclave. One line per check, `ok`, `warn` or `fail`, and for each warn
//! or fail the one thing to do; exit 1 when something fails.
//!
//! It reads /sys, /proc and `/dev/vsock`, makes (and closes) one vsock
//! socket without binding or connecting it, asks the configured name
//! servers about the allowlist's names, and connects to nothing else unless
//! `--connect` asks it to try each forwarding's vsock target (the parent's
//! proxy port) or `--metrics` names a running relay's metrics endpoint.

mod checks;

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use vsock_relay_engine::{machine, Endpoint};

use crate::relay::forward::{parse_mapping, Mapping};

/// `vsock-relay doctor`'s options.
#[derive(Args, Clone, Debug)]
pub struct DoctorArgs {
    /// Which side this machine is: the parent instance (runs the proxy) or
    /// the enclave (runs the forwarder). Default: guessed, and the guess is
    /// printed with its reason (the nitro_enclaves driver or vhost_vsock
    /// loaded: parent; a local CID from 4: enclave; else parent).
    #[arg(long)]
    pub side: Option<Side>,

    /// Text lines, or one JSON object (`side`, `checks` with `area`,
    /// `check`, `status`, `detail` and `fix`, and the counts).
    #[arg(long, default_value = "text")]
    pub format: Format,

    /// Parent: the proxy's config file; its allowlist must parse and each
    /// name in it resolve (default: /etc/nitro_enclaves/vsock-proxy.yaml
    /// when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Parent: the proxy's services file (`services:`, may be the --config
    /// file): it must parse and each listen endpoint be free.
    #[arg(long, value_name = "FILE")]
    pub services: Option<PathBuf>,

    /// Ask this DNS server (IP:PORT, repeatable) instead of
    /// /etc/resolv.conf, as the proxy's own option.
    #[arg(long = "dns-server", value_name = "IP:PORT")]
    pub dns_servers: Vec<SocketAddr>,

    /// The --max-connections the relay will run with: the open-files limit
    /// must allow two descriptors per connection.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u64>,

    /// The --pipe-kib the relay will run with, against fs.pipe-max-size.
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    pub pipe_kib: u32,

    /// A running relay's metrics endpoint (its --metrics): when a listen
    /// endpoint is held by a vsock-relay, doctor asks it for /metrics.
    #[arg(long, value_name = "ENDPOINT")]
    pub metrics: Option<Endpoint>,

    /// Enclave: a forwarding as `vsock-relay forward --map` takes it,
    /// LISTEN=TO (repeatable): its listen endpoint must be free.
    #[arg(long = "map", value_name = "LISTEN=TO", value_parser = parse_mapping)]
    pub maps: Vec<Mapping>,

    /// Enclave: a name the hosts file must map to a forwarding's listen
    /// address (repeatable), as `forward --hosts` adds it.
    #[arg(long = "hosts", value_name = "NAME")]
    pub hosts: Vec<String>,

    /// The hosts file --hosts reads.
    #[arg(long, default_value = "/etc/hosts", value_name = "FILE")]
    pub hosts_file: PathBuf,

    /// Enclave: connect to each --map target (the parent's proxy port on
    /// CID 3) and close at once. Without it doctor opens no vsock connection.
    #[arg(long)]
    pub connect: bool,
}

/// The two sides of a Nitro Enclaves deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Side {
    /// The parent instance: vsock-proxy or `vsock-relay proxy`.
    Parent,
    /// The enclave: `vsock-relay forward` and the enclave's servers.
    Enclave,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Parent => "parent",
            Side::Enclave => "enclave",
        })
    }
}

/// How doctor prints its report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// `vsock`, `backend`, `limits`, `config`, `listen`, `forward`, `hosts`.
    pub area: &'static str,
    /// What was checked, e.g. `transports` or an endpoint.
    pub check: String,
    pub status: Status,
    pub detail: String,
    /// For a warn or a fail: the one thing to do.
    pub fix: Option<String>,
}

impl Check {
    fn ok(area: &'static str, check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check { area, check: check.into(), status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn warn(
        area: &'static str,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check { fix: Some(fix.into()), status: Status::Warn, ..Check::ok(area, check, detail) }
    }

    fn fail(
        area: &'static str,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check { status: Status::Fail, ..Check::warn(area, check, detail, fix) }
    }
}

/// Which side this machine is, and why doctor thinks so.
pub fn guess_side() -> (Side, String) {
    let cid = machine::local_cid().ok().flatten();
    if machine::module_loaded("nitro_enclaves") {
        (Side::Parent, "guessed: the nitro_enclaves driver is loaded".into())
    } else if machine::module_loaded("vhost_vsock") {
        (Side::Parent, "guessed: vhost_vsock is loaded (this machine runs VMs)".into())
    } else if let Some(cid) = cid.filter(|cid| *cid > 3) {
        (Side::Enclave, format!("guessed: the local CID is {cid} (enclaves get CIDs from 4)"))
    } else {
        (
            Side::Parent,
            "guessed: no nitro_enclaves driver, no vhost_vsock, no CID from 4; say --side enclave in an enclave"
                .into(),
        )
    }
}

impl DoctorArgs {
    /// Runs every check, prints the report on `out`; exit 1 when one failed.
    pub fn run(&self, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
        let (side, why) = match self.side {
            Some(side) => (side, "given".to_string()),
            None => guess_side(),
        };
        let checks = checks::all(self, side);
        let count = |status| checks.iter().filter(|c| c.status == status).count();
        let (ok, warn, fail) = (count(Status::Ok), count(Status::Warn), count(Status::Fail));
        match self.format {
            Format::Text => {
                writeln!(out, "vsock-relay doctor: {side} side ({why})")?;
                for c in &checks {
                    writeln!(out, "{:<5} {:<8} {}: {}", c.status, c.area, c.check, c.detail)?;
                    if let Some(fix) = &c.fix {
                        writeln!(out, "{:<15}fix: {fix}", "")?;
                    }
                }
                writeln!(out, "{ok} ok, {warn} warn, {fail} fail")?;
            }
            Format::Json => {
                let lines: Vec<serde_json::Value> = checks
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "area": c.area, "check": c.check, "status": c.status.to_string(),
                            "detail": c.detail, "fix": c.fix,
                        })
                    })
                    .collect();
                let report = serde_json::json!({
                    "side": side.to_string(), "side_reason": why, "checks": lines,
                    "ok": ok, "warn": warn, "fail": fail,
                });
                writeln!(out, "{report}")?;
            }
        }
        out.flush()?;
        Ok(if fail > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
    }
}
