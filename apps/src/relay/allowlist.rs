//! The YAML allowlist of AWS's `vsock-proxy`, read the same way:
//!
//! ```yaml
//! allowlist:
//! - {address: kms.us-east-1.amazonaws.com, port: 443}
//! ```
//!
//! The rule, applied to the address the proxy connects to, at start, again
//! whenever DNS moves REMOTE_ADDR, and at each reload: connecting to
//! address A for REMOTE_ADDR:PORT is allowed when an entry has PORT and
//! - names REMOTE_ADDR itself (case and a trailing dot aside), or matches
//!   it as a wildcard: `*.example.com` (exactly one label before
//!   `example.com`) or `**.example.com` (one or more); then the name is
//!   trusted, whatever it resolves to, as AWS's proxy does for exact names;
//! - is an IP address equal to A (an IPv4-mapped IPv6 address equals its
//!   IPv4 form), or a CIDR range holding A (`10.0.0.0/8`, `2001:db8::/32`);
//! - is a host name that resolves to A now.
//!
//! Exact names and addresses are what AWS's proxy accepts; wildcards and
//! ranges are this proxy's (as enclaver has them).
//!
//! Routed services (`--route`: each client names its destination) are safe
//! by default: a destination at a loopback, link-local (169.254.0.0/16 with
//! the instance metadata service, fe80::/10, fd00:ec2::254) or unspecified
//! address is refused unless an address or CIDR entry within that block
//! names it, even when a name or wildcard entry matches the name (a name
//! that resolves to the metadata service is refused). An IPv6 address that
//! carries an IPv4 one (IPv4-mapped `::ffff:0:0/96`, IPv4-compatible
//! `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by that IPv4
//! address too: `[::127.0.0.1]` and `[64:ff9b::a9fe:a9fe]` are loopback and
//! the metadata service, whatever range entry holds them as IPv6.
//!
//! Reading is bounded (size, nesting) and as lenient as AWS's proxy: unknown
//! fields and documents after the first are accepted with a warning.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde_norway::Value;
use vsock_relay_engine::dns::Resolver;
use vsock_relay_engine::Host;

/// Largest config file read (AWS's is a few lines; this bounds memory).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Deepest `[`/`{` nesting accepted (the allowlist needs 2): deeper flow
/// nesting makes the YAML parser's work grow with the square of the size.
pub const MAX_NESTING: usize = 32;

/// One allowed service.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub address: String,
    pub port: u16,
}

impl Entry {
    /// The host name this entry names, if it is a plain name (not an
    /// address, a range or a wildcard): the entries the proxy resolves.
    pub fn host_name(&self) -> Option<&str> {
        match Rule::of(&self.address) {
            Ok(Rule::Name(name)) => Some(name),
            _ => None,
        }
    }
}

/// Why the config could not be read, or a target is not allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowlistError {
    #[error("cannot read the config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the config file {path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: usize },
    #[error("bad YAML in {path}: nested deeper than {limit} levels at line {line}")]
    TooDeep { path: PathBuf, limit: usize, line: usize },
    #[error("bad YAML in {path}: {reason}")]
    BadYaml { path: PathBuf, reason: String },
    #[error(
        "{path} has no `allowlist` field (expected `allowlist:` followed by a list of {{address, port}})"
    )]
    NoAllowlist { path: PathBuf },
    #[error("bad allowlist entry in {path}: {reason}")]
    BadEntry { path: PathBuf, reason: String },
    #[error(
        "the given address and port are not allowed: {target}:{port}{} matches no entry of {path}",
        resolved_to.map(|ip| format!(" (resolved to {ip})")).unwrap_or_default()
    )]
    NotAllowed { target: String, port: u16, resolved_to: Option<IpAddr>, path: PathBuf },
    #[error(
        "{target}:{port}{} is a {kind} address: a routed client reaches it only when an entry of {path} \
         names that address, or a range within {block}",
        resolved_to.map(|ip| format!(" (resolved to {ip})")).unwrap_or_default()
    )]
    Reserved {
        target: String,
        port: u16,
        resolved_to: Option<IpAddr>,
        kind: &'static str,
        block: IpNet,
        path: PathBuf,
    },
}

