//! The MQTT side of ingest: one persistent MQTT 5 session per slot (clean start off, session
//! expiry set, QoS 1, manual acks), subscribed plainly or, when several slots split the
//! stream, through a shared subscription.
//!
//! The event loop is polled by its own task, which only hands messages over; it never waits
//! on the database. Backpressure: OCC announces a receive maximum and acks only after commit,
//! so a broker that keeps to it stops sending when that many messages are unacknowledged. One
//! that does not (Mosquitto 2.0 on a resumed session sends the whole backlog) meets OCC's own
//! bound: the inbox holds at most a receive maximum of messages, and while it is full the poll
//! task stops reading, so the rest waits in the socket and in the broker's session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use occ_store::PgPool;

use crate::{IngestStats, IngestStatus};

/// How OCC connects to the broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The slot's client id, read by one instance at a time: the broker keeps the session
    /// (and the messages queued while nobody reads it) under this id.
    pub client_id: String,
    /// The shared subscription group; instances with the same group split the messages.
    /// Empty subscribes without sharing (every instance gets every message).
    pub share_group: String,
    pub keep_alive: Duration,
    /// How long the broker keeps the session, and queues messages, while OCC is disconnected.
    pub session_expiry: Duration,
    /// How many unacknowledged messages the broker may send at once; bounds a batch.
    pub receive_maximum: u16,
    /// The largest packet OCC accepts, announced to the broker so it never sends a bigger one.
    /// Above the payload limit, so oversize payloads arrive and are dead-lettered.
    pub max_packet_size: u32,
    /// TLS to the broker (none: plaintext).
    pub tls: Option<MqttTls>,
}

/// TLS settings for the broker connection: whom to trust, and the client certificate if the
/// broker identifies OCC by one.
#[derive(Clone)]
pub struct MqttTls(Arc<tokio_rustls::rustls::ClientConfig>);

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MqttTls")
    }
}

impl MqttTls {
    /// Trusts the CAs in `ca` (PEM; the system's roots when none), and presents `client`
    /// (certificate chain and key, PEM) if given.
    pub fn new(
        ca: Option<&std::path::Path>,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<MqttTls, String> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
        let mut roots = RootCertStore::empty();
        match ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("no CA certificate in {}", ca.display()));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(
                        "no CA certificates on this system: name one with --mqtt-tls-ca".into(),
                    );
                }
            }
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the MQTT client certificate: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(MqttTls(Arc::new(config)))
    }

    /// The transport for rumqttc.
    pub fn transport(&self) -> rumqttc::Transport {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(self.0.clone()))
    }
}

/// A message received, with the connection it came on.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub publish: Publish,
    /// The broker's session it came in: packet ids are numbered within it.
    pub session: Arc<str>,
    /// The connection the message arrived on. Packet ids belong to a connection's session
    /// state: a message from an earlier connection is not acked (the broker redelivers it).
    pub epoch: u64,
    pub received_at: DateTime<Utc>,
}

pub(crate) fn options(config: &MqttConfig) -> MqttOptions {
    let mut o = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    o.set_keep_alive(config.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ))
        .set_receive_maximum(Some(config.receive_maximum))
        .set_max_packet_size(Some(config.max_packet_size))
        .set_manual_acks(true)
        .set_connection_timeout(10);
    if let (Some(user), Some(pass)) = (&config.username, &config.password) {
        o.set_credentials(user.clone(), pass.clone());
    } else if let Some(user) = &config.username {
        o.set_credentials(user.clone(), String::new());
    }
    if let Some(tls) = &config.tls {
        o.set_transport(tls.transport());
    }
    o
}

/// The subscription for an adapter's filter: `$share/{group}/{filter}`.
pub(crate) fn subscription(share_group: &str, filter: &str) -> String {
    if share_group.is_empty() {
        filter.to_owned()
    } else {
        format!("$share/{share_group}/{filter}")
    }
}

/// The broker's session OCC's messages come in, named `<client id>~<when it began>`.
///
/// A broker that lost OCC's session (expired, or restarted without it) starts a new one under
/// the same client id and numbers packet ids from 1 again; the name tells the two apart, so a
/// redelivery in the new session is never taken for a message of the old one. When it began
/// is kept in PostgreSQL, for the restarts of OCC that resume the session.
#[derive(Debug)]
pub(crate) struct Session {
    client_id: String,
    name: Arc<str>,
    pool: PgPool,
    clock: occ_domain::SharedClock,
    /// OCC has seen this session begin (recorded in PostgreSQL, by this or another instance).
    known: bool,
}

