//! `vsock-relay proxy --services FILE`: many proxied services in one
//! process, one set of workers for all. The file is YAML; its `services:`
//! list may sit in AWS's `vsock-proxy.yaml` beside `allowlist:` (AWS's
//! proxy ignores the extra field), or in a file of its own:
//!
//! ```yaml
//! services:
//! - listen: vsock:any:8000
//!   address: kms.us-east-1.amazonaws.com
//!   port: 443
//! - name: s3                    # in logs and metrics (default: the listen endpoint)
//!   listen: vsock:any:8001
//!   address: s3.us-east-1.amazonaws.com
//!   port: 443
//!   allow_cid: [16]             # optional, as --allow-cid
//!   max_connections: 500        # optional, as --max-connections
//!   idle_timeout: 300           # optional, seconds, as --idle-timeout
//!   proxy_protocol: v2          # optional, as --proxy-protocol
//! - name: egress                # one port for every allowed host
//!   listen: vsock:any:3128
//!   route: connect              # or socks5, or sni (with sni_port: 443)
//!   head_timeout: 10            # optional, seconds, as --head-timeout
//! - name: enclave-dns           # the enclave's DNS (vsock-relay dns), answered
//!   listen: vsock:any:8053      # for the names the allowlist allows
//!   route: dns
//! - name: transparent           # the enclave's redirected connections
//!   listen: vsock:any:8100      # (vsock-relay forward --transparent)
//!   route: transparent
//! ```
//!
//! Every fixed service is checked against the allowlist (`--config`) at
//! start; one that is not allowed stops the start, named. A routed service
//! checks each client's destination.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_norway::Value;
use vsock_relay_engine::{ClientRules, Endpoint, Host, RouteKind};

use crate::relay::allowlist::{read_config, AllowlistError};
use crate::relay::options::{parse_idle_seconds, parse_remote_host, parse_seconds};

/// One proxied service: where to listen, which allowlisted TCP service to
/// reach (or how its clients name theirs), and rules for its clients (a
/// rule not given: the command line's).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    pub name: Option<String>,
    pub listen: Endpoint,
    pub upstream: SpecUpstream,
    pub rules: ClientRules,
}

/// A services file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The file could not be read as YAML (read as the allowlist is).
    #[error(transparent)]
    File(#[from] AllowlistError),
    /// The YAML reads, but its `services:` list is wrong.
    #[error("bad services list in {path}: {reason}")]
    BadService { path: PathBuf, reason: String },
}

/// Where a service's clients go.
#[derive(Clone, Debug, PartialEq)]
pub enum SpecUpstream {
    /// One allowlisted TCP service.
    Fixed { host: Host, port: u16 },
    /// Where each client asks to go, if the allowlist allows it; a head
    /// timeout in seconds (`None`: the command line's).
    Routed { route: RouteKind, head_timeout: Option<f64> },
    /// Not relayed: the DNS service (`route: dns`) answers its clients'
    /// queries for the names the allowlist allows.
    Dns,
}

/// A `services:` item as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    name: Option<String>,
    #[serde(deserialize_with = "endpoint")]
    listen: Endpoint,
    address: Option<String>,
    port: Option<u16>,
    route: Option<String>,
    sni_port: Option<u16>,
    head_timeout: Option<f64>,
    allow_cid: Option<Vec<u32>>,
    max_connections: Option<u64>,
    idle_timeout: Option<f64>,
    proxy_protocol: Option<String>,
}

impl Written {
    /// The item's client rules, checked as their flags are; `at` names the
    /// service in an error.
    fn rules(&self, at: impl Fn(String) -> ServicesError) -> Result<ClientRules, ServicesError> {
        let idle_timeout = self
            .idle_timeout
            .map(|seconds| {
                parse_idle_seconds(&seconds.to_string()).map_err(|e| at(format!("idle_timeout: {e}")))
            })
            .transpose()?;
        if self.max_connections == Some(0) {
            return Err(at("max_connections must be at least 1".into()));
        }
        let proxy_protocol = self
            .proxy_protocol
            .as_deref()
            .map(|text| text.parse().map_err(|e| at(format!("proxy_protocol: {e}"))))
            .transpose()?;
        Ok(ClientRules {
            allow_cids: self.allow_cid.clone(),
            max_connections: self.max_connections,
            idle_timeout: idle_timeout.map(Duration::from_secs_f64),
            proxy_protocol,
        })
    }
}

fn endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Endpoint, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|e| serde::de::Error::custom(format!("listen `{text}`: {e}")))
}

/// Reads the `services:` list of a YAML file (read as the allowlist is:
/// bounded in size and nesting).
pub fn load(path: &Path) -> Result<Vec<ServiceSpec>, ServicesError> {
    parse(&read_config(path)?, path)
}

