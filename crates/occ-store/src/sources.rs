//! Sources: the registry of cameras, sensors and gateways (settings, audited), their profiles,
//! and their health — what ingest saw of them (last seen, battery, errors, QoS 0 deliveries)
//! and their status, changed only by status reports decided in the domain.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::source::{StatusTransition, on_activity, on_report, reported_status, silent_after};
use occ_domain::{
    District, Event, FieldErrors, GeoPoint, Mapping, Profile, Source, SourceConfig, SourceId,
    SourceInput, SourceKind, SourceStatus, Zone,
};
use serde_json::json;
use sqlx::PgConnection;

use crate::audit::{self, AuditEntry, Entity, named_id};
use crate::error::{Result, StoreError};

struct SourceRow {
    id: String,
    kind: Option<String>,
    name: String,
    lat: Option<f64>,
    lon: Option<f64>,
    zone: Option<String>,
    district: Option<String>,
    tags: serde_json::Value,
    enabled: bool,
    verified: bool,
    profile: Option<String>,
    mapping: serde_json::Value,
    expected_interval_seconds: Option<i32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    status: String,
    status_changed_at: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    battery_pct: Option<f64>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    qos0_events: i64,
}

impl SourceRow {
    fn config(&self) -> Result<SourceConfig> {
        let corrupt = |what: String| StoreError::Corrupt(format!("source {}: {what}", self.id));
        let tags: BTreeMap<String, String> =
            serde_json::from_value(self.tags.clone()).map_err(|e| corrupt(e.to_string()))?;
        let mapping: Mapping =
            serde_json::from_value(self.mapping.clone()).map_err(|e| corrupt(e.to_string()))?;
        Ok(SourceConfig {
            id: SourceId::from_stored(self.id.clone()),
            kind: self.kind.clone().map(SourceKind::from_stored),
            name: self.name.clone(),
            location: match (self.lat, self.lon) {
                (Some(lat), Some(lon)) => {
                    Some(GeoPoint::new(lat, lon).map_err(|e| corrupt(e.to_string()))?)
                }
                _ => None,
            },
            zone: self.zone.clone().map(Zone::from_stored),
            district: self.district.clone().map(District::from_stored),
            tags,
            enabled: self.enabled,
            verified: self.verified,
            profile: self.profile.clone(),
            mapping,
            expected_interval: self
                .expected_interval_seconds
                .map(|s| TimeDelta::seconds(i64::from(s))),
        })
    }

    fn source(self) -> Result<Source> {
        Ok(Source {
            config: self.config()?,
            status: SourceStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("source {}: status", self.id)))?,
            status_changed_at: self.status_changed_at,
            last_seen: self.last_seen,
            battery_pct: self.battery_pct,
            last_error: self.last_error,
            last_error_at: self.last_error_at,
            qos0_events: self.qos0_events,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// A status report carried by an event of the batch.
#[derive(Debug, Clone)]
pub(crate) struct StatusReport {
    pub source_id: String,
    pub status: SourceStatus,
    pub at: DateTime<Utc>,
}

impl StatusReport {
    pub(crate) fn of(event: &Event) -> Option<Self> {
        reported_status(event.event_type.as_str()).map(|status| Self {
            source_id: event.source_id.to_string(),
            status,
            at: event.received_at,
        })
    }
}

/// Registers sources OCC has not seen before (unverified, no settings). Returns nothing:
/// existing ones are left alone.
async fn register_unknown(conn: &mut PgConnection, ids: &[&str], now: DateTime<Utc>) -> Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO sources (id, created_at, updated_at)
        SELECT id, $2, $2 FROM UNNEST($1::text[]) AS u(id)
         ORDER BY id
        ON CONFLICT (id) DO NOTHING
        "#,
        ids as &[&str],
        now,
    )
    .execute(conn)
    .await?;
    Ok(())
}

struct Health {
    status: SourceStatus,
    status_changed_at: Option<DateTime<Utc>>,
    /// When the latest status report about it was received, whether it changed anything.
    status_reported_at: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    expected_interval: Option<TimeDelta>,
}

