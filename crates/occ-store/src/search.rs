//! Searching stored events, and the record of every search.
//!
//! A search always names a time window, so only the partitions it covers are read; within them
//! one of the events' indexes (time, zone, source, plate) narrows, and the rest is checked on
//! the rows. An area is narrowed here by its bounding box and decided by the domain's geometry
//! ([`Area::contains`]) as the rows come, in batches, until a page is full. A search is run
//! and recorded in one transaction: what was found was also recorded as found.

use chrono::{DateTime, Utc};
use occ_domain::search::{Area, CaseRef, Window};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::error::Result;
use crate::events::{EventRow, StoredEvent};

/// What to look for. Lists are alternatives (any of them); the fields all apply.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Event types as SQL `LIKE` patterns; empty for any.
    pub types: Vec<String>,
    /// The kinds the caller may see, as `LIKE` patterns; `None` for every kind.
    pub kinds: Option<Vec<String>>,
    pub sources: Vec<String>,
    /// Events in any of these zones (their zone, or one of their further zones).
    pub zones: Vec<String>,
    /// A normalised plate.
    pub plate: Option<String>,
    /// A JSON object the event's attributes must contain (`{"camera": "gate"}`).
    pub attributes: Option<serde_json::Value>,
    pub min_confidence: Option<f64>,
}

/// Which end of the window comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// What an investigator searching reads first.
    NewestFirst,
    /// A timeline: a plate's journey, what led up to an incident.
    OldestFirst,
}

/// Position in a search: after (in its order) this event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCursor {
    pub seen_at: DateTime<Utc>,
    pub id: Uuid,
}

/// A found event.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// When OCC takes it to have happened (the time searches go by).
    pub seen_at: DateTime<Utc>,
    /// Its source's name in the registry, if registered.
    pub source_name: Option<String>,
    pub event: StoredEvent,
}

impl Found {
    pub fn cursor(&self) -> EventCursor {
        EventCursor {
            seen_at: self.seen_at,
            id: self.event.id.0,
        }
    }
}

/// A page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub found: Vec<Found>,
    /// Where the next page starts; `None` when the window holds no more.
    pub next: Option<EventCursor>,
}

#[derive(sqlx::FromRow)]
struct Row {
    #[sqlx(flatten)]
    event: EventRow,
    source_name: Option<String>,
    seen_at: DateTime<Utc>,
}

impl From<Row> for Found {
    fn from(r: Row) -> Found {
        Found {
            seen_at: r.seen_at,
            source_name: r.source_name,
            event: r.event.into(),
        }
    }
}

const COLUMNS: &str = "SELECT e.id, e.source_id, s.name AS source_name, e.external_id, \
     e.event_type, e.severity, e.source_kind, e.occurred_at, e.received_at, e.lat, e.lon, \
     e.zone, e.extra_zones, e.district, e.confidence, e.measurements, e.attributes, e.evidence, \
     e.revisions, e.revised_at, e.seen_at \
     FROM events e LEFT JOIN sources s ON s.id = e.source_id";

/// Rows read per round trip while an area's page fills.
const BATCH: i64 = 500;

/// Begins a search's transaction: plans made for its own parameters (a search's filters vary
/// too much for one generic plan), and a statement that runs long is cancelled.
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL statement_timeout = '20s'")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Up to `limit` events of `window` matching `filter` and lying in `area`, in `order`, after
/// `after`. At most `max_read` rows are read for an area; a page may then be short and still
/// have a next one.
#[allow(clippy::too_many_arguments)]
pub async fn events(
    conn: &mut PgConnection,
    window: Window,
    filter: &EventFilter,
    area: Option<&Area>,
    order: Order,
    after: Option<EventCursor>,
    limit: i64,
    max_read: i64,
) -> Result<Page> {
    let limit = limit.max(1);
    let mut found: Vec<Found> = Vec::new();
    let mut position = after;
    let mut read = 0;
    loop {
        // One more than the page needs tells whether another page follows.
        let want = limit + 1 - found.len() as i64;
        let batch = if area.is_some() {
            BATCH.max(want)
        } else {
            want
        };
        let rows = select(&mut *conn, window, filter, area, order, position, batch).await?;
        let exhausted = (rows.len() as i64) < batch;
        read += rows.len() as i64;
        for row in rows {
            let candidate = Found::from(row);
            position = Some(candidate.cursor());
            let inside = match (area, candidate.event.lat, candidate.event.lon) {
                (None, _, _) => true,
                (Some(area), Some(lat), Some(lon)) => {
                    occ_domain::GeoPoint::new(lat, lon).is_ok_and(|p| area.contains(p))
                }
                (Some(_), _, _) => false,
            };
            if inside {
                found.push(candidate);
                if found.len() as i64 > limit {
                    found.pop();
                    let next = found.last().map(Found::cursor);
                    return Ok(Page { found, next });
                }
            }
        }
        if exhausted {
            return Ok(Page { found, next: None });
        }
        if read >= max_read {
            return Ok(Page {
                found,
                next: position,
            });
        }
    }
}

