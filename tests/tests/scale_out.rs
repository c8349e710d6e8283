//! Several OCC instances sharing the stream through ingest slots, against a real Mosquitto,
//! which keeps handing an offline member of a shared subscription its share: an instance
//! killed for good, one stopped for a scale-down, one added (a container recreated elsewhere).
//! Every event the broker acknowledged is stored exactly once, within the bound the slots'
//! lease sets, and no session is left that nobody resumes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use occ_tests::{
    Broker, OccProcess, Publisher, database_url, event_count, eventually, expect_exactly,
    serve_args, stream_event,
};
use sqlx::PgPool;
use tokio::task::JoinHandle;

const OCC: &str = env!("CARGO_BIN_EXE_occ-under-test");

/// Each instance of a pair: two slots, `occ-pair` and `occ-pair-2`.
fn pair_args(pool: &PgPool, broker: &Broker, lease: &str) -> Vec<String> {
    serve_args(
        &database_url(pool),
        broker.port,
        "occ-pair",
        &[
            "--mqtt-slots",
            "2",
            "--mqtt-slot-lease",
            lease,
            "--batch-size",
            "50",
        ],
    )
}

/// Who holds each slot (the holder's host/pid), by client id.
async fn holders(pool: &PgPool) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT client_id, holder_name FROM ingest_slots ORDER BY client_id")
        .fetch_all(pool)
        .await
        .expect("ingest slots")
}

/// Waits until the slots are held by `n` different instances.
async fn held_by(pool: &PgPool, n: usize) -> Vec<(String, Option<String>)> {
    eventually(
        Duration::from_secs(20),
        &format!("the slots held by {n} instance(s)"),
        || async {
            let h = holders(pool).await;
            let distinct: BTreeSet<_> = h.iter().filter_map(|(_, who)| who.clone()).collect();
            (h.len() == 2 && h.iter().all(|(_, who)| who.is_some()) && distinct.len() == n)
                .then_some(h)
        },
    )
    .await
}

/// Two instances with two slots, one slot each.
async fn start_pair(
    pool: &PgPool,
    broker: &Broker,
    lease: &str,
) -> (Vec<String>, OccProcess, OccProcess) {
    let args = pair_args(pool, broker, lease);
    let a = OccProcess::start(OCC, &args).await.expect("first instance");
    let b = OccProcess::start(OCC, &args)
        .await
        .expect("second instance");
    held_by(pool, 2).await;
    (args, a, b)
}

/// Waits until only the first slot is left: the second was retired.
async fn second_slot_retired(pool: &PgPool) {
    eventually(
        Duration::from_secs(20),
        "the second slot retired",
        || async {
            let slots: Vec<String> =
                sqlx::query_scalar("SELECT client_id FROM ingest_slots ORDER BY client_id")
                    .fetch_all(pool)
                    .await
                    .expect("slots");
            (slots == ["occ-pair"]).then_some(())
        },
    )
    .await;
}

