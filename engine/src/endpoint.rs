//! Endpoints: one type and one text form for every socket family the relay
//! speaks, so that every app, config file and log line names a socket the
//! same way: `vsock:CID:PORT`, `tcp:HOST:PORT`, `unix:PATH`.
//!
//! An outgoing vsock endpoint may end in `:to-host`: connect with
//! `VMADDR_FLAG_TO_HOST` (Linux 5.11+), which sends the connection through
//! the guest transport (virtio: the host, or on a Nitro parent its enclaves)
//! even when the host transport (vhost_vsock, for VMs this machine runs) is
//! loaded too: without it the kernel hands every CID above 2 to vhost_vsock.
//! `:to-host=auto` sets the flag where it is right for an enclave's CID:
//! on a Nitro parent (the nitro_enclaves driver is loaded: its enclaves are
//! reached through the guest transport only) whose kernel knows the flag.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// `VMADDR_CID_ANY`: listen on every CID of this machine.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// A stream socket address in any family the relay supports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// AF_VSOCK; `cid` may be [`VSOCK_CID_ANY`] (written `any`) on a
    /// listener; `to_host` applies to connects (see the module docs).
    Vsock { cid: u32, port: u32, to_host: ToHost },
    /// TCP over IPv4 or IPv6; a host name is resolved before use.
    Tcp { host: Host, port: u16 },
    /// A Unix-domain stream socket at a filesystem path.
    Unix { path: PathBuf },
}

/// Whether a vsock connect asks for `VMADDR_FLAG_TO_HOST`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ToHost {
    /// No flag: the kernel picks the transport by CID (written as nothing).
    #[default]
    No,
    /// The flag (`:to-host`).
    Yes,
    /// The flag on a Nitro parent whose kernel knows it (`:to-host=auto`).
    Auto,
}

/// The host part of a TCP endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Why an endpoint's text did not parse; each variant names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointParseError {
    /// The text has no family prefix.
    #[error("`{0}`: missing family; expected vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")]
    MissingFamily(String),
    /// The family prefix is not one we know.
    #[error("`{0}`: unknown family `{1}`; expected vsock, tcp or unix")]
    UnknownFamily(String, String),
    /// The port is missing, not a number, or out of range.
    #[error("`{0}`: bad port `{1}`; expected a number from 0 to {2}")]
    BadPort(String, String, u64),
    /// The vsock CID is neither `any` nor a 32-bit number.
    #[error("`{0}`: bad vsock CID `{1}`; expected `any` or a number")]
    BadCid(String, String),
    /// The TCP host is empty or malformed.
    #[error("`{0}`: bad host `{1}`; expected an IPv4 address, [IPv6] or a host name")]
    BadHost(String, String),
    /// The Unix path is empty.
    #[error("`{0}`: empty unix socket path")]
    EmptyPath(String),
    /// What follows a vsock port is not a known option.
    #[error("`{0}`: unknown vsock option `{1}`; expected to-host or to-host=auto")]
    BadVsockOption(String, String),
}

impl Endpoint {
    /// A TCP endpoint on a literal socket address.
    pub fn tcp(addr: SocketAddr) -> Self {
        Endpoint::Tcp { host: Host::Ip(addr.ip()), port: addr.port() }
    }

    /// A vsock endpoint without the to-host flag.
    pub fn vsock(cid: u32, port: u32) -> Self {
        Endpoint::Vsock { cid, port, to_host: ToHost::No }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid: VSOCK_CID_ANY, port, to_host } => write!(f, "vsock:any:{port}{to_host}"),
            Endpoint::Vsock { cid, port, to_host } => write!(f, "vsock:{cid}:{port}{to_host}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for ToHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToHost::No => "",
            ToHost::Yes => ":to-host",
            ToHost::Auto => ":to-host=auto",
        })
    }
}

fn parse_port(text: &str, port: &str, max: u64) -> Result<u64, EndpointParseError> {
    match port.parse::<u64>() {
        Ok(n) if n <= max && !port.starts_with('+') => Ok(n),
        _ => Err(EndpointParseError::BadPort(text.into(), port.into(), max)),
    }
}

/// Parses a host as written in `tcp:HOST:PORT` (IPv6 in brackets).
pub fn parse_host(host: &str) -> Option<Host> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().ok().map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').enumerate().all(|(i, label)| {
            // A trailing dot (fully qualified name) leaves one empty last label.
            (label.is_empty() && i > 0 && host.ends_with('.') && host.len() > 1)
                || (!label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-'))
        });
    valid_name.then(|| Host::Name(host.to_owned()))
}

