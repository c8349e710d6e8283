//! What happens when things fail: OCC killed mid-stream, stopped with SIGTERM, or cut off
//! from PostgreSQL. Nothing accepted is lost and nothing is counted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use occ_tests::{
    Broker, DbProxy, Occ, OccProcess, Publisher, database_server, database_url, event_count,
    eventually, health, serve_args,
};
use serde_json::json;
use sqlx::PgPool;
use tonic_health::pb::health_check_response::ServingStatus;

const OCC: &str = env!("CARGO_BIN_EXE_occ-under-test");

/// Event `i` of a stream: every other one is smoke in the same block (one incident), the rest
/// people on camera (no incident).
fn stream_event(i: usize) -> (String, Vec<u8>) {
    let payload = if i.is_multiple_of(2) {
        json!({"id": format!("s{i}"), "type": "smoke.detected", "zone": "esil_residential_9"})
    } else {
        json!({"id": format!("p{i}"), "type": "object.person", "zone": "esil_street_1", "confidence": 0.8})
    };
    (
        format!("occ/v1/events/dev-{}", i % 17),
        payload.to_string().into_bytes(),
    )
}

async fn publish_stream(publisher: &mut Publisher, events: std::ops::Range<usize>) {
    for i in events {
        let (topic, payload) = stream_event(i);
        publisher.publish(&topic, payload).await;
    }
}

/// Waits until `n` events are stored, then a moment more, and checks that no more arrive
/// (redeliveries of committed messages must not add any).
async fn expect_exactly(pool: &PgPool, n: usize) {
    eventually(Duration::from_secs(60), "all events", || async {
        (event_count(pool).await >= n as i64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(event_count(pool).await, n as i64);
}

async fn fire_event_count(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar("SELECT event_count FROM incidents ORDER BY created_at")
        .fetch_all(pool)
        .await
        .expect("incidents")
}

/// OCC is SIGKILLed in the middle of a stream of N events and restarted: exactly N events are
/// stored, and the incident counts each of its events once.
#[sqlx::test(migrations = false)]
async fn killed_mid_stream_and_restarted_ends_with_exactly_n_events(pool: PgPool) {
    const N: usize = 3000;
    let broker = Broker::start().await.expect("broker");
    let args = serve_args(
        &database_url(&pool),
        broker.port,
        "occ-kill",
        &["--batch-size", "50"],
    );
    let occ = OccProcess::start(OCC, &args).await.expect("occ starts");

    // A producer publishing steadily, whatever happens to OCC.
    let published = Arc::new(AtomicUsize::new(0));
    let progress = published.clone();
    let mut publisher = Publisher::connect(broker.port).await;
    let producer = tokio::spawn(async move {
        for i in 0..N {
            let (topic, payload) = stream_event(i);
            publisher.publish(&topic, payload).await;
            progress.store(i + 1, Ordering::SeqCst);
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        publisher.flush().await;
    });

    // Kill it while it is working through the stream.
    eventually(
        Duration::from_secs(20),
        "a quarter of the stream stored",
        || async { (event_count(&pool).await >= (N / 4) as i64).then_some(()) },
    )
    .await;
    occ.kill().await.expect("SIGKILL");
    let at_kill = published.load(Ordering::SeqCst);
    let stored_at_kill = event_count(&pool).await;
    assert!(
        at_kill < N,
        "the stream was still being published: {at_kill}"
    );
    assert!(stored_at_kill < N as i64, "{stored_at_kill}");

    // The rest arrives while OCC is down: the broker keeps it in OCC's session.
    producer.await.expect("producer");
    let occ = OccProcess::start(OCC, &args).await.expect("occ restarts");
    expect_exactly(&pool, N).await;
    assert_eq!(
        fire_event_count(&pool).await,
        [(N / 2) as i32],
        "one incident, each event once"
    );
    let status = occ.terminate().await.expect("SIGTERM");
    assert!(status.success(), "{status}");
}

/// SIGTERM: OCC stops taking messages, commits and acks the batch in hand, disconnects and
/// exits 0. What it had not taken waits in the broker for the next start.
#[sqlx::test(migrations = false)]
async fn sigterm_stops_cleanly_and_loses_nothing(pool: PgPool) {
    const N: usize = 2000;
    let broker = Broker::start().await.expect("broker");
    let args = serve_args(
        &database_url(&pool),
        broker.port,
        "occ-term",
        &["--batch-size", "50"],
    );
    let occ = OccProcess::start(OCC, &args).await.expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        let (topic, payload) = stream_event(i);
        publisher.publish(&topic, payload).await;
        if i == N / 4 {
            publisher.flush().await;
        }
    }
    eventually(Duration::from_secs(20), "ingest under way", || async {
        (event_count(&pool).await > 0).then_some(())
    })
    .await;
    let status = occ.terminate().await.expect("SIGTERM");
    assert!(status.success(), "exit status {status}");
    publisher.flush().await;

    let occ = OccProcess::start(OCC, &args).await.expect("occ restarts");
    expect_exactly(&pool, N).await;
    assert_eq!(fire_event_count(&pool).await, [(N / 2) as i32]);
    occ.terminate().await.expect("SIGTERM");
}

/// PostgreSQL goes away: ingest pauses (nothing acked, health NOT_SERVING) and resumes by
/// itself when it comes back, with nothing lost.
#[sqlx::test(migrations = false)]
async fn a_database_outage_pauses_ingest_and_it_resumes_by_itself(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let proxy = DbProxy::start(database_server()).await.expect("proxy");
    let occ = Occ::start(serve_args(
        &proxy.url_for(&database_url(&pool)),
        broker.port,
        "occ-outage",
        &["--database-acquire-timeout", "1s"],
    ))
    .await
    .expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    publish_stream(&mut publisher, 0..100).await;
    eventually(Duration::from_secs(10), "the first 100 events", || async {
        (event_count(&pool).await == 100).then_some(())
    })
    .await;

    proxy.cut();
    publish_stream(&mut publisher, 100..300).await;
    publisher.flush().await;
    eventually(Duration::from_secs(15), "health NOT_SERVING", || async {
        (health(&occ.grpc).await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        event_count(&pool).await,
        100,
        "nothing stored while the database is away"
    );

    proxy.restore();
    eventually(Duration::from_secs(30), "the backlog stored", || async {
        (event_count(&pool).await == 300).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "health SERVING again", || async {
        (health(&occ.grpc).await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    assert_eq!(fire_event_count(&pool).await, [150]);
    occ.stop().await.expect("stop");
}
