//! The store's side of real producers, against the real PostgreSQL: evolving events (a
//! camera's tracked object), status reports from many instances at once, the registry
//! snapshot, and source health.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use occ_domain::{
    Enriched, Event, EventInput, IncidentStatus, Limits, Revision, RuleSet, SourceId, SourceInput,
    SourceStatus,
};
use occ_store::health::{ActivityLog, Health};
use occ_store::ingest::{
    Batch, BatchOutcome, CommitOrder, EventOutcome, commit_batch, commit_batch_in_turn,
};
use occ_store::{Transport, incidents, registry, rules, sources};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A camera's tracked person at `rank` (0 new, 1.. updates, then end), in `zones`.
fn person(rank: i16, zones: &[&str]) -> Event {
    object("1764081123.512034-k3v9qa", rank, zones)
}

/// The tracked object `id` at `rank`, in `zones`.
fn object(id: &str, rank: i16, zones: &[&str]) -> Event {
    let start = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 25, 6, 0, 0)
        .single()
        .expect("valid time");
    let input = EventInput {
        id: Some(id.into()),
        event_type: Some("object.person".into()),
        occurred_at: Some(start.to_rfc3339()),
        zone: zones.first().map(|z| (*z).to_owned()),
        extra_zones: zones.iter().skip(1).map(|z| (*z).to_owned()).collect(),
        confidence: Some(0.9),
        revision: Some(Revision {
            at: start + TimeDelta::seconds(i64::from(rank)),
            rank,
        }),
        attributes: json!({"phase": rank})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        ..EventInput::default()
    };
    Event::parse(
        SourceId::parse("frigate:frigate:park_cam").expect("source"),
        input,
        b"",
        Utc::now(),
        &Limits::default(),
    )
    .expect("valid event")
}

async fn rules_of(pool: &PgPool) -> RuleSet {
    let mut conn = pool.acquire().await.expect("connection");
    RuleSet::new(rules::list(&mut conn).await.expect("rules"))
}

async fn commit(pool: &PgPool, events: Vec<Event>) -> BatchOutcome {
    let rules = rules_of(pool).await;
    let events: Vec<Enriched> = events.into_iter().map(Enriched::plain).collect();
    commit_batch(pool, Batch::new(&events, Transport::Mqtt, &[]), &rules)
        .await
        .expect("batch commits")
}

async fn detection(pool: &PgPool) -> (i32, serde_json::Value) {
    sqlx::query_as(
        "SELECT revisions, attributes FROM events WHERE source_id = 'frigate:frigate:park_cam'",
    )
    .fetch_one(pool)
    .await
    .expect("one detection")
}

