//! The sample server's data: AWS's ip-ranges.json, fetched over HTTPS with
//! rustls (through whatever the URL's name resolves to: in an enclave, the
//! forwarder that /etc/hosts points it at), kept for a bounded time, and the
//! S3 prefixes of one region in the reply format of the workshop's server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

/// Where the workshop's server fetches the document.
pub const DEFAULT_URL: &str = "https://ip-ranges.amazonaws.com/ip-ranges.json";

/// The real document is about 2 MB; anything far larger is not it.
const MAX_DOCUMENT_BYTES: u64 = 64 << 20;

/// The part of ip-ranges.json the server reads (the real schema has more).
#[derive(Deserialize)]
struct Document {
    prefixes: Vec<Prefix>,
}

#[derive(Deserialize)]
struct Prefix {
    ip_prefix: String,
    region: String,
    service: String,
}

/// The S3 IPv4 prefixes of every region, in the document's order.
#[derive(Debug, Default)]
pub struct S3Prefixes(HashMap<String, Vec<String>>);

impl S3Prefixes {
    /// Reads an ip-ranges.json document.
    pub fn parse(json: &[u8]) -> Result<S3Prefixes, serde_json::Error> {
        let document: Document = serde_json::from_slice(json)?;
        let mut by_region: HashMap<String, Vec<String>> = HashMap::new();
        for prefix in document.prefixes.into_iter().filter(|p| p.service == "S3") {
            by_region.entry(prefix.region).or_default().push(prefix.ip_prefix);
        }
        Ok(S3Prefixes(by_region))
    }

    /// The prefixes of `region` (none for a region the document lacks).
    pub fn region(&self, region: &str) -> &[String] {
        self.0.get(region).map_or(&[], Vec::as_slice)
    }
}

/// The reply for a list of prefixes, as the workshop's server sends it
/// (Python's `json.dumps` of a list): `["3.5.0.0/19", "52.216.0.0/15"]`.
pub fn reply(prefixes: &[String]) -> String {
    let quoted: Vec<String> =
        prefixes.iter().map(|p| serde_json::Value::from(p.as_str()).to_string()).collect();
    format!("[{}]", quoted.join(", "))
}

/// How the server gets the document.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    pub url: String,
    /// A PEM file of extra roots to trust besides the public (webpki) ones.
    pub ca_file: Option<std::path::PathBuf>,
    /// Give up on one fetch after this long.
    pub timeout: Duration,
    /// Serve a fetched document this long before fetching it again.
    pub cache_for: Duration,
    /// Fetch through this proxy (`http://` CONNECT or `socks5h://`).
    pub proxy: Option<String>,
}

/// The first pause after a failed fetch before the next one; it doubles
/// with each failure in a row, up to [`MAX_RETRY_AFTER_FAILURE`].
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The longest pause between fetches of an endpoint that keeps failing.
pub const MAX_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// The document behind a cache. One client at a time fetches; while it
/// does, the others get the last good copy at once, or, when there is none
/// yet, wait and share its result. A failure is remembered: until its retry
/// time (growing while failures go on), clients get the last good copy, or
/// that failure's error, without a new fetch. So a burst of clients costs
/// one fetch, and a down endpoint one fetch per retry interval.
pub struct Source {
    agent: ureq::Agent,
    settings: SourceSettings,
    state: Mutex<CacheState>,
    /// Signalled when a fetch ends.
    fetched: Condvar,
}

#[derive(Default)]
struct CacheState {
    good: Option<(Instant, Arc<S3Prefixes>)>,
    failure: Option<Failure>,
    fetching: bool,
}

struct Failure {
    error: String,
    at: Instant,
    retry_after: Duration,
}

impl CacheState {
    /// The last good copy, or the last failure's error.
    fn last_good(&self) -> Result<Arc<S3Prefixes>, String> {
        match (&self.good, &self.failure) {
            (Some((_, prefixes)), _) => Ok(Arc::clone(prefixes)),
            (None, Some(failure)) => Err(failure.error.clone()),
            (None, None) => Err("the document has not been fetched yet".into()),
        }
    }
}

impl Source {
    /// Checks the settings (URL scheme, CA file) and builds the HTTPS agent.
    pub fn new(settings: SourceSettings) -> anyhow::Result<Source> {
        let uri: ureq::http::Uri =
            settings.url.parse().with_context(|| format!("bad URL `{}`", settings.url))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            anyhow::bail!("bad URL `{}`: expected https://HOST[:PORT]/PATH", settings.url);
        }
        let roots = match &settings.ca_file {
            None => RootCerts::WebPki,
            Some(path) => RootCerts::Specific(Arc::new(public_roots_and(path)?)),
        };
        // The enclave reaches the world only through the forwarder (or the
        // proxy named here); a proxy variable inherited from a parent shell
        // must not reroute it.
        let proxy = match &settings.proxy {
            None => None,
            Some(url) => Some(ureq::Proxy::new(url).with_context(|| {
                format!("bad --proxy `{url}`: expected http://HOST:PORT or socks5h://HOST:PORT")
            })?),
        };
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .proxy(proxy)
            .build();
        Ok(Source { agent: config.new_agent(), settings, state: Mutex::default(), fetched: Condvar::new() })
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// The prefixes: cached when fresh, else as described at [`Source`].
    pub fn get(&self) -> Result<Arc<S3Prefixes>, String> {
        let asked = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((at, prefixes)) = &state.good {
                if at.elapsed() < self.settings.cache_for {
                    return Ok(Arc::clone(prefixes));
                }
            }
            if let Some(failure) = &state.failure {
                // Failed while this client waited, or too recently to retry.
                if failure.at >= asked || failure.at.elapsed() < failure.retry_after {
                    return state.last_good();
                }
            }
            if !state.fetching {
                break;
            }
            if state.good.is_some() {
                return state.last_good(); // stale, while another client refetches
            }
            state = self.fetched.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.fetching = true;
        drop(state);
        let result = self.fetch();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.fetching = false;
        self.fetched.notify_all();
        match result {
            Ok(prefixes) => {
                let prefixes = Arc::new(prefixes);
                state.good = Some((Instant::now(), Arc::clone(&prefixes)));
                state.failure = None;
                Ok(prefixes)
            }
            Err(error) => {
                let retry_after = state
                    .failure
                    .as_ref()
                    .map_or(RETRY_AFTER_FAILURE, |last| (last.retry_after * 2).min(MAX_RETRY_AFTER_FAILURE));
                match &state.good {
                    Some((at, _)) => tracing::warn!(%error, age_s = at.elapsed().as_secs(),
                        retry_s = retry_after.as_secs(), "refetch failed; serving the last good copy"),
                    None => tracing::warn!(%error, retry_s = retry_after.as_secs(), "fetch failed"),
                }
                state.failure = Some(Failure { error, at: Instant::now(), retry_after });
                state.last_good()
            }
        }
    }