async fn select(
    conn: &mut PgConnection,
    window: Window,
    filter: &EventFilter,
    area: Option<&Area>,
    order: Order,
    after: Option<EventCursor>,
    limit: i64,
) -> Result<Vec<Row>> {
    let mut q = QueryBuilder::<Postgres>::new(COLUMNS);
    q.push(" WHERE e.seen_at >= ")
        .push_bind(window.from)
        .push(" AND e.seen_at < ")
        .push_bind(window.to);
    if !filter.types.is_empty() {
        q.push(" AND e.event_type LIKE ANY(")
            .push_bind(&filter.types)
            .push(")");
    }
    if let Some(kinds) = &filter.kinds {
        q.push(" AND e.event_type LIKE ANY(")
            .push_bind(kinds)
            .push(")");
    }
    if !filter.sources.is_empty() {
        q.push(" AND e.source_id = ANY(")
            .push_bind(&filter.sources)
            .push(")");
    }
    if !filter.zones.is_empty() {
        // Spelled as the partial index on further zones is, so it is used.
        q.push(" AND (e.zone = ANY(")
            .push_bind(&filter.zones)
            .push(") OR (e.extra_zones <> '{}' AND e.extra_zones && ")
            .push_bind(&filter.zones)
            .push("))");
    }
    if let Some(plate) = &filter.plate {
        q.push(" AND e.attributes ? 'plate_normalized' AND e.attributes ->> 'plate_normalized' = ")
            .push_bind(plate);
    }
    if let Some(attributes) = &filter.attributes {
        q.push(" AND e.attributes @> ").push_bind(attributes);
    }
    if let Some(min) = filter.min_confidence {
        q.push(" AND e.confidence >= ").push_bind(min);
    }
    if let Some(area) = area {
        let b = area.bounds();
        q.push(" AND e.lat BETWEEN ")
            .push_bind(b.min_lat)
            .push(" AND ")
            .push_bind(b.max_lat)
            .push(" AND e.lon BETWEEN ")
            .push_bind(b.min_lon)
            .push(" AND ")
            .push_bind(b.max_lon);
    }
    let (cmp, bound, direction) = match order {
        Order::NewestFirst => ("<", "<=", "DESC"),
        Order::OldestFirst => (">", ">=", "ASC"),
    };
    if let Some(c) = after {
        // The plain bound lets an index on (…, seen_at) start there; the pair is exact.
        q.push(format_args!(" AND e.seen_at {bound} "))
            .push_bind(c.seen_at)
            .push(format_args!(" AND (e.seen_at, e.id) {cmp} ("))
            .push_bind(c.seen_at)
            .push(", ")
            .push_bind(c.id)
            .push(")");
    }
    q.push(format_args!(
        " ORDER BY e.seen_at {direction}, e.id {direction} LIMIT "
    ))
    .push_bind(limit);
    Ok(q.build_query_as::<Row>().fetch_all(conn).await?)
}