/// Address blocks a routed client reaches only through an entry naming an
/// address or a range inside them.
const RESERVED: [(&str, &str); 7] = [
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (the instance metadata service's)"),
    ("0.0.0.0/32", "unspecified"),
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::/64", "AWS instance services' (metadata, DNS, time)"),
];

/// The reserved block holding `ip` (canonical), or the IPv4 address it
/// carries, and what it is.
fn reserved_block(ip: IpAddr) -> Option<(IpNet, &'static str)> {
    let in_block = |ip: IpAddr| {
        RESERVED.iter().find_map(|(block, kind)| {
            let block: IpNet = block.parse().ok()?;
            block.contains(&ip).then_some((block, *kind))
        })
    };
    in_block(ip).or_else(|| in_block(IpAddr::V4(embedded_ipv4(ip)?)))
}

/// The IPv4 address an IPv6 address carries, by the forms that reach it:
/// IPv4-compatible `::a.b.c.d` (`::` and `::1` are their own), NAT64's
/// well-known prefix `64:ff9b::/96`, and 6to4 `2002:AABB:CCDD::/48`.
/// (IPv4-mapped addresses are in IPv4 form already: canonical.)
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let (segments, o) = (v6.segments(), v6.octets());
    let last_32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match segments {
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last_32),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// Which kind of entry allowed a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// An entry names REMOTE_ADDR: every address it resolves to is trusted.
    ByName(Entry),
    /// An entry is, or resolves to, the address used: a new address must be
    /// checked again.
    ByAddress(Entry),
}

/// The allowlist of one config file.
#[derive(Clone, Debug)]
pub struct Allowlist {
    pub entries: Vec<Entry>,
    path: PathBuf,
}

impl Allowlist {
    /// Reads the allowlist from a config file, at most [`MAX_CONFIG_BYTES`].
    pub fn load(path: &Path) -> Result<Allowlist, AllowlistError> {
        Allowlist::parse(&read_config(path)?, path)
    }

