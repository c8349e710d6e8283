//! `occ sources import`, `occ zones import`, `occ watchlist import`: the city's registry from
//! files, each file in one transaction (all of it, or nothing and every error named), with the
//! same checks and audit entries as the gRPC API. Running instances reload within moments.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use occ_adapters::adapter::from_json;
use occ_domain::zone::zones_from_geojson;
use occ_domain::{FieldErrors, Mapping, Profile, SourceInput, WatchEntryInput};
use occ_store::{PgPool, StoreError, sources, watchlist, zones};
use serde::Deserialize;

use crate::config::Span;

/// Who the audit log names for changes made from the command line.
pub fn actor() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("cli:{user}")
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn is_csv(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Field errors as lines a person fixes a file by.
fn report(errors: &FieldErrors, locate: impl Fn(&str) -> String) -> String {
    errors
        .errors()
        .iter()
        .map(|e| format!("  {}: {}", locate(&e.field), e.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why a file was not imported, every error named as the person fixing it finds it.
fn refused(path: &Path, errors: &FieldErrors, locate: impl Fn(&str) -> String) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is not imported; fix these and run it again:\n{}",
        path.display(),
        report(errors, locate)
    )
}

/// How many of the stored items were new.
fn counted<T>(stored: &[(T, bool)], profiles: usize) -> Imported {
    let created = stored.iter().filter(|(_, c)| *c).count();
    Imported {
        created,
        updated: stored.len() - created,
        profiles,
    }
}

/// `sources[12].lat` in a CSV file as the line record 12 starts on (`lines[12]`).
fn csv_line(field: &str, lines: &[u64]) -> String {
    match field
        .strip_prefix("sources[")
        .or_else(|| field.strip_prefix("entries["))
        .and_then(|r| r.split_once("]."))
    {
        Some((i, rest)) => match i.parse::<usize>().ok().and_then(|i| lines.get(i)) {
            Some(line) => format!("line {line}, {rest}"),
            None => field.to_owned(),
        },
        None => field.to_owned(),
    }
}

/// The rows of a CSV file, each with the line it starts on (a quoted field may span lines).
fn csv_rows<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> anyhow::Result<Vec<(u64, T)>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let headers = reader.headers()?.clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record?;
        let line = record.position().map_or(0, csv::Position::line);
        let row = record
            .deserialize(Some(&headers))
            .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        rows.push((line, row));
    }
    Ok(rows)
}

/// One CSV row of sources: `id,kind,name,lat,lon,zone,district,profile,expected_interval,enabled,tags`
/// (only `id` required; `tags` as `key=value;key=value`; `expected_interval` like `15m`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceRow {
    id: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    lat: Option<f64>,
    #[serde(default)]
    lon: Option<f64>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    district: Option<String>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    expected_interval: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    tags: Option<String>,
}

impl SourceRow {
    fn input(self, line: u64) -> anyhow::Result<SourceInput> {
        let expected_interval_seconds = match self.expected_interval.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => {
                let span: Span = s
                    .parse()
                    .map_err(|e| anyhow::anyhow!("line {line}, expected_interval: {e}"))?;
                Some(i64::try_from(span.0.as_secs()).unwrap_or(i64::MAX))
            }
        };
        let mut tags = BTreeMap::new();
        for pair in self
            .tags
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.trim().is_empty())
        {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("line {line}, tags: {pair:?} is not key=value"))?;
            tags.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(SourceInput {
            id: self.id.trim().to_owned(),
            kind: self.kind.filter(|k| !k.is_empty()),
            name: self.name.unwrap_or_default(),
            lat: self.lat,
            lon: self.lon,
            zone: self.zone.filter(|z| !z.is_empty()),
            district: self.district.filter(|d| !d.is_empty()),
            tags,
            enabled: self.enabled,
            profile: self.profile.filter(|p| !p.is_empty()),
            mapping: Mapping::default(),
            expected_interval_seconds,
        })
    }
}

/// A JSON sources file with profiles: `{"profiles": [...], "sources": [...]}` (or just the
/// array of sources).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    profiles: Vec<ProfileFile>,
    #[serde(default)]
    sources: Vec<SourceInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    mapping: Mapping,
}

/// Outcome of an import, for the person who ran it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub created: usize,
    pub updated: usize,
    pub profiles: usize,
}

pub async fn sources(pool: &PgPool, path: &Path) -> anyhow::Result<Imported> {
    let bytes = read(path)?;
    let mut lines = Vec::new();
    let (inputs, profiles) = if is_csv(path) {
        let mut inputs = Vec::new();
        for (line, row) in csv_rows::<SourceRow>(&bytes)? {
            inputs.push(row.input(line)?);
            lines.push(line);
        }
        (inputs, Vec::new())
    } else if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let sources: Vec<SourceInput> =
            from_json(&bytes, "sources").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (sources, Vec::new())
    } else {
        let file: RegistryFile = from_json(&bytes, "registry file")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (file.sources, file.profiles)
    };
    if inputs.is_empty() && profiles.is_empty() {
        bail!("{}: no sources in it", path.display());
    }
    let actor = actor();
    let mut tx = occ_store::begin(pool).await?;
    for (i, p) in profiles.iter().enumerate() {
        let profile = Profile::parse(&p.name, &p.description, p.mapping.clone()).map_err(|e| {
            anyhow::anyhow!(
                "profiles[{i}] is invalid:\n{}",
                report(&e, |f| f.to_owned())
            )
        })?;
        sources::put_profile(&mut tx, &profile, &actor).await?;
    }
    let csv = is_csv(path);
    let stored = match sources::upsert(&mut tx, inputs, &actor).await {
        Ok(s) => s,
        Err(StoreError::Invalid(errors)) => {
            return Err(refused(path, &errors, |f| {
                if csv {
                    csv_line(f, &lines)
                } else {
                    f.to_owned()
                }
            }));
        }
        Err(e) => return Err(e.into()),
    };
    occ_store::commit(tx).await?;
    Ok(counted(&stored, profiles.len()))
}

