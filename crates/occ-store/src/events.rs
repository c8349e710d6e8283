//! Events: idempotent batch inserts and look-ups.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use occ_domain::{Enriched, Event, EventId, Revision};
use sqlx::PgConnection;

use crate::error::Result;

/// How an event reached OCC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    Grpc,
    /// Events OCC makes itself (a source gone silent).
    System,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Grpc => "grpc",
            Transport::System => "system",
        }
    }
}

/// An event a batch stored: inserted, or an evolving event brought to a newer revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The stored event's id (for a revision, the id it was first stored under).
    pub id: EventId,
    /// True when the row existed and took this newer revision.
    pub revised: bool,
}

/// Inserts `events` in one statement (and brings evolving events already stored to a newer
/// revision in a second), returning what was stored by (source, idempotency key).
/// An event whose key is already stored is skipped (a redelivery), unless it is an evolving
/// event with a newer revision: then the row takes its state. With each event, how many
/// revisions it stands for (the batch's fresh ones of that event). `events` must not repeat a
/// key.
///
/// Rows are inserted in key order, so two transactions inserting overlapping redeliveries take
/// their row locks in the same order and cannot deadlock. The events first stored are added to
/// the wall's counts ([`crate::counts`]) by the same statement.
pub async fn insert(
    conn: &mut PgConnection,
    events: &[(&Event, i32)],
    transport: Transport,
) -> Result<HashMap<(String, String), Stored>> {
    if events.is_empty() {
        return Ok(HashMap::new());
    }
    let mut sorted: Vec<(&Event, i32)> = events.to_vec();
    sorted.sort_by(|(a, _), (b, _)| {
        (a.source_id.as_str(), a.idempotency_key.as_str())
            .cmp(&(b.source_id.as_str(), b.idempotency_key.as_str()))
    });

    let mut rows = Columns::with_capacity(sorted.len());
    for &(e, count) in &sorted {
        rows.push(e, count);
    }
    // The key first: a new key stores the event; a known one is a redelivery, unless it is an
    // evolving event's newer revision, which the stored row then takes (below). Every part of
    // the statement runs to completion whatever the result reads.
    let keyed = sqlx::query!(
        r#"
        WITH u AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[],
                                 $10::float8[], $11::float8[], $12::text[], $13::jsonb[],
                                 $14::text[], $15::float8[], $16::jsonb[], $17::jsonb[],
                                 $18::jsonb[], $19::timestamptz[], $20::int2[], $22::int4[],
                                 $23::timestamptz[])
                AS u(id, source_id, idempotency_key, external_id, event_type, severity,
                     source_kind, occurred_at, received_at, lat, lon, zone, extra_zones,
                     district, confidence, measurements, attributes, evidence, revision_at,
                     revision_rank, revisions, seen_at)
        ),
        k AS (
            INSERT INTO event_keys AS k (source_id, idempotency_key, event_id, seen_at,
                                         revision_at, revision_rank, used_at)
            SELECT source_id, idempotency_key, id, seen_at, revision_at, revision_rank,
                   received_at
              FROM u
            ON CONFLICT (source_id, idempotency_key) DO UPDATE
               SET revision_at = EXCLUDED.revision_at,
                   revision_rank = EXCLUDED.revision_rank,
                   used_at = EXCLUDED.used_at
             -- Only a newer revision of an evolving event; NULL (not evolving) never is.
             WHERE (k.revision_at, k.revision_rank)
                   < (EXCLUDED.revision_at, EXCLUDED.revision_rank)
            RETURNING k.event_id, k.seen_at, k.source_id, k.idempotency_key,
                      (xmax <> 0) AS revised
        ),
        stored AS (
            INSERT INTO events (id, source_id, idempotency_key, external_id, event_type,
                                severity, source_kind, occurred_at, received_at, lat, lon, zone,
                                extra_zones, district, confidence, measurements, attributes,
                                evidence, revision_at, revision_rank, revisions, revised_at,
                                transport, seen_at)
            SELECT u.id, u.source_id, u.idempotency_key, u.external_id, u.event_type,
                   u.severity, u.source_kind, u.occurred_at, u.received_at, u.lat, u.lon,
                   u.zone,
                   CASE WHEN u.extra_zones IS NULL THEN '{}'::text[]
                        ELSE ARRAY(SELECT jsonb_array_elements_text(u.extra_zones)) END,
                   u.district, u.confidence, coalesce(u.measurements, '{}'),
                   coalesce(u.attributes, '{}'), coalesce(u.evidence, '[]'), u.revision_at,
                   u.revision_rank, u.revisions,
                   CASE WHEN u.revisions > 1 THEN u.received_at END, $21, u.seen_at
              FROM u JOIN k ON k.source_id = u.source_id
                           AND k.idempotency_key = u.idempotency_key
             WHERE NOT k.revised
        ),
        -- The wall's counts: events first stored, by hour, zone and type (appended, never
        -- updated: concurrent batches do not wait on each other).
        counted AS (
            INSERT INTO event_count_deltas (hour, zone, event_type, n)
            SELECT date_trunc('hour', u.seen_at, (SELECT time_zone FROM wall_settings)),
                   coalesce(u.zone, ''), u.event_type, count(*)
              FROM u JOIN k ON k.source_id = u.source_id
                           AND k.idempotency_key = u.idempotency_key
             WHERE NOT k.revised
             GROUP BY 1, 2, 3
        )
        SELECT event_id AS "id!", source_id AS "source_id!",
               idempotency_key AS "idempotency_key!", seen_at AS "seen_at!",
               revised AS "revised!"
          FROM k
        "#,
        &rows.ids,
        &rows.sources as &[&str],
        &rows.keys as &[&str],
        &rows.external_ids as &[Option<&str>],
        &rows.types as &[&str],
        &rows.severities as &[Option<&str>],
        &rows.kinds as &[Option<&str>],
        &rows.occurred,
        &rows.received,
        &rows.lats as &[Option<f64>],
        &rows.lons as &[Option<f64>],
        &rows.zones as &[Option<&str>],
        &rows.extra_zones as &[Option<serde_json::Value>],
        &rows.districts as &[Option<&str>],
        &rows.confidences as &[Option<f64>],
        &rows.measurements as &[Option<serde_json::Value>],
        &rows.attributes as &[Option<serde_json::Value>],
        &rows.evidence as &[Option<serde_json::Value>],
        &rows.revision_at as &[Option<DateTime<Utc>>],
        &rows.revision_rank as &[Option<i16>],
        transport.as_str(),
        &rows.counts,
        &rows.seen,
    )
    .fetch_all(&mut *conn)
    .await?;

    // The rows that take a newer revision, in a statement of their own: one that began before
    // another transaction stored the key, and waited for it to commit, does not see that
    // row (a statement reads the database as it was when it began), so within the statement
    // above the newer state would be lost.
    let mut revised = Columns::with_capacity(0);
    let (mut revised_ids, mut revised_seen) = (Vec::new(), Vec::new());
    for r in keyed.iter().filter(|r| r.revised) {
        // `sorted` is in key order: found without building a map for every batch.
        let key = (r.source_id.as_str(), r.idempotency_key.as_str());
        if let Ok(i) = sorted
            .binary_search_by(|(e, _)| (e.source_id.as_str(), e.idempotency_key.as_str()).cmp(&key))
        {
            let (e, n) = sorted[i];
            revised.push(e, n);
            revised_ids.push(r.id);
            revised_seen.push(r.seen_at);
        }
    }
    if !revised_ids.is_empty() {
        sqlx::query!(
            r#"
            UPDATE events e
               SET event_type = u.event_type,
                   severity = u.severity,
                   source_kind = u.source_kind,
                   occurred_at = u.occurred_at,
                   lat = u.lat,
                   lon = u.lon,
                   zone = u.zone,
                   extra_zones = CASE WHEN u.extra_zones IS NULL THEN '{}'::text[]
                                      ELSE ARRAY(SELECT jsonb_array_elements_text(u.extra_zones))
                                 END,
                   district = u.district,
                   confidence = u.confidence,
                   measurements = coalesce(u.measurements, '{}'),
                   attributes = coalesce(u.attributes, '{}'),
                   evidence = coalesce(u.evidence, '[]'),
                   revision_at = u.revision_at,
                   revision_rank = u.revision_rank,
                   revisions = e.revisions + u.revisions,
                   revised_at = u.received_at
              FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                          $6::timestamptz[], $7::timestamptz[], $8::float8[], $9::float8[],
                          $10::text[], $11::jsonb[], $12::text[], $13::float8[], $14::jsonb[],
                          $15::jsonb[], $16::jsonb[], $17::timestamptz[], $18::int2[],
                          $19::int4[])
                   AS u(id, seen_at, event_type, severity, source_kind, occurred_at,
                        received_at, lat, lon, zone, extra_zones, district, confidence,
                        measurements, attributes, evidence, revision_at, revision_rank,
                        revisions)
             -- The row by its primary key, in the one partition its time names. Written as
             -- a range, not `e.seen_at = u.seen_at`: with an equality the planner, which
             -- takes stored times to be unique, looks the row up through the index on time
             -- and then reads every event of that same instant (a burst of 20,000 events of
             -- one timestamp: 20,000 rows read for one update).
             WHERE e.id = u.id AND e.seen_at >= u.seen_at AND e.seen_at <= u.seen_at
            "#,
            &revised_ids,
            &revised_seen,
            &revised.types as &[&str],
            &revised.severities as &[Option<&str>],
            &revised.kinds as &[Option<&str>],
            &revised.occurred,
            &revised.received,
            &revised.lats as &[Option<f64>],
            &revised.lons as &[Option<f64>],
            &revised.zones as &[Option<&str>],
            &revised.extra_zones as &[Option<serde_json::Value>],
            &revised.districts as &[Option<&str>],
            &revised.confidences as &[Option<f64>],
            &revised.measurements as &[Option<serde_json::Value>],
            &revised.attributes as &[Option<serde_json::Value>],
            &revised.evidence as &[Option<serde_json::Value>],
            &revised.revision_at as &[Option<DateTime<Utc>>],
            &revised.revision_rank as &[Option<i16>],
            &revised.counts,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(keyed
        .into_iter()
        .map(|r| {
            (
                (r.source_id, r.idempotency_key),
                Stored {
                    id: EventId(r.id),
                    revised: r.revised,
                },
            )
        })
        .collect())
}

