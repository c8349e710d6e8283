//! Work driven by the clock, done by whichever instance gets to it first: expiring claim
//! leases and escalating incidents that waited past their claim deadline. Rows are taken with
//! `FOR UPDATE SKIP LOCKED` and changed in the same transaction, so each expiry and each
//! escalation happens exactly once however many instances sweep.

use occ_domain::claim::{ClaimEnd, claim_deadline, escalate};
use occ_domain::{IncidentCommand, IncidentId};
use serde_json::json;
use sqlx::PgPool;

use crate::audit::{self, AuditEntry, Entity};
use crate::changes::{self, Change, ChangeKind};
use crate::dispatch;
use crate::error::Result;
use crate::incidents;

/// Who the audit log names for what the clock does.
pub const ACTOR: &str = "system:timer";

/// Ends up to `limit` claims whose lease has run out and puts their incidents back in their
/// queues. Returns how many.
pub async fn expire_claims(pool: &PgPool, limit: i64) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let now = dispatch::now(&mut tx).await?;
    let due = sqlx::query!(
        r#"
        SELECT i.id, c.id AS claim_id, c.holder, c.lease_until
          FROM incidents i
          JOIN claims c ON c.incident_id = i.id AND c.ended_at IS NULL
         WHERE c.lease_until <= $1 AND i.status = 'CLAIMED'
         ORDER BY c.lease_until
         LIMIT $2
           FOR UPDATE OF i, c SKIP LOCKED
        "#,
        now,
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let ids: Vec<IncidentId> = due.iter().map(|r| IncidentId(r.id)).collect();
    let current = incidents::load(&mut tx, &ids).await?;
    let mut entries = Vec::new();
    let mut log = Vec::new();
    for (row, incident) in due.iter().zip(&current) {
        let next = incident
            .status
            .apply(IncidentCommand::Release)
            .map_err(|e| crate::StoreError::Corrupt(e.to_string()))?;
        sqlx::query!(
            "UPDATE claims SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL AND lease_until <= $2",
            row.claim_id,
            now,
            ClaimEnd::Expired.as_str()
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE incidents SET status = $2, updated_at = $3, claim_deadline = $4 WHERE id = $1",
            row.id,
            next.as_str(),
            now,
            claim_deadline(now, incident.claim_within)
        )
        .execute(&mut *tx)
        .await?;
        entries.push(AuditEntry {
            entity: Entity::Incident(row.id),
            at: now,
            actor: ACTOR.into(),
            action: "incident.claim_expired".into(),
            before: Some(json!({"status": incident.status.as_str(), "holder": row.holder})),
            after: Some(json!({"status": next.as_str()})),
            detail: format!("the lease of {} ran out at {}", row.holder, row.lease_until),
        });
        log.push(Change::new(
            incident,
            ChangeKind::ClaimExpired,
            ACTOR,
            &row.holder,
        ));
    }
    audit::append(&mut tx, &entries).await?;
    changes::append(&mut tx, &log, now).await?;
    tx.commit().await?;
    Ok(due.len())
}

/// Escalates up to `limit` incidents still waiting past their claim deadline: priority one
/// step higher, the escalation flag set for supervisors, an audit entry. Returns how many.
pub async fn escalate_overdue(pool: &PgPool, limit: i64) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let now = dispatch::now(&mut tx).await?;
    let due: Vec<IncidentId> = sqlx::query_scalar!(
        r#"
        SELECT id FROM incidents
         WHERE claim_deadline <= $1 AND status = 'QUEUED'
         ORDER BY claim_deadline
         LIMIT $2
           FOR UPDATE SKIP LOCKED
        "#,
        now,
        limit
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(IncidentId)
    .collect();
    if due.is_empty() {
        return Ok(0);
    }
    let current = incidents::load(&mut tx, &due).await?;
    let mut entries = Vec::new();
    let mut log = Vec::new();
    for incident in &current {
        // Chosen by its deadline under the lock; the domain decides what escalation does.
        let Some(escalation) = escalate(incident.priority, incident.claim_deadline, now) else {
            continue;
        };
        let raised = escalation.priority;
        sqlx::query!(
            r#"
            UPDATE incidents
               SET priority = $2, escalated_at = $3, claim_deadline = NULL,
                   acknowledged_at = NULL, acknowledged_by = NULL, updated_at = $3
             WHERE id = $1
            "#,
            incident.id.0,
            raised.level(),
            escalation.escalated_at
        )
        .execute(&mut *tx)
        .await?;
        entries.push(AuditEntry {
            entity: Entity::Incident(incident.id.0),
            at: now,
            actor: ACTOR.into(),
            action: "incident.escalated".into(),
            before: Some(json!({"priority": incident.priority.as_str(), "escalated": incident.escalated_at.is_some()})),
            after: Some(json!({"priority": raised.as_str(), "escalated": true})),
            detail: format!(
                "not claimed within {} s of entering the {} queue",
                incident.claim_within.num_seconds(),
                incident.queue
            ),
        });
        log.push(Change::new(
            incident,
            ChangeKind::Escalated,
            ACTOR,
            format!("{} → {raised}", incident.priority),
        ));
    }
    audit::append(&mut tx, &entries).await?;
    changes::append(&mut tx, &log, now).await?;
    tx.commit().await?;
    Ok(entries.len())
}

/// How long the change log keeps changes (consoles away longer start from a snapshot).
const CHANGE_RETENTION: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// Sweeps every `interval` until `shutdown`: expired leases, overdue incidents, and once an
/// hour the change log's old entries.
pub async fn run(
    pool: PgPool,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match expire_claims(&pool, 100).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                claims = n,
                "claim leases expired; incidents back in their queues"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot expire claims"),
        }
        match escalate_overdue(&pool, 100).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(incidents = n, "incidents escalated: not claimed in time"),
            Err(e) => tracing::warn!(error = %e, "cannot escalate incidents"),
        }
        if last_prune.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(3600)) {
            last_prune = Some(tokio::time::Instant::now());
            let pruned = async {
                let mut conn = pool.acquire().await?;
                let now = crate::dispatch::now(&mut conn).await?;
                changes::prune(&mut conn, now - CHANGE_RETENTION).await
            };
            if let Err(e) = pruned.await {
                tracing::warn!(error = %e, "cannot prune the change log");
            }
        }
    }
}
