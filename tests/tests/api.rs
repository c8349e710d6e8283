//! The gRPC API over a real socket: ingest results, rules changed at run time and tried dry,
//! incident listing, errors mapped to codes with field-level details, health and reflection.

use std::time::Duration;

use occ_proto::v1 as pb;
use occ_tests::{
    Broker, Occ, database_url, event_count, eventually, get_incident, incidents, ingest,
    refuse_poison, rules, sample, scrape, serve_args,
};
use sqlx::PgPool;
use tonic::Code;
use tonic_types::StatusExt;

async fn start(pool: &PgPool, id: &str) -> (Broker, Occ) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(&database_url(pool), broker.port, id, &[]))
        .await
        .expect("occ starts");
    (broker, occ)
}

fn event(source: &str, external_id: &str, event_type: &str, zone: &str) -> pb::Event {
    pb::Event {
        source_id: source.into(),
        external_id: external_id.into(),
        r#type: event_type.into(),
        severity: pb::Severity::Major as i32,
        zone: zone.into(),
        location: Some(pb::GeoPoint {
            lat: 51.16,
            lon: 71.43,
        }),
        confidence: Some(0.9),
        ..Default::default()
    }
}

/// What `TestRule` says of `event` (against the rules in force, or against `draft`).
async fn dry_run(grpc: &str, event: &pb::Event, draft: Option<pb::Rule>) -> Vec<pb::RuleMatch> {
    rules(grpc)
        .await
        .test_rule(pb::TestRuleRequest {
            event: Some(event.clone()),
            rule: draft,
        })
        .await
        .expect("TestRule")
        .into_inner()
        .matches
}

async fn publish(grpc: &str, events: Vec<pb::Event>) -> Vec<pb::PublishResult> {
    ingest(grpc)
        .await
        .publish_events(pb::PublishEventsRequest { events })
        .await
        .expect("PublishEvents")
        .into_inner()
        .results
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[sqlx::test(migrations = false)]
async fn publish_events_answers_each_event_after_commit(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-1").await;
    let mut client = ingest(&occ.grpc).await;
    let mut invalid = event("det-3", "bad", "", "z");
    invalid.location = Some(pb::GeoPoint {
        lat: 100.0,
        lon: 0.0,
    });
    let results = client
        .publish_events(pb::PublishEventsRequest {
            events: vec![
                event("det-1", "a", "smoke.detected", "esil_residential_1"),
                event("det-1", "a", "smoke.detected", "esil_residential_1"),
                invalid,
                event("det-2", "", "smoke.detected", "esil_residential_1"),
                event("cam-1", "p", "object.person", "park_path"),
            ],
        })
        .await
        .expect("PublishEvents")
        .into_inner()
        .results;
    let outcomes: Vec<i32> = results.iter().map(|r| r.outcome).collect();
    use pb::PublishOutcome as O;
    assert_eq!(
        outcomes,
        [
            O::Accepted,
            O::Duplicate,
            O::Rejected,
            O::Accepted,
            O::Accepted
        ]
        .map(|o| o as i32)
    );
    assert_eq!(
        results[1].event_id, results[0].event_id,
        "a duplicate names the stored event"
    );
    let fields: Vec<&str> = results[2]
        .violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["type", "location.lat"]);

    // The first event opened the fire incident, the fourth joined it, the person opened none.
    assert_eq!(results[0].incidents.len(), 1);
    assert!(results[0].incidents[0].opened);
    assert_eq!(results[3].incidents[0].id, results[0].incidents[0].id);
    assert!(!results[3].incidents[0].opened);
    assert!(results[4].incidents.is_empty());

    // Answered after commit: visible at once.
    let incident = get_incident(&occ.grpc, &results[0].incidents[0].number).await;
    assert_eq!(incident.event_count, 2);
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE transport = 'grpc'")
            .fetch_one(&pool)
            .await
            .expect("dead letters");
    assert_eq!(dead, 1, "the rejected event is kept as a dead letter");

    let empty = client
        .publish_events(pb::PublishEventsRequest { events: vec![] })
        .await
        .expect_err("empty request");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(violations(&empty), ["events"]);
    occ.stop().await.expect("stop");
}

