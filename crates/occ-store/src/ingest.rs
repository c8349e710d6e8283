//! Committing a batch of ingested events: events, dead letters, the incidents they open or join
//! and the audit entries, all in one transaction.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use occ_domain::{
    Candidate, Enriched, Event, EventId, IncidentId, IncidentNumber, RuleHit, RuleSet,
    plan_correlation,
};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

use crate::audit::{self, AuditEntry, Entity};
use crate::changes::{Change, ChangeKind};
use crate::dead_letters::{self, DeadLetter};
use crate::error::{Result, StoreError};
use crate::events::{self, Transport};
use crate::incidents::{self, NewIncident};
use crate::sources;
use crate::watchlist;

/// The actor named in audit entries for changes the rules make.
pub const RULES_ACTOR: &str = "system:rules";

/// How many times a batch is retried after losing a race before the error is returned.
const MAX_RETRIES: u32 = 8;

/// What a batch holds.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Events with what the registry decided about them.
    pub events: &'a [Enriched],
    pub transport: Transport,
    pub dead_letters: &'a [DeadLetter],
    /// Set when the batch is a dead letter decoded again: it is marked resolved in the same
    /// transaction.
    pub replay_of: Option<Replay<'a>>,
}

impl<'a> Batch<'a> {
    pub fn new(
        events: &'a [Enriched],
        transport: Transport,
        dead_letters: &'a [DeadLetter],
    ) -> Self {
        Self {
            events,
            transport,
            dead_letters,
            replay_of: None,
        }
    }
}

/// A dead letter being replayed, and who asked.
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    pub dead_letter: uuid::Uuid,
    pub actor: &'a str,
}

/// An incident an event opened or joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentLink {
    pub id: IncidentId,
    pub number: IncidentNumber,
    /// True for the event that opened the incident.
    pub opened: bool,
}

/// What became of one event of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Accepted {
        event_id: EventId,
        incidents: Vec<IncidentLink>,
        /// An evolving event already stored, brought to this newer revision.
        revised: bool,
    },
    /// Nothing changed: already stored (a redelivery), overtaken by a newer revision, or a
    /// status its source already has. `existing` is the stored event's id, when there is one.
    Duplicate { existing: Option<EventId> },
    /// PostgreSQL refused a value of it (or of its message): kept as a dead letter instead.
    Refused { reason: String },
}

/// An incident a batch opened, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedIncident {
    pub number: IncidentNumber,
    pub queue: String,
    pub priority: occ_domain::Priority,
    pub title: String,
}

/// What a committed batch did, event by event in the batch's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub events: Vec<EventOutcome>,
    pub opened: Vec<OpenedIncident>,
    pub incidents_opened: usize,
    pub incidents_joined: usize,
}

impl BatchOutcome {
    pub fn accepted(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, EventOutcome::Accepted { .. }))
            .count()
    }

    pub fn duplicates(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, EventOutcome::Duplicate { .. }))
            .count()
    }

    /// Events refused by the database, kept as dead letters.
    pub fn refused(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, EventOutcome::Refused { .. }))
            .count()
    }

    fn absorb(&mut self, other: BatchOutcome) {
        self.events.extend(other.events);
        self.opened.extend(other.opened);
        self.incidents_opened += other.incidents_opened;
        self.incidents_joined += other.incidents_joined;
    }
}

/// A batch whose parts stand or fall alone: each MQTT message (its events, or its dead
/// letter), each event of a `PublishEvents` call.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub events: &'a [Enriched],
    pub dead_letters: &'a [DeadLetter],
    pub transport: Transport,
    /// Per part, in order: the range of its events and the range of its dead letters.
    pub parts: &'a [(Range<usize>, Range<usize>)],
}

/// How a caller commits a batch: with its retry policy, answering `None` to give up (at
/// shutdown).
pub trait Commit {
    fn commit(
        &self,
        batch: Batch<'_>,
    ) -> impl std::future::Future<Output = Option<Result<BatchOutcome>>> + Send;
}