/// Events as the columns of their rows, one array each, bound to `UNNEST`.
struct Columns<'a> {
    ids: Vec<uuid::Uuid>,
    sources: Vec<&'a str>,
    keys: Vec<&'a str>,
    external_ids: Vec<Option<&'a str>>,
    types: Vec<&'a str>,
    severities: Vec<Option<&'a str>>,
    kinds: Vec<Option<&'a str>>,
    occurred: Vec<DateTime<Utc>>,
    received: Vec<DateTime<Utc>>,
    lats: Vec<Option<f64>>,
    lons: Vec<Option<f64>>,
    zones: Vec<Option<&'a str>>,
    // Empty ones travel as NULL (the column's default is bound in SQL): PostgreSQL parses
    // each JSON value bound, some 1.5 µs for an empty `{}`, where a NULL costs nothing.
    extra_zones: Vec<Option<serde_json::Value>>,
    districts: Vec<Option<&'a str>>,
    confidences: Vec<Option<f64>>,
    measurements: Vec<Option<serde_json::Value>>,
    attributes: Vec<Option<serde_json::Value>>,
    evidence: Vec<Option<serde_json::Value>>,
    revision_at: Vec<Option<DateTime<Utc>>>,
    revision_rank: Vec<Option<i16>>,
    /// How many revisions each row stands for.
    counts: Vec<i32>,
    seen: Vec<DateTime<Utc>>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            external_ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            severities: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            occurred: Vec::with_capacity(n),
            received: Vec::with_capacity(n),
            lats: Vec::with_capacity(n),
            lons: Vec::with_capacity(n),
            zones: Vec::with_capacity(n),
            extra_zones: Vec::with_capacity(n),
            districts: Vec::with_capacity(n),
            confidences: Vec::with_capacity(n),
            measurements: Vec::with_capacity(n),
            attributes: Vec::with_capacity(n),
            evidence: Vec::with_capacity(n),
            revision_at: Vec::with_capacity(n),
            revision_rank: Vec::with_capacity(n),
            counts: Vec::with_capacity(n),
            seen: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, e: &'a Event, count: i32) {
        self.counts.push(count);
        self.seen.push(e.observed_at());
        self.ids.push(e.id.0);
        self.sources.push(e.source_id.as_str());
        self.keys.push(e.idempotency_key.as_str());
        self.external_ids.push(e.external_id.as_deref());
        self.types.push(e.event_type.as_str());
        self.severities.push(e.severity.map(|s| s.as_str()));
        self.kinds.push(e.source_kind.as_ref().map(|k| k.as_str()));
        self.occurred.push(e.occurred_at);
        self.received.push(e.received_at);
        self.lats.push(e.location.map(|l| l.lat()));
        self.lons.push(e.location.map(|l| l.lon()));
        self.zones.push(e.zone.as_ref().map(|z| z.as_str()));
        // One array per row cannot travel through UNNEST; a JSON array can.
        self.extra_zones.push(
            (!e.extra_zones.is_empty())
                .then(|| serde_json::to_value(&e.extra_zones).unwrap_or_default()),
        );
        self.districts.push(e.district.as_ref().map(|d| d.as_str()));
        self.confidences.push(e.confidence.map(|c| c.value()));
        self.measurements.push(
            (!e.measurements.is_empty())
                .then(|| serde_json::to_value(&e.measurements).unwrap_or_default()),
        );
        self.attributes.push(
            (!e.attributes.is_empty()).then(|| serde_json::Value::Object(e.attributes.clone())),
        );
        self.evidence.push(
            (!e.evidence.is_empty()).then(|| serde_json::to_value(&e.evidence).unwrap_or_default()),
        );
        self.revision_at.push(e.revision.map(|r| r.at));
        self.revision_rank.push(e.revision.map(|r| r.rank));
    }
}

