//! The SOCKS5 greeting and CONNECT request (RFC 1928), as
//! `ALL_PROXY=socks5h://...` clients send them, and the replies they
//! expect. Only "no authentication" and CONNECT: the relay serves guests
//! that are trusted by where they connect from, and only relays streams.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{Outcome, Parse};
use crate::endpoint::{parse_host, Host};

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;
const CONNECT: u8 = 0x01;

/// The reply codes (REP) of RFC 1928, section 6, that the relay sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

/// Reads the greeting (VER NMETHODS METHODS) and selects "no authentication".
pub(crate) fn parse_greeting(head: &[u8]) -> Parse {
    let Some(&version) = head.first() else { return Parse::More };
    if version != VERSION {
        // Not a SOCKS5 client: a SOCKS5 answer would mean nothing to it.
        return Parse::Refuse { reply: Vec::new(), reason: format!("not SOCKS5: first byte {version:#04x}") };
    }
    let Some(&count) = head.get(1) else { return Parse::More };
    let consumed = 2 + usize::from(count);
    let Some(methods) = head.get(2..consumed) else { return Parse::More };
    if methods.contains(&NO_AUTHENTICATION) {
        Parse::Answer { consumed, reply: vec![VERSION, NO_AUTHENTICATION] }
    } else {
        Parse::Refuse {
            reply: vec![VERSION, NO_ACCEPTABLE_METHOD],
            reason: format!("the client does not offer \"no authentication\" (methods {methods:02x?})"),
        }
    }
}

/// Reads the request (VER CMD RSV ATYP DST.ADDR DST.PORT).
pub(crate) fn parse_request(head: &[u8]) -> Parse {
    let &[version, command, _reserved, address_type, ref rest @ ..] = head else { return Parse::More };
    if version != VERSION {
        return refuse(Reply::GeneralFailure, format!("request version {version:#04x}, not 5"));
    }
    if command != CONNECT {
        return refuse(Reply::CommandNotSupported, format!("command {command:#04x} is not CONNECT"));
    }
    let address_len = match address_type {
        1 => 4,
        4 => 16,
        3 => match rest.first() {
            None => return Parse::More,
            Some(0) => return refuse(Reply::HostUnreachable, "empty domain name".into()),
            Some(&len) => 1 + usize::from(len),
        },
        other => return refuse(Reply::AddressTypeNotSupported, format!("address type {other:#04x}")),
    };
    let (Some(address), Some(&[port_hi, port_lo])) =
        (rest.get(..address_len), rest.get(address_len..address_len + 2))
    else {
        return Parse::More;
    };
    let host = match (<[u8; 4]>::try_from(address), <[u8; 16]>::try_from(address)) {
        (Ok(v4), _) if address_type == 1 => Host::Ip(v4.into()),
        (_, Ok(v6)) if address_type == 4 => Host::Ip(v6.into()),
        _ => match domain(address.get(1..).unwrap_or_default()) {
            Ok(host) => host,
            Err(reason) => return refuse(Reply::HostUnreachable, reason),
        },
    };
    let port = u16::from_be_bytes([port_hi, port_lo]);
    if port == 0 {
        return refuse(Reply::GeneralFailure, "destination port 0".into());
    }
    Parse::Destination { host, port, consumed: 4 + address_len + 2, send_first: Vec::new() }
}

/// The reply (VER REP RSV ATYP BND.ADDR BND.PORT) that tells a client how
/// its request ended; `bound` is the relay's side of the upstream
/// connection, when there is one.
pub(crate) fn reply(outcome: Outcome, bound: Option<SocketAddr>) -> Vec<u8> {
    let code = match outcome {
        Outcome::Connected => Reply::Succeeded,
        Outcome::NotAllowed => Reply::NotAllowed,
        Outcome::NoSuchName | Outcome::LookupFailed | Outcome::Unreachable | Outcome::TimedOut => {
            Reply::HostUnreachable
        }
        Outcome::Refused => Reply::ConnectionRefused,
        Outcome::Failed => Reply::GeneralFailure,
    };
    build_reply(code, bound)
}

fn build_reply(code: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or_else(|| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let mut reply = vec![VERSION, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            reply.push(1);
            reply.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            reply.push(4);
            reply.extend_from_slice(&ip.octets());
        }
    }
    reply.extend_from_slice(&bound.port().to_be_bytes());
    reply
}

fn refuse(code: Reply, reason: String) -> Parse {
    Parse::Refuse { reply: build_reply(code, None), reason }
}

