//! The wall's counts: events and incidents per zone and type, per hour and per day, kept as
//! they commit.
//!
//! The statement that stores a batch's events (and the one that opens an incident) appends
//! what it adds to a delta table: one row per hour, zone and type it touched, never an update,
//! so concurrent batches on any number of instances do not wait on each other. [`compact`]
//! (one instance at a time) folds the deltas into the hourly and daily counts, per zone and
//! city-wide, in one transaction; a read sums the counts and the deltas not folded yet, in one statement, so it
//! sees each event exactly once whether or not a compaction ran meanwhile.
//!
//! Hours and days are those of the city's time zone ([`set_time_zone`]); a bucket is named by
//! the instant it begins.

use chrono::{DateTime, Utc};
use occ_domain::FieldErrors;
use occ_domain::wall::{Buckets, Granularity, Split};
use sqlx::{PgConnection, PgPool};

use crate::error::{Result, StoreError};

/// Makes `name` (an IANA time zone PostgreSQL knows) the city's time zone; answers the previous
/// one when it changed. Counts already kept stay in the buckets of the zone they were kept in.
pub async fn set_time_zone(conn: &mut PgConnection, name: &str) -> Result<Option<String>> {
    let known: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1) AS "known!""#,
        name
    )
    .fetch_one(&mut *conn)
    .await?;
    if !known {
        return Err(StoreError::Invalid(FieldErrors::one(
            "time_zone",
            format!("{name:?} is not a time zone (an IANA name such as Asia/Almaty, or UTC)"),
        )));
    }
    let before = sqlx::query_scalar!(
        r#"
        WITH old AS (SELECT time_zone FROM wall_settings FOR UPDATE)
        UPDATE wall_settings w SET time_zone = $1
          FROM old
         WHERE old.time_zone <> $1
        RETURNING old.time_zone
        "#,
        name
    )
    .fetch_optional(conn)
    .await?;
    Ok(before)
}

/// The city's time zone.
pub async fn time_zone(conn: &mut PgConnection) -> Result<String> {
    Ok(sqlx::query_scalar!("SELECT time_zone FROM wall_settings")
        .fetch_one(conn)
        .await?)
}

/// What one compaction folded in: delta rows read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub event_rows: i64,
    pub incident_rows: i64,
}

/// Folds the deltas committed so far into the hourly and daily counts, unless another instance
/// is doing it (then `None`). Deltas committed meanwhile stay for the next run.
pub async fn compact(pool: &PgPool) -> Result<Option<Compacted>> {
    let mut tx = pool.begin().await?;
    let mine = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_xact_lock(hashtext('occ_wall_counts')) AS "got!""#
    )
    .fetch_one(&mut *tx)
    .await?;
    if !mine {
        return Ok(None);
    }
    // Sums go in key order: two compactions (a lock lost with a connection) cannot deadlock.
    let event_rows = sqlx::query_scalar!(
        r#"
        WITH d AS (
            DELETE FROM event_count_deltas RETURNING hour, zone, event_type, n
        ),
        hourly AS (
            INSERT INTO event_counts_hourly AS c (bucket, zone, event_type, n)
            SELECT hour, zone, event_type, sum(n) FROM d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (bucket, zone, event_type) DO UPDATE SET n = c.n + EXCLUDED.n
        ),
        daily AS (
            INSERT INTO event_counts_daily AS c (bucket, zone, event_type, n)
            SELECT date_trunc('day', hour, (SELECT time_zone FROM wall_settings)), zone,
                   event_type, sum(n)
              FROM d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (bucket, zone, event_type) DO UPDATE SET n = c.n + EXCLUDED.n
        ),
        city_hourly AS (
            INSERT INTO event_counts_city_hourly AS c (bucket, event_type, n)
            SELECT hour, event_type, sum(n) FROM d GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (bucket, event_type) DO UPDATE SET n = c.n + EXCLUDED.n
        ),
        city_daily AS (
            INSERT INTO event_counts_city_daily AS c (bucket, event_type, n)
            SELECT date_trunc('day', hour, (SELECT time_zone FROM wall_settings)), event_type,
                   sum(n)
              FROM d GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (bucket, event_type) DO UPDATE SET n = c.n + EXCLUDED.n
        )
        SELECT count(*) AS "rows!" FROM d
        "#
    )
    .fetch_one(&mut *tx)
    .await?;
    let incident_rows = sqlx::query_scalar!(
        r#"
        WITH d AS (
            DELETE FROM incident_count_deltas
            RETURNING hour, zone, category, queue, priority, n
        ),
        hourly AS (
            INSERT INTO incident_counts_hourly AS c (bucket, zone, category, queue, priority, n)
            SELECT hour, zone, category, queue, priority, sum(n)
              FROM d GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
            ON CONFLICT (bucket, zone, category, queue, priority)
               DO UPDATE SET n = c.n + EXCLUDED.n
        ),
        daily AS (
            INSERT INTO incident_counts_daily AS c (bucket, zone, category, queue, priority, n)
            SELECT date_trunc('day', hour, (SELECT time_zone FROM wall_settings)), zone,
                   category, queue, priority, sum(n)
              FROM d GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
            ON CONFLICT (bucket, zone, category, queue, priority)
               DO UPDATE SET n = c.n + EXCLUDED.n
        )
        SELECT count(*) AS "rows!" FROM d
        "#
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Compacted {
        event_rows,
        incident_rows,
    }))
}

