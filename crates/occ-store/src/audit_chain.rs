//! The audit log's chains, checked from outside the database, and their anchors.
//!
//! PostgreSQL links every entry as it is written (`occ_audit_link`, one chain per entity):
//! `hash = SHA-256(previous hash ‖ canonical text of the entry)`. [`verify`] recomputes every
//! chain here, in Rust, from the stored fields, and compares: an edited entry no longer matches
//! its hash, a deleted one leaves a gap in the positions, reordered ones break the links, and
//! removed newest entries disagree with the chain's head and with the anchors. [`anchor`]
//! hashes the heads that moved since the last anchor into a chain of anchors, whose hashes are
//! also logged, so a copy of them lives outside the database.

use std::fmt;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{Result, StoreError};

/// One entity's chain: `incident/0193…`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChainId {
    pub entity_type: String,
    pub entity_id: Uuid,
}

impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.entity_type, self.entity_id)
    }
}

/// The first place where the record was changed after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// An entry's fields no longer give its hash (edited), or its link to the previous entry
    /// is broken (reordered, or an earlier entry altered and rehashed).
    Altered {
        chain: ChainId,
        position: i64,
        audit_id: i64,
    },
    /// Positions jump: entries were deleted (or moved).
    Missing {
        chain: ChainId,
        expected: i64,
        found: i64,
    },
    /// The chain ends before its head says it does: its newest entries were deleted.
    Truncated {
        chain: ChainId,
        head: i64,
        last: i64,
    },
    /// A chain with entries has no head, or a head has no entries.
    Headless { chain: ChainId },
    /// The chain's newest entry is not the one its head recorded (rewritten with new hashes).
    HeadDisagrees { chain: ChainId, position: i64 },
    /// An anchor's hash does not follow from its content and the previous anchor.
    AnchorAltered { anchor: i64 },
    /// An anchor vouches for an entry that is not there any more as it was.
    AnchorDisagrees {
        anchor: i64,
        chain: ChainId,
        position: i64,
    },
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::Altered {
                chain,
                position,
                audit_id,
            } => write!(
                f,
                "{chain}: entry {position} (audit id {audit_id}) was altered: its content or order does not give its hash"
            ),
            Break::Missing {
                chain,
                expected,
                found,
            } => write!(
                f,
                "{chain}: entry {expected} is missing (the next one is {found}): entries were deleted"
            ),
            Break::Truncated { chain, head, last } => write!(
                f,
                "{chain}: the chain ends at entry {last} but had {head}: its newest entries were deleted"
            ),
            Break::Headless { chain } => {
                write!(f, "{chain}: the chain and its head disagree")
            }
            Break::HeadDisagrees { chain, position } => write!(
                f,
                "{chain}: entry {position} is not the one written last: the chain was rewritten"
            ),
            Break::AnchorAltered { anchor } => {
                write!(
                    f,
                    "anchor {anchor} was altered or an anchor before it removed"
                )
            }
            Break::AnchorDisagrees {
                anchor,
                chain,
                position,
            } => write!(
                f,
                "{chain}: entry {position}, vouched for by anchor {anchor}, is not as it was anchored"
            ),
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub chains: u64,
    pub entries: u64,
    pub anchors: u64,
    /// The first break found, if any.
    pub broken: Option<Break>,
    /// The newest anchor that covers what was verified (its id, time and hash).
    pub anchor: Option<(i64, DateTime<Utc>, String)>,
}

/// The hash of an entry, as `occ_audit_digest` computes it in the database.
#[allow(clippy::too_many_arguments)]
pub fn digest(
    prev: Option<&[u8]>,
    position: i64,
    entity_type: &str,
    entity_id: Uuid,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    before: &str,
    after: &str,
    detail: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    if let Some(prev) = prev {
        h.update(prev);
    }
    let at = at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let position = position.to_string();
    let entity_id = entity_id.to_string();
    let fields = [
        position.as_str(),
        entity_type,
        entity_id.as_str(),
        at.as_str(),
        actor,
        action,
        before,
        after,
        detail,
    ];
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            h.update([0x1f]);
        }
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

