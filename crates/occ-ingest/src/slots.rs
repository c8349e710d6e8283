//! Ingest slots: how several OCC instances share the broker's stream without stranding any of
//! it.
//!
//! The broker keeps a session, and queues messages for it, under a client id. A session nobody
//! resumes holds its messages until it expires (Mosquitto goes on handing an offline member of
//! a shared subscription its share), so OCC never names a session after something that goes
//! away, like a hostname. It reads under a fixed set of client ids, the slots (`occ`, `occ-2`,
//! … `occ-N`), and each live instance holds some of them under a lease in PostgreSQL:
//!
//! - every instance renews its leases each second (`lease / 8` if shorter) and takes free slots up to its fair
//!   share (`⌈slots / live instances⌉`), giving one up when it holds more, so a new instance
//!   gets its share and the slots spread evenly;
//! - an instance that stops gives its slots up at once (after committing the batch in hand);
//!   one that dies leaves them until their lease runs out; either way another instance takes
//!   them over and resumes their sessions, with everything queued there;
//! - an instance that cannot renew its leases for half a lease stops reading under them, well
//!   before another instance may take them, so two instances never read one session.
//! - slots no longer configured (the number was lowered) are retiring: an instance takes one,
//!   unsubscribes its session, stores what was queued there, and when nothing more comes ends
//!   the session on the broker and deletes the slot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use occ_store::PgPool;
use occ_store::slots::{self, Renewed, Taken};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Ingest, IngestParts, IngestStats, IngestStatus, MqttConfig};

/// How an instance takes part in sharing the slots.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// The slots' client ids, from [`slot_client_ids`].
    pub client_ids: Vec<String>,
    /// How long a slot stays with an instance that stopped renewing it.
    pub lease: Duration,
    /// How the instance appears in the slot table (host and process id).
    pub instance_name: String,
    /// How long a slot given up waits for its batch in hand to commit.
    pub grace: Duration,
}

/// The client ids of `n` slots: `base`, then `base-2` … `base-n`, so a single instance keeps
/// the client id it always had, and growing the set only adds ids.
pub fn slot_client_ids(base: &str, n: u16) -> Vec<String> {
    (1..=n.max(1))
        .map(|k| {
            if k == 1 {
                base.to_owned()
            } else {
                format!("{base}-{k}")
            }
        })
        .collect()
}

/// Ingest under the slots this instance holds.
#[derive(Debug)]
pub struct Slots {
    status: watch::Receiver<IngestStatus>,
    stats: Arc<IngestStats>,
    task: JoinHandle<()>,
}

impl Slots {
    /// Starts taking part in the slots until `shutdown`: then the slots held are stopped (each
    /// batch in hand committed and acknowledged) and given up. `leases` is a pool of its own,
    /// so neither the API's load nor ingest's can keep a lease from being renewed.
    pub fn start(
        mqtt: MqttConfig,
        config: SlotConfig,
        parts: IngestParts,
        leases: PgPool,
        shutdown: CancellationToken,
    ) -> Slots {
        let (status_tx, status) = watch::channel(IngestStatus {
            subscribed: false,
            database_ok: true,
        });
        let stats = Arc::new(IngestStats::default());
        let me = Uuid::now_v7();
        tracing::info!(instance = %me, name = %config.instance_name, slots = ?config.client_ids, "taking part in ingest slots");
        let manager = Manager {
            me,
            mqtt,
            config,
            parts,
            pool: leases,
            stats: stats.clone(),
            held: BTreeMap::new(),
            statuses: Arc::new(Statuses {
                status: status_tx,
                state: Mutex::new(State::default()),
            }),
        };
        let task = tokio::spawn(manager.run(shutdown));
        Slots {
            status,
            stats,
            task,
        }
    }

    /// Follows whether ingest is taking messages: every slot held is subscribed (an instance
    /// holding none, while others hold them all, is ready too) and commits succeed.
    pub fn status(&self) -> watch::Receiver<IngestStatus> {
        self.status.clone()
    }

    /// Counts of what ingest has committed, over all slots.
    pub fn stats(&self) -> Arc<IngestStats> {
        self.stats.clone()
    }

