//! Watch lists: entries (added, changed and removed with audit entries) and the hits ingest
//! records when a wanted plate is seen.

use chrono::{DateTime, Utc};
use occ_domain::{Plate, WatchEntry, WatchEntryInput};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::error::{Result, StoreError};

/// A stored entry, with who added it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    pub entry: WatchEntry,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

struct EntryRow {
    id: Uuid,
    plate: String,
    display: String,
    list: String,
    reason: String,
    expires_at: Option<DateTime<Utc>>,
    created_by: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<EntryRow> for StoredEntry {
    fn from(r: EntryRow) -> Self {
        Self {
            entry: WatchEntry {
                id: r.id,
                plate: Plate::from_stored(r.plate),
                display: r.display,
                list: r.list,
                reason: r.reason,
                expires_at: r.expires_at,
            },
            created_by: r.created_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

fn describe(e: &WatchEntry) -> serde_json::Value {
    json!({
        "plate": e.display,
        "plate_normalized": e.plate.as_str(),
        "list": e.list,
        "reason": e.reason,
        "expires_at": e.expires_at.map(|t| t.to_rfc3339()),
    })
}

/// Puts plates on lists: a plate already on the same list gets the new reason and expiry.
/// Each change has an audit entry. Returns the entries and whether each was new.
pub async fn add(
    conn: &mut PgConnection,
    inputs: Vec<WatchEntryInput>,
    actor: &str,
) -> Result<Vec<(StoredEntry, bool)>> {
    let now = crate::dispatch::now(conn).await?;
    let mut entries = Vec::with_capacity(inputs.len());
    let mut errors = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        match WatchEntry::parse(Uuid::now_v7(), input, now) {
            Ok(e) => entries.push(e),
            Err(e) => errors.extend(e.prefixed(&format!("entries[{i}].")).errors().to_vec()),
        }
    }
    if let Some(errors) = occ_domain::FieldErrors::from_vec(errors) {
        return Err(StoreError::Invalid(errors));
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut log = Vec::with_capacity(entries.len());
    for e in entries {
        let row = sqlx::query_as!(
            EntryRow,
            r#"
            INSERT INTO watchlist_entries (id, plate, display, list, reason, expires_at,
                                           created_by, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
            ON CONFLICT (list, plate) WHERE removed_at IS NULL DO UPDATE
               SET display = EXCLUDED.display, reason = EXCLUDED.reason,
                   expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at
            RETURNING id, plate, display, list, reason, expires_at, created_by, created_at,
                      updated_at
            "#,
            e.id,
            e.plate.as_str(),
            e.display,
            e.list,
            e.reason,
            e.expires_at,
            actor,
            now,
        )
        .fetch_one(&mut *conn)
        .await?;
        let created = row.id == e.id;
        let stored = StoredEntry::from(row);
        log.push(AuditEntry {
            entity: Entity::Watchlist(stored.entry.id),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "watchlist.added"
            } else {
                "watchlist.updated"
            }
            .into(),
            before: None,
            after: Some(describe(&stored.entry)),
            detail: format!("{} on {}", stored.entry.display, stored.entry.list),
        });
        out.push((stored, created));
    }
    audit::append(conn, &log).await?;
    Ok(out)
}

/// Takes an entry off its list (kept, marked removed), with an audit entry.
pub async fn remove(
    conn: &mut PgConnection,
    id: Uuid,
    actor: &str,
    reason: &str,
) -> Result<StoredEntry> {
    let now = crate::dispatch::now(conn).await?;
    let row = sqlx::query_as!(
        EntryRow,
        r#"
        UPDATE watchlist_entries
           SET removed_at = $2, removed_by = $3, updated_at = $2
         WHERE id = $1 AND removed_at IS NULL
        RETURNING id, plate, display, list, reason, expires_at, created_by, created_at,
                  updated_at
        "#,
        id,
        now,
        actor
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound {
        what: "watch-list entry",
    })?;
    let stored = StoredEntry::from(row);
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Watchlist(id),
            at: now,
            actor: actor.to_owned(),
            action: "watchlist.removed".into(),
            before: Some(describe(&stored.entry)),
            after: None,
            detail: if reason.is_empty() {
                format!("{} off {}", stored.entry.display, stored.entry.list)
            } else {
                format!(
                    "{} off {}: {reason}",
                    stored.entry.display, stored.entry.list
                )
            },
        }],
    )
    .await?;
    Ok(stored)
}

/// Which entries to list.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub list: Option<String>,
    pub plate: Option<Plate>,
    /// Also entries past their expiry.
    pub include_expired: bool,
}

