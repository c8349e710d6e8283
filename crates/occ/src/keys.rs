//! `occ keys`: API keys made, listed and revoked on the database directly (for whoever runs
//! OCC; administrators can do the same over gRPC with `KeyService`), and the admin key OCC
//! makes for itself on a developer's machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use occ_domain::access::Roles;
use occ_store::PgPool;
use occ_store::keys::{self, KeyInfo, NewKey};

use crate::config::{DatabaseArgs, Span};

/// Who `occ keys` acts as in audit entries.
const CLI_ACTOR: &str = "system:occ-keys";

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Makes a key and prints it once, as the last line of output. Only its hash is kept.
    Create(CreateArgs),
    /// Lists keys (never their secrets): name, prefix, roles, scope, expiry, last use.
    List {
        /// Revoked keys too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revokes a key (by name, id or prefix). Every instance refuses it within seconds.
    Revoke {
        key: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

impl KeysCommand {
    pub fn database(&self) -> &DatabaseArgs {
        match self {
            KeysCommand::Create(args) => &args.database,
            KeysCommand::List { database, .. } | KeysCommand::Revoke { database, .. } => database,
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique among active keys: the caller is `key:<name>` in audit entries and claims.
    #[arg(long)]
    name: String,
    /// gateway, dispatcher, supervisor, integration or admin (repeat, or separate by commas).
    #[arg(long = "role", required = true, value_delimiter = ',')]
    roles: Vec<String>,
    /// Queues whose incidents it sees; `*` for all.
    #[arg(long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Agencies whose queues and units it works.
    #[arg(long, value_delimiter = ',')]
    agencies: Vec<String>,
    /// For a gateway: the sources it may publish for (globs like `esil-*`); none for any.
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// For an integration: it may change its incidents' status.
    #[arg(long)]
    may_update_status: bool,
    /// It stops working after this long (`90d`); default never.
    #[arg(long)]
    expires_in: Option<Span>,
    /// Revoke an active key of the same name first (rotation).
    #[arg(long)]
    replace: bool,
    /// Let client certificates (from the API's `--grpc-tls-client-ca`) with this subject common
    /// name call with this key's rights, as `cert:<subject>`.
    #[arg(long)]
    certificate_subject: Option<String>,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(command: KeysCommand, pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = occ_store::begin(pool).await?;
    let now = Utc::now();
    let mut out = std::io::stdout().lock();
    match command {
        KeysCommand::Create(args) => {
            let roles = Roles::parse(&args.roles).map_err(anyhow::Error::msg)?;
            let expires_at = args
                .expires_in
                .map(|d| chrono::TimeDelta::from_std(d.0).map(|d| now + d))
                .transpose()
                .context("--expires-in is too long")?;
            let key = NewKey {
                name: args.name,
                roles,
                queues: args.queues,
                agencies: args.agencies,
                sources: args.sources,
                may_update_status: args.may_update_status,
                expires_at,
                replace: args.replace,
                certificate_subject: args.certificate_subject,
            };
            let (info, secret) = keys::create(&mut tx, &key, CLI_ACTOR, now)
                .await
                .map_err(describe)?;
            occ_store::commit(tx).await?;
            writeln!(out, "{}", line(&info))?;
            writeln!(
                out,
                "The key follows, shown this once (send it as `authorization: Bearer <key>`):"
            )?;
            writeln!(out, "{secret}")?;
        }
        KeysCommand::List { all, .. } => {
            let keys = keys::list(&mut tx, all).await?;
            for k in &keys {
                writeln!(out, "{}", line(k))?;
            }
            if keys.is_empty() {
                writeln!(out, "no keys")?;
            }
        }
        KeysCommand::Revoke { key, .. } => {
            let info = keys::revoke(&mut tx, &key, CLI_ACTOR, now)
                .await
                .map_err(describe)?;
            occ_store::commit(tx).await?;
            writeln!(out, "revoked {}", line(&info))?;
        }
    }
    Ok(())
}

fn describe(e: occ_store::StoreError) -> anyhow::Error {
    match e {
        occ_store::StoreError::Invalid(errors) => anyhow::anyhow!("{errors}"),
        other => other.into(),
    }
}

fn line(k: &KeyInfo) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".into()
        } else {
            v.join(",")
        }
    };
    let time = |t: Option<chrono::DateTime<Utc>>| {
        t.map_or_else(
            || "-".into(),
            |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
    };
    format!(
        "{name:24} {prefix}… roles={roles} queues={queues} agencies={agencies} sources={sources}{status} expires={expires} last_used={used}{revoked}",
        name = k.name,
        prefix = k.prefix,
        roles = k.roles,
        queues = list(&k.queues),
        agencies = list(&k.agencies),
        sources = list(&k.sources),
        status = if k.may_update_status {
            " may_update_status"
        } else {
            ""
        },
        expires = time(k.expires_at),
        used = time(k.last_used_at),
        revoked = k
            .revoked_at
            .map(|t| format!(" REVOKED {}", t.format("%Y-%m-%dT%H:%M:%SZ")))
            .unwrap_or_default(),
    )
}

/// Where OCC keeps the admin key it makes on a developer's machine, unless told otherwise:
/// `$XDG_CONFIG_HOME/occ/admin-key`, or `~/.config/occ/admin-key`.
pub fn default_admin_key_file() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("occ")
        .join("admin-key")
}

/// Makes a key with full rights for a loopback-only OCC that has no admin key, and writes it
/// to `file` (readable by its owner only).
pub async fn bootstrap_admin(pool: &PgPool, file: &Path) -> anyhow::Result<()> {
    let mut tx = occ_store::begin(pool).await?;
    let key = NewKey {
        name: "admin".into(),
        roles: Roles::parse(&["admin", "supervisor"]).map_err(anyhow::Error::msg)?,
        queues: vec![occ_domain::access::EVERY_QUEUE.into()],
        replace: true,
        ..NewKey::default()
    };
    let (_, secret) = keys::create(&mut tx, &key, "system:bootstrap", Utc::now()).await?;
    write_secret(file, &secret)?;
    occ_store::commit(tx).await?;
    Ok(())
}

fn write_secret(file: &Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot write the admin key to {}", file.display()))?;
    // An older file keeps its mode through `open`: set it.
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{secret}")?;
    Ok(())
}
