//! Units: responders, their status and position.

use chrono::{DateTime, Utc};
use occ_domain::{GeoPoint, IncidentId, UnitId, UnitStatus};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{AuditEntry, Entity};
use crate::error::{Result, StoreError};

/// A unit as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub id: UnitId,
    pub call_sign: String,
    pub agency: String,
    pub home_station: String,
    pub status: UnitStatus,
    /// The incident it is working, while DISPATCHED, EN_ROUTE or ON_SCENE.
    pub incident: Option<IncidentId>,
    pub location: Option<GeoPoint>,
    pub location_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

struct UnitRow {
    id: Uuid,
    call_sign: String,
    agency: String,
    home_station: String,
    status: String,
    incident_id: Option<Uuid>,
    lat: Option<f64>,
    lon: Option<f64>,
    location_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<UnitRow> for Unit {
    type Error = StoreError;

    fn try_from(r: UnitRow) -> Result<Unit> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("unit {}: {what}", r.call_sign));
        Ok(Unit {
            id: UnitId(r.id),
            status: UnitStatus::parse(&r.status).ok_or_else(|| corrupt("status"))?,
            incident: r.incident_id.map(IncidentId),
            location: match (r.lat, r.lon) {
                (Some(lat), Some(lon)) => {
                    Some(GeoPoint::new(lat, lon).map_err(|e| corrupt(&e.to_string()))?)
                }
                _ => None,
            },
            location_at: r.location_at,
            updated_at: r.updated_at,
            call_sign: r.call_sign,
            agency: r.agency,
            home_station: r.home_station,
        })
    }
}

impl Unit {
    /// How audit entries show a unit's state.
    pub fn audit_state(&self) -> serde_json::Value {
        json!({
            "call_sign": self.call_sign,
            "status": self.status.as_str(),
            "incident_id": self.incident.map(|i| i.to_string()),
        })
    }
}

/// The units with these ids, in no particular order, locked for the rest of the transaction
/// when `lock` (in id order, so concurrent dispatches cannot deadlock).
pub async fn load(conn: &mut PgConnection, ids: &[UnitId], lock: bool) -> Result<Vec<Unit>> {
    let ids: Vec<Uuid> = ids.iter().map(|u| u.0).collect();
    let rows = if lock {
        sqlx::query_as!(
            UnitRow,
            r#"
            SELECT id, call_sign, agency, home_station, status, incident_id, lat, lon,
                   location_at, updated_at
              FROM units
             WHERE id = ANY($1)
             ORDER BY id
               FOR UPDATE
            "#,
            &ids
        )
        .fetch_all(conn)
        .await?
    } else {
        sqlx::query_as!(
            UnitRow,
            r#"
            SELECT id, call_sign, agency, home_station, status, incident_id, lat, lon,
                   location_at, updated_at
              FROM units
             WHERE id = ANY($1)
            "#,
            &ids
        )
        .fetch_all(conn)
        .await?
    };
    rows.into_iter().map(Unit::try_from).collect()
}

/// Locks the units named by id (UUID) or call sign, in id order (so concurrent dispatches
/// cannot deadlock), each once. A name that matches no unit is refused as `unit_ids[i]`.
pub async fn lock_named(conn: &mut PgConnection, references: &[&str]) -> Result<Vec<Unit>> {
    let ids: Vec<Uuid> = references
        .iter()
        .filter_map(|r| Uuid::parse_str(r).ok())
        .collect();
    let rows = sqlx::query_as!(
        UnitRow,
        r#"
        SELECT id, call_sign, agency, home_station, status, incident_id, lat, lon,
               location_at, updated_at
          FROM units
         -- Call signs resolved first: with an OR, plans scan units dispatched or all.
         WHERE id = ANY(ARRAY(SELECT id FROM units WHERE call_sign = ANY($2)) || $1::uuid[])
         ORDER BY id
           FOR UPDATE
        "#,
        &ids,
        references as &[&str],
    )
    .fetch_all(conn)
    .await?;
    let found: Vec<Unit> = rows
        .into_iter()
        .map(Unit::try_from)
        .collect::<Result<_>>()?;
    // A reference names the unit with that id, else the one with that call sign: a call sign
    // that reads as another unit's id does not bring that unit along.
    let mut named: Vec<Unit> = Vec::with_capacity(references.len());
    let mut unknown = Vec::new();
    for (i, reference) in references.iter().enumerate() {
        let by_id = Uuid::parse_str(reference)
            .ok()
            .and_then(|id| found.iter().find(|u| u.id.0 == id));
        match by_id.or_else(|| found.iter().find(|u| u.call_sign == *reference)) {
            Some(unit) => named.push(unit.clone()),
            None => unknown.push(occ_domain::FieldError::new(
                format!("unit_ids[{i}]"),
                format!("no unit with id or call sign {reference:?}"),
            )),
        }
    }
    if let Some(errors) = occ_domain::FieldErrors::from_vec(unknown) {
        return Err(StoreError::Invalid(errors));
    }
    named.sort_by_key(|u| u.id);
    named.dedup_by_key(|u| u.id);
    Ok(named)
}

