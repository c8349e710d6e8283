//! Incidents: correlation-safe opening and joining, reads, listing and timelines.

use chrono::TimeDelta;
use chrono::{DateTime, Utc};
use occ_domain::{
    Category, ClaimInfo, GeoPoint, Incident, IncidentId, IncidentNumber, IncidentStatus,
    OpenIncident, Priority, QueueName, RuleId, Zone,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{Result, StoreError};

pub(crate) struct IncidentRow {
    pub(crate) id: Uuid,
    pub(crate) number: String,
    pub(crate) category: String,
    pub(crate) queue: String,
    pub(crate) priority: i16,
    pub(crate) status: String,
    pub(crate) title: String,
    pub(crate) lat: Option<f64>,
    pub(crate) lon: Option<f64>,
    pub(crate) zone: Option<String>,
    pub(crate) correlation_key: String,
    pub(crate) correlating: bool,
    pub(crate) rule_id: Option<Uuid>,
    pub(crate) rule_name: String,
    pub(crate) first_seen: DateTime<Utc>,
    pub(crate) last_seen: DateTime<Utc>,
    pub(crate) event_count: i32,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) claim_within_seconds: i32,
    pub(crate) claim_deadline: Option<DateTime<Utc>>,
    pub(crate) escalated_at: Option<DateTime<Utc>>,
    pub(crate) acknowledged_at: Option<DateTime<Utc>>,
    pub(crate) acknowledged_by: Option<String>,
    pub(crate) claim_id: Option<Uuid>,
    pub(crate) claim_holder: Option<String>,
    pub(crate) claimed_at: Option<DateTime<Utc>>,
    pub(crate) lease_until: Option<DateTime<Utc>>,
}

/// An [`IncidentRow`] from a query's record whose columns are named as in [`load`] (a
/// statement that also locks, or returns more than the incident).
macro_rules! incident_row {
    ($r:ident, claim: $claim:expr) => {
        $crate::incidents::IncidentRow {
            id: $r.id,
            number: $r.number,
            category: $r.category,
            queue: $r.queue,
            priority: $r.priority,
            status: $r.status,
            title: $r.title,
            lat: $r.lat,
            lon: $r.lon,
            zone: $r.zone,
            correlation_key: $r.correlation_key,
            correlating: $r.correlating,
            rule_id: $r.rule_id,
            rule_name: $r.rule_name,
            first_seen: $r.first_seen,
            last_seen: $r.last_seen,
            event_count: $r.event_count,
            created_at: $r.created_at,
            updated_at: $r.updated_at,
            claim_within_seconds: $r.claim_within_seconds,
            claim_deadline: $r.claim_deadline,
            escalated_at: $r.escalated_at,
            acknowledged_at: $r.acknowledged_at,
            acknowledged_by: $r.acknowledged_by,
            claim_id: $claim.map(|c: &occ_domain::ClaimInfo| c.id),
            claim_holder: $claim.map(|c: &occ_domain::ClaimInfo| c.holder.clone()),
            claimed_at: $claim.map(|c: &occ_domain::ClaimInfo| c.claimed_at),
            lease_until: $claim.map(|c: &occ_domain::ClaimInfo| c.lease_until),
        }
    };
}
pub(crate) use incident_row;

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
            claim_within: TimeDelta::seconds(i64::from(r.claim_within_seconds)),
            claim_deadline: r.claim_deadline,
            escalated_at: r.escalated_at,
            acknowledged_at: r.acknowledged_at,
            acknowledged_by: r.acknowledged_by,
            claim: match (r.claim_id, r.claim_holder, r.claimed_at, r.lease_until) {
                (Some(id), Some(holder), Some(claimed_at), Some(lease_until)) => Some(ClaimInfo {
                    id,
                    holder,
                    claimed_at,
                    lease_until,
                }),
                _ => None,
            },
        })
    }
}

/// The incidents with these ids, with their active claims, in the order of `ids` (missing
/// ones left out). The one place that reads the whole of an incident.
pub async fn load(conn: &mut PgConnection, ids: &[IncidentId]) -> Result<Vec<Incident>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let uuids: Vec<Uuid> = ids.iter().map(|i| i.0).collect();
    let rows = sqlx::query_as!(
        IncidentRow,
        r#"
        SELECT i.id, i.number, i.category, i.queue, i.priority, i.status, i.title, i.lat, i.lon,
               i.zone, i.correlation_key, i.correlating, i.rule_id, i.rule_name, i.first_seen,
               i.last_seen, i.event_count, i.created_at, i.updated_at, i.claim_within_seconds,
               i.claim_deadline, i.escalated_at, i.acknowledged_at, i.acknowledged_by,
               c.id AS "claim_id?", c.holder AS "claim_holder?", c.claimed_at AS "claimed_at?",
               c.lease_until AS "lease_until?"
          FROM incidents i
          LEFT JOIN claims c ON c.incident_id = i.id AND c.ended_at IS NULL
         WHERE i.id = ANY($1)
        "#,
        &uuids
    )
    .fetch_all(conn)
    .await?;
    let mut by_id: std::collections::HashMap<Uuid, IncidentRow> =
        rows.into_iter().map(|r| (r.id, r)).collect();
    uuids
        .iter()
        .filter_map(|id| by_id.remove(id))
        .map(Incident::try_from)
        .collect()
}