/// Drops hourly counts of hours that began before `before` (their days stay), a slice at a
/// time (no long transaction, after an upgrade counted a year of hours).
pub async fn forget_hours(conn: &mut PgConnection, before: DateTime<Utc>) -> Result<u64> {
    const SLICE: u64 = 10_000;
    let mut dropped = 0;
    loop {
        let n = sqlx::query_scalar!(
            r#"
            WITH a AS (
                DELETE FROM event_counts_hourly WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM event_counts_hourly WHERE bucket < $1 LIMIT 10000))
                RETURNING 1
            ),
            b AS (
                DELETE FROM event_counts_city_hourly WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM event_counts_city_hourly WHERE bucket < $1 LIMIT 10000))
                RETURNING 1
            ),
            c AS (
                DELETE FROM incident_counts_hourly WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM incident_counts_hourly WHERE bucket < $1 LIMIT 10000))
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b)
                   + (SELECT count(*) FROM c) AS "n!"
            "#,
            before
        )
        .fetch_one(&mut *conn)
        .await?;
        let n = u64::try_from(n).unwrap_or(0);
        dropped += n;
        if n < SLICE {
            return Ok(dropped);
        }
    }
}

/// What to count. Lists are alternatives; `None` for any.
#[derive(Debug, Clone)]
pub struct CountQuery {
    pub buckets: Buckets,
    pub split: Split,
    pub zones: Option<Vec<String>>,
    /// Event types or incident categories, as SQL `LIKE` patterns.
    pub kinds: Option<Vec<String>>,
    /// Incidents only: the queues the caller sees (`None` for every queue).
    pub queues: Option<Vec<String>>,
    /// Answer at most this many counts.
    pub limit: i64,
}

/// One count; a dimension not split by is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// When the bucket begins.
    pub bucket: Option<DateTime<Utc>>,
    /// `Some("")` for what has no zone.
    pub zone: Option<String>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub priority: Option<i16>,
    pub n: i64,
}

impl Count {
    /// A count of events (which have no queue or priority).
    fn of_events(
        bucket: Option<DateTime<Utc>>,
        zone: Option<String>,
        kind: Option<String>,
        n: i64,
    ) -> Self {
        Count {
            bucket,
            zone,
            kind,
            queue: None,
            priority: None,
            n,
        }
    }
}

/// Events first stored, in buckets beginning within the window; in order of bucket, zone, type.
/// A question that neither names zones nor splits by them reads the city-wide counts.
pub async fn events(conn: &mut PgConnection, q: &CountQuery) -> Result<Vec<Count>> {
    if q.zones.is_none() && !q.split.zone {
        return city_events(conn, q).await;
    }
    let hourly = q.buckets.granularity == Granularity::Hour;
    let w = q.buckets.window;
    let rows = sqlx::query!(
        r#"
        WITH r AS (
            SELECT bucket, zone, event_type, n FROM event_counts_hourly
             WHERE $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT bucket, zone, event_type, n FROM event_counts_daily
             WHERE NOT $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT * FROM (
                SELECT CASE WHEN $3 THEN hour
                            ELSE date_trunc('day', hour, (SELECT time_zone FROM wall_settings))
                       END AS bucket, zone, event_type, n
                  FROM event_count_deltas
            ) d
             WHERE bucket >= $1 AND bucket < $2
        )
        SELECT CASE WHEN $6 THEN bucket END AS bucket,
               CASE WHEN $7 THEN zone END AS zone,
               CASE WHEN $8 THEN event_type END AS kind,
               sum(n)::int8 AS "n!"
          FROM r
         WHERE ($4::text[] IS NULL OR zone = ANY($4))
           AND ($5::text[] IS NULL OR event_type LIKE ANY($5))
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
         LIMIT $9
        "#,
        w.from,
        w.to,
        hourly,
        q.zones.as_deref(),
        q.kinds.as_deref(),
        q.split.time,
        q.split.zone,
        q.split.kind,
        q.limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Count::of_events(r.bucket, r.zone, r.kind, r.n))
        .collect())
}

