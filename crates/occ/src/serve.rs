//! `occ serve`: everything in one process — migrations, the live rule set, MQTT ingest and
//! the gRPC API — with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use occ_api::{ApiState, GrpcConfig};
use occ_domain::Limits;
use occ_ingest::{
    BatchConfig, IngestParts, IngestStats, IngestStatus, MqttConfig, SlotConfig, Slots,
    slot_client_ids,
};
use occ_store::health::{ActivityLog, Health};
use occ_store::{DbConfig, PgPool};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often health asks PostgreSQL whether it answers (and how long it waits).
const DATABASE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

use crate::config::{DatabaseArgs, ServeArgs, mask_url};

/// A running OCC.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub pool: PgPool,
    ingest_status: watch::Receiver<IngestStatus>,
    ingest_stats: Arc<IngestStats>,
    done: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Follows whether ingest is taking messages.
    pub fn ingest_status(&self) -> watch::Receiver<IngestStatus> {
        self.ingest_status.clone()
    }

    /// What ingest has committed so far.
    pub fn ingest_stats(&self) -> Arc<IngestStats> {
        self.ingest_stats.clone()
    }

    /// Waits until ingest is subscribed and the database reachable.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let mut status = self.ingest_status.clone();
        status
            .wait_for(IngestStatus::ready)
            .await
            .context("OCC stopped before it was ready")?;
        Ok(())
    }

    /// Waits until OCC has stopped (after its shutdown token is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("OCC's main task failed")?
    }
}

pub fn db_config(args: &DatabaseArgs) -> DbConfig {
    DbConfig {
        url: args.url.clone(),
        max_connections: args.max_connections,
        acquire_timeout: args.acquire_timeout.0,
        statement_timeout: Some(args.statement_timeout.0).filter(|d| !d.is_zero()),
        lock_timeout: Some(args.lock_timeout.0).filter(|d| !d.is_zero()),
    }
}

/// Creates the database if needed and migrates it, retrying while PostgreSQL is unreachable
/// (for at most `max_wait`, when given).
pub async fn prepare_database(
    args: &DatabaseArgs,
    max_wait: Option<Duration>,
    shutdown: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let mut backoff = Duration::from_millis(500);
    let give_up = max_wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        let attempt = async {
            if occ_store::create_database_if_missing(&args.url).await? {
                tracing::info!(url = %mask_url(&args.url), "database created");
            }
            // Migrations may run long on a large database: no statement bound for them.
            let migrating = occ_store::pool(&DbConfig {
                max_connections: 1,
                statement_timeout: None,
                lock_timeout: None,
                ..db_config(args)
            })?;
            occ_store::migrate(&migrating).await?;
            migrating.close().await;
            occ_store::pool(&db_config(args))
        };
        match attempt.await {
            Ok(pool) => return Ok(pool),
            Err(e)
                if e.is_unavailable()
                    && give_up.is_none_or(|t| tokio::time::Instant::now() < t) =>
            {
                tracing::warn!(error = %e, retry_in = ?backoff, "waiting for PostgreSQL");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => anyhow::bail!("stopped while waiting for PostgreSQL"),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e).context("cannot prepare the database"),
        }
    }
}

/// Runs `start` until it succeeds, waiting while PostgreSQL is unreachable.
async fn retry_unavailable<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    start: F,
) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = occ_store::Result<T>>,
{
    loop {
        match start().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "waiting for PostgreSQL to load {what}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => anyhow::bail!("stopped while loading {what}"),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot load {what}")),
        }
    }
}

/// How this instance appears in the ingest slot table: its host and process id.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}/{}", std::process::id())
}

