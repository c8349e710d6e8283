//! The change log behind live streams: every change to an incident that a console shows,
//! appended in the transaction that makes it, readable in commit order by any instance.
//!
//! Writers call [`append`] as the last statement of their transaction. It takes a
//! transaction-level advisory lock first, so sequence numbers are handed out in commit order:
//! a reader that has seen sequence N has seen every change before it, and can resume from N
//! after a lost notification or a reconnect. The lock is held only from the append to the
//! commit; a transaction holding it waits for nothing else, so it cannot deadlock.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use occ_domain::{Incident, IncidentId};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Result;
use crate::incidents;

/// The channel the change log's trigger notifies on.
pub const CHANNEL: &str = "occ_incident_changes";

/// `pg_advisory_xact_lock` key serialising appends ("occ_chg1").
const APPEND_LOCK: i64 = 0x6f63_635f_6368_6731;

/// What happened to an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Opened,
    /// Events joined it, or raised its priority.
    Updated,
    Claimed,
    ClaimExtended,
    Released,
    ClaimExpired,
    Dispatched,
    StatusChanged,
    Escalated,
    Transferred,
    Acknowledged,
    NoteAdded,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 12] = [
        ChangeKind::Opened,
        ChangeKind::Updated,
        ChangeKind::Claimed,
        ChangeKind::ClaimExtended,
        ChangeKind::Released,
        ChangeKind::ClaimExpired,
        ChangeKind::Dispatched,
        ChangeKind::StatusChanged,
        ChangeKind::Escalated,
        ChangeKind::Transferred,
        ChangeKind::Acknowledged,
        ChangeKind::NoteAdded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Opened => "opened",
            ChangeKind::Updated => "updated",
            ChangeKind::Claimed => "claimed",
            ChangeKind::ClaimExtended => "claim_extended",
            ChangeKind::Released => "released",
            ChangeKind::ClaimExpired => "claim_expired",
            ChangeKind::Dispatched => "dispatched",
            ChangeKind::StatusChanged => "status_changed",
            ChangeKind::Escalated => "escalated",
            ChangeKind::Transferred => "transferred",
            ChangeKind::Acknowledged => "acknowledged",
            ChangeKind::NoteAdded => "note_added",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == value)
    }
}

/// A change to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub incident: IncidentId,
    /// The queues whose watchers see it: the incident's queue, and for a transfer the queue
    /// it left as well.
    pub queues: Vec<String>,
    pub kind: ChangeKind,
    pub actor: String,
    pub detail: String,
}

