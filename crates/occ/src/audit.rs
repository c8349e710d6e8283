//! `occ audit`: checks that the audit log is as it was written, and anchors it.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use occ_store::PgPool;
use occ_store::audit_chain::{self, ChainId};

use crate::config::DatabaseArgs;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recomputes every chain of the audit log (or one incident's) and checks the anchors;
    /// reports the first entry where the record was changed after the fact, and exits 1.
    Verify {
        /// Only this incident's record (its number, INC-2026-000123, or id).
        #[arg(long, conflicts_with = "case")]
        incident: Option<String>,
        /// Only the record of the searches made for this case.
        #[arg(long)]
        case: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Who read which incidents of the recorded agencies, newest first.
    Reads {
        /// Only reads of this incident (its number or id).
        #[arg(long)]
        incident: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The searches of stored events (EventService), newest first, for oversight: when, who,
    /// for which case, what was asked and how many results went back.
    Searches {
        /// Only searches for this case reference.
        #[arg(long)]
        case: Option<String>,
        /// Only searches by this caller (`key:detective-7`, `user:alice`).
        #[arg(long)]
        by: Option<String>,
        /// Only searches at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only searches before this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line, for other tools.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Anchors the chains that moved since the last anchor now (`occ serve` does it every
    /// `--audit-anchor-interval`).
    Anchor {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

impl AuditCommand {
    pub fn database(&self) -> &DatabaseArgs {
        match self {
            AuditCommand::Verify { database, .. }
            | AuditCommand::Reads { database, .. }
            | AuditCommand::Searches { database, .. }
            | AuditCommand::Anchor { database } => database,
        }
    }
}

pub async fn run(command: AuditCommand, pool: &PgPool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        AuditCommand::Verify { incident, case, .. } => {
            let chain = match (incident, case) {
                (Some(reference), _) => Some(incident_chain(pool, &reference).await?),
                (None, Some(case)) => Some(ChainId {
                    entity_type: "case".into(),
                    entity_id: occ_store::audit::named_id("case", case.trim()),
                }),
                (None, None) => None,
            };
            let report = audit_chain::verify(pool, chain.as_ref()).await?;
            writeln!(
                out,
                "{} chains, {} entries, {} anchors checked",
                report.chains, report.entries, report.anchors
            )?;
            if let Some(broken) = report.broken {
                writeln!(out, "BROKEN: {broken}")?;
                out.flush()?;
                std::process::exit(1);
            }
            match report.anchor {
                Some((id, at, hash)) => writeln!(
                    out,
                    "intact; anchored by anchor {id} at {} with hash {hash} (compare with OCC's log)",
                    at.format("%Y-%m-%dT%H:%M:%SZ")
                )?,
                None => writeln!(out, "intact; not anchored yet")?,
            }
        }
        AuditCommand::Reads {
            incident, limit, ..
        } => {
            let incident = match incident {
                None => None,
                Some(reference) => Some(occ_domain::IncidentId(
                    incident_chain(pool, &reference).await?.entity_id,
                )),
            };
            let mut conn = occ_store::acquire(pool).await?;
            for r in occ_store::reads::list(&mut conn, incident, limit).await? {
                writeln!(
                    out,
                    "{} {} {} {}",
                    r.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                    r.principal,
                    r.method,
                    r.incidents.join(",")
                )?;
            }
        }
        AuditCommand::Searches {
            case,
            by,
            since,
            until,
            limit,
            json,
            ..
        } => {
            let mut conn = occ_store::acquire(pool).await?;
            let filter = occ_store::search::RecordedFilter {
                case,
                actor: by,
                since,
                until,
            };
            for s in occ_store::search::recorded(&mut conn, &filter, limit).await? {
                if json {
                    let line = serde_json::json!({
                        "audit_id": s.audit_id,
                        "at": s.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        "by": s.actor,
                        "case": s.case,
                        "method": s.method,
                        "results": s.results,
                        "parameters": s.parameters,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{} {} case={} {} results={} {}",
                        s.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                        s.actor,
                        s.case,
                        s.method,
                        s.results,
                        s.parameters
                    )?;
                }
            }
        }
        AuditCommand::Anchor { .. } => match audit_chain::anchor(pool, chrono::Utc::now()).await? {
            Some(a) => writeln!(out, "anchor {} over {} chains: {}", a.id, a.heads, a.hash)?,
            None => writeln!(out, "nothing moved since the last anchor")?,
        },
    }
    Ok(())
}

async fn incident_chain(pool: &PgPool, reference: &str) -> anyhow::Result<ChainId> {
    let mut conn = occ_store::acquire(pool).await?;
    let incident = match uuid::Uuid::parse_str(reference) {
        Ok(id) => occ_store::incidents::get(&mut conn, occ_domain::IncidentId(id)).await,
        Err(_) => occ_store::incidents::get_by_number(&mut conn, reference).await,
    }
    .with_context(|| format!("no incident {reference}"))?;
    Ok(ChainId {
        entity_type: "incident".into(),
        entity_id: incident.id.0,
    })
}

/// Anchors the audit log every `interval` until `shutdown`, logging each anchor's hash (the
/// copy that lives outside the database).
pub async fn anchor_periodically(
    pool: PgPool,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        match audit_chain::anchor(&pool, chrono::Utc::now()).await {
            Ok(Some(a)) => {
                tracing::info!(anchor = a.id, chains = a.heads, hash = %a.hash, "audit log anchored")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot anchor the audit log; trying again later"),
        }
    }
}
