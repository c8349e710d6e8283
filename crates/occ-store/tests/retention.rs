//! A year of events, against the real PostgreSQL: partitions made ahead, an event for a time no
//! partition covers stored all the same and moved once its partition exists, retention by
//! kind that keeps what incidents link to and what a legal hold covers, the window of
//! redelivery keys, and the wall's counts, which outlive the events (hours for a while, days
//! for good).

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::retention::Period;
use occ_domain::wall::{Buckets, Granularity, Split};
use occ_domain::{Enriched, Event, EventInput, Limits, RuleSet, SourceId};
use occ_store::counts::{self, CountQuery};
use occ_store::ingest::{Batch, BatchOutcome, commit_batch};
use occ_store::partitions::{self, Hold, Partitioning};
use occ_store::{Transport, rules};
use sqlx::PgPool;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().expect("time")
}

/// An event of `kind` from `source` in `zone`, received (and happened) at `at`.
fn event(source: &str, id: &str, kind: &str, zone: &str, at: DateTime<Utc>) -> Event {
    Event::parse(
        SourceId::parse(source).expect("source"),
        EventInput {
            id: Some(id.into()),
            event_type: Some(kind.into()),
            occurred_at: Some(at.to_rfc3339()),
            zone: Some(zone.into()),
            ..EventInput::default()
        },
        b"",
        at,
        &Limits::default(),
    )
    .expect("valid event")
}

async fn commit(pool: &PgPool, events: Vec<Event>) -> BatchOutcome {
    let rules = {
        let mut conn = pool.acquire().await.expect("connection");
        RuleSet::new(rules::list(&mut conn).await.expect("rules"))
    };
    let events: Vec<Enriched> = events.into_iter().map(Enriched::plain).collect();
    commit_batch(pool, Batch::new(&events, Transport::Mqtt, &[]), &rules)
        .await
        .expect("batch commits")
}

/// Where each stored event of `source` is: (external id, partition table).
async fn placed(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT external_id, tableoid::regclass::text FROM events ORDER BY external_id")
        .fetch_all(pool)
        .await
        .expect("events")
}

fn config(retention: &str) -> Partitioning {
    Partitioning {
        period: Period::Month,
        ahead: 2,
        retention: retention.parse().expect("retention"),
        key_window: TimeDelta::days(7),
        hourly_counts_kept: TimeDelta::days(90),
    }
}

