//! A local HTTPS endpoint standing in for ip-ranges.amazonaws.com: one
//! document at one path, a certificate for `localhost` signed by a CA made
//! at start (its PEM is what the server is told to trust). Also used by the
//! tests, which serve documents of their own.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// The path the document is served at, as on the real host.
pub const PATH: &str = "/ip-ranges.json";

/// A running endpoint; stops when dropped.
pub struct HttpsEndpoint {
    local: SocketAddr,
    ca_pem: String,
    requests: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl HttpsEndpoint {
    /// Serves `document` at [`PATH`] on 127.0.0.1 (a free port).
    pub fn start(document: Vec<u8>) -> anyhow::Result<HttpsEndpoint> {
        let names = ["localhost", "ip-ranges.amazonaws.com"].map(String::from).to_vec();
        HttpsEndpoint::serve(SocketAddr::from(([127, 0, 0, 1], 0)), document, certificates(names)?)
    }

    /// Serves `document` at [`PATH`] on `bind`, with a certificate for
    /// `names` (host names, or IP addresses as text).
    pub fn start_at(
        bind: SocketAddr,
        names: Vec<String>,
        document: Vec<u8>,
    ) -> anyhow::Result<HttpsEndpoint> {
        HttpsEndpoint::serve(bind, document, certificates(names)?)
    }

    /// Like [`HttpsEndpoint::start`], with the mistake `openssl req -x509`
    /// invites: one self-signed certificate marked as a CA, presented as the
    /// server's own (its PEM is the "CA" to trust).
    pub fn start_with_a_ca_as_server_certificate(document: Vec<u8>) -> anyhow::Result<HttpsEndpoint> {
        HttpsEndpoint::serve(SocketAddr::from(([127, 0, 0, 1], 0)), document, ca_as_server_certificate()?)
    }

    fn serve(
        bind: SocketAddr,
        document: Vec<u8>,
        (ca_pem, tls): (String, Arc<ServerConfig>),
    ) -> anyhow::Result<HttpsEndpoint> {
        let listener = TcpListener::bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
        let local = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(AtomicBool::new(false));
        let (counter, stop, fail) = (Arc::clone(&requests), Arc::clone(&stopping), Arc::clone(&failing));
        let document: Arc<[u8]> = document.into();
        std::thread::Builder::new().name("https-endpoint".into()).spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (tls, document, counter) =
                    (Arc::clone(&tls), Arc::clone(&document), Arc::clone(&counter));
                let failing = fail.load(Ordering::SeqCst);
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, tls, &document, &counter, failing) {
                        tracing::debug!(error = %e, "https endpoint: connection failed");
                    }
                });
            }
        })?;
        Ok(HttpsEndpoint { local, ca_pem, requests, failing, stopping })
    }

    pub fn address(&self) -> SocketAddr {
        self.local
    }

    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// The PEM of the CA that signed the endpoint's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// From now on, answer every request with 503 (or, with `false`, serve again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Requests answered so far (any path).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HttpsEndpoint {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.local); // wakes the accept loop
    }
}

/// A CA, and a server configuration with a certificate for `names` it signed.
fn certificates(names: Vec<String>) -> anyhow::Result<(String, Arc<ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "vsock-relay demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(names)?.signed_by(&key, &ca)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((ca.pem(), server_config(vec![leaf.der().clone(), ca.der().clone()], key_der)?))
}

/// One HTTP/1.1 exchange: reads the request head, answers (503 when
/// `failing`), closes.
fn ca_as_server_certificate() -> anyhow::Result<(String, Arc<ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((certificate.pem(), server_config(vec![certificate.der().clone()], key_der)?))
}

fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

fn serve(
    stream: TcpStream,
    tls: Arc<ServerConfig>,
    document: &[u8],
    counter: &AtomicU64,
    failing: bool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let connection = ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut tls_stream = StreamOwned::new(connection, stream);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || tls_stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "incomplete request head"));
        }
        head.push(byte[0]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut words = request_line.split_whitespace();
    let (status, body): (&str, &[u8]) = match (words.next(), words.next()) {
        _ if failing => ("503 Service Unavailable", b"try later\n"),
        (Some("GET"), Some(PATH)) => ("200 OK", document),
        _ => ("404 Not Found", b"not found\n"),
    };
    counter.fetch_add(1, Ordering::SeqCst);
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls_stream.write_all(header.as_bytes())?;
    tls_stream.write_all(body)?;
    tls_stream.conn.send_close_notify();
    tls_stream.flush()?;
    tls_stream.sock.shutdown(Shutdown::Write)
}
