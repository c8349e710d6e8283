//! `occ dead-letters list|replay`: what could not become events, looked at and decoded again
//! (after a fix, or with an adapter that was not running), from the command line. A replay
//! stores what now decodes and marks the dead letter resolved in the same transaction, so
//! running it twice changes nothing.

use std::io::Write;

use anyhow::Context;
use occ_adapters::Adapters;
use occ_domain::{Limits, RuleSet};
use occ_store::dead_letters::{self, DeadLetterFilter, ReplayOutcome};
use occ_store::{PgPool, rules};
use uuid::Uuid;

/// The newest dead letters, one line each.
pub async fn list(
    pool: &PgPool,
    unresolved: bool,
    topic_prefix: Option<String>,
    limit: i64,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let letters = dead_letters::list(
        &mut conn,
        &DeadLetterFilter {
            unresolved,
            topic_prefix,
            ..DeadLetterFilter::default()
        },
        None,
        limit,
    )
    .await?;
    let mut out = std::io::stdout().lock();
    for l in &letters {
        let state = match (&l.resolved_at, l.replays) {
            (Some(_), _) => format!("resolved ({} events)", l.resolved_events.unwrap_or(0)),
            (None, 0) => "open".to_owned(),
            (None, n) => format!("open, replayed {n}x"),
        };
        writeln!(
            out,
            "{}  {}  {}  {} bytes  {}  {}",
            l.id,
            l.received_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            l.topic,
            l.payload_size,
            state,
            l.reason
        )?;
    }
    writeln!(out, "{} dead letters", letters.len())?;
    Ok(())
}

/// Decodes dead letters again: those named, or the oldest unresolved ones (of a topic
/// prefix). Prints what became of each.
pub async fn replay(
    pool: &PgPool,
    adapters: &Adapters,
    limits: &Limits,
    ids: &[Uuid],
    topic_prefix: Option<&str>,
    limit: i64,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let letters = if ids.is_empty() {
        dead_letters::oldest_unresolved(&mut conn, topic_prefix, limit).await?
    } else {
        let found = dead_letters::get_many(&mut conn, ids).await?;
        if let Some(missing) = ids.iter().find(|id| !found.iter().any(|l| l.id == **id)) {
            anyhow::bail!("no dead letter {missing}");
        }
        found
    };
    let rules = RuleSet::new(rules::list(&mut conn).await?);
    drop(conn);
    let registry = occ_store::registry::load(pool.clone())
        .await
        .context("cannot load the registry")?;
    let decode = occ_api::dead_letters::redecode(adapters, &registry, limits);
    let outcomes =
        dead_letters::replay(pool, &letters, decode, &rules, &crate::import::actor()).await?;
    let mut out = std::io::stdout().lock();
    let mut resolved = 0;
    for (id, outcome) in &outcomes {
        let text = match outcome {
            ReplayOutcome::Resolved { events } => {
                resolved += 1;
                format!("resolved: {events} events stored")
            }
            ReplayOutcome::AlreadyResolved => "already resolved".into(),
            ReplayOutcome::StillFailing(reason) => format!("still failing: {reason}"),
            ReplayOutcome::NotReplayable(reason) => format!("not replayable: {reason}"),
        };
        writeln!(out, "{id}  {text}")?;
    }
    writeln!(out, "{resolved} of {} resolved", outcomes.len())?;
    Ok(())
}
