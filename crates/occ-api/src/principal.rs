//! Who is calling, and whether it may call this method: one layer in front of every service.
//!
//! The layer authenticates the caller (an API key as `authorization: Bearer occ_…`, or a
//! client certificate verified by the TLS handshake that a key stands for), looks the
//! method up in [`crate::policy`], and either answers `UNAUTHENTICATED` / `PERMISSION_DENIED`
//! itself or passes the request on with the caller's [`Principal`] in its extensions. Handlers
//! then decide only about data (an incident outside the caller's scope is `NOT_FOUND`).
//!
//! Keys are cached for a short time ([`AuthConfig::cache_for`]), so a revoked or expired key
//! is refused on every instance within that time, without a database round trip per call.
//!
//! Without authentication (`occ serve --insecure`), every caller has every right; a console
//! may then name its operator in the `x-occ-operator` header (`operator:<name>` in audit
//! entries and claims). That name is not a credential.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use occ_domain::access::Principal;
use occ_domain::access::{Role, Roles, Scope};
use occ_store::PgPool;
use occ_store::keys::{self, KeyInfo};
use tonic::{Request, Status};

use crate::jwt::Jwt;
use crate::policy::{self, Access};

/// The header a console names its operator in when OCC runs without authentication.
pub const OPERATOR_HEADER: &str = "x-occ-operator";

/// Most keys (valid or not) remembered at once; past it the cache starts afresh.
const CACHE_ENTRIES: usize = 10_000;

/// The principal of a request. A request the layer did not pass has none, and may do nothing.
pub fn of<T>(request: &Request<T>) -> Principal {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_else(nobody)
}

fn nobody() -> Principal {
    Principal {
        subject: "unauthenticated".into(),
        roles: Roles::NONE,
        scope: Scope::default(),
        sources: Vec::new(),
        may_update_status: false,
    }
}

/// The operator a console names without authentication, if the name is acceptable: 1 to 64
/// characters of `[A-Za-z0-9._@-]`.
pub fn operator(name: &str) -> Option<Principal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    ok.then(|| Principal::unrestricted(format!("operator:{name}")))
}

/// Who may reach server reflection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflection {
    /// Anyone (it describes the API, not its data).
    Public,
    /// Any authenticated caller.
    Authenticated,
    /// Nobody.
    Off,
}

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// No authentication: every caller may do everything.
    pub insecure: bool,
    pub reflection: Reflection,
    /// How long a key's validity (and the queues' agencies) are remembered.
    pub cache_for: Duration,
    /// Tokens from the city's identity provider, if configured.
    pub jwt: Option<Arc<Jwt>>,
    /// Calls per second each principal may make on average (0: no limit), and how many it
    /// may make at once above that.
    pub rate_per_second: f64,
    pub rate_burst: f64,
    /// Watch streams each principal may hold open at once.
    pub max_streams: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            reflection: Reflection::Authenticated,
            cache_for: Duration::from_secs(2),
            jwt: None,
            rate_per_second: 100.0,
            rate_burst: 200.0,
            max_streams: 16,
        }
    }
}

/// Why a caller was turned away.
#[derive(Debug)]
enum Refusal {
    Unauthenticated(&'static str),
    Unavailable,
}

#[derive(Debug)]
struct Cached<T> {
    at: Instant,
    value: T,
}

/// A principal's token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Authenticates callers, and keeps each within its rate and stream limits; shared by every
/// connection.
#[derive(Debug)]
pub struct Authenticator {
    pool: PgPool,
    config: AuthConfig,
    keys: Mutex<HashMap<[u8; 32], Cached<Option<Principal>>>>,
    queues: Mutex<Option<Cached<QueueAgencies>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open watch stream of a principal; dropping it frees the place.
#[derive(Debug)]
pub struct StreamPermit {
    subject: String,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().expect("stream counts");
        if let Some(n) = streams.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.subject);
            }
        }
    }
}

/// Where each queue belongs: `queue → agency`.
type QueueAgencies = Arc<BTreeMap<String, String>>;