impl FromStr for Endpoint {
    type Err = EndpointParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (family, rest) =
            text.split_once(':').ok_or_else(|| EndpointParseError::MissingFamily(text.into()))?;
        match family {
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(|| {
                    EndpointParseError::BadPort(text.into(), String::new(), u32::MAX.into())
                })?;
                let cid = match cid {
                    "any" => VSOCK_CID_ANY,
                    _ => cid.parse().map_err(|_| EndpointParseError::BadCid(text.into(), cid.into()))?,
                };
                let (port, to_host) = match port.split_once(':') {
                    None => (port, ToHost::No),
                    Some((port, "to-host")) => (port, ToHost::Yes),
                    Some((port, "to-host=auto")) => (port, ToHost::Auto),
                    Some((_, other)) => {
                        return Err(EndpointParseError::BadVsockOption(text.into(), other.into()))
                    }
                };
                let port = u32::try_from(parse_port(text, port, u32::MAX.into())?).unwrap_or(u32::MAX);
                Ok(Endpoint::Vsock { cid, port, to_host })
            }
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
                    EndpointParseError::BadPort(text.into(), String::new(), u16::MAX.into())
                })?;
                let port = u16::try_from(parse_port(text, port, u16::MAX.into())?).unwrap_or(u16::MAX);
                let host =
                    parse_host(host).ok_or_else(|| EndpointParseError::BadHost(text.into(), host.into()))?;
                Ok(Endpoint::Tcp { host, port })
            }
            "unix" if rest.is_empty() => Err(EndpointParseError::EmptyPath(text.into())),
            "unix" => Ok(Endpoint::Unix { path: PathBuf::from(rest) }),
            other => Err(EndpointParseError::UnknownFamily(text.into(), other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_family() {
        for text in [
            "vsock:any:8001",
            "vsock:3:5005",
            "vsock:16:5005:to-host",
            "vsock:16:5005:to-host=auto",
            "tcp:127.0.0.1:443",
            "tcp:[::1]:8080",
            "tcp:kms.us-east-1.amazonaws.com:443",
            "unix:/run/relay.sock",
        ] {
            let endpoint: Endpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
        }
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = |s: &str| s.parse::<Endpoint>().unwrap_err().to_string();
        assert_eq!(
            err("tcp:127.0.0.1:70000"),
            "`tcp:127.0.0.1:70000`: bad port `70000`; expected a number from 0 to 65535"
        );
        assert_eq!(err("vsock:x:1"), "`vsock:x:1`: bad vsock CID `x`; expected `any` or a number");
        assert_eq!(err("udp:1:2"), "`udp:1:2`: unknown family `udp`; expected vsock, tcp or unix");
        assert_eq!(
            err("localhost:80"),
            "`localhost:80`: unknown family `localhost`; expected vsock, tcp or unix"
        );
        assert!(err("8080").contains("missing family"));
        assert!(err("tcp:[::1:80").contains("bad host `[::1`"));
        assert!(err("tcp:bad host:80").contains("bad host"));
        assert!(err("unix:").contains("empty unix socket path"));
        assert!(err("vsock:3").contains("bad port"));
        assert_eq!(
            err("vsock:16:5005:tohost"),
            "`vsock:16:5005:tohost`: unknown vsock option `tohost`; expected to-host or to-host=auto"
        );
        assert_eq!(
            "vsock:16:5005:to-host".parse::<Endpoint>(),
            Ok(Endpoint::Vsock { cid: 16, port: 5005, to_host: ToHost::Yes })
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::net::{Ipv4Addr, Ipv6Addr};

        /// Host names that are not IP literals: labels starting with a letter.
        fn name() -> impl Strategy<Value = String> {
            proptest::collection::vec("[a-zA-Z]([a-zA-Z0-9_-]{0,12}[a-zA-Z0-9])?", 1..5)
                .prop_map(|labels| labels.join("."))
        }

        fn endpoint() -> impl Strategy<Value = Endpoint> {
            prop_oneof![
                (
                    any::<u32>(),
                    any::<u32>(),
                    prop_oneof![Just(ToHost::No), Just(ToHost::Yes), Just(ToHost::Auto)]
                )
                    .prop_map(|(cid, port, to_host)| Endpoint::Vsock { cid, port, to_host }),
                (any::<u32>(), any::<u16>())
                    .prop_map(|(ip, port)| Endpoint::Tcp { host: Host::Ip(Ipv4Addr::from(ip).into()), port }),
                (any::<u128>(), any::<u16>())
                    .prop_map(|(ip, port)| Endpoint::Tcp { host: Host::Ip(Ipv6Addr::from(ip).into()), port }),
                (name(), any::<u16>())
                    .prop_map(|(name, port)| Endpoint::Tcp { host: Host::Name(name), port }),
                "[^\\x00]{1,40}".prop_map(|path| Endpoint::Unix { path: PathBuf::from(path) }),
            ]
        }

        proptest! {
            #[test]
            fn any_text_parses_or_fails_without_panicking(text in ".{0,64}") {
                let _ = text.parse::<Endpoint>();
            }

            #[test]
            fn every_endpoint_round_trips_through_its_text(endpoint in endpoint()) {
                let text = endpoint.to_string();
                prop_assert_eq!(text.parse::<Endpoint>(), Ok(endpoint), "{}", text);
            }

            #[test]
            fn ports_beyond_the_family_range_are_refused(port in 65_536u64..u64::MAX, cid in any::<u32>()) {
                let tcp = format!("tcp:127.0.0.1:{port}");
                prop_assert!(tcp.parse::<Endpoint>().is_err());
                let vsock = format!("vsock:{cid}:{port}").parse::<Endpoint>();
                prop_assert_eq!(vsock.is_ok(), port <= u64::from(u32::MAX));
            }
        }
    }
}