/// Commits a batch with `commit`. The one fallback for values PostgreSQL refuses, for MQTT and gRPC
/// alike: if the batch is refused, its parts are committed one by one, and a part refused
/// alone is replaced by the dead letter `letter` makes of it (from the part's index and the
/// reason), its events answered [`EventOutcome::Refused`]. The rest flows on.
///
/// An error other than a refused value, or a refused replacement dead letter, is returned:
/// nothing the data can be blamed for.
pub async fn commit_parts(
    batch: Parts<'_>,
    commit: &impl Commit,
    letter: impl Fn(usize, String) -> DeadLetter,
) -> Option<Result<BatchOutcome>> {
    let whole = Batch::new(batch.events, batch.transport, batch.dead_letters);
    match commit.commit(whole).await? {
        Err(e) if e.is_data_error() => {
            tracing::warn!(error = %e, parts = batch.parts.len(), "batch refused; storing its parts one by one");
        }
        done => return Some(done),
    }
    let mut outcome = BatchOutcome::default();
    for (i, (events, dead_letters)) in batch.parts.iter().enumerate() {
        let part = Batch::new(
            &batch.events[events.clone()],
            batch.transport,
            &batch.dead_letters[dead_letters.clone()],
        );
        match commit.commit(part).await? {
            Ok(done) => outcome.absorb(done),
            Err(e) if e.is_data_error() => {
                let reason = format!("could not be stored: {e}");
                let dead = [letter(i, reason.clone())];
                if let Err(e) = commit
                    .commit(Batch::new(&[], batch.transport, &dead))
                    .await?
                {
                    return Some(Err(e));
                }
                outcome
                    .events
                    .extend(events.clone().map(|_| EventOutcome::Refused {
                        reason: reason.clone(),
                    }));
            }
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(outcome))
}

/// Commits a batch in one transaction, retrying it when it loses a race with another
/// transaction (deadlock, serialization failure, or another instance opening the same
/// incident at the same moment). Safe to call again with the same batch after any error: a
/// batch that did commit is recognised by its events' idempotency keys.
pub async fn commit_batch(
    pool: &PgPool,
    batch: Batch<'_>,
    rules: &RuleSet,
) -> Result<BatchOutcome> {
    commit_batch_in_turn(pool, batch, rules, &AnyTurn).await
}

/// What a batch's transaction waits for between its statements and its COMMIT: ingest's
/// batches in flight commit in the order they arrived (see [`CommitOrder`]).
pub trait Turn: Sync {
    /// Called as each attempt's transaction begins, on its connection.
    fn begin(
        &self,
        conn: &mut PgConnection,
    ) -> impl std::future::Future<Output = Result<()>> + Send;

    /// Resolves once the transaction on `conn` may commit, or must step aside (roll back and
    /// start again) for an earlier batch waiting on one of its rows. An error rolls it back
    /// and is returned.
    fn wait(
        &self,
        conn: &mut PgConnection,
    ) -> impl std::future::Future<Output = Result<Step>> + Send;
}

/// What a transaction waiting for its turn does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Commit,
    StepAside,
}

/// Commits whenever the transaction is ready: a call that is alone (`PublishEvents`, a replay).
#[derive(Debug, Clone, Copy)]
pub struct AnyTurn;

impl Turn for AnyTurn {
    async fn begin(&self, _: &mut PgConnection) -> Result<()> {
        Ok(())
    }

    async fn wait(&self, _: &mut PgConnection) -> Result<Step> {
        Ok(Step::Commit)
    }
}

/// The order in which a caller's batches commit, each after the one before it (ingest's
/// batches in flight: the store sees events in the order the broker delivered them).
///
/// A batch's transaction does its statements at once and waits for its turn only to COMMIT.
/// Two waits can close a circle PostgreSQL's deadlock detector does not see, because one of
/// them is not in the database: an earlier batch waiting on a row the later one stored first
/// (both store the same event), directly or through others' locks. So a batch waiting for its
/// turn asks, after [`TURN_CHECK`] and as often again, whether one of the earlier batches of
/// its order still at work waits on it, and then steps aside: rolls back and starts again,
/// behind it. The first batch in line never waits for a turn, so it always goes on. Circles
/// through another order (an object's messages split between two ingest slots or instances,
/// each batch held up by the other's predecessor) are broken after [`TURN_PATIENCE`]: a batch
/// that waited that long steps aside for whoever waits on it, but the later batches of its own
/// order (they wait for it anyway). Stepping aside is not a failure: it is not counted among a
/// batch's retries.
#[derive(Debug, Default)]
pub struct CommitOrder {
    /// The batches taken whose end is not yet known, oldest first (with the last taken, ended
    /// or not).
    pending: Arc<Mutex<VecDeque<Place>>>,
}

