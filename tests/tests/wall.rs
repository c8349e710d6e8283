//! The operations center's wall: counts of events and incidents per zone and type per hour and
//! day, over a real socket, against events with known answers. The counts are the same read
//! from what batches appended as they committed and after a compaction folded it in; hours and
//! days are the city's (a time zone half an hour off UTC tells them apart); a redelivery adds
//! nothing; incident counts stay within the caller's queues; and counts taken while many
//! batches commit at once and compactions run between them add up to exactly what was stored.

use chrono::{DateTime, DurationRound, TimeDelta, Timelike, Utc};
use occ_proto::v1 as pb;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_proto::v1::stats_service_client::StatsServiceClient;
use occ_tests::secure::{Grant, channel, make_key, start};
use occ_tests::{Broker, Occ, database_url, serve_args, with_key};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

/// India's offset: its hours begin at half past UTC's.
const KOLKATA: TimeDelta = TimeDelta::minutes(330);

/// The Kolkata hour `t` falls in, as the instant it begins.
fn local_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    (t + KOLKATA).duration_trunc(TimeDelta::hours(1)).unwrap() - KOLKATA
}

fn local_day(t: DateTime<Utc>) -> DateTime<Utc> {
    (t + KOLKATA).duration_trunc(TimeDelta::days(1)).unwrap() - KOLKATA
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    occ_api::convert::timestamp(t)
}

