//! Zones: named polygons, each change audited.

use chrono::{DateTime, Utc};
use occ_domain::{FieldErrors, ZoneArea, ZoneInput};
use serde_json::json;
use sqlx::PgConnection;

use crate::audit::{self, AuditEntry, Entity, named_id};
use crate::error::{Result, StoreError};

/// A stored zone.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredZone {
    pub zone: ZoneArea,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

struct ZoneRow {
    name: String,
    district: Option<String>,
    description: String,
    geometry: serde_json::Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl ZoneRow {
    fn parse(self) -> Result<StoredZone> {
        let name = self.name.clone();
        let zone = ZoneArea::parse(ZoneInput {
            name: self.name,
            district: self.district,
            description: self.description,
            geometry: self.geometry,
        })
        .map_err(|e| StoreError::Corrupt(format!("zone {name}: {e}")))?;
        Ok(StoredZone {
            zone,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Creates or replaces zones (by name), in one transaction with an audit entry each. Returns
/// each zone and whether it was new. Field errors name the zone: `zones[3].geometry`.
pub async fn put(
    conn: &mut PgConnection,
    inputs: Vec<ZoneInput>,
    actor: &str,
) -> Result<Vec<(StoredZone, bool)>> {
    let now = crate::dispatch::now(conn).await?;
    let mut zones = Vec::with_capacity(inputs.len());
    let mut errors = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        match ZoneArea::parse(input) {
            Ok(z) => zones.push(z),
            Err(e) => errors.extend(e.prefixed(&format!("zones[{i}].")).errors().to_vec()),
        }
    }
    if let Some(errors) = FieldErrors::from_vec(errors) {
        return Err(StoreError::Invalid(errors));
    }
    let mut out = Vec::with_capacity(zones.len());
    let mut log = Vec::with_capacity(zones.len());
    for z in zones {
        let row = sqlx::query_as!(
            ZoneRow,
            r#"
            INSERT INTO zones (name, district, description, geometry, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $5)
            ON CONFLICT (name) DO UPDATE
               SET district = EXCLUDED.district, description = EXCLUDED.description,
                   geometry = EXCLUDED.geometry, updated_at = EXCLUDED.updated_at
            RETURNING name, district, description, geometry, created_at, updated_at
            "#,
            z.name.as_str(),
            z.district.as_ref().map(|d| d.as_str()),
            z.description,
            z.geometry,
            now,
        )
        .fetch_one(&mut *conn)
        .await?;
        let created = row.created_at == row.updated_at;
        log.push(AuditEntry {
            entity: Entity::Zone(named_id("zone", z.name.as_str())),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "zone.created"
            } else {
                "zone.updated"
            }
            .into(),
            before: None,
            after: Some(json!({
                "district": z.district.as_ref().map(|d| d.as_str()),
                "description": z.description,
            })),
            detail: format!("zone {}", z.name),
        });
        out.push((row.parse()?, created));
    }
    audit::append(conn, &log).await?;
    Ok(out)
}

pub async fn delete(conn: &mut PgConnection, name: &str, actor: &str) -> Result<()> {
    let now = crate::dispatch::now(conn).await?;
    let deleted = sqlx::query!("DELETE FROM zones WHERE name = $1", name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(StoreError::NotFound { what: "zone" });
    }
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Zone(named_id("zone", name)),
            at: now,
            actor: actor.to_owned(),
            action: "zone.deleted".into(),
            before: None,
            after: None,
            detail: format!("zone {name}"),
        }],
    )
    .await
}

/// Zones by name, after `after`; all of them when `limit` is `None`.
pub async fn list(
    conn: &mut PgConnection,
    district: Option<&str>,
    after: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<StoredZone>> {
    let rows = sqlx::query_as!(
        ZoneRow,
        r#"
        SELECT name, district, description, geometry, created_at, updated_at
          FROM zones
         WHERE ($1::text IS NULL OR district = $1)
           AND ($2::text IS NULL OR name COLLATE "C" > $2)
         ORDER BY name COLLATE "C"
         LIMIT $3
        "#,
        district,
        after,
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match r.parse() {
            Ok(z) => Some(z),
            Err(e) => {
                tracing::error!(error = %e, "skipping invalid stored zone");
                None
            }
        })
        .collect())
}