    fn fetch(&self) -> Result<S3Prefixes, String> {
        let url = &self.settings.url;
        let started = Instant::now();
        let body = self
            .agent
            .get(url)
            .call()
            .and_then(|mut response| {
                response.body_mut().with_config().limit(MAX_DOCUMENT_BYTES).read_to_vec()
            })
            .map_err(|e| format!("cannot fetch {url}: {e}{}", hint(&e)))?;
        let prefixes =
            S3Prefixes::parse(&body).map_err(|e| format!("{url} is not an ip-ranges.json document: {e}"))?;
        tracing::info!(%url, bytes = body.len(), ms = started.elapsed().as_millis() as u64, "fetched ip-ranges");
        Ok(prefixes)
    }
}

/// What a fetch error usually means in the workshop's channel, where the
/// URL's name points at the forwarder (the hops' own logs say which failed).
fn hint(error: &ureq::Error) -> &'static str {
    use std::io::ErrorKind;
    match error {
        ureq::Error::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)))
                    if format!("{other:?}").contains("CaUsedAsEndEntity") =>
                {
                    " (the server presents a CA certificate as its own, as `openssl req -x509` makes by default; \
                     --ca-file cannot fix that: give the server a certificate with basicConstraints CA:FALSE, \
                     e.g. `openssl req -x509 -addext basicConstraints=critical,CA:FALSE ...`, or one signed by \
                     the CA given to --ca-file)"
                }
                _ => " (the certificate is not trusted: add its CA with --ca-file)",
            }
        }
        ureq::Error::Io(e) => match e.kind() {
            ErrorKind::ConnectionRefused => {
                " (nothing listens there: is the forwarder running, and the name mapped to it?)"
            }
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => {
                " (the channel closed the connection: check the forwarder and the parent's vsock-proxy)"
            }
            _ => "",
        },
        ureq::Error::HostNotFound => {
            " (map the name in /etc/hosts, as `vsock-relay forward --hosts NAME` does)"
        }
        ureq::Error::Timeout(_) => " (see --fetch-timeout)",
        _ => "",
    }
}

/// The public roots (Mozilla's, from webpki-root-certs) and those of `path`.
fn public_roots_and(path: &Path) -> anyhow::Result<Vec<Certificate<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read --ca-file {}", path.display()))?;
    let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    let public = roots.len();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(cert) = item.with_context(|| format!("bad PEM in {}", path.display()))? {
            roots.push(cert);
        }
    }
    if roots.len() == public {
        anyhow::bail!("no certificate in --ca-file {}", path.display());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = r#"{"syncToken": "1", "createDate": "2026-11-27-00-00-00", "prefixes": [
        {"ip_prefix": "3.5.0.0/19", "region": "us-east-1", "service": "S3", "network_border_group": "us-east-1"},
        {"ip_prefix": "3.4.0.0/24", "region": "us-east-1", "service": "EC2", "network_border_group": "us-east-1"},
        {"ip_prefix": "52.216.0.0/15", "region": "us-east-1", "service": "S3", "network_border_group": "us-east-1"},
        {"ip_prefix": "3.5.64.0/21", "region": "eu-west-1", "service": "S3", "network_border_group": "eu-west-1"}
    ], "ipv6_prefixes": []}"#;

    #[test]
    fn keeps_s3_prefixes_of_the_region_in_order() {
        let prefixes = S3Prefixes::parse(DOCUMENT.as_bytes()).unwrap();
        assert_eq!(reply(prefixes.region("us-east-1")), r#"["3.5.0.0/19", "52.216.0.0/15"]"#);
        assert_eq!(reply(prefixes.region("eu-west-1")), r#"["3.5.64.0/21"]"#);
        assert_eq!(reply(prefixes.region("mars-north-1")), "[]");
    }

    #[test]
    fn a_document_without_prefixes_is_refused() {
        let error = S3Prefixes::parse(br#"{"syncToken": "1"}"#).unwrap_err();
        assert!(error.to_string().contains("missing field `prefixes`"), "{error}");
    }

    #[test]
    fn only_https_urls_are_accepted() {
        let settings = |url: &str| SourceSettings {
            url: url.into(),
            ca_file: None,
            timeout: Duration::from_secs(1),
            cache_for: Duration::from_secs(1),
            proxy: None,
        };
        for bad in ["http://ip-ranges.amazonaws.com/ip-ranges.json", "ip-ranges.json", "https:///x"] {
            assert!(Source::new(settings(bad)).is_err(), "{bad}");
        }
        assert!(Source::new(settings(DEFAULT_URL)).is_ok());
    }
}