/// A value PostgreSQL refuses (a trigger stands in for one) fails the call's transaction: OCC
/// then stores the events one by one, as ingest does messages, so only that event is rejected
/// and kept as a dead letter; the call's invalid event is a dead letter too, the rest stored.
#[sqlx::test(migrations = false)]
async fn an_event_the_database_refuses_is_rejected_alone(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-refused").await;
    refuse_poison(&pool).await;
    let results = publish(
        &occ.grpc,
        vec![
            event("det-1", "a", "smoke.detected", "esil_residential_1"),
            event("poison", "b", "smoke.detected", "esil_residential_1"),
            event("det-2", "c", "", "esil_residential_1"),
            event("det-3", "d", "smoke.detected", "esil_residential_1"),
        ],
    )
    .await;
    use pb::PublishOutcome as O;
    let outcomes: Vec<i32> = results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [O::Accepted, O::Rejected, O::Rejected, O::Accepted].map(|o| o as i32)
    );
    assert_eq!(
        results[1].violations[0].description,
        "the database refused a value of this event"
    );
    assert_eq!(
        results[3].incidents[0].id, results[0].incidents[0].id,
        "the stored events still correlate"
    );
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM dead_letters ORDER BY received_at, reason")
            .fetch_all(&pool)
            .await
            .expect("dead letters");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("could not be stored")),
        "{reasons:?}"
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT source_id FROM events ORDER BY 1")
        .fetch_all(&pool)
        .await
        .expect("events");
    assert_eq!(stored, ["det-1", "det-3"]);
    occ.stop().await.expect("stop");
}

fn noise_rule() -> pb::Rule {
    pb::Rule {
        name: "night-noise".into(),
        description: "Loud noise at night".into(),
        enabled: true,
        condition: Some(pb::RuleCondition {
            event_types: vec!["noise.level".into()],
            thresholds: vec![pb::Threshold {
                measurement: "dba".into(),
                comparison: pb::Comparison::GreaterThan as i32,
                value: 85.0,
            }],
            ..Default::default()
        }),
        action: Some(pb::RuleAction {
            category: "noise".into(),
            queue: "municipal".into(),
            priority: pb::Priority::P4 as i32,
            title_template: "Noise of {measurement.dba} dBA in {zone}".into(),
            correlation_fields: vec!["zone".into()],
            correlation_window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            claim_within: None,
        }),
        ..Default::default()
    }
}

fn loud(id: &str) -> pb::Event {
    let mut e = event("acoustic-7", id, "noise.level", "esil_street_2");
    e.measurements.insert("dba".into(), 91.0);
    e
}

