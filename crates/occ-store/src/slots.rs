//! Ingest slots: the MQTT client ids OCC's instances share out, each held by one live instance
//! at a time under a lease on PostgreSQL's clock. A slot whose holder stopped is free at once;
//! one whose holder died is free when its lease runs out; either way a live instance takes it
//! and resumes the broker's session under it, with everything queued there.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;

/// A slot taken: its client id, and what OCC last recorded its session subscribed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub client_id: String,
    pub subscriptions: Vec<String>,
}

/// One renewal: the slots still held, and how many instances are alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub held: Vec<String>,
    /// Of `held`, those that are retiring.
    pub held_retiring: Vec<String>,
    /// Retiring slots nobody holds (or whose holder's lease ran out), and those held here.
    pub free_retiring: Vec<String>,
    pub live_instances: i64,
}

/// A slot as listed for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub client_id: String,
    pub holder: Option<String>,
    pub lease_left: Option<f64>,
    pub retiring: bool,
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// An instance starts with `client_ids` as the slots: they exist and are not retiring, and
/// every other slot is retiring (the number of slots was lowered).
pub async fn configure(pool: &PgPool, client_ids: &[String]) -> Result<()> {
    sqlx::query!(
        "WITH made AS (
             INSERT INTO ingest_slots (client_id) SELECT unnest($1::text[])
             ON CONFLICT (client_id) DO UPDATE SET retiring = false
         )
         UPDATE ingest_slots SET retiring = true
          WHERE NOT retiring AND client_id <> ALL($1)",
        client_ids
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Says that instance `me` is alive for `lease` more, renews the leases of the slots it
/// holds, and counts the live instances. A slot missing from `held` was taken by another
/// instance (after this one's lease ran out).
/// Slots outside `configured` are marked retiring on the way (the number of slots was lowered,
/// or an instance still on a higher number brought one back).
pub async fn renew(
    pool: &PgPool,
    me: Uuid,
    name: &str,
    lease: Duration,
    configured: &[String],
) -> Result<Renewed> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "UPDATE ingest_slots SET retiring = true WHERE NOT retiring AND client_id <> ALL($1)",
        configured
    )
    .execute(&mut *tx)
    .await?;
    let live_instances = sqlx::query_scalar!(
        r#"WITH seen AS (
               INSERT INTO ingest_instances (id, name, seen_until)
               VALUES ($1, $2, now() + make_interval(secs => $3))
               ON CONFLICT (id) DO UPDATE SET seen_until = EXCLUDED.seen_until
           ), gone AS (
               DELETE FROM ingest_instances WHERE seen_until < now() - interval '1 minute'
           )
           SELECT count(*) + 1 AS "live!" FROM ingest_instances
            WHERE seen_until > now() AND id <> $1"#,
        me,
        name,
        seconds(lease)
    )
    .fetch_one(&mut *tx)
    .await?;
    let held = sqlx::query!(
        "UPDATE ingest_slots SET lease_until = now() + make_interval(secs => $2)
          WHERE holder = $1
         RETURNING client_id, retiring",
        me,
        seconds(lease)
    )
    .fetch_all(&mut *tx)
    .await?;
    let free_retiring = sqlx::query_scalar!(
        "SELECT client_id FROM ingest_slots
          WHERE retiring AND (holder IS NULL OR lease_until < now() OR holder = $1)
          ORDER BY client_id",
        me
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Renewed {
        held_retiring: held
            .iter()
            .filter(|r| r.retiring)
            .map(|r| r.client_id.clone())
            .collect(),
        held: held.into_iter().map(|r| r.client_id).collect(),
        free_retiring,
        live_instances,
    })
}

/// Takes up to `n` of the slots `among` that nobody holds (or whose holder's lease ran out),
/// in client id order: slots to read under, or retiring ones to end, as `retiring` says.
pub async fn take(
    pool: &PgPool,
    me: Uuid,
    name: &str,
    among: &[String],
    n: usize,
    lease: Duration,
    retiring: bool,
) -> Result<Vec<Taken>> {
    let rows = sqlx::query!(
        "UPDATE ingest_slots s
            SET holder = $1, holder_name = $2, lease_until = now() + make_interval(secs => $5)
           FROM (SELECT client_id FROM ingest_slots
                  WHERE client_id = ANY($3)
                    AND (holder IS NULL OR lease_until < now() OR holder = $1)
                    AND retiring = $6
                  ORDER BY client_id
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED) free
          WHERE s.client_id = free.client_id
         RETURNING s.client_id, s.subscriptions",
        me,
        name,
        among,
        i64::try_from(n).unwrap_or(i64::MAX),
        seconds(lease),
        retiring
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Taken {
            client_id: r.client_id,
            subscriptions: r.subscriptions,
        })
        .collect())
}

/// Gives a slot up, so another instance can take it at once.
pub async fn release(pool: &PgPool, me: Uuid, client_id: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE ingest_slots SET holder = NULL, holder_name = NULL, lease_until = NULL
          WHERE client_id = $2 AND holder = $1",
        me,
        client_id
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A retiring slot's session was drained and ended on the broker: the slot and its session's
/// record are gone. False if it was not held by `me` any more.
pub async fn retired(pool: &PgPool, me: Uuid, client_id: &str) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let gone = sqlx::query!(
        "DELETE FROM ingest_slots WHERE client_id = $1 AND holder = $2",
        client_id,
        me
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if gone {
        sqlx::query!("DELETE FROM mqtt_sessions WHERE client_id = $1", client_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(gone)
}

/// Instance `me` stops: its slots are free and it no longer counts as alive.
pub async fn leave(pool: &PgPool, me: Uuid) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "UPDATE ingest_slots SET holder = NULL, holder_name = NULL, lease_until = NULL
          WHERE holder = $1",
        me
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("DELETE FROM ingest_instances WHERE id = $1", me)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Records what a slot's session is subscribed to.
pub async fn subscribed(pool: &PgPool, client_id: &str, subscriptions: &[String]) -> Result<()> {
    sqlx::query!(
        "UPDATE ingest_slots SET subscriptions = $2 WHERE client_id = $1",
        client_id,
        subscriptions
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Every slot, with its holder and how long its lease has left.
pub async fn list(pool: &PgPool) -> Result<Vec<Slot>> {
    let rows = sqlx::query!(
        r#"SELECT client_id, holder_name, retiring,
                  extract(epoch FROM lease_until - now())::float8 AS lease_left
             FROM ingest_slots ORDER BY client_id"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Slot {
            client_id: r.client_id,
            holder: r.holder_name,
            lease_left: r.lease_left,
            retiring: r.retiring,
        })
        .collect())
}
