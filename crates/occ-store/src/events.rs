//! Events: idempotent batch inserts and look-ups.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use occ_domain::{Event, EventId};
use sqlx::PgConnection;

use crate::error::Result;

/// How an event reached OCC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    Grpc,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Grpc => "grpc",
        }
    }
}

/// Inserts `events` in one statement; an event whose (source, idempotency key) is already
/// stored is skipped. Returns the ids that were inserted.
///
/// Rows are inserted in key order, so two transactions inserting overlapping redeliveries take
/// their row locks in the same order and cannot deadlock.
pub async fn insert(
    conn: &mut PgConnection,
    events: &[&Event],
    transport: Transport,
) -> Result<Vec<EventId>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<&Event> = events.to_vec();
    sorted.sort_by(|a, b| {
        (a.source_id.as_str(), a.idempotency_key.as_str())
            .cmp(&(b.source_id.as_str(), b.idempotency_key.as_str()))
    });

    let n = sorted.len();
    let mut ids = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut external_ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut severities = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut occurred = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut lats = Vec::with_capacity(n);
    let mut lons = Vec::with_capacity(n);
    let mut zones = Vec::with_capacity(n);
    let mut confidences = Vec::with_capacity(n);
    let mut measurements = Vec::with_capacity(n);
    let mut attributes = Vec::with_capacity(n);
    for e in sorted {
        ids.push(e.id.0);
        sources.push(e.source_id.as_str());
        keys.push(e.idempotency_key.as_str());
        external_ids.push(e.external_id.as_deref());
        types.push(e.event_type.as_str());
        severities.push(e.severity.map(|s| s.as_str()));
        kinds.push(e.source_kind.as_ref().map(|k| k.as_str()));
        occurred.push(e.occurred_at);
        received.push(e.received_at);
        lats.push(e.location.map(|l| l.lat()));
        lons.push(e.location.map(|l| l.lon()));
        zones.push(e.zone.as_ref().map(|z| z.as_str()));
        confidences.push(e.confidence.map(|c| c.value()));
        measurements.push(serde_json::to_value(&e.measurements).unwrap_or_default());
        attributes.push(serde_json::Value::Object(e.attributes.clone()));
    }

    let inserted = sqlx::query_scalar!(
        r#"
        INSERT INTO events (id, source_id, idempotency_key, external_id, event_type, severity,
                            source_kind, occurred_at, received_at, lat, lon, zone, confidence,
                            measurements, attributes, transport)
        SELECT u.*, $16
          FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                      $7::text[], $8::timestamptz[], $9::timestamptz[], $10::float8[],
                      $11::float8[], $12::text[], $13::float8[], $14::jsonb[], $15::jsonb[]) AS u
        ON CONFLICT (source_id, idempotency_key) DO NOTHING
        RETURNING id
        "#,
        &ids,
        &sources as &[&str],
        &keys as &[&str],
        &external_ids as &[Option<&str>],
        &types as &[&str],
        &severities as &[Option<&str>],
        &kinds as &[Option<&str>],
        &occurred,
        &received,
        &lats as &[Option<f64>],
        &lons as &[Option<f64>],
        &zones as &[Option<&str>],
        &confidences as &[Option<f64>],
        &measurements,
        &attributes,
        transport.as_str(),
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(inserted.into_iter().map(EventId).collect())
}

/// The stored ids of events already known by (source, idempotency key).
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
        SELECT e.id, e.source_id, e.idempotency_key
          FROM events e
          JOIN UNNEST($1::text[], $2::text[]) AS k(source_id, idempotency_key)
            ON e.source_id = k.source_id AND e.idempotency_key = k.idempotency_key
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

/// An event linked to an incident, as its timeline shows it.
#[derive(Debug, Clone, PartialEq)]
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
    pub confidence: Option<f64>,
    pub measurements: serde_json::Value,
    pub attributes: serde_json::Value,
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
