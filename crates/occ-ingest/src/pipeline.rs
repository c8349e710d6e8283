//! The batcher: collects messages into a batch (up to a size or a deadline), decodes them,
//! commits events, incidents and dead letters in one transaction, and only then acks the
//! messages, in the order they arrived.
//!
//! Up to [`BatchConfig::in_flight`] batches work at once, each on its own connection, while
//! the next one fills, and they commit in the order they arrived: a batch's transaction, its
//! statements done, waits for the batch before it to have committed (an earlier batch that
//! failed and is retried keeps its place), so the store sees every event in the order the
//! broker delivered it, as with one batch at a time (an evolving event's older state is never
//! stored after its newer one and taken for a duplicate). A batch waiting for its turn while
//! the earlier batch waits on one of its rows rolls back and starts again behind it (see
//! [`CommitOrder`]). Acks leave in arrival order too. A batch of a newer MQTT connection waits for
//! the older connection's batches (see [`Batcher::run`]).
//!
//! When PostgreSQL is down the commit is retried with backoff and nothing is acked; the broker
//! stops sending once its window of unacknowledged messages is full and holds the rest in
//! OCC's session. When PostgreSQL comes back, the batch commits and ingest resumes by itself.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use occ_adapters::Message;
use occ_domain::{Delivery, Enriched};
use occ_store::StoreError;
use occ_store::Transport;
use occ_store::dead_letters::DeadLetter;
use occ_store::health::ActivityLog;
use occ_store::ingest::{
    Batch, BatchOutcome, Commit, CommitOrder, EventOutcome, InTurn, Parts, commit_batch_in_turn,
    commit_parts,
};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::mqtt::{Acked, Connection, Inbound, Inbox};
use crate::{IngestParts, IngestStatus};

/// How batches are formed and committed.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most messages in one transaction.
    pub size: usize,
    /// How long the first message of a batch waits for others.
    pub deadline: Duration,
    /// Most batches committing at once (at least 1).
    pub in_flight: usize,
    /// How long one commit may take before it is abandoned and retried (a connection that
    /// died without a reset would otherwise hold ingest until TCP gives up).
    pub commit_timeout: Duration,
}

/// What ingest has done since it started.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Messages committed and acknowledged (events and dead letters).
    pub messages: AtomicU64,
    pub batches: AtomicU64,
    /// The most messages that waited at once between the broker and the batcher.
    pub inbox_peak: AtomicU64,
}

/// What one connection's ingest has taken and committed, to tell when its session is drained.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub received: AtomicU64,
    pub committed: AtomicU64,
}

pub(crate) struct Batcher {
    pub parts: IngestParts,
    pub progress: Arc<Progress>,
    pub client: AsyncClient,
    pub connection: Arc<Connection>,
    /// Acks of committed messages not yet handed to the event loop, in arrival order.
    pub acks: Mutex<VecDeque<PendingAck>>,
    /// Cancelled when the poll task has ended (no ack can be sent any more).
    pub poll_ended: CancellationToken,
    pub status: watch::Sender<IngestStatus>,
    pub stats: Arc<IngestStats>,
}

