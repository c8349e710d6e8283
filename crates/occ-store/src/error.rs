//! The store's errors, classified by what the caller should do about them: wait for the
//! database, retry the transaction, or report.
//!
//! SQL text and driver messages stay in here and in logs; callers get a category.

use occ_domain::FieldErrors;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (down, restarting, out of connections). Wait and retry.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The transaction lost a race (deadlock, serialization failure, or another instance opened
    /// the same incident first). Retrying the whole transaction is safe and will succeed.
    #[error("transaction must be retried: {0}")]
    Retry(String),
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// A unique constraint other than the ones the store handles itself.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The input refers to something that does not exist (a rule naming an unknown queue).
    #[error("{0}")]
    Invalid(FieldErrors),
    /// The change does not apply to the current state (an incident in the wrong status, an
    /// expired claim, a unit that is not available). The message says what the state is.
    #[error("{0}")]
    Precondition(String),
    /// The caller is not the one who may do this (the claim is someone else's).
    #[error("{0}")]
    Forbidden(String),
    /// Stored data that does not parse into the domain: a bug or a hand edit.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// True when waiting for the database and trying again is the right response.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// True when the data itself cannot be stored (a value PostgreSQL refuses, a constraint it
    /// breaks), so that retrying the same input will fail again. Other errors are about the
    /// database, not the input.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Encode(_)) => true,
            StoreError::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                // data_exception, integrity_constraint_violation, program_limit_exceeded
                code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
            }),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // serialization_failure, deadlock_detected
                Some("40001" | "40P01") => StoreError::Retry(db.message().to_owned()),
                // check_violation without a constraint's name: a row routed to a partition
                // that another transaction narrowed meanwhile (a month's partition attached
                // beside the default one while events of that month went in). Not the data:
                // the same row goes to the new partition when tried again. A CHECK constraint
                // that refuses a value always names itself.
                Some("23514") if db.constraint().is_none() => {
                    StoreError::Retry(db.message().to_owned())
                }
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
                // read_only_sql_transaction (a failover in progress)
                Some("57P01" | "57P02" | "57P03" | "53300" | "25006") => StoreError::Unavailable(e),
                // connection_exception class
                Some(code) if code.starts_with("08") => StoreError::Unavailable(e),
                _ => StoreError::Database(e),
            },
            _ => StoreError::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