impl Session {
    pub(crate) fn new(client_id: String, pool: PgPool, clock: occ_domain::SharedClock) -> Self {
        Self {
            name: client_id.as_str().into(),
            client_id,
            pool,
            clock,
            known: false,
        }
    }

    pub(crate) fn name(&self) -> Arc<str> {
        self.name.clone()
    }

    fn named(&mut self, began: DateTime<Utc>) {
        self.name = format!("{}~{}", self.client_id, began.timestamp_millis()).into();
    }

    /// Reads when the session began, waiting for PostgreSQL if need be. False when OCC stops
    /// first.
    async fn load(&mut self, stopping: &CancellationToken) -> bool {
        let mut backoff = Duration::from_millis(250);
        loop {
            match occ_store::sessions::started(&self.pool, &self.client_id).await {
                Ok(Some(began)) => {
                    self.named(began);
                    self.known = true;
                    return true;
                }
                // Never seen begin: the broker's ConnAck will say it is new.
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot read OCC's MQTT session; waiting for the database");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopping.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// The broker began a new session: named now, recorded in the background (the poll task
    /// does not wait on the database).
    fn began(&mut self) {
        let began = self.clock.now();
        self.known = true;
        self.named(began);
        let pool = self.pool.clone();
        let client_id = self.client_id.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            for _ in 0..10 {
                match occ_store::sessions::record_start(&pool, &client_id, began).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot record OCC's new MQTT session");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            tracing::error!(
                "OCC's new MQTT session is not recorded: after a restart, messages redelivered \
                 from it may be stored twice if they carry no producer id"
            );
        });
    }
}

/// Which connection to the broker is current, and the one way acks reach it.
///
/// A packet id belongs to one connection's session state: an ack for a message of an earlier
/// connection could acknowledge another, uncommitted message on the new one. So an ack is
/// queued only while its message's connection is current, under this lock; and when a
/// connection is lost the poll task moves to the next epoch under the same lock, then drops
/// every ack still queued. An ack is either queued before the change (and dropped with the
/// old connection: the broker redelivers its message, recognised as a duplicate) or refused
/// after it.
#[derive(Debug, Default)]
pub(crate) struct Connection {
    epoch: Mutex<u64>,
}

/// What became of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acked {
    Queued,
    /// The message came on an earlier connection; the broker redelivers it.
    Stale,
    /// The request channel is full (or the event loop is gone): try again once the poll task
    /// has drained it, unless it has ended.
    Refused,
}

impl Connection {
    fn lock(&self) -> MutexGuard<'_, u64> {
        self.epoch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn current(&self) -> u64 {
        *self.lock()
    }

    /// Queues the ack for a message received on connection `epoch`, if that is still the
    /// current one. Never waits.
    pub(crate) fn ack(&self, client: &AsyncClient, publish: &Publish, epoch: u64) -> Acked {
        let current = self.lock();
        if *current != epoch {
            return Acked::Stale;
        }
        match client.try_ack(publish) {
            Ok(()) => Acked::Queued,
            Err(_) => Acked::Refused,
        }
    }

    /// After the event loop lost its connection: later acks of earlier messages are refused,
    /// and those already queued are dropped (`EventLoop::clean` keeps every other request for
    /// the next connection). So are messages of the lost connection that rumqttc read but has
    /// not handed out yet: handed out after the reconnect they would pass for the new
    /// connection's, and their packet ids may name other messages there. Not acked, they are
    /// redelivered.
    pub(crate) fn lost(&self, eventloop: &mut EventLoop) {
        let mut current = self.lock();
        *current += 1;
        eventloop.clean();
        eventloop
            .state
            .events
            .retain(|e| !matches!(e, Event::Incoming(Packet::Publish(_))));
    }
}

