//! Working incidents: claims, dispatch, transfers, status changes, acknowledgements and notes.
//!
//! Every function runs inside the caller's transaction and leaves, in it, the change, its
//! audit entries and its change-log entry, so they commit together or not at all. Status
//! changes are decided by the domain's state machines; this module persists them.
//!
//! Lock order, everywhere: the incident row, then its claim, then units (by id); the change log
//! is appended last, once the incident is locked (which orders one incident's changes). Time
//! comes from the database's clock, read once the rows are locked, so leases and deadlines mean
//! the same on every instance and audit times follow the order in which changes commit.

use chrono::{DateTime, Utc};
use occ_domain::claim::{Claim, ClaimEnd, ClaimRefusal, Lease, claim_deadline};
use occ_domain::unit::{incident_follows, may_report};
use occ_domain::{
    ClaimInfo, Incident, IncidentCommand, IncidentId, IncidentStatus, UnitCommand, UnitId,
    UnitStatus,
};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::changes::{self, Change, ChangeKind};
use crate::error::{Result, StoreError};
use crate::incidents;
use crate::timeline::StoredAudit;
use crate::units::{self, Unit};

/// The longest note, release or transfer reason.
pub const MAX_NOTE_LEN: usize = 4000;

/// The database's clock, now (not at the start of the transaction).
pub async fn now(conn: &mut PgConnection) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar!(r#"SELECT clock_timestamp() AS "now!""#)
        .fetch_one(conn)
        .await?)
}

fn entry(incident: IncidentId, at: DateTime<Utc>, actor: &str, action: &str) -> AuditEntry {
    AuditEntry {
        entity: Entity::Incident(incident.0),
        at,
        actor: actor.to_owned(),
        action: action.to_owned(),
        before: None,
        after: None,
        detail: String::new(),
    }
}

/// Checks a free text an operator gives (a note, a reason).
pub fn check_text(field: &str, text: &str, required: bool) -> Result<()> {
    if (required && text.trim().is_empty()) || text.len() > MAX_NOTE_LEN {
        return Err(StoreError::Invalid(occ_domain::FieldErrors::one(
            field,
            format!(
                "must be {} to {MAX_NOTE_LEN} bytes",
                if required { 1 } else { 0 }
            ),
        )));
    }
    Ok(())
}

/// Locks an incident and reads it.
pub async fn lock(conn: &mut PgConnection, id: IncidentId) -> Result<Incident> {
    let found = sqlx::query_scalar!("SELECT id FROM incidents WHERE id = $1 FOR UPDATE", id.0)
        .fetch_optional(&mut *conn)
        .await?;
    if found.is_none() {
        return Err(StoreError::NotFound { what: "incident" });
    }
    incidents::get(conn, id).await
}

fn refuse(incident: &Incident, command: IncidentCommand) -> Result<IncidentStatus> {
    incident.status.apply(command).map_err(|e| {
        StoreError::Precondition(format!("{} {}: {e}", incident.number, incident.title))
    })
}

/// An active claim, locked with its incident, held by the caller, its lease running.
struct Held {
    incident: Incident,
    claim: ClaimInfo,
    /// The agency of the incident's queue.
    agency: String,
    now: DateTime<Utc>,
}

