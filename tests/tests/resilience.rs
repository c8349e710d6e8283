//! What happens when things fail: OCC killed mid-stream, stopped with SIGTERM, or cut off
//! from PostgreSQL. Nothing accepted is lost and nothing is counted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use occ_tests::{
    Broker, DbProxy, Occ, OccProcess, Publisher, database_server, database_url, event_count,
    eventually, expect_exactly, health, publish_stream, serve_args, stream_event,
};
use sqlx::PgPool;
use tonic_health::pb::health_check_response::ServingStatus;

const OCC: &str = env!("CARGO_BIN_EXE_occ-under-test");

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

/// PostgreSQL goes away: health says NOT_SERVING even while no event arrives to notice it,
/// ingest pauses (nothing acked) and resumes by itself when it comes back, with nothing lost.
#[sqlx::test(migrations = false)]
async fn a_database_outage_pauses_ingest_and_it_resumes_by_itself(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let proxy = DbProxy::start(database_server()).await.expect("proxy");
    let occ = Occ::start(serve_args(
        &proxy.url_for(&database_url(&pool)),
        broker.port,
        "occ-outage",
        &[],
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
    // No traffic: only OCC's own probe can notice.
    eventually(Duration::from_secs(10), "health NOT_SERVING", || async {
        (health(&occ.grpc).await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    publish_stream(&mut publisher, 100..300).await;
    publisher.flush().await;
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

/// Runs `mosquitto_ctrl dynsec` against `broker` as its administrator.
fn dynsec(broker: &Broker, args: &[&str]) {
    let status = std::process::Command::new("mosquitto_ctrl")
        .args([
            "-p",
            &broker.port.to_string(),
            "-u",
            "admin",
            "-P",
            "admin-pw",
        ])
        .arg("dynsec")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("mosquitto_ctrl (mosquitto package)");
    assert!(status.success(), "mosquitto_ctrl dynsec {args:?}");
}

/// A broker that refuses OCC's subscription (its access control does not grant it yet): OCC
/// says NOT_SERVING instead of idling as if all were well, asks again by itself, and takes
/// events as soon as the broker grants it, without a reconnect.
#[sqlx::test(migrations = false)]
async fn a_refused_subscription_is_retried_and_health_says_so(pool: PgPool) {
    let config = std::env::temp_dir().join(format!("occ-dynsec-{}.json", uuid::Uuid::now_v7()));
    let made = std::process::Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&config)
        .args(["admin", "admin-pw"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mosquitto_ctrl (mosquitto package)");
    assert!(made.success());
    let plugin = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join("mosquitto_dynamic_security.so"))
    .find(|p| p.exists())
    .expect("mosquitto's dynamic security plugin (mosquitto package)");
    let broker = Broker::start_with(|_| {
        format!(
            "plugin {}\nplugin_opt_config_file {}\n",
            plugin.display(),
            config.display()
        )
    })
    .await
    .expect("broker");
    // Anonymous clients (OCC here) may publish, but not subscribe.
    dynsec(&broker, &["createGroup", "anonymous"]);
    dynsec(&broker, &["setAnonymousGroup", "anonymous"]);
    dynsec(&broker, &["createRole", "occ"]);
    dynsec(&broker, &["addGroupRole", "anonymous", "occ"]);
    dynsec(
        &broker,
        &["addRoleACL", "occ", "publishClientSend", "#", "allow"],
    );

    let occ = Occ::launch(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-refused",
        &[],
    ))
    .await
    .expect("occ starts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        health(&occ.grpc).await,
        Some(ServingStatus::NotServing),
        "not serving while the subscription is refused"
    );

    dynsec(
        &broker,
        &["addRoleACL", "occ", "subscribePattern", "#", "allow"],
    );
    eventually(Duration::from_secs(20), "subscribed on a retry", || async {
        (health(&occ.grpc).await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let mut publisher = Publisher::connect(broker.port).await;
    publish_stream(&mut publisher, 0..10).await;
    expect_exactly(&pool, 10).await;
    occ.stop().await.expect("stop");
    let _ = std::fs::remove_file(config);
}

/// A backlog of thousands of messages waits in OCC's session while OCC is stopped; on resume
/// the broker sends far more than the receive maximum OCC announced (Mosquitto does). OCC
/// holds no more than that many in memory, and stores every message.
#[sqlx::test(migrations = false)]
async fn a_backlog_never_fills_memory_beyond_the_receive_maximum(pool: PgPool) {
    const N: usize = 4000;
    const WINDOW: &str = "20";
    let broker = Broker::start().await.expect("broker");
    let args = serve_args(
        &database_url(&pool),
        broker.port,
        "occ-backlog",
        &["--mqtt-receive-maximum", WINDOW, "--batch-size", "10"],
    );
    // The session is made, then OCC goes away and the backlog builds up.
    Occ::start(args.clone())
        .await
        .expect("occ starts")
        .stop()
        .await
        .expect("stop");
    let mut publisher = Publisher::connect(broker.port).await;
    publish_stream(&mut publisher, 0..N).await;
    publisher.flush().await;

    let occ = Occ::start(args).await.expect("occ restarts");
    expect_exactly(&pool, N).await;
    let peak = occ.inbox_peak();
    assert!(
        (1..=20).contains(&peak),
        "at most the receive maximum waited in OCC's inbox, not {peak}"
    );
    occ.stop().await.expect("stop");
}

async fn session_started(pool: &PgPool, client_id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT started_at FROM mqtt_sessions WHERE client_id = $1")
        .bind(client_id)
        .fetch_optional(pool)
        .await
        .expect("mqtt_sessions")
}

/// A broker restarted without its sessions numbers OCC's packet ids from 1 again. A message
/// without an id that the new session redelivers (OCC received it, could not commit it, and
/// was killed) must not be taken for the old session's message with the same bytes and the
/// same packet id: it is stored.
#[sqlx::test(migrations = false)]
async fn a_new_broker_session_is_never_confused_with_the_old_one(pool: PgPool) {
    const CLIENT: &str = "occ-sessions";
    let mut broker = Broker::start().await.expect("broker");
    let proxy = DbProxy::start(database_server()).await.expect("proxy");
    let metrics = format!("127.0.0.1:{}", occ_tests::free_port());
    let args = serve_args(
        &proxy.url_for(&database_url(&pool)),
        broker.port,
        CLIENT,
        &["--metrics-listen", &metrics],
    );
    let press = br#"{"type": "panic.pressed", "zone": "esil_transit_stop_1"}"#.to_vec();

    let occ = OccProcess::start(OCC, &args).await.expect("occ starts");
    // Recorded in the background once the broker says the session is new.
    let first_session = eventually(Duration::from_secs(10), "the session recorded", || {
        session_started(&pool, CLIENT)
    })
    .await;
    let mut publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("occ/v1/events/panic-1", press.clone())
        .await;
    publisher.flush().await;
    expect_exactly(&pool, 1).await;

    // The broker loses every session; OCC reconnects into a new one.
    broker.restart().await.expect("broker restarts");
    eventually(
        Duration::from_secs(20),
        "a new session recorded",
        || async {
            session_started(&pool, CLIENT)
                .await
                .filter(|s| *s > first_session)
                .map(|_| ())
        },
    )
    .await;
    eventually(Duration::from_secs(20), "subscribed again", || async {
        (health(&occ.grpc).await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    // A sign of loss OCC cannot prevent (what the old session held is gone): said and counted.
    let lost = occ_tests::sample(
        &occ_tests::scrape(&metrics).await,
        "occ_mqtt_sessions_lost_total",
    );
    assert_eq!(lost, Some(1.0), "the lost session is counted");

    // Pressed again; OCC receives it (packet id 1 of the new session) but cannot commit it,
    // and dies. The broker redelivers it to the restarted OCC, with DUP set.
    proxy.cut();
    let mut publisher = Publisher::connect(broker.port).await;
    publisher.publish("occ/v1/events/panic-1", press).await;
    publisher.flush().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    occ.kill().await.expect("kill");
    proxy.restore();
    let occ = OccProcess::start(OCC, &args).await.expect("occ restarts");
    expect_exactly(&pool, 2).await;
    occ.terminate().await.expect("stop");
}

/// The broker is restarted (SIGTERM, with persistence) in the middle of a stream, as a city's
/// IT does for an upgrade. One instance subscribes plainly (the default), so its subscription
/// is part of its session and comes back with the broker's snapshot: every event published
/// before, during the restart's aftermath and after is stored, once.
#[sqlx::test(migrations = false)]
async fn a_broker_restarted_mid_stream_loses_nothing(pool: PgPool) {
    const N: usize = 1000;
    let mut broker = Broker::start_persistent(30).await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-broker-restart",
        &[],
    ))
    .await
    .expect("occ starts");
    let mut publisher = Publisher::connect(broker.port).await;
    publish_stream(&mut publisher, 0..N / 2).await;
    publisher.flush().await;

    broker.restart_gracefully().await.expect("broker restarts");
    // Published at once, before OCC has even reconnected.
    let mut publisher = Publisher::connect(broker.port).await;
    publish_stream(&mut publisher, N / 2..N).await;
    publisher.flush().await;
    expect_exactly(&pool, N).await;
    assert_eq!(fire_event_count(&pool).await, [N as i32 / 2]);
    occ.stop().await.expect("stop");
}