/// A batch of a [`CommitOrder`] as the batches after it see it.
#[derive(Debug, Clone)]
struct Place {
    /// Its transaction's backend process (0 until it began).
    pid: Arc<AtomicI32>,
    /// `Some(true)` once committed, `Some(false)` given up.
    ended: watch::Receiver<Option<bool>>,
}

impl Place {
    fn at_work(&self) -> bool {
        self.ended.borrow().is_none()
    }
}

impl CommitOrder {
    /// The next batch's turn, and how it tells the batches after it that it ended.
    pub fn take(&mut self) -> (InTurn, TurnEnd) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let before = pending.back().map(|p| p.ended.clone());
        pending.retain(Place::at_work);
        let (ended, receiver) = watch::channel(None);
        let place = Place {
            pid: Arc::new(AtomicI32::new(0)),
            ended: receiver,
        };
        let turn = InTurn {
            pid: place.pid.clone(),
            before,
            order: self.pending.clone(),
        };
        pending.push_back(place);
        (turn, TurnEnd(Some(ended)))
    }
}

/// How long a batch waits for its turn before asking whether an earlier batch waits on it, and
/// again between the questions (a commit of a full batch takes some 20 ms on two cores).
pub const TURN_CHECK: Duration = Duration::from_millis(25);

/// How long a batch waits for its turn before it steps aside for anyone waiting on it.
pub const TURN_PATIENCE: Duration = Duration::from_secs(1);

/// A batch's place in a [`CommitOrder`]: its transaction commits once the batch before it has.
#[derive(Debug)]
pub struct InTurn {
    /// Its transaction's backend process, once it began.
    pid: Arc<AtomicI32>,
    /// What became of the batch before it (`None` for the first).
    before: Option<watch::Receiver<Option<bool>>>,
    order: Arc<Mutex<VecDeque<Place>>>,
}

impl InTurn {
    /// Whether the batch before this one ended without committing: this one must not commit
    /// either (the caller gives it up, to be delivered again after the earlier one).
    pub fn lost(&self) -> bool {
        self.before
            .as_ref()
            .is_some_and(|b| *b.borrow() == Some(false))
    }

    /// The backend processes of the batches of its order still at work, before and after it.
    fn neighbours(&self) -> (Vec<i32>, Vec<i32>) {
        let pending = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut earlier, mut later) = (Vec::new(), Vec::new());
        let mut after = false;
        for p in pending.iter() {
            if Arc::ptr_eq(&p.pid, &self.pid) {
                after = true;
                continue;
            }
            let pid = p.pid.load(Ordering::Acquire);
            if pid != 0 && p.at_work() {
                if after {
                    later.push(pid)
                } else {
                    earlier.push(pid)
                }
            }
        }
        (earlier, later)
    }
}

