//! The clock-driven sweeps and the claim queue under concurrency, against the real PostgreSQL:
//! however many transactions race, each expiry and each escalation happens exactly once.

use chrono::Utc;
use occ_domain::{Enriched, Event, EventInput, IncidentId, Limits, Priority, RuleSet, SourceId};
use occ_store::changes::{self, Change, ChangeKind, Position};
use occ_store::ingest::{Batch, commit_batch};
use occ_store::{Transport, dispatch, incidents, rules, sweep};
use sqlx::{PgConnection, PgPool};

fn lease(seconds: i64) -> occ_domain::claim::Lease {
    occ_domain::claim::Lease::new(chrono::TimeDelta::seconds(seconds)).expect("a lease")
}

fn air(zone: usize, severity: &str) -> Event {
    let input = EventInput {
        id: Some(format!("{zone}-{severity}")),
        event_type: Some("air.quality".into()),
        severity: Some(severity.into()),
        zone: Some(format!("zone_{zone}")),
        measurements: [("pm2_5".to_owned(), 90.0)].into(),
        ..EventInput::default()
    };
    Event::parse(
        SourceId::parse(&format!("aq-{zone}")).expect("valid source"),
        input,
        b"",
        Utc::now(),
        &Limits::default(),
    )
    .expect("valid event")
}

