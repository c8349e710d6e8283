//! The change log behind live streams: every change to an incident that a console shows,
//! appended in the transaction that makes it, readable by any instance.
//!
//! Writers call [`append`] as the last statement of their transaction, after they have locked
//! the incidents they change; nothing else is locked, so writers of different incidents never
//! wait for each other. Each row carries its transaction's id. A reader ([`Position::read`])
//! takes a snapshot and reads the rows of the transactions committed in it that it has not
//! read yet: every transaction below the snapshot's `xmin` has ended, so nothing below it
//! changes again, and those committed above it are remembered by id until `xmin` passes them.
//!
//! Order: changes to one incident are read in the order they committed (a writer appends only
//! once it holds the incident's row lock, so its sequence number is above that of every change
//! to the incident committed before, and a snapshot that shows a transaction shows every one
//! that committed before it). Changes to different incidents committed at the same time may be
//! read in either order.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use occ_domain::{Incident, IncidentId};
use sqlx::{PgConnection, PgPool};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::incidents;

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

/// Appends changes; call it last in the transaction, once the incidents are locked (see the
/// module docs).
pub async fn append(conn: &mut PgConnection, changes: &[Change], at: DateTime<Utc>) -> Result<()> {
    crate::audit::append_with_changes(conn, &[], changes, at).await
}

/// A recorded change, with the incident as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    pub seq: i64,
    /// The transaction that wrote it.
    pub xid: u64,
    pub queues: Vec<String>,
    pub kind: ChangeKind,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub detail: String,
    pub incident: Incident,
}

/// A database snapshot: which transactions had committed when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    running: Vec<u64>,
}

impl Snapshot {
    /// Parses PostgreSQL's text form, `xmin:xmax:xip,xip,…`.
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<std::result::Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether a change written by transaction `xid` is in the snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid))
    }
}

async fn current_snapshot(conn: &mut PgConnection) -> Result<Snapshot> {
    let text = sqlx::query_scalar!(r#"SELECT pg_current_snapshot()::text AS "s!""#)
        .fetch_one(&mut *conn)
        .await?;
    Snapshot::parse(&text).ok_or_else(|| {
        crate::StoreError::Corrupt(format!("unreadable pg_current_snapshot() {text:?}"))
    })
}

/// How far a reader has read the log: every change of a transaction below `below`, and of
/// the transactions in `ahead` (which committed while an older one was still running).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    below: u64,
    ahead: std::collections::BTreeSet<u64>,
}

impl Position {
    /// Transactions read ahead of the oldest running one, at most. Past that, a reader waits
    /// for the oldest running transaction to end (and says so), rather than remember more.
    pub const MAX_AHEAD: usize = 10_000;

    /// The end of the log now: everything committed counts as read.
    pub async fn now(conn: &mut PgConnection) -> Result<Position> {
        let mut position = Position::default();
        position.read_xids(conn).await?;
        Ok(position)
    }

    /// Skips what was committed since the last read.
    pub async fn skip(&mut self, conn: &mut PgConnection) -> Result<()> {
        self.read_xids(conn).await
    }