/// Messages handed from the poll task to the batcher, at most `capacity` of them.
///
/// The poll task must not wait on the database: while it is stuck, the event loop sends no
/// acks and no pings. So it only appends here, and the batcher takes from here. When the
/// inbox is full (the broker sent more than the receive maximum OCC announced, or the batcher
/// is held by the database) the poll task waits for room; the broker keeps what it has not
/// sent, and a connection dropped meanwhile for missed pings only means redelivery.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Inbound>>,
    capacity: usize,
    ready: Notify,
    room: Notify,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn push(&self, m: Inbound) -> usize {
        let len = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.push_back(m);
            q.len()
        };
        self.ready.notify_one();
        len
    }

    fn len(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Waits until the inbox has room for another message.
    async fn room(&self) {
        loop {
            let notified = self.room.notified();
            if self.len() < self.capacity {
                return;
            }
            notified.await;
        }
    }

    fn try_pop(&self) -> Option<Inbound> {
        let m = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        if m.is_some() {
            self.room.notify_one();
        }
        m
    }

    /// The next message, waiting for one. Cancel-safe: a message is removed only when
    /// returned.
    pub(crate) async fn pop(&self) -> Inbound {
        loop {
            let notified = self.ready.notified();
            if let Some(m) = self.try_pop() {
                return m;
            }
            notified.await;
        }
    }
}

