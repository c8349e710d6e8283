//! API keys: made (the secret shown once), listed, revoked, and checked on every call.
//!
//! A key is `occ_` followed by 43 characters of base64url (256 random bits). Only its SHA-256
//! is stored; a lookup is by that hash. Whether a key is valid (not revoked, not expired) is
//! decided by PostgreSQL's clock, which every instance shares: a key revoked on one instance
//! is refused by all of them as soon as their cache of it lapses.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use occ_domain::access::{EVERY_QUEUE, Roles};
use occ_domain::glob::Glob;
use occ_domain::{FieldError, FieldErrors};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::error::{Result, StoreError};

/// What every OCC key starts with (so secret scanners and people can tell one).
pub const KEY_PREFIX: &str = "occ_";
/// How many of a key's characters lists show.
const SHOWN: usize = 12;

/// What a new key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub roles: Roles,
    pub queues: Vec<String>,
    pub agencies: Vec<String>,
    pub sources: Vec<String>,
    pub may_update_status: bool,
    pub expires_at: Option<DateTime<Utc>>,
    /// Revoke an active key of the same name first (rotation).
    pub replace: bool,
    /// The client certificate subject (common name) this key stands for, if any.
    pub certificate_subject: Option<String>,
}

/// A key as lists show it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    pub roles: Roles,
    pub queues: Vec<String>,
    pub agencies: Vec<String>,
    pub sources: Vec<String>,
    pub may_update_status: bool,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub certificate_subject: Option<String>,
}

impl KeyInfo {
    /// How audit entries and claims name this key's caller: `key:<name>`, or for a client
    /// certificate `cert:<subject>`.
    pub fn subject(&self) -> String {
        match &self.certificate_subject {
            Some(cn) => format!("cert:{cn}"),
            None => subject(&self.name),
        }
    }

    /// Its source globs.
    pub fn source_globs(&self) -> Vec<Glob> {
        self.sources.iter().map(|s| Glob::new(s)).collect()
    }
}

/// How audit entries name the caller of key `name`.
pub fn subject(name: &str) -> String {
    format!("key:{name}")
}

/// The stored form of a key's secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn check(key: &NewKey) -> Result<()> {
    let mut errors = Vec::new();
    let name_ok = !key.name.is_empty()
        && key.name.len() <= 64
        && key.name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '@' | '-'));
    if !name_ok {
        errors.push(FieldError::new(
            "name",
            "must be 1 to 64 characters of letters, digits, space, '.', '_', '@' or '-', starting with a letter or digit",
        ));
    }
    if key.roles.is_empty() {
        errors.push(FieldError::new("roles", "name at least one role"));
    }
    for (field, values) in [("queues", &key.queues), ("agencies", &key.agencies)] {
        for (i, v) in values.iter().enumerate() {
            let ok = v == EVERY_QUEUE
                || (!v.is_empty()
                    && v.len() <= 64
                    && v.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    }));
            if !ok {
                errors.push(FieldError::new(
                    format!("{field}[{i}]"),
                    format!("{v:?} is not a queue or agency name (a-z, 0-9, '_', '-'; or '*')"),
                ));
            }
        }
    }
    if let Some(cn) = &key.certificate_subject
        && (cn.is_empty() || cn.len() > 256 || cn.chars().any(char::is_control))
    {
        errors.push(FieldError::new(
            "certificate_subject",
            "must be 1 to 256 characters without control characters",
        ));
    }
    for (i, s) in key.sources.iter().enumerate() {
        if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
            errors.push(FieldError::new(
                format!("sources[{i}]"),
                "must be 1 to 128 characters",
            ));
        }
    }
    match FieldErrors::from_vec(errors) {
        Some(errors) => Err(StoreError::Invalid(errors)),
        None => Ok(()),
    }
}

macro_rules! key_info {
    ($r:expr) => {{
        let r = $r;
        KeyInfo {
            id: r.id,
            roles: Roles::parse(&r.roles).map_err(StoreError::Corrupt)?,
            name: r.name,
            prefix: r.prefix,
            queues: r.queues,
            agencies: r.agencies,
            sources: r.sources,
            may_update_status: r.may_update_status,
            created_at: r.created_at,
            created_by: r.created_by,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
            certificate_subject: r.certificate_subject,
        }
    }};
}

fn audit_entry(info: &KeyInfo, action: &str, actor: &str, at: DateTime<Utc>) -> AuditEntry {
    AuditEntry {
        entity: Entity::Key(info.id),
        at,
        actor: actor.to_owned(),
        action: action.into(),
        before: None,
        after: Some(json!({
            "name": info.name,
            "prefix": info.prefix,
            "roles": info.roles.names(),
            "queues": info.queues,
            "agencies": info.agencies,
            "sources": info.sources,
            "may_update_status": info.may_update_status,
            "expires_at": info.expires_at,
            "certificate_subject": info.certificate_subject,
        })),
        detail: info.name.clone(),
    }
}