async fn open_air_incidents(pool: &PgPool, n: usize) {
    let mut conn = pool.acquire().await.expect("connection");
    let rules = RuleSet::new(rules::list(&mut conn).await.expect("rules"));
    let events: Vec<Enriched> = (0..n).map(|z| Enriched::plain(air(z, "minor"))).collect();
    let outcome = commit_batch(pool, Batch::new(&events, Transport::Grpc, &[]), &rules)
        .await
        .expect("commit");
    assert_eq!(outcome.incidents_opened, n);
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Runs `sweep` from many tasks at once until none finds work; returns the total done.
async fn race<F, Fut>(pool: &PgPool, sweep: F) -> usize
where
    F: Fn(PgPool) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = occ_store::Result<usize>> + Send,
{
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let pool = pool.clone();
        let sweep = sweep.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                match sweep(pool.clone()).await {
                    Ok(0) => return done,
                    Ok(n) => done += n,
                    Err(occ_store::StoreError::Unavailable(_)) => {}
                    Err(e) => panic!("sweep failed: {e}"),
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn twenty_sweepers_escalate_each_overdue_incident_once(pool: PgPool) {
    open_air_incidents(&pool, 200).await;
    sqlx::query("UPDATE incidents SET claim_deadline = now() - interval '1 second'")
        .execute(&pool)
        .await
        .expect("overdue");

    let escalated = race(&pool, |pool| async move {
        sweep::escalate_overdue(&pool, 7).await
    })
    .await;
    assert_eq!(escalated, 200);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM audit_log WHERE action = 'incident.escalated'"
        )
        .await,
        200
    );
    // P3 air-quality incidents, raised once: all P2 now, none P1.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM incidents WHERE priority = 2 AND escalated_at IS NOT NULL"
        )
        .await,
        200
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM incidents WHERE claim_deadline IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM incident_changes WHERE kind = 'escalated'"
        )
        .await,
        200
    );
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn twenty_sweepers_expire_each_lapsed_claim_once(pool: PgPool) {
    open_air_incidents(&pool, 100).await;
    let mut tx = pool.begin().await.expect("tx");
    for _ in 0..100 {
        dispatch::claim_next(&mut tx, "environment", "operator:test", lease(60))
            .await
            .expect("claim")
            .expect("an incident");
    }
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE claims SET lease_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .expect("lapsed");

    let expired = race(
        &pool,
        |pool| async move { sweep::expire_claims(&pool, 7).await },
    )
    .await;
    assert_eq!(expired, 100);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM claims WHERE end_reason = 'expired'"
        )
        .await,
        100
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM audit_log WHERE action = 'incident.claim_expired'"
        )
        .await,
        100
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM incidents WHERE status = 'QUEUED' AND claim_deadline IS NOT NULL"
        )
        .await,
        100
    );
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn an_extended_lease_is_not_expired(pool: PgPool) {
    open_air_incidents(&pool, 1).await;
    let mut tx = pool.begin().await.expect("tx");
    let incident = dispatch::claim_next(&mut tx, "environment", "operator:a", lease(1))
        .await
        .expect("claim")
        .expect("an incident");
    tx.commit().await.expect("commit");
    let claim = incident.claim.expect("claim").id;
    let mut tx = pool.begin().await.expect("tx");
    dispatch::extend(&mut tx, claim, "operator:a", lease(60))
        .await
        .expect("extend");
    tx.commit().await.expect("commit");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(sweep::expire_claims(&pool, 10).await.expect("sweep"), 0);
    let mut conn = pool.acquire().await.expect("connection");
    let still = incidents::get(&mut conn, incident.id)
        .await
        .expect("incident");
    assert_eq!(still.claim.map(|c| c.holder).as_deref(), Some("operator:a"));
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_priority_raised_by_events_brings_the_claim_deadline_forward(pool: PgPool) {
    open_air_incidents(&pool, 1).await;
    let mut conn = pool.acquire().await.expect("connection");
    let before = incidents::list(&mut conn, &Default::default(), None, 1)
        .await
        .expect("list")
        .remove(0);
    assert_eq!(before.priority, Priority::P3);
    let rules = RuleSet::new(rules::list(&mut conn).await.expect("rules"));
    commit_batch(
        &pool,
        Batch::new(&[Enriched::plain(air(0, "critical"))], Transport::Grpc, &[]),
        &rules,
    )
    .await
    .expect("commit");
    let after = incidents::get(&mut conn, before.id)
        .await
        .expect("incident");
    assert_eq!(after.priority, Priority::P2);
    let deadline = after.claim_deadline.expect("still waiting");
    assert!(
        deadline < before.claim_deadline.expect("waiting") - chrono::TimeDelta::minutes(5),
        "a P2 must be claimed within 3 minutes, not the P3's 10: {deadline} vs {:?}",
        before.claim_deadline
    );
    assert_eq!(after.claim_within, Priority::P2.default_claim_within());
}

fn note(incident: IncidentId, detail: &str) -> Change {
    Change {
        incident,
        queues: vec!["environment".into()],
        kind: ChangeKind::NoteAdded,
        actor: "operator:test".into(),
        detail: detail.into(),
    }
}

async fn read_details(position: &mut Position, conn: &mut PgConnection) -> Vec<String> {
    position
        .read(conn)
        .await
        .expect("read the change log")
        .into_iter()
        .map(|c| c.detail)
        .collect()
}

/// Writers of the change log share no lock, so transactions commit in another order than they
/// began: a reader still reads every change once, and one incident's changes in the order they
/// committed.
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn the_change_log_reads_every_change_once_each_incident_in_commit_order(pool: PgPool) {
    open_air_incidents(&pool, 2).await;
    let ids: Vec<IncidentId> = sqlx::query_scalar("SELECT id FROM incidents ORDER BY zone")
        .fetch_all(&pool)
        .await
        .expect("incidents")
        .into_iter()
        .map(IncidentId)
        .collect();
    let mut reader = pool.acquire().await.expect("connection");
    let mut position = Position::now(&mut reader).await.expect("position");
    let now = Utc::now();

    // An older transaction has appended a change to incident 1 (its sequence number comes
    // first); a newer one changes incident 0 and commits before it.
    let mut older = pool.begin().await.expect("begin");
    dispatch::lock(&mut older, ids[1]).await.expect("lock");
    changes::append(&mut older, &[note(ids[1], "older")], now)
        .await
        .expect("append");
    let mut newer = pool.begin().await.expect("begin");
    dispatch::lock(&mut newer, ids[0]).await.expect("lock");
    changes::append(&mut newer, &[note(ids[0], "newer")], now)
        .await
        .expect("append");
    newer.commit().await.expect("commit");
    assert_eq!(read_details(&mut position, &mut reader).await, ["newer"]);

    // The older one commits later: its change is read then, once.
    older.commit().await.expect("commit");
    assert_eq!(read_details(&mut position, &mut reader).await, ["older"]);
    assert!(read_details(&mut position, &mut reader).await.is_empty());

    // One incident: the transaction that began first waits for the other's lock on it and
    // commits second; its change is read second.
    let mut first_begun = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *first_begun)
        .await
        .expect("first takes its id");
    let mut first_locked = pool.begin().await.expect("begin");
    dispatch::lock(&mut first_locked, ids[0])
        .await
        .expect("lock");
    let contested = ids[0];
    let waiting = tokio::spawn(async move {
        dispatch::lock(&mut first_begun, contested)
            .await
            .expect("lock");
        changes::append(
            &mut first_begun,
            &[note(contested, "committed second")],
            now,
        )
        .await
        .expect("append");
        first_begun.commit().await.expect("commit");
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    changes::append(&mut first_locked, &[note(ids[0], "committed first")], now)
        .await
        .expect("append");
    first_locked.commit().await.expect("commit");
    waiting.await.expect("the waiting writer");
    assert_eq!(
        read_details(&mut position, &mut reader).await,
        ["committed first", "committed second"]
    );
}

/// The incidents read (through any index) by the transaction so far.
async fn incidents_read(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0)
           FROM pg_stat_xact_user_tables WHERE relname = 'incidents'",
    )
    .fetch_one(conn)
    .await
    .expect("statistics")
}

