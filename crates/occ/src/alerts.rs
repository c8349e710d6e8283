//! CAP alerts for the public-warning system: incidents of chosen categories announced on an
//! MQTT topic as they open, updated when what the public would be told changes, and closed
//! with an all clear or a cancel (see [`occ_domain::cap::next`] for what is news).
//!
//! One instance of the cluster publishes at a time: the one holding a PostgreSQL advisory
//! lock on a connection of its own (a session lock, taken once, not per transaction; it is
//! released when that instance or its connection dies, and another takes over within
//! [`TAKEOVER_POLL`]). The publisher follows the incident change log; when it takes over, and
//! after a failure, it looks at every alert still in force instead. A message is recorded as
//! published once the broker acknowledged it, so after a crash the same message (the same
//! identifier) may go out again, which a CAP receiver takes as the same message; a change is
//! never skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use occ_domain::cap::{CapSender, Message, Published};
use occ_domain::{Incident, IncidentId};
use occ_ingest::MqttConfig;
use occ_store::changes::Position;
use occ_store::registry::LiveRegistry;
use occ_store::{PgPool, cap_alerts, incidents};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often an instance that does not publish looks whether the publisher is gone.
const TAKEOVER_POLL: Duration = Duration::from_secs(5);
/// How often the change log is read.
const POLL: Duration = Duration::from_millis(500);
/// How long the broker has to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages published before their acknowledgements are awaited and recorded.
const BATCH: usize = 100;
/// The longest wait before trying again after the broker failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What to publish, where, and as whom.
#[derive(Debug, Clone)]
pub struct CapPublishing {
    /// OCC's incident categories announced (`fire`, `gas_leak`, …).
    pub categories: Vec<String>,
    /// Alerts go to `<topic>/<category>`.
    pub topic: String,
    pub sender: Arc<CapSender>,
    /// The broker, with OCC's credentials and TLS; the client id gets `-cap` appended.
    pub broker: MqttConfig,
}

/// Publishes until `shutdown`, whenever this instance holds the publisher's lock.
pub async fn run(
    publishing: CapPublishing,
    pool: PgPool,
    registry: LiveRegistry,
    shutdown: CancellationToken,
) {
    tracing::info!(
        categories = ?publishing.categories,
        topic = %publishing.topic,
        "CAP alerts are published for these categories by one instance at a time"
    );
    loop {
        match lead(&publishing, &pool, &registry, &shutdown).await {
            Ok(true) => tracing::info!("publishing CAP alerts: this instance took over"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "CAP publishing stopped; trying again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TAKEOVER_POLL) => {}
        }
    }
}

/// Takes the publisher's lock if free and publishes while it holds it. `Ok(false)`: another
/// instance publishes.
async fn lead(
    publishing: &CapPublishing,
    pool: &PgPool,
    registry: &LiveRegistry,
    shutdown: &CancellationToken,
) -> occ_store::Result<bool> {
    // A connection of its own: the session lock lives as long as it does.
    let mut conn = pool.connect_options().connect().await?;
    let leader = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock(hashtext('occ_cap_publisher')) AS "got!""#
    )
    .fetch_one(&mut conn)
    .await?;
    if !leader {
        return Ok(false);
    }
    tracing::info!("publishing CAP alerts: this instance holds the publisher's lock");
    let mut position = Position::now(&mut conn).await?;
    let mut broker: Option<Broker> = None;
    let mut look_at_all = true;
    let mut backoff = POLL;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(true),
            _ = tick.tick() => {}
        }
        // Read every time, so the position keeps up; when all alerts in force are looked at,
        // these changes are among them.
        let changed: Vec<Incident> = {
            let mut latest: HashMap<IncidentId, Incident> = HashMap::new();
            for change in position.read(&mut conn).await? {
                if publishing
                    .categories
                    .iter()
                    .any(|c| c == change.incident.category.as_str())
                {
                    latest.insert(change.incident.id, change.incident);
                }
            }
            latest.into_values().collect()
        };
        let incidents = if look_at_all {
            let ids = cap_alerts::in_force(&mut conn, &publishing.categories).await?;
            incidents::load(&mut conn, &ids).await?
        } else {
            changed
        };
        if incidents.is_empty() {
            look_at_all = false;
            continue;
        }
        let connection = broker.get_or_insert_with(|| Broker::connect(&publishing.broker));
        match publish(publishing, &mut conn, registry, connection, &incidents).await? {
            Ok(()) => {
                look_at_all = false;
                backoff = POLL;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "CAP alerts not published; trying again");
                metrics::counter!("occ_cap_publish_failures_total").increment(1);
                look_at_all = true;
                // A fresh connection next time: nothing of this one is left in flight.
                broker = None;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(true),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Publishes what is new about `incidents`, in batches, each recorded once acknowledged. The
/// outer error is the database's (leadership is given up), the inner one the broker's.
async fn publish(
    publishing: &CapPublishing,
    conn: &mut PgConnection,
    registry: &LiveRegistry,
    broker: &mut Broker,
    incidents: &[Incident],
) -> occ_store::Result<Result<(), String>> {
    let ids: Vec<IncidentId> = incidents.iter().map(|i| i.id).collect();
    let before = cap_alerts::published(conn, &ids).await?;
    let due: Vec<(&Incident, Message, Published)> = incidents
        .iter()
        .filter_map(|i| {
            occ_domain::cap::next(i, before.get(&i.id))
                .map(|(message, published)| (i, message, published))
        })
        .collect();
    let zones = registry.current();
    for batch in due.chunks(BATCH) {
        let messages: Vec<(String, String)> = batch
            .iter()
            .map(|(incident, message, _)| {
                let polygons = incident
                    .zone
                    .as_ref()
                    .and_then(|z| zones.zones().get(z).map(|area| area.outer_rings()))
                    .unwrap_or_default();
                (
                    format!("{}/{}", publishing.topic, incident.category),
                    occ_domain::cap::alert_as(incident, &polygons, &publishing.sender, message),
                )
            })
            .collect();
        if let Err(e) = broker.publish_all(&messages).await {
            return Ok(Err(e));
        }
        let record: Vec<(IncidentId, Message, Published)> = batch
            .iter()
            .map(|(i, m, p)| (i.id, m.clone(), p.clone()))
            .collect();
        cap_alerts::record(conn, chrono::Utc::now(), &record).await?;
        for (incident, message, _) in batch {
            metrics::counter!("occ_cap_alerts_published_total", "msg_type" => message.msg_type.as_str())
                .increment(1);
            tracing::info!(
                incident = %incident.number,
                identifier = %message.identifier,
                msg_type = message.msg_type.as_str(),
                "CAP alert published"
            );
        }
    }
    Ok(Ok(()))
}

/// What the connection's event loop reports to the publisher.
#[derive(Debug)]
enum Signal {
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged a packet id; with its refusal, if it refused.
    Acked(u16, Option<String>),
    /// The connection failed.
    Down(String),
}

/// A clean-session connection to the broker for publishing; dropped (and its loop stopped)
/// after any failure, so nothing of it is left in flight when the next one starts.
struct Broker {
    client: AsyncClient,
    signals: mpsc::Receiver<Signal>,
    poll: tokio::task::AbortHandle,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.poll.abort();
    }
}

