//! Bearer tokens from the city's identity provider (Keycloak and the like): RS256 or ES256
//! JWTs, their keys from a JWKS (a file or a URL, reloaded periodically and when a token names
//! a key not seen yet), with issuer, audience, expiry and not-before checked. Roles, queues and
//! agencies come from claims named in the configuration (`realm_access.roles` reaches into
//! Keycloak's nested claim); role names OCC does not know are ignored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where the signing keys are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

impl JwksSource {
    pub fn parse(s: &str) -> JwksSource {
        if s.starts_with("http://") || s.starts_with("https://") {
            JwksSource::Url(s.to_owned())
        } else {
            JwksSource::File(PathBuf::from(s))
        }
    }
}

/// How tokens are checked and read.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    /// How often the JWKS is read again.
    pub refresh: Duration,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway: u64,
    /// Dotted paths of the claims: the caller's name, roles, queues and agencies.
    pub subject_claim: String,
    pub roles_claim: String,
    pub queues_claim: String,
    pub agencies_claim: String,
}

/// What a valid token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub roles: Vec<String>,
    pub queues: Vec<String>,
    pub agencies: Vec<String>,
    /// When it expires (seconds since the epoch).
    pub expires: u64,
}

/// Why a token was refused (said to the caller as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    Signature,
    UnknownKey,
    Malformed,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Expired => "the token has expired",
            Refused::NotYetValid => "the token is not valid yet",
            Refused::Issuer => "the token is from another issuer",
            Refused::Audience => "the token is for another audience",
            Refused::Signature => "the token's signature does not verify",
            Refused::UnknownKey => {
                "the token is signed by a key the identity provider does not publish"
            }
            Refused::Malformed => "the token is not a valid JWT",
        }
    }
}

impl From<jsonwebtoken::errors::Error> for Refused {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => Refused::Expired,
            ErrorKind::ImmatureSignature => Refused::NotYetValid,
            ErrorKind::InvalidIssuer => Refused::Issuer,
            ErrorKind::InvalidAudience => Refused::Audience,
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidKeyFormat => Refused::Signature,
            _ => Refused::Malformed,
        }
    }
}

/// Signing keys by key id, each pinned to its algorithm.
#[derive(Default)]
struct Keys(HashMap<String, (DecodingKey, Algorithm)>);

impl Keys {
    fn parse(json: &[u8]) -> Result<Keys, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            // Identity providers publish encryption keys beside the signing keys.
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256) | None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256) | None, AlgorithmParameters::EllipticCurve(p))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, (key, alg));
            }
        }
        if keys.is_empty() {
            return Err("the JWKS has no RS256 or ES256 signing key".into());
        }
        Ok(Keys(keys))
    }
}

/// Checks tokens against the identity provider's current keys.
pub struct Jwt {
    config: JwtConfig,
    keys: RwLock<Arc<Keys>>,
    reload: Notify,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

fn http_client() -> Result<Client<Https, Empty<Bytes>>, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

async fn fetch(source: &JwksSource, client: &Client<Https, Empty<Bytes>>) -> Result<Keys, String> {
    let bytes = match source {
        JwksSource::File(path) => {
            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        JwksSource::Url(url) => {
            let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
            let request = hyper::Request::get(uri)
                .header(hyper::header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let get = async {
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("{url}: {}", response.status()));
                }
                Limited::new(response.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .map_err(|e| format!("{url}: {e}"))
            };
            tokio::time::timeout(Duration::from_secs(10), get)
                .await
                .map_err(|_| format!("{url}: no answer within 10 s"))??
        }
    };
    Keys::parse(&bytes)
}

impl Jwt {
    /// Reads the keys once (a JWKS that cannot be read stops the start), then keeps them
    /// fresh until `shutdown`.
    pub async fn start(config: JwtConfig, shutdown: CancellationToken) -> Result<Arc<Jwt>, String> {
        // One process-wide choice of jsonwebtoken's cryptography.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        let client = http_client()?;
        let keys = fetch(&config.jwks, &client).await?;
        let jwt = Arc::new(Jwt {
            config,
            keys: RwLock::new(Arc::new(keys)),
            reload: Notify::new(),
        });
        tokio::spawn(refresh(jwt.clone(), client, shutdown));
        Ok(jwt)
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, Refused> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Malformed)?;
        let kid = header.kid.as_deref().ok_or(Refused::UnknownKey)?;
        let keys = self.keys.read().expect("JWKS lock").clone();
        let Some((key, alg)) = keys.0.get(kid) else {
            // Perhaps rotated in since the last read.
            self.reload.notify_one();
            return Err(Refused::UnknownKey);
        };
        // The algorithm is the key's, never the token's choice.
        if header.alg != *alg {
            return Err(Refused::Signature);
        }
        let mut validation = Validation::new(*alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Value>(token, key, &validation)?.claims;
        let subject = strings_at(&claims, &self.config.subject_claim)
            .into_iter()
            .next()
            .or_else(|| claims.get("sub").and_then(Value::as_str).map(str::to_owned))
            .ok_or(Refused::Malformed)?;
        Ok(Claims {
            subject,
            roles: strings_at(&claims, &self.config.roles_claim),
            queues: strings_at(&claims, &self.config.queues_claim),
            agencies: strings_at(&claims, &self.config.agencies_claim),
            expires: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// Reloads the keys every `refresh`, or soon after a token named an unknown key (at most
/// every 10 s); a failed reload keeps the keys in hand.
async fn refresh(jwt: Arc<Jwt>, client: Client<Https, Empty<Bytes>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(jwt.config.refresh) => {}
            () = jwt.reload.notified() => {}
            () = shutdown.cancelled() => return,
        }
        match fetch(&jwt.config.jwks, &client).await {
            Ok(keys) => *jwt.keys.write().expect("JWKS lock") = Arc::new(keys),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the identity provider's keys; keeping the last ones")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The strings at a dotted path: an array of strings, or one space-separated string.
fn strings_at(claims: &Value, path: &str) -> Vec<String> {
    let mut at = claims;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        match at.get(segment) {
            Some(v) => at = v,
            None => return Vec::new(),
        }
    }
    match at {
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_at_dotted_paths() {
        let claims = serde_json::json!({
            "realm_access": {"roles": ["dispatcher", "offline_access"]},
            "scope": "openid profile",
            "occ_queues": ["police"],
        });
        assert_eq!(
            strings_at(&claims, "realm_access.roles"),
            ["dispatcher", "offline_access"]
        );
        assert_eq!(strings_at(&claims, "scope"), ["openid", "profile"]);
        assert!(strings_at(&claims, "resource_access.occ.roles").is_empty());
    }
}
