//! Store tests against the real PostgreSQL: each test gets a fresh, migrated database.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use occ_domain::{
    Delivery, Enriched, Event, EventInput, IncidentStatus, Limits, LocationInput, Priority,
    RuleInput, RuleSet, SourceId,
};
use occ_store::dead_letters::{self, DeadLetter};
use occ_store::incidents::{self, IncidentCursor, IncidentFilter};
use occ_store::ingest::{Batch, EventOutcome, commit_batch};
use occ_store::rules;
use occ_store::timeline::{self, TimelineEntry};
use occ_store::{StoreError, Transport};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The tests' reference time: an hour ago, to the second (event times must be within a day
/// of receipt to be taken as when the events happened).
fn t0() -> DateTime<Utc> {
    static T0: std::sync::OnceLock<DateTime<Utc>> = std::sync::OnceLock::new();
    *T0.get_or_init(|| {
        let t = Utc::now() - TimeDelta::hours(1);
        Utc.timestamp_opt(t.timestamp(), 0)
            .single()
            .expect("valid time")
    })
}

fn event(source: &str, id: &str, f: impl FnOnce(&mut EventInput)) -> Event {
    let mut input = EventInput {
        id: Some(id.into()),
        event_type: Some("smoke.detected".into()),
        severity: Some("major".into()),
        occurred_at: Some(t0().to_rfc3339()),
        zone: Some("left_bank_residential_4".into()),
        location: Some(LocationInput {
            lat: 51.128207,
            lon: 71.430411,
        }),
        confidence: Some(0.97),
        ..EventInput::default()
    };
    f(&mut input);
    Event::parse(
        SourceId::parse(source).expect("valid source"),
        input,
        id.as_bytes(),
        Utc::now(),
        &Limits::default(),
    )
    .expect("valid event")
}

fn at(minutes: i64) -> impl FnOnce(&mut EventInput) {
    move |e| e.occurred_at = Some((t0() + TimeDelta::minutes(minutes)).to_rfc3339())
}

async fn default_rules(pool: &PgPool) -> RuleSet {
    let mut conn = pool.acquire().await.expect("connection");
    RuleSet::new(rules::list(&mut conn).await.expect("rules"))
}

async fn commit(pool: &PgPool, events: &[Event]) -> occ_store::ingest::BatchOutcome {
    let rules = default_rules(pool).await;
    let events: Vec<Enriched> = events.iter().cloned().map(Enriched::plain).collect();
    commit_batch(pool, Batch::new(&events, Transport::Mqtt, &[]), &rules)
        .await
        .expect("batch commits")
}

async fn all_incidents(pool: &PgPool) -> Vec<occ_domain::Incident> {
    let mut conn = pool.acquire().await.expect("connection");
    incidents::list(&mut conn, &IncidentFilter::default(), None, 1000)
        .await
        .expect("list")
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn the_default_rules_are_seeded_and_valid(pool: PgPool) {
    let rules = default_rules(&pool).await;
    let names: Vec<_> = rules.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "air-quality-pm25",
            "fire-smoke",
            "flood-water-level",
            "gas-leak",
            "gunshot",
            "low-battery",
            "medical-alarm",
            "panic-button",
            "restricted-intrusion",
            "source-offline",
            "watchlisted-plate"
        ]
    );
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_matching_event_opens_a_queued_incident_with_its_audit_entry(pool: PgPool) {
    let outcome = commit(&pool, &[event("det-1", "a", |_| {})]).await;
    assert_eq!(outcome.incidents_opened, 1);
    let EventOutcome::Accepted {
        incidents: links, ..
    } = &outcome.events[0]
    else {
        panic!("event accepted");
    };
    assert!(links[0].opened);

    let mut conn = pool.acquire().await.expect("connection");
    let inc = incidents::get(&mut conn, links[0].id)
        .await
        .expect("incident");
    assert_eq!(inc.status, IncidentStatus::Queued);
    assert_eq!(inc.queue.as_str(), "fire");
    assert_eq!(inc.priority, Priority::P1);
    assert_eq!(
        inc.title,
        "Smoke or fire detected in left_bank_residential_4"
    );
    assert_eq!(inc.event_count, 1);
    assert!(inc.number.as_str().starts_with("INC-"), "{}", inc.number);
    assert_eq!(
        incidents::get_by_number(&mut conn, inc.number.as_str())
            .await
            .expect("by number")
            .id,
        inc.id
    );

    let tl = timeline::page(&mut conn, inc.id, None, 100)
        .await
        .expect("timeline");
    assert!(matches!(&tl[0], TimelineEntry::Event(e) if e.external_id.as_deref() == Some("a")));
    assert!(matches!(&tl[1], TimelineEntry::Audit(a) if a.action == "incident.opened"));
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_redelivered_event_changes_nothing(pool: PgPool) {
    let first = commit(&pool, &[event("det-1", "a", |_| {})]).await;
    let EventOutcome::Accepted { event_id, .. } = first.events[0] else {
        panic!("accepted");
    };
    // The same message again, in the next batch and twice within one batch.
    let again = commit(
        &pool,
        &[event("det-1", "a", |_| {}), event("det-1", "a", |_| {})],
    )
    .await;
    assert_eq!(
        again.events,
        [
            EventOutcome::Duplicate {
                existing: Some(event_id)
            },
            EventOutcome::Duplicate {
                existing: Some(event_id)
            }
        ]
    );
    let mut conn = pool.acquire().await.expect("connection");
    assert_eq!(
        occ_store::events::count_for_source(&mut conn, "det-1")
            .await
            .expect("count"),
        1
    );
    let incidents = all_incidents(&pool).await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].event_count, 1);
}

