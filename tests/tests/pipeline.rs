//! Events over MQTT become incidents visible over gRPC: the whole path through a real
//! Mosquitto, PostgreSQL and OCC.

use std::time::Duration;

use occ_proto::v1 as pb;
use occ_tests::{
    Broker, Occ, Publisher, database_url, event_count, eventually, incidents, refuse_poison,
    serve_args,
};
use serde_json::json;
use sqlx::PgPool;

fn smoke(id: &str, zone: &str) -> Vec<u8> {
    json!({
        "id": id,
        "type": "smoke.detected",
        "severity": "major",
        "location": {"lat": 51.128207, "lon": 71.430411},
        "zone": zone,
        "confidence": 0.97,
        "measurements": {"obscuration_pct_per_m": 4.1},
        "attributes": {"building": "Mangilik El 55/12", "floor": "7"}
    })
    .to_string()
    .into_bytes()
}

/// `n` smoke alarms from thirty detectors in one residential block (one correlation key),
/// published at once; returns when all are stored.
async fn smoke_in_one_block(broker_port: u16, pool: &PgPool, n: usize) {
    let mut publisher = Publisher::connect(broker_port).await;
    for i in 0..n {
        publisher
            .publish(
                &format!("occ/v1/events/det-{}", i % 30),
                smoke(&format!("e{i}"), "esil_residential_2"),
            )
            .await;
    }
    publisher.flush().await;
    eventually(Duration::from_secs(20), "all events stored", || async {
        (event_count(pool).await == n as i64).then_some(())
    })
    .await;
}

async fn list_all(grpc: &str) -> Vec<pb::Incident> {
    incidents(grpc)
        .await
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .expect("ListIncidents")
        .into_inner()
        .incidents
}

