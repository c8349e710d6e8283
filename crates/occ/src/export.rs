//! `occ export`: an incident as an evidence package in a directory, and the check of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use occ_domain::search::CaseRef;
use occ_store::PgPool;
use occ_store::export::{self, MANIFEST};

use crate::config::DatabaseArgs;

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Writes an incident's evidence package into a new directory: the incident, its events and
    /// their evidence references, its audit record, a timeline and a manifest with the SHA-256
    /// of every file and the audit anchor. The export is recorded in the incident's audit chain.
    Incident {
        /// Its number (INC-2026-000123) or id.
        incident: String,
        /// The case the export is for.
        #[arg(long)]
        case: String,
        /// The directory to write (must not exist yet).
        #[arg(long)]
        out: PathBuf,
        /// Who exports, as the audit log names it; `cli:<user>` by default.
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Checks a package in a directory: every file against the manifest, nothing missing or
    /// added, the audit record recomputed to the head the manifest names, and the manifest
    /// against the SHA-256 the incident's audit chain recorded at export. Exits 1 if anything
    /// differs.
    Verify {
        /// The package's directory.
        dir: PathBuf,
        /// Without OCC's database: the files and the record only (compare the manifest's
        /// SHA-256 it prints with the one recorded at export).
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

pub async fn incident(
    pool: &PgPool,
    reference: &str,
    case: &str,
    out: &Path,
    by: Option<String>,
) -> anyhow::Result<()> {
    let case = CaseRef::parse("--case", case).map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = {
        let mut conn = occ_store::acquire(pool).await?;
        match uuid::Uuid::parse_str(reference) {
            Ok(id) => occ_store::incidents::get(&mut conn, occ_domain::IncidentId(id)).await,
            Err(_) => occ_store::incidents::get_by_number(&mut conn, reference).await,
        }
        .with_context(|| format!("no incident {reference}"))?
        .id
    };
    if out.exists() {
        bail!(
            "{} exists: a package is written into a new directory",
            out.display()
        );
    }
    let by = by.unwrap_or_else(crate::import::actor);
    let package = export::incident(pool, id, &case, &by, chrono::Utc::now()).await?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for f in &package.files {
        let path = out.join(&f.path);
        std::fs::write(&path, &f.bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{} exported to {} ({} files); manifest SHA-256 {} (recorded in its audit chain)",
        package.number,
        out.display(),
        package.files.len(),
        package.manifest_sha256
    )?;
    Ok(())
}

/// Checks the package in `dir`; against the audit log of `pool` unless `None` (offline).
pub async fn verify(dir: &Path, pool: Option<&PgPool>) -> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.insert(name, std::fs::read(entry.path())?);
        } else {
            files.insert(entry.file_name().to_string_lossy().into_owned(), Vec::new());
        }
    }
    let mut checked = export::verify(&files);
    if let (Ok(v), Some(pool)) = (&checked, pool)
        && !export::recorded(pool, v.incident, &v.manifest_sha256).await?
    {
        checked = Err(vec![export::Problem::Manifest(format!(
            "its SHA-256 {} is not the one {}'s audit chain recorded at export",
            v.manifest_sha256, v.number
        ))]);
    }
    let mut out = std::io::stdout().lock();
    match checked {
        Ok(v) => {
            writeln!(
                out,
                "intact: {} — {} files, {} audit entries recomputed; manifest SHA-256 {} {}{}",
                v.number,
                v.files,
                v.record_entries,
                v.manifest_sha256,
                if pool.is_some() {
                    "(as recorded in its audit chain at export)"
                } else {
                    "(compare with the incident.exported entry of its audit chain)"
                },
                v.anchor
                    .map(|(id, hash)| format!("; anchor {id} with hash {hash}"))
                    .unwrap_or_default()
            )?;
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                writeln!(out, "BROKEN: {p}")?;
            }
            if !files.contains_key(MANIFEST) {
                writeln!(out, "(no {MANIFEST} in {})", dir.display())?;
            }
            out.flush()?;
            std::process::exit(1);
        }
    }
}