    /// Parses allowlist YAML; `path` only names the file in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Allowlist, AllowlistError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        check_nesting(text, path)?;
        let bad_yaml =
            |e: serde_norway::Error| AllowlistError::BadYaml { path: path.into(), reason: e.to_string() };
        let mut documents = serde_norway::Deserializer::from_str(text);
        let Some(first) = documents.next() else {
            return Err(AllowlistError::NoAllowlist { path: path.into() });
        };
        let doc = Value::deserialize(first).map_err(bad_yaml)?;
        if documents.next().is_some() {
            tracing::warn!(config = %path.display(), "the config has more than one YAML document; reading the first only");
        }
        let Some(fields) = doc.as_mapping() else {
            return Err(AllowlistError::NoAllowlist { path: path.into() });
        };
        let unknown: Vec<String> = fields
            .keys()
            .filter(|k| !matches!(k.as_str(), Some("allowlist" | "services")))
            .map(key_name)
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(config = %path.display(), fields = %unknown.join(", "), "ignoring unknown fields of the config");
        }
        let list =
            fields.get("allowlist").ok_or_else(|| AllowlistError::NoAllowlist { path: path.into() })?;
        let bad_entry = |reason: String| AllowlistError::BadEntry { path: path.into(), reason };
        let Some(items) = list.as_sequence() else {
            return Err(bad_entry("`allowlist` must be a list of {address, port}".into()));
        };
        let mut entries = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            if let Some(fields) = item.as_mapping() {
                let unknown: Vec<String> = fields
                    .keys()
                    .filter(|k| !matches!(k.as_str(), Some("address" | "port")))
                    .map(key_name)
                    .collect();
                if !unknown.is_empty() {
                    tracing::warn!(config = %path.display(), entry = index + 1, fields = %unknown.join(", "),
                        "ignoring unknown fields of an allowlist entry");
                }
            }
            let entry: Entry = serde_norway::from_value(item.clone())
                .map_err(|e| bad_entry(format!("entry {}: {e}", index + 1)))?;
            Rule::of(&entry.address).map_err(|e| bad_entry(format!("entry {}: {e}", index + 1)))?;
            entries.push(entry);
        }
        Ok(Allowlist { entries, path: path.into() })
    }

    /// Is connecting to `address` for `host:port` allowed (see the module
    /// docs)? Entries given by name are resolved with `resolver`.
    pub fn admits(
        &self,
        host: &Host,
        port: u16,
        address: IpAddr,
        resolver: &Resolver,
    ) -> Result<Allowed, AllowlistError> {
        self.admits_with(host, port, address, &mut |name| match resolver.resolve(name) {
            Ok(resolution) => resolution.addresses,
            Err(reason) => {
                tracing::warn!(address = name, port, %reason, "cannot resolve an allowlist entry; it allows nothing for now");
                Vec::new()
            }
        })
    }

    /// Is a routed client's destination `host:port`, to be reached at
    /// `address`, allowed? The rule of [`Allowlist::admits`], and safe by
    /// default (see the module docs). `Ok`: the entry that allowed it, as
    /// `address:port` (one metrics label per entry, never per host).
    /// `resolve` gives an entry name's addresses; it is called only when no
    /// entry allows the destination by itself.
    pub fn admits_routed(
        &self,
        host: &Host,
        port: u16,
        address: IpAddr,
        resolve: &mut dyn FnMut(&str) -> Vec<IpAddr>,
    ) -> Result<String, AllowlistError> {
        let label = |entry: &Entry| format!("{}:{}", entry.address, entry.port);
        let address = address.to_canonical();
        let Some((block, kind)) = reserved_block(address) else {
            return match self.admits_with(host, port, address, resolve)? {
                Allowed::ByName(entry) | Allowed::ByAddress(entry) => Ok(label(&entry)),
            };
        };
        let named = self
            .entries
            .iter()
            .filter(|e| e.port == port)
            .find(|e| Rule::of(&e.address).is_ok_and(|rule| rule.opens(address, block)));
        match named {
            Some(entry) => Ok(label(entry)),
            None => {
                let (target, resolved_to) = match host {
                    Host::Ip(ip) => (ip.to_string(), None),
                    Host::Name(name) => (name.clone(), Some(address)),
                };
                Err(AllowlistError::Reserved {
                    target,
                    port,
                    resolved_to,
                    kind,
                    block,
                    path: self.path.clone(),
                })
            }
        }
    }

    /// The entry that allows the host name `name` on some port, by name or
    /// wildcard (what the DNS service answers for; an address entry allows
    /// no name).
    pub fn names(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| Rule::of(&e.address).is_ok_and(|rule| rule.names(name)))
    }

    /// Why an address a name resolves to is kept from a routed client (the
    /// safe-by-default rule, on any port): the kind of reserved block
    /// holding it, unless an address or CIDR entry within that block names
    /// it. `None`: the address may be given out.
    pub fn withholds(&self, address: IpAddr) -> Option<&'static str> {
        let address = address.to_canonical();
        let (block, kind) = reserved_block(address)?;
        let named = self.entries.iter().any(|e| Rule::of(&e.address).is_ok_and(|r| r.opens(address, block)));
        (!named).then_some(kind)
    }

    /// [`Allowlist::admits`] with `resolve` giving an entry name's addresses.
    fn admits_with(
        &self,
        host: &Host,
        port: u16,
        address: IpAddr,
        resolve: &mut dyn FnMut(&str) -> Vec<IpAddr>,
    ) -> Result<Allowed, AllowlistError> {
        // Entries were checked when read; one that does not parse allows nothing.
        let candidates = || {
            self.entries
                .iter()
                .filter(move |e| e.port == port)
                .filter_map(|e| Some((e, Rule::of(&e.address).ok()?)))
        };
        if let Host::Name(name) = host {
            if let Some((entry, _)) = candidates().find(|(_, rule)| rule.names(name)) {
                return Ok(Allowed::ByName(entry.clone()));
            }
        }
        let address = address.to_canonical();
        if let Some((entry, _)) = candidates().find(|(_, rule)| rule.holds(address)) {
            return Ok(Allowed::ByAddress(entry.clone()));
        }
        for (entry, rule) in candidates() {
            let Rule::Name(name) = rule else { continue };
            if resolve(name).iter().any(|a| a.to_canonical() == address) {
                return Ok(Allowed::ByAddress(entry.clone()));
            }
        }
        let (target, resolved_to) = match host {
            Host::Ip(ip) => (ip.to_string(), None),
            Host::Name(name) => (name.clone(), Some(address)),
        };
        Err(AllowlistError::NotAllowed { target, port, resolved_to, path: self.path.clone() })
    }
}

/// Reads a YAML config file: at most [`MAX_CONFIG_BYTES`], UTF-8, nested
/// at most [`MAX_NESTING`] deep, without its byte-order mark.
pub fn read_config(path: &Path) -> Result<String, AllowlistError> {
    let read_error = |reason: String| AllowlistError::Read { path: path.into(), reason };
    let file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_CONFIG_BYTES).unwrap_or(u64::MAX);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| read_error(e.to_string()))?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(AllowlistError::TooLarge { path: path.into(), limit: MAX_CONFIG_BYTES });
    }
    let text = String::from_utf8(bytes).map_err(|e| read_error(format!("not UTF-8 text: {e}")))?;
    check_nesting(&text, path)?;
    Ok(text)
}

