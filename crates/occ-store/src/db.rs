//! Connecting, creating the database and migrating it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::error::Result;

/// The migrations in `migrations/` at the top of the workspace, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How OCC reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// The longest any statement may run (none: the server's setting).
    pub statement_timeout: Option<Duration>,
    /// The longest a statement may wait for a lock (none: the server's setting).
    pub lock_timeout: Option<Duration>,
}

/// The connection options of `url`. Without an `sslmode` in the URL, PostgreSQL on this
/// machine is reached in plaintext (TLS on loopback protects nothing, and costs ingest more than
/// half its throughput, see the README), any other server with TLS when it offers it (libpq's
/// `prefer`); a URL's `sslmode` always wins.
pub fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)?;
    let names_sslmode = url::Url::parse(url).is_ok_and(|u| {
        u.query_pairs()
            .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
    });
    let host = options.get_host();
    let local = host.starts_with('/')
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(if local && !names_sslmode {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    })
}

/// A pool that connects lazily: OCC starts while PostgreSQL is still down and waits for it
/// instead of failing.
///
/// The server ends a transaction left idle for a minute (a client that vanished mid-batch),
/// so no lock on an incident outlives the OCC instance that took it; statements and lock waits
/// end at the configured bounds, so one slow query cannot hold a connection for long.
pub fn pool(config: &DbConfig) -> Result<PgPool> {
    let millis = |d: Duration| format!("{}ms", d.as_millis());
    let mut settings = vec![("idle_in_transaction_session_timeout", "60s".to_owned())];
    if let Some(d) = config.statement_timeout {
        settings.push(("statement_timeout", millis(d)));
    }
    if let Some(d) = config.lock_timeout {
        settings.push(("lock_timeout", millis(d)));
    }
    let options = connect_options(&config.url)?
        .application_name("occ")
        .options(settings);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(options))
}

/// A pool of its own with `template`'s settings and size, connecting lazily: what one ingest
/// slot commits on, so that its batches in flight each have a connection whatever the
/// instance's other slots are doing (a batch waits for the one before it to commit, and must
/// never wait on a connection a later batch holds).
pub fn pool_like(template: &PgPool) -> PgPool {
    template
        .options()
        .clone()
        .connect_lazy_with(template.connect_options().as_ref().clone())
}

/// Creates the database named in `url` if it does not exist yet, connecting to the server's
/// `postgres` database to do so (only then: a database that exists needs no access to any
/// other). Returns true when it created it.
pub async fn create_database_if_missing(url: &str) -> Result<bool> {
    let options = connect_options(url)?;
    match sqlx::PgConnection::connect_with(&options).await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(false);
        }
        // invalid_catalog_name: the database does not exist.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => return Err(e.into()),
    }
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    // Identifiers cannot be bound parameters; quote it as PostgreSQL's quote_ident does.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    match created {
        Ok(_) => Ok(true),
        // duplicate_database: another instance created it at the same moment.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Applies pending migrations. Safe to run from several instances at once: sqlx holds an
/// advisory lock while it migrates.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Follows whether PostgreSQL answers, on a connection of its own (a pool busy with ingest or
/// API calls must not look like an outage, nor hide one): a ping every `interval`, each
/// allowed `interval` to answer. Sends false after two pings in a row did not answer (one
/// slow answer is not an outage), true as soon as one does again. So an outage shows in
/// health within about three intervals, with or without traffic.
pub async fn watch_reachable(
    pool: PgPool,
    interval: Duration,
    reachable: tokio::sync::watch::Sender<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let options = pool.connect_options();
    let mut conn: Option<sqlx::PgConnection> = None;
    let mut failures = 0u32;
    loop {
        let ok = tokio::time::timeout(interval, async {
            if conn.is_none() {
                conn = Some(sqlx::PgConnection::connect_with(&options).await?);
            }
            match conn.as_mut() {
                Some(c) => c.ping().await,
                None => Ok(()),
            }
        })
        .await;
        let ok = match ok {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "database probe failed");
                false
            }
            Err(_) => false,
        };
        if ok {
            failures = 0;
        } else {
            // A connection that failed or hung is not trusted again.
            conn = None;
            failures += 1;
        }
        let answers = ok || failures < 2;
        reachable.send_if_modified(|r| std::mem::replace(r, answers) != answers);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}
