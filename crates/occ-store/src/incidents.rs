//! Incidents: correlation-safe opening and joining, reads, listing and timelines.

use chrono::{DateTime, Utc};
use occ_domain::{
    Category, GeoPoint, Incident, IncidentId, IncidentNumber, IncidentStatus, OpenIncident,
    Priority, QueueName, RuleId, Zone,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{Result, StoreError};

struct IncidentRow {
    id: Uuid,
    number: String,
    category: String,
    queue: String,
    priority: i16,
    status: String,
    title: String,
    lat: Option<f64>,
    lon: Option<f64>,
    zone: Option<String>,
    correlation_key: String,
    correlating: bool,
    rule_id: Option<Uuid>,
    rule_name: String,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    event_count: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<IncidentRow> for Incident {
    type Error = StoreError;

    fn try_from(r: IncidentRow) -> Result<Self> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("incident {}: {what}", r.id));
        let location = match (r.lat, r.lon) {
            (Some(lat), Some(lon)) => {
                Some(GeoPoint::new(lat, lon).map_err(|e| corrupt(&e.to_string()))?)
            }
            _ => None,
        };
        Ok(Incident {
            id: IncidentId(r.id),
            number: IncidentNumber::from_stored(r.number.clone()),
            category: Category::from_stored(r.category.clone()),
            queue: QueueName::from_stored(r.queue.clone()),
            priority: Priority::from_level(r.priority).ok_or_else(|| corrupt("priority"))?,
            status: IncidentStatus::parse(&r.status).ok_or_else(|| corrupt("status"))?,
            title: r.title,
            location,
            zone: r.zone.map(Zone::from_stored),
            correlation_key: r.correlation_key,
            correlating: r.correlating,
            rule_id: r.rule_id.map(RuleId),
            rule_name: r.rule_name,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            event_count: i64::from(r.event_count),
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// The correlating incident of `key`, locked for the rest of the transaction so that
/// concurrent batches with the same key take turns.
pub async fn lock_correlating(conn: &mut PgConnection, key: &str) -> Result<Option<OpenIncident>> {
    let row = sqlx::query!(
        r#"
        SELECT id, priority, first_seen, last_seen
          FROM incidents
         WHERE correlation_key = $1 AND correlating
           FOR UPDATE
        "#,
        key
    )
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(OpenIncident {
            id: IncidentId(r.id),
            priority: Priority::from_level(r.priority)
                .ok_or_else(|| StoreError::Corrupt(format!("incident {}: priority", r.id)))?,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
        })
    })
    .transpose()
}

/// The correlating incident of `key`, without locking (dry runs).
pub async fn find_correlating(conn: &mut PgConnection, key: &str) -> Result<Option<Incident>> {
    sqlx::query_as!(
        IncidentRow,
        r#"
        SELECT id, number, category, queue, priority, status, title, lat, lon, zone,
               correlation_key, correlating, rule_id, rule_name, first_seen, last_seen,
               event_count, created_at, updated_at
          FROM incidents
         WHERE correlation_key = $1 AND correlating
        "#,
        key
    )
    .fetch_optional(conn)
    .await?
    .map(Incident::try_from)
    .transpose()
}

/// A new incident to insert.
#[derive(Debug, Clone)]
pub struct NewIncident<'a> {
    pub id: IncidentId,
    pub category: &'a str,
    pub queue: &'a str,
    pub priority: Priority,
    pub title: &'a str,
    pub location: Option<GeoPoint>,
    pub zone: Option<&'a str>,
    pub correlation_key: &'a str,
    pub correlating: bool,
    pub rule_id: RuleId,
    pub rule_name: &'a str,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub event_count: i32,
    pub now: DateTime<Utc>,
}

/// Inserts a QUEUED incident. Returns `None` when it would be a second correlating incident
/// for its key: another transaction opened that incident first and the caller must retry.
pub async fn insert(
    conn: &mut PgConnection,
    new: &NewIncident<'_>,
) -> Result<Option<IncidentNumber>> {
    let seq: i64 = sqlx::query_scalar!(r#"SELECT nextval('incident_number_seq') AS "n!""#)
        .fetch_one(&mut *conn)
        .await?;
    let number = IncidentNumber::new(new.now, seq);
    let inserted = sqlx::query_scalar!(
        r#"
        INSERT INTO incidents (id, number, category, queue, priority, status, title, lat, lon,
                               zone, correlation_key, correlating, rule_id, rule_name,
                               first_seen, last_seen, event_count, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, 'QUEUED', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                $17, $17)
        ON CONFLICT (correlation_key) WHERE correlating DO NOTHING
        RETURNING id
        "#,
        new.id.0,
        number.as_str(),
        new.category,
        new.queue,
        new.priority.level(),
        new.title,
        new.location.map(|l| l.lat()),
        new.location.map(|l| l.lon()),
        new.zone,
        new.correlation_key,
        new.correlating,
        new.rule_id.0,
        new.rule_name,
        new.first_seen,
        new.last_seen,
        new.event_count,
        new.now,
    )
    .fetch_optional(conn)
    .await?;
    Ok(inserted.map(|_| number))
}

/// Adds `added` events to an incident, widening its seen interval and raising (never
/// lowering) its priority. Returns its number.
#[allow(clippy::too_many_arguments)]
pub async fn join(
    conn: &mut PgConnection,
    id: IncidentId,
    added: i32,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    priority: Priority,
    correlating: bool,
    now: DateTime<Utc>,
) -> Result<IncidentNumber> {
    let number = sqlx::query_scalar!(
        r#"
        UPDATE incidents
           SET event_count = event_count + $2,
               first_seen = LEAST(first_seen, $3),
               last_seen = GREATEST(last_seen, $4),
               priority = LEAST(priority, $5),
               correlating = $6,
               updated_at = $7
         WHERE id = $1
        RETURNING number
        "#,
        id.0,
        added,
        first_seen,
        last_seen,
        priority.level(),
        correlating,
        now,
    )
    .fetch_one(conn)
    .await?;
    Ok(IncidentNumber::from_stored(number))
}

/// Stops an incident from absorbing new events (a newer incident takes over its key).
pub async fn retire(conn: &mut PgConnection, id: IncidentId, now: DateTime<Utc>) -> Result<()> {
    sqlx::query!(
        "UPDATE incidents SET correlating = false, updated_at = $2 WHERE id = $1",
        id.0,
        now
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Links events to incidents: (incident, event, rule).
pub async fn link_events(
    conn: &mut PgConnection,
    links: &[(IncidentId, occ_domain::EventId, RuleId)],
    now: DateTime<Utc>,
) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let incidents: Vec<Uuid> = links.iter().map(|l| l.0.0).collect();
    let events: Vec<Uuid> = links.iter().map(|l| l.1.0).collect();
    let rules: Vec<Uuid> = links.iter().map(|l| l.2.0).collect();
    sqlx::query!(
        r#"
        INSERT INTO incident_events (incident_id, event_id, rule_id, linked_at)
        SELECT u.*, $4 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) AS u
        ON CONFLICT DO NOTHING
        "#,
        &incidents,
        &events,
        &rules,
        now,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(conn: &mut PgConnection, id: IncidentId) -> Result<Incident> {
    sqlx::query_as!(
        IncidentRow,
        r#"
        SELECT id, number, category, queue, priority, status, title, lat, lon, zone,
               correlation_key, correlating, rule_id, rule_name, first_seen, last_seen,
               event_count, created_at, updated_at
          FROM incidents
         WHERE id = $1
        "#,
        id.0
    )
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound { what: "incident" })?
    .try_into()
}

pub async fn get_by_number(conn: &mut PgConnection, number: &str) -> Result<Incident> {
    sqlx::query_as!(
        IncidentRow,
        r#"
        SELECT id, number, category, queue, priority, status, title, lat, lon, zone,
               correlation_key, correlating, rule_id, rule_name, first_seen, last_seen,
               event_count, created_at, updated_at
          FROM incidents
         WHERE number = $1
        "#,
        number
    )
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound { what: "incident" })?
    .try_into()
}

/// Which incidents to list.
#[derive(Debug, Clone, Default)]
pub struct IncidentFilter {
    pub queue: Option<QueueName>,
    /// Any of these statuses; empty for all.
    pub statuses: Vec<IncidentStatus>,
    /// This priority or more urgent.
    pub min_priority: Option<Priority>,
}

/// Where a page of incidents starts: after this (priority, created_at, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncidentCursor {
    pub priority: Priority,
    pub created_at: DateTime<Utc>,
    pub id: IncidentId,
}

impl IncidentCursor {
    pub fn after(incident: &Incident) -> Self {
        Self {
            priority: incident.priority,
            created_at: incident.created_at,
            id: incident.id,
        }
    }
}

/// Incidents in queue order: most urgent first, then oldest first.
pub async fn list(
    conn: &mut PgConnection,
    filter: &IncidentFilter,
    after: Option<IncidentCursor>,
    limit: i64,
) -> Result<Vec<Incident>> {
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    let min_priority = filter.min_priority.unwrap_or(Priority::P4).level();
    sqlx::query_as!(
        IncidentRow,
        r#"
        SELECT id, number, category, queue, priority, status, title, lat, lon, zone,
               correlation_key, correlating, rule_id, rule_name, first_seen, last_seen,
               event_count, created_at, updated_at
          FROM incidents
         WHERE ($1::text IS NULL OR queue = $1)
           AND (cardinality($2::text[]) = 0 OR status = ANY($2))
           AND priority <= $3
           AND ($4::smallint IS NULL
                OR (priority, created_at, id) > ($4, $5::timestamptz, $6::uuid))
         ORDER BY priority, created_at, id
         LIMIT $7
        "#,
        filter.queue.as_ref().map(|q| q.as_str()),
        &statuses as &[&str],
        min_priority,
        after.map(|c| c.priority.level()),
        after.map(|c| c.created_at),
        after.map(|c| c.id.0),
        limit,
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(Incident::try_from)
    .collect()
}