    /// Waits until every slot has stopped and been given up, after shutdown.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// The status of each slot held, merged into the instance's.
#[derive(Debug)]
struct Statuses {
    status: watch::Sender<IngestStatus>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A round of taking slots has succeeded since the instance started, or since it last
    /// stopped reading because its leases could not be renewed.
    settled: bool,
    /// Each slot held: which taking of it (a slot given up and taken again is another), and
    /// its status.
    slots: BTreeMap<String, (u64, IngestStatus)>,
    takings: u64,
}

impl Statuses {
    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut state);
        let merged = IngestStatus {
            subscribed: state.settled && state.slots.values().all(|(_, s)| s.subscribed),
            database_ok: state.slots.values().all(|(_, s)| s.database_ok),
        };
        drop(state);
        self.status.send_if_modified(|s| {
            let changed = *s != merged;
            *s = merged;
            changed
        });
    }

    /// Counts a slot just taken, with its first status; returns which taking it is.
    fn taken(&self, client_id: &str, status: IngestStatus) -> u64 {
        let mut taking = 0;
        self.update(|s| {
            s.takings += 1;
            taking = s.takings;
            s.slots.insert(client_id.to_owned(), (taking, status));
        });
        taking
    }

    /// A newer status of a slot, unless that taking of it has ended: a `follow` task aborted
    /// while it was running may still get here, and must not bring back a slot given up.
    fn changed(&self, client_id: &str, taking: u64, status: IngestStatus) {
        self.update(|s| {
            if let Some(slot) = s.slots.get_mut(client_id).filter(|(t, _)| *t == taking) {
                slot.1 = status;
            }
        });
    }
}

/// A slot this instance reads under.
#[derive(Debug)]
struct Held {
    ingest: Ingest,
    stop: CancellationToken,
    follow: JoinHandle<()>,
    /// Being drained and ended rather than read.
    retiring: bool,
    /// For a retiring slot: messages received when last seen, and since when.
    quiet: Option<(u64, Instant)>,
}

struct Manager {
    me: Uuid,
    mqtt: MqttConfig,
    config: SlotConfig,
    parts: IngestParts,
    pool: PgPool,
    stats: Arc<IngestStats>,
    held: BTreeMap<String, Held>,
    statuses: Arc<Statuses>,
}

