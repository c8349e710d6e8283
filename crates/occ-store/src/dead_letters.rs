//! Dead letters: input that could not become an event, kept with the reason.

use chrono::{DateTime, Utc};
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
            reason,
        }
    }
}

pub async fn insert(conn: &mut PgConnection, letters: &[DeadLetter]) -> Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = letters.iter().map(|d| d.id).collect();
    let received: Vec<DateTime<Utc>> = letters.iter().map(|d| d.received_at).collect();
    let transports: Vec<&str> = letters.iter().map(|d| d.transport.as_str()).collect();
    let topics: Vec<&str> = letters.iter().map(|d| d.topic.as_str()).collect();
    let payloads: Vec<&[u8]> = letters.iter().map(|d| d.payload.as_slice()).collect();
    let sizes: Vec<i32> = letters
        .iter()
        .map(|d| i32::try_from(d.payload_size).unwrap_or(i32::MAX))
        .collect();
    let reasons: Vec<&str> = letters.iter().map(|d| d.reason.as_str()).collect();
    sqlx::query!(
        r#"
        INSERT INTO dead_letters (id, received_at, transport, topic, payload, payload_size, reason)
        SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::bytea[],
                             $6::int4[], $7::text[])
        "#,
        &ids,
        &received,
        &transports as &[&str],
        &topics as &[&str],
        &payloads as &[&[u8]],
        &sizes,
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