/// Locks the sources (in id order) and reads their health.
async fn lock_health(conn: &mut PgConnection, ids: &[&str]) -> Result<HashMap<String, Health>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, status, status_changed_at, status_reported_at, last_seen,
               expected_interval_seconds
          FROM sources
         WHERE id = ANY($1)
         ORDER BY id
           FOR UPDATE
        "#,
        ids as &[&str],
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let status = SourceStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("source {}: status", r.id)))?;
            Ok((
                r.id,
                Health {
                    status,
                    status_changed_at: r.status_changed_at,
                    status_reported_at: r.status_reported_at,
                    last_seen: r.last_seen,
                    expected_interval: r
                        .expected_interval_seconds
                        .map(|s| TimeDelta::seconds(i64::from(s))),
                },
            ))
        })
        .collect()
}

/// Applies status reports, in the batch's order, to their sources (registering unknown ones).
/// Returns the indexes of reports that change nothing, or whose change is not announced:
/// their events are not stored.
pub(crate) async fn apply_status_reports(
    conn: &mut PgConnection,
    reports: &[(usize, StatusReport)],
) -> Result<HashSet<usize>> {
    let mut refused = HashSet::new();
    if reports.is_empty() {
        return Ok(refused);
    }
    let now = crate::dispatch::now(conn).await?;
    let mut ids: Vec<&str> = reports.iter().map(|(_, r)| r.source_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    register_unknown(conn, &ids, now).await?;
    let mut health = lock_health(conn, &ids).await?;
    let mut ordered: Vec<&(usize, StatusReport)> = reports.iter().collect();
    ordered.sort_by_key(|(i, _)| *i);
    for (i, r) in ordered {
        let Some(h) = health.get_mut(&r.source_id) else {
            refused.insert(*i);
            continue;
        };
        match on_report(h.status, h.status_reported_at, r.status, r.at) {
            Some(StatusTransition { to, announce }) => {
                h.status = to;
                h.status_changed_at = Some(r.at);
                if !announce {
                    refused.insert(*i);
                }
            }
            None => {
                refused.insert(*i);
            }
        }
        // A report older than one already seen is stale, whatever it said: the next one
        // must be newer still (out-of-order deliveries between instances).
        h.status_reported_at = h.status_reported_at.max(Some(r.at));
    }
    let mut upd_ids = Vec::new();
    let mut statuses = Vec::new();
    let mut changed_ats = Vec::new();
    let mut reported_ats = Vec::new();
    let mut silents = Vec::new();
    for id in &ids {
        let h = &health[*id];
        upd_ids.push(*id);
        statuses.push(h.status.as_str());
        changed_ats.push(h.status_changed_at);
        reported_ats.push(h.status_reported_at);
        silents.push(silent_after(h.status, h.last_seen, h.expected_interval));
    }
    sqlx::query!(
        r#"
        UPDATE sources s
           SET status = u.status, status_changed_at = u.changed_at,
               status_reported_at = u.reported_at, silent_after = u.silent_after,
               updated_at = $6
          FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                      $5::timestamptz[])
               AS u(id, status, changed_at, reported_at, silent_after)
         WHERE s.id = u.id
        "#,
        &upd_ids as &[&str],
        &statuses as &[&str],
        &changed_ats as &[Option<DateTime<Utc>>],
        &reported_ats as &[Option<DateTime<Utc>>],
        &silents as &[Option<DateTime<Utc>>],
        now,
    )
    .execute(conn)
    .await?;
    Ok(refused)
}

/// What ingest saw of one source since the last flush.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    pub last_seen: Option<DateTime<Utc>>,
    pub battery_pct: Option<(DateTime<Utc>, f64)>,
    pub last_error: Option<(DateTime<Utc>, String)>,
    pub qos0_events: i64,
}

impl Activity {
    /// Folds in what a later observation saw.
    pub fn merge(&mut self, other: Activity) {
        self.last_seen = self.last_seen.max(other.last_seen);
        if other.battery_pct.as_ref().map(|b| b.0) > self.battery_pct.as_ref().map(|b| b.0) {
            self.battery_pct = other.battery_pct;
        }
        if other.last_error.as_ref().map(|e| e.0) > self.last_error.as_ref().map(|e| e.0) {
            self.last_error = other.last_error;
        }
        self.qos0_events += other.qos0_events;
    }
}