/// One event by id, wherever it is stored.
pub async fn event(conn: &mut PgConnection, id: Uuid) -> Result<Option<Found>> {
    // OCC's ids are UUID v7, made as the event was received; it happened at most a day
    // before (Event::observed_at): so only the partitions of that day are read.
    if let Some((secs, nanos)) = id.get_timestamp().map(|t| t.to_unix())
        && let Some(made) = DateTime::<Utc>::from_timestamp(secs as i64, nanos)
    {
        let window = Window {
            from: made - chrono::TimeDelta::hours(25),
            to: made + chrono::TimeDelta::hours(1),
        };
        let mut q = QueryBuilder::<Postgres>::new(COLUMNS);
        q.push(" WHERE e.id = ")
            .push_bind(id)
            .push(" AND e.seen_at >= ")
            .push_bind(window.from)
            .push(" AND e.seen_at < ")
            .push_bind(window.to);
        if let Some(row) = q.build_query_as::<Row>().fetch_optional(&mut *conn).await? {
            return Ok(Some(row.into()));
        }
    }
    let mut q = QueryBuilder::<Postgres>::new(COLUMNS);
    q.push(" WHERE e.id = ").push_bind(id);
    Ok(q.build_query_as::<Row>()
        .fetch_optional(conn)
        .await?
        .map(Found::from))
}

/// An incident an event is part of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub id: Uuid,
    pub number: String,
    pub queue: String,
}

/// The incidents `event` is part of.
pub async fn incidents_of(conn: &mut PgConnection, event: Uuid) -> Result<Vec<Linked>> {
    Ok(sqlx::query_as!(
        Linked,
        r#"
        SELECT i.id, i.number, i.queue
          FROM incident_events l JOIN incidents i ON i.id = l.incident_id
         WHERE l.event_id = $1
         ORDER BY i.created_at
        "#,
        event
    )
    .fetch_all(conn)
    .await?)
}

/// What the record of a search holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Search<'a> {
    pub at: DateTime<Utc>,
    /// Who searched (`key:…`, `user:…`).
    pub actor: &'a str,
    pub case: &'a CaseRef,
    /// The method: `SearchEvents`, `PlateHistory`, …
    pub method: &'a str,
    /// Everything it asked, as given.
    pub parameters: serde_json::Value,
    /// How many results went back.
    pub results: usize,
}

/// The case's chain in the audit log: every search made for it.
pub fn case_entity(case: &CaseRef) -> Entity {
    Entity::Case(audit::named_id("case", case.as_str()))
}

/// Records a search in the audit log, in the case's chain (call in the search's transaction).
pub async fn record(conn: &mut PgConnection, s: &Search<'_>) -> Result<()> {
    audit::append(
        conn,
        &[AuditEntry {
            entity: case_entity(s.case),
            at: s.at,
            actor: s.actor.to_owned(),
            action: "events.searched".into(),
            before: None,
            after: Some(json!({
                "case": s.case.as_str(),
                "method": s.method,
                "parameters": s.parameters,
                "results": s.results,
            })),
            detail: s.method.to_owned(),
        }],
    )
    .await
}

/// A recorded search, as the oversight report lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub audit_id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub case: String,
    pub method: String,
    pub parameters: serde_json::Value,
    pub results: i64,
}

/// Which recorded searches to list.
#[derive(Debug, Clone, Default)]
pub struct RecordedFilter {
    pub case: Option<String>,
    pub actor: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Recorded searches, newest first.
pub async fn recorded(
    conn: &mut PgConnection,
    filter: &RecordedFilter,
    limit: i64,
) -> Result<Vec<Recorded>> {
    let case_id = filter
        .case
        .as_deref()
        .map(|c| audit::named_id("case", c.trim()));
    let rows = sqlx::query!(
        r#"
        SELECT id, at, actor, after AS "after!"
          FROM audit_log
         WHERE entity_type = 'case' AND action = 'events.searched' AND after IS NOT NULL
           AND ($1::uuid IS NULL OR entity_id = $1)
           AND ($2::text IS NULL OR actor = $2)
           AND ($3::timestamptz IS NULL OR at >= $3)
           AND ($4::timestamptz IS NULL OR at < $4)
         ORDER BY at DESC, id DESC
         LIMIT $5
        "#,
        case_id,
        filter.actor,
        filter.since,
        filter.until,
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let text = |k: &str| {
                r.after
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned()
            };
            Recorded {
                audit_id: r.id,
                at: r.at,
                actor: r.actor,
                case: text("case"),
                method: text("method"),
                parameters: r.after.get("parameters").cloned().unwrap_or_default(),
                results: r.after.get("results").and_then(|v| v.as_i64()).unwrap_or(0),
            }
        })
        .collect())
}