/// Publishes `n` stream events at about 1,000 a second; the count published so far is kept
/// in the returned counter.
fn produce(broker: &Broker, n: usize) -> (Arc<AtomicUsize>, JoinHandle<()>) {
    let published = Arc::new(AtomicUsize::new(0));
    let progress = published.clone();
    let port = broker.port;
    let producer = tokio::spawn(async move {
        let mut publisher = Publisher::connect(port).await;
        for i in 0..n {
            let (topic, payload) = stream_event(i);
            publisher.publish(&topic, payload).await;
            progress.store(i + 1, Ordering::SeqCst);
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        publisher.flush().await;
    });
    (published, producer)
}

async fn stored_at_least(pool: &PgPool, n: usize) {
    eventually(
        Duration::from_secs(30),
        &format!("{n} events stored"),
        || async { (event_count(pool).await >= n as i64).then_some(()) },
    )
    .await;
}

/// Two instances split the stream; one is SIGKILLed and never comes back. Mosquitto goes on
/// handing its session its share, but the survivor takes the dead instance's slot over when
/// the lease runs out and drains that session: every event is stored exactly once, within the
/// lease (3 s here) and a few seconds after the kill. A third instance started afterwards (a
/// container recreated under another name) takes a slot over from the survivor while the
/// stream goes on, and the broker never sees a client id outside the slots.
#[sqlx::test(migrations = false)]
async fn one_of_two_instances_killed_for_good_loses_nothing(pool: PgPool) {
    const N: usize = 6000;
    let broker = Broker::start().await.expect("broker");
    let (args, a, b) = start_pair(&pool, &broker, "3s").await;

    let (published, producer) = produce(&broker, N);
    stored_at_least(&pool, N / 6).await;
    a.kill().await.expect("SIGKILL");
    let killed = tokio::time::Instant::now();
    let at_kill = published.load(Ordering::SeqCst);
    assert!(
        at_kill < N / 2,
        "the stream goes on after the kill: {at_kill}"
    );

    // The survivor takes the dead instance's slot over and drains what waited in it.
    let survivor = held_by(&pool, 1).await;
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "slot taken over {:?} after the kill, the lease is 3 s",
        killed.elapsed()
    );
    stored_at_least(&pool, published.load(Ordering::SeqCst) * 9 / 10).await;

    // An instance added while the stream goes on gets a slot back from the survivor.
    let c = OccProcess::start(OCC, &args).await.expect("third instance");
    let shared = held_by(&pool, 2).await;
    assert_ne!(survivor, shared);

    producer.await.expect("producer");
    expect_exactly(&pool, N).await;

    let sessions: Vec<String> =
        sqlx::query_scalar("SELECT client_id FROM mqtt_sessions ORDER BY client_id")
            .fetch_all(&pool)
            .await
            .expect("sessions");
    assert_eq!(
        sessions,
        ["occ-pair", "occ-pair-2"],
        "only the slots' sessions"
    );
    for occ in [b, c] {
        assert!(occ.terminate().await.expect("SIGTERM").success());
    }
    assert!(
        holders(&pool).await.iter().all(|(_, who)| who.is_none()),
        "stopped instances give their slots up"
    );
}

/// Scale-down: one of two instances is stopped with SIGTERM in the middle of the stream. It
/// commits its batch in hand and gives its slot up at once, so the other instance resumes its
/// session long before the lease (60 s here) could have run out, and nothing published after
/// the stop waits for an instance that will not return.
#[sqlx::test(migrations = false)]
async fn an_instance_removed_from_the_group_loses_nothing(pool: PgPool) {
    const N: usize = 4000;
    let broker = Broker::start().await.expect("broker");
    let (_, a, b) = start_pair(&pool, &broker, "60s").await;

    let (_, producer) = produce(&broker, N);
    stored_at_least(&pool, N / 4).await;
    let status = a.terminate().await.expect("SIGTERM");
    assert!(status.success(), "{status}");
    let stopped = tokio::time::Instant::now();
    held_by(&pool, 1).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "the slot was handed over {:?} after the stop",
        stopped.elapsed()
    );

    producer.await.expect("producer");
    expect_exactly(&pool, N).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(40),
        "everything stored {:?} after the stop, before the 60 s lease",
        stopped.elapsed()
    );
    assert!(b.terminate().await.expect("SIGTERM").success());
}

/// Growing from one slot (a plain subscription under `occ-pair`) to two (a shared one): the
/// session under `occ-pair` still holds its plain subscription, which would bring it every
/// message besides its share (events without a producer id stored twice). OCC drops it once
/// the shared one is granted: exactly one event per message.
#[sqlx::test(migrations = false)]
async fn growing_to_several_slots_drops_the_plain_subscription(pool: PgPool) {
    const N: usize = 1000;
    let broker = Broker::start().await.expect("broker");
    let single = serve_args(&database_url(&pool), broker.port, "occ-pair", &[]);
    let occ = OccProcess::start(OCC, &single).await.expect("one slot");
    let mut publisher = Publisher::connect(broker.port).await;
    occ_tests::publish_stream(&mut publisher, 0..N).await;
    publisher.flush().await;
    expect_exactly(&pool, N).await;
    assert!(occ.terminate().await.expect("SIGTERM").success());

    let (_, a, b) = start_pair(&pool, &broker, "3s").await;
    // What the session under `occ-pair` holds now, as OCC recorded it once the plain
    // subscription was dropped.
    eventually(
        Duration::from_secs(10),
        "the shared subscriptions recorded",
        || async {
            let recorded: Vec<String> = sqlx::query_scalar(
                "SELECT unnest(subscriptions) FROM ingest_slots WHERE client_id = 'occ-pair'",
            )
            .fetch_all(&pool)
            .await
            .expect("subscriptions");
            (!recorded.is_empty() && recorded.iter().all(|s| s.starts_with("$share/occ-pair/")))
                .then_some(())
        },
    )
    .await;
    occ_tests::publish_stream(&mut publisher, N..2 * N).await;
    publisher.flush().await;
    expect_exactly(&pool, 2 * N).await;
    for occ in [a, b] {
        assert!(occ.terminate().await.expect("SIGTERM").success());
    }
}

