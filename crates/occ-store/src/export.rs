//! Evidence export: an incident as a self-contained package a court can check.
//!
//! A package is a set of files:
//!
//! - `incident.json`: the incident as stored;
//! - `events.json`: every event it is made of, oldest first, with the evidence references (the
//!   snapshots and clips an NVR keeps);
//! - `evidence.json`: those references again, one list, each with its event;
//! - `record.json`: the incident's audit chain, every entry exactly as it was hashed (position,
//!   time, actor, action, before, after, detail, hash), so the chain can be recomputed without
//!   OCC's database;
//! - `timeline.json`: events and audit entries merged in time order, as a reader follows them;
//! - `manifest.json`: the SHA-256 and size of every other file, the incident, the case, who
//!   exported it and when, the chain's head and the newest audit anchor at export.
//!
//! The export itself is then an entry in the incident's chain (`incident.exported`) holding the
//! manifest's SHA-256: the manifest is vouched for by the same anchored log it names.
//! [`verify`] checks a package without a database: every file against the manifest, nothing
//! missing or added, and the record's chain recomputed up to the head the manifest names.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use occ_domain::IncidentId;
use occ_domain::search::CaseRef;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::audit_chain;
use crate::error::{Result, StoreError};
use crate::events::{EventRow, StoredEvent};

/// The format a manifest names, for tools that read packages.
pub const FORMAT: &str = "occ-evidence-package/1";
pub const MANIFEST: &str = "manifest.json";

/// A file of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub bytes: Vec<u8>,
}

/// A package: its files, the manifest last, and the manifest's SHA-256 (hex), as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub files: Vec<File>,
    pub manifest_sha256: String,
    pub number: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// One entry of the incident's chain, as hashed.
struct Hashed {
    position: i64,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    before: String,
    after: String,
    detail: String,
    hash: Vec<u8>,
}

