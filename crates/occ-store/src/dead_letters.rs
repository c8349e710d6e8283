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
            topic: storable(topic),
            payload: payload[..payload.len().min(keep)].to_vec(),
            payload_size: payload.len(),
            payload_sha256: Sha256::digest(payload).into(),
            reason: storable(&reason),
        }
    }
}

/// PostgreSQL's text holds no NUL: a topic, or a parser's message quoting a field name, that
/// has one keeps the rest, the NUL shown as U+FFFD.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
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
    pub replays: i32,
    pub last_replay_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub resolved_events: Option<i32>,
}

impl StoredDeadLetter {
    /// Whether the whole payload was kept (an oversize one is cut to the limit).
    pub fn complete(&self) -> bool {
        usize::try_from(self.payload_size).is_ok_and(|n| n == self.payload.len())
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only those not resolved by a replay.
    pub unresolved: bool,
    /// Only those whose topic starts with this (`frigate/`, `application/`).
    pub topic_prefix: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// The newest dead letters first, after `after` (received at, id).
pub async fn list(
    conn: &mut PgConnection,
    filter: &DeadLetterFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<StoredDeadLetter>> {
    Ok(sqlx::query_as!(
        StoredDeadLetter,
        r#"
        SELECT id, received_at, transport, topic, payload, payload_size, reason, replays,
               last_replay_at, resolved_at, resolved_by, resolved_events
          FROM dead_letters
         WHERE (NOT $1 OR resolved_at IS NULL)
           AND ($2::text IS NULL OR starts_with(topic, $2))
           AND ($3::timestamptz IS NULL OR received_at >= $3)
           AND ($4::timestamptz IS NULL OR received_at < $4)
           AND ($5::timestamptz IS NULL OR (received_at, id) < ($5, $6::uuid))
         ORDER BY received_at DESC, id DESC
         LIMIT $7
        "#,
        filter.unresolved,
        filter.topic_prefix,
        filter.since,
        filter.until,
        after.map(|a| a.0),
        after.map(|a| a.1),
        limit
    )
    .fetch_all(conn)
    .await?)
}

/// The newest dead letters first.
pub async fn recent(conn: &mut PgConnection, limit: i64) -> Result<Vec<StoredDeadLetter>> {
    list(conn, &DeadLetterFilter::default(), None, limit).await
}

/// Dead letters by id (missing ones left out).
pub async fn get_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<StoredDeadLetter>> {
    Ok(sqlx::query_as!(
        StoredDeadLetter,
        r#"
        SELECT id, received_at, transport, topic, payload, payload_size, reason, replays,
               last_replay_at, resolved_at, resolved_by, resolved_events
          FROM dead_letters
         WHERE id = ANY($1)
         ORDER BY received_at, id
        "#,
        ids
    )
    .fetch_all(conn)
    .await?)
}

/// Marks a dead letter resolved by a replay that stored `events` events (in the replay's
/// transaction), with an audit entry.
pub(crate) async fn resolve(
    conn: &mut PgConnection,
    id: Uuid,
    actor: &str,
    events: usize,
    now: DateTime<Utc>,
) -> Result<()> {
    let events = i32::try_from(events).unwrap_or(i32::MAX);
    let resolved = sqlx::query!(
        r#"
        UPDATE dead_letters
           SET resolved_at = $2, resolved_by = $3, resolved_events = $4,
               replays = replays + 1, last_replay_at = $2
         WHERE id = $1 AND resolved_at IS NULL
        "#,
        id,
        now,
        actor,
        events
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if resolved == 0 {
        // Another replay resolved it first; its events were recognised as duplicates.
        return Ok(());
    }
    crate::audit::append(
        conn,
        &[crate::audit::AuditEntry {
            entity: crate::audit::Entity::DeadLetter(id),
            at: now,
            actor: actor.to_owned(),
            action: "dead_letter.replayed".into(),
            before: None,
            after: Some(serde_json::json!({ "events": events })),
            detail: format!("decoded again: {events} events stored"),
        }],
    )
    .await
}

/// Records a replay that still fails, with the reason it gives now.
pub async fn record_failed_replay(conn: &mut PgConnection, id: Uuid, reason: &str) -> Result<()> {
    let now = crate::dispatch::now(conn).await?;
    sqlx::query!(
        r#"
        UPDATE dead_letters
           SET replays = replays + 1, last_replay_at = $2, reason = $3
         WHERE id = $1 AND resolved_at IS NULL
        "#,
        id,
        now,
        reason
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The oldest unresolved dead letters (of one topic prefix), for a replay.
pub async fn oldest_unresolved(
    conn: &mut PgConnection,
    topic_prefix: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredDeadLetter>> {
    Ok(sqlx::query_as!(
        StoredDeadLetter,
        r#"
        SELECT id, received_at, transport, topic, payload, payload_size, reason, replays,
               last_replay_at, resolved_at, resolved_by, resolved_events
          FROM dead_letters
         WHERE resolved_at IS NULL AND ($1::text IS NULL OR starts_with(topic, $1))
         ORDER BY received_at, id
         LIMIT $2
        "#,
        topic_prefix,
        limit
    )
    .fetch_all(conn)
    .await?)
}

/// What a replay did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// It decodes now: this many events stored (0 when it carries nothing that matters).
    Resolved {
        events: usize,
    },
    AlreadyResolved,
    /// It still fails, for this reason (now recorded as its reason).
    StillFailing(String),
    /// It cannot be decoded again, for this reason.
    NotReplayable(String),
}

/// Decodes dead letters again with `decode` (the adapters and registry in force) and stores
/// what now decodes, each in one transaction with its resolution, in the order given.
pub async fn replay<D>(
    pool: &sqlx::PgPool,
    letters: &[StoredDeadLetter],
    decode: D,
    rules: &occ_domain::RuleSet,
    actor: &str,
) -> Result<Vec<(Uuid, ReplayOutcome)>>
where
    D: Fn(&StoredDeadLetter) -> std::result::Result<Vec<occ_domain::Enriched>, String>,
{
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let outcome = if letter.resolved_at.is_some() {
            ReplayOutcome::AlreadyResolved
        } else if letter.transport != Transport::Mqtt.as_str() {
            ReplayOutcome::NotReplayable(
                "a gRPC call: its caller was answered INVALID_ARGUMENT and sends it again".into(),
            )
        } else if !letter.complete() {
            ReplayOutcome::NotReplayable(format!(
                "only the first {} of its {} bytes were kept",
                letter.payload.len(),
                letter.payload_size
            ))
        } else {
            match decode(letter) {
                Err(reason) => {
                    let mut conn = pool.acquire().await?;
                    record_failed_replay(&mut conn, letter.id, &reason).await?;
                    ReplayOutcome::StillFailing(reason)
                }
                Ok(events) => {
                    let batch = crate::ingest::Batch {
                        replay_of: Some(crate::ingest::Replay {
                            dead_letter: letter.id,
                            actor,
                        }),
                        ..crate::ingest::Batch::new(&events, Transport::Mqtt, &[])
                    };
                    match crate::ingest::commit_batch(pool, batch, rules).await {
                        Ok(o) => ReplayOutcome::Resolved {
                            events: o.accepted(),
                        },
                        Err(e) if e.is_data_error() => {
                            let reason = format!("could not be stored: {e}");
                            let mut conn = pool.acquire().await?;
                            record_failed_replay(&mut conn, letter.id, &reason).await?;
                            ReplayOutcome::StillFailing(reason)
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        out.push((letter.id, outcome));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parser's message quoting a field named with a NUL (`{"\u0000": 1}`) must still be
    /// storable: PostgreSQL's text refuses NUL, and a dead letter that cannot be stored would
    /// hold its message unacknowledged.
    #[test]
    fn a_dead_letter_holds_no_nul() {
        let letter = DeadLetter::new(
            Transport::Mqtt,
            "occ/v1/events/a\0b",
            b"{\"\\u0000\":1}",
            1024,
            "unknown field `\0`".into(),
            Utc::now(),
        );
        assert!(!letter.topic.contains('\0') && !letter.reason.contains('\0'));
        assert_eq!(letter.reason, "unknown field `\u{FFFD}`");
    }
}
