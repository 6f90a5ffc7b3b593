//! The PROXY protocol, version 2 (haproxy's `proxy-protocol.txt`): a binary
//! header a relay sends first on an upstream connection, so that the server
//! behind it learns the client's address (a server in the enclave reached
//! from the parent's TCP port sees the relay's vsock address otherwise).
//!
//! Only TCP addresses are carried; a client of another family (vsock, Unix)
//! is sent as `UNSPEC`, which tells the server to use the connection's own
//! addresses.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The twelve bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2 with the PROXY command (the connection was relayed).
const VERSION_PROXY: u8 = 0x21;
/// Version 2 with the LOCAL command (health checks; no addresses).
const VERSION_LOCAL: u8 = 0x20;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
const UNSPEC: u8 = 0x00;
/// The fixed part: signature, version and command, family, length.
const FIXED_BYTES: usize = 16;
/// Longest header read back ([`parse`]): the fixed part and the largest
/// address block a header may announce.
pub const MAX_HEADER_BYTES: usize = FIXED_BYTES + u16::MAX as usize;

/// The header for a connection from `client` to `local` (the relay's
/// listening address); `None` for either: `UNSPEC`.
pub fn encode(client: Option<SocketAddr>, local: Option<SocketAddr>) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(VERSION_PROXY);
    let (Some(client), Some(local)) = (client, local) else {
        header.extend_from_slice(&[UNSPEC, 0, 0]);
        return header;
    };
    match (client.ip().to_canonical(), local.ip().to_canonical()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            header.extend_from_slice(&[TCP_OVER_IPV4, 0, 12]);
            header.extend_from_slice(&source.octets());
            header.extend_from_slice(&destination.octets());
        }
        (source, destination) => {
            header.extend_from_slice(&[TCP_OVER_IPV6, 0, 36]);
            header.extend_from_slice(&as_v6(source).octets());
            header.extend_from_slice(&as_v6(destination).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A header read back by a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The client and the address it connected to (`None`: LOCAL, or a
    /// family other than TCP).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The header's length: the payload starts after it.
    pub length: usize,
}

/// Why bytes are not a version 2 header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol v2 signature")]
    NoSignature,
    #[error("PROXY protocol version/command byte {0:#04x} is not v2 PROXY or LOCAL")]
    BadVersion(u8),
    #[error("a TCP address block of {0} bytes is too short")]
    ShortAddresses(usize),
}

/// Reads a header from the start of `bytes`: `Ok(None)` while more bytes
/// are needed.
pub fn parse(bytes: &[u8]) -> Result<Option<Parsed>, HeaderError> {
    let seen = bytes.len().min(SIGNATURE.len());
    if bytes[..seen] != SIGNATURE[..seen] {
        return Err(HeaderError::NoSignature);
    }
    let Some(fixed) = bytes.get(..FIXED_BYTES) else { return Ok(None) };
    let (version, family) = (fixed[12], fixed[13]);
    let block = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if version != VERSION_PROXY && version != VERSION_LOCAL {
        return Err(HeaderError::BadVersion(version));
    }
    let Some(addresses) = bytes.get(FIXED_BYTES..FIXED_BYTES + block) else { return Ok(None) };
    let length = FIXED_BYTES + block;
    let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
    let addresses = match (version, family) {
        (VERSION_PROXY, TCP_OVER_IPV4) if block >= 12 => {
            let ip = |at: usize| {
                IpAddr::from([addresses[at], addresses[at + 1], addresses[at + 2], addresses[at + 3]])
            };
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        (VERSION_PROXY, TCP_OVER_IPV6) if block >= 36 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addresses[at..at + 16]);
                IpAddr::from(octets)
            };
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        (VERSION_PROXY, TCP_OVER_IPV4 | TCP_OVER_IPV6) => return Err(HeaderError::ShortAddresses(block)),
        _ => None,
    };
    Ok(Some(Parsed { addresses, length }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_has_the_specified_layout() {
        let client: SocketAddr = "192.0.2.10:51234".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let header = encode(Some(client), Some(local));
        let mut expected = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 0, 2, 10, 198, 51, 100, 1]);
        expected.extend_from_slice(&[0xC8, 0x22, 0x01, 0xBB]);
        assert_eq!(header, expected);
        let parsed = parse(&header).unwrap().unwrap();
        assert_eq!(parsed, Parsed { addresses: Some((client, local)), length: 28 });
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_block() {
        let client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let header = encode(Some(client), Some(local));
        assert_eq!(&header[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(&header[16..32], &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&header[32..48], &"::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&header[48..52], &[0x9C, 0x40, 0x1F, 0x90]);
        let (source, _) = parse(&header).unwrap().unwrap().addresses.unwrap();
        assert_eq!(source, client);
    }

    #[test]
    fn mapped_ipv4_client_is_sent_as_ipv4_and_others_as_unspec() {
        let client: SocketAddr = "[::ffff:10.1.2.3]:1000".parse().unwrap();
        let local: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(&encode(Some(client), Some(local))[12..16], &[0x21, 0x11, 0x00, 0x0C]);
        let unspec = encode(None, None);
        assert_eq!(&unspec[12..], &[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&unspec).unwrap(), Some(Parsed { addresses: None, length: 16 }));
    }

    #[test]
    fn parse_waits_for_the_whole_header_and_refuses_what_is_not_one() {
        let header = encode(Some("10.0.0.1:1".parse().unwrap()), Some("10.0.0.2:2".parse().unwrap()));
        for cut in 0..header.len() {
            assert_eq!(parse(&header[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NoSignature));
        let mut bad = header.clone();
        bad[12] = 0x31;
        assert_eq!(parse(&bad), Err(HeaderError::BadVersion(0x31)));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(HeaderError::ShortAddresses(4)));
    }
}
