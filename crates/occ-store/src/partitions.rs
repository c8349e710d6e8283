//! Keeping a year of events: time partitions made ahead, thinned by retention, and the window
//! of keys that recognises redeliveries (see the migration `event_partitions`).
//!
//! [`maintain`] runs on one instance at a time (a session advisory lock on a connection of its
//! own, never taken by ingest or the API). Its DDL waits at most [`LOCK_WAIT`] for a lock and
//! otherwise gives up until the next run, so it never queues ingest behind it for long:
//! - a partition is made as a table of its own with its indexes and a range check, filled
//!   with the events of its range that waited in the default partition, then attached (which
//!   takes only a lock that lets inserts go on);
//! - retention copies what a partition keeps (events of kinds whose age has not passed, those
//!   incidents and watch-list hits link to, those a legal hold covers) into a new table with
//!   its indexes, then swaps it in; ingest waits only for the swap itself.

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::retention::{Period, Range, Retention, missing};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};

use crate::error::Result;

/// The longest the partition work waits for a lock before it gives up until its next run.
pub const LOCK_WAIT: &str = "3s";

/// How events are partitioned and kept.
#[derive(Debug, Clone)]
pub struct Partitioning {
    pub period: Period,
    /// Partitions made ahead of the current one.
    pub ahead: u32,
    pub retention: Retention,
    /// How long a key is remembered after its event was stored or last revised: a redelivery
    /// or revision later than that is stored as a new event.
    pub key_window: TimeDelta,
    /// How long the wall's hourly counts are kept (its daily counts are kept for good).
    pub hourly_counts_kept: TimeDelta,
}

impl Default for Partitioning {
    fn default() -> Self {
        Self {
            period: Period::Month,
            ahead: 2,
            retention: Retention::default(),
            key_window: TimeDelta::days(7),
            hourly_counts_kept: TimeDelta::days(90),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Partitions made, and how many waiting events each took from the default partition.
    pub created: Vec<(String, u64)>,
    /// Partitions thinned: (name, events kept, events dropped).
    pub thinned: Vec<(String, u64, u64)>,
    /// Keys forgotten (past the window).
    pub keys_forgotten: u64,
    /// The wall's hourly counts dropped (past their keeping).
    pub hourly_counts_dropped: u64,
}

/// A partition OCC made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub range: Range,
    /// The retention rules last applied to it, and when.
    pub retained: Option<String>,
    pub pruned_at: Option<DateTime<Utc>>,
}

/// The partitions OCC made, oldest first.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Partition>> {
    Ok(sqlx::query!(
        "SELECT name, from_at, to_at, retained, pruned_at FROM event_partitions ORDER BY from_at"
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| Partition {
        name: r.name,
        range: Range {
            from: r.from_at,
            to: r.to_at,
        },
        retained: r.retained,
        pruned_at: r.pruned_at,
    })
    .collect())
}

/// Makes the partitions due, applies retention and forgets old keys, unless another instance
/// is doing it (then `None`).
pub async fn maintain(
    pool: &PgPool,
    config: &Partitioning,
    now: DateTime<Utc>,
) -> Result<Option<Report>> {
    // A connection of its own: the session lock ends with it, whatever happens.
    let mut conn = pool.connect_options().connect().await?;
    let mine = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock(hashtext('occ_event_partitions')) AS "got!""#
    )
    .fetch_one(&mut conn)
    .await?;
    if !mine {
        return Ok(None);
    }
    let mut report = Report::default();
    create_due(&mut conn, config, now, &mut report).await?;
    thin_due(&mut conn, config, now, &mut report).await?;
    report.keys_forgotten = forget_keys(&mut conn, now - config.key_window).await?;
    report.hourly_counts_dropped =
        crate::counts::forget_hours(&mut conn, now - config.hourly_counts_kept).await?;
    let _ = conn.close().await;
    Ok(Some(report))
}