/// A batch decoded: the events to store and the messages that become dead letters.
struct Decoded {
    /// Per adapter: messages, and how many of them became dead letters (`None`: no adapter
    /// reads the topic).
    by_adapter: Vec<(Option<&'static str>, u64, u64)>,
    events: Vec<Enriched>,
    /// Per event: whether its message came at QoS 0 (the producer did not wait for the broker).
    qos0: Vec<bool>,
    dead_letters: Vec<DeadLetter>,
    /// Per message: the range of its events and the range of its dead letter.
    parts: Vec<(Range<usize>, Range<usize>)>,
}

impl Decoded {
    /// Tells the activity log and the metrics what the committed batch heard from its
    /// sources; QoS 0 is counted once per event, on the delivery that stored it.
    fn record(&self, outcome: &BatchOutcome, log: &ActivityLog) {
        for (adapter, messages, dead) in &self.by_adapter {
            let adapter = adapter.unwrap_or("none");
            metrics::counter!("occ_ingest_messages_total", "adapter" => adapter)
                .increment(*messages);
            metrics::counter!("occ_ingest_dead_letters_total", "adapter" => adapter)
                .increment(*dead);
        }
        metrics::counter!("occ_ingest_events_total", "outcome" => "stored")
            .increment(outcome.accepted() as u64);
        metrics::counter!("occ_ingest_events_total", "outcome" => "duplicate")
            .increment(outcome.duplicates() as u64);
        metrics::counter!("occ_ingest_events_total", "outcome" => "refused")
            .increment(outcome.refused() as u64);
        for i in &outcome.opened {
            metrics::counter!(
                "occ_incidents_opened_total",
                "queue" => i.queue.clone(),
                "priority" => i.priority.as_str()
            )
            .increment(1);
        }
        log.record(
            self.events
                .iter()
                .zip(&self.qos0)
                .zip(&outcome.events)
                .map(|((e, q), o)| (&e.event, *q && matches!(o, EventOutcome::Accepted { .. }))),
        );
    }
}

/// Ingest's commit: retried for as long as the database is the problem, until shutdown.
struct Retried<'a> {
    batcher: &'a Batcher,
    shutdown: &'a CancellationToken,
    turn: &'a InTurn,
}

impl Commit for Retried<'_> {
    async fn commit(&self, batch: Batch<'_>) -> Option<Result<BatchOutcome, StoreError>> {
        self.batcher.commit(batch, self.shutdown, self.turn).await
    }
}

impl Batcher {
    /// Runs until `shutdown`: then commits and acks the batches in hand, queues the DISCONNECT
    /// behind their acks, and returns.
    ///
    /// With several batches in flight, a batch holding messages of a newer connection than
    /// the batches in flight waits until they have ended: the broker redelivers an unacked
    /// message on the next connection, and that redelivery must not commit before the first
    /// delivery's batch, which would then store the message again as a repeat.
    pub async fn run(self: Arc<Self>, inbox: Arc<Inbox>, shutdown: CancellationToken) {
        let limit = self.parts.batch.in_flight.max(1);
        let size = self.parts.batch.size;
        // Committing batches, in arrival order: each a task of its own (decoding one batch
        // and driving another's statements use both cores), yielding its messages and whether
        // it committed; a batch is acked only when every batch before it was.
        let mut in_flight = FuturesOrdered::new();
        let mut order = CommitOrder::default();
        let mut commit = |batch: Vec<Inbound>| {
            let span = tracing::info_span!("ingest.batch", messages = batch.len());
            let shutdown = shutdown.clone();
            let this = Arc::clone(&self);
            let (turn, ended) = order.take();
            let mut task = Task(tokio::spawn(
                async move {
                    let committed = this.process(&batch, &shutdown, &turn).await;
                    ended.ended(committed);
                    (batch, committed)
                }
                .instrument(span),
            ));
            async move {
                match (&mut task.0).await {
                    Ok(done) => done,
                    // A batch that panicked stops ingest, as it would without tasks.
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // The runtime is going away: nothing more is acked.
                    Err(_) => (Vec::new(), false),
                }
            }
        };
        let mut filling: Vec<Inbound> = Vec::with_capacity(size);
        // The newest connection among the messages being collected, and among the batches
        // dispatched so far.
        let (mut filling_epoch, mut dispatched_epoch) = (0, 0);
        let mut deadline = tokio::time::Instant::now();
        let mut stopped = false;
        while !stopped {
            self.send_acks();
            let room = in_flight.len() < limit
                && (in_flight.is_empty() || filling_epoch <= dispatched_epoch);
            // A full batch goes as soon as there is room, whatever its deadline.
            if room && filling.len() >= size {
                dispatched_epoch = dispatched_epoch.max(filling_epoch);
                let batch = std::mem::replace(&mut filling, Vec::with_capacity(size));
                in_flight.push_back(commit(batch));
                continue;
            }
            tokio::select! {
                biased;
                Some((batch, committed)) = in_flight.next(), if !in_flight.is_empty() => {
                    let batch: Vec<Inbound> = batch;
                    if !self.done(&batch, committed) {
                        // Only shutdown gives a batch up; should anything else, this slot
                        // reads nothing more until OCC restarts, and says so.
                        if !shutdown.is_cancelled() {
                            tracing::error!("an ingest batch was given up without a shutdown; this slot stops reading (nothing was acknowledged past it: restart OCC)");
                        }
                        stopped = true;
                    }
                }
                () = shutdown.cancelled() => break,
                m = inbox.pop(), if filling.len() < size => {
                    if filling.is_empty() {
                        deadline = tokio::time::Instant::now() + self.parts.batch.deadline;
                        filling_epoch = 0;
                    }
                    filling_epoch = filling_epoch.max(m.epoch);
                    filling.push(m);
                }
                () = tokio::time::sleep_until(deadline), if room && !filling.is_empty() => {
                    dispatched_epoch = dispatched_epoch.max(filling_epoch);
                    let batch = std::mem::replace(&mut filling, Vec::with_capacity(size));
                    in_flight.push_back(commit(batch));
                }
                // Acks still waiting for room in the request channel go out as it drains.
                () = tokio::time::sleep(ACK_RETRY), if self.acks_waiting() => {}
            }
        }
        // Every batch in flight is acked in order, up to the first that shutdown interrupted
        // before it committed (it and those after it are redelivered, and recognised where
        // they were stored); then the messages in hand commit too.
        while let Some((batch, committed)) = in_flight.next().await {
            let batch: Vec<Inbound> = batch;
            if !stopped && !self.done(&batch, committed) {
                stopped = true;
            }
        }
        if !stopped && !filling.is_empty() {
            let (batch, committed) = commit(filling).await;
            self.done(&batch, committed);
        }
        // Every ack of what was committed goes out before the DISCONNECT, as long as the
        // connection lasts.
        while self.acks_waiting() && !self.poll_ended.is_cancelled() {
            self.send_acks();
            tokio::time::sleep(ACK_RETRY).await;
        }
        // After the acks in the request channel: the event loop sends them, then this, then
        // the poll task ends.
        if let Err(e) = self.client.disconnect().await {
            tracing::debug!(error = %e, "event loop already gone");
        }
        tracing::info!("ingest batcher stopped");
    }

