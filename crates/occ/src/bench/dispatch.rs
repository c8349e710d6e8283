//! The dispatch room under load: many stored incidents, operators claiming and dispatching
//! concurrently, and consoles listing incidents.
//!
//! Everything goes through OCC's gRPC API, as consoles use it: incidents are opened with
//! `PublishEvents`, units declared with `UpsertUnit`, then each operator (its own connection,
//! named in `x-occ-operator`) repeats `ClaimNext` on one shared queue and `DispatchUnits` with
//! a unit of its own. Once OCC has stopped, [`floor`] makes the same writes on the same
//! database straight in SQL, as few statements as they can be: the most PostgreSQL allows.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use occ_proto::v1 as pb;
use pb::dispatch_service_client::DispatchServiceClient;
use pb::incident_service_client::IncidentServiceClient;
use pb::ingest_service_client::IngestServiceClient;
use pb::unit_service_client::UnitServiceClient;
use tonic::transport::Channel;

use crate::operators::ask;

/// The queue the operators work (the panic buttons' and intrusions').
const QUEUE: &str = "police";
/// A queue nothing is routed to in the run: `ClaimNext` there is the empty call.
const EMPTY_QUEUE: &str = "municipal";
/// Events per `PublishEvents` call while seeding (the API's maximum).
const PUBLISH_BATCH: usize = 1000;
/// How deep a console pages one queue.
const MAX_DEPTH: usize = 20;
/// Concurrent publishers while seeding.
const PUBLISHERS: usize = 4;

/// What the stage measured.
#[derive(Debug)]
pub(super) struct Figures {
    pub incidents: usize,
    pub opened_per_s: f64,
    pub first_page: Latencies,
    pub depth: usize,
    pub deep_pages: Latencies,
    pub operators: usize,
    pub pairs: usize,
    pub pairs_per_s: f64,
    pub pair: Latencies,
    pub empty_calls_per_s: f64,
}

/// Latency percentiles of a set of calls.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latencies {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    pub(super) fn of(mut samples: Vec<Duration>) -> Latencies {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(i - 1).copied().unwrap_or_default()
        };
        Latencies {
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    pub(super) fn show(&self) -> String {
        format!(
            "p50 {} · p99 {} · max {}",
            millis(self.p50),
            millis(self.p99),
            millis(self.max)
        )
    }
}

pub(super) fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// Runs the stage against the OCC serving gRPC at `grpc` (an empty database).
pub(super) async fn run(
    grpc: &str,
    db: &sqlx::postgres::PgConnectOptions,
    incidents: usize,
    operators: usize,
    pairs_each: usize,
) -> anyhow::Result<Figures> {
    let endpoint = format!("http://{grpc}");
    let channel = Channel::from_shared(endpoint.clone())?.connect().await?;

    eprintln!("  opening {incidents} incidents …");
    let started = Instant::now();
    let opened = seed(&endpoint, incidents).await?;
    let opened_per_s = opened as f64 / started.elapsed().as_secs_f64();
    ensure!(
        opened == incidents,
        "{opened} incidents opened, expected {incidents}"
    );

    // As autovacuum would within a minute or so of such an import: planned on statistics
    // that know the incidents, not on an empty table's.
    analyze(db).await?;

    eprintln!("  ListIncidents …");
    // Half the incidents are the police's; paged no further than their last full page.
    let depth = (incidents / 2 / 100).saturating_sub(1).clamp(1, MAX_DEPTH);
    let (first_page, deep_pages) = list(IncidentServiceClient::new(channel.clone()), depth).await?;

    eprintln!("  declaring {} units …", operators * pairs_each);
    let units = declare_units(&endpoint, operators, pairs_each).await?;

    eprintln!("  empty ClaimNext …");
    let empty_calls_per_s = empty_claims(&endpoint, operators, Duration::from_secs(3)).await?;

    // A fifth of each operator's pairs warm up, untimed; then ANALYZE, as autovacuum would
    // once claims has grown: statements are planned on statistics that know claims (planned
    // on the empty table's, they would scan it for every claim).
    let mut units = units;
    let warm_up: Vec<Vec<String>> = units
        .iter_mut()
        .map(|u| u.split_off(u.len() - u.len() / 5))
        .collect();
    eprintln!("  warming up …");
    operators_at_work(&endpoint, warm_up).await?;
    analyze(db).await?;

    eprintln!("  {operators} operators claiming and dispatching …");
    let started = Instant::now();
    let samples = operators_at_work(&endpoint, units).await?;
    let took = started.elapsed();
    let pairs = samples.len();
    Ok(Figures {
        incidents,
        opened_per_s,
        first_page,
        depth,
        deep_pages,
        operators,
        pairs,
        pairs_per_s: pairs as f64 / took.as_secs_f64(),
        pair: Latencies::of(samples),
        empty_calls_per_s,
    })
}