/// Records activity: registers unknown sources, moves last seen (never back), battery, last
/// error and the QoS 0 count, and brings sources never heard from online. Returns the sources
/// heard from while offline: their return is announced by a `source.online` event.
pub async fn record_activity(
    conn: &mut PgConnection,
    activity: &BTreeMap<String, Activity>,
) -> Result<Vec<(SourceId, DateTime<Utc>)>> {
    if activity.is_empty() {
        return Ok(Vec::new());
    }
    let now = crate::dispatch::now(conn).await?;
    let ids: Vec<&str> = activity.keys().map(String::as_str).collect();
    register_unknown(conn, &ids, now).await?;
    let health = lock_health(conn, &ids).await?;
    let n = ids.len();
    let mut statuses = Vec::with_capacity(n);
    let mut seen = Vec::with_capacity(n);
    let mut silents = Vec::with_capacity(n);
    let mut batteries = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut error_ats = Vec::with_capacity(n);
    let mut qos0 = Vec::with_capacity(n);
    let mut changed_at = Vec::with_capacity(n);
    let mut returned = Vec::new();
    for (id, a) in activity {
        let h = health.get(id);
        let current = h.map_or(SourceStatus::Unknown, |h| h.status);
        let status = if a.last_seen.is_some() {
            on_activity(current)
        } else {
            current
        };
        changed_at.push(if status == current {
            h.and_then(|h| h.status_changed_at)
        } else {
            a.last_seen
        });
        let last_seen = h.and_then(|h| h.last_seen).max(a.last_seen);
        statuses.push(status.as_str());
        seen.push(last_seen);
        silents.push(silent_after(
            status,
            last_seen,
            h.and_then(|h| h.expected_interval),
        ));
        batteries.push(a.battery_pct.as_ref().map(|b| b.1));
        errors.push(a.last_error.as_ref().map(|e| e.1.as_str()));
        error_ats.push(a.last_error.as_ref().map(|e| e.0));
        qos0.push(a.qos0_events);
        if status == SourceStatus::Offline
            && let Some(at) = a.last_seen
        {
            returned.push((SourceId::from_stored(id.clone()), at));
        }
    }
    sqlx::query!(
        r#"
        UPDATE sources s
           SET status = u.status,
               status_changed_at = u.changed_at,
               last_seen = u.last_seen,
               silent_after = u.silent_after,
               battery_pct = COALESCE(u.battery, s.battery_pct),
               last_error = COALESCE(u.error, s.last_error),
               last_error_at = COALESCE(u.error_at, s.last_error_at),
               qos0_events = s.qos0_events + u.qos0
          FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                      $5::float8[], $6::text[], $7::timestamptz[], $8::int8[],
                      $9::timestamptz[])
               AS u(id, status, last_seen, silent_after, battery, error, error_at, qos0,
                    changed_at)
         WHERE s.id = u.id
        "#,
        &ids as &[&str],
        &statuses as &[&str],
        &seen as &[Option<DateTime<Utc>>],
        &silents as &[Option<DateTime<Utc>>],
        &batteries as &[Option<f64>],
        &errors as &[Option<&str>],
        &error_ats as &[Option<DateTime<Utc>>],
        &qos0,
        &changed_at as &[Option<DateTime<Utc>>],
    )
    .execute(conn)
    .await?;
    Ok(returned)
}

/// Up to `limit` sources online but silent past their expected interval before `before`,
/// locked (skipping those another instance holds): (id, last seen).
pub async fn lock_silent(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(SourceId, DateTime<Utc>)>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, last_seen AS "last_seen!"
          FROM sources
         WHERE silent_after < $1 AND last_seen IS NOT NULL
         ORDER BY id
         LIMIT $2
           FOR UPDATE SKIP LOCKED
        "#,
        before,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    // Looked at: going offline clears it anyway; if the report is refused (an older report
    // than one already seen), the next activity sets it again rather than this sweep taking
    // the same source over and over.
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    sqlx::query!(
        "UPDATE sources SET silent_after = NULL WHERE id = ANY($1)",
        &ids as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (SourceId::from_stored(r.id), r.last_seen))
        .collect())
}

/// One source with its health.
pub async fn get(conn: &mut PgConnection, id: &str) -> Result<Source> {
    sqlx::query_as!(
        SourceRow,
        r#"
        SELECT id, kind, name, lat, lon, zone, district, tags, enabled, verified, profile,
               mapping, expected_interval_seconds, created_at, updated_at, status,
               status_changed_at, last_seen, battery_pct, last_error, last_error_at, qos0_events
          FROM sources
         WHERE id = $1
        "#,
        id
    )
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound { what: "source" })?
    .source()
}

