//! Dead letters: input that could not become an event, kept with the reason.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;
use crate::events::Transport;

/// A message that failed to decode or validate.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: Uuid,
    pub received_at: DateTime<Utc>,
    pub transport: Transport,
    /// The MQTT topic, or the gRPC method for events sent over gRPC.
    pub topic: String,
    /// The bytes received, cut to the payload limit for an oversize message.
    pub payload: Vec<u8>,
    /// The size received.
    pub payload_size: usize,
    /// SHA-256 of the whole payload: with the transport and topic, what makes a redelivery
    /// recognisable.
    pub payload_sha256: [u8; 32],
    pub reason: String,
}

impl DeadLetter {
    /// A dead letter for `payload`, keeping at most `keep` bytes of it.
    pub fn new(
        transport: Transport,
        topic: &str,
        payload: &[u8],
        keep: usize,
        reason: String,
        received_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            received_at,
            transport,
            topic: topic.to_owned(),
            payload: payload[..payload.len().min(keep)].to_vec(),
            payload_size: payload.len(),
            payload_sha256: Sha256::digest(payload).into(),
            reason,
        }
    }
}

/// Stores dead letters; one already stored (a redelivery of the same message) is skipped.
pub async fn insert(conn: &mut PgConnection, letters: &[DeadLetter]) -> Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    // Key order, so concurrent inserts of the same redeliveries cannot deadlock.
    let mut sorted: Vec<&DeadLetter> = letters.iter().collect();
    sorted.sort_by(|a, b| {
        (a.transport.as_str(), &a.topic, a.payload_sha256).cmp(&(
            b.transport.as_str(),
            &b.topic,
            b.payload_sha256,
        ))
    });
    let ids: Vec<Uuid> = sorted.iter().map(|d| d.id).collect();
    let received: Vec<DateTime<Utc>> = sorted.iter().map(|d| d.received_at).collect();
    let transports: Vec<&str> = sorted.iter().map(|d| d.transport.as_str()).collect();
    let topics: Vec<&str> = sorted.iter().map(|d| d.topic.as_str()).collect();
    let payloads: Vec<&[u8]> = sorted.iter().map(|d| d.payload.as_slice()).collect();
    let sizes: Vec<i32> = sorted
        .iter()
        .map(|d| i32::try_from(d.payload_size).unwrap_or(i32::MAX))
        .collect();
    let hashes: Vec<&[u8]> = sorted.iter().map(|d| d.payload_sha256.as_slice()).collect();
    let reasons: Vec<&str> = sorted.iter().map(|d| d.reason.as_str()).collect();
    sqlx::query!(
        r#"
        INSERT INTO dead_letters (id, received_at, transport, topic, payload, payload_size,
                                  payload_sha256, reason)
        SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::bytea[],
                             $6::int4[], $7::bytea[], $8::text[])
        ON CONFLICT (transport, topic, payload_sha256) DO NOTHING
        "#,
        &ids,
        &received,
        &transports as &[&str],
        &topics as &[&str],
        &payloads as &[&[u8]],
        &sizes,
        &hashes as &[&[u8]],
        &reasons as &[&str],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    pub id: Uuid,
    pub received_at: DateTime<Utc>,
    pub transport: String,
    pub topic: String,
    pub payload: Vec<u8>,
    pub payload_size: i32,
    pub reason: String,
}

/// The newest dead letters first.
pub async fn recent(conn: &mut PgConnection, limit: i64) -> Result<Vec<StoredDeadLetter>> {
    Ok(sqlx::query_as!(
        StoredDeadLetter,
        r#"
        SELECT id, received_at, transport, topic, payload, payload_size, reason
          FROM dead_letters
         ORDER BY received_at DESC, id DESC
         LIMIT $1
        "#,
        limit
    )
    .fetch_all(conn)
    .await?)
}