fn check_nesting(text: &str, path: &Path) -> Result<(), AllowlistError> {
    match nested_deeper_than(text, MAX_NESTING) {
        Some(line) => Err(AllowlistError::TooDeep { path: path.into(), limit: MAX_NESTING, line }),
        None => Ok(()),
    }
}

/// What an entry's `address` means.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule<'a> {
    /// A host name (trusted for itself; allows what it resolves to).
    Name(&'a str),
    /// An IP address, in canonical form.
    Ip(IpAddr),
    /// `*.SUFFIX` (one label before SUFFIX) or `**.SUFFIX` (one or more).
    Wildcard { suffix: &'a str, any_depth: bool },
    /// A CIDR range, IPv4-mapped IPv6 ranges in their IPv4 form.
    Range(IpNet),
}

impl<'a> Rule<'a> {
    fn of(address: &'a str) -> Result<Rule<'a>, String> {
        let address = unbracketed(address);
        if address.is_empty() {
            return Err("the address is empty".into());
        }
        if let Ok(ip) = address.parse::<IpAddr>() {
            return Ok(Rule::Ip(ip.to_canonical()));
        }
        if address.contains('/') {
            let range = address.parse::<IpNet>().map_err(|_| {
                format!("`{address}` is not a CIDR range (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")
            })?;
            return Ok(Rule::Range(canonical_range(range.trunc())));
        }
        let (suffix, any_depth) = match address.split_once('.') {
            Some(("**", suffix)) => (suffix, true),
            Some(("*", suffix)) => (suffix, false),
            _ => (address, false),
        };
        if suffix.contains('*') || suffix.is_empty() || suffix.starts_with('.') {
            return Err(format!(
                "`{address}`: a wildcard is `*.` or `**.` before a name (*.example.com, **.example.com), nowhere else"
            ));
        }
        Ok(if suffix.len() == address.len() {
            Rule::Name(address)
        } else {
            Rule::Wildcard { suffix, any_depth }
        })
    }

    /// Does this rule trust the host name `name`?
    fn names(&self, name: &str) -> bool {
        let name = trim_dot(name);
        match self {
            Rule::Name(entry) => trim_dot(entry).eq_ignore_ascii_case(name),
            Rule::Wildcard { suffix, any_depth } => {
                let suffix = trim_dot(suffix);
                let Some(labels) = name
                    .len()
                    .checked_sub(suffix.len() + 1)
                    .filter(|&cut| name.is_char_boundary(cut) && name[cut..].starts_with('.'))
                    .filter(|&cut| name[cut + 1..].eq_ignore_ascii_case(suffix))
                    .map(|cut| &name[..cut])
                else {
                    return false;
                };
                match any_depth {
                    false => !labels.is_empty() && !labels.contains('.'),
                    true => labels.split('.').all(|label| !label.is_empty()),
                }
            }
            Rule::Ip(_) | Rule::Range(_) => false,
        }
    }

    /// Does this rule open `ip` (canonical), inside the reserved `block`:
    /// is it that address, or a range within the block that holds it?
    fn opens(&self, ip: IpAddr, block: IpNet) -> bool {
        match self {
            Rule::Ip(entry) => *entry == ip,
            Rule::Range(range) => range.contains(&ip) && block.contains(range),
            Rule::Name(_) | Rule::Wildcard { .. } => false,
        }
    }

    /// Does this rule allow the address `ip` (in canonical form) by itself?
    fn holds(&self, ip: IpAddr) -> bool {
        match self {
            Rule::Ip(entry) => *entry == ip,
            Rule::Range(range) => range.contains(&ip),
            Rule::Name(_) | Rule::Wildcard { .. } => false,
        }
    }
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`: addresses are compared in
/// canonical form, so ranges are too.
fn canonical_range(range: IpNet) -> IpNet {
    match range {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(range, IpNet::V4),
            None => range,
        },
        other => other,
    }
}

/// A name without its one trailing dot (DNS's absolute form).
fn trim_dot(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

fn unbracketed(address: &str) -> &str {
    address.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(address)
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other).map_or_else(|_| "?".into(), |s| s.trim().to_string()),
    }
}

/// The line where `[`/`{` nesting first goes deeper than `limit`, if it
/// does. Quoted strings and comments are skipped; a quote starts a string
/// only where YAML lets one start (line start, after space or `[{,`).
fn nested_deeper_than(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut previous = '\n';
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' if previous.is_whitespace() => while chars.next_if(|&c| c != '\n').is_some() {},
            '\'' | '"' if previous.is_whitespace() || "[{,".contains(previous) => {
                while let Some(q) = chars.next() {
                    match q {
                        '\n' => line += 1,
                        '\\' if c == '"' => {
                            chars.next();
                        }
                        q if q == c => {
                            // '' inside a single-quoted string is an escaped quote.
                            if c == '\'' && chars.next_if_eq(&'\'').is_some() {
                                continue;
                            }
                            break;
                        }
                        _ => {}
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("test.yaml")
    }

    fn parse(text: &str) -> Result<Vec<Entry>, AllowlistError> {
        Allowlist::parse(text, p()).map(|a| a.entries)
    }

    #[test]
    fn routed_destinations_at_reserved_addresses_need_an_entry_naming_them() {
        let list = Allowlist::parse(
            "allowlist:\n- {address: '*.example.com', port: 80}\n- {address: '**.internal', port: 80}\n\
             - {address: 0.0.0.0/0, port: 80}\n- {address: 127.0.0.0/8, port: 443}\n\
             - {address: 169.254.169.254, port: 8080}\n- {address: 'api.example.com', port: 443}\n",
            p(),
        )
        .unwrap();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let name = |text: &str| Host::Name(text.into());
        let mut nothing = |_: &str| Vec::new();
        let mut check =
            |host: &Host, port, address| list.admits_routed(host, port, ip(address), &mut nothing);
        // An ordinary address: the usual rule, the entry as the label.
        assert_eq!(check(&name("a.example.com"), 80, "192.0.2.1"), Ok("*.example.com:80".into()));
        assert_eq!(check(&Host::Ip(ip("192.0.2.1")), 80, "192.0.2.1"), Ok("0.0.0.0/0:80".into()));
        // A wildcard name that resolves to the metadata service: refused,
        // and so is the address itself, though 0.0.0.0/0 holds it.
        let e = check(&name("imds.example.com"), 80, "169.254.169.254").unwrap_err();
        assert!(matches!(
            e,
            AllowlistError::Reserved { kind: "link-local (the instance metadata service's)", .. }
        ));
        assert!(
            e.to_string().contains("imds.example.com:80 (resolved to 169.254.169.254) is a link-local"),
            "{e}"
        );
        assert!(check(&Host::Ip(ip("169.254.169.254")), 80, "169.254.169.254").is_err());
        assert!(check(&name("x.internal"), 80, "fe80::1").is_err());
        assert!(check(&Host::Ip(ip("fd00:ec2::254")), 80, "fd00:ec2::254").is_err());
        assert!(check(&name("dns.internal"), 80, "fd00:ec2::253").is_err(), "the VPC resolver");
        assert!(check(&Host::Ip(ip("0.0.0.0")), 80, "0.0.0.0").is_err());
        assert!(check(&name("a.example.com"), 80, "::ffff:127.0.0.1").is_err(), "mapped loopback");
        // An IPv6 address carrying a reserved IPv4 one is judged by it,
        // though a `::/0` entry holds it as IPv6; one carrying an ordinary
        // IPv4 address is not reserved.
        let any_v6 = Allowlist::parse("allowlist:\n- {address: '::/0', port: 80}\n", p()).unwrap();
        let check_v6 = |address| {
            any_v6.admits_routed(&Host::Ip(ip(address)), 80, ip(address), &mut |_: &str| Vec::new())
        };
        for (carried, kind) in [
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local (the instance metadata service's)"),
            ("2002:a9fe:a9fe::1", "link-local (the instance metadata service's)"),
            ("::a9fe:a9fe", "link-local (the instance metadata service's)"),
            ("64:ff9b::0.0.0.0", "unspecified"),
        ] {
            let e = check_v6(carried).unwrap_err();
            assert!(matches!(e, AllowlistError::Reserved { kind: k, .. } if k == kind), "{carried}: {e}");
        }
        for ordinary in ["64:ff9b::c000:201", "2002:c000:201::1", "::c000:201", "2001:db8::1"] {
            assert_eq!(check_v6(ordinary), Ok("::/0:80".into()), "{ordinary}");
        }
        // Named exactly, it is allowed, as any reserved address is.
        let named =
            Allowlist::parse("allowlist:\n- {address: '64:ff9b::a9fe:a9fe', port: 80}\n", p()).unwrap();
        let metadata_via_nat64 = ip("64:ff9b::a9fe:a9fe");
        assert!(named
            .admits_routed(&Host::Ip(metadata_via_nat64), 80, metadata_via_nat64, &mut |_: &str| Vec::new())
            .is_ok());
        // Named by an address or a range within the block: allowed.
        assert_eq!(
            check(&Host::Ip(ip("169.254.169.254")), 8080, "169.254.169.254"),
            Ok("169.254.169.254:8080".into())
        );
        assert_eq!(check(&name("localhost"), 443, "127.0.0.1"), Ok("127.0.0.0/8:443".into()));
        assert!(check(&name("api.example.com"), 443, "::1").is_err(), "::1 is not in 127.0.0.0/8");
        // Not allowed at all: the usual error.
        let e = check(&name("evil.net"), 80, "198.51.100.1");
        assert!(e.is_ok(), "0.0.0.0/0 allows any ordinary address: {e:?}");
        assert!(matches!(
            check(&name("evil.net"), 81, "198.51.100.1"),
            Err(AllowlistError::NotAllowed { .. })
        ));
    }

    #[test]
    fn parses_the_aws_format() {
        let entries = parse(
            "allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n- {address: 10.0.0.1, port: 80}\n",
        )
        .unwrap();
        assert_eq!(entries[0], Entry { address: "kms.us-east-1.amazonaws.com".into(), port: 443 });
        assert_eq!(entries[1].port, 80);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(matches!(parse("allowlist: ["), Err(AllowlistError::BadYaml { .. })));
        assert_eq!(
            parse("services: []").unwrap_err().to_string(),
            "test.yaml has no `allowlist` field (expected `allowlist:` followed by a list of {address, port})"
        );
        let err = parse("allowlist:\n- {address: a.example}\n").unwrap_err().to_string();
        assert!(err.contains("entry 1: missing field `port`"), "{err}");
        let err = parse("allowlist:\n- {address: a.example, port: 70000}\n").unwrap_err().to_string();
        assert!(err.starts_with("bad allowlist entry in test.yaml"), "{err}");
        let err = parse("allowlist: {address: a.example, port: 1}\n").unwrap_err().to_string();
        assert!(err.contains("must be a list"), "{err}");
        assert!(matches!(parse(""), Err(AllowlistError::NoAllowlist { .. })));
        assert!(matches!(parse("# only a comment\n"), Err(AllowlistError::NoAllowlist { .. })));
    }

    #[test]
    fn accepts_what_aws_accepts() {
        let want = vec![Entry { address: "a.example".into(), port: 1 }];
        // A byte-order mark, unknown fields, a second document.
        assert_eq!(parse("\u{feff}allowlist:\n- {address: a.example, port: 1}\n").unwrap(), want);
        assert_eq!(parse("allowlist:\n- {address: a.example, port: 1, note: x}\nowner: me\n").unwrap(), want);
        assert_eq!(parse("allowlist:\n- {address: a.example, port: 1}\n---\nother: [\n").unwrap(), want);
    }

    /// Whether `entry` (port 443) allows connecting to `ip` for `host`:443,
    /// with no DNS (name entries resolve to nothing).
    fn allows(entry: &str, host: &str, ip: &str) -> bool {
        let allowlist =
            Allowlist { entries: vec![Entry { address: entry.into(), port: 443 }], path: "t.yaml".into() };
        let host = crate::relay::options::parse_remote_host(host).unwrap_or_else(|_| Host::Name(host.into()));
        allowlist.admits_with(&host, 443, ip.parse().unwrap(), &mut |_| Vec::new()).is_ok()
    }

    #[test]
    fn wildcards_match_labels_not_lookalikes() {
        let any = "192.0.2.1";
        assert!(allows("*.example.com", "kms.example.com", any));
        assert!(allows("*.example.com", "KMS.Example.COM.", any), "case and the trailing dot aside");
        assert!(!allows("*.example.com", "example.com", any), "one label is needed");
        assert!(!allows("*.example.com", "a.b.example.com", any), "exactly one label");
        assert!(!allows("*.example.com", "evilexample.com", any));
        assert!(!allows("*.example.com", "kms.example.com.evil.net", any));
        assert!(!allows("*.example.com", "example.com.evil.net", any));
        assert!(!allows("*.example.com", "xexample.com", any));
        assert!(allows("**.example.com", "kms.example.com", any));
        assert!(allows("**.example.com", "a.b.c.example.com", any));
        assert!(!allows("**.example.com", "example.com", any));
        assert!(!allows("**.example.com", "evilexample.com", any));
        assert!(!allows("**.example.com", "a..example.com", any));
        assert!(!allows("**.example.com", "example.com.evil.net", any));
        assert!(!allows("*.example.com", "192.0.2.1", any), "a wildcard names names, not addresses");
    }

    #[test]
    fn ranges_hold_their_addresses_only() {
        assert!(allows("10.0.0.0/8", "10.0.0.1", "10.0.0.1"));
        assert!(allows("10.0.0.0/8", "10.255.255.255", "10.255.255.255"));
        assert!(!allows("10.0.0.0/8", "11.0.0.0", "11.0.0.0"));
        assert!(!allows("10.0.0.0/8", "9.255.255.255", "9.255.255.255"));
        assert!(
            allows("10.0.0.0/8", "::ffff:10.1.2.3", "::ffff:10.1.2.3"),
            "IPv4-mapped IPv6 is its IPv4 form"
        );
        assert!(allows("::ffff:10.0.0.0/104", "10.9.9.9", "10.9.9.9"), "a mapped range is its IPv4 range");
        assert!(!allows("::ffff:10.0.0.0/104", "11.0.0.0", "11.0.0.0"));
        assert!(allows("2001:db8::/32", "2001:db8:ffff::1", "2001:db8:ffff::1"));
        assert!(!allows("2001:db8::/32", "2001:db9::1", "2001:db9::1"));
        assert!(allows("[2001:db8::/32]", "2001:db8::1", "2001:db8::1"), "brackets as for addresses");
        // A name is checked by the address it resolved to.
        assert!(allows("10.0.0.0/8", "kms.example.com", "10.0.0.7"));
        assert!(!allows("10.0.0.0/8", "kms.example.com", "11.0.0.7"));
        // Host bits are ignored, as routers do.
        assert!(allows("10.1.2.3/8", "10.200.0.1", "10.200.0.1"));
    }

    #[test]
    fn bad_wildcards_and_ranges_are_refused_when_read() {
        for (address, says) in [
            ("foo*.example.com", "a wildcard is"),
            ("a.*.example.com", "a wildcard is"),
            ("*", "a wildcard is"),
            ("*.", "a wildcard is"),
            ("***.example.com", "a wildcard is"),
            ("10.0.0.0/33", "not a CIDR range"),
            ("10.0.0/8", "not a CIDR range"),
            ("", "empty"),
        ] {
            let text = format!("allowlist:\n- {{address: '{address}', port: 1}}\n");
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains("entry 1") && error.contains(says), "{address}: {error}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("allowlist: {}1{}\n", "{a: ".repeat(40_000), "}".repeat(40_000));
        let started = std::time::Instant::now();
        let err = parse(&deep).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(err, AllowlistError::TooDeep { path: p().into(), limit: MAX_NESTING, line: 1 });
        // Brackets in quotes and comments do not count.
        let quoted =
            format!("allowlist:\n- {{address: '{}', port: 1}} # {}\n", "[".repeat(50), "{".repeat(50));
        assert_eq!(parse(&quoted).unwrap()[0].address, "[".repeat(50));
        assert_eq!(nested_deeper_than("a: \"x\\\"[[[\"\nb: [[[\n", 2), Some(2));
        assert_eq!(nested_deeper_than("a: 'it''s [[['\n", 2), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;
        use std::net::{Ipv4Addr, Ipv6Addr};

        fn name() -> impl Strategy<Value = String> {
            proptest::collection::vec("[a-z]([a-z0-9-]{0,8}[a-z0-9])?", 1..4).prop_map(|l| l.join("."))
        }

        /// Each letter's case flipped at random, and maybe a trailing dot.
        fn respelled(name: &str) -> impl Strategy<Value = String> {
            let name = name.to_string();
            (proptest::collection::vec(any::<bool>(), name.len()), any::<bool>()).prop_map(
                move |(flips, dot)| {
                    let mut out: String = name
                        .chars()
                        .zip(flips)
                        .map(|(c, flip)| if flip { c.to_ascii_uppercase() } else { c })
                        .collect();
                    if dot {
                        out.push('.');
                    }
                    out
                },
            )
        }

        fn list(entries: Vec<Entry>) -> Allowlist {
            Allowlist { entries, path: "test.yaml".into() }
        }

        fn no_dns(_: &str) -> Vec<IpAddr> {
            Vec::new()
        }

        proptest! {
            #[test]
            fn an_entry_naming_the_host_trusts_any_address_it_resolves_to(
                (name, spelled) in name().prop_flat_map(|n| (Just(n.clone()), respelled(&n))),
                port in any::<u16>(),
                ip in any::<u32>(),
            ) {
                let allowlist = list(vec![Entry { address: spelled, port }]);
                let allowed = allowlist.admits_with(&Host::Name(name), port, Ipv4Addr::from(ip).into(), &mut no_dns);
                prop_assert!(matches!(allowed, Ok(Allowed::ByName(_))));
            }

            #[test]
            fn an_address_entry_allows_exactly_that_address(
                entry_ip in any::<u32>(),
                used_ip in any::<u32>(),
                mapped in any::<bool>(),
                bracketed in any::<bool>(),
                host in name(),
                port in any::<u16>(),
            ) {
                let entry_v4 = Ipv4Addr::from(entry_ip);
                let text = match (mapped, bracketed) {
                    (false, _) => entry_v4.to_string(),
                    (true, false) => entry_v4.to_ipv6_mapped().to_string(),
                    (true, true) => format!("[{}]", entry_v4.to_ipv6_mapped()),
                };
                let allowlist = list(vec![Entry { address: text, port }]);
                for used in [IpAddr::from(Ipv4Addr::from(used_ip)), IpAddr::from(Ipv4Addr::from(used_ip).to_ipv6_mapped())] {
                    for target in [Host::Name(host.clone()), Host::Ip(used)] {
                        let allowed = allowlist.admits_with(&target, port, used, &mut no_dns);
                        prop_assert_eq!(allowed.is_ok(), entry_ip == used_ip, "{:?} for {:?}", allowed, used);
                    }
                }
            }

            #[test]
            fn a_name_entry_allows_what_it_resolves_to_and_nothing_else(
                entry in name(),
                resolved in proptest::collection::vec(any::<u128>(), 0..4),
                used in any::<u128>(),
                port in any::<u16>(),
            ) {
                let resolved: Vec<IpAddr> = resolved.into_iter().map(|ip| Ipv6Addr::from(ip).into()).collect();
                let dns: HashMap<String, Vec<IpAddr>> = [(entry.clone(), resolved.clone())].into();
                let allowlist = list(vec![Entry { address: entry, port }]);
                let used = IpAddr::from(Ipv6Addr::from(used));
                let mut resolve = |name: &str| dns.get(name).cloned().unwrap_or_default();
                // The host is another name: only the address can allow it.
                let host = Host::Name("target.example".into());
                let allowed = allowlist.admits_with(&host, port, used, &mut resolve);
                prop_assert_eq!(allowed.is_ok(), resolved.contains(&used));
                for &address in &resolved {
                    prop_assert!(allowlist.admits_with(&host, port, address, &mut resolve).is_ok());
                }
            }

            #[test]
            fn another_port_never_allows(entry in name(), port in any::<u16>(), other in any::<u16>(), ip in any::<u32>()) {
                prop_assume!(port != other);
                let allowlist = list(vec![Entry { address: entry.clone(), port }, Entry { address: Ipv4Addr::from(ip).to_string(), port }]);
                let allowed = allowlist.admits_with(&Host::Name(entry), other, Ipv4Addr::from(ip).into(), &mut no_dns);
                let refused = matches!(allowed, Err(AllowlistError::NotAllowed { .. }));
                prop_assert!(refused);
            }

            #[test]
            fn written_entries_read_back(
                entries in proptest::collection::vec((prop_oneof![name(), any::<u32>().prop_map(|ip| Ipv4Addr::from(ip).to_string())], any::<u16>()), 1..20),
                block_style in any::<bool>(),
            ) {
                // Unquoted, these are YAML's booleans and null, not names.
                let plain = |a: &String| !matches!(a.as_str(), "true" | "false" | "null");
                prop_assume!(!block_style || entries.iter().all(|(a, _)| plain(a)));
                let mut yaml = String::from("allowlist:\n");
                for (address, port) in &entries {
                    if block_style {
                        yaml.push_str(&format!("  - address: {address}\n    port: {port}\n"));
                    } else {
                        yaml.push_str(&format!("- {{address: \"{address}\", port: {port}}}\n"));
                    }
                }
                let read = parse(&yaml).unwrap();
                let want: Vec<Entry> = entries.into_iter().map(|(address, port)| Entry { address, port }).collect();
                prop_assert_eq!(read, want);
            }

            #[test]
            fn any_text_is_read_or_refused_without_panicking(text in "(allowlist:|[-\\[\\]{}:, \n#'\"a-z0-9&*!|>])*") {
                let _ = parse(&text);
            }
        }
    }
}