/// Entries on the lists (not removed), by list and plate, after `after` (list, plate).
pub async fn list(
    conn: &mut PgConnection,
    filter: &EntryFilter,
    now: DateTime<Utc>,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<StoredEntry>> {
    let rows = sqlx::query_as!(
        EntryRow,
        r#"
        SELECT id, plate, display, list, reason, expires_at, created_by, created_at, updated_at
          FROM watchlist_entries
         WHERE removed_at IS NULL
           AND ($1::text IS NULL OR list = $1)
           AND ($2::text IS NULL OR plate = $2)
           AND ($3 OR expires_at IS NULL OR expires_at > $4)
           AND ($5::text IS NULL OR (list COLLATE "C", plate COLLATE "C") > ($5, $6::text))
         ORDER BY list COLLATE "C", plate COLLATE "C"
         LIMIT $7
        "#,
        filter.list,
        filter.plate.as_ref().map(Plate::as_str),
        filter.include_expired,
        now,
        after.map(|a| a.0),
        after.map(|a| a.1),
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(StoredEntry::from).collect())
}

/// Every entry in force at `now`, for the registry snapshot (expiry is also checked when a
/// plate is matched).
pub async fn active(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<Vec<WatchEntry>> {
    let rows = sqlx::query_as!(
        EntryRow,
        r#"
        SELECT id, plate, display, list, reason, expires_at, created_by, created_at, updated_at
          FROM watchlist_entries
         WHERE removed_at IS NULL AND (expires_at IS NULL OR expires_at > $1)
        "#,
        now
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredEntry::from(r).entry)
        .collect())
}

/// A wanted plate, seen.
#[derive(Debug, Clone)]
pub(crate) struct Hit<'a> {
    pub entry_id: Uuid,
    pub event_id: occ_domain::EventId,
    pub plate: &'a str,
    pub source_id: &'a str,
    pub zone: Option<&'a str>,
    pub at: DateTime<Utc>,
}

/// Records hits, once per entry and event (a revised detection is one sighting), each with an
/// audit entry on its watch-list entry: who saw the plate, where, when.
pub(crate) async fn record_hits(
    conn: &mut PgConnection,
    hits: &[Hit<'_>],
    now: DateTime<Utc>,
) -> Result<()> {
    if hits.is_empty() {
        return Ok(());
    }
    let entries: Vec<Uuid> = hits.iter().map(|h| h.entry_id).collect();
    let events: Vec<Uuid> = hits.iter().map(|h| h.event_id.0).collect();
    let plates: Vec<&str> = hits.iter().map(|h| h.plate).collect();
    let sources: Vec<&str> = hits.iter().map(|h| h.source_id).collect();
    let zones: Vec<Option<&str>> = hits.iter().map(|h| h.zone).collect();
    let seen: Vec<DateTime<Utc>> = hits.iter().map(|h| h.at).collect();
    // An entry removed a moment ago still existed when the registry snapshot was taken: the
    // sighting is recorded all the same (the row is kept).
    let new = sqlx::query!(
        r#"
        INSERT INTO watchlist_hits (entry_id, event_id, plate, source_id, zone, seen_at, hit_at)
        SELECT u.*, $7
          FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                      $6::timestamptz[]) AS u(entry_id, event_id, plate, source_id, zone, seen_at)
         WHERE EXISTS (SELECT 1 FROM watchlist_entries w WHERE w.id = u.entry_id)
        ON CONFLICT DO NOTHING
        RETURNING entry_id, event_id, plate, source_id, zone, seen_at
        "#,
        &entries,
        &events,
        &plates as &[&str],
        &sources as &[&str],
        &zones as &[Option<&str>],
        &seen,
        now,
    )
    .fetch_all(&mut *conn)
    .await?;
    let log: Vec<AuditEntry> = new
        .into_iter()
        .map(|h| AuditEntry {
            entity: Entity::Watchlist(h.entry_id),
            at: now,
            actor: crate::ingest::RULES_ACTOR.into(),
            action: "watchlist.hit".into(),
            before: None,
            after: Some(json!({
                "event_id": h.event_id,
                "plate": h.plate,
                "source_id": h.source_id,
                "zone": h.zone,
                "seen_at": h.seen_at.to_rfc3339(),
            })),
            detail: format!(
                "{} seen by {} in {} at {}",
                h.plate,
                h.source_id,
                h.zone.as_deref().unwrap_or("an unknown zone"),
                h.seen_at.to_rfc3339()
            ),
        })
        .collect();
    audit::append(conn, &log).await
}

/// A recorded sighting of a wanted plate.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredHit {
    pub entry_id: Uuid,
    pub event_id: Uuid,
    pub plate: String,
    pub source_id: String,
    pub zone: Option<String>,
    pub seen_at: DateTime<Utc>,
}

/// The sightings of an entry's plate, newest first, after `after` (seen at, event).
pub async fn hits(
    conn: &mut PgConnection,
    entry_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<StoredHit>> {
    Ok(sqlx::query_as!(
        StoredHit,
        r#"
        SELECT entry_id, event_id, plate, source_id, zone, seen_at
          FROM watchlist_hits
         WHERE entry_id = $1
           AND ($2::timestamptz IS NULL OR (seen_at, event_id) < ($2, $3::uuid))
         ORDER BY seen_at DESC, event_id DESC
         LIMIT $4
        "#,
        entry_id,
        after.map(|a| a.0),
        after.map(|a| a.1),
        limit
    )
    .fetch_all(conn)
    .await?)
}