/// The stored id and revision of evolving events already stored, by (source, key).
pub async fn revisions<'a>(
    conn: &mut PgConnection,
    keys: impl Iterator<Item = &'a (String, String)>,
) -> Result<HashMap<(String, String), (EventId, Revision)>> {
    let (sources, keys): (Vec<&str>, Vec<&str>) =
        keys.map(|(s, k)| (s.as_str(), k.as_str())).unzip();
    if sources.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!(
        r#"
        SELECT e.event_id AS "id!", k.source_id AS "source_id!",
               k.idempotency_key AS "idempotency_key!",
               e.revision_at AS "revision_at!", e.revision_rank AS "revision_rank!"
          FROM UNNEST($1::text[], $2::text[]) AS k(source_id, idempotency_key)
          -- One look-up in the key's index each: never a scan of the keys, whatever the
          -- planner thinks of their number (LIMIT keeps the subquery from being flattened).
          JOIN LATERAL (SELECT event_id, revision_at, revision_rank FROM event_keys e
                         WHERE e.source_id = k.source_id
                           AND e.idempotency_key = k.idempotency_key
                         LIMIT 1) e ON true
         WHERE e.revision_at IS NOT NULL
        "#,
        &sources as &[&str],
        &keys as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                (r.source_id, r.idempotency_key),
                (
                    EventId(r.id),
                    Revision {
                        at: r.revision_at,
                        rank: r.revision_rank,
                    },
                ),
            )
        })
        .collect())
}