/// A backlog is worked from its head: the incidents claimed and dispatched first are the most
/// urgent and oldest, so a claim that walked the queue's incidents in queue order (rather than
/// its waiting ones) would read them all again, each time. PostgreSQL picks the walk by its
/// statistics, which here (as after a storm) were taken while every incident was waiting.
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_claim_reads_the_waiting_incidents_not_those_already_dispatched(pool: PgPool) {
    // The statistics stay those of the backlog, whatever autovacuum would make of the changes.
    sqlx::query("ALTER TABLE incidents SET (autovacuum_enabled = off)")
        .execute(&pool)
        .await
        .expect("autovacuum off");
    sqlx::query(
        "INSERT INTO incidents (id, number, category, queue, priority, status, title,
                                correlation_key, rule_name, first_seen, last_seen, event_count,
                                created_at, updated_at, claim_deadline)
         SELECT gen_random_uuid(), 'INC-' || n, 'security',
                (ARRAY['police', 'police', 'fire', 'ems'])[n % 4 + 1], 1 + n % 4 / 3, 'QUEUED',
                'backlog ' || n, 'backlog-' || n, 'r', now(), now(), 1,
                now() - make_interval(secs => 20000 - n), now(), now() + interval '5 minutes'
           FROM generate_series(1, 20000) n",
    )
    .execute(&pool)
    .await
    .expect("a backlog");
    sqlx::query("ANALYZE incidents")
        .execute(&pool)
        .await
        .expect("analyze");
    // The head of the police queue worked off: 3,000 dispatched.
    sqlx::query(
        "WITH head AS (SELECT id FROM incidents WHERE queue = 'police'
                        ORDER BY priority, created_at, id LIMIT 3000)
         UPDATE incidents i SET status = 'DISPATCHED', claim_deadline = NULL
           FROM head WHERE i.id = head.id",
    )
    .execute(&pool)
    .await
    .expect("dispatch the head");
    sqlx::query("VACUUM incidents")
        .execute(&pool)
        .await
        .expect("vacuum");

    for plans in ["force_generic_plan", "force_custom_plan"] {
        let mut conn = pool.acquire().await.expect("connection");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET plan_cache_mode = {plans}"
        )))
        .execute(&mut *conn)
        .await
        .expect("plan cache mode");
        let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("begin");
        let before = incidents_read(&mut tx).await;
        let claimed = dispatch::claim_next(&mut tx, "police", "operator:a", lease(60))
            .await
            .expect("claim")
            .expect("a waiting incident");
        let read = incidents_read(&mut tx).await - before;
        assert_eq!(
            claimed.number.to_string(),
            "INC-6001",
            "{plans}: the most urgent, oldest waiting"
        );
        assert!(
            read < 50,
            "{plans}: claiming one incident read {read} incidents (3,000 dispatched ahead of it)"
        );
        tx.rollback().await.expect("rollback");
    }
}
