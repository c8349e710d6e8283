//! The one place where errors become gRPC statuses.
//!
//! Invalid input is `INVALID_ARGUMENT` with every bad field named, in the message and as
//! `google.rpc.BadRequest` details; a missing thing is `NOT_FOUND`; a change that does not apply
//! to the current state is `FAILED_PRECONDITION`; a database outage is `UNAVAILABLE` (retry).
//! Anything else is `INTERNAL` with a generic message: the detail goes to the log, never to the
//! client.

use occ_domain::{FieldErrors, TransitionError};
use occ_store::StoreError;
use tonic::{Code, Status};
use tonic_types::{BadRequest, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(FieldErrors),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the database is unavailable")]
    Unavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument(FieldErrors::one(field, message))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ApiError::NotFound(what),
            StoreError::Invalid(errors) => ApiError::InvalidArgument(errors),
            StoreError::AlreadyExists(what) => {
                ApiError::FailedPrecondition(format!("{what} already exists"))
            }
            StoreError::Retry(_) => {
                ApiError::Aborted("a concurrent change won; retry the call".into())
            }
            StoreError::Precondition(m) => ApiError::FailedPrecondition(m),
            StoreError::Forbidden(m) => ApiError::PermissionDenied(m),
            StoreError::Unavailable(_) => ApiError::Unavailable,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        ApiError::FailedPrecondition(e.to_string())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::InvalidArgument(errors) => {
                let mut details = BadRequest::new(Vec::new());
                for f in errors.errors() {
                    details.add_violation(f.field.clone(), f.message.clone());
                }
                Status::with_error_details_vec(
                    Code::InvalidArgument,
                    errors.to_string(),
                    [details.into()],
                )
            }
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Aborted(m) => Status::aborted(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Unavailable => {
                tracing::warn!("request failed: database unavailable");
                Status::unavailable("the database is unavailable; retry shortly")
            }
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed");
                Status::internal("internal error")
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