impl Turn for InTurn {
    async fn begin(&self, conn: &mut PgConnection) -> Result<()> {
        let pid = sqlx::query_scalar!(r#"SELECT pg_backend_pid() AS "pid!""#)
            .fetch_one(conn)
            .await?;
        self.pid.store(pid, Ordering::Release);
        Ok(())
    }

    async fn wait(&self, conn: &mut PgConnection) -> Result<Step> {
        let Some(mut before) = self.before.clone() else {
            return Ok(Step::Commit);
        };
        let started = tokio::time::Instant::now();
        loop {
            let ended = async { before.wait_for(Option::is_some).await.map(|e| *e) };
            tokio::select! {
                ended = ended => {
                    return match ended {
                        Ok(Some(true)) => Ok(Step::Commit),
                        _ => Err(StoreError::Precondition(
                            "the batch before this one was not committed".into(),
                        )),
                    };
                }
                () = tokio::time::sleep(TURN_CHECK) => {
                    let (earlier, later) = self.neighbours();
                    let anyone = started.elapsed() >= TURN_PATIENCE;
                    if blocks(conn, &earlier, anyone, &later).await? {
                        tracing::debug!(anyone, "batch steps aside for a transaction waiting on its rows");
                        return Ok(Step::StepAside);
                    }
                }
            }
        }
    }
}

/// Held by a batch of a [`CommitOrder`] until it ends; dropped unsaid (its task aborted), it
/// says the batch was given up.
#[derive(Debug)]
pub struct TurnEnd(Option<watch::Sender<Option<bool>>>);

impl TurnEnd {
    /// The batch committed (true) or was given up (false): the batch after it commits, or is
    /// given up too.
    pub fn ended(mut self, committed: bool) {
        if let Some(sender) = self.0.take() {
            sender.send_replace(Some(committed));
        }
    }
}

impl Drop for TurnEnd {
    fn drop(&mut self) {
        if let Some(sender) = self.0.take() {
            sender.send_replace(Some(false));
        }
    }
}

/// Whether one of the transactions `earlier` (backend pids) waits on this connection's
/// transaction, directly or through others' locks; with `anyone`, whether any transaction
/// but those `later` (which wait for it anyway) does.
async fn blocks(
    conn: &mut PgConnection,
    earlier: &[i32],
    anyone: bool,
    later: &[i32],
) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"
        WITH RECURSIVE waiting (pid, depth) AS (
            SELECT w, 0 FROM unnest($1::int4[]) AS w
            UNION
            SELECT b, waiting.depth + 1
              FROM waiting, unnest(pg_blocking_pids(waiting.pid)) AS b
             WHERE waiting.depth < 8
        )
        SELECT EXISTS (SELECT 1 FROM waiting WHERE depth > 0 AND pid = pg_backend_pid())
            OR ($2 AND EXISTS (
                SELECT 1 FROM pg_locks l
                 WHERE NOT l.granted AND l.pid <> ALL ($3::int4[])
                   AND pg_backend_pid() = ANY (pg_blocking_pids(l.pid))))
            AS "blocks!"
        "#,
        earlier,
        anyone,
        later
    )
    .fetch_one(conn)
    .await?)
}