/// Verifies every chain (or one entity's), their heads and the anchors.
pub async fn verify(pool: &PgPool, only: Option<&ChainId>) -> Result<Report> {
    let mut report = Report {
        chains: 0,
        entries: 0,
        anchors: 0,
        broken: None,
        anchor: None,
    };
    let (only_type, only_id) = (
        only.map(|c| c.entity_type.clone()),
        only.map(|c| c.entity_id),
    );
    let mut conn = pool.acquire().await?;
    // One snapshot for entries, heads and anchors: a write in between cannot look like a break.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    {
        let mut rows = sqlx::query!(
            r#"
            SELECT a.id, a.entity_type, a.entity_id, a.chain_position, a.hash, a.at, a.actor,
                   a.action, coalesce(a.before::text, '') AS "before!",
                   coalesce(a.after::text, '') AS "after!", a.detail
              FROM audit_log a
             WHERE ($1::text IS NULL OR (a.entity_type = $1 AND a.entity_id = $2))
             ORDER BY a.entity_type, a.entity_id, a.chain_position
            "#,
            only_type,
            only_id
        )
        .fetch(&mut *tx);
        let mut chain: Option<ChainId> = None;
        let mut prev: Option<Vec<u8>> = None;
        let mut position = 0i64;
        while let Some(r) = rows.try_next().await? {
            report.entries += 1;
            if report.broken.is_some() {
                continue;
            }
            let id = ChainId {
                entity_type: r.entity_type,
                entity_id: r.entity_id,
            };
            if chain.as_ref() != Some(&id) {
                report.chains += 1;
                chain = Some(id.clone());
                prev = None;
                position = 0;
            }
            position += 1;
            if r.chain_position != position {
                report.broken = Some(Break::Missing {
                    chain: id,
                    expected: position,
                    found: r.chain_position,
                });
                continue;
            }
            let expected = digest(
                prev.as_deref(),
                position,
                &id.entity_type,
                id.entity_id,
                r.at,
                &r.actor,
                &r.action,
                &r.before,
                &r.after,
                &r.detail,
            );
            if expected[..] != r.hash[..] {
                report.broken = Some(Break::Altered {
                    chain: id,
                    position,
                    audit_id: r.id,
                });
                continue;
            }
            prev = Some(r.hash);
        }
    }
    if report.broken.is_none() {
        report.broken = check_heads(&mut tx, only_type.as_deref(), only_id).await?;
    }
    if report.broken.is_none() {
        let (anchors, broken, newest) = check_anchors(&mut tx, only).await?;
        report.anchors = anchors;
        report.broken = broken;
        report.anchor = newest;
    }
    tx.commit().await?;
    Ok(report)
}

/// Every chain ends where its head says.
async fn check_heads(
    conn: &mut PgConnection,
    only_type: Option<&str>,
    only_id: Option<Uuid>,
) -> Result<Option<Break>> {
    let row = sqlx::query!(
        r#"
        SELECT coalesce(h.entity_type, t.entity_type) AS "entity_type!",
               coalesce(h.entity_id, t.entity_id) AS "entity_id!",
               h.chain_position AS "head?", h.hash AS "head_hash?",
               t.last AS "last?", a.hash AS "last_hash?"
          FROM audit_heads h
          FULL JOIN (SELECT entity_type, entity_id, max(chain_position) AS last
                       FROM audit_log GROUP BY entity_type, entity_id) t
            ON t.entity_type = h.entity_type AND t.entity_id = h.entity_id
          LEFT JOIN audit_log a
            ON a.entity_type = t.entity_type AND a.entity_id = t.entity_id
           AND a.chain_position = t.last
         WHERE ($1::text IS NULL OR (coalesce(h.entity_type, t.entity_type) = $1
                                     AND coalesce(h.entity_id, t.entity_id) = $2))
           AND (h.chain_position IS DISTINCT FROM t.last OR h.hash IS DISTINCT FROM a.hash)
         ORDER BY 1, 2
         LIMIT 1
        "#,
        only_type,
        only_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| {
        let chain = ChainId {
            entity_type: r.entity_type,
            entity_id: r.entity_id,
        };
        match (r.head, r.last) {
            (Some(head), Some(last)) if last < head => Break::Truncated { chain, head, last },
            (Some(head), Some(_)) => Break::HeadDisagrees {
                chain,
                position: head,
            },
            _ => Break::Headless { chain },
        }
    }))
}

/// One anchored head: `[entity_type, entity_id, chain_position, hash as hex]`.
type AnchoredHead = (String, Uuid, i64, String);

fn anchor_digest(prev: Option<&[u8]>, at: DateTime<Utc>, heads: &[AnchoredHead]) -> [u8; 32] {
    let mut h = Sha256::new();
    if let Some(prev) = prev {
        h.update(prev);
    }
    h.update(at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string().as_bytes());
    for (entity_type, entity_id, position, hash) in heads {
        h.update(format!("\n{entity_type}\x1f{entity_id}\x1f{position}\x1f{hash}").as_bytes());
    }
    h.finalize().into()
}