    async fn read_xids(&mut self, conn: &mut PgConnection) -> Result<()> {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let snapshot = current_snapshot(&mut tx).await?;
        let xids = sqlx::query_scalar!(
            r#"
            SELECT DISTINCT xid::text AS "xid!" FROM incident_changes
             WHERE xid >= $1::text::xid8
            "#,
            snapshot.xmin.max(self.below).to_string(),
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        self.advance(&snapshot, xids.iter().filter_map(|x| x.parse().ok()));
        Ok(())
    }

    /// Reads the changes committed since the last read, each incident's in commit order.
    pub async fn read(&mut self, conn: &mut PgConnection) -> Result<Vec<StoredChange>> {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let snapshot = current_snapshot(&mut tx).await?;
        // Holding back: read below the oldest running transaction only, until it ends.
        let upto = if self.ahead.len() >= Self::MAX_AHEAD {
            snapshot.xmin
        } else {
            u64::MAX
        };
        let ahead: Vec<String> = self.ahead.iter().map(u64::to_string).collect();
        let rows = sqlx::query!(
            r#"
            SELECT seq, xid::text AS "xid!", incident_id, queues, kind, at, actor, detail
              FROM incident_changes
             WHERE xid >= $1::text::xid8
               AND xid < $2::text::xid8
               AND xid <> ALL ($3::text[]::xid8[])
             ORDER BY seq
            "#,
            self.below.to_string(),
            upto.min(i64::MAX as u64).to_string(),
            &ahead,
        )
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<IncidentId> = rows.iter().map(|r| IncidentId(r.incident_id)).collect();
        let current: std::collections::HashMap<IncidentId, Incident> =
            incidents::load(&mut tx, &ids)
                .await?
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
        tx.commit().await?;
        let mut xids = Vec::with_capacity(rows.len());
        let changes = rows
            .into_iter()
            .filter_map(|r| {
                let xid: u64 = r.xid.parse().ok()?;
                xids.push(xid);
                let incident = current.get(&IncidentId(r.incident_id))?.clone();
                Some(StoredChange {
                    seq: r.seq,
                    xid,
                    queues: r.queues,
                    kind: ChangeKind::parse(&r.kind)?,
                    at: r.at,
                    actor: r.actor,
                    detail: r.detail,
                    incident,
                })
            })
            .collect();
        let held_back = upto != u64::MAX;
        self.advance(&snapshot, xids);
        if held_back && self.ahead.len() >= Self::MAX_AHEAD {
            tracing::warn!(
                oldest_running_transaction = snapshot.xmin,
                "a database transaction open for long holds back live incident streams until \
                 it ends (see pg_stat_activity.backend_xid)"
            );
        }
        Ok(changes)
    }

    /// Counts as read every transaction below the snapshot's xmin and those of `xids`.
    fn advance(&mut self, snapshot: &Snapshot, xids: impl IntoIterator<Item = u64>) {
        self.ahead.extend(xids);
        self.below = self.below.max(snapshot.xmin);
        let below = self.below;
        self.ahead.retain(|x| *x >= below);
    }
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

/// The open incidents of a queue (or of all), and the snapshot they were read in: a change is
/// in them exactly when the snapshot [`sees`](Snapshot::sees) its transaction.
pub async fn snapshot(
    pool: &PgPool,
    queues: Option<&[String]>,
    limit: i64,
) -> Result<(Snapshot, Vec<Incident>)> {
    let mut tx = pool.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let seq = current_snapshot(&mut tx).await?;
    let ids: Vec<IncidentId> = sqlx::query_scalar!(
        r#"
        SELECT id FROM incidents
         WHERE status NOT IN ('RESOLVED', 'CLOSED', 'DISMISSED')
           AND ($1::text[] IS NULL OR queue = ANY($1))
         ORDER BY priority, created_at, id
         LIMIT $2
        "#,
        queues,
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
/// A task follows the change log: while someone watches it reads what was committed since its
/// last read, every [`Feed::POLL`], and broadcasts it; while nobody watches it only keeps its
/// position at the end of the log. A watcher subscribes first, then takes its [`snapshot`],
/// then skips broadcast changes its snapshot already shows: nothing is missed and nothing is
/// shown twice.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<StoredChange>>,
    shutdown: CancellationToken,
}

impl Feed {
    /// How many changes a watcher may lag behind before it is cut off.
    pub const CAPACITY: usize = 4096;

    /// How often the log is read while someone watches: the most a change waits before
    /// watchers on any instance see it.
    pub const POLL: Duration = Duration::from_millis(100);

    /// Starts following the log from its current end.
    pub async fn start(pool: PgPool, shutdown: CancellationToken) -> Result<Feed> {
        let (tx, _) = broadcast::channel(Self::CAPACITY);
        let from = Position::now(&mut *pool.acquire().await?).await?;
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
    mut position: Position,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Feed::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = 0u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let watched = tx.receiver_count() > 0;
        // Unwatched, the position is kept at the end once a second: a watcher that subscribes
        // later takes its snapshot later and skips what was skipped anyway.
        idle = if watched { 0 } else { idle + 1 };
        if !watched && idle % 10 != 1 {
            continue;
        }
        let read = async {
            let mut conn = pool.acquire().await?;
            if !watched {
                // Skipped only if still nobody watches once the end is read: a watcher that
                // subscribed before then may need what is skipped.
                let mut end = position.clone();
                end.skip(&mut conn).await?;
                if tx.receiver_count() == 0 {
                    position = end;
                }
                return Ok(());
            }
            for change in position.read(&mut conn).await? {
                let _ = tx.send(Arc::new(change));
            }
            Ok::<_, crate::StoreError>(())
        };
        if let Err(e) = read.await {
            tracing::warn!(error = %e, "cannot read incident changes; retrying");
        }
    }
}