/// A DOMAINNAME address: `socks5h` clients send IP literals this way too,
/// and `parse_host` only takes IPv6 in brackets.
fn domain(name: &[u8]) -> Result<Host, String> {
    let text = std::str::from_utf8(name).map_err(|_| format!("domain name {name:02x?} is not UTF-8"))?;
    text.parse::<IpAddr>()
        .map(Host::Ip)
        .ok()
        .or_else(|| parse_host(text))
        .ok_or_else(|| format!("bad domain name `{}`", text.escape_debug()))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use proptest::prelude::*;

    use super::*;

    const DOMAIN_REQUEST: &[u8] = b"\x05\x01\x00\x03\x0fapi.example.com\x01\xbb";

    fn refusal_code(parse: Parse) -> u8 {
        match parse {
            Parse::Refuse { reply, .. } => {
                assert_eq!(reply, [5, reply[1], 0, 1, 0, 0, 0, 0, 0, 0]);
                reply[1]
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn greeting_selects_no_authentication() {
        assert_eq!(parse_greeting(&[5, 1, 0]), Parse::Answer { consumed: 3, reply: vec![5, 0] });
        assert_eq!(parse_greeting(&[5, 3, 2, 1, 0, 5, 1]), Parse::Answer { consumed: 5, reply: vec![5, 0] });
    }

    #[test]
    fn greeting_without_no_authentication_is_refused() {
        for greeting in [&[5, 1, 2][..], &[5, 0]] {
            match parse_greeting(greeting) {
                Parse::Refuse { reply, .. } => assert_eq!(reply, [5, 0xFF]),
                other => panic!("{greeting:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn greeting_of_another_protocol_is_refused_silently() {
        assert_eq!(
            parse_greeting(b"CONNECT a:1 HTTP/1.1\r\n"),
            Parse::Refuse { reply: Vec::new(), reason: "not SOCKS5: first byte 0x43".into() }
        );
    }

    #[test]
    fn requests_are_destinations() {
        let v4: &[u8] = &[5, 1, 0, 1, 192, 0, 2, 7, 0x1f, 0x90];
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        v6.extend_from_slice(&[0, 22]);
        let literal: &[u8] = b"\x05\x01\x00\x03\x0b2001:db8::1\x00\x16";
        let cases: [(&[u8], Host, u16); 4] = [
            (v4, Host::Ip([192, 0, 2, 7].into()), 8080),
            (&v6, Host::Ip(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into()), 22),
            (DOMAIN_REQUEST, Host::Name("api.example.com".into()), 443),
            (literal, Host::Ip(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into()), 22),
        ];
        for (request, host, port) in cases {
            let mut head = request.to_vec();
            head.extend_from_slice(b"first payload");
            assert_eq!(
                parse_request(&head),
                Parse::Destination { host, port, consumed: request.len(), send_first: Vec::new() }
            );
        }
    }

    #[test]
    fn unsupported_requests_are_refused_with_their_code() {
        assert_eq!(refusal_code(parse_request(&[5, 2, 0, 1, 192, 0, 2, 7, 0, 80])), 0x07);
        assert_eq!(refusal_code(parse_request(&[5, 1, 0, 9])), 0x08);
        assert_eq!(refusal_code(parse_request(&[4, 1, 0, 1, 192, 0, 2, 7, 0, 80])), 0x01);
        assert_eq!(refusal_code(parse_request(&[5, 1, 0, 1, 192, 0, 2, 7, 0, 0])), 0x01);
        assert_eq!(refusal_code(parse_request(&[5, 1, 0, 3, 0])), 0x04);
        assert_eq!(refusal_code(parse_request(b"\x05\x01\x00\x03\x03a b\x00\x50")), 0x04);
        assert_eq!(refusal_code(parse_request(b"\x05\x01\x00\x03\x02\xc3\x28\x00\x50")), 0x04);
    }

    #[test]
    fn strict_prefixes_want_more() {
        for len in 0..DOMAIN_REQUEST.len() {
            assert_eq!(parse_request(&DOMAIN_REQUEST[..len]), Parse::More, "prefix of {len} bytes");
        }
        let greeting = [5, 2, 2, 0];
        for len in 0..greeting.len() {
            assert_eq!(parse_greeting(&greeting[..len]), Parse::More, "prefix of {len} bytes");
        }
    }

    #[test]
    fn reply_layout() {
        assert_eq!(reply(Outcome::Connected, None), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            reply(Outcome::Connected, Some("192.0.2.7:40000".parse().expect("address"))),
            [5, 0, 0, 1, 192, 0, 2, 7, 0x9c, 0x40]
        );
        let mut v6 = vec![5, 0x05, 0, 4, 0x20, 0x01, 0x0d, 0xb8];
        v6.extend_from_slice(&[0; 11]);
        v6.extend_from_slice(&[1, 0x01, 0xbb]);
        assert_eq!(reply(Outcome::Refused, Some("[2001:db8::1]:443".parse().expect("address"))), v6);
        let codes = [
            (Outcome::NotAllowed, 0x02),
            (Outcome::NoSuchName, 0x04),
            (Outcome::LookupFailed, 0x04),
            (Outcome::Unreachable, 0x04),
            (Outcome::TimedOut, 0x04),
            (Outcome::Refused, 0x05),
            (Outcome::Failed, 0x01),
        ];
        for (outcome, code) in codes {
            assert_eq!(reply(outcome, None), [5, code, 0, 1, 0, 0, 0, 0, 0, 0], "{outcome:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_never_panic(head in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            for parse in [parse_greeting(&head), parse_request(&head)] {
                if let Parse::Destination { consumed, .. } | Parse::Answer { consumed, .. } = parse {
                    prop_assert!(consumed <= head.len());
                }
            }
        }

        #[test]
        fn any_request_after_a_valid_header_never_panics(
            address_type in 0u8..6,
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut head = vec![5, 1, 0, address_type];
            head.extend_from_slice(&rest);
            if let Parse::Destination { consumed, .. } = parse_request(&head) {
                prop_assert!(consumed <= head.len());
            }
        }
    }
}