async fn analyze(db: &sqlx::postgres::PgConnectOptions) -> anyhow::Result<()> {
    let mut conn = sqlx::ConnectOptions::connect(db).await?;
    sqlx::query("ANALYZE").execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    Ok(())
}

/// Operators, each with its units, claiming and dispatching concurrently; each pair's latency.
async fn operators_at_work(
    endpoint: &str,
    units: Vec<Vec<String>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut desks = Vec::new();
    for (op, units) in units.into_iter().enumerate() {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
        desks.push(tokio::spawn(operator(channel, op, units)));
    }
    let mut samples = Vec::new();
    for desk in desks {
        samples.extend(desk.await??);
    }
    Ok(samples)
}

/// The `n`th seeded event: every one opens an incident of its own, in four queues' worth of
/// kinds and two priorities.
fn seed_event(n: usize) -> pb::Event {
    let (source, kind, zone, confidence) = match n % 4 {
        0 => (
            format!("panic-{n}"),
            "panic.pressed",
            format!("stop_{n}"),
            None,
        ),
        1 => (
            format!("cam-{n}"),
            "object.person",
            format!("restricted_{n}"),
            Some(0.9),
        ),
        2 => (
            format!("smoke-{n}"),
            "smoke.detected",
            format!("block_{n}"),
            Some(0.9),
        ),
        _ => (
            format!("alarm-{n}"),
            "medical.fall",
            format!("home_{n}"),
            None,
        ),
    };
    pb::Event {
        source_id: source,
        external_id: format!("bench-{n}"),
        r#type: kind.into(),
        severity: pb::Severity::Major as i32,
        zone,
        location: Some(pb::GeoPoint {
            lat: 51.10 + (n % 1000) as f64 * 1e-4,
            lon: 71.40 + (n / 1000 % 1000) as f64 * 1e-4,
        }),
        confidence,
        ..Default::default()
    }
}

/// Opens `incidents` incidents; returns how many were opened.
async fn seed(endpoint: &str, incidents: usize) -> anyhow::Result<usize> {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
        tasks.push(tokio::spawn(async move {
            let mut client = IngestServiceClient::new(channel);
            let mut opened = 0;
            let mut start = p * PUBLISH_BATCH;
            while start < incidents {
                let events = (start..(start + PUBLISH_BATCH).min(incidents))
                    .map(seed_event)
                    .collect();
                let results = client
                    .publish_events(pb::PublishEventsRequest { events })
                    .await?
                    .into_inner()
                    .results;
                opened += results
                    .iter()
                    .flat_map(|r| &r.incidents)
                    .filter(|i| i.opened)
                    .count();
                start += PUBLISHERS * PUBLISH_BATCH;
            }
            anyhow::Ok(opened)
        }));
    }
    let mut opened = 0;
    for task in tasks {
        opened += task.await??;
    }
    Ok(opened)
}