pub async fn zones(pool: &PgPool, path: &Path) -> anyhow::Result<Imported> {
    let doc: serde_json::Value = serde_json::from_slice(&read(path)?)
        .with_context(|| format!("{}: not JSON (a GeoJSON FeatureCollection)", path.display()))?;
    let inputs = zones_from_geojson(&doc).map_err(|e| {
        anyhow::anyhow!(
            "{} is not imported:\n{}",
            path.display(),
            report(&e, |f| f.to_owned())
        )
    })?;
    if inputs.is_empty() {
        bail!("{}: no features in it", path.display());
    }
    let mut tx = occ_store::begin(pool).await?;
    let stored = match zones::put(&mut tx, inputs, &actor()).await {
        Ok(s) => s,
        Err(StoreError::Invalid(errors)) => {
            return Err(refused(path, &errors, |f| {
                f.replacen("zones[", "features[", 1)
            }));
        }
        Err(e) => return Err(e.into()),
    };
    occ_store::commit(tx).await?;
    Ok(counted(&stored, 0))
}

/// One watch-list entry in a file: `plate,list,reason,expires_at` in CSV (RFC 3339 expiry,
/// optional), the same keys in JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryRow {
    plate: String,
    list: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    expires_at: Option<String>,
}

impl EntryRow {
    fn input(self, at: &str) -> anyhow::Result<WatchEntryInput> {
        let expires_at = match self.expires_at.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{at}, expires_at: {e} (RFC 3339, like 2027-01-01T00:00:00Z)"
                        )
                    })?
                    .with_timezone(&Utc),
            ),
        };
        Ok(WatchEntryInput {
            plate: self.plate,
            list: self.list,
            reason: self.reason,
            expires_at,
        })
    }
}

pub async fn watchlist(pool: &PgPool, path: &Path) -> anyhow::Result<Imported> {
    let bytes = read(path)?;
    let csv = is_csv(path);
    let mut inputs = Vec::new();
    let mut lines = Vec::new();
    if csv {
        for (line, row) in csv_rows::<EntryRow>(&bytes)? {
            inputs.push(row.input(&format!("line {line}"))?);
            lines.push(line);
        }
    } else {
        let rows: Vec<EntryRow> = from_json(&bytes, "watch list")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, row) in rows.into_iter().enumerate() {
            inputs.push(row.input(&format!("entries[{i}]"))?);
        }
    }
    if inputs.is_empty() {
        bail!("{}: no entries in it", path.display());
    }
    let mut tx = occ_store::begin(pool).await?;
    let stored = match watchlist::add(&mut tx, inputs, &actor()).await {
        Ok(s) => s,
        Err(StoreError::Invalid(errors)) => {
            return Err(refused(path, &errors, |f| {
                if csv {
                    csv_line(f, &lines)
                } else {
                    f.to_owned()
                }
            }));
        }
        Err(e) => return Err(e.into()),
    };
    occ_store::commit(tx).await?;
    Ok(counted(&stored, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_sources() {
        let data = "id,kind,name,lat,lon,zone,district,expected_interval,tags\n\
                    cam-esil-0042,camera,Kabanbay 3,51.128,71.43,esil_street_1,esil,15m,vendor=axis;floor=0\n";
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(data.as_bytes());
        let row: SourceRow = reader
            .deserialize()
            .next()
            .expect("a row")
            .expect("valid row");
        let input = row.input(2).expect("valid input");
        assert_eq!(input.expected_interval_seconds, Some(900));
        assert_eq!(input.tags["vendor"], "axis");
        assert_eq!(input.lat, Some(51.128));
    }

    #[test]
    fn errors_point_at_the_line_a_record_starts_on() {
        let data = "id,name\ncam-1,\"two\nlines\"\ncam-2,x\n";
        let rows = csv_rows::<std::collections::HashMap<String, String>>(data.as_bytes())
            .expect("valid csv");
        let lines: Vec<u64> = rows.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [2, 4]);
        assert_eq!(csv_line("sources[1].lat", &lines), "line 4, lat");
        assert_eq!(csv_line("entries[0].plate", &lines), "line 2, plate");
        assert_eq!(csv_line("profile", &lines), "profile");
    }

    #[test]
    fn unknown_columns_are_refused() {
        let data = "id,colour\ncam-1,red\n";
        let mut reader = csv::ReaderBuilder::new().from_reader(data.as_bytes());
        let row: Result<SourceRow, _> = reader.deserialize().next().expect("a row");
        assert!(
            row.expect_err("unknown column")
                .to_string()
                .contains("colour")
        );
    }
}
