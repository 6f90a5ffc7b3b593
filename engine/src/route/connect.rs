//! The head of an HTTP `CONNECT host:port` request (RFC 9110, 9.3.6), as
//! `HTTPS_PROXY=http://...` clients send it, and the replies they expect.
//! `httparse` reads the head, so only the target's authority form is
//! checked here; every refusal is a complete HTTP response, so that the
//! client's user sees why.

use super::{Outcome, Parse, MAX_HEAD_BYTES};
use crate::endpoint::{parse_host, Host};

/// More header fields than a proxy client sends; beyond them, `431`.
const MAX_HEADERS: usize = 64;
/// Enough of a detail to explain a failure, without echoing a whole head.
const MAX_DETAIL_BYTES: usize = 512;

/// A status line's code and text, and the header fields it requires.
struct Status(u16, &'static str, &'static str);

const BAD_REQUEST: Status = Status(400, "Bad Request", "");
const FORBIDDEN: Status = Status(403, "Forbidden", "");
const NOT_CONNECT: Status = Status(405, "Method Not Allowed", "Allow: CONNECT\r\n");
const TOO_LARGE: Status = Status(431, "Request Header Fields Too Large", "");
const BAD_GATEWAY: Status = Status(502, "Bad Gateway", "");
const GATEWAY_TIMEOUT: Status = Status(504, "Gateway Timeout", "");

