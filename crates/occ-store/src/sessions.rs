//! OCC's MQTT sessions: when the broker's session under a client id began, so that packet ids
//! of different sessions are never taken for one another (see `occ_domain::Delivery`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::Result;

/// When the session under `client_id` began, if OCC has seen it begin.
pub async fn started(pool: &PgPool, client_id: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar!(
        "SELECT started_at FROM mqtt_sessions WHERE client_id = $1",
        client_id
    )
    .fetch_optional(pool)
    .await?)
}

/// Records that the broker began a new session under `client_id` at `at`.
pub async fn record_start(pool: &PgPool, client_id: &str, at: DateTime<Utc>) -> Result<()> {
    sqlx::query!(
        "INSERT INTO mqtt_sessions (client_id, started_at) VALUES ($1, $2)
         ON CONFLICT (client_id) DO UPDATE SET started_at = EXCLUDED.started_at",
        client_id,
        at
    )
    .execute(pool)
    .await?;
    Ok(())
}
