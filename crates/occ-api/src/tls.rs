//! TLS for the gRPC API: the server's certificate and key from files, reloaded when they
//! change (new connections get the new pair; a pair that does not load keeps the old one),
//! and optional client certificates from a CA of the city's, whose subject then names the
//! caller (see [`crate::principal`]).
//!
//! tonic's own TLS cannot reload, so OCC runs the handshakes itself (each in its own task, with
//! a timeout, so a slow client cannot stall the others) and hands tonic finished TLS streams;
//! tonic still records the peer's certificates for every request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the certificate files are looked at.
const RELOAD_POLL: Duration = Duration::from_secs(5);

/// TLS settings of the API.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CAs whose client certificates identify callers; none for no client certificates.
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a client certificate (otherwise callers without one
    /// authenticate with a key).
    pub client_cert_required: bool,
}

/// The crypto OCC uses everywhere (one provider: ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate and key; [`reload`](Self::reload) swaps them for new handshakes.
#[derive(Debug)]
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Identity {
    fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, BoxError> {
        let pair = certified_key(cert, key, &provider)?;
        Ok(Self {
            cert: cert.into(),
            key: key.into(),
            provider,
            current: RwLock::new(Arc::new(pair)),
        })
    }

    fn reload(&self) -> Result<(), BoxError> {
        let pair = certified_key(&self.cert, &self.key, &self.provider)?;
        *self.current.write().expect("certificate lock") = Arc::new(pair);
        Ok(())
    }

    fn files(&self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        (
            std::fs::read(&self.cert).ok(),
            std::fs::read(&self.key).ok(),
        )
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

fn certified_key(cert: &Path, key: &Path, p: &CryptoProvider) -> Result<CertifiedKey, BoxError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", cert.display()).into());
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    // Checks that the key is the certificate's.
    Ok(CertifiedKey::from_der(chain, key, p)?)
}

/// What accepts the API's TLS connections.
#[derive(Clone)]
pub struct Acceptor(TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// A TLS acceptor for `config`, and a task that reloads the certificate until `shutdown`.
pub fn acceptor(config: &TlsConfig, shutdown: CancellationToken) -> Result<Acceptor, BoxError> {
    let provider = provider();
    let identity = Arc::new(Identity::load(&config.cert, &config.key, provider.clone())?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut server = match &config.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                roots.add(c.map_err(|e| format!("{}: {e}", ca.display()))?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.client_cert_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            }
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(identity.clone())
        }
        None => builder
            .with_no_client_auth()
            .with_cert_resolver(identity.clone()),
    };
    // gRPC clients insist on HTTP/2 being negotiated.
    server.alpn_protocols = vec![b"h2".to_vec()];
    tokio::spawn(watch(identity, shutdown));
    Ok(Acceptor(TlsAcceptor::from(Arc::new(server))))
}

/// Reloads the certificate and key when their files change.
async fn watch(identity: Arc<Identity>, shutdown: CancellationToken) {
    let mut last = identity.files();
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELOAD_POLL) => {}
            () = shutdown.cancelled() => return,
        }
        let now = identity.files();
        if now == last {
            continue;
        }
        match identity.reload() {
            Ok(()) => {
                tracing::info!(cert = %identity.cert.display(), "TLS certificate reloaded");
                last = now;
            }
            // A certificate and key written one after the other do not match in between:
            // tried again at the next look.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded; serving the previous one")
            }
        }
    }
}

impl Acceptor {
    /// The server side of a TLS handshake on `tcp`.
    pub fn accept(&self, tcp: TcpStream) -> tokio_rustls::Accept<TcpStream> {
        self.0.accept(tcp)
    }
}

/// The subject common name of the verified client certificate of a request, if any.
pub fn client_subject<B>(req: &http::Request<B>) -> Option<String> {
    let chain = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}