/// Exports incident `id` for `case`, by `by` (`cli:alice`, `key:…`), at `now`.
pub async fn incident(
    pool: &PgPool,
    id: IncidentId,
    case: &CaseRef,
    by: &str,
    now: DateTime<Utc>,
) -> Result<Package> {
    // Anchor first, so the newest anchor covers the record as exported (unless an entry is
    // being appended this instant: the manifest then names the head, anchored next time).
    audit_chain::anchor(pool, now).await?;

    let mut tx = pool.begin().await?;
    // One snapshot: the incident, its events and its record as of one moment.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let incident = crate::incidents::get(&mut tx, id).await?;
    let mut incident_json = serde_json::to_value(&incident)
        .map_err(|e| StoreError::Corrupt(format!("incident as JSON: {e}")))?;
    if let Some(o) = incident_json.as_object_mut() {
        // A claim's id is its holder's proof, not evidence.
        o.remove("claim");
    }

    let events: Vec<StoredEvent> = sqlx::query_as!(
        EventRow,
        r#"
        SELECT e.id, e.source_id, e.external_id, e.event_type, e.severity, e.source_kind,
               e.occurred_at, e.received_at, e.lat, e.lon, e.zone, e.extra_zones, e.district,
               e.confidence, e.measurements, e.attributes, e.evidence, e.revisions, e.revised_at
          FROM incident_events l JOIN events e ON e.id = l.event_id
         WHERE l.incident_id = $1
         ORDER BY e.seen_at, e.id
        "#,
        id.0
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(StoredEvent::from)
    .collect();

    let record: Vec<Hashed> = sqlx::query!(
        r#"
        SELECT chain_position, at, actor, action, coalesce(before::text, '') AS "before!",
               coalesce(after::text, '') AS "after!", detail, hash
          FROM audit_log
         WHERE entity_type = 'incident' AND entity_id = $1
         ORDER BY chain_position
        "#,
        id.0
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| Hashed {
        position: r.chain_position,
        at: r.at,
        actor: r.actor,
        action: r.action,
        before: r.before,
        after: r.after,
        detail: r.detail,
        hash: r.hash,
    })
    .collect();
    let anchor = sqlx::query!("SELECT id, at, hash FROM audit_anchors ORDER BY id DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let record_json: Vec<Value> = record
        .iter()
        .map(|h| {
            json!({
                "position": h.position,
                "at": h.at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "actor": h.actor,
                "action": h.action,
                "before": h.before,
                "after": h.after,
                "detail": h.detail,
                "hash": hex(&h.hash),
            })
        })
        .collect();
    let evidence: Vec<Value> = events
        .iter()
        .flat_map(|e| {
            e.evidence
                .iter()
                .map(move |x| json!({ "event_id": e.id, "source_id": e.source_id, "evidence": x }))
        })
        .collect();
    let mut timeline: Vec<(DateTime<Utc>, u8, Value)> = events
        .iter()
        .map(|e| {
            let at = e.occurred_at.min(e.received_at);
            (
                at,
                0,
                json!({ "at": at, "event": e.id, "type": e.event_type, "source_id": e.source_id }),
            )
        })
        .chain(record.iter().map(|h| {
            (
                h.at,
                1,
                json!({ "at": h.at, "record": h.position, "action": h.action, "actor": h.actor,
                        "detail": h.detail }),
            )
        }))
        .collect();
    timeline.sort_by_key(|t| (t.0, t.1));

    let mut files = vec![
        File {
            path: "incident.json".into(),
            bytes: pretty(&incident_json),
        },
        File {
            path: "events.json".into(),
            bytes: pretty(&json!(events)),
        },
        File {
            path: "evidence.json".into(),
            bytes: pretty(&json!(evidence)),
        },
        File {
            path: "record.json".into(),
            bytes: pretty(&json!(record_json)),
        },
        File {
            path: "timeline.json".into(),
            bytes: pretty(&json!(
                timeline.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>()
            )),
        },
    ];
    let head = record.last();
    let manifest = json!({
        "format": FORMAT,
        "incident": { "id": incident.id.0, "number": incident.number.to_string() },
        "case_reference": case.as_str(),
        "exported_at": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "exported_by": by,
        "record": {
            "chain": format!("incident {}", incident.id.0),
            "head_position": head.map(|h| h.position),
            "head_hash": head.map(|h| hex(&h.hash)),
        },
        "anchor": anchor.map(|a| json!({ "id": a.id, "at": a.at, "hash": hex(&a.hash) })),
        "files": files.iter().map(|f| json!({
            "path": f.path,
            "bytes": f.bytes.len(),
            "sha256": sha256_hex(&f.bytes),
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = pretty(&manifest);
    let manifest_sha256 = sha256_hex(&manifest_bytes);
    files.push(File {
        path: MANIFEST.into(),
        bytes: manifest_bytes,
    });

    // The export on the record, in the incident's own chain.
    let mut conn = pool.acquire().await?;
    audit::append(
        &mut conn,
        &[AuditEntry {
            entity: Entity::Incident(incident.id.0),
            at: now,
            actor: by.to_owned(),
            action: "incident.exported".into(),
            before: None,
            after: Some(json!({
                "case": case.as_str(),
                "manifest_sha256": manifest_sha256,
                "events": events.len(),
            })),
            detail: format!("exported for {case}"),
        }],
    )
    .await?;
    Ok(Package {
        files,
        manifest_sha256,
        number: incident.number.to_string(),
    })
}

/// Whether incident `id`'s audit chain recorded an export whose manifest had SHA-256 `sha256`.
pub async fn recorded(pool: &PgPool, id: Uuid, sha256: &str) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"
        SELECT EXISTS (SELECT 1 FROM audit_log
                        WHERE entity_type = 'incident' AND entity_id = $1
                          AND action = 'incident.exported'
                          AND after ->> 'manifest_sha256' = $2) AS "recorded!"
        "#,
        id,
        sha256
    )
    .fetch_one(pool)
    .await?)
}

/// What verification found wrong with a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No manifest, or one that cannot be read.
    Manifest(String),
    Missing(String),
    /// A file whose content is not what the manifest says.
    Altered(String),
    /// A file the manifest does not name.
    Unlisted(String),
    /// The record's chain does not recompute, or does not end at the manifest's head.
    Record(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Manifest(m) => write!(f, "manifest.json: {m}"),
            Problem::Missing(p) => write!(f, "{p}: missing"),
            Problem::Altered(p) => write!(f, "{p}: altered (its SHA-256 is not the manifest's)"),
            Problem::Unlisted(p) => write!(f, "{p}: not in the manifest"),
            Problem::Record(m) => write!(f, "record.json: {m}"),
        }
    }
}

/// What a verified package holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub incident: Uuid,
    pub number: String,
    pub manifest_sha256: String,
    pub files: usize,
    pub record_entries: usize,
    /// The anchor the manifest names: its id and hash.
    pub anchor: Option<(i64, String)>,
}

/// Checks a package's files (path → content): every file the manifest lists is there with its
/// SHA-256, no other file is, and the incident's audit record recomputes to the head the
/// manifest names. Needs no database.
pub fn verify(files: &BTreeMap<String, Vec<u8>>) -> std::result::Result<Verified, Vec<Problem>> {
    let Some(manifest_bytes) = files.get(MANIFEST) else {
        return Err(vec![Problem::Manifest("manifest.json is missing".into())]);
    };
    let manifest: Value = match serde_json::from_slice(manifest_bytes) {
        Ok(v) => v,
        Err(e) => return Err(vec![Problem::Manifest(format!("not JSON: {e}"))]),
    };
    if manifest["format"] != FORMAT {
        return Err(vec![Problem::Manifest(format!(
            "not a package of format {FORMAT}"
        ))]);
    }
    let mut problems = Vec::new();
    let listed: BTreeMap<String, String> = manifest["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some((
                f["path"].as_str()?.to_owned(),
                f["sha256"].as_str()?.to_owned(),
            ))
        })
        .collect();
    for (path, sha) in &listed {
        match files.get(path) {
            None => problems.push(Problem::Missing(path.clone())),
            Some(bytes) if sha256_hex(bytes) != *sha => {
                problems.push(Problem::Altered(path.clone()));
            }
            Some(_) => {}
        }
    }
    for path in files.keys() {
        if path != MANIFEST && !listed.contains_key(path) {
            problems.push(Problem::Unlisted(path.clone()));
        }
    }
    let entries = match files.get("record.json") {
        Some(bytes) => match check_record(bytes, &manifest) {
            Ok(n) => n,
            Err(m) => {
                problems.push(Problem::Record(m));
                0
            }
        },
        None => 0,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Verified {
        incident: manifest["incident"]["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_default(),
        number: manifest["incident"]["number"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        manifest_sha256: sha256_hex(manifest_bytes),
        files: listed.len() + 1,
        record_entries: entries,
        anchor: manifest["anchor"]["id"].as_i64().map(|id| {
            (
                id,
                manifest["anchor"]["hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }),
    })
}

/// Recomputes the record's chain as PostgreSQL hashed it; the number of entries.
fn check_record(bytes: &[u8], manifest: &Value) -> std::result::Result<usize, String> {
    let entries: Vec<Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let incident: Uuid = manifest["incident"]["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or("the manifest names no incident id")?;
    let mut prev: Option<[u8; 32]> = None;
    for (i, e) in entries.iter().enumerate() {
        let text = |k: &str| e[k].as_str().unwrap_or_default();
        let position = e["position"].as_i64().unwrap_or_default();
        if position != i as i64 + 1 {
            return Err(format!("entry {} is at position {position}", i + 1));
        }
        let at = DateTime::parse_from_rfc3339(text("at"))
            .map_err(|_| format!("entry {position}: a bad time"))?
            .with_timezone(&Utc);
        let hash = audit_chain::digest(
            prev.as_ref().map(|p| &p[..]),
            position,
            "incident",
            incident,
            at,
            text("actor"),
            text("action"),
            text("before"),
            text("after"),
            text("detail"),
        );
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        if hex != text("hash") {
            return Err(format!(
                "entry {position} does not hash to its recorded hash"
            ));
        }
        prev = Some(hash);
    }
    let head = prev.map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>());
    if head.as_deref() != manifest["record"]["head_hash"].as_str() {
        return Err("the chain does not end at the head the manifest names".into());
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_alone_with_a_bad_format_is_refused() {
        let files: BTreeMap<String, Vec<u8>> =
            [(MANIFEST.to_owned(), br#"{"format": "zip"}"#.to_vec())].into();
        assert!(matches!(
            verify(&files).unwrap_err()[0],
            Problem::Manifest(_)
        ));
        assert!(matches!(
            verify(&BTreeMap::new()).unwrap_err()[0],
            Problem::Manifest(_)
        ));
    }
}
