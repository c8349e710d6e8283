//! What OCC has published about incidents as CAP alerts (see [`occ_domain::cap::next`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use occ_domain::IncidentId;
use occ_domain::cap::{Message, Published};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;

/// Incidents of `categories` that may need a message: open ones not yet closed out, and those
/// whose last message did not close the matter. Read when an instance takes over publishing.
pub async fn in_force(conn: &mut PgConnection, categories: &[String]) -> Result<Vec<IncidentId>> {
    Ok(sqlx::query_scalar!(
        r#"
        SELECT i.id AS "id!" FROM incidents i
         WHERE i.category = ANY($1)
           AND i.status NOT IN ('RESOLVED', 'CLOSED', 'DISMISSED')
           AND NOT EXISTS (SELECT 1 FROM cap_alerts c WHERE c.incident_id = i.id AND c.ended)
        UNION
        SELECT c.incident_id FROM cap_alerts c JOIN incidents i ON i.id = c.incident_id
         WHERE NOT c.ended AND i.category = ANY($1)
        "#,
        categories
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(IncidentId)
    .collect())
}

/// What was last published about each of `incidents` that has been published about.
pub async fn published(
    conn: &mut PgConnection,
    incidents: &[IncidentId],
) -> Result<HashMap<IncidentId, Published>> {
    let ids: Vec<Uuid> = incidents.iter().map(|i| i.0).collect();
    Ok(sqlx::query!(
        r#"
        SELECT incident_id, first_identifier, first_sent, signature, ended
          FROM cap_alerts WHERE incident_id = ANY($1)
        "#,
        &ids
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| {
        (
            IncidentId(r.incident_id),
            Published {
                first: (r.first_identifier, r.first_sent),
                signature: r.signature,
                ended: r.ended,
            },
        )
    })
    .collect())
}

/// Records that `messages` were published (the broker acknowledged them) at `at`.
pub async fn record(
    conn: &mut PgConnection,
    at: DateTime<Utc>,
    messages: &[(IncidentId, Message, Published)],
) -> Result<()> {
    let mut ids = Vec::with_capacity(messages.len());
    let mut first_ids = Vec::with_capacity(messages.len());
    let mut first_sent = Vec::with_capacity(messages.len());
    let mut signatures = Vec::with_capacity(messages.len());
    let mut ended = Vec::with_capacity(messages.len());
    let mut last_ids = Vec::with_capacity(messages.len());
    let mut types = Vec::with_capacity(messages.len());
    for (incident, message, published) in messages {
        ids.push(incident.0);
        first_ids.push(published.first.0.clone());
        first_sent.push(published.first.1);
        signatures.push(published.signature.clone());
        ended.push(published.ended);
        last_ids.push(message.identifier.clone());
        types.push(message.msg_type.as_str().to_owned());
    }
    sqlx::query!(
        r#"
        INSERT INTO cap_alerts (incident_id, first_identifier, first_sent, signature, ended,
                                last_identifier, last_msg_type, published_at)
        SELECT *, $8::timestamptz FROM unnest($1::uuid[], $2::text[], $3::timestamptz[],
                                             $4::text[], $5::bool[], $6::text[], $7::text[])
        ON CONFLICT (incident_id) DO UPDATE
           SET signature = excluded.signature, ended = excluded.ended,
               last_identifier = excluded.last_identifier,
               last_msg_type = excluded.last_msg_type, published_at = excluded.published_at
        "#,
        &ids,
        &first_ids,
        &first_sent,
        &signatures,
        &ended,
        &last_ids,
        &types,
        at
    )
    .execute(conn)
    .await?;
    Ok(())
}