async fn maintain(pool: &PgPool, config: &Partitioning, now: DateTime<Utc>) -> partitions::Report {
    partitions::maintain(pool, config, now)
        .await
        .expect("maintenance runs")
        .expect("no other instance maintains")
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn partitions_are_made_ahead_and_an_event_before_them_is_stored_then_moved(pool: PgPool) {
    let now = t("2027-03-10T12:00:00Z");
    // Before any partition exists, and one from a device whose reset clock OCC corrected to
    // receipt: both stored.
    commit(
        &pool,
        vec![
            event("det-1", "a", "smoke.detected", "z1", now),
            event(
                "det-2",
                "b",
                "smoke.detected",
                "z1",
                t("2025-01-15T08:00:00Z"),
            ),
        ],
    )
    .await;
    assert_eq!(
        placed(&pool).await,
        [
            ("a".to_owned(), "events_default".to_owned()),
            ("b".to_owned(), "events_default".to_owned())
        ]
    );

    let report = maintain(&pool, &config("default=1y"), now).await;
    let made: Vec<&str> = report.created.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        made,
        [
            "events_2025_01",
            "events_2027_03",
            "events_2027_04",
            "events_2027_05"
        ],
        "the current month, two ahead, and the waiting event's month"
    );
    assert_eq!(
        placed(&pool).await,
        [
            ("a".to_owned(), "events_2027_03".to_owned()),
            ("b".to_owned(), "events_2025_01".to_owned())
        ],
        "the waiting events moved into their partitions"
    );
    // New events land in their partition; running again makes nothing new.
    commit(
        &pool,
        vec![event(
            "det-1",
            "c",
            "smoke.detected",
            "z1",
            t("2027-04-02T00:00:00Z"),
        )],
    )
    .await;
    assert_eq!(placed(&pool).await[2].1, "events_2027_04");
    let again = maintain(&pool, &config("default=1y"), now).await;
    assert!(again.created.is_empty(), "{again:?}");
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn retention_drops_by_kind_and_keeps_linked_and_held_events(pool: PgPool) {
    let january = t("2026-01-10T08:00:00Z");
    let config = config("motion.*=30d,lpr.*=forever,default=1y");
    maintain(&pool, &config, january).await;
    commit(
        &pool,
        vec![
            // Motion from two cameras; one of them is under a legal hold.
            event("cam-1", "motion-1", "motion.detected", "z1", january),
            event("cam-2", "motion-2", "motion.detected", "z2", january),
            // A plate read: kept for ever.
            event("lpr-1", "plate-1", "lpr.plate", "z1", january),
            // Smoke opens a fire incident (the default rules): linked, kept.
            event(
                "det-1",
                "smoke-1",
                "smoke.detected",
                "esil_residential_1",
                january,
            ),
            // A reading nothing links to.
            event("env-1", "temp-1", "temperature.reading", "z1", january),
        ],
    )
    .await;
    let linked: i64 = sqlx::query_scalar("SELECT count(*) FROM incident_events")
        .fetch_one(&pool)
        .await
        .expect("links");
    assert_eq!(linked, 1, "the smoke opened an incident");
    let hold = Hold {
        id: uuid::Uuid::now_v7(),
        case_ref: "CASE-2026-17".into(),
        reason: "burglary on the 10th".into(),
        from: t("2026-01-10T00:00:00Z"),
        to: t("2026-01-11T00:00:00Z"),
        sources: vec!["cam-2".into()],
        zones: vec![],
        created_by: "user:investigator".into(),
        created_at: january,
        released: None,
    };
    let mut tx = occ_store::begin(&pool).await.expect("tx");
    partitions::hold(&mut tx, &hold).await.expect("hold");
    occ_store::commit(tx).await.expect("commit");

    let stored = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT external_id FROM events ORDER BY external_id")
            .fetch_all(&pool)
            .await
            .expect("events")
    };

    // April: motion's 30 days have passed for January; nothing else has.
    let april = maintain(&pool, &config, t("2026-04-01T00:00:00Z")).await;
    assert_eq!(
        april.thinned,
        [
            ("events_2026_01".to_owned(), 4, 1),
            ("events_2026_02".to_owned(), 0, 0)
        ],
        "January loses one motion event; February is as old for motion, and empty"
    );
    assert_eq!(
        stored(pool.clone()).await,
        ["motion-2", "plate-1", "smoke-1", "temp-1"],
        "the held camera's motion stays"
    );
    // Nothing new has expired for January: it is not copied again.
    let may = maintain(&pool, &config, t("2026-05-01T00:00:00Z")).await;
    assert!(
        !may.thinned
            .iter()
            .any(|(name, ..)| name == "events_2026_01"),
        "{may:?}"
    );

    // A year on: the default's year has passed too.
    let next_year = t("2027-02-01T00:00:00Z");
    maintain(&pool, &config, next_year).await;
    assert_eq!(
        stored(pool.clone()).await,
        ["motion-2", "plate-1", "smoke-1"],
        "linked, held and kept-for-ever events stay"
    );

    // The case is closed: the hold is released, and its events go.
    let mut tx = occ_store::begin(&pool).await.expect("tx");
    assert!(
        partitions::release(&mut tx, hold.id, "user:investigator", next_year)
            .await
            .expect("release")
    );
    occ_store::commit(tx).await.expect("commit");
    maintain(&pool, &config, next_year + TimeDelta::hours(1)).await;
    assert_eq!(stored(pool.clone()).await, ["plate-1", "smoke-1"]);

    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE entity_type = 'legal_hold' ORDER BY at",
    )
    .fetch_all(&pool)
    .await
    .expect("audit");
    assert_eq!(audited, ["legal_hold.placed", "legal_hold.released"]);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn a_redelivery_is_recognised_for_the_key_window_and_not_after(pool: PgPool) {
    let at = t("2026-06-01T08:00:00Z");
    let config = config("default=1y");
    maintain(&pool, &config, at).await;
    let first = event("det-1", "reading-1", "smoke.detected", "z1", at);
    commit(&pool, vec![first.clone()]).await;

    // A redelivery within the window is the same event.
    let redelivered = event(
        "det-1",
        "reading-1",
        "smoke.detected",
        "z1",
        at + TimeDelta::hours(20),
    );
    commit(&pool, vec![redelivered]).await;
    let count = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    assert_eq!(count(pool.clone()).await, 1);

    // Past the window (a week by default) the key is forgotten; the same id is a new event.
    let report = maintain(&pool, &config, at + TimeDelta::days(8)).await;
    assert_eq!(report.keys_forgotten, 1);
    commit(
        &pool,
        vec![event(
            "det-1",
            "reading-1",
            "smoke.detected",
            "z1",
            at + TimeDelta::days(8),
        )],
    )
    .await;
    assert_eq!(count(pool.clone()).await, 2);
}

