//! Format adapters: each turns one message (topic and payload) into events, or into the reason
//! it cannot, without I/O. Adding a producer format means adding one adapter.

use chrono::{DateTime, Utc};
use occ_domain::{Event, Limits};

/// Why a message could not become events. It goes to the dead letters with this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A producer format.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// A short name for logs: `native`, `frigate`, `chirpstack`.
    fn name(&self) -> &'static str;

    /// The MQTT topic filter its producers publish on (`occ/v1/events/+`).
    fn topic_filter(&self) -> &str;

    /// The events in one message. A message may carry several events, or none that matter
    /// (`Ok(vec![])`); anything malformed is a `Rejection`.
    fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection>;
}

/// Picks the adapter for a topic.
#[derive(Debug, Default)]
pub struct Adapters(Vec<Box<dyn Adapter>>);

impl Adapters {
    pub fn new(adapters: Vec<Box<dyn Adapter>>) -> Self {
        Self(adapters)
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Adapter> {
        self.0.iter().map(AsRef::as_ref)
    }

    /// Decodes a message with the adapter whose filter matches its topic. Payloads over the
    /// size limit are rejected before any adapter looks at them.
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection> {
        if payload.len() > limits.max_payload_bytes {
            return Err(Rejection(format!(
                "payload is {} bytes, over the limit of {} bytes",
                payload.len(),
                limits.max_payload_bytes
            )));
        }
        let adapter = self
            .0
            .iter()
            .find(|a| rumqttc::matches(topic, a.topic_filter()))
            .ok_or_else(|| Rejection(format!("no adapter handles topic {topic:?}")))?;
        adapter.decode(topic, payload, received_at, limits)
    }
}