/// Makes a key. Returns it and its secret, which exists nowhere else: show it once.
pub async fn create(
    conn: &mut PgConnection,
    key: &NewKey,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<(KeyInfo, String)> {
    check(key)?;
    if key.replace {
        revoke_named(conn, &key.name, actor, now).await?;
    }
    let secret = new_secret();
    let roles = key.roles.names();
    let row = sqlx::query!(
        r#"
        INSERT INTO api_keys (id, name, prefix, secret_sha256, roles, queues, agencies, sources,
                              may_update_status, created_at, created_by, expires_at,
                              certificate_subject)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
        RETURNING id, name, prefix, roles, queues, agencies, sources, may_update_status,
                  created_at, created_by, expires_at, revoked_at, last_used_at, certificate_subject
        "#,
        Uuid::now_v7(),
        key.name,
        &secret[..SHOWN],
        &digest(&secret)[..],
        &roles,
        &key.queues,
        &key.agencies,
        &key.sources,
        key.may_update_status,
        now,
        actor,
        key.expires_at,
        key.certificate_subject,
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::AlreadyExists("an active key for this certificate subject")
        }
        _ => StoreError::from(e),
    })?
    .ok_or(StoreError::AlreadyExists("an active key with this name"))?;
    let info = key_info!(row);
    audit::append(conn, &[audit_entry(&info, "key.created", actor, now)]).await?;
    Ok((info, secret))
}

/// Every key, newest first; revoked ones only if asked.
pub async fn list(conn: &mut PgConnection, include_revoked: bool) -> Result<Vec<KeyInfo>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, name, prefix, roles, queues, agencies, sources, may_update_status,
               created_at, created_by, expires_at, revoked_at, last_used_at, certificate_subject
          FROM api_keys
         WHERE $1 OR revoked_at IS NULL
         ORDER BY created_at DESC, id DESC
        "#,
        include_revoked
    )
    .fetch_all(conn)
    .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in rows {
        keys.push(key_info!(r));
    }
    Ok(keys)
}

/// Revokes the active key named `name` (if any), with an audit entry.
async fn revoke_named(
    conn: &mut PgConnection,
    name: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Option<KeyInfo>> {
    let row = sqlx::query!(
        r#"
        UPDATE api_keys SET revoked_at = $2, revoked_by = $3
         WHERE name = $1 AND revoked_at IS NULL
        RETURNING id, name, prefix, roles, queues, agencies, sources, may_update_status,
                  created_at, created_by, expires_at, revoked_at, last_used_at, certificate_subject
        "#,
        name,
        now,
        actor
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let info = key_info!(row);
    audit::append(conn, &[audit_entry(&info, "key.revoked", actor, now)]).await?;
    Ok(Some(info))
}

/// Revokes a key, named by its name, its id or its prefix. Every instance refuses it within
/// its cache's lifetime.
pub async fn revoke(
    conn: &mut PgConnection,
    reference: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<KeyInfo> {
    let name = sqlx::query_scalar!(
        r#"
        SELECT name FROM api_keys
         WHERE revoked_at IS NULL
           AND (name = $1 OR id::text = $1 OR ($1 LIKE 'occ\_%' AND prefix = left($1, 12)))
         ORDER BY name = $1 DESC
         LIMIT 1
        "#,
        reference
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound { what: "active key" })?;
    revoke_named(conn, &name, actor, now)
        .await?
        .ok_or(StoreError::NotFound { what: "active key" })
}

/// The valid key with this secret, if any (not revoked, not expired by PostgreSQL's clock),
/// noting that it was used.
pub async fn authenticate(conn: &mut PgConnection, secret: &str) -> Result<Option<KeyInfo>> {
    if !secret.starts_with(KEY_PREFIX) {
        return Ok(None);
    }
    let row = sqlx::query!(
        r#"
        UPDATE api_keys SET last_used_at = now()
         WHERE secret_sha256 = $1 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())
        RETURNING id, name, prefix, roles, queues, agencies, sources, may_update_status,
                  created_at, created_by, expires_at, revoked_at, last_used_at, certificate_subject
        "#,
        &digest(secret)[..]
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some(r) => Some(key_info!(r)),
        None => None,
    })
}

/// The valid key that stands for client certificates with this subject, if any.
pub async fn authenticate_certificate(
    conn: &mut PgConnection,
    certificate_subject: &str,
) -> Result<Option<KeyInfo>> {
    let row = sqlx::query!(
        r#"
        UPDATE api_keys SET last_used_at = now()
         WHERE certificate_subject = $1 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())
        RETURNING id, name, prefix, roles, queues, agencies, sources, may_update_status,
                  created_at, created_by, expires_at, revoked_at, last_used_at, certificate_subject
        "#,
        certificate_subject
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some(r) => Some(key_info!(r)),
        None => None,
    })
}

/// Which valid keys exist: any at all, and any with the admin role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub any: bool,
    pub admin: bool,
}

pub async fn census(conn: &mut PgConnection) -> Result<Census> {
    let row = sqlx::query!(
        r#"
        SELECT count(*) > 0 AS "any!", coalesce(bool_or('admin' = ANY(roles)), false) AS "admin!"
          FROM api_keys
         WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
        "#
    )
    .fetch_one(conn)
    .await?;
    Ok(Census {
        any: row.any,
        admin: row.admin,
    })
}

/// Where each queue belongs: `queue → agency`.
pub async fn queue_agencies(conn: &mut PgConnection) -> Result<BTreeMap<String, String>> {
    Ok(sqlx::query!("SELECT name, agency FROM queues")
        .fetch_all(conn)
        .await?
        .into_iter()
        .map(|r| (r.name, r.agency))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_url_safe() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 43);
        assert!(a.starts_with(KEY_PREFIX));
        assert!(
            a[4..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