    /// A batch's turn has come, every batch before it acked: acks it if it committed. False
    /// when it did not (shutdown came first): nothing after it is acked either.
    fn done(&self, batch: &[Inbound], committed: bool) -> bool {
        if committed {
            self.ack(batch);
        }
        committed
    }

    fn decode(&self, batch: &[Inbound]) -> Decoded {
        let registry = self.parts.registry.current();
        let mut events = Vec::with_capacity(batch.len());
        let mut qos0 = Vec::with_capacity(batch.len());
        let mut dead_letters = Vec::new();
        let mut by_adapter: Vec<(Option<&'static str>, u64, u64)> = Vec::new();
        let mut parts = Vec::with_capacity(batch.len());
        for m in batch {
            let (first_event, first_letter) = (events.len(), dead_letters.len());
            let topic = String::from_utf8_lossy(&m.publish.topic);
            let message = Message {
                topic: &topic,
                payload: &m.publish.payload,
                received_at: m.received_at,
            };
            let (adapter, decoded) = self
                .parts
                .adapters
                .decode_named(&message, &self.parts.limits);
            let count = match by_adapter.iter_mut().find(|(a, _, _)| *a == adapter) {
                Some(c) => c,
                None => {
                    by_adapter.push((adapter, 0, 0));
                    by_adapter.last_mut().expect("just pushed")
                }
            };
            count.1 += 1;
            match decoded {
                Ok(decoded) if !self.within_rate(&decoded, m.received_at) => {
                    count.2 += 1;
                    let source = decoded
                        .first()
                        .map(|e| e.source_id.to_string())
                        .unwrap_or_default();
                    metrics::counter!("occ_ingest_throttled_total").increment(1);
                    let rate = self
                        .parts
                        .source_rates
                        .lock()
                        .expect("source rates")
                        .per_second();
                    dead_letters.push(self.dead_letter(
                        m,
                        format!("source {source} sent more than its {rate} events a second: throttled (replay it once the flood is over)"),
                    ));
                }
                Ok(decoded) => {
                    let at_most_once = m.publish.qos == QoS::AtMostOnce;
                    // What tells this message's redelivery from the same bytes sent again.
                    let delivery = if at_most_once {
                        Delivery::Once
                    } else {
                        Delivery::Mqtt {
                            session: &m.session,
                            packet_id: m.publish.pkid,
                            redelivered: m.publish.dup,
                        }
                    };
                    for mut e in decoded {
                        e.idempotency_key = e.idempotency_key.scoped(&delivery);
                        events.push(registry.enrich(e));
                        qos0.push(at_most_once);
                    }
                }
                Err(rejection) => {
                    count.2 += 1;
                    tracing::debug!(%topic, reason = %rejection, "dead letter");
                    dead_letters.push(self.dead_letter(m, rejection.0));
                }
            }
            parts.push((first_event..events.len(), first_letter..dead_letters.len()));
        }
        Decoded {
            by_adapter,
            events,
            qos0,
            dead_letters,
            parts,
        }
    }

    /// Whether a message's events are within their source's rate (taken from it if so).
    /// Timed by when the source says they happened (never later than they arrived): a backlog
    /// the broker kept while OCC was away arrives at once, yet happened at its own pace.
    fn within_rate(
        &self,
        events: &[occ_domain::Event],
        received_at: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let Some(first) = events.first() else {
            return true;
        };
        self.parts.source_rates.lock().expect("source rates").admit(
            first.source_id.as_str(),
            events.len(),
            first.occurred_at.min(received_at),
        )
    }

    fn dead_letter(&self, m: &Inbound, reason: String) -> DeadLetter {
        DeadLetter::new(
            Transport::Mqtt,
            &String::from_utf8_lossy(&m.publish.topic),
            &m.publish.payload,
            self.parts.limits.max_payload_bytes,
            reason,
            m.received_at,
        )
    }

    /// Commits one batch (the caller acks it in its turn). Returns false when shutdown
    /// interrupted it before commit (nothing is acked: the broker redelivers).
    async fn process(
        &self,
        batch: &[Inbound],
        shutdown: &CancellationToken,
        turn: &InTurn,
    ) -> bool {
        let started = Instant::now();
        let decoded = self.decode(batch);
        let parts = Parts {
            events: &decoded.events,
            dead_letters: &decoded.dead_letters,
            transport: Transport::Mqtt,
            parts: &decoded.parts,
        };
        let mut backoff = Duration::from_secs(1);
        let outcome = loop {
            // A message whose values PostgreSQL refuses ends in the dead letters alone; the
            // rest of the batch flows on.
            let committed = commit_parts(
                parts,
                &Retried {
                    batcher: self,
                    shutdown,
                    turn,
                },
                |i, reason| self.dead_letter(&batch[i], reason),
            )
            .await;
            match committed {
                Some(Ok(outcome)) => break outcome,
                // A dead letter is bytes and text; if even that cannot be stored, something is
                // wrong with the database, not the message: pause (unhealthy) and retry rather
                // than leave the messages unacknowledged, which would hold the broker's window
                // for the rest of the connection.
                Some(Err(e)) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "cannot store a dead letter; ingest paused");
                    self.status.send_modify(|s| s.database_ok = false);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                None => return false,
            }
        };
        decoded.record(&outcome, &self.parts.activity);
        metrics::histogram!("occ_ingest_batch_messages").record(batch.len() as f64);
        metrics::histogram!("occ_ingest_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Some(oldest) = batch.iter().map(|m| m.received_at).min() {
            // From receipt to commit: how far ingest runs behind the broker.
            let lag = (self.parts.clock.now() - oldest).as_seconds_f64().max(0.0);
            metrics::histogram!("occ_ingest_lag_seconds").record(lag);
        }
        tracing::debug!(
            messages = batch.len(),
            accepted = outcome.accepted(),
            duplicates = outcome.duplicates(),
            refused = outcome.refused(),
            dead_letters = decoded.dead_letters.len(),
            incidents_opened = outcome.incidents_opened,
            incidents_joined = outcome.incidents_joined,
            elapsed_ms = started.elapsed().as_millis(),
            "batch committed"
        );
        for i in &outcome.opened {
            tracing::info!(number = %i.number, queue = %i.queue, priority = %i.priority, title = %i.title, "incident opened");
        }
        true
    }

