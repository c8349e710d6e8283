//! The record of reads: who saw which incidents of the agencies whose reads are recorded.

use chrono::{DateTime, Utc};
use occ_domain::IncidentId;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;

/// Records that `principal` saw `incidents` through `method`, keeping those of `agencies`'
/// queues; nothing when none of them are. One statement.
pub async fn record(
    conn: &mut PgConnection,
    at: DateTime<Utc>,
    principal: &str,
    method: &str,
    incidents: &[IncidentId],
    agencies: &[String],
) -> Result<()> {
    if incidents.is_empty() || agencies.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = incidents.iter().map(|i| i.0).collect();
    sqlx::query!(
        r#"
        INSERT INTO data_reads (at, principal, method, incident_ids)
        SELECT $1, $2, $3, array_agg(i.id ORDER BY i.id)
          FROM incidents i JOIN queues q ON q.name = i.queue
         WHERE i.id = ANY($4) AND q.agency = ANY($5)
        HAVING count(*) > 0
        "#,
        at,
        principal,
        method,
        &ids,
        agencies
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// One recorded read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub at: DateTime<Utc>,
    pub principal: String,
    pub method: String,
    pub incidents: Vec<String>,
}

/// Recorded reads, newest first: all, or of one incident.
pub async fn list(
    conn: &mut PgConnection,
    incident: Option<IncidentId>,
    limit: i64,
) -> Result<Vec<Read>> {
    Ok(sqlx::query!(
        r#"
        SELECT r.at, r.principal, r.method,
               ARRAY(SELECT i.number FROM incidents i WHERE i.id = ANY(r.incident_ids)
                      ORDER BY i.number) AS "incidents!"
          FROM data_reads r
         WHERE $1::uuid IS NULL OR r.incident_ids @> ARRAY[$1::uuid]
         ORDER BY r.at DESC, r.id DESC
         LIMIT $2
        "#,
        incident.map(|i| i.0),
        limit
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| Read {
        at: r.at,
        principal: r.principal,
        method: r.method,
        incidents: r.incidents,
    })
    .collect())
}