#[sqlx::test(migrations = false)]
async fn a_rule_added_at_run_time_applies_without_restart(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-2").await;
    let mut rule_client = rules(&occ.grpc).await;
    let before = rule_client
        .list_rules(pb::ListRulesRequest::default())
        .await
        .expect("ListRules")
        .into_inner()
        .rules;
    assert_eq!(before.len(), 11, "the default city rules");

    let put = rule_client
        .put_rule(pb::PutRuleRequest {
            rule: Some(noise_rule()),
        })
        .await
        .expect("PutRule")
        .into_inner();
    assert!(put.created);

    // The rule set reloads (NOTIFY) without a restart: the dry run sees the new rule...
    eventually(Duration::from_secs(10), "the new rule in force", || {
        let mut c = rule_client.clone();
        async move {
            let r = c
                .test_rule(pb::TestRuleRequest {
                    event: Some(loud("x")),
                    rule: None,
                })
                .await
                .ok()?
                .into_inner();
            (!r.matches.is_empty()).then_some(())
        }
    })
    .await;
    // ...and so does ingest.
    let published = publish(&occ.grpc, vec![loud("n-1")]).await;
    let incident = get_incident(&occ.grpc, &published[0].incidents[0].id).await;
    assert_eq!(incident.queue, "municipal");
    assert_eq!(incident.priority, pb::Priority::P4 as i32);
    assert_eq!(incident.title, "Noise of 91 dBA in esil_street_2");
    assert_eq!(incident.rule_name, "night-noise");

    rule_client
        .delete_rule(pb::DeleteRuleRequest {
            name: "night-noise".into(),
        })
        .await
        .expect("DeleteRule");
    let gone = rule_client
        .delete_rule(pb::DeleteRuleRequest {
            name: "night-noise".into(),
        })
        .await
        .expect_err("deleted already");
    assert_eq!(gone.code(), Code::NotFound);
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_dry_run_says_which_incident_would_open_or_be_joined(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-3").await;
    let smoke = event("det-5", "s-1", "smoke.detected", "saryarka_residential_0");

    let first = dry_run(&occ.grpc, &smoke, None).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].rule_name, "fire-smoke");
    assert_eq!(first[0].outcome, pb::TestOutcome::WouldOpen as i32);
    assert_eq!(first[0].correlation_key, "fire|zone=saryarka_residential_0");
    assert_eq!(event_count(&pool).await, 0, "a dry run stores nothing");

    let published = publish(&occ.grpc, vec![smoke.clone()]).await;
    let number = published[0].incidents[0].number.clone();

    let mut next = smoke.clone();
    next.external_id = "s-2".into();
    let second = dry_run(&occ.grpc, &next, None).await;
    assert_eq!(second[0].outcome, pb::TestOutcome::WouldJoin as i32);
    assert_eq!(
        second[0].incident.as_ref().map(|i| i.number.as_str()),
        Some(number.as_str())
    );

    // A draft rule is tried as written, even before it is stored.
    let mut draft = noise_rule();
    let condition = draft.condition.as_mut().expect("condition");
    condition.event_types = vec!["smoke.*".into()];
    condition.thresholds.clear();
    let tried = dry_run(&occ.grpc, &next, Some(draft)).await;
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].queue, "municipal");
    assert_eq!(tried[0].outcome, pb::TestOutcome::WouldOpen as i32);
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn invalid_requests_get_invalid_argument_with_each_field(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-4").await;
    let mut client = rules(&occ.grpc).await;
    let mut bad = noise_rule();
    bad.name = "Night Noise".into();
    let action = bad.action.as_mut().expect("action");
    action.queue = "coast_guard".into();
    action.title_template = "Noise in {street}".into();
    action.priority = pb::Priority::Unspecified as i32;
    bad.condition
        .as_mut()
        .expect("condition")
        .event_types
        .clear();
    let status = client
        .put_rule(pb::PutRuleRequest { rule: Some(bad) })
        .await
        .expect_err("invalid rule");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&status),
        ["rule.action.priority"],
        "shape errors first"
    );

    let mut bad = noise_rule();
    bad.name = "Night Noise".into();
    bad.action.as_mut().expect("action").title_template = "Noise in {street}".into();
    bad.condition
        .as_mut()
        .expect("condition")
        .event_types
        .clear();
    let status = client
        .put_rule(pb::PutRuleRequest { rule: Some(bad) })
        .await
        .expect_err("invalid rule");
    assert_eq!(
        violations(&status),
        [
            "rule.name",
            "rule.condition.event_types",
            "rule.action.title_template"
        ]
    );
    assert!(
        status.message().contains("rule.name"),
        "{}",
        status.message()
    );

    let mut unknown_queue = noise_rule();
    unknown_queue.action.as_mut().expect("action").queue = "coast_guard".into();
    let status = client
        .put_rule(pb::PutRuleRequest {
            rule: Some(unknown_queue),
        })
        .await
        .expect_err("unknown queue");
    assert_eq!(violations(&status), ["rule.action.queue"]);

    let mut inc = incidents(&occ.grpc).await;
    let status = inc
        .get_incident(pb::GetIncidentRequest {
            id: "yesterday's fire".into(),
        })
        .await
        .expect_err("not an id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violations(&status), ["id"]);
    let status = inc
        .get_incident(pb::GetIncidentRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("no such incident");
    assert_eq!(status.code(), Code::NotFound);
    let status = inc
        .list_incidents(pb::ListIncidentsRequest {
            page_token: "bm90IGEgdG9rZW4".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(violations(&status), ["page_token"]);
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn incidents_list_in_queue_order_by_pages_and_filters(pool: PgPool) {
    let (_broker, occ) = start(&pool, "occ-api-5").await;
    let mut air = event("aq-1", "q", "air.quality", "nura_air");
    air.measurements.insert("pm2_5".into(), 180.0);
    ingest(&occ.grpc)
        .await
        .publish_events(pb::PublishEventsRequest {
            events: vec![
                air,
                event("panic-1", "p", "panic.pressed", "esil_transit_stop_1"),
                event("det-1", "s", "smoke.detected", "almaty_residential_2"),
                event(
                    "cam-sub-1",
                    "i",
                    "object.person",
                    "restricted_substation_nura",
                ),
            ],
        })
        .await
        .expect("PublishEvents");

    let mut client = incidents(&occ.grpc).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_incidents(pb::ListIncidentsRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        seen.extend(page.incidents.iter().map(|i| (i.priority, i.queue.clone())));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let priorities: Vec<i32> = seen.iter().map(|s| s.0).collect();
    assert_eq!(priorities, [1, 1, 2, 3], "most urgent first: {seen:?}");

    let police = client
        .list_incidents(pb::ListIncidentsRequest {
            queue: "police".into(),
            min_priority: pb::Priority::P1 as i32,
            statuses: vec![pb::IncidentStatus::Queued as i32],
            ..Default::default()
        })
        .await
        .expect("filtered")
        .into_inner()
        .incidents;
    assert_eq!(police.len(), 1);
    assert_eq!(police[0].category, "panic_alarm");
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn health_and_reflection_answer(pool: PgPool) {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (_broker, occ) = start(&pool, "occ-api-6").await;
    assert_eq!(
        occ_tests::health(&occ.grpc).await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );

    let channel = tonic::transport::Channel::from_shared(occ.grpc.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| {
        tokio_stream_once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        })
    };
    let mut stream = client
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(reply)) = next(&mut stream).await else {
        panic!("a reflection answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "occ.v1.IncidentService",
        "occ.v1.IngestService",
        "occ.v1.RuleService",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // Health's descriptors are served too, so `buf curl` can call it through reflection.
    let mut stream = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".into(),
        )))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(reply)) = next(&mut stream).await else {
        panic!("a reflection answer");
    };
    assert!(
        matches!(
            reply.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{:?}",
        reply.message_response
    );
    occ.stop().await.expect("stop");
}

fn tokio_stream_once<T: Send + 'static>(item: T) -> impl tonic::IntoStreamingRequest<Message = T> {
    futures_once(item)
}

fn futures_once<T: Send + 'static>(
    item: T,
) -> tonic::Request<std::pin::Pin<Box<dyn tokio_stream::Stream<Item = T> + Send>>> {
    tonic::Request::new(Box::pin(tokio_stream::once(item)))
}

async fn next<S: tokio_stream::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    use tokio_stream::StreamExt;
    s.next().await
}

