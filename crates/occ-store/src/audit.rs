//! The audit log: an append-only record of every change, written in the changing transaction.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::changes::Change;
use crate::error::Result;

/// What an audit entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Incident(Uuid),
    Rule(Uuid),
    Unit(Uuid),
    Queue(Uuid),
    /// A registered source, by [`named_id`] of its id.
    Source(Uuid),
    /// A source profile, by [`named_id`] of its name.
    Profile(Uuid),
    /// A zone, by [`named_id`] of its name.
    Zone(Uuid),
    /// A watch-list entry.
    Watchlist(Uuid),
    DeadLetter(Uuid),
    /// An API key.
    Key(Uuid),
    /// A legal hold on events.
    LegalHold(Uuid),
    /// An investigation, by [`named_id`] of its case reference: the searches made for it.
    Case(Uuid),
}

impl Entity {
    fn parts(self) -> (&'static str, Uuid) {
        match self {
            Entity::Incident(id) => ("incident", id),
            Entity::Rule(id) => ("rule", id),
            Entity::Unit(id) => ("unit", id),
            Entity::Queue(id) => ("queue", id),
            Entity::Source(id) => ("source", id),
            Entity::Profile(id) => ("profile", id),
            Entity::Zone(id) => ("zone", id),
            Entity::Watchlist(id) => ("watchlist", id),
            Entity::DeadLetter(id) => ("dead_letter", id),
            Entity::Key(id) => ("key", id),
            Entity::LegalHold(id) => ("legal_hold", id),
            Entity::Case(id) => ("case", id),
        }
    }
}

/// The stable id audit entries give a thing known by name (a source, a zone): a UUID v5 of
/// its kind and name, so all entries about it share one id.
pub fn named_id(kind: &str, name: &str) -> Uuid {
    const OCC: Uuid = Uuid::from_u128(0x6f63_635f_7265_6769_7374_7279_0000_0001);
    Uuid::new_v5(&OCC, format!("{kind}:{name}").as_bytes())
}

/// One change: who did what, when, with the state before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub entity: Entity,
    pub at: DateTime<Utc>,
    /// The principal that made the change (`system:ingest`, `operator:alice`).
    pub actor: String,
    /// Dotted verb: `incident.opened`, `incident.priority_raised`, `rule.updated`.
    pub action: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub detail: String,
}

pub async fn append(conn: &mut PgConnection, entries: &[AuditEntry]) -> Result<()> {
    // No change-log entry: its time is not used.
    append_with_changes(conn, entries, &[], DateTime::<Utc>::UNIX_EPOCH).await
}

/// Appends audit entries and change-log entries (at `changed_at`) in one statement. Like
/// [`crate::changes::append`], call it last in the transaction, once the incidents are locked.
pub async fn append_with_changes(
    conn: &mut PgConnection,
    entries: &[AuditEntry],
    log: &[Change],
    changed_at: DateTime<Utc>,
) -> Result<()> {
    if entries.is_empty() && log.is_empty() {
        return Ok(());
    }
    let mut types = Vec::with_capacity(entries.len());
    let mut ids = Vec::with_capacity(entries.len());
    for e in entries {
        let (t, id) = e.entity.parts();
        types.push(t);
        ids.push(id);
    }
    let ats: Vec<DateTime<Utc>> = entries.iter().map(|e| e.at).collect();
    let actors: Vec<&str> = entries.iter().map(|e| e.actor.as_str()).collect();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    let befores: Vec<Option<&serde_json::Value>> =
        entries.iter().map(|e| e.before.as_ref()).collect();
    let afters: Vec<Option<&serde_json::Value>> =
        entries.iter().map(|e| e.after.as_ref()).collect();
    let details: Vec<&str> = entries.iter().map(|e| e.detail.as_str()).collect();
    let incidents: Vec<Uuid> = log.iter().map(|c| c.incident.0).collect();
    // Postgres arrays of arrays must be rectangular: queues travel as comma-free joined text.
    let queues: Vec<String> = log.iter().map(|c| c.queues.join(",")).collect();
    let kinds: Vec<&str> = log.iter().map(|c| c.kind.as_str()).collect();
    let changed_by: Vec<&str> = log.iter().map(|c| c.actor.as_str()).collect();
    let changes: Vec<&str> = log.iter().map(|c| c.detail.as_str()).collect();
    // WITH ORDINALITY keeps the entries' order in their identity values.
    sqlx::query!(
        r#"
        WITH audited AS (
            INSERT INTO audit_log (entity_type, entity_id, at, actor, action, before, after, detail)
            SELECT entity_type, entity_id, at, actor, action, before, after, detail
              FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[],
                          $6::jsonb[], $7::jsonb[], $8::text[])
                   WITH ORDINALITY AS u(entity_type, entity_id, at, actor, action, before, after,
                                        detail, n)
             ORDER BY n
        )
        INSERT INTO incident_changes (incident_id, queues, kind, at, actor, detail)
        SELECT incident_id, string_to_array(queues, ','), kind, $14, actor, detail
          FROM UNNEST($9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[])
               WITH ORDINALITY AS u(incident_id, queues, kind, actor, detail, n)
         ORDER BY n
        "#,
        &types as &[&str],
        &ids,
        &ats,
        &actors as &[&str],
        &actions as &[&str],
        &befores as &[Option<&serde_json::Value>],
        &afters as &[Option<&serde_json::Value>],
        &details as &[&str],
        &incidents,
        &queues,
        &kinds as &[&str],
        &changed_by as &[&str],
        &changes as &[&str],
        changed_at,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends one entry and returns it as stored (with its id), for callers that show it.
pub async fn append_returning(
    conn: &mut PgConnection,
    e: &AuditEntry,
) -> Result<crate::timeline::StoredAudit> {
    let (entity_type, entity_id) = e.entity.parts();
    Ok(sqlx::query_as!(
        crate::timeline::StoredAudit,
        r#"
        INSERT INTO audit_log (entity_type, entity_id, at, actor, action, before, after, detail)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        RETURNING id, at, actor, action, before, after, detail
        "#,
        entity_type,
        entity_id,
        e.at,
        e.actor,
        e.action,
        e.before,
        e.after,
        e.detail,
    )
    .fetch_one(conn)
    .await?)
}