fn range(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<pb::TimeRange> {
    Some(pb::TimeRange {
        start_time: Some(ts(from)),
        end_time: Some(ts(to)),
    })
}

fn event(external_id: &str, kind: &str, zone: &str, at: DateTime<Utc>) -> pb::Event {
    pb::Event {
        source_id: format!("src-{kind}-{zone}").replace('_', "-"),
        external_id: external_id.into(),
        r#type: kind.into(),
        occurred_at: Some(ts(at)),
        zone: zone.into(),
        confidence: Some(0.9),
        ..Default::default()
    }
}

/// Counts as (bucket, zone, type, queue, priority, count), in the answer's order.
type Row = (Option<DateTime<Utc>>, String, String, String, i32, i64);

fn rows(counts: &[pb::Count]) -> Vec<Row> {
    counts
        .iter()
        .map(|c| {
            (
                c.bucket.as_ref().map(|b| {
                    DateTime::from_timestamp(b.seconds, u32::try_from(b.nanos).unwrap()).unwrap()
                }),
                c.zone.clone(),
                c.r#type.clone(),
                c.queue.clone(),
                c.priority,
                c.count,
            )
        })
        .collect()
}

fn rows_of(answer: pb::CountEventsResponse) -> Vec<Row> {
    rows(&answer.counts)
}

fn row(bucket: Option<DateTime<Utc>>, zone: &str, kind: &str, n: i64) -> Row {
    (bucket, zone.into(), kind.into(), String::new(), 0, n)
}

async fn count_events(
    client: &mut StatsServiceClient<Channel>,
    key: &str,
    request: pb::CountEventsRequest,
) -> Result<pb::CountEventsResponse, tonic::Status> {
    client
        .count_events(with_key(key, request))
        .await
        .map(tonic::Response::into_inner)
}

async fn publish(grpc: &str, key: &str, events: Vec<pb::Event>) -> Vec<pb::PublishOutcome> {
    IngestServiceClient::new(channel(grpc).await)
        .publish_events(with_key(key, pb::PublishEventsRequest { events }))
        .await
        .expect("publish")
        .into_inner()
        .results
        .iter()
        .map(pb::PublishResult::outcome)
        .collect()
}

#[sqlx::test(migrations = false)]
async fn the_wall_counts_events_and_incidents_per_zone_and_type_in_the_citys_hours_and_days(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    // Compaction only when the test asks: first the counts come from what batches appended.
    let (occ, admin) = start(
        &pool,
        &broker,
        "occ-wall",
        &[
            "--time-zone",
            "Asia/Kolkata",
            "--count-compaction-interval",
            "1d",
        ],
    )
    .await;
    let gateway = make_key(&occ.grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let fire = make_key(
        &occ.grpc,
        &admin,
        "fire-desk",
        Grant::role(&"dispatcher").queues(&["fire"]),
    )
    .await;
    let police = make_key(
        &occ.grpc,
        &admin,
        "police-desk",
        Grant::role(&"dispatcher").queues(&["police"]),
    )
    .await;

    // Two Kolkata hours of the same Kolkata day, within the last day.
    let mut h0 = local_hour(Utc::now() - TimeDelta::hours(20));
    if (h0 + KOLKATA).hour() == 23 {
        h0 -= TimeDelta::hours(1);
    }
    let h1 = h0 + TimeDelta::hours(1);
    let m = |minutes| h0 + TimeDelta::minutes(minutes);
    let mut panic = occ_tests::panic_button(1);
    panic.occurred_at = Some(ts(m(70)));
    let mut again = occ_tests::panic_button(1);
    again.external_id = "press-1-again".into();
    again.occurred_at = Some(ts(m(71)));
    let events = vec![
        event("car-1", "object.car", "esil_1", m(0)),
        event("car-2", "object.car", "esil_1", m(5)),
        event("car-3", "object.car", "esil_1", m(59)),
        event("noise-1", "noise.level", "", m(5)),
        event("car-4", "object.car", "esil_1", m(65)),
        event("person-1", "object.person", "esil_2", m(65)),
        event("smoke-1", "smoke.detected", "esil_2", m(66)),
        panic,
        // The same button pressed again: an event of its own, joining the same incident.
        again,
    ];
    let outcomes = publish(&occ.grpc, &gateway, events.clone()).await;
    assert!(
        outcomes.iter().all(|o| *o == pb::PublishOutcome::Accepted),
        "{outcomes:?}"
    );
    // A redelivery of the first car adds nothing.
    assert_eq!(
        publish(&occ.grpc, &gateway, vec![events[0].clone()]).await,
        vec![pb::PublishOutcome::Duplicate]
    );

    let mut client = StatsServiceClient::new(channel(&occ.grpc).await);
    let hourly = |group_by: &[pb::CountDimension]| pb::CountEventsRequest {
        time_range: range(h0, h1 + TimeDelta::hours(1)),
        granularity: pb::Granularity::Hour as i32,
        group_by: group_by.iter().map(|d| *d as i32).collect(),
        ..Default::default()
    };
    let by_hour_zone_type = vec![
        row(Some(h0), "", "noise.level", 1),
        row(Some(h0), "esil_1", "object.car", 3),
        row(Some(h1), "esil_1", "object.car", 1),
        row(Some(h1), "esil_2", "object.person", 1),
        row(Some(h1), "esil_2", "smoke.detected", 1),
        row(Some(h1), "esil_transit_stop_1", "panic.pressed", 2),
    ];
    let day = local_day(h0);
    let by_day = vec![row(Some(day), "", "", 9)];
    let daily = |group_by: &[pb::CountDimension]| pb::CountEventsRequest {
        time_range: range(day, day + TimeDelta::days(1)),
        granularity: pb::Granularity::Day as i32,
        group_by: group_by.iter().map(|d| *d as i32).collect(),
        ..Default::default()
    };

    for read in ["appended by the batches", "after a compaction"] {
        if read == "after a compaction" {
            let done = occ_store::counts::compact(&pool)
                .await
                .expect("compact")
                .expect("no other compaction runs");
            assert!(done.event_rows >= 6, "{done:?}");
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_count_deltas")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(left, 0, "every delta folded in");
        }
        let answer = count_events(&mut client, &fire, hourly(&[])).await.unwrap();
        assert_eq!(answer.time_zone, "Asia/Kolkata");
        assert_eq!(rows(&answer.counts), by_hour_zone_type, "{read}");

        // The day, Kolkata's: it begins at 18:30 UTC.
        let answer = count_events(&mut client, &police, daily(&[pb::CountDimension::Time]))
            .await
            .unwrap();
        assert_eq!(rows(&answer.counts), by_day, "{read}");
        assert_eq!((day + KOLKATA).hour(), 0);

        // A heat map of the day: per zone.
        let answer = count_events(&mut client, &police, daily(&[pb::CountDimension::Zone]))
            .await
            .unwrap();
        assert_eq!(
            rows(&answer.counts),
            vec![
                row(None, "", "", 1),
                row(None, "esil_1", "", 4),
                row(None, "esil_2", "", 2),
                row(None, "esil_transit_stop_1", "", 2),
            ],
            "{read}"
        );

        // A trend of one kind; one zone's kinds; the window's end excluded.
        let cars = pb::CountEventsRequest {
            types: vec!["object.*".into()],
            ..hourly(&[pb::CountDimension::Time])
        };
        assert_eq!(
            rows_of(count_events(&mut client, &fire, cars).await.unwrap()),
            vec![row(Some(h0), "", "", 3), row(Some(h1), "", "", 2)],
            "{read}"
        );
        let esil_2 = pb::CountEventsRequest {
            zones: vec!["esil_2".into()],
            ..hourly(&[pb::CountDimension::Type])
        };
        assert_eq!(
            rows_of(count_events(&mut client, &fire, esil_2).await.unwrap()),
            vec![
                row(None, "", "object.person", 1),
                row(None, "", "smoke.detected", 1)
            ],
            "{read}"
        );
        let first_hour = pb::CountEventsRequest {
            time_range: range(h0, h1),
            ..hourly(&[pb::CountDimension::Time])
        };
        assert_eq!(
            rows_of(count_events(&mut client, &fire, first_hour).await.unwrap()),
            vec![row(Some(h0), "", "", 4)],
            "{read}"
        );

        // Incidents: each desk sees its own queue's.
        let incidents = |queues: &[&str]| pb::CountIncidentsRequest {
            time_range: range(
                local_hour(Utc::now()) - TimeDelta::hours(1),
                local_hour(Utc::now()) + TimeDelta::hours(1),
            ),
            granularity: pb::Granularity::Hour as i32,
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            group_by: vec![
                pb::CountDimension::Zone as i32,
                pb::CountDimension::Type as i32,
                pb::CountDimension::Queue as i32,
                pb::CountDimension::Priority as i32,
            ],
            ..Default::default()
        };
        let seen = |key: &str, queues: &[&str]| {
            let mut client = client.clone();
            let request = with_key(key, incidents(queues));
            async move {
                client
                    .count_incidents(request)
                    .await
                    .map(|r| rows(&r.into_inner().counts))
            }
        };
        assert_eq!(
            seen(&fire, &[]).await.unwrap(),
            vec![(None, "esil_2".into(), "fire".into(), "fire".into(), 1, 1)],
            "{read}"
        );
        assert_eq!(
            seen(&police, &[]).await.unwrap(),
            vec![(
                None,
                "esil_transit_stop_1".into(),
                "panic_alarm".into(),
                "police".into(),
                1,
                1
            )],
            "{read}: the second press joined the incident"
        );
        assert_eq!(
            seen(&fire, &["police"]).await.unwrap_err().code(),
            Code::PermissionDenied,
            "another agency's queue"
        );
    }

    // Questions refused, every bad field named.
    let refused = count_events(
        &mut client,
        &fire,
        pb::CountEventsRequest {
            granularity: pb::Granularity::Hour as i32,
            group_by: vec![pb::CountDimension::Queue as i32],
            types: vec!["Object Car".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    for field in ["time_range", "group_by[0]", "types[0]"] {
        assert!(refused.message().contains(field), "{field}: {refused:?}");
    }
    let too_long = pb::CountEventsRequest {
        time_range: range(h0 - TimeDelta::days(40), h0),
        ..hourly(&[])
    };
    let refused = count_events(&mut client, &fire, too_long)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("31 days"), "{refused:?}");
    // Hours are kept 90 days by default; their days for good.
    let forgotten_hours = pb::CountEventsRequest {
        time_range: range(h0 - TimeDelta::days(100), h0 - TimeDelta::days(99)),
        ..hourly(&[])
    };
    let refused = count_events(&mut client, &fire, forgotten_hours)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("--hourly-count-retention"),
        "{refused:?}"
    );
    let no_granularity = pb::CountEventsRequest {
        granularity: 0,
        ..hourly(&[])
    };
    let refused = count_events(&mut client, &fire, no_granularity)
        .await
        .unwrap_err();
    assert!(refused.message().contains("granularity"), "{refused:?}");
    // A gateway publishes; it does not read the wall.
    assert_eq!(
        count_events(&mut client, &gateway, hourly(&[]))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

#[sqlx::test(migrations = false)]
async fn counts_taken_while_batches_commit_and_compactions_run_add_up_to_what_was_stored(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-wall-busy",
        &["--count-compaction-interval", "20ms"],
    ))
    .await
    .expect("OCC starts");
    let since = (Utc::now() - TimeDelta::hours(2))
        .duration_trunc(TimeDelta::hours(1))
        .unwrap();
    const WRITERS: usize = 6;
    const CALLS: usize = 25;
    const EVENTS: usize = 40;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let grpc = occ.grpc.clone();
        writers.push(tokio::spawn(async move {
            let mut client = occ_tests::ingest(&grpc).await;
            for c in 0..CALLS {
                let events = (0..EVENTS)
                    .map(|i| {
                        let kind = ["object.car", "object.person", "noise.level"][i % 3];
                        let zone = format!("esil_{}", (w + i) % 4);
                        let at = since + TimeDelta::minutes(((c * EVENTS + i) % 120) as i64);
                        event(&format!("w{w}-c{c}-e{i}"), kind, &zone, at)
                    })
                    .collect();
                let results = client
                    .publish_events(pb::PublishEventsRequest { events })
                    .await
                    .expect("publish")
                    .into_inner()
                    .results;
                assert!(
                    results
                        .iter()
                        .all(|r| r.outcome() == pb::PublishOutcome::Accepted)
                );
            }
        }));
    }
    let mut client = StatsServiceClient::new(channel(&occ.grpc).await);
    let total = pb::CountEventsRequest {
        time_range: range(since, since + TimeDelta::hours(3)),
        granularity: pb::Granularity::Hour as i32,
        group_by: vec![pb::CountDimension::Type as i32],
        ..Default::default()
    };
    let sum = |answer: pb::CountEventsResponse| answer.counts.iter().map(|c| c.count).sum::<i64>();
    // While they commit, a count never goes down and never exceeds what was sent.
    let mut last = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        let now = sum(client
            .count_events(total.clone())
            .await
            .unwrap()
            .into_inner());
        assert!(now >= last, "a count went down: {last} → {now}");
        assert!(now <= (WRITERS * CALLS * EVENTS) as i64);
        last = now;
    }
    for w in writers {
        w.await.expect("writer");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, (WRITERS * CALLS * EVENTS) as i64);
    assert_eq!(
        sum(client
            .count_events(total.clone())
            .await
            .unwrap()
            .into_inner()),
        stored
    );
    let folded: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(n), 0)::int8 FROM event_counts_hourly")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(folded > 0, "compactions ran while the batches committed");
    // Per day, from the daily counts and what is left to fold: the same.
    let per_day = pb::CountEventsRequest {
        time_range: range(since - TimeDelta::days(1), since + TimeDelta::days(1)),
        granularity: pb::Granularity::Day as i32,
        ..total
    };
    assert_eq!(
        sum(client.count_events(per_day).await.unwrap().into_inner()),
        stored
    );
}

#[sqlx::test(migrations = false)]
async fn a_time_zone_postgresql_does_not_know_stops_the_start(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let Err(refused) = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-wall-tz",
        &["--time-zone", "Mars/Olympus_Mons"],
    ))
    .await
    else {
        panic!("OCC started with a time zone PostgreSQL does not know");
    };
    let message = format!("{refused:#}");
    assert!(message.contains("--time-zone"), "{message}");
    assert!(message.contains("Mars/Olympus_Mons"), "{message}");
}