#[sqlx::test(migrator = "occ_store::MIGRATOR")]
async fn the_walls_days_outlive_the_events_and_its_hours_are_kept_as_configured(pool: PgPool) {
    let now = t("2027-03-10T12:00:00Z");
    let old = t("2026-10-15T08:10:00Z");
    let recent = now - TimeDelta::hours(1);
    commit(
        &pool,
        vec![
            event("mic-1", "n1", "noise.level", "z1", old),
            event(
                "mic-1",
                "n2",
                "noise.level",
                "z1",
                old + TimeDelta::minutes(5),
            ),
            event("mic-2", "n3", "noise.level", "z2", recent),
        ],
    )
    .await;
    counts::compact(&pool)
        .await
        .expect("compaction")
        .expect("no other compaction");
    let count = async |granularity, from: DateTime<Utc>| {
        let q = CountQuery {
            buckets: Buckets::parse(
                "time_range",
                Some(from),
                Some(from + TimeDelta::days(1)),
                granularity,
            )
            .expect("window"),
            split: Split {
                time: true,
                zone: true,
                ..Split::default()
            },
            zones: None,
            kinds: None,
            queues: None,
            limit: 100,
        };
        let mut conn = pool.acquire().await.expect("connection");
        counts::events(&mut conn, &q)
            .await
            .expect("counts")
            .into_iter()
            .map(|c| (c.bucket.expect("bucket"), c.zone.expect("zone"), c.n))
            .collect::<Vec<_>>()
    };
    let old_day = t("2026-10-15T00:00:00Z");
    let old_hour = t("2026-10-15T08:00:00Z");
    let recent_hour = t("2027-03-10T11:00:00Z");
    assert_eq!(
        count(Granularity::Hour, old_day).await,
        [(old_hour, "z1".to_owned(), 2)]
    );

    // Noise readings are kept a month; hours of counts 90 days; days for good.
    let report = maintain(&pool, &config("noise.*=30d,default=1y"), now).await;
    assert_eq!(
        report.hourly_counts_dropped, 2,
        "October's hour, in its zone and city-wide"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 1, "October's readings dropped by retention");
    assert_eq!(count(Granularity::Hour, old_day).await, []);
    assert_eq!(
        count(Granularity::Day, old_day).await,
        [(old_day, "z1".to_owned(), 2)],
        "their day's count is kept"
    );
    assert_eq!(
        count(Granularity::Hour, recent_hour - TimeDelta::hours(11)).await,
        [(recent_hour, "z2".to_owned(), 1)]
    );
}