/// The anchors' own chain, and every entry they vouch for (of one chain, when given).
async fn check_anchors(
    conn: &mut PgConnection,
    only: Option<&ChainId>,
) -> Result<(u64, Option<Break>, Option<(i64, DateTime<Utc>, String)>)> {
    let anchors =
        sqlx::query!("SELECT id, at, heads, prev_hash, hash FROM audit_anchors ORDER BY id")
            .fetch_all(&mut *conn)
            .await?;
    let mut prev: Option<Vec<u8>> = None;
    let mut newest = None;
    for a in &anchors {
        let heads: Vec<AnchoredHead> = serde_json::from_value(a.heads.clone())
            .map_err(|e| StoreError::Corrupt(format!("anchor {}: {e}", a.id)))?;
        let expected = anchor_digest(prev.as_deref(), a.at, &heads);
        if a.prev_hash != prev || expected[..] != a.hash[..] {
            return Ok((
                anchors.len() as u64,
                Some(Break::AnchorAltered { anchor: a.id }),
                None,
            ));
        }
        prev = Some(a.hash.clone());
        for (entity_type, entity_id, position, hash) in &heads {
            if only.is_some_and(|c| c.entity_type != *entity_type || c.entity_id != *entity_id) {
                continue;
            }
            let stored = sqlx::query_scalar!(
                r#"
                SELECT encode(hash, 'hex') AS "hash!" FROM audit_log
                 WHERE entity_type = $1 AND entity_id = $2 AND chain_position = $3
                "#,
                entity_type,
                entity_id,
                position
            )
            .fetch_optional(&mut *conn)
            .await?;
            if stored.as_deref() != Some(hash.as_str()) {
                let chain = ChainId {
                    entity_type: entity_type.clone(),
                    entity_id: *entity_id,
                };
                return Ok((
                    anchors.len() as u64,
                    Some(Break::AnchorDisagrees {
                        anchor: a.id,
                        chain,
                        position: *position,
                    }),
                    None,
                ));
            }
            newest = Some((a.id, a.at, hex(&a.hash)));
        }
        if only.is_none() {
            newest = Some((a.id, a.at, hex(&a.hash)));
        }
    }
    Ok((anchors.len() as u64, None, newest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub heads: usize,
    pub hash: String,
}

/// Anchors the heads that moved since the last anchor, if any did. Heads locked by a
/// transaction still appending are left for the next anchor (nothing waits for anchoring).
pub async fn anchor(pool: &PgPool, now: DateTime<Utc>) -> Result<Option<Anchor>> {
    let mut tx = pool.begin().await?;
    // Anchors form one chain: one anchoring at a time, every few minutes (never on a path
    // that appends entries).
    sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('occ_audit_anchor'))")
        .execute(&mut *tx)
        .await?;
    let moved = sqlx::query!(
        r#"
        SELECT entity_type, entity_id, chain_position, hash FROM audit_heads
         WHERE anchored_position <> chain_position
         ORDER BY entity_type, entity_id
           FOR UPDATE SKIP LOCKED
        "#
    )
    .fetch_all(&mut *tx)
    .await?;
    if moved.is_empty() {
        return Ok(None);
    }
    let heads: Vec<AnchoredHead> = moved
        .iter()
        .map(|h| {
            (
                h.entity_type.clone(),
                h.entity_id,
                h.chain_position,
                hex(&h.hash),
            )
        })
        .collect();
    let types: Vec<String> = moved.iter().map(|h| h.entity_type.clone()).collect();
    let ids: Vec<Uuid> = moved.iter().map(|h| h.entity_id).collect();
    let positions: Vec<i64> = moved.iter().map(|h| h.chain_position).collect();
    sqlx::query!(
        r#"
        UPDATE audit_heads h SET anchored_position = m.position
          FROM unnest($1::text[], $2::uuid[], $3::int8[]) AS m(entity_type, entity_id, position)
         WHERE h.entity_type = m.entity_type AND h.entity_id = m.entity_id
        "#,
        &types,
        &ids,
        &positions
    )
    .execute(&mut *tx)
    .await?;
    let prev = sqlx::query_scalar!("SELECT hash FROM audit_anchors ORDER BY id DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    // Stored as PostgreSQL returns it (microseconds), so the hash is recomputed from the same.
    let at = DateTime::<Utc>::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let hash = anchor_digest(prev.as_deref(), at, &heads);
    let id = sqlx::query_scalar!(
        r#"
        INSERT INTO audit_anchors (at, heads, prev_hash, hash) VALUES ($1, $2, $3, $4)
        RETURNING id
        "#,
        at,
        json!(heads),
        prev,
        &hash[..]
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Anchor {
        id,
        at,
        heads: heads.len(),
        hash: hex(&hash),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_digest_covers_every_field_and_the_link() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_764_400_000_123_456).expect("time");
        let id = Uuid::nil();
        let base = digest(None, 1, "incident", id, at, "a", "x", "", "{}", "d");
        assert_ne!(
            base,
            digest(Some(&base), 1, "incident", id, at, "a", "x", "", "{}", "d")
        );
        assert_ne!(
            base,
            digest(None, 2, "incident", id, at, "a", "x", "", "{}", "d")
        );
        assert_ne!(
            base,
            digest(None, 1, "incident", id, at, "b", "x", "", "{}", "d")
        );
        assert_ne!(
            base,
            digest(None, 1, "incident", id, at, "a", "x", "{}", "", "d")
        );
    }
}
