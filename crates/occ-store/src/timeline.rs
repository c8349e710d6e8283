//! An incident's timeline: its audit entries and linked events, oldest first, paged.

use chrono::{DateTime, Utc};
use occ_domain::IncidentId;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;
use crate::events::{EventRow, StoredEvent};

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAudit {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub detail: String,
}

/// One line of a timeline.
#[derive(Debug, Clone, PartialEq)]
pub enum TimelineEntry {
    Event(Box<StoredEvent>),
    Audit(StoredAudit),
}

impl TimelineEntry {
    /// When it happened: an event's observed time (never after its receipt), an audit entry's
    /// time of change.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            TimelineEntry::Event(e) => e.occurred_at.min(e.received_at),
            TimelineEntry::Audit(a) => a.at,
        }
    }

    /// Where the next page starts.
    pub fn cursor(&self) -> TimelineCursor {
        match self {
            TimelineEntry::Event(e) => TimelineCursor {
                at: self.at(),
                rank: 0,
                audit_id: 0,
                event_id: e.id.0,
            },
            TimelineEntry::Audit(a) => TimelineCursor {
                at: a.at,
                rank: 1,
                audit_id: a.id,
                event_id: Uuid::nil(),
            },
        }
    }

    fn sort_key(&self) -> (DateTime<Utc>, i16, i64, Uuid) {
        let c = self.cursor();
        (c.at, c.rank, c.audit_id, c.event_id)
    }
}

/// Position in a timeline. At the same instant an event comes before the audit entries it
/// caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineCursor {
    pub at: DateTime<Utc>,
    pub rank: i16,
    pub audit_id: i64,
    pub event_id: Uuid,
}

/// Up to `limit` entries of an incident's timeline after `after`.
pub async fn page(
    conn: &mut PgConnection,
    incident: IncidentId,
    after: Option<TimelineCursor>,
    limit: i64,
) -> Result<Vec<TimelineEntry>> {
    let (at, rank, audit_id, event_id) = match after {
        Some(c) => (Some(c.at), c.rank, c.audit_id, c.event_id),
        None => (None, 0, 0, Uuid::nil()),
    };
    let audits = sqlx::query_as!(
        StoredAudit,
        r#"
        SELECT id, at, actor, action, before, after, detail
          FROM audit_log
         WHERE entity_type = 'incident' AND entity_id = $1
           AND ($2::timestamptz IS NULL OR (at, 1::int2, id) > ($2, $3, $4))
         ORDER BY at, id
         LIMIT $5
        "#,
        incident.0,
        at,
        rank,
        audit_id,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    let events = sqlx::query_as!(
        EventRow,
        r#"
        SELECT e.id, e.source_id, e.external_id, e.event_type, e.severity, e.source_kind,
               e.occurred_at, e.received_at, e.lat, e.lon, e.zone, e.extra_zones, e.district,
               e.confidence, e.measurements, e.attributes, e.evidence, e.revisions, e.revised_at
          FROM incident_events l
          JOIN events e ON e.id = l.event_id
         WHERE l.incident_id = $1
           AND ($2::timestamptz IS NULL
                OR (LEAST(e.occurred_at, e.received_at), 0::int2, e.id) > ($2, $3, $4))
         ORDER BY LEAST(e.occurred_at, e.received_at), e.id
         LIMIT $5
        "#,
        incident.0,
        at,
        rank,
        event_id,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;

    let mut entries: Vec<TimelineEntry> = audits
        .into_iter()
        .map(TimelineEntry::Audit)
        .chain(
            events
                .into_iter()
                .map(|r| TimelineEntry::Event(Box::new(r.into()))),
        )
        .collect();
    entries.sort_by_key(TimelineEntry::sort_key);
    entries.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(entries)
}
