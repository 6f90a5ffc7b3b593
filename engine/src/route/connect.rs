//! The head of an HTTP proxy request, as `HTTPS_PROXY=http://...` and
//! `HTTP_PROXY=http://...` clients send it, and the replies they expect.
//! Two forms are served (RFC 9112, 3.2): `CONNECT host:port` (authority
//! form, RFC 9110 9.3.6), answered `200` and then a tunnel; and any other
//! method with an `http://` URL (absolute form: what curl, pip and apt send
//! for `http://` URLs), whose head is rewritten to origin form for the
//! upstream (`GET /path?q HTTP/1.1`, `Host` from the URL, the `Proxy-*`
//! fields dropped) and whose answer is the upstream's response.
//!
//! An absolute-form request goes upstream with `Connection: close` (any
//! `Connection` and `Keep-Alive` field replaced): the upstream ends the
//! exchange after one response, so a keep-alive client's next request,
//! which may name another host, comes on a new connection and is checked
//! against the allowlist again. The head is all this proxy reads; the body
//! and anything pipelined pass on unchanged, to the same checked upstream,
//! which closes after its first response (RFC 9112, 9.6).
//!
//! `httparse` reads the head, so only the target's form is checked here;
//! every refusal is a complete HTTP response, so that the client's user
//! sees why.

use super::{Outcome, Parse, MAX_HEAD_BYTES};
use crate::endpoint::{parse_host, Host};

/// More header fields than a proxy client sends; beyond them, `431`.
const MAX_HEADERS: usize = 64;
/// Enough of a detail to explain a failure, without echoing a whole head.
const MAX_DETAIL_BYTES: usize = 512;
/// The port of an `http://` URL that names none.
const HTTP_PORT: u16 = 80;
/// Fields of the client's request that are not sent upstream, besides
/// every `Proxy-*` field (for this proxy: `Proxy-Connection`,
/// `Proxy-Authorization`): those replaced (`Host` comes from the URL, as
/// RFC 9112 3.2.2 says; `Connection: close` is sent), and `Keep-Alive`,
/// which only means something beside a persistent connection.
const DROPPED_FIELDS: [&str; 3] = ["host", "connection", "keep-alive"];

/// A status line's code and text, and the header fields it requires.
struct Status(u16, &'static str, &'static str);

const BAD_REQUEST: Status = Status(400, "Bad Request", "");
const FORBIDDEN: Status = Status(403, "Forbidden", "");
const TOO_LARGE: Status = Status(431, "Request Header Fields Too Large", "");
const BAD_GATEWAY: Status = Status(502, "Bad Gateway", "");
const GATEWAY_TIMEOUT: Status = Status(504, "Gateway Timeout", "");

/// Reads a proxy request's head from all the bytes received so far.
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
    let target = request.path.unwrap_or_default();
    if method == "CONNECT" {
        return match authority(target) {
            Some((host, port)) => Parse::Destination { host, port, consumed, send_first: Vec::new() },
            None => refuse(BAD_REQUEST, format!("target `{target}` is not host:port")),
        };
    }
    match absolute(target) {
        Ok(url) => {
            let send_first = origin_form(method, &url, request.version.unwrap_or(1), request.headers);
            Parse::Destination { host: url.host, port: url.port, consumed, send_first }
        }
        Err(reason) => refuse(BAD_REQUEST, reason),
    }
}

/// The response that tells a client how its request ended; `detail` (why
/// it failed) becomes the body of an error. `Connected` is the `CONNECT`
/// answer (an absolute-form request gets the upstream's response instead).
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

/// `host:port` or `[v6]:port` (the authority form), port 1 to 65535.
fn authority(target: &str) -> Option<(Host, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    Some((parse_host(host)?, port_number(port)?))
}

/// A port of 1 to 65535, only digits: `u16::from_str` would also take a sign.
fn port_number(port: &str) -> Option<u16> {
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|&port| port != 0)
}

/// An `http://` URL in absolute form, taken apart.
#[derive(Debug)]
struct Url<'a> {
    host: Host,
    port: u16,
    /// The authority as the client wrote it (`host[:port]`): the upstream's
    /// `Host` field.
    authority: &'a str,
    /// The path and query as written (may be empty: `/` is sent).
    path: &'a str,
}

/// `http://host[:port][/path][?query]`; `Err` says why not, for a `400`.
fn absolute(target: &str) -> Result<Url<'_>, String> {
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(format!(
            "target `{target}` is not an http:// URL: this proxy serves CONNECT host:port and \
             requests for http://host/path"
        ));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "`{target}`: an https:// URL is not sent to a proxy in absolute form; \
             clients open a CONNECT tunnel for it (HTTPS_PROXY), so that TLS stays end to end"
        ));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("`{target}`: the scheme `{scheme}` is not http"));
    }
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if path.contains('#') {
        return Err(format!("`{target}`: a fragment (#) is not part of a request target"));
    }
    if authority.contains('@') {
        return Err(format!("`{target}`: user information (user@) in the URL is refused"));
    }
    // A colon after the last `]` starts the port; an empty port is the default.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port),
        _ => (authority, ""),
    };
    if host.is_empty() {
        return Err(format!("`{target}`: the URL names no host"));
    }
    let Some(host) = parse_host(host) else {
        return Err(format!("`{target}`: the host is not a name or an address"));
    };
    let port = match port {
        "" => HTTP_PORT,
        port => port_number(port).ok_or_else(|| format!("`{target}`: the port is not 1 to 65535"))?,
    };
    Ok(Url { host, port, authority, path })
}