/// The stored ids of events already known by (source, idempotency key), within the window
/// keys are kept for.
pub async fn existing_ids(
    conn: &mut PgConnection,
    events: &[&Event],
) -> Result<HashMap<(String, String), EventId>> {
    if events.is_empty() {
        return Ok(HashMap::new());
    }
    let sources: Vec<&str> = events.iter().map(|e| e.source_id.as_str()).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.idempotency_key.as_str()).collect();
    let rows = sqlx::query!(
        r#"
        SELECT e.event_id AS "id!", k.source_id AS "source_id!",
               k.idempotency_key AS "idempotency_key!"
          FROM UNNEST($1::text[], $2::text[]) AS k(source_id, idempotency_key)
          -- One look-up in the key's index each (see revisions).
          JOIN LATERAL (SELECT event_id FROM event_keys e
                         WHERE e.source_id = k.source_id
                           AND e.idempotency_key = k.idempotency_key
                         LIMIT 1) e ON true
        "#,
        &sources as &[&str],
        &keys as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.source_id, r.idempotency_key), EventId(r.id)))
        .collect())
}

/// First deliveries of messages without a producer's id whose key is already stored belong to
/// an earlier message with the same bytes that had the same packet id in OCC's session (the
/// broker reuses packet ids once acknowledged): they are new events, so they get keys of their
/// own. `None` when no event of the batch needs one (the common case: no copy is made).
pub async fn rekey_repeats(
    conn: &mut PgConnection,
    events: &[Enriched],
) -> Result<Option<Vec<Enriched>>> {
    let first: Vec<&Event> = events
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.idempotency_key.is_first_delivery())
        .collect();
    let taken = existing_ids(conn, &first).await?;
    if taken.is_empty() {
        return Ok(None);
    }
    let mut events = events.to_vec();
    for e in &mut events {
        let key = (
            e.event.source_id.to_string(),
            e.event.idempotency_key.as_str().to_owned(),
        );
        // Taken by this very event: a retry of a batch that did commit (its redelivery is
        // then a duplicate, as it should be).
        let by_another = taken.get(&key).is_some_and(|id| *id != e.event.id);
        if e.event.idempotency_key.is_first_delivery() && by_another {
            e.event.idempotency_key = e.event.idempotency_key.another(e.event.id);
        }
    }
    Ok(Some(events))
}