impl Broker {
    fn connect(config: &MqttConfig) -> Broker {
        let mut o = MqttOptions::new(
            format!("{}-cap", config.client_id),
            config.host.clone(),
            config.port,
        );
        o.set_keep_alive(config.keep_alive)
            .set_clean_start(true)
            .set_connection_timeout(10);
        if let Some(user) = &config.username {
            o.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &config.tls {
            o.set_transport(tls.transport());
        }
        let (client, mut eventloop) = AsyncClient::new(o, BATCH);
        let (tx, signals) = mpsc::channel(4 * BATCH);
        let poll = tokio::spawn(async move {
            loop {
                let signal = match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Signal::Sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let refused = !matches!(
                            ack.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        );
                        Signal::Acked(ack.pkid, refused.then(|| format!("{:?}", ack.reason)))
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.try_send(Signal::Down(e.to_string()));
                        // The publisher drops this connection; until then, no spinning.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                // Only the publisher's own batches make these; a full channel means it gave
                // up on a batch and will drop this connection.
                let _ = tx.try_send(signal);
            }
        })
        .abort_handle();
        Broker {
            client,
            signals,
            poll,
        }
    }

    /// Publishes `messages` (topic, payload) at QoS 1 and waits until the broker acknowledged
    /// every one.
    async fn publish_all(&mut self, messages: &[(String, String)]) -> Result<(), String> {
        while self.signals.try_recv().is_ok() {}
        for (topic, payload) in messages {
            self.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut sent = 0usize;
        let mut waiting: HashSet<u16> = HashSet::new();
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        while sent < messages.len() || !waiting.is_empty() {
            let signal = tokio::time::timeout_at(deadline, self.signals.recv())
                .await
                .map_err(|_| {
                    format!(
                        "the broker did not acknowledge {} alerts within {ACK_TIMEOUT:?}",
                        messages.len() - sent + waiting.len()
                    )
                })?
                .ok_or("the MQTT connection's loop ended")?;
            match signal {
                Signal::Sent(pkid) => {
                    sent += 1;
                    waiting.insert(pkid);
                }
                Signal::Acked(pkid, refused) => {
                    if waiting.remove(&pkid)
                        && let Some(reason) = refused
                    {
                        return Err(format!("the broker refused an alert: {reason}"));
                    }
                }
                Signal::Down(e) => return Err(format!("the broker connection failed: {e}")),
            }
        }
        Ok(())
    }
}