/// Finds a unit by id (UUID) or call sign.
pub async fn resolve(conn: &mut PgConnection, reference: &str) -> Result<UnitId> {
    let by_id = Uuid::parse_str(reference).ok();
    sqlx::query_scalar!(
        "SELECT id FROM units WHERE id = $1 OR call_sign = $2",
        by_id,
        reference
    )
    .fetch_optional(conn)
    .await?
    .map(UnitId)
    .ok_or(StoreError::NotFound { what: "unit" })
}

pub async fn get(conn: &mut PgConnection, id: UnitId, lock: bool) -> Result<Unit> {
    load(conn, &[id], lock)
        .await?
        .pop()
        .ok_or(StoreError::NotFound { what: "unit" })
}

/// What a unit is declared as.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub call_sign: String,
    pub agency: String,
    pub home_station: String,
    pub location: Option<GeoPoint>,
}

/// Creates the unit with this call sign (AVAILABLE) or updates its agency, home station and
/// position. Returns it and whether it was created.
pub async fn upsert(
    conn: &mut PgConnection,
    spec: &UnitSpec,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<(Unit, bool)> {
    let agency_known: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM queues WHERE agency = $1) AS "e!""#,
        spec.agency
    )
    .fetch_one(&mut *conn)
    .await?;
    if !agency_known {
        return Err(StoreError::Invalid(occ_domain::FieldErrors::one(
            "unit.agency",
            format!("no queue serves an agency named {:?}", spec.agency),
        )));
    }
    let before = match resolve(conn, &spec.call_sign).await {
        Ok(id) => Some(get(conn, id, true).await?),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    if let Some(b) = &before
        && b.agency != spec.agency
        && b.status.is_assigned()
    {
        return Err(StoreError::Precondition(format!(
            "unit {} is {}: it cannot change agency until it is released",
            b.call_sign, b.status
        )));
    }
    let id = before.as_ref().map_or_else(Uuid::now_v7, |b| b.id.0);
    sqlx::query!(
        r#"
        INSERT INTO units (id, call_sign, agency, home_station, status, lat, lon, location_at,
                           created_at, updated_at)
        VALUES ($1, $2, $3, $4, 'AVAILABLE', $5, $6, CASE WHEN $5::float8 IS NULL THEN NULL ELSE $7::timestamptz END, $7, $7)
        ON CONFLICT (id) DO UPDATE
           SET agency = EXCLUDED.agency,
               home_station = EXCLUDED.home_station,
               lat = COALESCE(EXCLUDED.lat, units.lat),
               lon = COALESCE(EXCLUDED.lon, units.lon),
               location_at = COALESCE(EXCLUDED.location_at, units.location_at),
               updated_at = EXCLUDED.updated_at
        "#,
        id,
        spec.call_sign,
        spec.agency,
        spec.home_station,
        spec.location.map(|l| l.lat()),
        spec.location.map(|l| l.lon()),
        now,
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Retry(format!("unit {} created concurrently", spec.call_sign))
        }
        _ => StoreError::from(e),
    })?;
    let unit = get(conn, UnitId(id), false).await?;
    let created = before.is_none();
    crate::audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Unit(id),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "unit.created"
            } else {
                "unit.updated"
            }
            .into(),
            before: before.map(|b| json!({"agency": b.agency, "home_station": b.home_station})),
            after: Some(json!({"agency": unit.agency, "home_station": unit.home_station})),
            detail: unit.call_sign.clone(),
        }],
    )
    .await?;
    Ok((unit, created))
}

/// Which units to list.
#[derive(Debug, Clone, Default)]
pub struct UnitFilter {
    pub agency: Option<String>,
    /// Only units of these agencies (the caller's scope); `None` for every agency.
    pub within: Option<Vec<String>>,
    pub statuses: Vec<UnitStatus>,
    pub incident: Option<IncidentId>,
}