impl Authenticator {
    pub fn new(pool: PgPool, config: AuthConfig) -> Arc<Self> {
        Arc::new(Self {
            pool,
            config,
            keys: Mutex::new(HashMap::new()),
            queues: Mutex::new(None),
            buckets: Mutex::new(HashMap::new()),
            streams: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Takes one call from `subject`'s bucket; when it is empty, how long until it is not.
    fn admit(&self, subject: &str) -> Result<(), Duration> {
        let rate = self.config.rate_per_second;
        if self.config.insecure || rate <= 0.0 {
            return Ok(());
        }
        let burst = self.config.rate_burst.max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets");
        if buckets.len() >= CACHE_ENTRIES && !buckets.contains_key(subject) {
            // Buckets full again after a second are as good as new.
            buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(subject.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// A place for one more watch stream of `who`, if it has one left.
    pub fn stream_permit(&self, who: &Principal) -> Result<Option<StreamPermit>, Status> {
        if self.config.insecure {
            return Ok(None);
        }
        let mut streams = self.streams.lock().expect("stream counts");
        let open = streams.entry(who.subject.clone()).or_insert(0);
        if *open >= self.config.max_streams {
            tracing::warn!(subject = %who.subject, open = *open, "watch stream refused: too many open");
            metrics::counter!("occ_grpc_denied_total", "method" => "watch", "code" => "ResourceExhausted").increment(1);
            return Err(Status::resource_exhausted(format!(
                "{} has {} watch streams open, the most allowed; close one first",
                who.subject, *open
            )));
        }
        *open += 1;
        Ok(Some(StreamPermit {
            subject: who.subject.clone(),
            streams: self.streams.clone(),
        }))
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The caller: by its key if it sends one, else by its verified client certificate.
    async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        certificate: Option<String>,
    ) -> Result<Principal, Refusal> {
        if self.config.insecure {
            return Ok(headers
                .get(OPERATOR_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(operator)
                .unwrap_or_else(|| Principal::unrestricted("anonymous")));
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return match certificate {
                Some(subject) => self
                    .certificate(&subject)
                    .await?
                    .ok_or(Refusal::Unauthenticated(
                        "no valid key stands for this client certificate",
                    )),
                None => Err(Refusal::Unauthenticated(
                    "no credentials: send `authorization: Bearer <key>`",
                )),
            };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Refusal::Unauthenticated(
                "the authorization header must be `Bearer <key>`",
            ))?;
        if !token.starts_with(keys::KEY_PREFIX) {
            return match &self.config.jwt {
                Some(jwt) => self.token(jwt, token).await,
                None => Err(Refusal::Unauthenticated("not an OCC key")),
            };
        }
        self.key(token)
            .await?
            .ok_or(Refusal::Unauthenticated("unknown, expired or revoked key"))
    }

    /// The principal of a valid token from the identity provider: `user:<name>`, with the
    /// roles OCC knows among its roles.
    async fn token(&self, jwt: &Jwt, token: &str) -> Result<Principal, Refusal> {
        let digest = keys::digest(token);
        if let Some(hit) = self.keys.lock().expect("key cache").get(&digest)
            && hit.at.elapsed() < self.config.cache_for
            && let Some(p) = &hit.value
        {
            return Ok(p.clone());
        }
        let claims = jwt
            .verify(token)
            .map_err(|r| Refusal::Unauthenticated(r.reason()))?;
        let queues = match self.cached_queue_agencies() {
            Some(q) => q,
            None => {
                let mut conn = occ_store::acquire(&self.pool)
                    .await
                    .map_err(|_| Refusal::Unavailable)?;
                self.queue_agencies(&mut conn).await?
            }
        };
        let principal = Principal {
            subject: format!("user:{}", claims.subject),
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            scope: Scope::resolve(&claims.queues, &claims.agencies, &queues),
            sources: Vec::new(),
            may_update_status: false,
        };
        // Remembered no longer than the token is valid.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims.expires > now + self.config.cache_for.as_secs() {
            self.remember(digest, Some(principal.clone()));
        }
        Ok(principal)
    }

    fn remember(&self, digest: [u8; 32], principal: Option<Principal>) {
        let mut cache = self.keys.lock().expect("key cache");
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(
            digest,
            Cached {
                at: Instant::now(),
                value: principal,
            },
        );
    }

    fn cached_queue_agencies(&self) -> Option<QueueAgencies> {
        self.queues
            .lock()
            .expect("queue cache")
            .as_ref()
            .filter(|hit| hit.at.elapsed() < self.config.cache_for)
            .map(|hit| hit.value.clone())
    }

    /// The principal of a key, from the cache while it is fresh.
    async fn key(&self, secret: &str) -> Result<Option<Principal>, Refusal> {
        self.cached(keys::digest(secret), async |conn| {
            keys::authenticate(conn, secret).await
        })
        .await
    }

    /// The principal of a client certificate's subject, from the cache while it is fresh.
    async fn certificate(&self, subject: &str) -> Result<Option<Principal>, Refusal> {
        self.cached(keys::digest(&format!("cert\0{subject}")), async |conn| {
            keys::authenticate_certificate(conn, subject).await
        })
        .await
    }

    async fn cached(
        &self,
        digest: [u8; 32],
        lookup: impl AsyncFnOnce(&mut occ_store::PgConnection) -> occ_store::Result<Option<KeyInfo>>,
    ) -> Result<Option<Principal>, Refusal> {
        if let Some(hit) = self.keys.lock().expect("key cache").get(&digest)
            && hit.at.elapsed() < self.config.cache_for
        {
            return Ok(hit.value.clone());
        }
        let mut conn = occ_store::acquire(&self.pool)
            .await
            .map_err(|_| Refusal::Unavailable)?;
        let info = lookup(&mut conn).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot check a credential");
            Refusal::Unavailable
        })?;
        let principal = match info {
            None => None,
            Some(info) => Some(self.principal(&mut conn, &info).await?),
        };
        self.remember(digest, principal.clone());
        Ok(principal)
    }

    async fn principal(
        &self,
        conn: &mut occ_store::PgConnection,
        key: &KeyInfo,
    ) -> Result<Principal, Refusal> {
        let queues = self.queue_agencies(conn).await?;
        Ok(Principal {
            subject: key.subject(),
            roles: key.roles,
            scope: Scope::resolve(&key.queues, &key.agencies, &queues),
            sources: key.source_globs(),
            may_update_status: key.may_update_status,
        })
    }

    async fn queue_agencies(
        &self,
        conn: &mut occ_store::PgConnection,
    ) -> Result<QueueAgencies, Refusal> {
        if let Some(map) = self.cached_queue_agencies() {
            return Ok(map);
        }
        let map = Arc::new(
            keys::queue_agencies(conn)
                .await
                .map_err(|_| Refusal::Unavailable)?,
        );
        *self.queues.lock().expect("queue cache") = Some(Cached {
            at: Instant::now(),
            value: map.clone(),
        });
        Ok(map)
    }
}

/// Authenticates and authorizes every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

type Answer<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Send + 'static,
    R: Default + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Answer<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The service polled ready is the one that takes the call; a fresh clone waits for
        // the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let method = req.uri().path().to_owned();
            let access = policy::access(&method, auth.config.reflection);
            if access == Access::Public {
                return inner.call(req).await;
            }
            // A certificate is read only when no key or token is sent (and authentication is
            // on): most calls never parse one.
            let certificate = if auth.config.insecure
                || req.headers().contains_key(http::header::AUTHORIZATION)
            {
                None
            } else {
                crate::tls::client_subject(&req)
            };
            let principal = match auth.authenticate(req.headers(), certificate).await {
                Ok(p) => p,
                Err(Refusal::Unavailable) => {
                    return Ok(Status::unavailable(
                        "credentials cannot be checked: the database is unavailable; retry shortly",
                    )
                    .into_http());
                }
                Err(Refusal::Unauthenticated(why)) => {
                    return Ok(deny(&method, "-", Status::unauthenticated(why)));
                }
            };
            if !access.allows(&principal) {
                let status = Status::permission_denied(format!(
                    "{} may not call {method} (roles: {})",
                    principal.subject,
                    if principal.roles.is_empty() {
                        "none".into()
                    } else {
                        principal.roles.to_string()
                    }
                ));
                return Ok(deny(&method, &principal.subject, status));
            }
            if let Err(wait) = auth.admit(&principal.subject) {
                let status = <Status as tonic_types::StatusExt>::with_error_details(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "{} is over its rate of {} calls a second; retry in {} ms",
                        principal.subject,
                        auth.config.rate_per_second,
                        wait.as_millis().max(1)
                    ),
                    tonic_types::ErrorDetails::with_retry_info(Some(wait)),
                );
                return Ok(deny(&method, &principal.subject, status));
            }
            req.extensions_mut().insert(principal);
            inner.call(req).await
        })
    }
}

