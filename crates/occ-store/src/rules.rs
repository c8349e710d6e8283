//! Rules: storage, changes with their audit entries, and the live rule set every instance
//! evaluates (reloaded on NOTIFY and periodically).

use std::time::Duration;

use chrono::{DateTime, Utc};
use occ_domain::{FieldErrors, Rule, RuleId, RuleInput, RuleSet, ThresholdInput};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::{self, AuditEntry, Entity};
use crate::error::{Result, StoreError};

/// The channel the `rules` table's trigger notifies on.
pub const CHANGED_CHANNEL: &str = "occ_rules_changed";

struct RuleRow {
    id: Uuid,
    name: String,
    description: String,
    enabled: bool,
    event_types: Vec<String>,
    source_kinds: Vec<String>,
    zones: Vec<String>,
    districts: Vec<String>,
    min_confidence: Option<f64>,
    min_severity: Option<String>,
    thresholds: serde_json::Value,
    attributes: serde_json::Value,
    category: String,
    queue: String,
    priority: i16,
    title_template: String,
    correlation_fields: Vec<String>,
    correlation_window_seconds: i32,
    claim_within_seconds: Option<i32>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<RuleRow> for Rule {
    type Error = StoreError;

    fn try_from(r: RuleRow) -> Result<Rule> {
        let corrupt = |what: String| StoreError::Corrupt(format!("rule {}: {what}", r.name));
        let thresholds: Vec<ThresholdInput> =
            serde_json::from_value(r.thresholds.clone()).map_err(|e| corrupt(e.to_string()))?;
        let attributes = match &r.attributes {
            serde_json::Value::Object(m) => m.clone().into_iter().collect(),
            other => return Err(corrupt(format!("attributes is not an object: {other}"))),
        };
        let input = RuleInput {
            name: r.name.clone(),
            description: r.description,
            enabled: r.enabled,
            event_types: r.event_types,
            source_kinds: r.source_kinds,
            zones: r.zones,
            districts: r.districts,
            min_confidence: r.min_confidence,
            min_severity: r.min_severity,
            thresholds,
            attributes,
            category: r.category,
            queue: r.queue,
            priority: r.priority,
            title_template: r.title_template,
            correlation_fields: r.correlation_fields,
            correlation_window_seconds: i64::from(r.correlation_window_seconds),
            claim_within_seconds: r.claim_within_seconds.map(i64::from),
        };
        Rule::parse(RuleId(r.id), input, r.updated_at).map_err(|e| corrupt(e.to_string()))
    }
}

/// Every stored rule, by name. A rule that no longer parses (edited by hand) is skipped with
/// an error in the log rather than stopping the others.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Rule>> {
    let rows = sqlx::query_as!(
        RuleRow,
        r#"
        SELECT id, name, description, enabled, event_types, source_kinds, zones, districts,
               min_confidence,
               min_severity, thresholds, attributes, category, queue, priority, title_template,
               correlation_fields, correlation_window_seconds, claim_within_seconds, updated_at
          FROM rules
         ORDER BY name COLLATE "C"
        "#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match Rule::try_from(row) {
            Ok(rule) => Some(rule),
            Err(e) => {
                tracing::error!(error = %e, "skipping invalid stored rule");
                None
            }
        })
        .collect())
}

pub async fn get_by_name(conn: &mut PgConnection, name: &str) -> Result<Option<Rule>> {
    sqlx::query_as!(
        RuleRow,
        r#"
        SELECT id, name, description, enabled, event_types, source_kinds, zones, districts,
               min_confidence,
               min_severity, thresholds, attributes, category, queue, priority, title_template,
               correlation_fields, correlation_window_seconds, claim_within_seconds, updated_at
          FROM rules
         WHERE name = $1
           FOR UPDATE
        "#,
        name
    )
    .fetch_optional(conn)
    .await?
    .map(Rule::try_from)
    .transpose()
}

