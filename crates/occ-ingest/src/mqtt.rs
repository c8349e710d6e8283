//! The MQTT side of ingest: one persistent MQTT 5 session (clean start off, session expiry
//! set, QoS 1, manual acks) subscribed through a shared subscription, so several OCC
//! instances split the stream between them.
//!
//! The event loop is polled by its own task, which only hands messages over; it never waits
//! on the database. Backpressure comes from the broker: OCC announces a receive maximum, acks only
//! after commit, and the broker stops sending when that many messages are unacknowledged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::IngestStatus;

/// How OCC connects to the broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Must be unique per OCC instance and stable across its restarts: the broker keeps the
    /// session (and the messages queued while OCC is down) under this id.
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
}

/// A message received, with the connection it came on.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub publish: Publish,
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

/// Messages handed from the poll task to the batcher.
///
/// The poll task must never wait: while it is stuck, the event loop sends no acks and no
/// pings. So it only appends here, and the batcher takes from here. What waits here is bounded
/// by the broker, which sends at most its window of unacknowledged messages (Mosquitto 2.0
/// was seen exceeding the client's receive maximum after a session resumes, so the length is
/// watched, not assumed).
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Inbound>>,
    ready: Notify,
}

impl Inbox {
    fn push(&self, m: Inbound) -> usize {
        let len = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.push_back(m);
            q.len()
        };
        self.ready.notify_one();
        len
    }

    fn try_pop(&self) -> Option<Inbound> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
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

/// Polls the event loop: hands messages to the batcher, subscribes after every connect, and
/// reconnects with backoff after errors, until the batcher has finished and queued its
/// DISCONNECT (after its last acks). `poll()` is never cancelled mid-way, so no ack it has
/// taken from the request channel is lost; `stopping` only ends the waits between attempts.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<String>,
    inbox: Arc<Inbox>,
    epoch: Arc<AtomicU64>,
    status: watch::Sender<IngestStatus>,
    window: usize,
    stopping: CancellationToken,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(250);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    let mut warned_overflow = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let waiting = inbox.push(Inbound {
                    publish,
                    epoch: epoch.load(Ordering::Acquire),
                    received_at: Utc::now(),
                });
                if !warned_overflow && waiting > window {
                    warned_overflow = true;
                    tracing::warn!(
                        waiting,
                        window,
                        "the broker sends more unacknowledged messages than OCC's receive maximum"
                    );
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = MIN_BACKOFF;
                if connected_before && !ack.session_present {
                    tracing::warn!(
                        "the broker did not keep OCC's session: messages published while OCC \
                         was disconnected may be lost (session expired or broker restarted \
                         without persistence)"
                    );
                }
                connected_before = true;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                let filters = subscriptions
                    .iter()
                    .map(|s| Filter::new(s.clone(), QoS::AtLeastOnce));
                // Never wait on the request channel from the polling task: only this task
                // drains it.
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot queue the subscription request");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let failed: Vec<_> = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .collect();
                if failed.is_empty() {
                    tracing::info!(subscriptions = ?subscriptions, "subscribed");
                    status.send_modify(|s| s.subscribed = true);
                } else {
                    tracing::error!(codes = ?failed, subscriptions = ?subscriptions, "the broker refused the subscription");
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                epoch.fetch_add(1, Ordering::AcqRel);
                status.send_modify(|s| s.subscribed = false);
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
    status.send_modify(|s| s.subscribed = false);
    // The session (and its subscription) stays on the broker for the session expiry, so
    // nothing published meanwhile is lost.
    tracing::info!("MQTT ingest disconnected");
}