impl Change {
    pub fn new(
        incident: &Incident,
        kind: ChangeKind,
        actor: &str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            incident: incident.id,
            queues: vec![incident.queue.to_string()],
            kind,
            actor: actor.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Appends changes; call it last in the transaction (see the module docs).
pub async fn append(conn: &mut PgConnection, changes: &[Change], at: DateTime<Utc>) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query!("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
        .execute(&mut *conn)
        .await?;
    let incidents: Vec<Uuid> = changes.iter().map(|c| c.incident.0).collect();
    // Postgres arrays of arrays must be rectangular: queues travel as comma-free joined text.
    let queues: Vec<String> = changes.iter().map(|c| c.queues.join(",")).collect();
    let kinds: Vec<&str> = changes.iter().map(|c| c.kind.as_str()).collect();
    let actors: Vec<&str> = changes.iter().map(|c| c.actor.as_str()).collect();
    let details: Vec<&str> = changes.iter().map(|c| c.detail.as_str()).collect();
    sqlx::query!(
        r#"
        INSERT INTO incident_changes (incident_id, queues, kind, at, actor, detail)
        SELECT incident_id, string_to_array(queues, ','), kind, $6, actor, detail
          FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
               WITH ORDINALITY AS u(incident_id, queues, kind, actor, detail, n)
         ORDER BY n
        "#,
        &incidents,
        &queues,
        &kinds as &[&str],
        &actors as &[&str],
        &details as &[&str],
        at,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A recorded change, with the incident as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    pub seq: i64,
    pub queues: Vec<String>,
    pub kind: ChangeKind,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub detail: String,
    pub incident: Incident,
}

/// The newest sequence number (0 for an empty log).
pub async fn latest(conn: &mut PgConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar!(r#"SELECT COALESCE(max(seq), 0) AS "seq!" FROM incident_changes"#)
            .fetch_one(conn)
            .await?,
    )
}

/// Up to `limit` changes after `seq`, oldest first, for one queue or all. Also returns the
/// last sequence number read (a filtered read may skip changes of other queues).
pub async fn after(
    conn: &mut PgConnection,
    seq: i64,
    queue: Option<&str>,
    limit: i64,
) -> Result<(Vec<StoredChange>, i64)> {
    let rows = sqlx::query!(
        r#"
        SELECT seq, incident_id, queues, kind, at, actor, detail
          FROM incident_changes
         WHERE seq > $1
         ORDER BY seq
         LIMIT $2
        "#,
        seq,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    let last = rows.last().map_or(seq, |r| r.seq);
    let wanted: Vec<_> = rows
        .into_iter()
        .filter(|r| queue.is_none_or(|q| r.queues.iter().any(|x| x == q)))
        .collect();
    // An incident changed twice in this read is loaded once.
    let ids: Vec<IncidentId> = wanted.iter().map(|r| IncidentId(r.incident_id)).collect();
    let mut current: std::collections::HashMap<IncidentId, Incident> = incidents::load(conn, &ids)
        .await?
        .into_iter()
        .map(|i| (i.id, i))
        .collect();
    let changes = wanted
        .into_iter()
        .filter_map(|r| {
            let incident = current.get(&IncidentId(r.incident_id))?.clone();
            Some(StoredChange {
                seq: r.seq,
                queues: r.queues,
                kind: ChangeKind::parse(&r.kind)?,
                at: r.at,
                actor: r.actor,
                detail: r.detail,
                incident,
            })
        })
        .collect();
    current.clear();
    Ok((changes, last))
}

/// Deletes changes older than `before` (consoles that were away longer start from a fresh
/// snapshot).
pub async fn prune(conn: &mut PgConnection, before: DateTime<Utc>) -> Result<u64> {
    Ok(
        sqlx::query!("DELETE FROM incident_changes WHERE at < $1", before)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

/// The open incidents of a queue (or of all) and the sequence number they are current at, read
/// in one snapshot: every change after that number is not in them, every one before is.
pub async fn snapshot(
    pool: &PgPool,
    queue: Option<&str>,
    limit: i64,
) -> Result<(i64, Vec<Incident>)> {
    let mut tx = pool.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let seq = latest(&mut tx).await?;
    let ids: Vec<IncidentId> = sqlx::query_scalar!(
        r#"
        SELECT id FROM incidents
         WHERE status NOT IN ('RESOLVED', 'CLOSED', 'DISMISSED')
           AND ($1::text IS NULL OR queue = $1)
         ORDER BY priority, created_at, id
         LIMIT $2
        "#,
        queue,
        limit
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(IncidentId)
    .collect();
    let open = incidents::load(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok((seq, open))
}

/// Every change of every instance, read once per instance and shared with all its watchers.
///
/// A task follows the change log: it wakes on the log's NOTIFY (and every second regardless,
/// since a notification can be lost while the listening connection reconnects), reads what
/// was committed after the last change it read, and broadcasts it. A watcher subscribes
/// first, then takes its [`snapshot`], then skips broadcast changes at or below the
/// snapshot's sequence number: nothing is missed and nothing is shown twice.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<StoredChange>>,
    shutdown: CancellationToken,
}

impl Feed {
    /// How many changes a watcher may lag behind before it is cut off.
    pub const CAPACITY: usize = 4096;

    /// Starts following the log from its current end.
    pub async fn start(pool: PgPool, shutdown: CancellationToken) -> Result<Feed> {
        let (tx, _) = broadcast::channel(Self::CAPACITY);
        let from = latest(&mut *pool.acquire().await?).await?;
        tokio::spawn(follow(pool, tx.clone(), from, shutdown.clone()));
        Ok(Feed { tx, shutdown })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredChange>> {
        self.tx.subscribe()
    }

    /// Cancelled when OCC shuts down: watchers end their streams then.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

async fn follow(
    pool: PgPool,
    tx: broadcast::Sender<Arc<StoredChange>>,
    mut last: i64,
    shutdown: CancellationToken,
) {
    const PAGE: i64 = 500;
    let mut listener: Option<PgListener> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if listener.is_none() {
            listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for incident changes; polling");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for incident changes; polling");
                    None
                }
            };
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            n = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await,
                    None => std::future::pending().await,
                }
            } => if n.is_err() { listener = None; },
        }
        let read = async {
            let mut conn = pool.acquire().await?;
            // Read the end before looking for watchers: one that subscribes after this look
            // takes its snapshot after this read, so skipping to here skips nothing it needs.
            let end = latest(&mut conn).await?;
            if tx.receiver_count() == 0 {
                return Ok::<_, crate::StoreError>(end);
            }
            loop {
                let (page, upto) = after(&mut conn, last, None, PAGE).await?;
                let full = upto - last >= PAGE;
                for change in page {
                    let _ = tx.send(Arc::new(change));
                }
                // Advanced page by page: a failure later re-reads nothing already sent.
                last = upto;
                if !full {
                    return Ok(last);
                }
            }
        };
        match read.await {
            Ok(seq) => last = seq,
            Err(e) => tracing::warn!(error = %e, "cannot read incident changes; retrying"),
        }
    }
}