/// Which sources to list.
#[derive(Debug, Clone, Default)]
pub struct SourceFilter {
    pub kind: Option<String>,
    pub zone: Option<String>,
    pub district: Option<String>,
    pub status: Option<SourceStatus>,
    /// Only those registered by the city (true) or only those OCC registered (false).
    pub verified: Option<bool>,
}

/// Sources by id, after `after`.
pub async fn list(
    conn: &mut PgConnection,
    filter: &SourceFilter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Source>> {
    let rows = sqlx::query_as!(
        SourceRow,
        r#"
        SELECT id, kind, name, lat, lon, zone, district, tags, enabled, verified, profile,
               mapping, expected_interval_seconds, created_at, updated_at, status,
               status_changed_at, last_seen, battery_pct, last_error, last_error_at, qos0_events
          FROM sources
         WHERE ($1::text IS NULL OR kind = $1)
           AND ($2::text IS NULL OR zone = $2)
           AND ($3::text IS NULL OR district = $3)
           AND ($4::text IS NULL OR status = $4)
           AND ($5::bool IS NULL OR verified = $5)
           AND ($6::text IS NULL OR id > $6)
         ORDER BY id
         LIMIT $7
        "#,
        filter.kind,
        filter.zone,
        filter.district,
        filter.status.map(SourceStatus::as_str),
        filter.verified,
        after,
        limit
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(SourceRow::source).collect()
}

/// The settings of every registered source, for the registry snapshot.
pub async fn configs(conn: &mut PgConnection) -> Result<Vec<SourceConfig>> {
    let rows = sqlx::query_as!(
        SourceRow,
        r#"
        SELECT id, kind, name, lat, lon, zone, district, tags, enabled, verified, profile,
               mapping, expected_interval_seconds, created_at, updated_at, status,
               status_changed_at, last_seen, battery_pct, last_error, last_error_at, qos0_events
          FROM sources
         WHERE verified
        "#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| match r.config() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "skipping invalid stored source");
                None
            }
        })
        .collect())
}

/// Registers or updates sources (settings only; health is kept), each with an audit entry.
/// Returns each source and whether it was new to the registry.
pub async fn upsert(
    conn: &mut PgConnection,
    inputs: Vec<SourceInput>,
    actor: &str,
) -> Result<Vec<(Source, bool)>> {
    let now = crate::dispatch::now(conn).await?;
    let mut configs = Vec::with_capacity(inputs.len());
    let mut errors = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        match SourceConfig::parse(input) {
            Ok(c) => configs.push(c),
            Err(e) => errors.extend(e.prefixed(&format!("sources[{i}].")).errors().to_vec()),
        }
    }
    if let Some(errors) = FieldErrors::from_vec(errors) {
        return Err(StoreError::Invalid(errors));
    }
    // Every row this import touches, locked at once in id order, as the health flush locks
    // them: two transactions never wait on each other in opposite orders.
    let ids: Vec<&str> = configs.iter().map(|c| c.id.as_str()).collect();
    let existing: HashMap<String, (bool, String, Option<DateTime<Utc>>)> = sqlx::query!(
        r#"
        SELECT id, verified, status, last_seen
          FROM sources
         WHERE id = ANY($1)
         ORDER BY id
           FOR UPDATE
        "#,
        &ids as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.id, (r.verified, r.status, r.last_seen)))
    .collect();
    let mut out = Vec::with_capacity(configs.len());
    let mut entries = Vec::with_capacity(configs.len());
    for c in configs {
        let before = existing.get(c.id.as_str());
        let silent = before.and_then(|(_, status, last_seen)| {
            silent_after(
                SourceStatus::parse(status)?,
                *last_seen,
                c.expected_interval,
            )
        });
        let stored = c.to_input();
        let tags = serde_json::to_value(&stored.tags).unwrap_or_default();
        let mapping = serde_json::to_value(&stored.mapping).unwrap_or_default();
        let interval = stored
            .expected_interval_seconds
            .map(|s| i32::try_from(s).unwrap_or(i32::MAX));
        sqlx::query!(
            r#"
            INSERT INTO sources (id, kind, name, lat, lon, zone, district, tags, enabled, verified,
                                 profile, mapping, expected_interval_seconds, created_at,
                                 updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true, $10, $11, $12, $13, $13)
            ON CONFLICT (id) DO UPDATE
               SET kind = EXCLUDED.kind, name = EXCLUDED.name, lat = EXCLUDED.lat,
                   lon = EXCLUDED.lon, zone = EXCLUDED.zone, district = EXCLUDED.district,
                   tags = EXCLUDED.tags, enabled = EXCLUDED.enabled, verified = true,
                   profile = EXCLUDED.profile, mapping = EXCLUDED.mapping,
                   expected_interval_seconds = EXCLUDED.expected_interval_seconds,
                   silent_after = $14, updated_at = EXCLUDED.updated_at
            "#,
            c.id.as_str(),
            stored.kind,
            stored.name,
            stored.lat,
            stored.lon,
            stored.zone,
            stored.district,
            tags,
            c.enabled,
            stored.profile,
            mapping,
            interval,
            now,
            silent,
        )
        .execute(&mut *conn)
        .await?;
        let created = before.is_none_or(|(verified, ..)| !verified);
        entries.push(AuditEntry {
            entity: Entity::Source(named_id("source", c.id.as_str())),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "source.registered"
            } else {
                "source.updated"
            }
            .into(),
            before: None,
            after: Some(serde_json::to_value(&stored).unwrap_or_default()),
            detail: format!("source {}", c.id),
        });
        out.push((c.id.clone(), created));
    }
    audit::append(conn, &entries).await?;
    let mut result = Vec::with_capacity(out.len());
    for (id, created) in out {
        result.push((get(conn, id.as_str()).await?, created));
    }
    Ok(result)
}