#[sqlx::test(migrations = false)]
async fn an_mqtt_event_becomes_an_incident_visible_over_grpc(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-e2e-1",
        &[],
    ))
    .await
    .expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("occ/v1/events/det-esil-0042", occ_tests::smoke_fixture())
        .await;

    let listed = eventually(Duration::from_secs(10), "an incident", || async {
        let all = list_all(&occ.grpc).await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(listed.len(), 1);
    let inc = &listed[0];
    assert!(inc.number.starts_with("INC-"), "{}", inc.number);
    assert_eq!(inc.queue, "fire");
    assert_eq!(inc.category, "fire");
    assert_eq!(inc.priority, pb::Priority::P1 as i32);
    assert_eq!(inc.status, pb::IncidentStatus::Queued as i32);
    assert_eq!(
        inc.title,
        "Smoke or fire detected in left_bank_residential_4"
    );
    assert_eq!(inc.event_count, 1);
    let location = inc.location.expect("location");
    assert!((location.lat - 51.128207).abs() < 1e-9);

    // The same incident by number, and its timeline: the event, then the audit entry.
    let mut client = incidents(&occ.grpc).await;
    let by_number = client
        .get_incident(pb::GetIncidentRequest {
            id: inc.number.clone(),
        })
        .await
        .expect("GetIncident")
        .into_inner()
        .incident
        .expect("incident");
    assert_eq!(by_number.id, inc.id);
    let timeline = client
        .get_timeline(pb::GetTimelineRequest {
            id: inc.id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetTimeline")
        .into_inner();
    let kinds: Vec<&str> = timeline
        .entries
        .iter()
        .map(|e| match &e.entry {
            Some(pb::timeline_entry::Entry::Event(ev)) => {
                assert_eq!(ev.external_id, "det-2026-11-25-000871");
                assert_eq!(ev.source_id, "det-esil-0042");
                "event"
            }
            Some(pb::timeline_entry::Entry::Audit(a)) => {
                assert_eq!(a.action, "incident.opened");
                assert_eq!(a.actor, "system:rules");
                "audit"
            }
            None => "none",
        })
        .collect();
    assert_eq!(kinds, ["event", "audit"]);
    occ.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
/// A producer's id sent twice is one event. The same bytes without an id sent twice are two
/// events: a panic button pressed twice is two presses (only a redelivery of one message is a
/// duplicate; see `resilience.rs` for those).
async fn a_message_with_an_id_published_twice_is_one_event_and_a_repeat_without_one_is_two(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-e2e-2",
        &[],
    ))
    .await
    .expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    // One with the producer's id, one without, one malformed.
    let no_id = br#"{"type": "panic.pressed", "zone": "esil_transit_stop_1"}"#.to_vec();
    for _ in 0..2 {
        publisher
            .publish("occ/v1/events/det-1", smoke("a-1", "zone_a"))
            .await;
        publisher
            .publish("occ/v1/events/panic-1", no_id.clone())
            .await;
        publisher
            .publish("occ/v1/events/cam-2", b"{not json".to_vec())
            .await;
    }
    // A marker published last: once it is stored, everything before it was processed.
    publisher
        .publish(
            "occ/v1/events/marker",
            br#"{"type": "test.marker"}"#.to_vec(),
        )
        .await;
    publisher.flush().await;

    eventually(Duration::from_secs(10), "the marker", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE source_id = 'marker'")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(
        event_count(&pool).await,
        4,
        "one smoke event, two presses and the marker"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .expect("dead letters");
    assert_eq!(dead, 1, "the malformed message is one dead letter");
    let all = list_all(&occ.grpc).await;
    let mut counts: Vec<(String, i64)> = all
        .iter()
        .map(|i| (i.queue.clone(), i.event_count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [("fire".to_owned(), 1), ("police".to_owned(), 2)],
        "{all:#?}"
    );
    occ.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn a_malformed_payload_is_dead_lettered_and_the_next_message_flows(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-e2e-3",
        &["--max-payload-bytes", "1024"],
    ))
    .await
    .expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    publisher
        .publish(
            "occ/v1/events/cam-7",
            b"{\"type\": \"object.person\", ".to_vec(),
        )
        .await;
    publisher
        .publish(
            "occ/v1/events/cam-7",
            br#"{"type": "object.person", "location": {"lat": 151.2, "lon": 71.4}}"#.to_vec(),
        )
        .await;
    let mut oversize = br#"{"type": "object.person", "attributes": {"note": ""#.to_vec();
    oversize.extend(std::iter::repeat_n(b'x', 2000));
    oversize.extend(br#""}}"#);
    publisher.publish("occ/v1/events/cam-7", oversize).await;
    publisher
        .publish("occ/v1/events/det-9", smoke("after-bad", "zone_b"))
        .await;

    let incident = eventually(
        Duration::from_secs(10),
        "the incident after the bad messages",
        || async { list_all(&occ.grpc).await.into_iter().next() },
    )
    .await;
    assert_eq!(incident.title, "Smoke or fire detected in zone_b");

    let rows: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT topic, reason, payload_size FROM dead_letters ORDER BY received_at, id",
    )
    .fetch_all(&pool)
    .await
    .expect("dead letters");
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(
        rows.iter()
            .all(|(topic, _, _)| topic == "occ/v1/events/cam-7")
    );
    assert!(
        rows[0].1.starts_with("invalid JSON envelope"),
        "{}",
        rows[0].1
    );
    assert!(
        rows[1]
            .1
            .contains("location.lat: must be between -90 and 90"),
        "{}",
        rows[1].1
    );
    assert!(
        rows[2].1.contains("over the limit of 1024 bytes"),
        "{}",
        rows[2].1
    );
    assert!(rows[2].2 > 2000, "the received size is recorded");
    let kept: Vec<u8> =
        sqlx::query_scalar("SELECT payload FROM dead_letters WHERE reason LIKE 'invalid JSON%'")
            .fetch_one(&pool)
            .await
            .expect("payload");
    assert_eq!(
        kept, b"{\"type\": \"object.person\", ",
        "the raw bytes are kept"
    );
    occ.stop().await.expect("clean stop");
}

/// Two instances share the subscription and the database; correlated events arrive at both
/// at once. The database keeps it to one incident holding every event.
#[sqlx::test(migrations = false)]
async fn two_instances_sharing_the_subscription_make_one_incident(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let url = database_url(&pool);
    let small_batches = [
        "--batch-size",
        "5",
        "--batch-deadline",
        "5ms",
        "--mqtt-share-group",
        "occ",
    ];
    let a = Occ::start(serve_args(&url, broker.port, "occ-e2e-a", &small_batches))
        .await
        .expect("first instance");
    let b = Occ::start(serve_args(&url, broker.port, "occ-e2e-b", &small_batches))
        .await
        .expect("second instance");

    const N: usize = 300;
    smoke_in_one_block(broker.port, &pool, N).await;

    let incidents = list_all(&a.grpc).await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0].event_count, N as i64);
    // The broker split the stream between them.
    let (by_a, by_b) = (a.ingested(), b.ingested());
    assert!(by_a > 0 && by_b > 0, "a took {by_a}, b took {by_b}");
    assert_eq!(by_a + by_b, N as u64);
    let linked: i64 = sqlx::query_scalar("SELECT count(*) FROM incident_events")
        .fetch_one(&pool)
        .await
        .expect("links");
    assert_eq!(linked, N as i64);
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// One instance committing several small batches at once: correlated events spread over
/// them still make one incident holding every event, every message is acked (a restart on
/// the same session gets nothing again), and asking for more batches at once than ingest
/// has connections stops the start.
#[sqlx::test(migrations = false)]
async fn batches_committed_at_once_make_one_incident_and_ack_every_message(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let url = database_url(&pool);
    let concurrent = [
        "--batch-size",
        "5",
        "--batch-deadline",
        "5ms",
        "--batches-in-flight",
        "4",
    ];
    let occ = Occ::start(serve_args(&url, broker.port, "occ-e2e-flight", &concurrent))
        .await
        .expect("OCC starts");
    const N: usize = 300;
    smoke_in_one_block(broker.port, &pool, N).await;
    let incidents = list_all(&occ.grpc).await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0].event_count, N as i64);
    eventually(Duration::from_secs(10), "every message acked", || async {
        (occ.ingested() == N as u64).then_some(())
    })
    .await;
    occ.stop().await.expect("clean stop");

    // The same session again: had an ack been left out, the broker would send that message
    // again at once.
    let again = Occ::start(serve_args(&url, broker.port, "occ-e2e-flight", &concurrent))
        .await
        .expect("OCC starts again");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(again.ingested(), 0, "nothing redelivered");
    assert_eq!(event_count(&pool).await, N as i64);
    again.stop().await.expect("clean stop");

    let Err(refused) = Occ::start(serve_args(
        &url,
        broker.port,
        "occ-e2e-flight",
        &[
            "--batches-in-flight",
            "5",
            "--database-ingest-connections",
            "4",
        ],
    ))
    .await
    else {
        panic!("OCC started with more batches in flight than ingest connections");
    };
    let message = format!("{refused:#}");
    assert!(message.contains("--batches-in-flight 5"), "{message}");
}