async fn police(pool: &PgPool) -> Vec<occ_domain::Incident> {
    let mut conn = pool.acquire().await.expect("connection");
    incidents::list(
        &mut conn,
        &incidents::IncidentFilter {
            queue: occ_domain::QueueName::parse("queue", "police").ok(),
            ..Default::default()
        },
        None,
        100,
    )
    .await
    .expect("list")
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn an_object_that_entered_and_left_a_zone_within_one_batch_still_counts(pool: PgPool) {
    let outcome = commit(
        &pool,
        vec![
            person(0, &[]),
            person(1, &["park_path", "restricted_substation"]),
            person(2, &[]),
        ],
    )
    .await;
    assert!(
        outcome
            .events
            .iter()
            .all(|o| matches!(o, EventOutcome::Accepted { .. })),
        "{outcome:?}"
    );
    let (revisions, attributes) = detection(&pool).await;
    assert_eq!(revisions, 3);
    assert_eq!(
        attributes["phase"],
        json!(2),
        "the row keeps the newest state"
    );
    let open = police(&pool).await;
    assert_eq!(
        open.len(),
        1,
        "the update in the substation opened the incident"
    );
    assert_eq!(
        open[0].zone.as_ref().map(|z| z.as_str()),
        Some("restricted_substation")
    );
    assert_eq!(open[0].event_count, 1);
}

async fn stored_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Two batches in flight: the later one, holding the object's newer state, stores it first and
/// waits for its turn; the earlier one, on its way to the same row, must still commit first so
/// that the rules see the state it holds (the person inside the substation).
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn batches_in_order_show_every_state_even_when_the_later_one_gets_there_first(pool: PgPool) {
    let rules = rules_of(&pool).await;
    let inside = [Enriched::plain(person(1, &["restricted_substation"]))];
    let left = [Enriched::plain(person(2, &[]))];
    let mut order = CommitOrder::default();
    let (first_turn, first_end) = order.take();
    let (second_turn, second_end) = order.take();

    let later = tokio::spawn({
        let (pool, rules, left) = (pool.clone(), rules.clone(), left.clone());
        async move {
            let batch = Batch::new(&left, Transport::Mqtt, &[]);
            commit_batch_in_turn(&pool, batch, &rules, &second_turn).await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!later.is_finished(), "the later batch waits for its turn");
    assert_eq!(stored_events(&pool).await, 0, "and has committed nothing");

    let earlier = tokio::time::timeout(
        Duration::from_secs(10),
        commit_batch_in_turn(
            &pool,
            Batch::new(&inside, Transport::Mqtt, &[]),
            &rules,
            &first_turn,
        ),
    )
    .await
    .expect("the later batch steps aside for the earlier one")
    .expect("the earlier batch commits");
    first_end.ended(true);
    let later = tokio::time::timeout(Duration::from_secs(10), later)
        .await
        .expect("the later batch commits after the earlier one")
        .expect("task")
        .expect("the later batch commits");
    second_end.ended(true);

    assert!(
        matches!(earlier.events[0], EventOutcome::Accepted { .. }),
        "the state inside the substation is news, not a duplicate: {earlier:?}"
    );
    assert!(
        matches!(later.events[0], EventOutcome::Accepted { .. }),
        "{later:?}"
    );
    assert_eq!(police(&pool).await.len(), 1, "the rules saw the intrusion");
    let (revisions, attributes) = detection(&pool).await;
    assert_eq!((revisions, attributes["phase"].clone()), (2, json!(2)));
}

/// Three batches in flight: the third stores the object's newest state first, the second
/// then waits on it, and the first is slow. The third steps aside for the second; the second,
/// waiting for the first, never steps aside for the third (which only waits for it, as it
/// must); all three commit, in order, once the first has.
#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_later_batch_steps_aside_for_an_earlier_one_and_never_the_other_way(pool: PgPool) {
    let rules = rules_of(&pool).await;
    let mut order = CommitOrder::default();
    let (first_turn, first_end) = order.take();
    let in_turn =
        |turn: occ_store::ingest::InTurn, end: occ_store::ingest::TurnEnd, events: Vec<Event>| {
            let (pool, rules) = (pool.clone(), rules.clone());
            tokio::spawn(async move {
                let events: Vec<Enriched> = events.into_iter().map(Enriched::plain).collect();
                let batch = Batch::new(&events, Transport::Mqtt, &[]);
                let result = commit_batch_in_turn(&pool, batch, &rules, &turn).await;
                end.ended(result.is_ok());
                result
            })
        };
    let (second_turn, second_end) = order.take();
    let (third_turn, third_end) = order.take();
    let third = in_turn(third_turn, third_end, vec![person(2, &[])]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = in_turn(
        second_turn,
        second_end,
        vec![person(1, &["restricted_substation"])],
    );
    // Past TURN_PATIENCE: the second must not have stepped aside for the third meanwhile.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!second.is_finished() && !third.is_finished());
    assert_eq!(stored_events(&pool).await, 0);

    let first = commit_batch_in_turn(
        &pool,
        Batch::new(
            &[Enriched::plain(object("1764081999.000001-other", 0, &[]))],
            Transport::Mqtt,
            &[],
        ),
        &rules,
        &first_turn,
    )
    .await
    .expect("the first batch commits");
    first_end.ended(true);
    assert!(matches!(first.events[0], EventOutcome::Accepted { .. }));
    let wait = |task: tokio::task::JoinHandle<_>| async move {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("commits once the first has")
            .expect("task")
    };
    let second: BatchOutcome = wait(second).await.expect("the second batch commits");
    let third: BatchOutcome = wait(third).await.expect("the third batch commits");
    assert!(
        matches!(second.events[0], EventOutcome::Accepted { .. }),
        "{second:?}"
    );
    assert!(
        matches!(third.events[0], EventOutcome::Accepted { .. }),
        "{third:?}"
    );
    assert_eq!(police(&pool).await.len(), 1, "the rules saw the intrusion");
    let (revisions, attributes) = detection(&pool).await;
    assert_eq!((revisions, attributes["phase"].clone()), (2, json!(2)));
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_batch_whose_predecessor_was_given_up_is_not_committed(pool: PgPool) {
    let rules = rules_of(&pool).await;
    let events = [Enriched::plain(person(2, &[]))];
    let mut order = CommitOrder::default();
    let (first_turn, first_end) = order.take();
    let (second_turn, second_end) = order.take();
    let (third_turn, _third_end) = order.take();
    assert!(!first_turn.lost(), "the first batch follows none");
    first_end.ended(true);
    assert!(!second_turn.lost(), "its predecessor committed");
    // The second batch's task ends without saying (aborted): the third is not committed.
    drop(second_end);
    let result = commit_batch_in_turn(
        &pool,
        Batch::new(&events, Transport::Mqtt, &[]),
        &rules,
        &third_turn,
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    assert!(third_turn.lost());
    assert_eq!(stored_events(&pool).await, 0);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn an_overtaken_or_redelivered_revision_changes_nothing(pool: PgPool) {
    commit(&pool, vec![person(2, &["restricted_substation"])]).await;
    // An update that arrives after the end (another instance, a redelivery).
    let late = commit(&pool, vec![person(1, &["park_path"])]).await;
    assert!(matches!(
        late.events[0],
        EventOutcome::Duplicate { existing: Some(_) }
    ));
    let again = commit(&pool, vec![person(2, &["restricted_substation"])]).await;
    assert!(matches!(again.events[0], EventOutcome::Duplicate { .. }));
    let (revisions, attributes) = detection(&pool).await;
    assert_eq!((revisions, attributes["phase"].clone()), (1, json!(2)));
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_later_state_of_a_detection_does_not_reopen_a_dismissed_incident(pool: PgPool) {
    commit(&pool, vec![person(1, &["restricted_substation"])]).await;
    let open = police(&pool).await;
    assert_eq!(open.len(), 1);
    // The operator dismisses it (a worker, expected there): it stops correlating.
    sqlx::query("UPDATE incidents SET status = 'DISMISSED', correlating = false WHERE id = $1")
        .bind(open[0].id.0)
        .execute(&pool)
        .await
        .expect("dismiss");
    let later = commit(
        &pool,
        vec![
            person(2, &["restricted_substation"]),
            person(3, &["restricted_substation"]),
        ],
    )
    .await;
    assert!(matches!(
        later.events[0],
        EventOutcome::Accepted { revised: true, .. }
    ));
    let all = police(&pool).await;
    assert_eq!(all.len(), 1, "still the one, dismissed: {all:?}");
    assert_eq!(all[0].status, IncidentStatus::Dismissed);
    assert_eq!(detection(&pool).await.0, 3);
}

fn offline(source: &str) -> Event {
    occ_domain::source::status_event(
        SourceId::parse(source).expect("source"),
        SourceStatus::Offline,
        "reported",
        Utc::now(),
        Utc::now(),
        &Limits::default(),
    )
    .expect("status event")
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn many_instances_reporting_one_camera_offline_make_one_event(pool: PgPool) {
    // A retained status, delivered to every instance as it subscribes, at the same moment.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(
                async move { commit(&pool, vec![offline("frigate:frigate:gate_cam")]).await },
            )
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        let outcome = t.await.expect("task");
        accepted += outcome.accepted();
    }
    assert_eq!(accepted, 1);
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'source.offline'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(stored, 1);
    let mut conn = pool.acquire().await.expect("connection");
    let s = sources::get(&mut conn, "frigate:frigate:gate_cam")
        .await
        .expect("registered");
    assert_eq!(s.status, SourceStatus::Offline);
    assert!(!s.config.verified);
    // One municipal incident for it.
    let municipal: i64 =
        sqlx::query_scalar("SELECT count(*) FROM incidents WHERE queue = 'municipal'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(municipal, 1);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_silent_source_goes_offline_once_however_many_instances_check(pool: PgPool) {
    let mut conn = pool.acquire().await.expect("connection");
    sources::upsert(
        &mut conn,
        vec![SourceInput {
            id: "level-esil-000".into(),
            zone: Some("esil_embankment".into()),
            expected_interval_seconds: Some(1),
            ..SourceInput::default()
        }],
        "admin:test",
    )
    .await
    .expect("registered");
    drop(conn);
    let shutdown = CancellationToken::new();
    let live_rules = rules::live(pool.clone(), Duration::from_secs(3600), shutdown.clone())
        .await
        .expect("rules");
    let live_registry = registry::live(pool.clone(), Duration::from_secs(3600), shutdown.clone())
        .await
        .expect("registry");
    let health = |log: ActivityLog| Health {
        pool: pool.clone(),
        log,
        rules: live_rules.clone(),
        registry: live_registry.clone(),
        limits: Limits::default(),
    };
    // Heard from a moment ago, on one instance.
    let log = ActivityLog::default();
    let reading = Event::parse(
        SourceId::parse("level-esil-000").expect("source"),
        EventInput {
            event_type: Some("water.level".into()),
            ..EventInput::default()
        },
        b"x",
        Utc::now() - TimeDelta::seconds(2),
        &Limits::default(),
    )
    .expect("event");
    log.record([(&reading, false)]);
    assert_eq!(health(log).flush().await.expect("flush"), 1);

    // Five instances look for silent sources at once.
    let checks: Vec<_> = (0..5)
        .map(|_| {
            let h = health(ActivityLog::default());
            tokio::spawn(async move { h.sweep_silent(Duration::ZERO, 100).await.expect("sweep") })
        })
        .collect();
    let mut found = 0;
    for c in checks {
        found += c.await.expect("task");
    }
    assert_eq!(found, 1);
    let stored: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, zone FROM events WHERE source_id = 'level-esil-000' ORDER BY received_at",
    )
    .fetch_all(&pool)
    .await
    .expect("events");
    assert_eq!(
        stored,
        [(
            "source.offline".to_owned(),
            Some("esil_embankment".to_owned())
        )],
        "the registry placed it"
    );
    shutdown.cancel();
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn two_instances_storing_one_new_object_at_once_count_it_once(pool: PgPool) {
    // A shared subscription hands an object's first messages to two instances: both find it
    // new, both match the rule. Each object, in its own zone, must be one linked event.
    for n in 0..20 {
        let id = format!("1764081123.{n:06}-race{n:02}");
        let zone = format!("restricted_gate_{n}");
        let a = {
            let (pool, e) = (pool.clone(), object(&id, 0, &[zone.as_str()]));
            tokio::spawn(async move { commit(&pool, vec![e]).await })
        };
        let b = {
            let (pool, e) = (pool.clone(), object(&id, 1, &[zone.as_str()]));
            tokio::spawn(async move { commit(&pool, vec![e]).await })
        };
        a.await.expect("task");
        b.await.expect("task");
    }
    let counts: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT i.zone, i.event_count, count(l.event_id)
           FROM incidents i JOIN incident_events l ON l.incident_id = i.id
          GROUP BY i.id ORDER BY i.zone",
    )
    .fetch_all(&pool)
    .await
    .expect("incidents");
    assert_eq!(counts.len(), 20, "one incident per object: {counts:?}");
    assert!(
        counts
            .iter()
            .all(|(_, count, links)| *count == 1 && *links == 1),
        "{counts:?}"
    );
    let ranks: Vec<i16> =
        sqlx::query_scalar("SELECT revision_rank FROM events WHERE event_type = 'object.person'")
            .fetch_all(&pool)
            .await
            .expect("events");
    assert_eq!(ranks.len(), 20);
    // Whichever committed first, each row holds the newer state (also when the newer one's
    // statement began before the other's row was committed, and waited for it).
    assert!(ranks.iter().all(|r| *r == 1), "{ranks:?}");
}

fn report(source: &str, status: SourceStatus, received: chrono::DateTime<Utc>) -> Event {
    occ_domain::source::status_event(
        SourceId::parse(source).expect("source"),
        status,
        "reported",
        received,
        received,
        &Limits::default(),
    )
    .expect("status event")
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_status_report_delivered_late_or_again_changes_nothing(pool: PgPool) {
    let cam = "frigate:frigate:gate_cam";
    let t = Utc::now() - TimeDelta::minutes(1);
    let offline = report(cam, SourceStatus::Offline, t);
    let online = report(cam, SourceStatus::Online, t + TimeDelta::seconds(10));
    commit(&pool, vec![offline.clone()]).await;
    commit(&pool, vec![online]).await;
    // The first offline again (a retried call with the same id): a duplicate.
    let again = commit(&pool, vec![offline]).await;
    assert!(matches!(again.events[0], EventOutcome::Duplicate { .. }));
    // An offline the camera's NVR sent before its online, committed late by another instance.
    let stale = commit(
        &pool,
        vec![report(
            cam,
            SourceStatus::Offline,
            t + TimeDelta::seconds(5),
        )],
    )
    .await;
    assert!(matches!(stale.events[0], EventOutcome::Duplicate { .. }));
    let mut conn = pool.acquire().await.expect("connection");
    assert_eq!(
        sources::get(&mut conn, cam).await.expect("source").status,
        SourceStatus::Online
    );
    // An online that arrived first, then an older offline: the offline is stale too.
    let other = "frigate:frigate:yard_cam";
    commit(
        &pool,
        vec![report(
            other,
            SourceStatus::Online,
            t + TimeDelta::seconds(10),
        )],
    )
    .await;
    commit(&pool, vec![report(other, SourceStatus::Offline, t)]).await;
    assert_eq!(
        sources::get(&mut conn, other).await.expect("source").status,
        SourceStatus::Online
    );
}
