//! Checks of request fields shared by services: every bad field is collected and named, then
//! the request is refused once with all of them.

use occ_domain::glob::Glob;
use occ_domain::search::Window;
use occ_domain::{FieldError, FieldErrors};
use occ_proto::v1 as pb;

use crate::convert::from_timestamp;
use crate::error::{ApiError, ApiResult};

/// Filters of one kind per request.
pub(crate) const MAX_LIST: usize = 100;

/// Collects field errors while a request is read.
#[derive(Default)]
pub(crate) struct Check(Vec<FieldError>);

impl Check {
    pub(crate) fn take<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    pub(crate) fn push(&mut self, e: FieldError) {
        self.0.push(e);
    }

    /// Refuses the request with every error collected, if any.
    pub(crate) fn finish(self) -> ApiResult<()> {
        match FieldErrors::from_vec(self.0) {
            Some(errors) => Err(ApiError::InvalidArgument(errors)),
            None => Ok(()),
        }
    }
}

/// A required time range, at most `max` long.
pub(crate) fn window(
    field: &str,
    range: Option<&pb::TimeRange>,
    max: chrono::TimeDelta,
) -> Result<Window, FieldError> {
    let time = |name: &str, t: Option<&prost_types::Timestamp>| {
        t.map(|t| from_timestamp(&format!("{field}.{name}"), t))
            .transpose()
    };
    let from = time("start_time", range.and_then(|r| r.start_time.as_ref()))?;
    let to = time("end_time", range.and_then(|r| r.end_time.as_ref()))?;
    Window::parse(field, from, to, max)
}

/// A list of names: at most [`MAX_LIST`], each 1 to 128 characters.
pub(crate) fn list(field: &str, values: &[String], check: &mut Check) {
    if values.len() > MAX_LIST {
        check.push(FieldError::new(field, format!("at most {MAX_LIST}")));
    }
    if let Some(i) = values.iter().position(|v| v.is_empty() || v.len() > 128) {
        check.push(FieldError::new(
            format!("{field}[{i}]"),
            "must be 1 to 128 characters",
        ));
    }
}

/// Event types (or incident categories) asked for, exact or with `*`, with their index.
pub(crate) fn types(field: &str, requested: &[String], check: &mut Check) -> Vec<(usize, Glob)> {
    if requested.len() > MAX_LIST {
        check.push(FieldError::new(field, format!("at most {MAX_LIST}")));
    }
    let mut globs = Vec::with_capacity(requested.len());
    for (i, t) in requested.iter().enumerate() {
        let valid = !t.is_empty()
            && t.len() <= 64
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*".contains(&b));
        if valid {
            globs.push((i, Glob::new(t)));
        } else {
            check.push(FieldError::new(
                format!("{field}[{i}]"),
                format!("must be a type, `*` standing for any run of characters, got {t:?}"),
            ));
        }
    }
    globs
}