/// A console's listings, one at a time: the first page of everything open (what a wall
/// display shows), then one queue paged `depth` pages of 100 deep.
async fn list(
    mut client: IncidentServiceClient<Channel>,
    depth: usize,
) -> anyhow::Result<(Latencies, Latencies)> {
    let mut first = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let page = client
            .list_incidents(pb::ListIncidentsRequest {
                page_size: 50,
                ..Default::default()
            })
            .await?
            .into_inner();
        first.push(t.elapsed());
        ensure!(page.incidents.len() == 50, "a short first page");
    }
    let mut deep = Vec::new();
    for _ in 0..15 {
        let mut token = String::new();
        for _ in 0..depth {
            let t = Instant::now();
            let page = client
                .list_incidents(pb::ListIncidentsRequest {
                    queue: QUEUE.into(),
                    page_size: 100,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            deep.push(t.elapsed());
            token = page.next_page_token;
            ensure!(!token.is_empty(), "paging ended early");
        }
    }
    Ok((Latencies::of(first), Latencies::of(deep)))
}

fn call_sign(op: usize, i: usize) -> String {
    format!("BENCH-{op}-{i}")
}

/// Declares `pairs_each` police units per operator; returns their ids, by operator.
async fn declare_units(
    endpoint: &str,
    operators: usize,
    pairs_each: usize,
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut tasks = Vec::new();
    for op in 0..operators {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
        tasks.push(tokio::spawn(async move {
            let mut client = UnitServiceClient::new(channel);
            let mut ids = Vec::with_capacity(pairs_each);
            for i in 0..pairs_each {
                let unit = client
                    .upsert_unit(pb::UpsertUnitRequest {
                        unit: Some(pb::Unit {
                            call_sign: call_sign(op, i),
                            agency: QUEUE.into(),
                            home_station: format!("bench-{op}"),
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner()
                    .unit
                    .context("UpsertUnit answered no unit")?;
                ids.push(unit.id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await??);
    }
    Ok(ids)
}

/// `ClaimNext` calls per second on a queue with nothing waiting, by the same operators: what
/// the API, its connections and the database cost without any work behind them.
async fn empty_claims(endpoint: &str, operators: usize, run: Duration) -> anyhow::Result<f64> {
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for op in 0..operators {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
        tasks.push(tokio::spawn(async move {
            let mut client = DispatchServiceClient::new(channel);
            let desk = format!("operator:bench-{op}");
            let mut calls = 0usize;
            while Instant::now() < until {
                let answer = client
                    .claim_next(ask(
                        &desk,
                        pb::ClaimNextRequest {
                            queue: EMPTY_QUEUE.into(),
                            lease: None,
                        },
                    ))
                    .await?
                    .into_inner();
                ensure!(answer.claim.is_none(), "the empty queue had an incident");
                calls += 1;
            }
            anyhow::Ok(calls)
        }));
    }
    let mut calls = 0;
    for task in tasks {
        calls += task.await??;
    }
    Ok(calls as f64 / run.as_secs_f64())
}

/// One operator: claims the next incident of the shared queue and dispatches one of its own
/// units to it, once per unit. Returns each pair's latency.
async fn operator(
    channel: Channel,
    op: usize,
    units: Vec<String>,
) -> anyhow::Result<Vec<Duration>> {
    let mut dispatch = DispatchServiceClient::new(channel);
    let desk = format!("operator:bench-{op}");
    let mut samples = Vec::with_capacity(units.len());
    for unit in units {
        let t = Instant::now();
        let answer = dispatch
            .claim_next(ask(
                &desk,
                pb::ClaimNextRequest {
                    queue: QUEUE.into(),
                    lease: None,
                },
            ))
            .await?
            .into_inner();
        let claim = answer.claim.context("the queue ran out of incidents")?;
        dispatch
            .dispatch_units(ask(
                &desk,
                pb::DispatchUnitsRequest {
                    claim_id: claim.id,
                    unit_ids: vec![unit],
                },
            ))
            .await?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL alone: the floor under ClaimNext + DispatchUnits

/// A claim's writes in one statement, as few as OCC's: the most urgent waiting incident of the
/// queue claimed, its claim, its audit entry (through the audit chain's trigger) and its
/// change-log entry. Returns the claim's id.
const FLOOR_CLAIM: &str = r#"
WITH next AS (
    SELECT id FROM incidents
     WHERE queue = $1 AND coalesce(status, '') = 'QUEUED' -- as ClaimNext says it
     ORDER BY priority, created_at, id
     LIMIT 1
       FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE incidents i
       SET status = 'CLAIMED', claim_deadline = NULL, updated_at = clock_timestamp()
      FROM next
     WHERE i.id = next.id
    RETURNING i.id, i.queue, i.updated_at
), claimed AS (
    INSERT INTO claims (id, incident_id, holder, claimed_at, lease_until)
    SELECT $3, id, $2, updated_at, updated_at + interval '5 minutes' FROM taken
    RETURNING id, incident_id, holder, claimed_at, lease_until
), audited AS (
    INSERT INTO audit_log (entity_type, entity_id, at, actor, action, before, after, detail)
    SELECT 'incident', incident_id, claimed_at, holder, 'incident.claimed',
           jsonb_build_object('status', 'QUEUED'),
           jsonb_build_object('status', 'CLAIMED', 'holder', holder, 'lease_until', lease_until),
           'claim ' || id
      FROM claimed
), logged AS (
    INSERT INTO incident_changes (incident_id, queues, kind, at, actor, detail)
    SELECT id, ARRAY[queue], 'claimed', updated_at, $2, '' FROM taken
)
SELECT id FROM claimed
"#;

/// A dispatch's writes in one statement: the claim ended, the incident dispatched, the unit
/// assigned, their audit entries and the change-log entry. Returns the units dispatched.
const FLOOR_DISPATCH: &str = r#"
WITH ended AS (
    UPDATE claims SET ended_at = clock_timestamp(), end_reason = 'dispatched'
     WHERE id = $1 AND ended_at IS NULL
    RETURNING incident_id, ended_at
), incident AS (
    UPDATE incidents i SET status = 'DISPATCHED', updated_at = e.ended_at
      FROM ended e
     WHERE i.id = e.incident_id
    RETURNING i.id, i.queue, i.updated_at
), unit AS (
    UPDATE units u SET status = 'DISPATCHED', incident_id = i.id, updated_at = i.updated_at
      FROM incident i
     WHERE u.id = $2 AND u.status = 'AVAILABLE'
    RETURNING u.id, u.call_sign, u.updated_at
), audited AS (
    INSERT INTO audit_log (entity_type, entity_id, at, actor, action, before, after, detail)
    SELECT 'unit', id, updated_at, $3, 'unit.status_changed',
           jsonb_build_object('status', 'AVAILABLE'),
           jsonb_build_object('status', 'DISPATCHED'), 'dispatched'
      FROM unit
    UNION ALL
    SELECT 'incident', i.id, i.updated_at, $3, 'incident.dispatched',
           jsonb_build_object('status', 'CLAIMED'),
           jsonb_build_object('status', 'DISPATCHED', 'units', jsonb_build_array(u.call_sign)),
           u.call_sign
      FROM incident i, unit u
), logged AS (
    INSERT INTO incident_changes (incident_id, queues, kind, at, actor, detail)
    SELECT i.id, ARRAY[i.queue], 'dispatched', i.updated_at, $3, u.call_sign
      FROM incident i, unit u
)
SELECT count(*) FROM unit
"#;

/// The same writes as the operators' pairs, on the same database once OCC has stopped, with no
/// API, no pool and no decision in between: each pair two statements on a connection of its
/// own, `operators` connections at once, the first fifth of each one's pairs untimed. Pairs a
/// second: what PostgreSQL on this machine allows OCC's schema at best.
pub(super) async fn floor(
    db: &sqlx::postgres::PgConnectOptions,
    operators: usize,
    pairs_each: usize,
) -> anyhow::Result<f64> {
    let mut conn = sqlx::ConnectOptions::connect(db).await?;
    // Units of their own, each with its chain head, as OCC's were declared.
    sqlx::query(
        "WITH declared AS (
             INSERT INTO units (id, call_sign, agency, home_station, status, created_at,
                                updated_at)
             SELECT gen_random_uuid(), 'FLOOR-' || op || '-' || i, $1, 'floor-' || op,
                    'AVAILABLE', now(), now()
               FROM generate_series(0, $2 - 1) op, generate_series(0, $3 - 1) i
             RETURNING id
         )
         INSERT INTO audit_log (entity_type, entity_id, at, actor, action, detail)
         SELECT 'unit', id, now(), 'bench', 'unit.created', '' FROM declared",
    )
    .bind(QUEUE)
    .bind(operators as i32)
    .bind(pairs_each as i32)
    .execute(&mut conn)
    .await?;
    sqlx::query("ANALYZE units").execute(&mut conn).await?;

    let mut units = Vec::with_capacity(operators);
    for op in 0..operators {
        let mine: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM units WHERE call_sign LIKE 'FLOOR-' || $1 || '-%' ORDER BY id",
        )
        .bind(op.to_string())
        .fetch_all(&mut conn)
        .await?;
        ensure!(
            mine.len() == pairs_each,
            "the floor's units were not declared"
        );
        units.push(mine);
    }
    sqlx::Connection::close(conn).await?;
    let warm_up: Vec<Vec<uuid::Uuid>> = units
        .iter_mut()
        .map(|u| u.split_off(u.len() - u.len() / 5))
        .collect();
    floor_pairs(db, warm_up).await?;
    // Analysed as OCC's run was after its warm-up.
    analyze(db).await?;
    let started = Instant::now();
    let pairs = floor_pairs(db, units).await?;
    Ok(pairs as f64 / started.elapsed().as_secs_f64())
}

/// Each operator's pairs on a connection of its own, all at once; how many pairs were made.
async fn floor_pairs(
    db: &sqlx::postgres::PgConnectOptions,
    units: Vec<Vec<uuid::Uuid>>,
) -> anyhow::Result<usize> {
    let mut desks = Vec::new();
    for (op, units) in units.into_iter().enumerate() {
        let mut conn = sqlx::ConnectOptions::connect(db).await?;
        desks.push(tokio::spawn(async move {
            let holder = format!("operator:floor-{op}");
            let pairs = units.len();
            for unit in units {
                let claim: uuid::Uuid = sqlx::query_scalar(FLOOR_CLAIM)
                    .bind(QUEUE)
                    .bind(&holder)
                    .bind(uuid::Uuid::now_v7())
                    .fetch_optional(&mut conn)
                    .await?
                    .context("the queue ran out of incidents")?;
                let dispatched: i64 = sqlx::query_scalar(FLOOR_DISPATCH)
                    .bind(claim)
                    .bind(unit)
                    .bind(&holder)
                    .fetch_one(&mut conn)
                    .await?;
                ensure!(dispatched == 1, "a floor dispatch wrote nothing");
            }
            sqlx::Connection::close(conn).await?;
            anyhow::Ok(pairs)
        }));
    }
    let mut pairs = 0;
    for desk in desks {
        pairs += desk.await??;
    }
    Ok(pairs)
}
