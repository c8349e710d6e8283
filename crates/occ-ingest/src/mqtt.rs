//! The MQTT side of ingest: one persistent MQTT 5 session (clean start off, session expiry
//! set, QoS 1, manual acks) subscribed through a shared subscription, so several OCC
//! instances split the stream between them.
//!
//! The event loop is polled by its own task, which only forwards messages; it never waits on
//! the database. Backpressure comes from the broker: OCC announces a receive maximum, acks only
//! after commit, and the broker stops sending when that many messages are unacknowledged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, watch};
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

/// Polls the event loop until `done`: forwards messages to the batcher, subscribes after every
/// connect, and reconnects with backoff after errors. Then disconnects cleanly, leaving the
/// session on the broker.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<String>,
    forward: mpsc::Sender<Inbound>,
    epoch: Arc<AtomicU64>,
    status: watch::Sender<IngestStatus>,
    window: usize,
    done: CancellationToken,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(250);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    // Messages received but not yet taken by the batcher. The event loop is never left
    // unpolled while the batcher is busy (it must keep sending acks and pings), so messages
    // wait here instead. The broker bounds this: it sends at most its in-flight window of
    // unacknowledged messages.
    let mut waiting: VecDeque<Inbound> = VecDeque::new();
    let mut warned_overflow = false;
    loop {
        let event = tokio::select! {
            () = done.cancelled() => break,
            permit = forward.reserve(), if !waiting.is_empty() => {
                match permit {
                    Ok(permit) => {
                        if let Some(m) = waiting.pop_front() {
                            permit.send(m);
                        }
                        continue;
                    }
                    Err(_) => break,
                }
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let inbound = Inbound {
                    publish,
                    epoch: epoch.load(Ordering::Acquire),
                    received_at: Utc::now(),
                };
                if waiting.is_empty() {
                    match forward.try_send(inbound) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(m)) => waiting.push_back(m),
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                } else {
                    waiting.push_back(inbound);
                }
                if !warned_overflow && waiting.len() > window {
                    warned_overflow = true;
                    tracing::warn!(
                        waiting = waiting.len(),
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
                    .filter(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    })
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
            Ok(_) => {}
            Err(e) => {
                epoch.fetch_add(1, Ordering::AcqRel);
                status.send_modify(|s| s.subscribed = false);
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection lost");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = done.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    status.send_modify(|s| s.subscribed = false);
    // A clean DISCONNECT: the session (and its subscription) stays on the broker for the
    // session expiry, so nothing published meanwhile is lost.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    tracing::info!("MQTT ingest disconnected");
}
