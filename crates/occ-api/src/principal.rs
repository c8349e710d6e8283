//! Who is calling. Every request carries a [`Principal`] in its extensions, put there by one
//! layer in front of all services; handlers read it for authorization and audit entries.
//!
//! Authentication is not configured yet, so every caller is the anonymous principal with full
//! access. When it lands, only the layer changes: handlers already take the principal from the
//! request.

use std::task::{Context, Poll};

use tonic::Request;

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
        req.extensions_mut().insert(Principal::anonymous());
        self.inner.call(req)
    }
}