/// An event linked to an incident, as its timeline shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredEvent {
    pub id: EventId,
    pub source_id: String,
    pub external_id: Option<String>,
    pub event_type: String,
    pub severity: Option<String>,
    pub source_kind: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub zone: Option<String>,
    pub extra_zones: Vec<String>,
    pub district: Option<String>,
    pub confidence: Option<f64>,
    pub measurements: serde_json::Value,
    pub attributes: serde_json::Value,
    /// References to snapshots and clips kept by the producer.
    pub evidence: Vec<occ_domain::Evidence>,
    /// How many messages made it (an evolving event's revisions).
    pub revisions: i32,
    /// When its latest revision arrived, if it has more than one.
    pub revised_at: Option<DateTime<Utc>>,
}

/// A stored event's columns, as every query that reads whole events selects them.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub id: uuid::Uuid,
    pub source_id: String,
    pub external_id: Option<String>,
    pub event_type: String,
    pub severity: Option<String>,
    pub source_kind: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub zone: Option<String>,
    pub extra_zones: Vec<String>,
    pub district: Option<String>,
    pub confidence: Option<f64>,
    pub measurements: serde_json::Value,
    pub attributes: serde_json::Value,
    pub evidence: serde_json::Value,
    pub revisions: i32,
    pub revised_at: Option<DateTime<Utc>>,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> StoredEvent {
        StoredEvent {
            id: EventId(r.id),
            source_id: r.source_id,
            external_id: r.external_id,
            event_type: r.event_type,
            severity: r.severity,
            source_kind: r.source_kind,
            occurred_at: r.occurred_at,
            received_at: r.received_at,
            lat: r.lat,
            lon: r.lon,
            zone: r.zone,
            extra_zones: r.extra_zones,
            district: r.district,
            confidence: r.confidence,
            measurements: r.measurements,
            attributes: r.attributes,
            evidence: serde_json::from_value(r.evidence).unwrap_or_default(),
            revisions: r.revisions,
            revised_at: r.revised_at,
        }
    }
}

/// How many events are stored for a source (operations and tests).
pub async fn count_for_source(conn: &mut PgConnection, source_id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM events WHERE source_id = $1"#,
        source_id
    )
    .fetch_one(conn)
    .await?)
}