/// [`commit_batch`], with the COMMIT held until `turn` allows it.
#[tracing::instrument(skip_all, fields(events = batch.events.len(), dead_letters = batch.dead_letters.len()))]
pub async fn commit_batch_in_turn(
    pool: &PgPool,
    batch: Batch<'_>,
    rules: &RuleSet,
    turn: &impl Turn,
) -> Result<BatchOutcome> {
    let mut attempt = 0;
    loop {
        let mut tx = pool.begin().await?;
        let done = async {
            turn.begin(&mut tx).await?;
            let outcome = apply(&mut tx, batch, rules).await?;
            Ok(match turn.wait(&mut tx).await? {
                Step::Commit => Some(outcome),
                Step::StepAside => None,
            })
        }
        .await;
        let result = match done {
            Ok(Some(outcome)) => tx
                .commit()
                .await
                .map(|()| Some(outcome))
                .map_err(StoreError::from),
            // Rolled back now, not when the connection returns to the pool: the locks that
            // hold up another transaction go at once.
            other => {
                let _ = tx.rollback().await;
                other
            }
        };
        match result {
            Ok(Some(outcome)) => return Ok(outcome),
            // Stepped aside for a transaction waiting on it: not a lost race, started again
            // at once (its statements now wait in PostgreSQL for the other to end).
            Ok(None) => {}
            Err(StoreError::Retry(reason)) if attempt < MAX_RETRIES => {
                attempt += 1;
                tracing::debug!(attempt, %reason, "retrying batch");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Applies a batch inside the caller's transaction.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    batch: Batch<'_>,
    rules: &RuleSet,
) -> Result<BatchOutcome> {
    // The database's clock, like every other change to incidents.
    let now = crate::dispatch::now(conn).await?;
    let rekeyed = events::rekey_repeats(conn, batch.events).await?;
    let batch = Batch {
        events: rekeyed.as_deref().unwrap_or(batch.events),
        ..batch
    };
    let all: Vec<&Event> = batch.events.iter().map(|e| &e.event).collect();
    let key_of = |e: &Event| {
        (
            e.source_id.to_string(),
            e.idempotency_key.as_str().to_owned(),
        )
    };

    dead_letters::insert(conn, batch.dead_letters).await?;

    // Which messages are news. A plain event: the first of its key in the batch (the store
    // skips it when the key is already stored: a redelivery). An evolving event: each revision
    // newer than the stored one, so that rules see every state (an object that entered a
    // restricted zone and left it within one batch still counts), while its row keeps the
    // newest.
    let mut plain: HashMap<(String, String), usize> = HashMap::with_capacity(all.len());
    let mut evolving: HashMap<(String, String), Vec<usize>> = HashMap::new();
    for (i, e) in all.iter().enumerate() {
        if e.revision.is_some() {
            evolving.entry(key_of(e)).or_default().push(i);
        } else {
            plain.entry(key_of(e)).or_insert(i);
        }
    }
    let before = events::revisions(conn, evolving.keys()).await?;
    let evolving_keys: Vec<(String, String)> = evolving.keys().cloned().collect();
    // Per fresh revision: its place among the batch's fresh revisions of its event.
    let mut fresh: HashMap<usize, usize> = HashMap::new();
    let mut newest: Vec<(usize, i32)> = Vec::with_capacity(evolving.len());
    for (key, mut idx) in evolving {
        idx.sort_by_key(|&i| (all[i].revision, i));
        // The same revision twice in one batch is a redelivery.
        idx.dedup_by_key(|i| all[*i].revision);
        let floor = before.get(&key).map(|(_, r)| *r);
        idx.retain(|&i| floor.is_none_or(|f| all[i].revision.is_some_and(|r| r > f)));
        for (n, &i) in idx.iter().enumerate() {
            fresh.insert(i, n);
        }
        if let Some(&last) = idx.last() {
            newest.push((last, i32::try_from(idx.len()).unwrap_or(i32::MAX)));
        }
    }
    // A status report changes its source's status or nothing at all; one already stored (a
    // retried call with its producer's id) changes nothing.
    let mut reports: Vec<(usize, sources::StatusReport)> = plain
        .values()
        .filter_map(|&i| sources::StatusReport::of(all[i]).map(|r| (i, r)))
        .collect();
    if !reports.is_empty() {
        let candidates: Vec<&Event> = reports.iter().map(|(i, _)| all[*i]).collect();
        let stored_before = events::existing_ids(conn, &candidates).await?;
        reports.retain(|(i, _)| !stored_before.contains_key(&key_of(all[*i])));
    }
    let refused = sources::apply_status_reports(conn, &reports).await?;
    let mut to_insert: Vec<(usize, i32)> = plain
        .values()
        .filter(|i| !refused.contains(i))
        .map(|&i| (i, 1))
        .chain(newest)
        .collect();
    to_insert.sort_unstable();
    let insert: Vec<(&Event, i32)> = to_insert.iter().map(|&(i, n)| (all[i], n)).collect();
    let stored = events::insert(conn, &insert, batch.transport).await?;
    // Every key's stored id: just inserted, stored before, or (for duplicates, and for an
    // evolving event another instance stored a newer revision of meanwhile) looked up.
    let unknown: Vec<&Event> = all
        .iter()
        .map(|e| (e, key_of(e)))
        .filter(|(_, k)| !stored.contains_key(k) && !before.contains_key(k))
        .map(|(e, _)| *e)
        .collect();
    let existing = events::existing_ids(conn, &unknown).await?;
    let id_of = |key: &(String, String)| {
        stored
            .get(key)
            .map(|s| s.id)
            .or_else(|| before.get(key).map(|b| b.0))
            .or_else(|| existing.get(key).copied())
    };
    // What each event of the batch became: the stored row it made or revised, if any.
    let made: Vec<Option<events::Stored>> = all
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = key_of(e);
            match fresh.get(&i) {
                Some(&n) => id_of(&key).map(|id| events::Stored {
                    id,
                    // The row existed before this message: an earlier one of this batch made
                    // it, or it was stored before (by this instance or, meanwhile, another).
                    revised: n > 0 || stored.get(&key).is_none_or(|s| s.revised),
                }),
                None => (plain.get(&key) == Some(&i))
                    .then(|| stored.get(&key).copied())
                    .flatten(),
            }
        })
        .collect();

    // An evolving event stored before already belongs to incidents: a later state that
    // matches the same rule and key neither counts again nor reopens a closed one; nor does a
    // second state of it in this batch. Read after the insert: had another instance stored
    // this event meanwhile, the insert waited for its commit, so its links are seen here.
    let known: Vec<EventId> = evolving_keys.iter().filter_map(id_of).collect();
    let mut linked = incidents::linked_keys(conn, &known).await?;

    // Rule hits grouped by correlation key; keys in sorted order, so every transaction locks
    // incidents in the same order.
    let mut by_key: BTreeMap<String, Vec<(usize, RuleHit)>> = BTreeMap::new();
    for (i, e) in all.iter().enumerate() {
        let Some(row) = made[i] else { continue };
        if !batch.events[i].evaluate_rules {
            continue;
        }
        for hit in rules.evaluate(e) {
            if !linked.insert((row.id, hit.correlation_key.clone())) {
                continue;
            }
            by_key
                .entry(hit.correlation_key.clone())
                .or_default()
                .push((i, hit));
        }
    }
    let event_id = |i: usize| made[i].map_or(all[i].id, |s| s.id);

    let mut per_event: Vec<Vec<IncidentLink>> = vec![Vec::new(); all.len()];
    let mut links = Vec::new();
    let mut entries = Vec::new();
    let mut opened = Vec::new();
    let mut joined = 0;
    // The incidents the batch opened or joined: their queue, event count, and whether opened.
    let mut touched: BTreeMap<IncidentId, (String, i32, bool)> = BTreeMap::new();
    for (key, hits) in &by_key {
        let current = incidents::lock_correlating(conn, key).await?;
        let window = hits
            .iter()
            .map(|(_, h)| h.correlation_window)
            .max()
            .unwrap_or_default();
        let candidates: Vec<Candidate> = hits
            .iter()
            .map(|(i, h)| Candidate {
                observed_at: all[*i].observed_at(),
                priority: h.priority,
            })
            .collect();
        let plan = plan_correlation(current.as_ref(), window, &candidates);

        if let Some(id) = plan.retire {
            incidents::retire(conn, id, now).await?;
            entries.push(superseded(id, now));
        }
        for seg in &plan.segments {
            let (id, number) = match seg.joins {
                Some(id) => {
                    let raised = seg.raised_priority().then(|| {
                        let (_, hit) = &hits[*seg.events.last().unwrap_or(&0)];
                        hit.claim_within
                            .unwrap_or_else(|| seg.priority.default_claim_within())
                    });
                    let join = incidents::Join {
                        id,
                        added: i32::try_from(seg.events.len()).unwrap_or(i32::MAX),
                        first_seen: seg.first_seen,
                        last_seen: seg.last_seen,
                        priority: seg.priority,
                        correlating: seg.keeps_correlating,
                        claim_within: raised,
                    };
                    let now_is = incidents::join(conn, &join, now).await?;
                    joined += 1;
                    touched.insert(id, (now_is.queue, now_is.event_count, false));
                    let number = now_is.number;
                    if seg.raised_priority() {
                        let (ei, hit) = &hits[*seg.events.last().unwrap_or(&0)];
                        entries.push(AuditEntry {
                            entity: Entity::Incident(id.0),
                            at: now,
                            actor: RULES_ACTOR.into(),
                            action: "incident.priority_raised".into(),
                            before: seg
                                .previous_priority
                                .map(|p| json!({ "priority": p.as_str() })),
                            after: Some(json!({ "priority": seg.priority.as_str() })),
                            detail: format!(
                                "event {} ({} from {}) raised the priority under rule {}",
                                event_id(*ei),
                                all[*ei].event_type,
                                all[*ei].source_id,
                                hit.rule_name
                            ),
                        });
                    }
                    if !seg.keeps_correlating {
                        entries.push(superseded(id, now));
                    }
                    (id, number)
                }
                None => {
                    let (ei, hit) = &hits[seg.events[0]];
                    let first = all[*ei];
                    let new = NewIncident {
                        id: IncidentId::new(),
                        category: hit.category.as_str(),
                        queue: hit.queue.as_str(),
                        priority: seg.priority,
                        title: &hit.title,
                        location: first.location,
                        zone: hit.zone.as_ref().map(|z| z.as_str()),
                        correlation_key: key,
                        correlating: seg.keeps_correlating,
                        rule_id: hit.rule_id,
                        rule_name: hit.rule_name.as_str(),
                        first_seen: seg.first_seen,
                        last_seen: seg.last_seen,
                        event_count: i32::try_from(seg.events.len()).unwrap_or(i32::MAX),
                        claim_within: hit
                            .claim_within
                            .unwrap_or_else(|| seg.priority.default_claim_within()),
                        now,
                    };
                    let Some(number) = incidents::insert(conn, &new).await? else {
                        return Err(StoreError::Retry(format!(
                            "another transaction opened the incident for {key} first"
                        )));
                    };
                    touched.insert(new.id, (new.queue.to_owned(), new.event_count, true));
                    opened.push(OpenedIncident {
                        number: number.clone(),
                        queue: new.queue.to_owned(),
                        priority: new.priority,
                        title: new.title.to_owned(),
                    });
                    entries.push(AuditEntry {
                        entity: Entity::Incident(new.id.0),
                        at: now,
                        actor: RULES_ACTOR.into(),
                        action: "incident.opened".into(),
                        before: None,
                        after: Some(json!({
                            "number": number.as_str(),
                            "status": "QUEUED",
                            "priority": new.priority.as_str(),
                            "queue": new.queue,
                            "category": new.category,
                            "title": new.title,
                            "event_count": new.event_count,
                        })),
                        detail: format!(
                            "rule {} matched event {} ({} from {})",
                            hit.rule_name,
                            event_id(*ei),
                            first.event_type,
                            first.source_id
                        ),
                    });
                    if !seg.keeps_correlating {
                        entries.push(superseded(new.id, now));
                    }
                    (new.id, number)
                }
            };
            for (n, &ci) in seg.events.iter().enumerate() {
                let (ei, hit) = &hits[ci];
                links.push((id, event_id(*ei), hit.rule_id));
                per_event[*ei].push(IncidentLink {
                    id,
                    number: number.clone(),
                    opened: seg.joins.is_none() && n == 0,
                });
            }
        }
    }
    incidents::link_events(conn, &links, now).await?;
    let hits: Vec<watchlist::Hit> = batch
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let hit = e.watch_hit.as_ref()?;
            Some(watchlist::Hit {
                entry_id: hit.entry_id,
                event_id: made[i]?.id,
                plate: hit.plate.as_str(),
                source_id: e.event.source_id.as_str(),
                zone: e.event.zone.as_ref().map(|z| z.as_str()),
                at: e.event.observed_at(),
            })
        })
        .collect();
    watchlist::record_hits(conn, &hits, now).await?;
    if let Some(replay) = batch.replay_of {
        let stored = made.iter().flatten().count();
        dead_letters::resolve(conn, replay.dead_letter, replay.actor, stored, now).await?;
    }
    // Consoles hear of new incidents and of incidents that grew, once per incident per batch;
    // with the audit entries, last (the incidents are locked).
    let log: Vec<Change> = touched
        .into_iter()
        .map(|(id, (queue, event_count, opened))| Change {
            incident: id,
            queues: vec![queue],
            kind: if opened {
                ChangeKind::Opened
            } else {
                ChangeKind::Updated
            },
            actor: RULES_ACTOR.to_owned(),
            detail: format!("{event_count} events"),
        })
        .collect();
    audit::append_with_changes(conn, &entries, &log, now).await?;

    let events = all
        .iter()
        .zip(per_event)
        .zip(&made)
        .map(|((e, incidents), made)| match made {
            Some(row) => EventOutcome::Accepted {
                event_id: row.id,
                incidents,
                revised: row.revised,
            },
            None => EventOutcome::Duplicate {
                existing: id_of(&key_of(e)),
            },
        })
        .collect();
    Ok(BatchOutcome {
        events,
        incidents_opened: opened.len(),
        opened,
        incidents_joined: joined,
    })
}

fn superseded(id: IncidentId, now: chrono::DateTime<Utc>) -> AuditEntry {
    AuditEntry {
        entity: Entity::Incident(id.0),
        at: now,
        actor: RULES_ACTOR.into(),
        action: "incident.correlation_ended".into(),
        before: Some(json!({ "correlating": true })),
        after: Some(json!({ "correlating": false })),
        detail: "no related event within the rule's window; later events open a new incident"
            .into(),
    }
}