/// Creates the rule named in `input` or replaces the one of that name (keeping its id), with
/// an audit entry. Returns the stored rule and whether it was created.
pub async fn put(
    conn: &mut PgConnection,
    input: RuleInput,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<(Rule, bool)> {
    let queue_known: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM queues WHERE name = $1) AS "e!""#,
        input.queue
    )
    .fetch_one(&mut *conn)
    .await?;
    let before = get_by_name(conn, &input.name).await?;
    let id = before
        .as_ref()
        .map_or_else(|| RuleId(Uuid::now_v7()), |r| r.id);
    let rule = Rule::parse(id, input, now).map_err(StoreError::Invalid)?;
    if !queue_known {
        return Err(StoreError::Invalid(FieldErrors::one(
            "queue",
            format!("no queue named {:?}", rule.action.queue.as_str()),
        )));
    }
    let stored = rule.to_input();
    let thresholds = serde_json::to_value(&stored.thresholds).unwrap_or_default();
    let attributes = serde_json::Value::Object(stored.attributes.clone().into_iter().collect());
    let window = i32::try_from(stored.correlation_window_seconds).unwrap_or(i32::MAX);
    sqlx::query!(
        r#"
        INSERT INTO rules (id, name, description, enabled, event_types, source_kinds, zones,
                           min_confidence, min_severity, thresholds, attributes, category, queue,
                           priority, title_template, correlation_fields,
                           correlation_window_seconds, claim_within_seconds, created_at,
                           updated_at, districts)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $19,
                $18, $18, $20)
        ON CONFLICT (id) DO UPDATE
           SET description = EXCLUDED.description,
               enabled = EXCLUDED.enabled,
               event_types = EXCLUDED.event_types,
               source_kinds = EXCLUDED.source_kinds,
               zones = EXCLUDED.zones,
               districts = EXCLUDED.districts,
               min_confidence = EXCLUDED.min_confidence,
               min_severity = EXCLUDED.min_severity,
               thresholds = EXCLUDED.thresholds,
               attributes = EXCLUDED.attributes,
               category = EXCLUDED.category,
               queue = EXCLUDED.queue,
               priority = EXCLUDED.priority,
               title_template = EXCLUDED.title_template,
               correlation_fields = EXCLUDED.correlation_fields,
               correlation_window_seconds = EXCLUDED.correlation_window_seconds,
               claim_within_seconds = EXCLUDED.claim_within_seconds,
               updated_at = EXCLUDED.updated_at
        "#,
        rule.id.0,
        stored.name,
        stored.description,
        stored.enabled,
        &stored.event_types,
        &stored.source_kinds,
        &stored.zones,
        stored.min_confidence,
        stored.min_severity,
        thresholds,
        attributes,
        stored.category,
        stored.queue,
        stored.priority,
        stored.title_template,
        &stored.correlation_fields,
        window,
        now,
        stored
            .claim_within_seconds
            .map(|s| i32::try_from(s).unwrap_or(i32::MAX)),
        &stored.districts,
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            // Two PutRule calls created the same new name at once.
            StoreError::Retry(format!("rule {} created concurrently", stored.name))
        }
        _ => StoreError::from(e),
    })?;
    let created = before.is_none();
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Rule(rule.id.0),
            at: now,
            actor: actor.to_owned(),
            action: if created {
                "rule.created"
            } else {
                "rule.updated"
            }
            .into(),
            before: before.map(|b| json!(b.to_input())),
            after: Some(json!(stored)),
            detail: String::new(),
        }],
    )
    .await?;
    Ok((rule, created))
}

/// Deletes a rule by name, with an audit entry. Incidents it opened keep its name.
pub async fn delete(
    conn: &mut PgConnection,
    name: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Rule> {
    let rule = get_by_name(conn, name)
        .await?
        .ok_or(StoreError::NotFound { what: "rule" })?;
    sqlx::query!("DELETE FROM rules WHERE id = $1", rule.id.0)
        .execute(&mut *conn)
        .await?;
    audit::append(
        conn,
        &[AuditEntry {
            entity: Entity::Rule(rule.id.0),
            at: now,
            actor: actor.to_owned(),
            action: "rule.deleted".into(),
            before: Some(json!(rule.to_input())),
            after: None,
            detail: String::new(),
        }],
    )
    .await?;
    Ok(rule)
}

/// The rule set in force, kept current in the background (see [`crate::live`]).
pub type LiveRules = crate::live::Live<RuleSet>;

/// Loads the rules once (waiting for the database if needed), then keeps them current until
/// `shutdown`.
pub async fn live(
    pool: PgPool,
    refresh: Duration,
    shutdown: CancellationToken,
) -> Result<LiveRules> {
    let rules = LiveRules::start(
        pool,
        refresh,
        CHANGED_CHANNEL,
        "rules",
        load,
        |a, b| a == b,
        shutdown,
    )
    .await?;
    tracing::info!(rules = rules.current().len(), "rules loaded");
    Ok(rules)
}

async fn load(pool: PgPool) -> Result<RuleSet> {
    let mut conn = pool.acquire().await?;
    Ok(RuleSet::new(list(&mut conn).await?))
}
