//! The YAML allowlist of AWS's `vsock-proxy`, read the same way:
//!
//! ```yaml
//! allowlist:
//! - {address: kms.us-east-1.amazonaws.com, port: 443}
//! ```
//!
//! A target is allowed when an entry has its port and either its host name
//! or an address equal to one of the target's addresses. Unlike AWS's proxy,
//! an entry written as an IP address matches a target given by name and the
//! other way round.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::Host;

/// One allowed service.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub address: String,
    pub port: u16,
}

/// Why the allowlist refused to start the proxy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowlistError {
    #[error("cannot read the config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("bad YAML in {path}: {reason}")]
    BadYaml { path: PathBuf, reason: String },
    #[error(
        "{path} has no `allowlist` field (expected `allowlist:` followed by a list of {{address, port}})"
    )]
    NoAllowlist { path: PathBuf },
    #[error("bad allowlist entry in {path}: {reason}")]
    BadEntry { path: PathBuf, reason: String },
    #[error("the given address and port are not allowed: {host}:{port} matches no entry of {path}")]
    NotAllowed { host: String, port: u16, path: PathBuf },
}

/// Reads the allowlist from a config file.
pub fn load(path: &Path) -> Result<Vec<Entry>, AllowlistError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AllowlistError::Read { path: path.into(), reason: e.to_string() })?;
    parse(&text, path)
}

/// Parses allowlist YAML; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Entry>, AllowlistError> {
    let doc: serde_norway::Value = serde_norway::from_str(text)
        .map_err(|e| AllowlistError::BadYaml { path: path.into(), reason: e.to_string() })?;
    let list = doc.get("allowlist").ok_or_else(|| AllowlistError::NoAllowlist { path: path.into() })?;
    serde_norway::from_value(list.clone())
        .map_err(|e| AllowlistError::BadEntry { path: path.into(), reason: e.to_string() })
}

/// Checks `host:port` against `entries`, resolving names with `resolver`.
/// `target_addresses` are the target's own resolved addresses.
pub fn check(
    entries: &[Entry],
    host: &Host,
    port: u16,
    target_addresses: &[IpAddr],
    resolver: &Resolver,
    path: &Path,
) -> Result<(), AllowlistError> {
    let host_text = match host {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(name) => name.clone(),
    };
    for entry in entries.iter().filter(|e| e.port == port) {
        let wanted = entry.address.trim_start_matches('[').trim_end_matches(']');
        if wanted.eq_ignore_ascii_case(host_text.trim_end_matches('.')) {
            tracing::info!(address = %entry.address, port, "allowed: host name matches");
            return Ok(());
        }
        match resolver.resolve(wanted) {
            Ok(resolution) if resolution.addresses.iter().any(|a| target_addresses.contains(a)) => {
                tracing::info!(address = %entry.address, port, "allowed: address matches");
                return Ok(());
            }
            Ok(_) => {}
            Err(reason) => {
                tracing::warn!(address = %entry.address, %reason, "cannot resolve an allowlist entry")
            }
        }
    }
    Err(AllowlistError::NotAllowed { host: host_text, port, path: path.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("test.yaml")
    }

    #[test]
    fn parses_the_aws_format() {
        let entries = parse("allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n- {address: 10.0.0.1, port: 80}\n", p()).unwrap();
        assert_eq!(entries[0], Entry { address: "kms.us-east-1.amazonaws.com".into(), port: 443 });
        assert_eq!(entries[1].port, 80);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(matches!(parse("allowlist: [", p()), Err(AllowlistError::BadYaml { .. })));
        assert_eq!(
            parse("services: []", p()).unwrap_err().to_string(),
            "test.yaml has no `allowlist` field (expected `allowlist:` followed by a list of {address, port})"
        );
        let err = parse("allowlist:\n- {address: a.example}\n", p()).unwrap_err().to_string();
        assert!(err.contains("missing field `port`"), "{err}");
        let err = parse("allowlist:\n- {address: a.example, port: 70000}\n", p()).unwrap_err().to_string();
        assert!(err.starts_with("bad allowlist entry in test.yaml"), "{err}");
    }
}
