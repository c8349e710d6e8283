//! OCC's PostgreSQL store.
//!
//! One module per aggregate. Functions take a `&mut PgConnection` so the caller decides what
//! commits together (an event, the incident it opens and its audit entry commit in one
//! transaction); [`ingest::commit_batch`] is the one place that owns its transaction, because
//! it also owns the retry when it loses a race with another instance.
//!
//! Errors are classified in [`StoreError`] (unavailable, retry, not found, invalid); SQL text
//! never leaves this crate except in logs.
#![forbid(unsafe_code)]

pub mod audit;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod incidents;
pub mod ingest;
pub mod rules;
pub mod timeline;

pub use db::{DbConfig, MIGRATOR, create_database_if_missing, migrate, pool};
pub use error::{Result, StoreError};
pub use events::Transport;
pub use sqlx::PgPool;