    /// Commits in `turn`, retrying with backoff until it succeeds, for as long as the failure
    /// is about the database (unreachable, a lost race, anything not caused by the data).
    /// `None` when shutdown came first, or the batch before this one was given up; `Some(Err)`
    /// when the data itself cannot be stored.
    async fn commit(
        &self,
        batch: Batch<'_>,
        shutdown: &CancellationToken,
        turn: &InTurn,
    ) -> Option<Result<BatchOutcome, StoreError>> {
        const MAX_BACKOFF: Duration = Duration::from_secs(10);
        let mut backoff = Duration::from_millis(100);
        loop {
            let rules = self.parts.rules.current();
            let attempt = commit_batch_in_turn(&self.parts.pool, batch, &rules, turn);
            // Abandoning an attempt is safe: whether or not it committed, the retry is
            // recognised by the idempotency keys.
            let result = tokio::time::timeout(self.parts.batch.commit_timeout, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Retry(format!(
                        "commit took longer than {:?}",
                        self.parts.batch.commit_timeout
                    )))
                });
            match result {
                Ok(outcome) => {
                    if !self.status.borrow().database_ok {
                        tracing::info!("database reachable again; ingest resumes");
                        self.status.send_modify(|s| s.database_ok = true);
                    }
                    return Some(Ok(outcome));
                }
                Err(e) if e.is_data_error() => return Some(Err(e)),
                Err(_) if turn.lost() => return None,
                Err(e) => {
                    if self.status.borrow().database_ok {
                        self.status.send_modify(|s| s.database_ok = false);
                    }
                    if e.is_unavailable() || matches!(e, StoreError::Retry(_)) {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot commit batch; ingest paused, nothing acknowledged");
                    } else {
                        tracing::error!(error = %e, retry_in = ?backoff, "cannot commit batch; ingest paused, nothing acknowledged");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => {
                            tracing::warn!("shutting down with an uncommitted batch; the broker will redeliver it");
                            return None;
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Acks committed messages, in arrival order: queued here, then handed to the event loop
    /// as its request channel has room. Never waits: the poll task may itself be waiting for
    /// the batcher to take messages from a full inbox, and rumqttc sends one request per poll
    /// while a broker flooding a backlog keeps it reading, so acks can fall behind for a
    /// while. What waits here is 16 bytes a message, not the message.
    fn ack(&self, batch: &[Inbound]) {
        {
            let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
            acks.extend(
                batch
                    .iter()
                    .filter(|m| m.publish.qos != QoS::AtMostOnce)
                    .map(|m| PendingAck {
                        packet_id: m.publish.pkid,
                        qos: m.publish.qos,
                        epoch: m.epoch,
                    }),
            );
        }
        self.stats
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.progress
            .committed
            .fetch_add(batch.len() as u64, Ordering::Release);
        self.send_acks();
    }

    fn acks_waiting(&self) -> bool {
        !self
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Hands waiting acks to the event loop, in order, until its channel is full. A message
    /// from an earlier connection is not acked: its packet id may since belong to another
    /// message; the broker redelivers it and the redelivery is recognised as a duplicate.
    fn send_acks(&self) {
        let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stale = 0;
        while let Some(a) = acks.front() {
            let mut publish = Publish::new("", a.qos, Vec::new(), None);
            publish.pkid = a.packet_id;
            match self.connection.ack(&self.client, &publish, a.epoch) {
                Acked::Queued => {}
                Acked::Stale => stale += 1,
                Acked::Refused => break,
            }
            acks.pop_front();
        }
        metrics::gauge!("occ_ingest_acks_waiting").set(acks.len() as f64);
        if stale > 0 {
            tracing::info!(
                stale,
                "messages from a previous connection left for redelivery"
            );
        }
    }
}

/// A batch's task, aborted when dropped unfinished: a batcher aborted with its slot leaves no
/// commit running behind it (the broker redelivers to whoever takes the slot).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An ack waiting to be handed to the event loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingAck {
    packet_id: u16,
    qos: QoS,
    epoch: u64,
}

/// How often waiting acks are offered to the event loop again.
const ACK_RETRY: Duration = Duration::from_millis(2);