/// Locks the incident of a claim, then the claim, and checks that `holder` holds it and its
/// lease has not run out. One statement: the time is read once both rows are locked (above
/// the subquery that locks them).
async fn lock_claim(conn: &mut PgConnection, claim: Uuid, holder: &str) -> Result<Held> {
    let r = sqlx::query!(
        r#"
        SELECT l.id AS "id!", l.number AS "number!", l.category AS "category!",
               l.queue AS "queue!", l.priority AS "priority!", l.status AS "status!",
               l.title AS "title!", l.lat, l.lon, l.zone, l.correlation_key AS "correlation_key!",
               l.correlating AS "correlating!", l.rule_id, l.rule_name AS "rule_name!",
               l.first_seen AS "first_seen!", l.last_seen AS "last_seen!",
               l.event_count AS "event_count!", l.created_at AS "created_at!",
               l.updated_at AS "updated_at!", l.claim_within_seconds AS "claim_within_seconds!",
               l.claim_deadline, l.escalated_at, l.acknowledged_at, l.acknowledged_by,
               l.holder AS "holder!", l.claimed_at AS "claimed_at!",
               l.lease_until AS "lease_until!", l.ended_at, l.end_reason,
               l.agency AS "agency!", clock_timestamp() AS "now!"
          FROM (SELECT i.*, c.holder, c.claimed_at, c.lease_until, c.ended_at, c.end_reason,
                       q.agency
                  FROM incidents i
                  JOIN claims c ON c.incident_id = i.id
                  JOIN queues q ON q.name = i.queue
                 WHERE c.id = $1
                   FOR UPDATE OF i, c) l
        "#,
        claim
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound { what: "claim" })?;
    let now = r.now;
    let ended = match (r.ended_at, r.end_reason.as_deref()) {
        (Some(at), Some(reason)) => Some((
            at,
            ClaimEnd::parse(reason).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "claim {claim} ended for an unknown reason {reason}"
                ))
            })?,
        )),
        _ => None,
    };
    let stored = Claim {
        id: claim,
        holder: r.holder.clone(),
        claimed_at: r.claimed_at,
        lease_until: r.lease_until,
        ended,
    };
    let info = ClaimInfo {
        id: claim,
        holder: r.holder.clone(),
        claimed_at: r.claimed_at,
        lease_until: r.lease_until,
    };
    let agency = r.agency.clone();
    // The incident's active claim is this one, unless it has ended.
    let active = stored.ended.is_none().then_some(&info);
    let incident = Incident::try_from(incidents::incident_row!(r, claim: active))?;
    stored.check(holder, now).map_err(|refusal| {
        let said = format!("the claim on {} is {refusal}", incident.number);
        match refusal {
            ClaimRefusal::HeldByAnother { .. } => StoreError::Forbidden(said),
            ClaimRefusal::Ended { .. } => {
                StoreError::Precondition(format!("{said}; the incident is {}", incident.status))
            }
            ClaimRefusal::Expired { .. } => StoreError::Precondition(said),
        }
    })?;
    Ok(Held {
        incident,
        claim: info,
        agency,
        now,
    })
}

/// A claimed incident is its holder's: a change to it needs that claim. Returns the time to
/// record the change at.
async fn require_claim_if_claimed(
    conn: &mut PgConnection,
    incident: &Incident,
    claim: Option<Uuid>,
    actor: &str,
) -> Result<DateTime<Utc>> {
    match (&incident.claim, claim) {
        (None, _) => now(conn).await,
        (Some(active), Some(c)) if c == active.id => Ok(lock_claim(conn, c, actor).await?.now),
        (Some(active), Some(_)) => Err(StoreError::Forbidden(format!(
            "{} is claimed by {} under another claim",
            incident.number, active.holder
        ))),
        (Some(active), None) => Err(StoreError::Precondition(format!(
            "{} is CLAIMED by {}: only that claim can change it",
            incident.number, active.holder
        ))),
    }
}

