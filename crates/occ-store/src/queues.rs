//! Dispatch queues and what waits in them.

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::{Priority, QueueName};
use serde_json::json;
use sqlx::PgConnection;

use crate::audit::{self, AuditEntry, Entity};
use crate::error::Result;

/// A queue and its load.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSummary {
    pub name: String,
    pub display_name: String,
    pub agency: String,
    /// Waiting incidents per priority, most urgent first, priorities with none left out.
    pub waiting: Vec<(Priority, i64)>,
    pub oldest_waiting_age: Option<TimeDelta>,
    pub claimed: i64,
    pub escalated_waiting: i64,
}

impl QueueSummary {
    pub fn waiting_total(&self) -> i64 {
        self.waiting.iter().map(|(_, n)| n).sum()
    }
}

pub async fn summaries(conn: &mut PgConnection) -> Result<Vec<QueueSummary>> {
    let rows = sqlx::query!(
        r#"
        SELECT q.name, q.display_name, q.agency,
               count(*) FILTER (WHERE i.status = 'QUEUED' AND i.priority = 1) AS "p1!",
               count(*) FILTER (WHERE i.status = 'QUEUED' AND i.priority = 2) AS "p2!",
               count(*) FILTER (WHERE i.status = 'QUEUED' AND i.priority = 3) AS "p3!",
               count(*) FILTER (WHERE i.status = 'QUEUED' AND i.priority = 4) AS "p4!",
               min(i.created_at) FILTER (WHERE i.status = 'QUEUED') AS oldest,
               count(*) FILTER (WHERE i.status = 'CLAIMED') AS "claimed!",
               count(*) FILTER (WHERE i.status = 'QUEUED' AND i.escalated_at IS NOT NULL)
                   AS "escalated!",
               now() AS "now!"
          FROM queues q
          LEFT JOIN incidents i ON i.queue = q.name AND i.status IN ('QUEUED', 'CLAIMED')
         GROUP BY q.name
         ORDER BY q.name
        "#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let now: DateTime<Utc> = r.now;
            QueueSummary {
                waiting: [
                    (Priority::P1, r.p1),
                    (Priority::P2, r.p2),
                    (Priority::P3, r.p3),
                    (Priority::P4, r.p4),
                ]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect(),
                oldest_waiting_age: r.oldest.map(|o| now - o),
                claimed: r.claimed,
                escalated_waiting: r.escalated,
                name: r.name,
                display_name: r.display_name,
                agency: r.agency,
            }
        })
        .collect())
}

/// The agency that works a queue.
pub async fn agency(conn: &mut PgConnection, queue: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar!("SELECT agency FROM queues WHERE name = $1", queue)
            .fetch_optional(conn)
            .await?,
    )
}

/// Creates the queue `name` or changes its display name and agency, with an audit entry.
/// Returns whether it was created.
pub async fn put(
    conn: &mut PgConnection,
    name: &QueueName,
    display_name: &str,
    agency: &str,
    actor: &str,
) -> Result<bool> {
    let before = sqlx::query!(
        "SELECT id, display_name, agency FROM queues WHERE name = $1 FOR UPDATE",
        name.as_str()
    )
    .fetch_optional(&mut *conn)
    .await?;
    let id = sqlx::query_scalar!(
        r#"
        INSERT INTO queues (name, display_name, agency) VALUES ($1, $2, $3)
        ON CONFLICT (name) DO UPDATE
           SET display_name = EXCLUDED.display_name, agency = EXCLUDED.agency
        RETURNING id
        "#,
        name.as_str(),
        display_name,
        agency
    )
    .fetch_one(&mut *conn)
    .await?;
    let now = crate::dispatch::now(conn).await?;
    let created = before.is_none();
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Queue(id),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "queue.created"
            } else {
                "queue.updated"
            }
            .into(),
            before: before.map(|b| json!({"display_name": b.display_name, "agency": b.agency})),
            after: Some(json!({"display_name": display_name, "agency": agency})),
            detail: name.to_string(),
        }],
    )
    .await?;
    Ok(created)
}