async fn load_one(conn: &mut PgConnection, id: Option<Uuid>) -> Result<Incident> {
    let id = id.ok_or(StoreError::NotFound { what: "incident" })?;
    load(conn, &[IncidentId(id)])
        .await?
        .pop()
        .ok_or(StoreError::NotFound { what: "incident" })
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
    let id = sqlx::query_scalar!(
        "SELECT id FROM incidents WHERE correlation_key = $1 AND correlating",
        key
    )
    .fetch_optional(&mut *conn)
    .await?;
    match id {
        None => Ok(None),
        Some(id) => Ok(load(conn, &[IncidentId(id)]).await?.pop()),
    }
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
    /// How long it may wait to be claimed before it escalates.
    pub claim_within: TimeDelta,
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
        WITH opened AS (
            INSERT INTO incidents (id, number, category, queue, priority, status, title, lat, lon,
                                   zone, correlation_key, correlating, rule_id, rule_name,
                                   first_seen, last_seen, event_count, created_at, updated_at,
                                   claim_within_seconds, claim_deadline)
            VALUES ($1, $2, $3, $4, $5, $19, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17, $17, $18, $20)
            ON CONFLICT (correlation_key) WHERE correlating DO NOTHING
            RETURNING id, zone, category, queue, priority, created_at
        ),
        -- The wall's counts: one more incident opened this hour in its zone, category, queue
        -- and priority (appended, never updated).
        counted AS (
            INSERT INTO incident_count_deltas (hour, zone, category, queue, priority, n)
            SELECT date_trunc('hour', created_at, (SELECT time_zone FROM wall_settings)),
                   coalesce(zone, ''), category, queue, priority, 1
              FROM opened
        )
        SELECT id AS "id!" FROM opened
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
        i32::try_from(new.claim_within.num_seconds()).unwrap_or(i32::MAX),
        // A new incident waits in its queue until claimed or escalated.
        occ_domain::IncidentStatus::Queued.as_str(),
        occ_domain::claim::claim_deadline(new.now, new.claim_within),
    )
    .fetch_optional(conn)
    .await?;
    Ok(inserted.map(|_| number))
}

/// Events joining an incident.
#[derive(Debug, Clone)]
pub struct Join {
    pub id: IncidentId,
    pub added: i32,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub priority: Priority,
    pub correlating: bool,
    /// When the events raised its priority: how soon it must now be claimed. A waiting
    /// incident's deadline moves up accordingly (never back).
    pub claim_within: Option<TimeDelta>,
}

/// An incident events joined, as it now is.
#[derive(Debug, Clone)]
pub struct Joined {
    pub number: IncidentNumber,
    pub queue: String,
    pub event_count: i32,
}

/// Adds events to an incident, widening its seen interval and raising (never lowering) its
/// priority.
pub async fn join(conn: &mut PgConnection, j: &Join, now: DateTime<Utc>) -> Result<Joined> {
    let within = j
        .claim_within
        .map(|d| i32::try_from(d.num_seconds()).unwrap_or(i32::MAX));
    let joined = sqlx::query!(
        r#"
        UPDATE incidents
           SET event_count = event_count + $2,
               first_seen = LEAST(first_seen, $3),
               last_seen = GREATEST(last_seen, $4),
               priority = LEAST(priority, $5),
               correlating = $6,
               updated_at = $7,
               claim_within_seconds = LEAST(claim_within_seconds, COALESCE($8, claim_within_seconds)),
               -- Only a waiting incident has a deadline (LEAST would ignore the NULL).
               claim_deadline = CASE WHEN claim_deadline IS NULL THEN NULL
                                     ELSE LEAST(claim_deadline, $7::timestamptz
                                                + make_interval(secs => COALESCE($8::int4, claim_within_seconds)))
                                END
         WHERE id = $1
        RETURNING number, queue, event_count
        "#,
        j.id.0,
        j.added,
        j.first_seen,
        j.last_seen,
        j.priority.level(),
        j.correlating,
        now,
        within,
    )
    .fetch_one(conn)
    .await?;
    Ok(Joined {
        number: IncidentNumber::from_stored(joined.number),
        queue: joined.queue,
        event_count: joined.event_count,
    })
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

/// The correlation keys of the incidents each of these events is linked to.
pub async fn linked_keys(
    conn: &mut PgConnection,
    events: &[occ_domain::EventId],
) -> Result<std::collections::HashSet<(occ_domain::EventId, String)>> {
    if events.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.0).collect();
    let rows = sqlx::query!(
        r#"
        SELECT ie.event_id, i.correlation_key
          FROM incident_events ie
          JOIN incidents i ON i.id = ie.incident_id
         WHERE ie.event_id = ANY($1)
        "#,
        &ids
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (occ_domain::EventId(r.event_id), r.correlation_key))
        .collect())
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
    load_one(conn, Some(id.0)).await
}

pub async fn get_by_number(conn: &mut PgConnection, number: &str) -> Result<Incident> {
    let id = sqlx::query_scalar!("SELECT id FROM incidents WHERE number = $1", number)
        .fetch_optional(&mut *conn)
        .await?;
    load_one(conn, id).await
}

/// Which incidents to list.
#[derive(Debug, Clone, Default)]
pub struct IncidentFilter {
    pub queue: Option<QueueName>,
    /// Only incidents of these queues (the caller's scope); `None` for every queue.
    pub within: Option<Vec<String>>,
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
    let ids = sqlx::query_scalar!(
        r#"
        SELECT id
          FROM incidents
         WHERE ($1::text IS NULL OR queue = $1)
           AND (cardinality($2::text[]) = 0 OR status = ANY($2))
           AND priority <= $3
           AND ($4::smallint IS NULL
                OR (priority, created_at, id) > ($4, $5::timestamptz, $6::uuid))
           AND ($8::text[] IS NULL OR queue = ANY($8))
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
        filter.within.as_deref(),
    )
    // Planned for its values each time: a plan for any filter would scan every incident in
    // urgency order instead of the queue's index from the page's cursor on.
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<IncidentId> = ids.into_iter().map(IncidentId).collect();
    load(conn, &ids).await
}
