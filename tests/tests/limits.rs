//! Abuse and overload limits, tried from outside: a source flooding the broker is throttled to
//! dead letters while another source's events still open incidents; a principal calling too
//! fast is told how long to wait; a principal's watch streams are capped.

use std::time::Duration;

use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::key_service_client::KeyServiceClient;
use occ_tests::{Broker, Occ, Publisher, database_url, eventually, serve_args, with_key};
use sqlx::PgPool;
use tonic::Code;

#[sqlx::test(migrations = false)]
async fn a_flooding_source_is_throttled_while_others_still_open_incidents(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-flood",
        &["--ingest-source-rate", "5", "--ingest-source-burst", "10"],
    ))
    .await
    .expect("OCC starts");
    let mut publisher = Publisher::connect(broker.port).await;
    // A detector gone mad: 200 readings at once.
    for i in 0..200 {
        let payload = serde_json::json!({"id": format!("r{i}"), "type": "smoke.detected", "zone": "esil_residential_3"});
        publisher
            .publish("occ/v1/events/det-flood", payload.to_string())
            .await;
    }
    // Meanwhile someone presses a panic button.
    let press = serde_json::json!({"id": "press-1", "type": "panic.pressed", "zone": "esil_transit_stop_2"});
    publisher
        .publish("occ/v1/events/panic-2", press.to_string())
        .await;
    publisher.flush().await;

    let (stored, throttled) = eventually(Duration::from_secs(30), "every message accounted for", || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE source_id = 'det-flood'")
            .fetch_one(&pool)
            .await
            .expect("count");
        let throttled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dead_letters WHERE topic = 'occ/v1/events/det-flood' AND reason LIKE '%throttled%'",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        (stored + throttled == 200).then_some((stored, throttled))
    })
    .await;
    assert!(
        (10..=20).contains(&stored),
        "the burst and a little more: {stored}"
    );
    assert_eq!(
        throttled,
        200 - stored,
        "nothing lost: the rest is in dead letters"
    );
    let reason: String = sqlx::query_scalar("SELECT reason FROM dead_letters LIMIT 1")
        .fetch_one(&pool)
        .await
        .expect("reason");
    assert!(
        reason.contains("det-flood") && reason.contains("5 events a second"),
        "{reason}"
    );
    // Published last, the press may be in a batch that commits after the flood's.
    eventually(
        Duration::from_secs(10),
        "the panic button still opened its incident",
        || async {
            let panic: i64 =
                sqlx::query_scalar("SELECT count(*) FROM incidents WHERE category = 'panic_alarm'")
                    .fetch_one(&pool)
                    .await
                    .expect("incidents");
            (panic == 1).then_some(())
        },
    )
    .await;
    occ.stop().await.expect("stop");
}

/// A secure OCC with `extra` flags; its admin key.
async fn secure(pool: &PgPool, broker: &Broker, extra: &[&str]) -> (Occ, String) {
    occ_tests::secure::start(pool, broker, "occ-limits", extra).await
}

#[sqlx::test(migrations = false)]
async fn a_principal_over_its_rate_is_told_when_to_retry(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = secure(
        &pool,
        &broker,
        &["--grpc-rate-limit", "2", "--grpc-rate-burst", "5"],
    )
    .await;
    let desk = KeyServiceClient::connect(occ.grpc.clone())
        .await
        .expect("connect")
        .create_key(with_key(
            &admin,
            pb::CreateKeyRequest {
                name: "desk".into(),
                roles: vec!["dispatcher".into()],
                queues: vec!["police".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("a key")
        .into_inner()
        .secret;
    let mut client = DispatchServiceClient::connect(occ.grpc.clone())
        .await
        .expect("connect");
    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(
            client
                .list_queues(with_key(&admin, pb::ListQueuesRequest {}))
                .await,
        );
    }
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    assert!(
        (4..=5).contains(&ok),
        "what is left of the burst passes: {ok}"
    );
    let refused = answers
        .into_iter()
        .find_map(Result::err)
        .expect("a refusal");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry = tonic_types::StatusExt::get_details_retry_info(&refused)
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(500),
        "{retry:?}"
    );
    // Another principal is not held back by this one.
    assert!(
        client
            .list_queues(with_key(&desk, pb::ListQueuesRequest {}))
            .await
            .is_ok()
    );
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_principal_may_hold_only_so_many_watch_streams(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = secure(&pool, &broker, &["--grpc-max-streams-per-principal", "2"]).await;
    let mut client = IncidentServiceClient::connect(occ.grpc.clone())
        .await
        .expect("connect");
    let watch = |client: &mut IncidentServiceClient<tonic::transport::Channel>| {
        let request = with_key(&admin, pb::WatchIncidentsRequest::default());
        let mut client = client.clone();
        async move { client.watch_incidents(request).await }
    };
    let first = watch(&mut client).await.expect("first stream");
    let _second = watch(&mut client).await.expect("second stream");
    let third = watch(&mut client).await.expect_err("a third is refused");
    assert_eq!(third.code(), Code::ResourceExhausted);
    drop(first);
    eventually(Duration::from_secs(10), "a place is free again", || {
        let mut client = client.clone();
        let admin = admin.clone();
        async move {
            client
                .watch_incidents(with_key(&admin, pb::WatchIncidentsRequest::default()))
                .await
                .ok()
        }
    })
    .await;
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn connections_past_the_cap_are_refused_until_one_closes(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-conns",
        &["--grpc-max-connections", "2"],
    ))
    .await
    .expect("OCC starts");
    let console = || async {
        let mut client = DispatchServiceClient::connect(occ.grpc.clone()).await?;
        client.list_queues(pb::ListQueuesRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error>>(client)
    };
    let mut first = console().await.expect("the first console connects");
    let mut second = console().await.expect("the second console connects");
    let third = console().await.expect_err("a third is refused");
    assert!(
        third.to_string().contains("transport") || third.to_string().contains("navailable"),
        "closed at once, not kept waiting: {third}"
    );
    // The two connected consoles are still served.
    for client in [&mut first, &mut second] {
        client
            .list_queues(pb::ListQueuesRequest {})
            .await
            .expect("still served");
    }
    drop(first);
    eventually(Duration::from_secs(10), "a place is free again", || async {
        console().await.ok()
    })
    .await;
    drop(second);
    occ.stop().await.expect("stop");
}