/// How callers authenticate. Without `--insecure`, OCC needs a way in: on loopback it makes
/// an admin key when none exists (and says where it wrote it); elsewhere it refuses to start
/// until a key exists.
async fn prepare_auth(
    args: &ServeArgs,
    pool: &PgPool,
    addr: SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<occ_api::Authenticator>> {
    let jwt = match args.auth.jwt() {
        Some(jwt) if !args.auth.insecure => Some(
            occ_api::jwt::Jwt::start(jwt, shutdown.clone())
                .await
                .map_err(|e| anyhow::anyhow!("the identity provider's keys: {e}"))?,
        ),
        _ => None,
    };
    let config = occ_api::AuthConfig {
        insecure: args.auth.insecure,
        reflection: args.auth.reflection(),
        cache_for: args.auth.cache.0,
        jwt,
        rate_per_second: args.auth.rate_limit,
        rate_burst: args.auth.rate_burst,
        max_streams: args.auth.max_streams,
    };
    if config.insecure {
        tracing::warn!(
            %addr,
            "AUTHENTICATION IS OFF (--insecure): anyone who reaches this address may read every incident and change anything"
        );
        return Ok(occ_api::Authenticator::new(pool.clone(), config));
    }
    let census = retry_unavailable(shutdown, "the API keys", || async {
        let mut conn = occ_store::acquire(pool).await?;
        occ_store::keys::census(&mut conn).await
    })
    .await?;
    if !census.admin && (addr.ip().is_loopback() || args.auth.admin_key_file.is_some()) {
        let file = args
            .auth
            .admin_key_file
            .clone()
            .unwrap_or_else(crate::keys::default_admin_key_file);
        crate::keys::bootstrap_admin(pool, &file).await?;
        tracing::info!(
            file = %file.display(),
            "no admin key existed: made one (roles admin, supervisor; every queue) and wrote it to this file; send it as `authorization: Bearer <key>`"
        );
    } else if !census.any && config.jwt.is_none() {
        anyhow::bail!(
            "OCC listens on {addr}, beyond this machine, and neither an API key nor an identity provider \
             (--jwt-issuer) is configured, so nobody could use it: make a key with \
             `occ keys create --name admin --role admin` (its last line is the key), \
             or pass --insecure to serve without authentication"
        );
    }
    Ok(occ_api::Authenticator::new(pool.clone(), config))
}

/// The in-process simulator's key: admin and supervisor over every queue (it registers the
/// city and makes its consoles' keys). Each start replaces the last one.
async fn simulator_key(pool: &PgPool) -> occ_store::Result<String> {
    let mut tx = occ_store::begin(pool).await?;
    let key = occ_store::keys::NewKey {
        name: "simulator".into(),
        roles: occ_domain::access::Roles::from_iter([
            occ_domain::access::Role::Admin,
            occ_domain::access::Role::Supervisor,
        ]),
        queues: vec![occ_domain::access::EVERY_QUEUE.into()],
        replace: true,
        ..Default::default()
    };
    let (_, secret) =
        occ_store::keys::create(&mut tx, &key, "system:simulate", chrono::Utc::now()).await?;
    occ_store::commit(tx).await?;
    Ok(secret)
}

/// Starts OCC serving gRPC on `listener`. Returns once it is started; it runs until
/// `shutdown` is cancelled.
pub async fn start(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    anyhow::ensure!(
        !(args.simulate && args.auth.tls_cert.is_some()),
        "--simulate runs against a plaintext API; serve TLS without it (run `occ simulate` beside)"
    );
    // Checked before anything starts: a certificate that does not load stops the start.
    let tls = match args.auth.tls() {
        Some(tls) => Some(
            occ_api::tls::acceptor(&tls, shutdown.clone())
                .map_err(|e| anyhow::anyhow!("the API's TLS settings: {e}"))?,
        ),
        None => None,
    };
    let mqtt_tls = args.broker.tls()?;
    let partitioning = args.storage.partitioning()?;
    let hourly_counts_kept = partitioning.hourly_counts_kept;
    anyhow::ensure!(
        partitioning.key_window.to_std().unwrap_or_default() >= args.ingest.session_expiry.0,
        "--event-key-window {} is shorter than the broker session OCC asks for \
         (--mqtt-session-expiry {}): a redelivery could come after its key is forgotten",
        args.storage.key_window,
        args.ingest.session_expiry
    );
    anyhow::ensure!(
        args.ingest.batches_in_flight <= args.database.ingest_connections,
        "--batches-in-flight {} is more than the connections ingest has \
         (--database-ingest-connections {}): each committing batch needs one",
        args.ingest.batches_in_flight,
        args.database.ingest_connections
    );
    let cap = Arc::new(args.cap()?);
    crate::metrics::serve(&args.metrics_listen)?;
    let pool = if args.migrate {
        prepare_database(&args.database, None, &shutdown).await?
    } else {
        occ_store::pool(&db_config(&args.database))?
    };

    tokio::spawn(crate::metrics::watch_pool(pool.clone(), shutdown.clone()));
    let time_zone = args.storage.time_zone.clone();
    let changed = retry_unavailable(&shutdown, "the city's time zone", || async {
        let mut conn = occ_store::acquire(&pool).await?;
        occ_store::counts::set_time_zone(&mut conn, &time_zone).await
    })
    .await
    .context("--time-zone")?;
    if let Some(before) = changed {
        tracing::warn!(
            before,
            now = %time_zone,
            "the city's time zone changed: the wall's counts kept so far stay in {before}'s hours and days"
        );
    }
    let adapters =
        Arc::new(occ_adapters::build(&args.adapters.config()).context("the adapters' settings")?);
    let rules = retry_unavailable(&shutdown, "rules", || {
        occ_store::rules::live(pool.clone(), args.rules_refresh.0, shutdown.clone())
    })
    .await?;
    let registry = retry_unavailable(&shutdown, "the registry", || {
        occ_store::registry::live(pool.clone(), args.rules_refresh.0, shutdown.clone())
    })
    .await?;
    let activity = ActivityLog::default();
    let clock = occ_domain::SystemClock::shared();
    let auth = prepare_auth(&args, &pool, listener.local_addr()?, &shutdown).await?;
    let simulator_key = if args.simulate && !args.auth.insecure {
        Some(retry_unavailable(&shutdown, "the simulator's key", || simulator_key(&pool)).await?)
    } else {
        None
    };

    // Ingest has connections of its own: API load cannot starve it (nor mark it unhealthy).
    // Each slot the instance holds gets a pool of these settings (`occ_store::pool_like`).
    let ingest_pool = occ_store::pool(&DbConfig {
        max_connections: args.database.ingest_connections,
        lock_timeout: None,
        ..db_config(&args.database)
    })?;
    // Background work (the change feed, sweeps, source health, audit anchors) has connections
    // of its own too: a flood of API calls cannot stop escalations or the feed.
    let background_pool = occ_store::pool(&DbConfig {
        max_connections: 4,
        ..db_config(&args.database)
    })?;

    let limits = Limits {
        max_payload_bytes: args.ingest.max_payload_bytes,
        ..Limits::default()
    };
    if args.ingest.batch_size > u32::from(args.ingest.receive_maximum) {
        tracing::warn!(
            batch_size = args.ingest.batch_size,
            receive_maximum = args.ingest.receive_maximum,
            "batches cannot be larger than the MQTT receive maximum; they will close on the deadline"
        );
    }
    for a in adapters.iter() {
        tracing::info!(adapter = a.name(), topics = ?a.topic_filters(), "reading producer format");
    }
    let slots = slot_client_ids(&args.ingest.client_id, args.ingest.slots);
    // Several slots split the stream through a shared subscription; one reads it plainly.
    let share_group = match (args.ingest.share_group.as_str(), slots.len()) {
        ("", 1) => String::new(),
        ("", _) => args.ingest.client_id.clone(),
        (group, _) => group.to_owned(),
    };
    let cap_categories: Vec<String> = args
        .cap_publish
        .iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    for c in &cap_categories {
        occ_domain::Category::parse(c).map_err(|e| anyhow::anyhow!("--cap-publish: {e}"))?;
    }
    anyhow::ensure!(
        !args.cap_topic.is_empty() && !args.cap_topic.contains(['+', '#']),
        "--cap-topic {:?}: a topic without wildcards",
        args.cap_topic
    );
    let mqtt = MqttConfig {
        host: args.broker.host.clone(),
        port: args.broker.port,
        username: args.broker.username.clone(),
        password: args.broker.password.clone(),
        client_id: args.ingest.client_id.clone(),
        share_group,
        keep_alive: args.ingest.keep_alive.0,
        session_expiry: args.ingest.session_expiry.0,
        receive_maximum: args.ingest.receive_maximum,
        max_packet_size: args.ingest.max_packet_size,
        tls: mqtt_tls,
    };
    tracing::info!(
        broker = %format!("{}:{}", mqtt.host, mqtt.port),
        slots = ?slots,
        share_group = %mqtt.share_group,
        "starting MQTT ingest"
    );
    // Leases are renewed on a connection of their own: a busy API or ingest cannot make an
    // instance lose its slots.
    let lease_pool = occ_store::pool(&DbConfig {
        max_connections: 1,
        ..db_config(&args.database)
    })?;
    let ingest_stop = CancellationToken::new();
    let cap_broker = mqtt.clone();
    let ingest = Slots::start(
        mqtt,
        SlotConfig {
            client_ids: slots,
            lease: args.ingest.slot_lease.0,
            instance_name: instance_name(),
            grace: args.shutdown_grace.0,
        },
        IngestParts {
            batch: BatchConfig {
                size: args.ingest.batch_size as usize,
                deadline: args.ingest.batch_deadline.0,
                in_flight: args.ingest.batches_in_flight as usize,
                commit_timeout: args.database.commit_timeout.0,
            },
            limits: limits.clone(),
            adapters: adapters.clone(),
            pool: ingest_pool,
            rules: rules.clone(),
            registry: registry.clone(),
            activity: activity.clone(),
            clock: clock.clone(),
            source_rates: Arc::new(std::sync::Mutex::new(occ_domain::rate::SourceRates::new(
                args.ingest.source_rate,
                args.ingest.source_burst,
            ))),
        },
        lease_pool,
        ingest_stop.clone(),
    );
    let ingest_status = ingest.status();
    let ingest_stats = ingest.stats();

    // Readiness for the health service: ingest takes messages and PostgreSQL answers (probed
    // each second on a connection of its own, so an outage shows even without traffic).
    let (reachable_tx, mut reachable) = watch::channel(true);
    tokio::spawn(occ_store::db::watch_reachable(
        pool.clone(),
        DATABASE_PROBE_INTERVAL,
        reachable_tx,
        shutdown.clone(),
    ));
    let (ready_tx, ready_rx) = watch::channel(false);
    let mut follow = ingest.status();
    tokio::spawn(async move {
        loop {
            let ready = follow.borrow_and_update().ready() && *reachable.borrow_and_update();
            if ready_tx.send(ready).is_err() {
                break;
            }
            let gone = tokio::select! {
                changed = follow.changed() => changed.is_err(),
                changed = reachable.changed() => changed.is_err(),
            };
            if gone {
                let _ = ready_tx.send(false);
                break;
            }
        }
    });

    let grpc_addr = listener.local_addr()?;
    let grpc_stop = CancellationToken::new();
    let feed = occ_store::changes::Feed::start(background_pool.clone(), shutdown.clone())
        .await
        .context("cannot read the incident change log")?;
    tokio::spawn(crate::audit::anchor_periodically(
        background_pool.clone(),
        args.audit_anchor_interval.0,
        shutdown.clone(),
    ));
    tokio::spawn(crate::storage::maintain_periodically(
        background_pool.clone(),
        partitioning,
        args.storage.maintenance_interval.0,
        shutdown.clone(),
    ));
    tokio::spawn(crate::storage::compact_counts_periodically(
        background_pool.clone(),
        args.storage.count_compaction_interval.0,
        shutdown.clone(),
    ));
    tokio::spawn(occ_store::sweep::run(
        background_pool.clone(),
        args.sweep_interval.0,
        shutdown.clone(),
    ));
    if !cap_categories.is_empty() {
        tokio::spawn(crate::alerts::run(
            crate::alerts::CapPublishing {
                categories: cap_categories,
                topic: args.cap_topic.trim_end_matches('/').to_owned(),
                sender: cap.clone(),
                broker: cap_broker,
            },
            background_pool.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
    }
    // Source health stops after ingest, so its last flush has everything ingest heard.
    let health_stop = CancellationToken::new();
    let health = tokio::spawn(
        Health {
            pool: background_pool,
            log: activity.clone(),
            rules: rules.clone(),
            registry: registry.clone(),
            limits: limits.clone(),
        }
        .run(args.health_interval.0, health_stop.clone()),
    );
    let state = ApiState {
        pool: pool.clone(),
        rules,
        registry,
        limits,
        feed,
        activity,
        adapters,
        clock,
        auth,
        cap,
        hourly_counts_kept,
        search_grants: Arc::new(
            occ_domain::search::SearchGrants::parse(&args.search_grants)
                .map_err(|e| anyhow::anyhow!("--search-grants: {e}"))?,
        ),
        recorded_agencies: Arc::new(
            args.record_reads_of
                .iter()
                .filter(|a| !a.is_empty())
                .cloned()
                .collect(),
        ),
    };
    let grpc = tokio::spawn(occ_api::serve(
        listener,
        state,
        GrpcConfig {
            max_message_bytes: args.grpc_max_message_bytes,
            max_connections: args.grpc_max_connections as usize,
            request_timeout: args.grpc_request_timeout.0,
            tls,
            ..GrpcConfig::default()
        },
        ready_rx,
        grpc_stop.clone(),
    ));

    let simulator = args.simulate.then(|| {
        let simulator = crate::config::SimulatorArgs {
            // The operators work this instance, wherever it listens.
            grpc: format!("http://{grpc_addr}"),
            api_key: simulator_key.or_else(|| args.simulator.api_key.clone()),
            ..args.simulator.clone()
        };
        tokio::spawn(crate::simulate::run(
            args.broker.clone(),
            simulator,
            shutdown.clone(),
        ))
    });

    let grace = args.shutdown_grace.0;
    let done = tokio::spawn(async move {
        let mut grpc = grpc;
        let early = tokio::select! {
            () = shutdown.cancelled() => None,
            result = &mut grpc => Some(result),
        };
        if let Some(result) = &early {
            tracing::error!(result = ?result, "gRPC server stopped unexpectedly; shutting down");
        }
        tracing::info!("shutting down: no new messages; committing the batch in hand");
        ingest_stop.cancel();
        grpc_stop.cancel();
        shutdown.cancel();
        // Each slot waits up to `grace` for its batch in hand; then the slots are given up.
        if tokio::time::timeout(grace + Duration::from_secs(3), ingest.join())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "ingest did not stop in time; unacknowledged messages will be redelivered"
            );
        }
        health_stop.cancel();
        if tokio::time::timeout(grace, health).await.is_err() {
            tracing::warn!("source activity not written in time");
        }
        if early.is_none() {
            match tokio::time::timeout(grace, grpc).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
                Err(_) => tracing::warn!(
                    ?grace,
                    "gRPC calls still running at the end of the grace period"
                ),
            }
        }
        if let Some(sim) = simulator {
            let _ = sim.await;
        }
        tracing::info!("stopped");
        match early {
            Some(result) => anyhow::bail!("the gRPC server stopped unexpectedly: {result:?}"),
            None => Ok(()),
        }
    });

    Ok(Running {
        grpc_addr,
        pool,
        ingest_status,
        ingest_stats,
        done,
    })
}