/// A value PostgreSQL refuses (here a trigger stands in for one) fails its batch: OCC then
/// stores the batch message by message, so only that message becomes a dead letter.
#[sqlx::test(migrations = false)]
async fn a_message_the_database_refuses_is_isolated_and_the_rest_is_stored(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-e2e-4",
        &["--batch-deadline", "500ms"],
    ))
    .await
    .expect("occ starts");
    refuse_poison(&pool).await;

    let mut publisher = Publisher::connect(broker.port).await;
    for i in 0..10 {
        let source = if i == 4 { "poison" } else { "det-1" };
        publisher
            .publish(
                &format!("occ/v1/events/{source}"),
                smoke(&format!("m{i}"), "zone_p"),
            )
            .await;
    }
    publisher.flush().await;
    eventually(
        Duration::from_secs(10),
        "nine events and one dead letter",
        || async {
            let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
                .fetch_one(&pool)
                .await
                .ok()?;
            (event_count(&pool).await == 9 && dead == 1).then_some(())
        },
    )
    .await;
    let reason: String = sqlx::query_scalar("SELECT reason FROM dead_letters")
        .fetch_one(&pool)
        .await
        .expect("reason");
    assert!(reason.starts_with("could not be stored"), "{reason}");
    let incidents = list_all(&occ.grpc).await;
    assert_eq!(incidents[0].event_count, 9);
    occ.stop().await.expect("stop");
}
