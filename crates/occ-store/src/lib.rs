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
pub mod audit_chain;
pub mod cap_alerts;
pub mod changes;
pub mod counts;
pub mod db;
pub mod dead_letters;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod export;
pub mod health;
pub mod incidents;
pub mod ingest;
pub mod keys;
pub mod live;
pub mod partitions;
pub mod queues;
pub mod reads;
pub mod registry;
pub mod rules;
pub mod search;
pub mod sessions;
pub mod slots;
pub mod sources;
pub mod sweep;
pub mod timeline;
pub mod units;
pub mod watchlist;
pub mod zones;

pub use db::{DbConfig, MIGRATOR, create_database_if_missing, migrate, pool, pool_like};
pub use error::{Result, StoreError};
pub use events::Transport;
pub use sqlx::{PgConnection, PgPool};

/// A pooled connection.
pub type Conn = sqlx::pool::PoolConnection<sqlx::Postgres>;
/// A transaction; dropping it without `commit` rolls it back.
pub type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// A connection from the pool (waiting up to the pool's acquire timeout).
pub async fn acquire(pool: &PgPool) -> Result<Conn> {
    Ok(pool.acquire().await?)
}

/// Begins a transaction.
pub async fn begin(pool: &PgPool) -> Result<Tx> {
    Ok(pool.begin().await?)
}

/// Commits a transaction.
pub async fn commit(tx: Tx) -> Result<()> {
    Ok(tx.commit().await?)
}