/// Sends bytes as they are, whatever the method expects.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        bytes::Buf::advance(buf, n);
        Ok(Some(()))
    }
}

async fn call_raw(grpc: &str, method: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.expect("ready");
    client
        .unary(
            tonic::Request::new(body),
            http::uri::PathAndQuery::from_static(method),
            Raw,
        )
        .await
        .expect_err("refused")
}

/// Requests refused before any handler sees them get gRPC's codes: bytes that are not the
/// method's message are the caller's error (INVALID_ARGUMENT), a request over the size limit
/// is a limit (RESOURCE_EXHAUSTED). Times no device clock can give are refused by field.
#[sqlx::test(migrations = false)]
async fn malformed_and_oversize_requests_and_impossible_times_are_refused_by_grpc_codes(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-api-edges",
        &["--grpc-max-message-bytes", "65536"],
    ))
    .await
    .expect("occ starts");
    const PUBLISH: &str = "/occ.v1.IngestService/PublishEvents";

    // An unfinished varint: no protobuf message at all.
    let status = call_raw(&occ.grpc, PUBLISH, vec![0x0a, 0xff, 0xff]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("request:"),
        "{}",
        status.message()
    );

    let status = call_raw(&occ.grpc, PUBLISH, vec![0; 100_000]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "{}", status.message());

    let mut year_one = event("det-1", "y1", "smoke.detected", "esil_residential_1");
    year_one.occurred_at = Some(prost_types::Timestamp {
        seconds: -62_135_596_800,
        nanos: 0,
    });
    let mut year_9999 = event("det-1", "y9999", "smoke.detected", "esil_residential_1");
    year_9999.occurred_at = Some(prost_types::Timestamp {
        seconds: 253_402_300_799,
        nanos: 0,
    });
    let mut reset_clock = event("det-1", "epoch", "smoke.detected", "esil_residential_1");
    reset_clock.occurred_at = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: 0,
    });
    let results = publish(&occ.grpc, vec![year_one, year_9999, reset_clock]).await;
    use pb::PublishOutcome as O;
    let outcomes: Vec<i32> = results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [O::Rejected, O::Rejected, O::Accepted].map(|o| o as i32),
        "a device whose clock was reset to 1970 is still heard"
    );
    for r in &results[..2] {
        let fields: Vec<&str> = r.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["occurred_at"]);
    }
    occ.stop().await.expect("stop");
}