/// Events first stored, city-wide.
async fn city_events(conn: &mut PgConnection, q: &CountQuery) -> Result<Vec<Count>> {
    let hourly = q.buckets.granularity == Granularity::Hour;
    let w = q.buckets.window;
    let rows = sqlx::query!(
        r#"
        WITH r AS (
            SELECT bucket, event_type, n FROM event_counts_city_hourly
             WHERE $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT bucket, event_type, n FROM event_counts_city_daily
             WHERE NOT $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT * FROM (
                SELECT CASE WHEN $3 THEN hour
                            ELSE date_trunc('day', hour, (SELECT time_zone FROM wall_settings))
                       END AS bucket, event_type, n
                  FROM event_count_deltas
            ) d
             WHERE bucket >= $1 AND bucket < $2
        )
        SELECT CASE WHEN $5 THEN bucket END AS bucket,
               CASE WHEN $6 THEN event_type END AS kind,
               sum(n)::int8 AS "n!"
          FROM r
         WHERE ($4::text[] IS NULL OR event_type LIKE ANY($4))
         GROUP BY 1, 2
         ORDER BY 1, 2
         LIMIT $7
        "#,
        w.from,
        w.to,
        hourly,
        q.kinds.as_deref(),
        q.split.time,
        q.split.kind,
        q.limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Count::of_events(r.bucket, None, r.kind, r.n))
        .collect())
}

/// Incidents opened, in buckets beginning within the window, in the queues asked for; in order
/// of bucket, zone, category, queue, priority.
pub async fn incidents(conn: &mut PgConnection, q: &CountQuery) -> Result<Vec<Count>> {
    let hourly = q.buckets.granularity == Granularity::Hour;
    let w = q.buckets.window;
    let rows = sqlx::query!(
        r#"
        WITH r AS (
            SELECT bucket, zone, category, queue, priority, n FROM incident_counts_hourly
             WHERE $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT bucket, zone, category, queue, priority, n FROM incident_counts_daily
             WHERE NOT $3 AND bucket >= $1 AND bucket < $2
            UNION ALL
            SELECT * FROM (
                SELECT CASE WHEN $3 THEN hour
                            ELSE date_trunc('day', hour, (SELECT time_zone FROM wall_settings))
                       END AS bucket, zone, category, queue, priority, n
                  FROM incident_count_deltas
            ) d
             WHERE bucket >= $1 AND bucket < $2
        )
        SELECT CASE WHEN $7 THEN bucket END AS bucket,
               CASE WHEN $8 THEN zone END AS zone,
               CASE WHEN $9 THEN category END AS kind,
               CASE WHEN $10 THEN queue END AS queue,
               CASE WHEN $11 THEN priority END AS priority,
               sum(n)::int8 AS "n!"
          FROM r
         WHERE ($4::text[] IS NULL OR zone = ANY($4))
           AND ($5::text[] IS NULL OR category LIKE ANY($5))
           AND ($6::text[] IS NULL OR queue = ANY($6))
         GROUP BY 1, 2, 3, 4, 5
         ORDER BY 1, 2, 3, 4, 5
         LIMIT $12
        "#,
        w.from,
        w.to,
        hourly,
        q.zones.as_deref(),
        q.kinds.as_deref(),
        q.queues.as_deref(),
        q.split.time,
        q.split.zone,
        q.split.kind,
        q.split.queue,
        q.split.priority,
        q.limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Count {
            bucket: r.bucket,
            zone: r.zone,
            kind: r.kind,
            queue: r.queue,
            priority: r.priority,
            n: r.n,
        })
        .collect())
}