/// Lowering the number of slots from two to one while OCC is down and events queue for both
/// sessions: the instance started with one slot retires the other: it drains the session
/// (the half of the stream queued there is stored), ends it on the broker and deletes the
/// slot. Events published afterwards all arrive: no session is left in the group to take a
/// share nobody reads.
#[sqlx::test(migrations = false)]
async fn lowering_the_slots_drains_and_ends_the_sessions_left_over(pool: PgPool) {
    const N: usize = 1000;
    let broker = Broker::start().await.expect("broker");
    let (_, a, b) = start_pair(&pool, &broker, "3s").await;
    let mut publisher = Publisher::connect(broker.port).await;
    occ_tests::publish_stream(&mut publisher, 0..N).await;
    publisher.flush().await;
    expect_exactly(&pool, N).await;
    for occ in [a, b] {
        assert!(occ.terminate().await.expect("SIGTERM").success());
    }
    // Both sessions stay in the group and queue their shares while nobody reads.
    occ_tests::publish_stream(&mut publisher, N..2 * N).await;
    publisher.flush().await;

    let single = serve_args(&database_url(&pool), broker.port, "occ-pair", &[]);
    let occ = OccProcess::start(OCC, &single).await.expect("one slot");
    expect_exactly(&pool, 2 * N).await;
    second_slot_retired(&pool).await;
    let sessions: Vec<String> = sqlx::query_scalar("SELECT client_id FROM mqtt_sessions")
        .fetch_all(&pool)
        .await
        .expect("sessions");
    assert_eq!(sessions, ["occ-pair"]);

    occ_tests::publish_stream(&mut publisher, 2 * N..3 * N).await;
    publisher.flush().await;
    expect_exactly(&pool, 3 * N).await;
    assert!(occ.terminate().await.expect("SIGTERM").success());
}

/// A rolling change from two slots to one: an instance still on two slots holds both when one
/// on a single slot starts. The old instance drains the slot that is now retiring and ends its
/// session; then the old instance stops and the new one takes the remaining slot over. Events
/// published all along (with producer ids: for the moment a slot holds its old and new
/// subscriptions together, a message comes twice) are all stored.
#[sqlx::test(migrations = false)]
async fn lowering_the_slots_while_an_old_instance_runs_loses_nothing(pool: PgPool) {
    const N: usize = 3000;
    let broker = Broker::start().await.expect("broker");
    let old = OccProcess::start(OCC, &pair_args(&pool, &broker, "3s"))
        .await
        .expect("an instance on two slots");
    held_by(&pool, 1).await;
    let port = broker.port;
    let producer = tokio::spawn(async move {
        let mut publisher = Publisher::connect(port).await;
        for i in 0..N {
            let payload = serde_json::json!({"id": format!("r{i}"), "type": "object.person"});
            publisher
                .publish(
                    &format!("occ/v1/events/dev-{}", i % 17),
                    payload.to_string(),
                )
                .await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        publisher.flush().await;
    });
    stored_at_least(&pool, N / 5).await;
    let single = serve_args(&database_url(&pool), broker.port, "occ-pair", &[]);
    let new = OccProcess::start(OCC, &single)
        .await
        .expect("an instance on one slot");
    second_slot_retired(&pool).await;
    assert!(old.terminate().await.expect("SIGTERM").success());
    producer.await.expect("producer");
    expect_exactly(&pool, N).await;
    assert!(new.terminate().await.expect("SIGTERM").success());
}
