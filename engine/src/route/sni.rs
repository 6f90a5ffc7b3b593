//! The server name (SNI) of a client's TLS ClientHello: where a client that
//! believes it talks to its server directly wants to go. rustls's
//! `Acceptor` reads the ClientHello (records, fragments and extensions are
//! easy to get subtly wrong by hand); the bytes are only peeked at, and
//! passed on unchanged to the upstream, which terminates TLS.

use std::fmt;

use rustls::server::Acceptor;

use super::{Parse, MAX_HEAD_BYTES};
use crate::endpoint::{parse_host, Host};

/// The ClientHello read so far, across calls with a growing head.
#[derive(Default)]
pub(crate) struct SniPeek {
    acceptor: Acceptor,
    /// How many bytes of the head the acceptor already has.
    fed: usize,
}

impl fmt::Debug for SniPeek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniPeek").field("fed", &self.fed).finish_non_exhaustive()
    }
}

impl SniPeek {
    /// Reads the ClientHello from all the bytes received so far; a server
    /// name is a destination on `port`. Not called again after a
    /// destination or a refusal.
    pub(crate) fn parse(&mut self, head: &[u8], port: u16) -> Parse {
        let mut new = head.get(self.fed..).unwrap_or_default();
        while !new.is_empty() {
            // The acceptor takes what fits its buffer; it stops taking only
            // when it is full, which a ClientHello within a record never is.
            match self.acceptor.read_tls(&mut new) {
                Ok(0) => return refuse("ClientHello too large".into()),
                Ok(taken) => self.fed += taken,
                Err(error) => return refuse(format!("ClientHello too large: {error}")),
            }
        }
        match self.acceptor.accept() {
            Ok(None) if head.len() < MAX_HEAD_BYTES => Parse::More,
            Ok(None) => refuse(format!("ClientHello larger than {MAX_HEAD_BYTES} bytes")),
            Ok(Some(accepted)) => match accepted.client_hello().server_name() {
                None => refuse("the ClientHello has no server name (SNI)".into()),
                Some(name) => match parse_host(name) {
                    Some(host @ Host::Name(_)) => {
                        Parse::Destination { host, port, consumed: 0, send_first: Vec::new() }
                    }
                    _ => refuse(format!("server name `{}` is not a host name", name.escape_debug())),
                },
            },
            Err((error, _alert)) => refuse(format!("not a TLS ClientHello: {error}")),
        }
    }
}

/// The client expects its server's TLS: no answer of ours would make sense
/// to it, so it is only closed.
fn refuse(reason: String) -> Parse {
    Parse::Refuse { reply: Vec::new(), reason }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::sync::{Arc, LazyLock};

    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    type Result<T> = std::result::Result<T, Box<dyn Error>>;

    /// The first flight of a real rustls client to `server`.
    fn client_hello(server: &str) -> Result<Vec<u8>> {
        let config = ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let mut client = ClientConnection::new(Arc::new(config), ServerName::try_from(server)?.to_owned())?;
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello)?;
        }
        Ok(hello)
    }

    static HELLO: LazyLock<Vec<u8>> =
        LazyLock::new(|| client_hello("api.example.com").expect("a ClientHello"));

    fn api_example_com(port: u16) -> Parse {
        Parse::Destination {
            host: Host::Name("api.example.com".into()),
            port,
            consumed: 0,
            send_first: Vec::new(),
        }
    }

    /// The same handshake bytes, re-wrapped in records of 1 to 7 bytes each.
    fn reframed(mut records: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        while let [22, _, _, hi, lo, rest @ ..] = records {
            let (fragment, next) = rest.split_at(usize::from(u16::from_be_bytes([*hi, *lo])));
            payload.extend_from_slice(fragment);
            records = next;
        }
        assert!(records.is_empty(), "only handshake records");
        let (mut out, mut rest, mut size) = (Vec::new(), payload.as_slice(), 0);
        while !rest.is_empty() {
            size = size % 7 + 1;
            let (fragment, next) = rest.split_at(rest.len().min(size));
            out.extend_from_slice(&[22, 3, 1, 0, u8::try_from(fragment.len()).expect("at most 7")]);
            out.extend_from_slice(fragment);
            rest = next;
        }
        out
    }

    #[test]
    fn whole_hello_is_a_destination() {
        assert_eq!(SniPeek::default().parse(&HELLO, 8443), api_example_com(8443));
    }

    #[test]
    fn hello_one_byte_at_a_time() {
        let mut peek = SniPeek::default();
        for len in 1..HELLO.len() {
            assert_eq!(peek.parse(&HELLO[..len], 443), Parse::More, "prefix of {len} bytes");
        }
        assert_eq!(peek.parse(&HELLO, 443), api_example_com(443));
    }

    #[test]
    fn hello_in_many_small_records() {
        let hello = reframed(&HELLO);
        assert!(hello.len() > HELLO.len() + 5 * 40, "{} bytes", hello.len());
        assert_eq!(SniPeek::default().parse(&hello, 443), api_example_com(443));
    }

    #[test]
    fn not_tls_is_refused() {
        match SniPeek::default().parse(b"GET / HTTP/1.1\r\n", 443) {
            Parse::Refuse { reply, reason } => {
                assert!(reply.is_empty());
                assert!(reason.starts_with("not a TLS ClientHello: "), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_without_sni_is_refused() -> Result<()> {
        let hello = client_hello("192.0.2.7")?;
        assert_eq!(
            SniPeek::default().parse(&hello, 443),
            Parse::Refuse { reply: Vec::new(), reason: "the ClientHello has no server name (SNI)".into() }
        );
        Ok(())
    }

    #[test]
    fn hello_over_the_limit_is_refused() {
        // One full record that starts a ClientHello announced as 64 KiB.
        let mut head = vec![22, 3, 1, 0x40, 0x00, 1, 0x00, 0xff, 0xff];
        head.resize(MAX_HEAD_BYTES, 0);
        let mut peek = SniPeek::default();
        assert_eq!(peek.parse(&head[..MAX_HEAD_BYTES - 1], 443), Parse::More);
        assert_eq!(
            peek.parse(&head, 443),
            Parse::Refuse { reply: Vec::new(), reason: "ClientHello larger than 16389 bytes".into() }
        );
    }

    /// Feeds `bytes` in growing prefixes, `chunks` more bytes each call, as
    /// the caller does, until the peek decides.
    fn feed(bytes: &[u8], chunks: &[usize]) -> Parse {
        let mut peek = SniPeek::default();
        let mut len = 0;
        for chunk in chunks.iter().cycle() {
            len = bytes.len().min(len + chunk);
            match peek.parse(&bytes[..len], 443) {
                Parse::More if len < bytes.len() => {}
                decided => return decided,
            }
        }
        Parse::More
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_in_any_chunks_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunks in proptest::collection::vec(1usize..4096, 1..16),
        ) {
            feed(&bytes, &chunks);
        }

        #[test]
        fn damaged_hellos_never_panic(
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            chunks in proptest::collection::vec(1usize..64, 1..16),
        ) {
            let mut hello = HELLO.clone();
            let len = hello.len();
            for (at, byte) in damage {
                hello[at.index(len)] = byte;
            }
            if let Parse::Destination { consumed, .. } = feed(&hello, &chunks) {
                prop_assert_eq!(consumed, 0);
            }
        }
    }
}
