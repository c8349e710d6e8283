//! Field-level validation errors, shared by every edge that parses input into domain types.
//!
//! A `FieldError` names the offending field with a dotted path (`location.lat`,
//! `measurements.pm2_5`) so that a gateway integrator reading a dead letter, or a gRPC client
//! reading `INVALID_ARGUMENT`, knows exactly what to fix.

use std::fmt;

/// One invalid field: its dotted path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Every invalid field of one input, in the order they were found (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError::new(field, message)])
    }

    /// The errors, or `None` when there are none.
    pub fn from_vec(errors: Vec<FieldError>) -> Option<Self> {
        (!errors.is_empty()).then_some(Self(errors))
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// Prefixes every field path, for errors of a nested input (`events[3].`).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.field = if e.field.is_empty() {
                prefix.trim_end_matches('.').to_owned()
            } else {
                format!("{prefix}{}", e.field)
            };
        }
        self
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

impl From<FieldError> for FieldErrors {
    fn from(e: FieldError) -> Self {
        Self(vec![e])
    }
}

/// Collects field errors while a whole input is checked, so the caller hears about every
/// problem at once rather than one per attempt.
#[derive(Debug, Default)]
pub(crate) struct Collector(Vec<FieldError>);

impl Collector {
    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    /// Keeps the value when it parsed, records the error otherwise.
    pub(crate) fn take<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    pub(crate) fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, FieldErrors> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(FieldErrors(self.0))
        }
    }
}

/// Checks a free-text identifier: not empty, at most `max` bytes, no control characters.
pub(crate) fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a machine identifier: 1..=max characters from `[A-Za-z0-9._:-]`.
pub(crate) fn ident(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(FieldError::new(
            field,
            format!("may only contain letters, digits, '.', '_', ':' and '-', found {c:?}"),
        ));
    }
    Ok(())
}