/// Units by call sign, after `after` (a call sign).
pub async fn list(
    conn: &mut PgConnection,
    filter: &UnitFilter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Unit>> {
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    sqlx::query_as!(
        UnitRow,
        r#"
        SELECT id, call_sign, agency, home_station, status, incident_id, lat, lon, location_at,
               updated_at
          FROM units
         WHERE ($1::text IS NULL OR agency = $1)
           AND (cardinality($2::text[]) = 0 OR status = ANY($2))
           AND ($3::uuid IS NULL OR incident_id = $3)
           AND ($4::text IS NULL OR call_sign COLLATE "C" > $4)
           AND ($6::text[] IS NULL OR agency = ANY($6))
         ORDER BY call_sign COLLATE "C"
         LIMIT $5
        "#,
        filter.agency.as_deref(),
        &statuses as &[&str],
        filter.incident.map(|i| i.0),
        after,
        limit,
        filter.within.as_deref(),
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(Unit::try_from)
    .collect()
}

/// Stores a unit's new status and incident (after the domain allowed the transition), with its
/// audit entry.
pub async fn set_status(
    conn: &mut PgConnection,
    unit: &Unit,
    status: UnitStatus,
    incident: Option<IncidentId>,
    actor: &str,
    detail: &str,
    now: DateTime<Utc>,
) -> Result<Unit> {
    let (mut after, entries) = set_statuses(
        conn,
        std::slice::from_ref(unit),
        &[status],
        incident,
        actor,
        detail,
        now,
    )
    .await?;
    crate::audit::append(conn, &entries).await?;
    after.pop().ok_or(StoreError::NotFound { what: "unit" })
}

/// Stores new statuses of several units, all now working `incident` (or none), in one
/// statement. Returns the units as they now are and their audit entries, for the caller to
/// append with its own.
pub async fn set_statuses(
    conn: &mut PgConnection,
    units: &[Unit],
    statuses: &[UnitStatus],
    incident: Option<IncidentId>,
    actor: &str,
    detail: &str,
    now: DateTime<Utc>,
) -> Result<(Vec<Unit>, Vec<AuditEntry>)> {
    let ids: Vec<Uuid> = units.iter().map(|u| u.id.0).collect();
    let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    sqlx::query!(
        r#"
        UPDATE units
           SET status = u.status, incident_id = $3, updated_at = $4
          FROM UNNEST($1::uuid[], $2::text[]) AS u(id, status)
         WHERE units.id = u.id
        "#,
        &ids,
        &names as &[&str],
        incident.map(|i| i.0),
        now,
    )
    .execute(&mut *conn)
    .await?;
    let mut after = Vec::with_capacity(units.len());
    let mut entries = Vec::with_capacity(units.len());
    for (unit, status) in units.iter().zip(statuses) {
        let changed = Unit {
            status: *status,
            incident,
            updated_at: now,
            ..unit.clone()
        };
        entries.push(AuditEntry {
            entity: Entity::Unit(unit.id.0),
            at: now,
            actor: actor.to_owned(),
            action: "unit.status_changed".into(),
            before: Some(unit.audit_state()),
            after: Some(changed.audit_state()),
            detail: detail.to_owned(),
        });
        after.push(changed);
    }
    Ok((after, entries))
}

/// Records where a unit is.
pub async fn report_location(
    conn: &mut PgConnection,
    id: UnitId,
    at: GeoPoint,
    when: DateTime<Utc>,
) -> Result<Unit> {
    let updated = sqlx::query!(
        r#"
        UPDATE units SET lat = $2, lon = $3, location_at = $4
         WHERE id = $1 AND (location_at IS NULL OR location_at <= $4)
        "#,
        id.0,
        at.lat(),
        at.lon(),
        when,
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let unit = get(conn, id, false).await?;
    if updated == 0 {
        tracing::debug!(unit = %unit.call_sign, "ignored a position older than the last one");
    }
    Ok(unit)
}

/// The available units of an agency.
pub async fn available(conn: &mut PgConnection, agency: &str) -> Result<Vec<Unit>> {
    list(
        conn,
        &UnitFilter {
            agency: Some(agency.to_owned()),
            within: None,
            statuses: vec![UnitStatus::Available],
            incident: None,
        },
        None,
        10_000,
    )
    .await
}

/// The units working an incident, locked.
pub async fn assigned_to(conn: &mut PgConnection, incident: IncidentId) -> Result<Vec<Unit>> {
    let ids: Vec<UnitId> = sqlx::query_scalar!(
        "SELECT id FROM units WHERE incident_id = $1 ORDER BY id",
        incident.0
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(UnitId)
    .collect();
    load(conn, &ids, true).await
}
