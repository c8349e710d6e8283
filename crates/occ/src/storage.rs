//! `occ events`: the event partitions, retention and legal holds; and the maintenance
//! `occ serve` runs.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use occ_store::PgPool;
use occ_store::partitions::{self, Hold, Partitioning};
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseArgs, StorageArgs};

const CLI_ACTOR: &str = "system:occ-events";

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The event partitions, their time ranges and the retention applied to each.
    Partitions {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Makes the partitions due, applies retention and forgets old redelivery keys now
    /// (`occ serve` does it every `--event-maintenance-interval`).
    Maintain {
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Keeps events past their retention for a case: those of a time range, optionally only
    /// of some sources and zones. Prints the hold's id.
    Hold {
        /// The case it is for (required: a hold answers to someone).
        #[arg(long = "case")]
        case_ref: String,
        /// From when (RFC 3339).
        #[arg(long)]
        from: DateTime<Utc>,
        /// Until when (RFC 3339, exclusive).
        #[arg(long)]
        to: DateTime<Utc>,
        /// Only these sources (repeat for several).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// Only events in these zones (repeat for several).
        #[arg(long = "zone")]
        zones: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
        /// Who places it (recorded in the audit log).
        #[arg(long, default_value = CLI_ACTOR)]
        by: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Every legal hold, newest first.
    Holds {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Releases a legal hold: its events go at their next retention run.
    Release {
        id: uuid::Uuid,
        #[arg(long, default_value = CLI_ACTOR)]
        by: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

impl EventsCommand {
    pub fn database(&self) -> &DatabaseArgs {
        match self {
            EventsCommand::Partitions { database }
            | EventsCommand::Maintain { database, .. }
            | EventsCommand::Hold { database, .. }
            | EventsCommand::Holds { database }
            | EventsCommand::Release { database, .. } => database,
        }
    }
}

pub async fn run(command: EventsCommand, pool: &PgPool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        EventsCommand::Partitions { .. } => {
            let mut conn = occ_store::acquire(pool).await?;
            writeln!(
                out,
                "{:<28} {:<26} {:<26} retention applied",
                "partition", "from", "to"
            )?;
            for p in partitions::list(&mut conn).await? {
                writeln!(
                    out,
                    "{:<28} {:<26} {:<26} {}",
                    p.name,
                    p.range.from.to_rfc3339(),
                    p.range.to.to_rfc3339(),
                    p.retained.as_deref().unwrap_or("-")
                )?;
            }
        }
        EventsCommand::Maintain { storage, .. } => {
            let config = storage.partitioning()?;
            match partitions::maintain(pool, &config, Utc::now()).await? {
                None => writeln!(out, "another instance is maintaining the partitions now")?,
                Some(report) => {
                    for (name, moved) in &report.created {
                        writeln!(out, "made {name} ({moved} waiting events moved in)")?;
                    }
                    for (name, kept, dropped) in &report.thinned {
                        writeln!(out, "thinned {name}: kept {kept}, dropped {dropped}")?;
                    }
                    writeln!(out, "forgot {} redelivery keys", report.keys_forgotten)?;
                    writeln!(
                        out,
                        "dropped {} hourly counts of the wall",
                        report.hourly_counts_dropped
                    )?;
                }
            }
        }
        EventsCommand::Hold {
            case_ref,
            from,
            to,
            sources,
            zones,
            reason,
            by,
            ..
        } => {
            anyhow::ensure!(!case_ref.trim().is_empty(), "--case must name the case");
            anyhow::ensure!(from < to, "--from must be before --to");
            let hold = Hold {
                id: uuid::Uuid::now_v7(),
                case_ref,
                reason,
                from,
                to,
                sources,
                zones,
                created_by: by,
                created_at: Utc::now(),
                released: None,
            };
            let mut tx = occ_store::begin(pool).await?;
            partitions::hold(&mut tx, &hold).await?;
            occ_store::commit(tx).await?;
            writeln!(out, "{}", hold.id)?;
        }
        EventsCommand::Holds { .. } => {
            let mut conn = occ_store::acquire(pool).await?;
            for h in partitions::holds(&mut conn).await? {
                let state = match &h.released {
                    Some((by, at)) => format!("released {} by {by}", at.to_rfc3339()),
                    None => "in force".to_owned(),
                };
                writeln!(
                    out,
                    "{} case {} {}..{} sources [{}] zones [{}] by {} ({state}) {}",
                    h.id,
                    h.case_ref,
                    h.from.to_rfc3339(),
                    h.to.to_rfc3339(),
                    h.sources.join(","),
                    h.zones.join(","),
                    h.created_by,
                    h.reason
                )?;
            }
        }
        EventsCommand::Release { id, by, .. } => {
            let mut tx = occ_store::begin(pool).await?;
            let released = partitions::release(&mut tx, id, &by, Utc::now()).await?;
            occ_store::commit(tx).await?;
            anyhow::ensure!(released, "no hold {id} in force");
            writeln!(out, "released {id}")?;
        }
    }
    Ok(())
}

/// Runs [`partitions::maintain`] now and every `interval` until `shutdown`.
pub async fn maintain_periodically(
    pool: PgPool,
    config: Partitioning,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // A run that failed (a lock not granted in time, PostgreSQL away) is tried again soon.
    const RETRY: Duration = Duration::from_secs(60);
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        let run = partitions::maintain(&pool, &config, Utc::now())
            .await
            .context("event partition maintenance");
        match run {
            Ok(Some(report)) if report != Default::default() => {
                tracing::info!(
                    created = report.created.len(),
                    thinned = report.thinned.len(),
                    keys_forgotten = report.keys_forgotten,
                    hourly_counts_dropped = report.hourly_counts_dropped,
                    "event partitions maintained"
                );
            }
            Ok(_) => {}
            Err(e) => {
                wait = RETRY.min(interval);
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "event partitions not maintained");
            }
        }
    }
}

/// Folds the wall's counts ([`occ_store::counts::compact`]) every `interval` until `shutdown`;
/// one instance at a time does it.
pub async fn compact_counts_periodically(
    pool: PgPool,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match occ_store::counts::compact(&pool).await {
            Ok(Some(done)) => {
                failing = false;
                tracing::debug!(
                    event_rows = done.event_rows,
                    incident_rows = done.incident_rows,
                    "the wall's counts took in what committed"
                );
            }
            Ok(None) => failing = false,
            // Reads add what is not folded yet: a run missed costs time, not counts.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "the wall's counts were not compacted; trying again");
            }
            Err(_) => {}
        }
    }
}