/// Prometheus metrics on their own port: what ingest committed by adapter, dead letters,
/// incidents opened by queue, gRPC calls by method and code.
#[sqlx::test(migrations = false)]
async fn metrics_count_what_ingest_and_the_api_did(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let metrics_addr = format!("127.0.0.1:{}", occ_tests::free_port());
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-metrics",
        &["--metrics-listen", &metrics_addr],
    ))
    .await
    .expect("occ starts");
    let mut publisher = occ_tests::Publisher::connect(broker.port).await;
    for i in 0..3 {
        publisher
            .publish(
                "occ/v1/events/det-1",
                serde_json::json!({"id": format!("m{i}"), "type": "smoke.detected", "zone": "esil_residential_1"})
                    .to_string()
                    .into_bytes(),
            )
            .await;
    }
    publisher
        .publish("occ/v1/events/det-2", b"{not json".to_vec())
        .await;
    publisher.flush().await;
    eventually(Duration::from_secs(10), "events stored", || async {
        (event_count(&pool).await == 3).then_some(())
    })
    .await;
    let _ = incidents(&occ.grpc)
        .await
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .expect("ListIncidents");
    let _ = incidents(&occ.grpc)
        .await
        .get_incident(pb::GetIncidentRequest { id: "nope".into() })
        .await
        .expect_err("not an id");

    // The fire queue's waiting incident, as the gauges (read every 5 s) see it, then claimed.
    eventually(Duration::from_secs(15), "the waiting incident", || async {
        let m = scrape(&metrics_addr).await;
        (sample(&m, r#"occ_queue_waiting{queue="fire",priority="P1"}"#) == Some(1.0)).then_some(())
    })
    .await;
    let mut dispatch =
        occ_proto::v1::dispatch_service_client::DispatchServiceClient::connect(occ.grpc.clone())
            .await
            .expect("dispatch");
    for _ in 0..2 {
        dispatch
            .claim_next(pb::ClaimNextRequest {
                queue: "fire".into(),
                ..Default::default()
            })
            .await
            .expect("ClaimNext");
    }

    let metrics = eventually(
        Duration::from_secs(10),
        "the dead letter counted",
        || async {
            let m = scrape(&metrics_addr).await;
            (sample(&m, r#"occ_ingest_messages_total{adapter="native"}"#) == Some(4.0)).then_some(m)
        },
    )
    .await;
    assert_eq!(
        sample(
            &metrics,
            r#"occ_claims_total{queue="fire",outcome="claimed"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"occ_claims_total{queue="fire",outcome="empty"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"occ_ingest_dead_letters_total{adapter="native"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, r#"occ_ingest_events_total{outcome="stored"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"occ_incidents_opened_total{queue="fire",priority="P1"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    let calls = |code: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("occ_grpc_requests_total{") && l.contains(code))
            .filter(|l| l.contains("IncidentService"))
            .count()
    };
    assert_eq!(calls(r#"code="0""#), 1, "{metrics}");
    assert_eq!(
        calls(r#"code="3""#),
        1,
        "INVALID_ARGUMENT counted: {metrics}"
    );
    assert!(metrics.contains("occ_ingest_commit_seconds_bucket"));
    occ.stop().await.expect("stop");
}