/// A panic button without ids: the same bytes over MQTT, delivered as `packet_id` of OCC's
/// session, `redelivered` when the broker sends it again after a lost connection.
fn press(packet_id: u16, redelivered: bool) -> Event {
    let bytes = br#"{"type": "panic.pressed", "zone": "esil_transit_stop_1"}"#;
    let mut e = Event::parse(
        SourceId::parse("panic-1").expect("valid source"),
        EventInput {
            event_type: Some("panic.pressed".into()),
            zone: Some("esil_transit_stop_1".into()),
            ..EventInput::default()
        },
        bytes,
        Utc::now(),
        &Limits::default(),
    )
    .expect("valid event");
    e.idempotency_key = e.idempotency_key.scoped(&Delivery::Mqtt {
        session: "occ-a",
        packet_id,
        redelivered,
    });
    e
}

fn accepted(outcome: &EventOutcome) -> bool {
    matches!(outcome, EventOutcome::Accepted { .. })
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn without_ids_a_repeat_is_a_new_event_and_only_a_redelivery_is_a_duplicate(pool: PgPool) {
    // Pressed, committed; its ack was lost with the connection: the broker redelivers it.
    let first = commit(&pool, &[press(7, false)]).await;
    assert!(accepted(&first.events[0]));
    let redelivery = commit(&pool, &[press(7, true)]).await;
    assert!(
        !accepted(&redelivery.events[0]),
        "a redelivery is a duplicate"
    );
    // Pressed again: a new message, whatever its packet id, even the one the broker reused.
    let again = commit(&pool, &[press(8, false), press(7, false)]).await;
    assert!(again.events.iter().all(accepted), "{again:?}");
    // The reused packet id's message is redelivered too: still one event for it.
    let again_redelivered = commit(&pool, &[press(7, true)]).await;
    assert!(!accepted(&again_redelivered.events[0]));
    // A message still in hand from the lost connection and its redelivery in one batch.
    let both = commit(&pool, &[press(9, false), press(9, true)]).await;
    assert!(accepted(&both.events[0]) && !accepted(&both.events[1]));

    let mut conn = pool.acquire().await.expect("connection");
    assert_eq!(
        occ_store::events::count_for_source(&mut conn, "panic-1")
            .await
            .expect("count"),
        4,
        "four presses"
    );
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn correlated_events_join_and_a_critical_one_raises_priority(pool: PgPool) {
    let gas = |id: &str, f: &dyn Fn(&mut EventInput)| {
        event("gas-7", id, |e| {
            e.event_type = Some("water.level".into());
            e.zone = Some("ishim_embankment".into());
            e.measurements.insert("water_level_cm".into(), 320.0);
            f(e);
        })
    };
    commit(&pool, &[gas("1", &|_| {})]).await;
    let outcome = commit(
        &pool,
        &[
            gas("2", &|e| at(5)(e)),
            gas("3", &|e| {
                at(10)(e);
                e.severity = Some("critical".into());
            }),
        ],
    )
    .await;
    assert_eq!(outcome.incidents_opened, 0);
    assert_eq!(outcome.incidents_joined, 1);

    let incidents = all_incidents(&pool).await;
    assert_eq!(incidents.len(), 1);
    let inc = &incidents[0];
    assert_eq!(inc.event_count, 3);
    assert_eq!(
        inc.priority,
        Priority::P1,
        "flood is P2; the critical reading raised it"
    );
    assert_eq!(inc.last_seen, t0() + TimeDelta::minutes(10));
    let mut conn = pool.acquire().await.expect("connection");
    let tl = timeline::page(&mut conn, inc.id, None, 100)
        .await
        .expect("timeline");
    let actions: Vec<_> = tl
        .iter()
        .filter_map(|e| match e {
            TimelineEntry::Audit(a) => Some(a.action.as_str()),
            TimelineEntry::Event(_) => None,
        })
        .collect();
    assert_eq!(actions, ["incident.opened", "incident.priority_raised"]);
    assert_eq!(tl.len(), 5, "three events and two audit entries");
}

/// A detector whose clock was reset to 1970 keeps reporting the same smoke, batch after
/// batch: one incident, not one per batch beside the open one.
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_device_with_a_reset_clock_joins_the_open_incident(pool: PgPool) {
    let reset = |e: &mut EventInput| e.occurred_at = Some("1970-01-01T00:00:00Z".into());
    commit(&pool, &[event("det-1", "r1", |e| e.occurred_at = None)]).await;
    for id in ["r2", "r3", "r4"] {
        commit(&pool, &[event("det-1", id, reset)]).await;
    }
    let incidents = all_incidents(&pool).await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0].event_count, 4);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn after_the_window_a_new_incident_opens(pool: PgPool) {
    commit(&pool, &[event("det-1", "a", |_| {})]).await;
    // fire-smoke correlates for 30 minutes.
    commit(&pool, &[event("det-2", "b", at(31))]).await;
    let incidents = all_incidents(&pool).await;
    assert_eq!(incidents.len(), 2);
    let correlating: Vec<_> = incidents.iter().map(|i| i.correlating).collect();
    assert_eq!(correlating.iter().filter(|c| **c).count(), 1);
    // Both still wait for dispatch.
    assert!(incidents.iter().all(|i| i.status == IncidentStatus::Queued));
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn events_no_rule_matches_are_stored_without_incidents(pool: PgPool) {
    let outcome = commit(
        &pool,
        &[event("cam-3", "p", |e| {
            e.event_type = Some("object.person".into());
            e.zone = Some("park_path".into());
        })],
    )
    .await;
    assert_eq!(outcome.accepted(), 1);
    assert!(all_incidents(&pool).await.is_empty());
}

/// Many transactions committing related events at the same moment, as several OCC instances
/// would: one incident holds them all.
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn concurrent_batches_with_one_key_make_one_incident(pool: PgPool) {
    let rules = default_rules(&pool).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let pool = pool.clone();
        let rules = rules.clone();
        tasks.push(tokio::spawn(async move {
            let events = [Enriched::plain(event(
                &format!("det-{i}"),
                &format!("e{i}"),
                |_| {},
            ))];
            commit_batch(&pool, Batch::new(&events, Transport::Mqtt, &[]), &rules).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("commit");
    }
    let incidents = all_incidents(&pool).await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0].event_count, 16);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn dead_letters_keep_topic_bytes_and_reason(pool: PgPool) {
    let letter = DeadLetter::new(
        Transport::Mqtt,
        "occ/v1/events/cam-1",
        b"{not json",
        64,
        "invalid JSON".into(),
        Utc::now(),
    );
    let rules = default_rules(&pool).await;
    commit_batch(
        &pool,
        Batch::new(&[], Transport::Mqtt, std::slice::from_ref(&letter)),
        &rules,
    )
    .await
    .expect("commit");
    let mut conn = pool.acquire().await.expect("connection");
    let stored = dead_letters::recent(&mut conn, 10)
        .await
        .expect("dead letters");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].topic, "occ/v1/events/cam-1");
    assert_eq!(stored[0].payload, b"{not json");
    assert_eq!(stored[0].reason, "invalid JSON");
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn listing_pages_in_urgency_then_age_order(pool: PgPool) {
    // Five incidents: three air-quality (P3) in different zones, two panic buttons (P1).
    let mut events = Vec::new();
    for z in 0..3 {
        events.push(event(&format!("aq-{z}"), "x", |e| {
            e.event_type = Some("air.quality".into());
            e.zone = Some(format!("zone_{z}"));
            e.measurements.insert("pm2_5".into(), 80.0);
        }));
    }
    for b in 0..2 {
        events.push(event(&format!("panic-{b}"), "x", |e| {
            e.event_type = Some("panic.pressed".into());
        }));
    }
    commit(&pool, &events).await;

    let mut conn = pool.acquire().await.expect("connection");
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = incidents::list(&mut conn, &IncidentFilter::default(), after, 2)
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        after = page.last().map(IncidentCursor::after);
        seen.extend(page.into_iter().map(|i| i.priority));
    }
    assert_eq!(
        seen,
        [
            Priority::P1,
            Priority::P1,
            Priority::P3,
            Priority::P3,
            Priority::P3
        ]
    );

    let police = incidents::list(
        &mut conn,
        &IncidentFilter {
            queue: Some(occ_domain::QueueName::parse("queue", "police").expect("queue")),
            ..IncidentFilter::default()
        },
        None,
        100,
    )
    .await
    .expect("police");
    assert_eq!(police.len(), 2);
    let urgent = incidents::list(
        &mut conn,
        &IncidentFilter {
            min_priority: Some(Priority::P2),
            statuses: vec![IncidentStatus::Queued],
            ..IncidentFilter::default()
        },
        None,
        100,
    )
    .await
    .expect("urgent");
    assert_eq!(urgent.len(), 2);
}

fn noise_rule() -> RuleInput {
    RuleInput {
        name: "night-noise".into(),
        enabled: true,
        event_types: vec!["noise.level".into()],
        thresholds: vec![occ_domain::ThresholdInput {
            measurement: "dba".into(),
            comparison: ">".into(),
            value: 85.0,
        }],
        category: "noise".into(),
        queue: "municipal".into(),
        priority: 4,
        title_template: "Noise in {zone}".into(),
        correlation_fields: vec!["zone".into()],
        correlation_window_seconds: 3600,
        ..RuleInput::default()
    }
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn rule_changes_are_audited_and_reach_live_rule_sets(pool: PgPool) {
    let shutdown = CancellationToken::new();
    let mut live = rules::live(pool.clone(), Duration::from_secs(3600), shutdown.clone())
        .await
        .expect("live rules");
    let seeded = live.current().len();

    let mut conn = pool.acquire().await.expect("connection");
    let (rule, created) = rules::put(&mut conn, noise_rule(), "admin:test", Utc::now())
        .await
        .expect("put");
    assert!(created);
    // Only the NOTIFY from the trigger can wake the live set: its timer is an hour.
    tokio::time::timeout(Duration::from_secs(10), live.changed())
        .await
        .expect("reloaded within 10 s");
    assert_eq!(live.current().len(), seeded + 1);

    let (again, created) = rules::put(
        &mut conn,
        RuleInput {
            priority: 3,
            ..noise_rule()
        },
        "admin:test",
        Utc::now(),
    )
    .await
    .expect("replace");
    assert!(!created);
    assert_eq!(again.id, rule.id, "replacing keeps the id");

    rules::delete(&mut conn, "night-noise", "admin:test", Utc::now())
        .await
        .expect("delete");
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE entity_type = 'rule' AND entity_id = $1 ORDER BY id",
    )
    .bind(rule.id.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit");
    assert_eq!(actions, ["rule.created", "rule.updated", "rule.deleted"]);
    shutdown.cancel();
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_rule_for_an_unknown_queue_is_refused_by_field(pool: PgPool) {
    let mut conn = pool.acquire().await.expect("connection");
    let err = rules::put(
        &mut conn,
        RuleInput {
            queue: "coast_guard".into(),
            ..noise_rule()
        },
        "admin:test",
        Utc::now(),
    )
    .await
    .expect_err("unknown queue");
    let StoreError::Invalid(errors) = err else {
        panic!("invalid, got {err:?}");
    };
    assert_eq!(errors.errors()[0].field, "queue");
    assert!(matches!(
        rules::delete(&mut conn, "no-such-rule", "admin:test", Utc::now()).await,
        Err(StoreError::NotFound { .. })
    ));
}