/// Reads a `CONNECT` head from all the bytes received so far.
pub(crate) fn parse(head: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(head) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD_BYTES => return Parse::More,
        Ok(httparse::Status::Partial) => {
            return refuse(TOO_LARGE, format!("head over {MAX_HEAD_BYTES} bytes"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(TOO_LARGE, format!("more than {MAX_HEADERS} header fields"))
        }
        Err(error) => return refuse(BAD_REQUEST, format!("malformed request head: {error}")),
    };
    let method = request.method.unwrap_or_default();
    if method != "CONNECT" {
        return refuse(NOT_CONNECT, format!("method {method} is not CONNECT"));
    }
    let target = request.path.unwrap_or_default();
    match authority(target) {
        Some((host, port)) => Parse::Destination { host, port, consumed },
        None => refuse(BAD_REQUEST, format!("target `{target}` is not host:port")),
    }
}

/// The response that tells a client how its `CONNECT` ended; `detail`
/// (why it failed) becomes the body of an error.
pub(crate) fn reply(outcome: Outcome, detail: &str) -> Vec<u8> {
    let status = match outcome {
        Outcome::Connected => return b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
        Outcome::NotAllowed => FORBIDDEN,
        Outcome::NoSuchName
        | Outcome::LookupFailed
        | Outcome::Refused
        | Outcome::Unreachable
        | Outcome::Failed => BAD_GATEWAY,
        Outcome::TimedOut => GATEWAY_TIMEOUT,
    };
    error_reply(status, detail)
}

fn refuse(status: Status, reason: String) -> Parse {
    Parse::Refuse { reply: error_reply(status, &reason), reason }
}

/// The connection closes after an error, so the body is delimited by its
/// length; control characters go, so that a detail cannot add header
/// fields or confuse a terminal.
fn error_reply(Status(code, text, fields): Status, detail: &str) -> Vec<u8> {
    let mut body = String::new();
    for c in detail.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if body.len() + c.len_utf8() > MAX_DETAIL_BYTES {
            break;
        }
        body.push(c);
    }
    body.push('\n');
    format!(
        "HTTP/1.1 {code} {text}\r\n{fields}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `host:port` or `[v6]:port` (the authority form), port 1 to 65535. Only
/// digits: `u16::from_str` would also take a sign.
fn authority(target: &str) -> Option<(Host, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port = port.parse::<u16>().ok().filter(|&port| port != 0)?;
    Some((parse_host(host)?, port))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    const HEAD: &[u8] = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\
                          User-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n";

    fn refused(parse: Parse) -> (String, String) {
        match parse {
            Parse::Refuse { reply, reason } => (String::from_utf8(reply).expect("ASCII reply"), reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn valid_head_is_a_destination() {
        assert_eq!(
            parse(HEAD),
            Parse::Destination {
                host: Host::Name("api.example.com".into()),
                port: 443,
                consumed: HEAD.len()
            }
        );
    }

    #[test]
    fn pipelined_bytes_are_not_head() {
        let mut head = HEAD.to_vec();
        head.extend_from_slice(&[22, 3, 1, 0, 200, 1, 0, 0]);
        assert_eq!(
            parse(&head),
            Parse::Destination {
                host: Host::Name("api.example.com".into()),
                port: 443,
                consumed: HEAD.len()
            }
        );
    }

    #[test]
    fn ip_targets_and_names_as_given() {
        let cases: [(&[u8], Host, u16); 3] = [
            (
                b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n",
                Host::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
                8443,
            ),
            (
                b"CONNECT 192.0.2.7:65535 HTTP/1.0\r\n\r\n",
                Host::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
                65535,
            ),
            (b"CONNECT API.Example.COM:1 HTTP/1.1\r\n\r\n", Host::Name("API.Example.COM".into()), 1),
        ];
        for (head, host, port) in cases {
            assert_eq!(parse(head), Parse::Destination { host, port, consumed: head.len() });
        }
    }

    #[test]
    fn get_is_405() {
        let (reply, reason) = refused(parse(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"));
        assert!(reply.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{reply}");
        assert!(reply.contains("\r\nAllow: CONNECT\r\n"), "{reply}");
        assert_eq!(reason, "method GET is not CONNECT");
    }

    #[test]
    fn malformed_heads_are_400() {
        let heads: [&[u8]; 10] = [
            b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03",
            b"CONNECT a.example:443 HTTP/2.0\r\n\r\n",
            b"CONNECT a.example:0 HTTP/1.1\r\n\r\n",
            b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n",
            b"CONNECT a.example:+443 HTTP/1.1\r\n\r\n",
            b"CONNECT a.example HTTP/1.1\r\n\r\n",
            b"CONNECT :443 HTTP/1.1\r\n\r\n",
            b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n",
            b"CONNECT http://a.example:443/ HTTP/1.1\r\n\r\n",
            b"CONNECT user@a.example:443 HTTP/1.1\r\n\r\n",
        ];
        for head in heads {
            let (reply, _) = refused(parse(head));
            assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head:?}: {reply}");
        }
    }

    #[test]
    fn oversized_head_is_431() {
        let mut head = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        head.resize(1 << 20, b'x');
        assert_eq!(parse(&head[..MAX_HEAD_BYTES - 1]), Parse::More);
        for len in [MAX_HEAD_BYTES, head.len()] {
            let (reply, reason) = refused(parse(&head[..len]));
            assert!(reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{reply}");
            assert_eq!(reason, "head over 16389 bytes");
        }
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut head = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let (reply, _) = refused(parse(&head));
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
    }

    #[test]
    fn strict_prefixes_want_more() {
        for len in 0..HEAD.len() {
            assert_eq!(parse(&HEAD[..len]), Parse::More, "prefix of {len} bytes");
        }
    }

    #[test]
    fn replies_for_each_outcome() {
        assert_eq!(reply(Outcome::Connected, "ignored"), b"HTTP/1.1 200 Connection established\r\n\r\n");
        let cases = [
            (Outcome::NotAllowed, "403 Forbidden"),
            (Outcome::NoSuchName, "502 Bad Gateway"),
            (Outcome::LookupFailed, "502 Bad Gateway"),
            (Outcome::Refused, "502 Bad Gateway"),
            (Outcome::Unreachable, "502 Bad Gateway"),
            (Outcome::Failed, "502 Bad Gateway"),
            (Outcome::TimedOut, "504 Gateway Timeout"),
        ];
        for (outcome, status) in cases {
            let reply = String::from_utf8(reply(outcome, "why")).expect("ASCII reply");
            assert!(reply.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{outcome:?}: {reply}");
        }
        assert_eq!(
            reply(Outcome::TimedOut, "no answer"),
            b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 10\r\nConnection: close\r\n\r\nno answer\n"
        );
    }

    #[test]
    fn detail_cannot_add_fields_and_is_bounded() {
        let reply = reply(Outcome::NotAllowed, "a.example\r\nSet-Cookie: x=1\t\u{85}");
        assert!(reply.ends_with(b"\r\n\r\na.example  Set-Cookie: x=1  \n"), "{reply:?}");
        let long = reply_body(&"é".repeat(400));
        assert_eq!(long, format!("{}\n", "é".repeat(256)));
        assert_eq!(reply_body(&format!("x{}", "é".repeat(400))), format!("x{}\n", "é".repeat(255)));
    }

    fn reply_body(detail: &str) -> String {
        let reply = String::from_utf8(reply(Outcome::Failed, detail)).expect("UTF-8 reply");
        let (head, body) = reply.split_once("\r\n\r\n").expect("a blank line");
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
        body.to_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_never_panic(head in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            if let Parse::Destination { consumed, .. } | Parse::Answer { consumed, .. } = parse(&head) {
                prop_assert!(consumed <= head.len());
            }
        }

        #[test]
        fn any_target_never_panics(
            target in "[ -~]{0,80}",
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
            head.extend_from_slice(&tail);
            if let Parse::Destination { consumed, .. } = parse(&head) {
                prop_assert!(consumed <= head.len() - tail.len());
            }
        }
    }
}