/// Polls the event loop: hands messages to the batcher, subscribes after every connect (and
/// again, with backoff, when the broker refuses), and reconnects with backoff after errors,
/// until the batcher has finished and queued its DISCONNECT (after its last acks). `poll()` is
/// never cancelled mid-way, so no ack it has taken from the request channel is lost;
/// `stopping` only ends the waits between attempts.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<String>,
    inbox: Arc<Inbox>,
    connection: Arc<Connection>,
    status: watch::Sender<IngestStatus>,
    stats: Arc<IngestStats>,
    mut session: Session,
    mut stale: Vec<String>,
    progress: Arc<crate::pipeline::Progress>,
    clock: occ_domain::SharedClock,
    stopping: CancellationToken,
) {
    if !session.load(&stopping).await {
        return;
    }
    const MIN_BACKOFF: Duration = Duration::from_millis(250);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = MIN_BACKOFF;
    let mut resubscribe = Resubscribe::default();
    let mut unsubscribing = 0usize;
    let mut warned_overflow = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                progress.received.fetch_add(1, Ordering::AcqRel);
                let waiting = inbox.push(Inbound {
                    publish,
                    session: session.name(),
                    epoch: connection.current(),
                    received_at: clock.now(),
                });
                stats
                    .inbox_peak
                    .fetch_max(waiting as u64, Ordering::Relaxed);
                metrics::gauge!("occ_ingest_inbox_messages").set(waiting as f64);
                if waiting >= inbox.capacity && !stopping.is_cancelled() {
                    if !warned_overflow && waiting > inbox.capacity {
                        warned_overflow = true;
                        tracing::warn!(
                            waiting,
                            receive_maximum = inbox.capacity,
                            "the broker sends more unacknowledged messages than OCC's receive \
                             maximum; OCC reads no more until its inbox has room"
                        );
                    }
                    tokio::select! {
                        () = inbox.room() => {}
                        () = stopping.cancelled() => {}
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = MIN_BACKOFF;
                if !ack.session_present {
                    if session.known {
                        // OCC had this session (this instance or another, before a restart or
                        // a takeover): what was queued in it is gone.
                        metrics::counter!("occ_mqtt_sessions_lost_total").increment(1);
                        tracing::warn!(
                            client_id = %session.client_id,
                            "the broker did not keep OCC's session: messages published while \
                             OCC was disconnected may be lost (session expired, or the broker \
                             restarted without persistence)"
                        );
                    }
                    session.began();
                }
                tracing::info!(
                    client_id = %session.client_id,
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                // A retry planned on an earlier connection is moot: this one subscribes now.
                resubscribe.reset();
                if subscriptions.is_empty() {
                    // A retiring slot: nothing to subscribe to, only earlier filters to drop.
                    unsubscribing = unsubscribe(&client, &stale);
                    if unsubscribing == 0 {
                        reading(&status, &session.client_id, true);
                    }
                } else {
                    subscribe(&client, &subscriptions);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<String> = subscriptions
                    .iter()
                    .zip(&ack.return_codes)
                    .filter(|(_, code)| {
                        !matches!(code, SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    })
                    .map(|(s, code)| format!("{s}: {code:?}"))
                    .collect();
                if refused.is_empty() && ack.return_codes.len() == subscriptions.len() {
                    tracing::info!(client_id = %session.client_id, subscriptions = ?subscriptions, "subscribed");
                    resubscribe.reset();
                    // Filters the session holds from an earlier configuration would bring
                    // messages twice (a plain subscription beside the shared one) or to a
                    // group no longer read: dropped, once the new ones are in place.
                    unsubscribing = unsubscribe(&client, &stale);
                    if unsubscribing == 0 {
                        reading(&status, &session.client_id, true);
                    }
                } else {
                    // Granted at any QoS but 1 is refused too: at 0 the broker would drop what
                    // OCC has not acknowledged, and OCC's acks are QoS 1's. Until every filter
                    // is granted, health says NOT_SERVING.
                    reading(&status, &session.client_id, false);
                    let retry_in = resubscribe.schedule(&client, &subscriptions, &stopping);
                    tracing::error!(
                        refused = ?refused,
                        ?retry_in,
                        "the broker refused OCC's subscription; events on these topics do not \
                         reach OCC until it is granted"
                    );
                }
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) if unsubscribing > 0 => {
                unsubscribing -= 1;
                if unsubscribing == 0 {
                    tracing::info!(client_id = %session.client_id, unsubscribed = ?stale, "earlier subscriptions dropped");
                    stale.clear();
                    reading(&status, &session.client_id, true);
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                if d.reason_code == DisconnectReasonCode::SessionTakenOver {
                    // Two instances under one client id take the session from each other in
                    // turn, and each one's messages land in the other's half of the time.
                    tracing::error!(
                        client_id = %session.client_id,
                        "another client connected with this client id and took its session: \
                         only OCC's own instances may use OCC's client ids, and two OCC \
                         deployments on one broker need different --mqtt-client-id"
                    );
                } else {
                    tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                unsubscribing = 0;
                connection.lost(&mut eventloop);
                reading(&status, &session.client_id, false);
                metrics::counter!("occ_mqtt_connection_losses_total").increment(1);
                if stopping.is_cancelled() {
                    break;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection lost");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopping.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    reading(&status, &session.client_id, false);
    // The session (and its subscription) stays on the broker for the session expiry, so
    // nothing published meanwhile is lost.
    tracing::info!("MQTT ingest disconnected");
}

/// Whether the slot's session is subscribed as it should be: for health, and for the metrics.
fn reading(status: &watch::Sender<IngestStatus>, client_id: &str, subscribed: bool) {
    status.send_modify(|s| s.subscribed = subscribed);
    metrics::gauge!("occ_ingest_subscribed", "client_id" => client_id.to_owned())
        .set(if subscribed { 1.0 } else { 0.0 });
}

/// Ends the session under `config.client_id` on the broker: connects with clean start and
/// no session expiry, which discards the session and what it holds, then disconnects. Only
/// for a session drained and without subscriptions (a retiring slot).
pub(crate) async fn end_session(config: &MqttConfig) -> Result<(), String> {
    let mut options = options(config);
    options
        .set_clean_start(true)
        .set_session_expiry_interval(None)
        .set_manual_acks(false);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let ended = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.disconnect().await.map_err(|e| e.to_string())?;
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .map_err(|_| "no answer from the broker within 10 s".to_owned())?
}

/// Queues a SUBSCRIBE for every filter. Never waits: only the poll task drains the request
/// channel, and it may be the caller. Subscribing again to a subscription the session has
/// does not make the broker send retained messages again (a retained status would otherwise
/// come back as a new report on every reconnect).
fn subscribe(client: &AsyncClient, subscriptions: &[String]) {
    let filters = subscriptions.iter().map(|s| {
        let mut f = Filter::new(s.clone(), QoS::AtLeastOnce);
        f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
        f
    });
    if let Err(e) = client.try_subscribe_many(filters) {
        tracing::error!(error = %e, "cannot queue the subscription request");
    }
}

/// Queues an UNSUBSCRIBE for each of `filters`; returns how many. Never waits.
fn unsubscribe(client: &AsyncClient, filters: &[String]) -> usize {
    filters
        .iter()
        .filter(|f| match client.try_unsubscribe(f.as_str()) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, filter = %f, "cannot queue the unsubscribe request");
                false
            }
        })
        .count()
}

/// Subscribing again after a refusal: one attempt planned at a time, with backoff.
#[derive(Debug)]
struct Resubscribe {
    backoff: Duration,
    /// The attempt planned last; an earlier one finds it changed and does nothing.
    planned: Arc<AtomicU64>,
}

impl Default for Resubscribe {
    fn default() -> Self {
        Self {
            backoff: Duration::from_secs(1),
            planned: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Resubscribe {
    /// Drops the attempt planned, if any, and starts the backoff again.
    fn reset(&mut self) {
        self.planned.fetch_add(1, Ordering::AcqRel);
        self.backoff = Duration::from_secs(1);
    }

    /// Plans the next attempt, in place of any planned before; returns its delay.
    fn schedule(
        &mut self,
        client: &AsyncClient,
        subscriptions: &[String],
        stopping: &CancellationToken,
    ) -> Duration {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        let attempt = self.planned.fetch_add(1, Ordering::AcqRel) + 1;
        let planned = self.planned.clone();
        let client = client.clone();
        let subscriptions = subscriptions.to_vec();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {
                    if planned.load(Ordering::Acquire) == attempt {
                        subscribe(&client, &subscriptions);
                    }
                }
                () = stopping.cancelled() => {}
            }
        });
        delay
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::Request;

    use super::*;

    fn received(pkid: u16) -> Publish {
        let mut p = Publish::new("occ/v1/events/det-1", QoS::AtLeastOnce, "{}", None);
        p.pkid = pkid;
        p
    }

    fn queued_acks(eventloop: &EventLoop) -> Vec<u16> {
        eventloop
            .pending
            .iter()
            .filter_map(|r| match r {
                Request::PubAck(a) => Some(a.pkid),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_ack_never_reaches_a_later_connection() {
        let config = MqttConfig {
            host: "127.0.0.1".into(),
            port: 1,
            username: None,
            password: None,
            client_id: "occ-test".into(),
            share_group: String::new(),
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(60),
            receive_maximum: 10,
            max_packet_size: 1024,
            tls: None,
        };
        let (client, mut eventloop) = AsyncClient::new(options(&config), 16);
        let connection = Connection::default();
        let first = connection.current();
        // Committed on the first connection, acked just before it is lost: the ack is still
        // in the request channel when the event loop notices.
        assert_eq!(connection.ack(&client, &received(7), first), Acked::Queued);
        client
            .try_subscribe("occ/v1/events/+", QoS::AtLeastOnce)
            .unwrap();
        // A message read from the socket with others just before it failed, not handed out.
        eventloop
            .state
            .events
            .push_back(Event::Incoming(Packet::Publish(received(9))));
        connection.lost(&mut eventloop);
        assert!(
            eventloop.state.events.is_empty(),
            "a message of the lost connection is not handed out after the reconnect"
        );
        // Packet id 7 may belong to another message on the next connection: the queued ack is
        // gone (neither kept for the next connection nor left in the channel, which has room
        // for all of its 16 requests again), the subscription is kept for the next connection.
        assert!(queued_acks(&eventloop).is_empty());
        let room = (0..32)
            .take_while(|_| client.try_subscribe("t", QoS::AtLeastOnce).is_ok())
            .count();
        assert_eq!(room, 16, "requests left in the channel");
        assert!(
            eventloop
                .pending
                .iter()
                .any(|r| matches!(r, Request::Subscribe(_)))
        );
        // A later ack for a message of the lost connection is refused.
        assert_eq!(connection.ack(&client, &received(8), first), Acked::Stale);
        // Messages of the new connection are acked (once the channel has room).
        eventloop.clean();
        assert_eq!(
            connection.ack(&client, &received(8), connection.current()),
            Acked::Queued
        );
    }

    #[tokio::test]
    async fn the_inbox_holds_at_most_its_capacity() {
        let inbox = Arc::new(Inbox::new(2));
        for pkid in 1..=2 {
            inbox.push(Inbound {
                publish: received(pkid),
                session: "occ-test".into(),
                epoch: 0,
                received_at: Utc::now(),
            });
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), inbox.room()).await;
        assert!(waiting.is_err(), "a full inbox has no room");
        let reader = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.room().await })
        };
        assert_eq!(inbox.pop().await.publish.pkid, 1);
        tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("room after a message is taken")
            .unwrap();
    }
}