/// Makes the partitions missing for `[from, to)` (for events of a time OCC was not running, or
/// a bench's); their names.
pub async fn cover(
    pool: &PgPool,
    period: Period,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<String>> {
    let mut conn = crate::acquire(pool).await?;
    let existing: Vec<Range> = list(&mut conn)
        .await?
        .into_iter()
        .map(|p| p.range)
        .collect();
    let mut made = Vec::new();
    for range in missing(&existing, Range { from, to }, &[], period) {
        let name = range.name();
        create(&mut conn, &name, range, Utc::now()).await?;
        made.push(name);
    }
    Ok(made)
}

fn literal(t: DateTime<Utc>) -> String {
    // Our own times, formatted: safe to write into DDL, which takes no parameters.
    format!("'{}'", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

async fn create_due(
    conn: &mut PgConnection,
    config: &Partitioning,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<()> {
    let existing: Vec<Range> = list(conn).await?.into_iter().map(|p| p.range).collect();
    // Events waiting in the default partition, by day.
    let waiting: Vec<DateTime<Utc>> = sqlx::query_scalar!(
        r#"SELECT DISTINCT date_trunc('day', seen_at, 'UTC') AS "day!" FROM events_default"#
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut until = now;
    for _ in 0..=config.ahead {
        until = config.period.next(until);
    }
    // A new event is seen at most a day before it arrives.
    let wanted = Range {
        from: now - TimeDelta::days(1),
        to: until,
    };
    for range in missing(&existing, wanted, &waiting, config.period) {
        let name = range.name();
        match create(conn, &name, range, now).await {
            Ok(moved) => {
                tracing::info!(partition = %name, from = %range.from, to = %range.to, moved, "event partition made");
                report.created.push((name, moved));
            }
            Err(e) => {
                tracing::warn!(partition = %name, error = %e, "event partition not made; trying again at the next run");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Runs one statement of DDL (or of SQL naming partitions), which takes no parameters: every
/// name and time in it is OCC's own.
async fn ddl(conn: &mut PgConnection, sql: String) -> Result<u64> {
    Ok(sqlx::query(AssertSqlSafe(sql))
        .execute(conn)
        .await?
        .rows_affected())
}

/// Begins the transaction partition work runs in: it waits at most [`LOCK_WAIT`] for a lock.
async fn begin(conn: &mut PgConnection) -> Result<sqlx::Transaction<'_, sqlx::Postgres>> {
    let mut tx = conn.begin().await?;
    ddl(&mut tx, format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'")).await?;
    Ok(tx)
}

/// Makes `table` like the events, with their indexes, and a check that proves `range` (so
/// attaching it needs no scan of it).
async fn new_table(conn: &mut PgConnection, table: &str, range: Range) -> Result<()> {
    let (from, to) = (literal(range.from), literal(range.to));
    ddl(
        conn,
        format!(r#"CREATE TABLE "{table}" (LIKE events INCLUDING ALL)"#),
    )
    .await?;
    ddl(
        conn,
        format!(
            r#"ALTER TABLE "{table}" ADD CONSTRAINT "{table}_range" CHECK (seen_at >= {from} AND seen_at < {to})"#
        ),
    )
    .await?;
    Ok(())
}

async fn attach(conn: &mut PgConnection, table: &str, range: Range) -> Result<()> {
    let (from, to) = (literal(range.from), literal(range.to));
    ddl(
        conn,
        format!(
            r#"ALTER TABLE events ATTACH PARTITION "{table}" FOR VALUES FROM ({from}) TO ({to})"#
        ),
    )
    .await?;
    Ok(())
}

/// Makes partition `name` for `range`, with the events of the range waiting in the default
/// partition; how many it took.
async fn create(
    conn: &mut PgConnection,
    name: &str,
    range: Range,
    now: DateTime<Utc>,
) -> Result<u64> {
    let (from, to) = (literal(range.from), literal(range.to));
    let mut tx = begin(conn).await?;
    new_table(&mut tx, name, range).await?;
    let moved = ddl(
        &mut tx,
        format!(
            r#"WITH moved AS (DELETE FROM events_default WHERE seen_at >= {from} AND seen_at < {to} RETURNING *)
               INSERT INTO "{name}" SELECT * FROM moved"#
        ),
    )
    .await?;
    attach(&mut tx, name, range).await?;
    sqlx::query!(
        "INSERT INTO event_partitions (name, from_at, to_at, created_at) VALUES ($1, $2, $3, $4)",
        name,
        range.from,
        range.to,
        now
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(moved)
}

async fn thin_due(
    conn: &mut PgConnection,
    config: &Partitioning,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<()> {
    // A released hold lets go of what it kept: partitions thinned before are thinned again.
    let released = sqlx::query_scalar!("SELECT max(released_at) FROM legal_holds")
        .fetch_one(&mut *conn)
        .await?;
    for partition in list(conn).await? {
        let Some(expired) = config.retention.expired(partition.range.to, now) else {
            continue;
        };
        let released_since = released
            .zip(partition.pruned_at)
            .is_some_and(|(released, pruned)| released >= pruned);
        if partition.retained.as_deref() == Some(expired.as_str()) && !released_since {
            continue;
        }
        match thin(conn, &partition, &config.retention, &expired, now).await {
            Ok((kept, dropped)) => {
                tracing::info!(
                    partition = %partition.name, expired = %expired, kept, dropped,
                    "event partition thinned by retention"
                );
                report.thinned.push((partition.name, kept, dropped));
            }
            Err(e) => {
                tracing::warn!(partition = %partition.name, error = %e, "retention not applied; trying again at the next run");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Keeps of `partition` what retention keeps; (kept, dropped).
async fn thin(
    conn: &mut PgConnection,
    partition: &Partition,
    retention: &Retention,
    expired: &str,
    now: DateTime<Utc>,
) -> Result<(u64, u64)> {
    let name = &partition.name;
    let next = format!("{name}_next");
    let (patterns, ages, default) = retention.as_sql();
    // -1: kept for ever.
    let ages: Vec<i64> = ages.into_iter().map(|a| a.unwrap_or(-1)).collect();
    let default = default.unwrap_or(-1);
    let mut tx = begin(conn).await?;
    // Nothing arrives in the partition while it is copied (a late event waits).
    ddl(&mut tx, format!(r#"LOCK TABLE "{name}" IN SHARE MODE"#)).await?;
    let total: i64 = sqlx::query_scalar(AssertSqlSafe(format!(r#"SELECT count(*) FROM "{name}""#)))
        .fetch_one(&mut *tx)
        .await?;
    new_table(&mut tx, &next, partition.range).await?;
    let kept = sqlx::query(AssertSqlSafe(format!(
        r#"
        INSERT INTO "{next}" SELECT e.* FROM "{name}" e
         WHERE EXISTS (SELECT 1 FROM incident_events l WHERE l.event_id = e.id)
            OR EXISTS (SELECT 1 FROM watchlist_hits w WHERE w.event_id = e.id)
            OR EXISTS (SELECT 1 FROM legal_holds h
                        WHERE h.released_at IS NULL
                          AND e.seen_at >= h.from_at AND e.seen_at < h.to_at
                          AND (cardinality(h.sources) = 0 OR e.source_id = ANY (h.sources))
                          AND (cardinality(h.zones) = 0 OR e.zone = ANY (h.zones)
                               OR e.extra_zones && h.zones))
            OR (SELECT d = -1 OR $3 > $4 - d * interval '1 day'
                  FROM coalesce((SELECT r.days
                                   FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY
                                        AS r(pattern, days, n)
                                  WHERE e.event_type LIKE r.pattern
                                  ORDER BY r.n LIMIT 1), $5) AS d)
        "#
    )))
    .bind(&patterns)
    .bind(&ages)
    .bind(partition.range.to)
    .bind(now)
    .bind(default)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // The swap: the only moment ingest waits (for inserts into the parent).
    ddl(
        &mut tx,
        format!(r#"ALTER TABLE events DETACH PARTITION "{name}""#),
    )
    .await?;
    ddl(&mut tx, format!(r#"DROP TABLE "{name}""#)).await?;
    ddl(
        &mut tx,
        format!(r#"ALTER TABLE "{next}" RENAME TO "{name}""#),
    )
    .await?;
    attach(&mut tx, name, partition.range).await?;
    sqlx::query!(
        "UPDATE event_partitions SET retained = $2, pruned_at = $3 WHERE name = $1",
        name,
        expired,
        now
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let total = u64::try_from(total).unwrap_or(0);
    Ok((kept, total.saturating_sub(kept)))
}

/// Forgets keys last used before `before`, a slice at a time (no long transaction).
async fn forget_keys(conn: &mut PgConnection, before: DateTime<Utc>) -> Result<u64> {
    let mut forgotten = 0;
    loop {
        let n = sqlx::query!(
            r#"
            DELETE FROM event_keys WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM event_keys WHERE used_at < $1 LIMIT 10000))
            "#,
            before
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        forgotten += n;
        if n < 10_000 {
            return Ok(forgotten);
        }
    }
}

/// A legal hold: events of a time range (optionally only of some sources and zones) kept past
/// their retention until released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: uuid::Uuid,
    pub case_ref: String,
    pub reason: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub sources: Vec<String>,
    pub zones: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub released: Option<(String, DateTime<Utc>)>,
}

/// Places a hold (audited).
pub async fn hold(conn: &mut PgConnection, hold: &Hold) -> Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO legal_holds (id, case_ref, reason, from_at, to_at, sources, zones,
                                 created_by, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        "#,
        hold.id,
        hold.case_ref,
        hold.reason,
        hold.from,
        hold.to,
        &hold.sources,
        &hold.zones,
        hold.created_by,
        hold.created_at
    )
    .execute(&mut *conn)
    .await?;
    crate::audit::append(
        conn,
        &[crate::audit::AuditEntry {
            entity: crate::audit::Entity::LegalHold(hold.id),
            at: hold.created_at,
            actor: hold.created_by.clone(),
            action: "legal_hold.placed".into(),
            before: None,
            after: Some(serde_json::json!({
                "case": hold.case_ref,
                "reason": hold.reason,
                "from": hold.from,
                "to": hold.to,
                "sources": hold.sources,
                "zones": hold.zones,
            })),
            detail: format!("case {}", hold.case_ref),
        }],
    )
    .await
}

/// Releases a hold (audited); false if there is no such hold in force.
pub async fn release(
    conn: &mut PgConnection,
    id: uuid::Uuid,
    by: &str,
    at: DateTime<Utc>,
) -> Result<bool> {
    let case = sqlx::query_scalar!(
        r#"
        UPDATE legal_holds SET released_by = $2, released_at = $3
         WHERE id = $1 AND released_at IS NULL
        RETURNING case_ref
        "#,
        id,
        by,
        at
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(case) = case else {
        return Ok(false);
    };
    crate::audit::append(
        conn,
        &[crate::audit::AuditEntry {
            entity: crate::audit::Entity::LegalHold(id),
            at,
            actor: by.to_owned(),
            action: "legal_hold.released".into(),
            before: None,
            after: None,
            detail: format!("case {case}"),
        }],
    )
    .await?;
    Ok(true)
}

/// Every hold, newest first.
pub async fn holds(conn: &mut PgConnection) -> Result<Vec<Hold>> {
    Ok(sqlx::query!(
        r#"
        SELECT id, case_ref, reason, from_at, to_at, sources, zones, created_by, created_at,
               released_by, released_at
          FROM legal_holds ORDER BY created_at DESC
        "#
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| Hold {
        id: r.id,
        case_ref: r.case_ref,
        reason: r.reason,
        from: r.from_at,
        to: r.to_at,
        sources: r.sources,
        zones: r.zones,
        created_by: r.created_by,
        created_at: r.created_at,
        released: r.released_by.zip(r.released_at),
    })
    .collect())
}