/// A refused call: logged, counted, answered.
fn deny<R: Default>(method: &str, subject: &str, status: Status) -> http::Response<R> {
    tracing::warn!(method, subject, code = ?status.code(), reason = status.message(), "call refused");
    metrics::counter!(
        "occ_grpc_denied_total",
        "method" => method.to_owned(),
        "code" => format!("{:?}", status.code())
    )
    .increment(1);
    status.into_http()
}

/// Refuses access to data outside the caller's scope, logged and counted like a refused call.
/// `NOT_FOUND` for an incident (never a hint that it exists), `PERMISSION_DENIED` otherwise.
pub(crate) fn out_of_scope(who: &Principal, what: &str) {
    tracing::warn!(subject = %who.subject, what, "out of the caller's scope");
    metrics::counter!("occ_scope_denied_total", "what" => what.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_names_are_checked() {
        assert_eq!(
            operator("alice.k").map(|p| p.subject).as_deref(),
            Some("operator:alice.k")
        );
        assert_eq!(operator(""), None);
        assert_eq!(operator("alice\nbob"), None);
        assert_eq!(operator(&"x".repeat(65)), None);
    }

    #[test]
    fn a_request_the_layer_did_not_pass_may_do_nothing() {
        let p = of(&Request::new(()));
        assert!(p.roles.is_empty());
        assert!(!p.sees_queue("police"));
    }
}
