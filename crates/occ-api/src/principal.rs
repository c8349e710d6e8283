//! Who is calling. Every request carries a [`Principal`] in its extensions, put there by one
//! layer in front of all services; handlers read it for authorization and audit entries.
//!
//! Authentication is not configured yet. Until it is, a console names its operator in the
//! `x-occ-operator` request header (`operator:<name>` in audit entries) and every caller has
//! full access; without the header the caller is `anonymous`. The name is taken as given: it
//! keeps two consoles' claims apart and the audit log readable, it is not a security boundary.
//! When authentication lands, only this layer changes: handlers already take the principal
//! from the request.

use std::task::{Context, Poll};

use tonic::Request;

/// The header a console names its operator in, until authentication is configured.
pub const OPERATOR_HEADER: &str = "x-occ-operator";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// How audit entries name the caller: `anonymous`, `dispatcher:alice`, `gateway:esil-01`.
    pub subject: String,
}

impl Principal {
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
        }
    }

    /// The operator a console names, if the name is acceptable: 1 to 64 characters of
    /// `[A-Za-z0-9._@-]`.
    pub fn operator(name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
        ok.then(|| Self {
            subject: format!("operator:{name}"),
        })
    }

    /// The principal of a request (anonymous when none was attached).
    pub fn of<T>(request: &Request<T>) -> Principal {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .unwrap_or_else(Principal::anonymous)
    }
}

/// Attaches the caller's principal to every request.
#[derive(Debug, Clone, Default)]
pub struct PrincipalLayer;

impl<S> tower::Layer<S> for PrincipalLayer {
    type Service = PrincipalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PrincipalService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct PrincipalService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for PrincipalService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let principal = req
            .headers()
            .get(OPERATOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Principal::operator)
            .unwrap_or_else(Principal::anonymous);
        req.extensions_mut().insert(principal);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_names_are_checked() {
        assert_eq!(
            Principal::operator("alice.k").map(|p| p.subject).as_deref(),
            Some("operator:alice.k")
        );
        assert_eq!(Principal::operator(""), None);
        assert_eq!(Principal::operator("alice\nbob"), None);
        assert_eq!(Principal::operator(&"x".repeat(65)), None);
    }
}