/// The request's head as the upstream gets it: the request line in origin
/// form, `Host` from the URL, the client's fields in their order but the
/// `Proxy-*` ones and [`DROPPED_FIELDS`], and `Connection: close`.
fn origin_form(method: &str, url: &Url<'_>, version: u8, fields: &[httparse::Header<'_>]) -> Vec<u8> {
    let slash = if url.path.starts_with('/') { "" } else { "/" };
    let mut head =
        format!("{method} {slash}{} HTTP/1.{version}\r\nHost: {}\r\n", url.path, url.authority).into_bytes();
    for field in fields {
        let proxy = field.name.get(..6).is_some_and(|prefix| prefix.eq_ignore_ascii_case("proxy-"));
        if proxy || DROPPED_FIELDS.iter().any(|dropped| field.name.eq_ignore_ascii_case(dropped)) {
            continue;
        }
        head.extend_from_slice(field.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(field.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    head
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::route::{Head, RouteKind};

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
                consumed: HEAD.len(),
                send_first: Vec::new()
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
                consumed: HEAD.len(),
                send_first: Vec::new()
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
            assert_eq!(
                parse(head),
                Parse::Destination { host, port, consumed: head.len(), send_first: vec![] }
            );
        }
    }

    /// What an absolute-form head parses to: (host, port, consumed, the
    /// head sent upstream as text).
    fn forwarded(head: &[u8]) -> (Host, u16, usize, String) {
        match parse(head) {
            Parse::Destination { host, port, consumed, send_first } => {
                (host, port, consumed, String::from_utf8(send_first).expect("ASCII head"))
            }
            other => panic!("expected a destination, got {other:?}"),
        }
    }

    #[test]
    fn absolute_form_is_rewritten_to_origin_form_byte_for_byte() {
        let head = b"GET http://api.example.com:8080/v1/items?id=7&x=%20 HTTP/1.1\r\n\
                     Host: api.example.com:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\
                     Proxy-Connection: Keep-Alive\r\n\r\n";
        assert_eq!(
            forwarded(head),
            (
                Host::Name("api.example.com".into()),
                8080,
                head.len(),
                "GET /v1/items?id=7&x=%20 HTTP/1.1\r\nHost: api.example.com:8080\r\n\
                 User-Agent: curl/8.5.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                    .into()
            )
        );
    }

    #[test]
    fn absolute_form_defaults_to_port_80_and_path_slash() {
        let cases: [(&[u8], Host, u16, &str); 5] = [
            (
                b"GET http://a.example HTTP/1.1\r\n\r\n",
                Host::Name("a.example".into()),
                80,
                "GET / HTTP/1.1\r\nHost: a.example\r\n",
            ),
            (
                b"HEAD HTTP://A.example:/ HTTP/1.0\r\n\r\n",
                Host::Name("A.example".into()),
                80,
                "HEAD / HTTP/1.0\r\nHost: A.example:\r\n",
            ),
            (
                b"GET http://a.example?q=1 HTTP/1.1\r\n\r\n",
                Host::Name("a.example".into()),
                80,
                "GET /?q=1 HTTP/1.1\r\nHost: a.example\r\n",
            ),
            (
                b"DELETE http://[2001:db8::1]/x HTTP/1.1\r\n\r\n",
                Host::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
                80,
                "DELETE /x HTTP/1.1\r\nHost: [2001:db8::1]\r\n",
            ),
            (
                b"OPTIONS http://192.0.2.7:65535/ HTTP/1.1\r\n\r\n",
                Host::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
                65535,
                "OPTIONS / HTTP/1.1\r\nHost: 192.0.2.7:65535\r\n",
            ),
        ];
        for (head, host, port, start) in cases {
            let sent = format!("{start}Connection: close\r\n\r\n");
            assert_eq!(forwarded(head), (host, port, head.len(), sent), "{head:?}");
        }
    }

    #[test]
    fn host_comes_from_the_url_and_proxy_fields_are_dropped() {
        // A Host naming another site would reach it at the checked address
        // (RFC 9112, 3.2.2: the proxy replaces it); every Connection,
        // Keep-Alive and Proxy-* field goes, whatever its case.
        let head = b"POST http://a.example/up HTTP/1.1\r\nhost: other.example\r\n\
                     Proxy-Authorization: Basic dXNlcjpwYXNz\r\nX-A: 1\r\nCONNECTION: keep-alive, Upgrade\r\n\
                     Keep-Alive: timeout=5\r\nproxy-connection: keep-alive\r\nHost: third.example\r\n\
                     Upgrade: websocket\r\nX-B: \xe9t\xe9\r\n\r\n";
        let Parse::Destination { send_first, .. } = parse(head) else { panic!("not a destination") };
        assert_eq!(
            send_first,
            b"POST /up HTTP/1.1\r\nHost: a.example\r\nX-A: 1\r\nUpgrade: websocket\r\n\
              X-B: \xe9t\xe9\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_body_and_pipelined_bytes_after_the_head_are_not_head() {
        let head = b"PUT http://a.example/f HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        let mut sent = head.to_vec();
        sent.extend_from_slice(b"hello GET http://b.example/ HTTP/1.1\r\n\r\n");
        let (host, port, consumed, upstream) = forwarded(&sent);
        assert_eq!((host, port, consumed), (Host::Name("a.example".into()), 80, head.len()));
        assert_eq!(
            upstream,
            "PUT /f HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_refusals_are_400_with_the_reason() {
        let cases: [(&[u8], &str); 10] = [
            (b"GET https://a.example/ HTTP/1.1\r\n\r\n", "clients open a CONNECT tunnel for it"),
            (b"GET HTTPS://a.example:443/ HTTP/1.1\r\n\r\n", "an https:// URL is not sent"),
            (b"GET ftp://a.example/ HTTP/1.1\r\n\r\n", "the scheme `ftp` is not http"),
            (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "is not an http:// URL"),
            (b"GET a.example:80 HTTP/1.1\r\n\r\n", "is not an http:// URL"),
            (b"GET http:///x HTTP/1.1\r\n\r\n", "the URL names no host"),
            (b"GET http://:80/x HTTP/1.1\r\n\r\n", "the URL names no host"),
            (
                b"GET http://user:pw@a.example/ HTTP/1.1\r\n\r\n",
                "user information (user@) in the URL is refused",
            ),
            (b"GET http://a.example:0/ HTTP/1.1\r\n\r\n", "the port is not 1 to 65535"),
            (b"GET http://a.example/#top HTTP/1.1\r\n\r\n", "a fragment (#)"),
        ];
        for (head, why) in cases {
            let (reply, reason) = refused(parse(head));
            assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head:?}: {reply}");
            assert!(reason.contains(why), "{head:?}: {reason}");
            assert!(reply.ends_with(&format!("\r\n\r\n{reason}\n")), "{head:?}: {reply}");
        }
    }

    #[test]
    fn an_absolute_form_client_is_answered_by_the_upstream_and_refused_as_connect_is() {
        let mut head = Head::new(RouteKind::Connect);
        head.bytes = b"GET http://a.example/ HTTP/1.1\r\n\r\n".to_vec();
        assert!(matches!(head.parse(), Parse::Destination { port: 80, .. }));
        assert_eq!(head.reply(Outcome::Connected, "", None), b"");
        assert_eq!(head.reply(Outcome::NotAllowed, "why", None), reply(Outcome::NotAllowed, "why"));
        assert_eq!(head.reply(Outcome::TimedOut, "why", None), reply(Outcome::TimedOut, "why"));
        head.bytes = HEAD.to_vec();
        assert!(matches!(head.parse(), Parse::Destination { port: 443, .. }));
        assert_eq!(head.reply(Outcome::Connected, "", None), reply(Outcome::Connected, ""));
    }

    #[test]
    fn malformed_heads_are_400() {
        let heads: [&[u8]; 14] = [
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
            b"GET http://a.example:+80/ HTTP/1.1\r\n\r\n",
            b"GET http://a.example:65536/ HTTP/1.1\r\n\r\n",
            b"GET http://2001:db8::1/ HTTP/1.1\r\n\r\n",
            b"GET http://a..example/ HTTP/1.1\r\n\r\n",
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

        #[test]
        fn any_absolute_url_never_panics_and_goes_upstream_as_one_well_formed_head(
            method in "[A-Z]{1,8}",
            url in "[ -~]{0,80}",
            fields in proptest::collection::vec(("(?i)(host|connection|proxy-[a-z]{1,13}|x-[a-z]{1,4})", "[ -~]{0,20}"), 0..6),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut head = format!("{method} http://{url} HTTP/1.1\r\n");
            for (name, value) in &fields {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            let mut head = format!("{head}\r\n").into_bytes();
            head.extend_from_slice(&tail);
            if let Parse::Destination { consumed, send_first, .. } = parse(&head) {
                prop_assert!(consumed <= head.len() - tail.len());
                let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                let mut request = httparse::Request::new(&mut parsed);
                prop_assert_eq!(request.parse(&send_first), Ok(httparse::Status::Complete(send_first.len())));
                prop_assert_eq!(request.method, Some(method.as_str()));
                prop_assert!(request.path.is_some_and(|path| path.starts_with('/')));
                let named = |name: &str| request.headers.iter().filter(|f| f.name.eq_ignore_ascii_case(name)).count();
                prop_assert_eq!((named("host"), named("connection")), (1, 1));
                prop_assert!(!request.headers.iter().any(|f| f.name.to_ascii_lowercase().starts_with("proxy-")));
            }
        }
    }
}
