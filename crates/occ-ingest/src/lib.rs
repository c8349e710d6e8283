//! OCC's MQTT ingest: subscribes to producers' topics, decodes each message with the adapter
//! for its format, and commits the resulting events (and the incidents they open) in batches,
//! acknowledging messages only after their batch has committed.
//!
//! ```text
//! broker ──► poll task ──(bounded inbox)──► batcher ──► one transaction per batch ──► acks
//! ```
//!
//! Nothing is acked that is not committed, so a crash at any point means redelivery, never
//! loss; redelivered messages are recognised by their events' idempotency keys. An instance
//! runs this under each ingest slot it holds (see `slots`), so several instances share the
//! stream and take over each other's sessions.
#![forbid(unsafe_code)]

mod mqtt;
mod pipeline;
mod slots;

use std::sync::Arc;

use occ_adapters::Adapters;
use occ_domain::Limits;
use occ_store::PgPool;
use occ_store::health::ActivityLog;
use occ_store::registry::LiveRegistry;
use occ_store::rules::LiveRules;
use rumqttc::v5::AsyncClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use mqtt::{MqttConfig, MqttTls};
pub use pipeline::{BatchConfig, IngestStats};
pub use slots::{SlotConfig, Slots, slot_client_ids};

/// What every ingest connection of an instance shares: how it batches, decodes and commits.
#[derive(Debug, Clone)]
pub struct IngestParts {
    pub batch: BatchConfig,
    pub limits: Limits,
    pub adapters: Arc<Adapters>,
    pub pool: PgPool,
    pub rules: LiveRules,
    pub registry: LiveRegistry,
    pub activity: ActivityLog,
    /// What ingest reads the time of receipt from (see [`occ_domain::clock`]).
    pub clock: occ_domain::SharedClock,
    /// How fast each source may send, shared by the instance's connections: what a flooding
    /// source sends beyond it becomes dead letters, so other sources' events go on.
    pub source_rates: Arc<std::sync::Mutex<occ_domain::rate::SourceRates>>,
}

/// Whether ingest is taking messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestStatus {
    /// Connected to the broker with the subscription acknowledged.
    pub subscribed: bool,
    /// The last commit succeeded (false while PostgreSQL is unreachable).
    pub database_ok: bool,
}

impl IngestStatus {
    pub fn ready(&self) -> bool {
        self.subscribed && self.database_ok
    }
}

/// Running ingest.
#[derive(Debug)]
pub struct Ingest {
    status: watch::Receiver<IngestStatus>,
    progress: Arc<pipeline::Progress>,
    poller: JoinHandle<()>,
    batcher: JoinHandle<()>,
}

impl Ingest {
    /// Connects and starts ingesting until `shutdown` is cancelled. Then the batch in hand is
    /// committed and acked, and the connection closed with the session kept on the broker.
    /// `subscriptions` are the filters to read (none for a retiring slot); `stale` those the
    /// session may hold from an earlier configuration, unsubscribed once the others are
    /// granted.
    pub fn start(
        mqtt: MqttConfig,
        parts: &IngestParts,
        stats: Arc<IngestStats>,
        subscriptions: Vec<String>,
        stale: Vec<String>,
        shutdown: CancellationToken,
    ) -> Ingest {
        let mut parts = parts.clone();
        // The slot's batches commit on connections of their own (see `occ_store::pool_like`).
        parts.pool = occ_store::pool_like(&parts.pool);
        let window = usize::from(mqtt.receive_maximum).max(1);
        // Requests are acks, subscriptions and the final disconnect. Acks beyond this wait in
        // the batcher (see `Batcher::ack`), so the channel never has to hold a backlog's.
        let (client, eventloop) = AsyncClient::new(mqtt::options(&mqtt), 2 * window + 16);
        let stale: Vec<String> = stale
            .into_iter()
            .filter(|f| !subscriptions.contains(f))
            .collect();
        let inbox = Arc::new(mqtt::Inbox::new(window));
        let connection = Arc::new(mqtt::Connection::default());
        let poll_ended = CancellationToken::new();
        let (status_tx, status_rx) = watch::channel(IngestStatus {
            subscribed: false,
            database_ok: true,
        });
        let batcher_done = CancellationToken::new();

        let session = mqtt::Session::new(
            mqtt.client_id.clone(),
            parts.pool.clone(),
            parts.clock.clone(),
        );
        let clock = parts.clock.clone();
        let progress = Arc::new(pipeline::Progress::default());
        let batcher = pipeline::Batcher {
            parts,
            progress: progress.clone(),
            client: client.clone(),
            connection: connection.clone(),
            acks: std::sync::Mutex::new(std::collections::VecDeque::new()),
            poll_ended: poll_ended.clone(),
            status: status_tx.clone(),
            stats: stats.clone(),
        };
        let done = batcher_done.clone();
        let batcher_inbox = inbox.clone();
        let batcher = tokio::spawn(async move {
            Arc::new(batcher).run(batcher_inbox, shutdown).await;
            done.cancel();
        });
        let poll_stats = stats;
        let poll_progress = progress.clone();
        let poller = tokio::spawn(async move {
            mqtt::poll(
                eventloop,
                client,
                subscriptions,
                inbox,
                connection,
                status_tx,
                poll_stats,
                session,
                stale,
                poll_progress,
                clock,
                batcher_done,
            )
            .await;
            poll_ended.cancel();
        });
        Ingest {
            status: status_rx,
            progress,
            poller,
            batcher,
        }
    }

    /// Follows whether ingest is taking messages.
    pub fn status(&self) -> watch::Receiver<IngestStatus> {
        self.status.clone()
    }

    /// Messages received, and of them committed, on this ingest's connections.
    pub fn progress(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        // Committed first: a message is received before it is committed.
        let committed = self.progress.committed.load(Ordering::Acquire);
        (self.progress.received.load(Ordering::Acquire), committed)
    }

    /// The filters ingest under `mqtt` subscribes to.
    pub fn subscriptions(mqtt: &MqttConfig, adapters: &Adapters) -> Vec<String> {
        adapters
            .topic_filters()
            .iter()
            .map(|f| mqtt::subscription(&mqtt.share_group, f))
            .collect()
    }

    /// Waits at most `grace` for ingest to stop after shutdown, then stops it at once. True
    /// if it stopped by itself (the batch in hand committed and acknowledged).
    pub async fn finish(mut self, grace: std::time::Duration) -> bool {
        let joined = tokio::time::timeout(grace, async {
            let _ = (&mut self.batcher).await;
            let _ = (&mut self.poller).await;
        })
        .await
        .is_ok();
        if !joined {
            self.abort();
        }
        joined
    }

    /// Stops at once: the connection is dropped with whatever was not acknowledged, which
    /// the broker redelivers (a commit in flight is recognised then as a duplicate).
    pub fn abort(&self) {
        self.batcher.abort();
        self.poller.abort();
    }
}