impl Manager {
    async fn run(mut self, shutdown: CancellationToken) {
        let lease = self.config.lease;
        // Renewals are cheap; frequent ones mean a freed slot is taken within a second.
        let tick = (lease / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut ensured = false;
        // When the last successful renewal was sent: leases are good until then + lease.
        let mut confirmed: Option<Instant> = None;
        let mut failing = false;
        loop {
            let sent = Instant::now();
            let renewed = tokio::time::timeout(lease / 4, async {
                if !ensured {
                    slots::configure(&self.pool, &self.config.client_ids).await?;
                    ensured = true;
                }
                slots::renew(
                    &self.pool,
                    self.me,
                    &self.config.instance_name,
                    lease,
                    &self.config.client_ids,
                )
                .await
            })
            .await;
            match renewed {
                Ok(Ok(renewed)) => {
                    if failing {
                        tracing::info!("ingest slot leases renewed again");
                        failing = false;
                    }
                    confirmed = Some(sent);
                    self.round(renewed).await;
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot renew ingest slot leases");
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!(timeout = ?lease / 4, "renewing ingest slot leases timed out");
                }
                _ => {}
            }
            if !self.held.is_empty() && confirmed.is_none_or(|c| c.elapsed() > lease / 2) {
                // Another instance may take these slots once their lease has run out; this
                // one must be gone from their sessions by then.
                tracing::error!(
                    slots = ?self.held.keys().collect::<Vec<_>>(),
                    "ingest slot leases not renewed for half a lease: no longer reading under \
                     them, so that another instance can take them over"
                );
                for id in self.held.keys().cloned().collect::<Vec<_>>() {
                    self.drop_slot(&id);
                }
                // Reading nothing now: not ready until a round has taken slots again.
                self.statuses.update(|s| s.settled = false);
            }
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = shutdown.cancelled() => break,
            }
        }
        let ids: Vec<String> = self.held.keys().cloned().collect();
        for h in self.held.values() {
            h.stop.cancel();
        }
        for id in ids {
            self.give_up(&id, false).await;
        }
        match tokio::time::timeout(Duration::from_secs(2), slots::leave(&self.pool, self.me)).await
        {
            Ok(Ok(())) => tracing::info!("ingest slots given up"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, ?lease, "cannot give ingest slots up; others take them when their lease runs out")
            }
            Err(_) => tracing::warn!(
                ?lease,
                "giving ingest slots up timed out; others take them when their lease runs out"
            ),
        }
    }

    /// After a renewal: stops slots taken by others, takes free ones up to a fair share, or
    /// gives one up beyond it; drains and ends retiring slots.
    async fn round(&mut self, renewed: Renewed) {
        let still: BTreeSet<&str> = renewed.held.iter().map(String::as_str).collect();
        let lost: Vec<String> = self
            .held
            .keys()
            .filter(|id| !still.contains(id.as_str()))
            .cloned()
            .collect();
        for id in lost {
            tracing::warn!(client_id = %id, "another instance took this ingest slot over; no longer reading under it");
            self.drop_slot(&id);
        }
        // Slots read here that became retiring (another instance started with fewer slots).
        for id in &renewed.held_retiring {
            if self.held.get(id).is_some_and(|h| !h.retiring) {
                tracing::info!(client_id = %id, "this ingest slot is retiring: draining its session");
                self.give_up(id, false).await;
                let wanted = self.wanted(id);
                self.start_slot(
                    Taken {
                        client_id: id.clone(),
                        subscriptions: wanted,
                    },
                    true,
                );
            }
        }
        self.retire_drained().await;

        let reading = self.held.values().filter(|h| !h.retiring).count();
        let live = usize::try_from(renewed.live_instances.max(1)).unwrap_or(1);
        let share = self.config.client_ids.len().div_ceil(live);
        // Until the slots this instance should read are taken, it is not ready: a take that
        // failed leaves the first round unsettled, so health does not say SERVING while no
        // session reads.
        let mut took = true;
        if reading < share {
            let free: Vec<String> = self
                .config
                .client_ids
                .iter()
                .filter(|id| !self.held.contains_key(*id))
                .cloned()
                .collect();
            took = self.take(&free, share - reading, false).await;
        } else if reading > share
            && let Some(id) = self
                .held
                .iter()
                .rev()
                .find(|(_, h)| !h.retiring)
                .map(|(id, _)| id.clone())
        {
            tracing::info!(client_id = %id, live_instances = live, "giving an ingest slot up to share the slots evenly");
            self.give_up(&id, true).await;
        }
        // One retiring slot at a time per instance.
        if !renewed.free_retiring.is_empty() && !self.held.values().any(|h| h.retiring) {
            // A retiring slot not taken now is tried again next round; readiness is about the
            // slots read.
            let _ = self.take(&renewed.free_retiring, 1, true).await;
        }
        if took {
            self.statuses.update(|s| s.settled = true);
        }
        metrics::gauge!("occ_ingest_slots_held").set(self.held.len() as f64);
    }

    /// Takes up to `n` of `among`; false when the database could not be asked.
    async fn take(&mut self, among: &[String], n: usize, retiring: bool) -> bool {
        match slots::take(
            &self.pool,
            self.me,
            &self.config.instance_name,
            among,
            n,
            self.config.lease,
            retiring,
        )
        .await
        {
            Ok(taken) => {
                for t in taken {
                    self.start_slot(t, retiring);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take ingest slots");
                false
            }
        }
    }

    fn mqtt(&self, client_id: &str) -> MqttConfig {
        MqttConfig {
            client_id: client_id.to_owned(),
            ..self.mqtt.clone()
        }
    }

    /// What this instance subscribes to under `client_id`.
    fn wanted(&self, client_id: &str) -> Vec<String> {
        Ingest::subscriptions(&self.mqtt(client_id), &self.parts.adapters)
    }

    /// A retiring slot is drained when its subscriptions are gone, everything it received is
    /// committed, and nothing more came for `DRAINED_AFTER`: then its session is ended on the
    /// broker and the slot deleted.
    async fn retire_drained(&mut self) {
        const DRAINED_AFTER: Duration = Duration::from_secs(3);
        let mut drained = Vec::new();
        for (id, h) in self.held.iter_mut().filter(|(_, h)| h.retiring) {
            let (received, committed) = h.ingest.progress();
            let unsubscribed = h.ingest.status().borrow().subscribed;
            match h.quiet {
                Some((seen, since)) if seen == received => {
                    if unsubscribed && received == committed && since.elapsed() >= DRAINED_AFTER {
                        drained.push((id.clone(), received));
                    }
                }
                _ => h.quiet = Some((received, Instant::now())),
            }
        }
        for (id, messages) in drained {
            self.give_up(&id, false).await;
            if let Err(e) = crate::mqtt::end_session(&self.mqtt(&id)).await {
                tracing::warn!(client_id = %id, error = %e, "cannot end the retiring slot's session; trying again");
                continue;
            }
            match slots::retired(&self.pool, self.me, &id).await {
                Ok(true) => {
                    tracing::info!(client_id = %id, messages, "ingest slot retired: its session drained and ended")
                }
                Ok(false) => {
                    tracing::warn!(client_id = %id, "the retiring slot was no longer held by this instance")
                }
                Err(e) => {
                    tracing::warn!(client_id = %id, error = %e, "cannot delete the retired slot; it is drained again")
                }
            }
        }
    }

    fn start_slot(&mut self, taken: Taken, retiring: bool) {
        let Taken {
            client_id,
            subscriptions: recorded,
        } = taken;
        tracing::info!(client_id = %client_id, retiring, "took ingest slot");
        let mqtt = self.mqtt(&client_id);
        let wanted = if retiring {
            Vec::new()
        } else {
            self.wanted(&client_id)
        };
        let stop = CancellationToken::new();
        let ingest = Ingest::start(
            mqtt,
            &self.parts,
            self.stats.clone(),
            wanted.clone(),
            recorded.clone(),
            stop.clone(),
        );
        let mut status = ingest.status();
        // Counted from the moment it is taken, not from when `follow` first runs: until then
        // the instance would look ready with a slot that has not subscribed yet, and whatever
        // is published meanwhile would reach no session.
        let taking = self.statuses.taken(&client_id, *status.borrow());
        let statuses = self.statuses.clone();
        let pool = self.pool.clone();
        let id = client_id.clone();
        let follow = tokio::spawn(async move {
            let same = |a: &[String], b: &[String]| {
                a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
            };
            let mut recorded = same(&recorded, &wanted);
            loop {
                let now = *status.borrow_and_update();
                statuses.changed(&id, taking, now);
                // Subscribed, with earlier filters dropped: what the session holds now.
                if now.subscribed && !recorded {
                    match slots::subscribed(&pool, &id, &wanted).await {
                        Ok(()) => recorded = true,
                        Err(e) => {
                            tracing::warn!(error = %e, client_id = %id, "cannot record the slot's subscriptions")
                        }
                    }
                }
                if status.changed().await.is_err() {
                    break;
                }
            }
        });
        self.held.insert(
            client_id,
            Held {
                ingest,
                stop,
                follow,
                retiring,
                quiet: None,
            },
        );
    }

    /// Stops reading under a slot at once (no longer ours, or not renewed).
    fn drop_slot(&mut self, id: &str) {
        if let Some(h) = self.held.remove(id) {
            h.ingest.abort();
            h.follow.abort();
            self.statuses.update(|s| {
                s.slots.remove(id);
            });
        }
    }

    /// Stops a slot gracefully (its batch in hand committed and acknowledged, its session
    /// left on the broker) and, when `release`, frees it for another instance at once.
    async fn give_up(&mut self, id: &str, release: bool) {
        let Some(h) = self.held.remove(id) else {
            return;
        };
        h.stop.cancel();
        if !h.ingest.finish(self.config.grace).await {
            tracing::warn!(client_id = %id, grace = ?self.config.grace, "ingest slot did not stop in time; unacknowledged messages will be redelivered");
        }
        h.follow.abort();
        self.statuses.update(|s| {
            s.slots.remove(id);
        });
        if release && let Err(e) = slots::release(&self.pool, self.me, id).await {
            tracing::warn!(error = %e, client_id = %id, "cannot give the ingest slot up; another instance takes it when its lease runs out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manager whose broker and database nobody answers at: what it decides alone.
    fn unreachable_manager() -> Manager {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let pool = occ_store::db::pool(&occ_store::db::DbConfig {
            url: format!("postgres://postgres@127.0.0.1:{closed}/occ"),
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: None,
            lock_timeout: None,
        })
        .expect("a lazy pool");
        let (status, _) = watch::channel(IngestStatus {
            subscribed: false,
            database_ok: true,
        });
        Manager {
            me: Uuid::now_v7(),
            mqtt: MqttConfig {
                host: "127.0.0.1".into(),
                port: closed,
                username: None,
                password: None,
                client_id: "occ".into(),
                share_group: String::new(),
                keep_alive: Duration::from_secs(30),
                session_expiry: Duration::from_secs(3600),
                receive_maximum: 100,
                max_packet_size: 1 << 20,
                tls: None,
            },
            config: SlotConfig {
                client_ids: vec!["occ".into()],
                lease: Duration::from_secs(8),
                instance_name: "test".into(),
                grace: Duration::from_secs(1),
            },
            parts: IngestParts {
                batch: crate::BatchConfig {
                    size: 100,
                    deadline: Duration::from_millis(50),
                    in_flight: 1,
                    commit_timeout: Duration::from_secs(5),
                },
                limits: occ_domain::Limits::default(),
                adapters: Arc::default(),
                pool: pool.clone(),
                rules: occ_store::live::Live::fixed(Default::default()),
                registry: occ_store::live::Live::fixed(Default::default()),
                activity: Default::default(),
                clock: occ_domain::SystemClock::shared(),
                source_rates: Arc::new(Mutex::new(occ_domain::rate::SourceRates::new(0.0, 0.0))),
            },
            pool,
            stats: Arc::default(),
            held: BTreeMap::new(),
            statuses: Arc::new(Statuses {
                status,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The bench's drain once stalled on this: `occ serve` answered SERVING between taking its
    /// slot and that slot's first status, was stopped as ready, and had never subscribed, so
    /// the backlog published next reached no session.
    #[tokio::test]
    async fn a_slot_taken_keeps_the_instance_not_ready_until_it_has_subscribed() {
        let mut manager = unreachable_manager();
        manager.start_slot(
            Taken {
                client_id: "occ".into(),
                subscriptions: Vec::new(),
            },
            false,
        );
        // The end of the first round, before any other task has run.
        manager.statuses.update(|s| s.settled = true);
        assert!(
            !manager.statuses.status.borrow().subscribed,
            "ready with a slot whose session has not subscribed"
        );
        manager.drop_slot("occ");
        // Holding no slot while another instance holds them all is ready.
        assert!(manager.statuses.status.borrow().subscribed);
    }

    #[tokio::test]
    async fn a_round_that_could_not_take_its_slots_leaves_the_instance_not_ready() {
        let mut manager = unreachable_manager();
        // Renewed, then PostgreSQL went away before the free slot could be taken.
        manager
            .round(Renewed {
                held: Vec::new(),
                held_retiring: Vec::new(),
                free_retiring: Vec::new(),
                live_instances: 1,
            })
            .await;
        assert!(manager.held.is_empty());
        assert!(
            !manager.statuses.status.borrow().subscribed,
            "ready while the slot nobody holds is read by no session"
        );
    }

    #[test]
    fn a_status_from_a_taking_that_has_ended_changes_nothing() {
        let (status, ready) = watch::channel(IngestStatus {
            subscribed: false,
            database_ok: true,
        });
        let statuses = Statuses {
            status,
            state: Mutex::new(State {
                settled: true,
                ..State::default()
            }),
        };
        let (waiting, reading) = (
            IngestStatus {
                subscribed: false,
                database_ok: true,
            },
            IngestStatus {
                subscribed: true,
                database_ok: true,
            },
        );
        let first = statuses.taken("occ", waiting);
        statuses.update(|s| {
            s.slots.remove("occ");
        });
        // The first taking's `follow`, aborted while running, reports late.
        statuses.changed("occ", first, waiting);
        assert!(ready.borrow().subscribed, "a slot given up came back");
        let second = statuses.taken("occ", waiting);
        statuses.changed("occ", second, reading);
        statuses.changed("occ", first, waiting);
        assert!(
            ready.borrow().subscribed,
            "an ended taking's status replaced the current one's"
        );
    }

    #[test]
    fn one_slot_keeps_the_client_id_and_more_only_add_ids() {
        assert_eq!(slot_client_ids("occ", 1), ["occ"]);
        assert_eq!(slot_client_ids("occ", 3), ["occ", "occ-2", "occ-3"]);
        assert_eq!(slot_client_ids("occ", 0), ["occ"]);
    }
}