/// Parses a `services:` list; `path` only names the file in messages.
pub fn parse(text: &str, path: &Path) -> Result<Vec<ServiceSpec>, ServicesError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let bad = |reason: String| ServicesError::BadService { path: path.into(), reason };
    let doc: Value = serde_norway::from_str(text)
        .map_err(|e| AllowlistError::BadYaml { path: path.into(), reason: e.to_string() })?;
    let Some(list) = doc.get("services") else {
        return Err(bad(
            "no `services` field (expected `services:` followed by a list of {listen, address, port})".into(),
        ));
    };
    let Some(items) = list.as_sequence().filter(|items| !items.is_empty()) else {
        return Err(bad("`services` must be a non-empty list of {listen, address, port}".into()));
    };
    let mut services = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let at = |reason: String| bad(format!("service {}: {reason}", index + 1));
        let written: Written = serde_norway::from_value(item.clone()).map_err(|e| at(e.to_string()))?;
        let rules = written.rules(at)?;
        let upstream = match (written.route.as_deref(), written.address, written.port) {
            (Some("dns"), None, None)
                if written.max_connections.is_some()
                    || written.idle_timeout.is_some()
                    || written.proxy_protocol.is_some() =>
            {
                return Err(at("route: dns takes allow_cid only of the client rules".into()))
            }
            (Some("dns"), None, None) if written.sni_port.is_none() && written.head_timeout.is_none() => {
                SpecUpstream::Dns
            }
            (Some("dns"), None, None) => {
                return Err(at("sni_port and head_timeout do not go with route: dns".into()))
            }
            (Some(route), None, None) => {
                let mut route: RouteKind = route.parse().map_err(|e| at(format!("{e}")))?;
                match (&mut route, written.sni_port) {
                    (RouteKind::Sni { port }, Some(sni_port)) if sni_port > 0 => *port = sni_port,
                    (_, None) => {}
                    (RouteKind::Sni { .. }, Some(_)) => return Err(at("sni_port must be 1 to 65535".into())),
                    (_, Some(_)) => return Err(at("sni_port goes with route: sni only".into())),
                }
                let head_timeout = written
                    .head_timeout
                    .map(|s| parse_seconds(&s.to_string()).map_err(|e| at(format!("head_timeout: {e}"))))
                    .transpose()?;
                SpecUpstream::Routed { route, head_timeout }
            }
            (None, Some(address), Some(port))
                if written.sni_port.is_none() && written.head_timeout.is_none() =>
            {
                SpecUpstream::Fixed { host: parse_remote_host(&address).map_err(at)?, port }
            }
            (None, Some(_), Some(_)) => {
                return Err(at("sni_port and head_timeout go with a route, not with address and port".into()))
            }
            (Some(_), _, _) => return Err(at("give either route, or address and port, not both".into())),
            (None, _, _) => return Err(at("give address and port (a fixed target), or route".into())),
        };
        services.push(ServiceSpec { name: written.name, listen: written.listen, upstream, rules });
    }
    let mut listens: Vec<String> = services.iter().map(|s| s.listen.to_string()).collect();
    listens.sort();
    if let Some(twice) = listens.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(bad(format!("two services listen on {}", twice[0])));
    }
    Ok(services)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsock_relay_engine::ProxyProtocol;

    fn p() -> &'static Path {
        Path::new("services.yaml")
    }

    #[test]
    fn reads_services_with_and_without_options() {
        let text = "allowlist:\n- {address: a.example, port: 443}\nservices:\n\
            - listen: vsock:any:8000\n  address: a.example\n  port: 443\n\
            - {name: b, listen: 'tcp:127.0.0.1:9000', address: 10.0.0.1, port: 80, allow_cid: [3, 4], max_connections: 5, idle_timeout: 2.5}\n";
        let services = parse(text, p()).unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!(services[0].listen.to_string(), "vsock:any:8000");
        let fixed = SpecUpstream::Fixed { host: Host::Name("a.example".into()), port: 443 };
        assert_eq!((&services[0].upstream, services[0].name.as_deref()), (&fixed, None));
        assert_eq!(services[1].name.as_deref(), Some("b"));
        assert_eq!(services[1].rules.allow_cids, Some(vec![3, 4]));
        assert_eq!(
            (services[1].rules.max_connections, services[1].rules.idle_timeout),
            (Some(5), Some(Duration::from_secs_f64(2.5)))
        );
    }

    #[test]
    fn reads_routed_services() {
        let text = "services:\n- {listen: 'vsock:any:3128', route: connect}\n\
            - {listen: 'vsock:any:1080', route: socks5, head_timeout: 3, proxy_protocol: v2}\n\
            - {listen: 'vsock:any:8443', route: sni, sni_port: 8443}\n";
        let services = parse(text, p()).unwrap();
        let routed = |route, head_timeout| SpecUpstream::Routed { route, head_timeout };
        assert_eq!(services[0].upstream, routed(RouteKind::Connect, None));
        assert_eq!(services[1].upstream, routed(RouteKind::Socks5, Some(3.0)));
        assert_eq!(services[1].rules.proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(services[2].upstream, routed(RouteKind::Sni { port: 8443 }, None));
        let error = |text: &str| parse(text, p()).unwrap_err().to_string();
        let e = error("services:\n- {listen: 'vsock:any:1', route: connect, address: a, port: 1}\n");
        assert!(e.contains("either route, or address and port"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', route: telnet}\n");
        assert!(e.contains("unknown route `telnet`"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', route: connect, sni_port: 1}\n");
        assert!(e.contains("sni_port goes with route: sni"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', address: a}\n");
        assert!(e.contains("give address and port"), "{e}");
    }

    #[test]
    fn errors_name_the_service_and_the_problem() {
        let error = |text: &str| parse(text, p()).unwrap_err().to_string();
        assert!(error("allowlist: []\n").contains("no `services` field"), "{}", error("allowlist: []\n"));
        assert!(error("services: []\n").contains("non-empty list"));
        let e = error("services: []\n");
        assert!(e.starts_with("bad services list in services.yaml: "), "not an allowlist error: {e}");
        let e = error("services:\n- {listen: 'vsock:any:1', address: a, port: 1, proxy_protocol: v3}\n");
        assert!(
            e.contains("proxy_protocol: unknown PROXY protocol version `v3`; expected none or v2"),
            "{e}"
        );
        let e = error("services:\n- {listen: 'vsock:any:1', address: a, port: 1, colour: red}\n");
        assert!(e.contains("service 1") && e.contains("unknown field `colour`"), "{e}");
        let e = error("services:\n- {listen: 'nowhere:1', address: a, port: 1}\n");
        assert!(e.contains("service 1") && e.contains("listen `nowhere:1`"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', address: '3', port: 1}\n");
        assert!(e.contains("bare number"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', address: a, port: 1}\n- {listen: 'vsock:any:1', address: b, port: 2}\n");
        assert!(e.contains("two services listen on vsock:any:1"), "{e}");
        let e = error("services:\n- {listen: 'vsock:any:1', address: a, port: 1, idle_timeout: -1}\n");
        assert!(e.contains("idle_timeout"), "{e}");
    }

    /// The configuration the packages install (dist/systemd/default.yaml)
    /// is a valid services file and allowlist as shipped, and so are its
    /// commented examples once uncommented.
    #[test]
    fn the_packaged_default_configuration_reads() {
        let shipped = include_str!("../../../dist/systemd/default.yaml");
        let services = parse(shipped, p()).unwrap();
        assert_eq!(services.len(), 1);
        assert_eq!(
            (services[0].name.as_deref(), services[0].listen.to_string()),
            (Some("kms"), "vsock:any:8000".into())
        );
        let fixed = SpecUpstream::Fixed { host: Host::Name("kms.us-east-1.amazonaws.com".into()), port: 443 };
        assert_eq!(services[0].upstream, fixed);
        crate::relay::allowlist::Allowlist::parse(shipped, p()).unwrap();
        // An example is a `# - ` line and the `#   ` lines right after it.
        let mut in_example = false;
        let mut examples = String::new();
        for line in shipped.lines() {
            in_example = line.starts_with("# - ") || (in_example && line.starts_with("#   "));
            examples.push_str(if in_example { &line[2..] } else { line });
            examples.push('\n');
        }
        let services = parse(&examples, p()).unwrap();
        let names: Vec<_> = services.iter().map(|s| s.name.as_deref().unwrap_or("")).collect();
        assert_eq!(names, ["kms", "s3", "egress"]);
        assert_eq!(services[1].rules.allow_cids, Some(vec![16]));
        assert_eq!(
            services[2].upstream,
            SpecUpstream::Routed { route: RouteKind::Connect, head_timeout: None }
        );
        crate::relay::allowlist::Allowlist::parse(&examples, p()).unwrap();
    }

    #[test]
    fn a_dns_service_takes_allow_cid_and_no_other_rule() {
        let text = "services:\n- {listen: 'vsock:any:8053', route: dns, allow_cid: [16]}\n\
            - {listen: 'vsock:any:8001', route: transparent}\n";
        let services = parse(text, p()).unwrap();
        assert_eq!(services[0].upstream, SpecUpstream::Dns);
        assert_eq!(services[0].rules.allow_cids, Some(vec![16]));
        assert_eq!(
            services[1].upstream,
            SpecUpstream::Routed { route: RouteKind::Transparent, head_timeout: None }
        );
        for extra in ["max_connections: 5", "idle_timeout: 3", "proxy_protocol: v2", "sni_port: 443"] {
            let text = format!("services:\n- {{listen: 'vsock:any:8053', route: dns, {extra}}}\n");
            let error = parse(&text, p()).unwrap_err().to_string();
            assert!(error.contains("route: dns"), "{extra}: {error}");
        }
    }
}