async fn end_claim(
    conn: &mut PgConnection,
    claim: Uuid,
    end: ClaimEnd,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        "UPDATE claims SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL",
        claim,
        now,
        end.as_str()
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Puts an incident back in a queue (`status`, as the domain decided) with a fresh claim
/// deadline.
async fn requeue(
    conn: &mut PgConnection,
    incident: &Incident,
    queue: &str,
    status: IncidentStatus,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        "UPDATE incidents SET status = $2, queue = $3, updated_at = $4, claim_deadline = $5
          WHERE id = $1",
        incident.id.0,
        status.as_str(),
        queue,
        now,
        claim_deadline(now, incident.claim_within),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads the incident as it now is, then writes the audit entries and the change-log entries
/// of the change (in one statement: the change log comes last, held only until commit).
async fn record(
    conn: &mut PgConnection,
    incident: IncidentId,
    entries: &[AuditEntry],
    log: &[Change],
    now: DateTime<Utc>,
) -> Result<Incident> {
    let after = incidents::get(conn, incident).await?;
    audit::append_with_changes(conn, entries, log, now).await?;
    Ok(after)
}

/// Claims the most urgent, then oldest, waiting incident of `queue` for `holder`, or `None`
/// when the queue has none. Concurrent callers never get the same incident: a row another
/// transaction has locked is skipped, not waited for. If every waiting incident was locked
/// for a moment (a note, an acknowledgement, joining events), it looks again briefly rather
/// than answer "empty" for a queue that is not.
///
/// The claim is one statement (the incident, its claim, the audit entry and the change-log
/// entry), atomic with or without a transaction around it.
pub async fn claim_next(
    conn: &mut PgConnection,
    queue: &str,
    holder: &str,
    lease: Lease,
) -> Result<Option<Incident>> {
    let waiting = IncidentStatus::Queued;
    let claimed = waiting.apply(IncidentCommand::Claim).map_err(|e| {
        StoreError::Precondition(format!("a waiting incident cannot be claimed: {e}"))
    })?;
    let claim = Uuid::now_v7();
    let lease_seconds = lease.duration().as_seconds_f64();
    let mut attempts = 0;
    loop {
        // The time is read once the row is locked; the lease is Lease::until on it.
        let taken = sqlx::query_as!(
            incidents::IncidentRow,
            r#"
            WITH next AS (
                SELECT id FROM incidents
                 -- Said as the incidents_claim_order index says it (see its migration).
                 WHERE queue = $1 AND coalesce(status, '') = 'QUEUED'
                 ORDER BY priority, created_at, id
                 LIMIT 1
                   FOR UPDATE SKIP LOCKED
            ), taken AS (
                UPDATE incidents i
                   SET status = $2, claim_deadline = NULL, updated_at = clock_timestamp()
                  FROM next
                 WHERE i.id = next.id
                RETURNING i.*
            ), claimed AS (
                INSERT INTO claims (id, incident_id, holder, claimed_at, lease_until)
                SELECT $3, id, $4, updated_at, updated_at + make_interval(secs => $5)
                  FROM taken
                RETURNING id, incident_id, holder, claimed_at, lease_until
            ), audited AS (
                INSERT INTO audit_log (entity_type, entity_id, at, actor, action, before, after,
                                       detail)
                SELECT 'incident', incident_id, claimed_at, holder, 'incident.claimed',
                       jsonb_build_object('status', $6::text),
                       jsonb_build_object('status', $2::text, 'holder', holder,
                                          -- As chrono writes it elsewhere in the audit log.
                                          'lease_until', to_char(lease_until AT TIME ZONE 'UTC',
                                                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                       $7
                  FROM claimed
            ), logged AS (
                INSERT INTO incident_changes (incident_id, queues, kind, at, actor, detail)
                SELECT id, ARRAY[queue], $8, updated_at, $4, '' FROM taken
            )
            SELECT t.id AS "id!", t.number AS "number!", t.category AS "category!",
                   t.queue AS "queue!", t.priority AS "priority!", t.status AS "status!",
                   t.title AS "title!", t.lat, t.lon, t.zone,
                   t.correlation_key AS "correlation_key!", t.correlating AS "correlating!",
                   t.rule_id, t.rule_name AS "rule_name!", t.first_seen AS "first_seen!",
                   t.last_seen AS "last_seen!", t.event_count AS "event_count!",
                   t.created_at AS "created_at!", t.updated_at AS "updated_at!",
                   t.claim_within_seconds AS "claim_within_seconds!", t.claim_deadline,
                   t.escalated_at, t.acknowledged_at, t.acknowledged_by,
                   c.id AS "claim_id?", c.holder AS "claim_holder?",
                   c.claimed_at AS "claimed_at?", c.lease_until AS "lease_until?"
              FROM taken t
              JOIN claimed c ON c.incident_id = t.id
            "#,
            queue,
            claimed.as_str(),
            claim,
            holder,
            lease_seconds,
            waiting.as_str(),
            format!("claim {claim}"),
            ChangeKind::Claimed.as_str(),
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(taken) = taken {
            return Ok(Some(Incident::try_from(taken)?));
        }
        // In queue order, like the claim, so that any plan walks the waiting incidents' index
        // (a plan that scans the table would read every incident to find none).
        let waiting = sqlx::query_scalar!(
            r#"
            SELECT id FROM incidents
             WHERE queue = $1 AND coalesce(status, '') = 'QUEUED'
             ORDER BY priority, created_at, id
             LIMIT 1
            "#,
            queue,
        )
        .fetch_optional(&mut *conn)
        .await?
        .is_some();
        attempts += 1;
        if !waiting || attempts > 3 {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Gives a claimed incident back to its queue.
pub async fn release(
    conn: &mut PgConnection,
    claim: Uuid,
    holder: &str,
    reason: &str,
) -> Result<Incident> {
    check_text("reason", reason, false)?;
    let Held { incident, now, .. } = lock_claim(conn, claim, holder).await?;
    let next = refuse(&incident, IncidentCommand::Release)?;
    requeue(conn, &incident, incident.queue.as_str(), next, now).await?;
    end_claim(conn, claim, ClaimEnd::Released, now).await?;
    let entries = [AuditEntry {
        before: Some(json!({"status": incident.status.as_str(), "holder": holder})),
        after: Some(json!({"status": next.as_str()})),
        detail: reason.to_owned(),
        ..entry(incident.id, now, holder, "incident.released")
    }];
    let log = [Change::new(&incident, ChangeKind::Released, holder, reason)];
    record(conn, incident.id, &entries, &log, now).await
}

/// Renews a claim's lease from now. Returns the incident with the renewed claim.
pub async fn extend(
    conn: &mut PgConnection,
    claim: Uuid,
    holder: &str,
    lease: Lease,
) -> Result<(Incident, ClaimInfo)> {
    let Held {
        incident,
        claim: mut info,
        now,
        ..
    } = lock_claim(conn, claim, holder).await?;
    // lock_claim checked the claim may be used: renewed from now.
    info.lease_until = lease.until(now);
    sqlx::query!(
        "UPDATE claims SET lease_until = $2 WHERE id = $1",
        claim,
        info.lease_until
    )
    .execute(&mut *conn)
    .await?;
    let entries = [AuditEntry {
        after: Some(json!({"lease_until": info.lease_until})),
        detail: format!("claim {claim}"),
        ..entry(incident.id, now, holder, "incident.claim_extended")
    }];
    let log = [Change::new(
        &incident,
        ChangeKind::ClaimExtended,
        holder,
        "",
    )];
    let after = record(conn, incident.id, &entries, &log, now).await?;
    Ok((after, info))
}

/// Assigns available units of the incident's agency, named by id or call sign, sets the
/// incident and the units DISPATCHED, and ends the claim.
pub async fn dispatch_units(
    conn: &mut PgConnection,
    claim: Uuid,
    holder: &str,
    references: &[&str],
) -> Result<(Incident, Vec<Unit>)> {
    if references.is_empty() {
        return Err(StoreError::Invalid(occ_domain::FieldErrors::one(
            "unit_ids",
            "name at least one unit",
        )));
    }
    let Held {
        incident,
        agency,
        now,
        ..
    } = lock_claim(conn, claim, holder).await?;
    let next = refuse(&incident, IncidentCommand::Dispatch)?;
    let found = units::lock_named(conn, references).await?;
    let mut statuses = Vec::with_capacity(found.len());
    for unit in &found {
        if unit.agency != agency {
            return Err(StoreError::Precondition(format!(
                "unit {} belongs to {}, not {agency}, which handles the {} queue",
                unit.call_sign, unit.agency, incident.queue
            )));
        }
        statuses.push(
            unit.status
                .apply(UnitCommand::Dispatch)
                .map_err(|e| StoreError::Precondition(format!("unit {}: {e}", unit.call_sign)))?,
        );
    }
    let detail = format!("dispatched to {}", incident.number);
    let (dispatched, mut entries) = units::set_statuses(
        conn,
        &found,
        &statuses,
        Some(incident.id),
        holder,
        &detail,
        now,
    )
    .await?;
    sqlx::query!(
        r#"
        WITH ended AS (
            UPDATE claims SET ended_at = $3, end_reason = $5
             WHERE id = $4 AND ended_at IS NULL
        )
        UPDATE incidents SET status = $2, updated_at = $3 WHERE id = $1
        "#,
        incident.id.0,
        next.as_str(),
        now,
        claim,
        ClaimEnd::Dispatched.as_str(),
    )
    .execute(&mut *conn)
    .await?;
    let call_signs: Vec<&str> = dispatched.iter().map(|u| u.call_sign.as_str()).collect();
    entries.push(AuditEntry {
        before: Some(json!({"status": incident.status.as_str()})),
        after: Some(json!({"status": next.as_str(), "units": call_signs})),
        detail: call_signs.join(", "),
        ..entry(incident.id, now, holder, "incident.dispatched")
    });
    let log = [Change::new(
        &incident,
        ChangeKind::Dispatched,
        holder,
        call_signs.join(", "),
    )];
    audit::append_with_changes(conn, &entries, &log, now).await?;
    // As stored: dispatched, the claim ended.
    let after = Incident {
        status: next,
        updated_at: now,
        claim: None,
        ..incident
    };
    Ok((after, dispatched))
}

/// Moves a waiting or claimed incident to another agency's queue. A claimed incident moves
/// only with its claim, which ends.
pub async fn transfer(
    conn: &mut PgConnection,
    id: IncidentId,
    to_queue: &str,
    reason: &str,
    claim: Option<Uuid>,
    actor: &str,
) -> Result<Incident> {
    check_text("reason", reason, false)?;
    let queue_known: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM queues WHERE name = $1) AS "e!""#,
        to_queue
    )
    .fetch_one(&mut *conn)
    .await?;
    if !queue_known {
        return Err(StoreError::NotFound { what: "queue" });
    }
    let incident = lock(conn, id).await?;
    let next = refuse(&incident, IncidentCommand::Transfer)?;
    let now = require_claim_if_claimed(conn, &incident, claim, actor).await?;
    if incident.queue.as_str() == to_queue {
        return Err(StoreError::Precondition(format!(
            "{} is already in the {to_queue} queue",
            incident.number
        )));
    }
    if let Some(active) = &incident.claim {
        end_claim(conn, active.id, ClaimEnd::Transferred, now).await?;
    }
    requeue(conn, &incident, to_queue, next, now).await?;
    let entries = [AuditEntry {
        before: Some(json!({"queue": incident.queue.as_str(), "status": incident.status.as_str()})),
        after: Some(json!({"queue": to_queue, "status": next.as_str()})),
        detail: reason.to_owned(),
        ..entry(incident.id, now, actor, "incident.transferred")
    }];
    let log = [Change {
        queues: vec![incident.queue.to_string(), to_queue.to_owned()],
        ..Change::new(&incident, ChangeKind::Transferred, actor, reason)
    }];
    record(conn, incident.id, &entries, &log, now).await
}

/// Moves an incident along EN_ROUTE → ON_SCENE → RESOLVED → CLOSED, or DISMISSED. Resolving
/// or dismissing releases its units; dismissing a claimed incident needs its claim, which
/// ends.
pub async fn update_status(
    conn: &mut PgConnection,
    id: IncidentId,
    to: IncidentStatus,
    note: &str,
    claim: Option<Uuid>,
    actor: &str,
) -> Result<Incident> {
    check_text("note", note, false)?;
    let command = match to {
        IncidentStatus::EnRoute => IncidentCommand::MarkEnRoute,
        IncidentStatus::OnScene => IncidentCommand::MarkOnScene,
        IncidentStatus::Resolved => IncidentCommand::Resolve,
        IncidentStatus::Closed => IncidentCommand::Close,
        IncidentStatus::Dismissed => IncidentCommand::Dismiss,
        other => {
            return Err(StoreError::Invalid(occ_domain::FieldErrors::one(
                "status",
                format!(
                    "{other} is reached through the queue (ClaimNext, ReleaseClaim, DispatchUnits, TransferIncident), not set"
                ),
            )));
        }
    };
    let incident = lock(conn, id).await?;
    refuse(&incident, command)?;
    let now = require_claim_if_claimed(conn, &incident, claim, actor).await?;
    apply_status(conn, &incident, command, note, actor, now).await
}

/// Persists an incident status transition the domain allows (the incident is locked).
async fn apply_status(
    conn: &mut PgConnection,
    incident: &Incident,
    command: IncidentCommand,
    note: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Incident> {
    let next = refuse(incident, command)?;
    if next.releases_units() {
        for unit in units::assigned_to(conn, incident.id).await? {
            let status = unit
                .status
                .apply(UnitCommand::Release)
                .map_err(|e| StoreError::Precondition(format!("unit {}: {e}", unit.call_sign)))?;
            let detail = format!("released: {} is {next}", incident.number);
            units::set_status(conn, &unit, status, None, actor, &detail, now).await?;
        }
    }
    if let Some(claim) = &incident.claim {
        // Only DISMISSED leaves CLAIMED here.
        end_claim(conn, claim.id, ClaimEnd::Dismissed, now).await?;
    }
    sqlx::query!(
        r#"
        UPDATE incidents
           SET status = $2, updated_at = $3, claim_deadline = NULL,
               correlating = correlating AND $4
         WHERE id = $1
        "#,
        incident.id.0,
        next.as_str(),
        now,
        next.is_open(),
    )
    .execute(&mut *conn)
    .await?;
    let entries = [AuditEntry {
        before: Some(json!({"status": incident.status.as_str()})),
        after: Some(json!({"status": next.as_str()})),
        detail: note.to_owned(),
        ..entry(incident.id, now, actor, "incident.status_changed")
    }];
    let log = [Change::new(
        incident,
        ChangeKind::StatusChanged,
        actor,
        format!("{} → {next}", incident.status),
    )];
    record(conn, incident.id, &entries, &log, now).await
}

/// Records that an operator or supervisor has seen an incident (an escalation, typically).
pub async fn acknowledge(conn: &mut PgConnection, id: IncidentId, actor: &str) -> Result<Incident> {
    let incident = lock(conn, id).await?;
    let now = now(conn).await?;
    sqlx::query!(
        "UPDATE incidents SET acknowledged_at = $2, acknowledged_by = $3, updated_at = $2 WHERE id = $1",
        id.0,
        now,
        actor
    )
    .execute(&mut *conn)
    .await?;
    let entries = [AuditEntry {
        after: Some(json!({"acknowledged_by": actor})),
        ..entry(id, now, actor, "incident.acknowledged")
    }];
    let log = [Change::new(&incident, ChangeKind::Acknowledged, actor, "")];
    record(conn, id, &entries, &log, now).await
}

/// Adds an operator's note to an incident's timeline. It changes nothing of the incident, so
/// it takes no lock on it (a claimer skipping locked rows never misses it for a note).
pub async fn add_note(
    conn: &mut PgConnection,
    id: IncidentId,
    text: &str,
    actor: &str,
) -> Result<StoredAudit> {
    check_text("text", text, true)?;
    let incident = incidents::get(conn, id).await?;
    let now = now(conn).await?;
    let note = AuditEntry {
        detail: text.to_owned(),
        ..entry(id, now, actor, "incident.note")
    };
    let stored = audit::append_returning(conn, &note).await?;
    changes::append(
        conn,
        &[Change::new(&incident, ChangeKind::NoteAdded, actor, text)],
        now,
    )
    .await?;
    Ok(stored)
}

/// A crew's status report: EN_ROUTE, ON_SCENE, AVAILABLE (cleared) or OUT_OF_SERVICE. The
/// incident it works advances with its first unit en route or on scene. The last unit of an
/// incident still being worked cannot clear: the incident would be left with no one on it.
pub async fn unit_status(
    conn: &mut PgConnection,
    id: UnitId,
    to: UnitStatus,
    actor: &str,
) -> Result<Unit> {
    // Incident before unit, as everywhere.
    let incident = match units::get(conn, id, false).await?.incident {
        Some(i) => Some(lock(conn, i).await?),
        None => None,
    };
    let unit = units::get(conn, id, true).await?;
    if unit.incident != incident.as_ref().map(|i| i.id) {
        return Err(StoreError::Retry(format!(
            "unit {} changed meanwhile",
            unit.call_sign
        )));
    }
    let now = now(conn).await?;
    let command = unit.status.command_to(to).ok_or_else(|| {
        StoreError::Invalid(occ_domain::FieldErrors::one(
            "status",
            "a unit is DISPATCHED by DispatchUnits, not by a status report",
        ))
    })?;
    let status = unit
        .status
        .apply(command)
        .map_err(|e| StoreError::Precondition(format!("unit {}: {e}", unit.call_sign)))?;
    if let Some(incident) = &incident {
        let others = units::assigned_to(conn, incident.id).await?.len() - 1;
        if !may_report(command, others) {
            return Err(StoreError::Precondition(format!(
                "unit {} is the last one on {} ({}): dispatch another, or resolve or dismiss the incident",
                unit.call_sign, incident.number, incident.status
            )));
        }
    }
    let keeps = status.is_assigned().then_some(unit.incident).flatten();
    let detail = match (&incident, command) {
        (Some(i), UnitCommand::Release) => format!("cleared from {}", i.number),
        (Some(i), _) => i.number.to_string(),
        (None, _) => String::new(),
    };
    let unit = units::set_status(conn, &unit, status, keeps, actor, &detail, now).await?;
    if let Some(incident) = incident
        && let Some(cmd) = incident_follows(status, incident.status)
    {
        let note = format!("unit {} reported {status}", unit.call_sign);
        apply_status(conn, &incident, cmd, &note, actor, now).await?;
    }
    Ok(unit)
}