/// Removes a source from the registry (its events stay), with an audit entry.
pub async fn delete(conn: &mut PgConnection, id: &str, actor: &str) -> Result<()> {
    let now = crate::dispatch::now(conn).await?;
    let deleted = sqlx::query!("DELETE FROM sources WHERE id = $1", id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::NotFound { what: "source" });
    }
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Source(named_id("source", id)),
            at: now,
            actor: actor.to_owned(),
            action: "source.deleted".into(),
            before: None,
            after: None,
            detail: format!("source {id}"),
        }],
    )
    .await
}

/// Every profile, by name.
pub async fn profiles(conn: &mut PgConnection) -> Result<Vec<Profile>> {
    let rows = sqlx::query!(
        r#"SELECT name, description, mapping FROM source_profiles ORDER BY name COLLATE "C""#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let mapping = serde_json::from_value::<Mapping>(r.mapping).ok();
            match mapping.map(|m| Profile::parse(&r.name, &r.description, m)) {
                Some(Ok(p)) => Some(p),
                _ => {
                    tracing::error!(profile = %r.name, "skipping invalid stored profile");
                    None
                }
            }
        })
        .collect())
}

/// Creates or replaces a profile, with an audit entry. Returns whether it was created.
pub async fn put_profile(conn: &mut PgConnection, profile: &Profile, actor: &str) -> Result<bool> {
    let now = crate::dispatch::now(conn).await?;
    let mapping = serde_json::to_value(&profile.mapping).unwrap_or_default();
    let created = sqlx::query_scalar!(
        r#"
        INSERT INTO source_profiles (name, description, mapping, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $4)
        ON CONFLICT (name) DO UPDATE
           SET description = EXCLUDED.description, mapping = EXCLUDED.mapping,
               updated_at = EXCLUDED.updated_at
        RETURNING (created_at = updated_at) AS "created!"
        "#,
        profile.name,
        profile.description,
        mapping,
        now
    )
    .fetch_one(&mut *conn)
    .await?;
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Profile(named_id("profile", &profile.name)),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "profile.created"
            } else {
                "profile.updated"
            }
            .into(),
            before: None,
            after: Some(json!({"description": profile.description, "mapping": mapping})),
            detail: format!("profile {}", profile.name),
        }],
    )
    .await?;
    Ok(created)
}

pub async fn delete_profile(conn: &mut PgConnection, name: &str, actor: &str) -> Result<()> {
    let now = crate::dispatch::now(conn).await?;
    let deleted = sqlx::query!("DELETE FROM source_profiles WHERE name = $1", name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::NotFound { what: "profile" });
    }
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Profile(named_id("profile", name)),
            at: now,
            actor: actor.to_owned(),
            action: "profile.deleted".into(),
            before: None,
            after: None,
            detail: format!("profile {name}"),
        }],
    )
    .await
}
