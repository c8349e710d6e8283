//! Dispatch over a real gRPC socket and PostgreSQL: claims under concurrency, lease expiry,
//! escalation with two instances, live queue watches across instances, and the whole
//! operator path from an MQTT event to a closed incident.

use std::collections::HashSet;
use std::time::Duration;

use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_proto::v1::unit_service_client::UnitServiceClient;
use occ_tests::{
    Broker, Occ, Publisher, database_url, eventually, get_incident, incidents, open_incidents,
    panic_button, rules, serve_args,
};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

/// Sweeps often, so lease expiry and escalation show within a test's patience.
const FAST_SWEEP: [&str; 2] = ["--sweep-interval", "100ms"];

async fn start(pool: &PgPool, broker: &Broker, id: &str) -> Occ {
    Occ::start(serve_args(
        &database_url(pool),
        broker.port,
        id,
        &FAST_SWEEP,
    ))
    .await
    .expect("occ starts")
}

async fn dispatch(grpc: &str) -> DispatchServiceClient<Channel> {
    DispatchServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

async fn units(grpc: &str) -> UnitServiceClient<Channel> {
    UnitServiceClient::connect(grpc.to_owned())
        .await
        .expect("gRPC connects")
}

async fn claim_next(grpc: &str, queue: &str, lease_s: i64) -> pb::ClaimNextResponse {
    dispatch(grpc)
        .await
        .claim_next(pb::ClaimNextRequest {
            queue: queue.into(),
            lease: Some(prost_types::Duration {
                seconds: lease_s,
                nanos: 0,
            }),
        })
        .await
        .expect("ClaimNext")
        .into_inner()
}

async fn audit_entries(grpc: &str, id: &str) -> Vec<pb::AuditEntry> {
    incidents(grpc)
        .await
        .get_timeline(pb::GetTimelineRequest {
            id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("GetTimeline")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| match e.entry {
            Some(pb::timeline_entry::Entry::Audit(a)) => Some(a),
            _ => None,
        })
        .collect()
}

async fn audit_actions(grpc: &str, id: &str) -> Vec<String> {
    audit_entries(grpc, id)
        .await
        .into_iter()
        .map(|a| a.action)
        .collect()
}

async fn upsert_unit(grpc: &str, call_sign: &str, agency: &str, lat: f64, lon: f64) -> pb::Unit {
    units(grpc)
        .await
        .upsert_unit(pb::UpsertUnitRequest {
            unit: Some(pb::Unit {
                call_sign: call_sign.into(),
                agency: agency.into(),
                home_station: "Station 1".into(),
                location: Some(pb::GeoPoint { lat, lon }),
                ..Default::default()
            }),
        })
        .await
        .expect("UpsertUnit")
        .into_inner()
        .unit
        .expect("unit")
}

#[sqlx::test(migrations = false)]
async fn twenty_operators_claiming_ten_incidents_never_share_one(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-claims").await;
    let opened = open_incidents(&occ.grpc, (0..10).map(panic_button).collect()).await;
    assert_eq!(opened.len(), 10);

    let mut calls = Vec::new();
    for _ in 0..20 {
        let grpc = occ.grpc.clone();
        calls.push(tokio::spawn(async move {
            claim_next(&grpc, "police", 60).await
        }));
    }
    let mut claimed = Vec::new();
    let mut empty = 0;
    for call in calls {
        let r = call.await.expect("task");
        match (r.claim, r.incident) {
            (Some(claim), Some(incident)) => {
                assert_eq!(incident.status, pb::IncidentStatus::Claimed as i32);
                assert_eq!(claim.incident_id, incident.id);
                claimed.push(incident.id);
            }
            (None, None) => empty += 1,
            other => panic!("half an answer: {other:?}"),
        }
    }
    let distinct: HashSet<_> = claimed.iter().collect();
    assert_eq!((claimed.len(), distinct.len(), empty), (10, 10, 10));

    let queues = dispatch(&occ.grpc)
        .await
        .list_queues(pb::ListQueuesRequest {})
        .await
        .expect("ListQueues")
        .into_inner()
        .queues;
    let police = queues
        .iter()
        .find(|q| q.name == "police")
        .expect("police queue");
    assert_eq!((police.waiting_total, police.claimed), (0, 10));
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn an_expired_lease_returns_the_incident_and_the_old_claim_is_refused(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-lease").await;
    open_incidents(&occ.grpc, vec![panic_button(1)]).await;
    let van = upsert_unit(&occ.grpc, "P-11", "police", 51.13, 71.43).await;

    let first = claim_next(&occ.grpc, "police", 1).await;
    let old_claim = first.claim.expect("claimed");
    let id = first.incident.expect("incident").id;
    // The lease runs out; the sweep puts the incident back in the queue.
    eventually(
        Duration::from_secs(10),
        "the incident back in its queue",
        || async {
            (get_incident(&occ.grpc, &id).await.status == pb::IncidentStatus::Queued as i32)
                .then_some(())
        },
    )
    .await;

    let second = claim_next(&occ.grpc, "police", 60).await;
    assert_eq!(
        second.incident.as_ref().map(|i| i.id.as_str()),
        Some(id.as_str())
    );
    let refused = dispatch(&occ.grpc)
        .await
        .dispatch_units(pb::DispatchUnitsRequest {
            claim_id: old_claim.id.clone(),
            unit_ids: vec![van.call_sign.clone()],
        })
        .await
        .expect_err("the expired claim cannot dispatch");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );

    let actions = audit_actions(&occ.grpc, &id).await;
    assert_eq!(
        actions,
        [
            "incident.opened",
            "incident.claimed",
            "incident.claim_expired",
            "incident.claimed"
        ]
    );
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn escalation_fires_once_with_two_instances(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let a = start(&pool, &broker, "occ-esc-a").await;
    let b = start(&pool, &broker, "occ-esc-b").await;
    // Graffiti reports must be claimed within a second, or they escalate.
    rules(&a.grpc)
        .await
        .put_rule(pb::PutRuleRequest {
            rule: Some(pb::Rule {
                name: "graffiti".into(),
                enabled: true,
                condition: Some(pb::RuleCondition {
                    event_types: vec!["graffiti.detected".into()],
                    ..Default::default()
                }),
                action: Some(pb::RuleAction {
                    category: "vandalism".into(),
                    queue: "municipal".into(),
                    priority: pb::Priority::P4 as i32,
                    title_template: "Graffiti at {zone}".into(),
                    correlation_fields: vec!["zone".into()],
                    correlation_window: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    claim_within: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("PutRule");
    let graffiti = pb::Event {
        source_id: "cam-9".into(),
        r#type: "graffiti.detected".into(),
        zone: "baikonur_underpass".into(),
        ..Default::default()
    };
    let number = eventually(Duration::from_secs(10), "the rule in force", || {
        let grpc = b.grpc.clone();
        let mut event = graffiti.clone();
        async move {
            event.external_id = uuid::Uuid::now_v7().to_string();
            open_incidents(&grpc, vec![event]).await.into_iter().next()
        }
    })
    .await;

    let escalated = eventually(Duration::from_secs(10), "the escalation", || async {
        let i = get_incident(&a.grpc, &number).await;
        i.escalated.then_some(i)
    })
    .await;
    assert_eq!(
        escalated.priority,
        pb::Priority::P3 as i32,
        "one step up from P4"
    );
    // Both instances sweep every 100 ms; give them time to (wrongly) do it again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let actions = audit_actions(&b.grpc, &number).await;
    assert_eq!(
        actions
            .iter()
            .filter(|a| *a == "incident.escalated")
            .count(),
        1,
        "{actions:?}"
    );
    assert_eq!(
        get_incident(&b.grpc, &number).await.priority,
        pb::Priority::P3 as i32
    );

    // A supervisor acknowledges it.
    let acked = incidents(&a.grpc)
        .await
        .acknowledge_incident(pb::AcknowledgeIncidentRequest { id: number.clone() })
        .await
        .expect("AcknowledgeIncident")
        .into_inner()
        .incident
        .expect("incident");
    assert_eq!(acked.acknowledged_by, "anonymous");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

async fn next_change(stream: &mut tonic::Streaming<pb::WatchQueueResponse>) -> pb::IncidentChange {
    occ_tests::next_message(stream)
        .await
        .change
        .expect("a change")
}

#[sqlx::test(migrations = false)]
async fn a_queue_watcher_sees_changes_made_through_another_instance_in_order(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let a = start(&pool, &broker, "occ-watch-a").await;
    let b = start(&pool, &broker, "occ-watch-b").await;
    // One incident waits before the watch starts: it comes in the snapshot.
    let before = open_incidents(&b.grpc, vec![panic_button(1)]).await;

    let mut stream = dispatch(&a.grpc)
        .await
        .watch_queue(pb::WatchQueueRequest {
            queue: "police".into(),
        })
        .await
        .expect("WatchQueue")
        .into_inner();
    let snapshot = next_change(&mut stream).await;
    assert_eq!(snapshot.kind, pb::ChangeKind::Snapshot as i32);
    assert_eq!(snapshot.incident.map(|i| i.number), before.first().cloned());
    assert_eq!(
        next_change(&mut stream).await.kind,
        pb::ChangeKind::SnapshotComplete as i32
    );

    // Everything below happens through instance B.
    let opened = open_incidents(&b.grpc, vec![panic_button(2)]).await;
    let claimed = claim_next(&b.grpc, "police", 60).await;
    let claim = claimed.claim.expect("claim");
    dispatch(&b.grpc)
        .await
        .release_claim(pb::ReleaseClaimRequest {
            claim_id: claim.id,
            reason: "wrong console".into(),
        })
        .await
        .expect("ReleaseClaim");
    let again = claim_next(&b.grpc, "police", 60)
        .await
        .claim
        .expect("claim");
    dispatch(&b.grpc)
        .await
        .transfer_incident(pb::TransferIncidentRequest {
            incident_id: again.incident_id.clone(),
            queue: "ems".into(),
            reason: "the caller needs an ambulance".into(),
            claim_id: again.id,
        })
        .await
        .expect("TransferIncident");
    // Not police: the watcher must not see it.
    open_incidents(
        &b.grpc,
        vec![pb::Event {
            source_id: "medalarm-1".into(),
            r#type: "medical.alarm".into(),
            ..Default::default()
        }],
    )
    .await;
    incidents(&b.grpc)
        .await
        .add_note(pb::AddNoteRequest {
            id: opened[0].clone(),
            text: "patrol informed by radio".into(),
        })
        .await
        .expect("AddNote");

    let mut seen = Vec::new();
    let mut last_sequence = 0;
    for _ in 0..6 {
        let c = next_change(&mut stream).await;
        assert!(c.sequence > last_sequence, "in commit order");
        last_sequence = c.sequence;
        seen.push((
            pb::ChangeKind::try_from(c.kind).expect("known kind"),
            c.incident.map(|i| i.number).unwrap_or_default(),
        ));
    }
    use pb::ChangeKind as K;
    let first = before[0].clone();
    let second = opened[0].clone();
    assert_eq!(
        seen,
        [
            (K::Opened, second.clone()),
            (K::Claimed, first.clone()),
            (K::Released, first.clone()),
            (K::Claimed, first.clone()),
            (K::Transferred, first.clone()),
            (K::NoteAdded, second.clone()),
        ],
        "the oldest waiting P1 is claimed first"
    );
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

#[sqlx::test(migrations = false)]
async fn an_operator_takes_an_mqtt_event_all_the_way_to_closed(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-path").await;
    // Three engines: near, far, and one of another agency that must never be proposed.
    let far = upsert_unit(&occ.grpc, "E-2", "fire", 51.20, 71.50).await;
    let near = upsert_unit(&occ.grpc, "E-1", "fire", 51.129, 71.431).await;
    upsert_unit(&occ.grpc, "AMB-1", "ems", 51.128, 71.430).await;

    let mut publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("occ/v1/events/det-esil-0042", occ_tests::smoke_fixture())
        .await;
    let queued = eventually(Duration::from_secs(10), "the fire incident", || async {
        let r = claim_next(&occ.grpc, "fire", 120).await;
        r.claim.zip(r.incident)
    })
    .await;
    let (claim, incident) = queued;
    let id = incident.id.clone();

    let recommended = units(&occ.grpc)
        .await
        .recommend_units(pb::RecommendUnitsRequest {
            incident_id: incident.number.clone(),
            max_units: 10,
        })
        .await
        .expect("RecommendUnits")
        .into_inner()
        .recommendations;
    let order: Vec<&str> = recommended
        .iter()
        .map(|r| r.unit.as_ref().map_or("", |u| u.call_sign.as_str()))
        .collect();
    assert_eq!(order, ["E-1", "E-2"], "fire units only, nearest first");
    assert!(recommended[0].distance_m.expect("distance") < 200.0);
    assert!(recommended[1].distance_m.expect("distance") > 5_000.0);

    let wrong_agency = dispatch(&occ.grpc)
        .await
        .dispatch_units(pb::DispatchUnitsRequest {
            claim_id: claim.id.clone(),
            unit_ids: vec!["AMB-1".into()],
        })
        .await
        .expect_err("an ambulance is not a fire unit");
    assert_eq!(wrong_agency.code(), Code::FailedPrecondition);

    let unknown = dispatch(&occ.grpc)
        .await
        .dispatch_units(pb::DispatchUnitsRequest {
            claim_id: claim.id.clone(),
            unit_ids: vec!["E-1".into(), "E-99".into()],
        })
        .await
        .expect_err("E-99 is no unit");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().contains("unit_ids[1]") && unknown.message().contains("E-99"),
        "names the field and the call sign: {}",
        unknown.message()
    );

    let dispatched = dispatch(&occ.grpc)
        .await
        .dispatch_units(pb::DispatchUnitsRequest {
            claim_id: claim.id.clone(),
            unit_ids: vec![near.call_sign.clone(), far.id.clone()],
        })
        .await
        .expect("DispatchUnits")
        .into_inner();
    assert_eq!(
        dispatched.incident.expect("incident").status,
        pb::IncidentStatus::Dispatched as i32
    );
    assert!(
        dispatched
            .units
            .iter()
            .all(|u| u.status == pb::UnitStatus::Dispatched as i32)
    );

    // The crew reports; the incident follows its first unit.
    let mut crew = units(&occ.grpc).await;
    for status in [pb::UnitStatus::EnRoute, pb::UnitStatus::OnScene] {
        crew.update_unit_status(pb::UpdateUnitStatusRequest {
            unit_id: "E-1".into(),
            status: status as i32,
        })
        .await
        .expect("UpdateUnitStatus");
    }
    assert_eq!(
        get_incident(&occ.grpc, &id).await.status,
        pb::IncidentStatus::OnScene as i32
    );
    // E-2 is sent back; E-1, the last one on the fire, cannot leave it unattended.
    crew.update_unit_status(pb::UpdateUnitStatusRequest {
        unit_id: "E-2".into(),
        status: pb::UnitStatus::Available as i32,
    })
    .await
    .expect("E-2 cleared");
    let last = crew
        .update_unit_status(pb::UpdateUnitStatusRequest {
            unit_id: "E-1".into(),
            status: pb::UnitStatus::Available as i32,
        })
        .await
        .expect_err("the last unit on a burning flat stays");
    assert_eq!(last.code(), Code::FailedPrecondition);

    let mut inc = incidents(&occ.grpc).await;
    let too_early = inc
        .update_incident_status(pb::UpdateIncidentStatusRequest {
            id: id.clone(),
            status: pb::IncidentStatus::Closed as i32,
            note: String::new(),
            claim_id: String::new(),
        })
        .await
        .expect_err("not resolved yet");
    assert_eq!(too_early.code(), Code::FailedPrecondition);
    assert!(
        too_early.message().contains("ON_SCENE"),
        "{}",
        too_early.message()
    );

    for status in [pb::IncidentStatus::Resolved, pb::IncidentStatus::Closed] {
        inc.update_incident_status(pb::UpdateIncidentStatusRequest {
            id: id.clone(),
            status: status as i32,
            note: "fire out, flat ventilated".into(),
            claim_id: String::new(),
        })
        .await
        .expect("UpdateIncidentStatus");
    }
    let closed = get_incident(&occ.grpc, &id).await;
    assert_eq!(closed.status, pb::IncidentStatus::Closed as i32);
    assert!(
        !closed.correlating,
        "a closed incident absorbs no new events"
    );
    let free = units(&occ.grpc)
        .await
        .list_units(pb::ListUnitsRequest {
            agency: "fire".into(),
            statuses: vec![pb::UnitStatus::Available as i32],
            ..Default::default()
        })
        .await
        .expect("ListUnits")
        .into_inner()
        .units;
    assert_eq!(free.len(), 2, "resolving released both engines");

    assert_eq!(
        audit_actions(&occ.grpc, &id).await,
        [
            "incident.opened",
            "incident.claimed",
            "incident.dispatched",
            "incident.status_changed", // EN_ROUTE, with E-1
            "incident.status_changed", // ON_SCENE, with E-1
            "incident.status_changed", // RESOLVED
            "incident.status_changed", // CLOSED
        ]
    );
    occ.stop().await.expect("stop");
}

/// A request as a named operator's console sends it.
fn from<T>(operator: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-occ-operator", operator.parse().expect("valid header"));
    request
}

#[sqlx::test(migrations = false)]
async fn only_the_holder_of_a_claim_can_act_on_it(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-holder").await;
    let number = open_incidents(&occ.grpc, vec![panic_button(3)])
        .await
        .remove(0);
    let patrol = upsert_unit(&occ.grpc, "P-1", "police", 51.13, 71.43).await;
    let mut client = dispatch(&occ.grpc).await;
    let claimed = client
        .claim_next(from(
            "alice",
            pb::ClaimNextRequest {
                queue: "police".into(),
                lease: None,
            },
        ))
        .await
        .expect("ClaimNext")
        .into_inner();
    let claim = claimed.claim.expect("claim").id;

    // Others see who holds it, not the claim's id.
    let seen = get_incident(&occ.grpc, &number)
        .await
        .claim
        .expect("claim shown");
    assert_eq!(seen.holder, "operator:alice");
    assert!(seen.id.is_empty(), "the claim id is the holder's alone");

    // Bob, with Alice's claim id, can do nothing with it.
    let denied = [
        client
            .release_claim(from(
                "bob",
                pb::ReleaseClaimRequest {
                    claim_id: claim.clone(),
                    reason: String::new(),
                },
            ))
            .await
            .map(|_| ()),
        client
            .extend_claim(from(
                "bob",
                pb::ExtendClaimRequest {
                    claim_id: claim.clone(),
                    lease: None,
                },
            ))
            .await
            .map(|_| ()),
        client
            .dispatch_units(from(
                "bob",
                pb::DispatchUnitsRequest {
                    claim_id: claim.clone(),
                    unit_ids: vec![patrol.call_sign.clone()],
                },
            ))
            .await
            .map(|_| ()),
        client
            .transfer_incident(from(
                "bob",
                pb::TransferIncidentRequest {
                    incident_id: number.clone(),
                    queue: "ems".into(),
                    reason: String::new(),
                    claim_id: claim.clone(),
                },
            ))
            .await
            .map(|_| ()),
        incidents(&occ.grpc)
            .await
            .update_incident_status(from(
                "bob",
                pb::UpdateIncidentStatusRequest {
                    id: number.clone(),
                    status: pb::IncidentStatus::Dismissed as i32,
                    note: "not mine".into(),
                    claim_id: claim.clone(),
                },
            ))
            .await
            .map(|_| ()),
    ];
    for (i, result) in denied.into_iter().enumerate() {
        let status = result.expect_err("refused");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "call {i}: {status:?}"
        );
    }
    // Without any claim, a claimed incident cannot be dismissed or transferred either.
    let no_claim = incidents(&occ.grpc)
        .await
        .update_incident_status(from(
            "bob",
            pb::UpdateIncidentStatusRequest {
                id: number.clone(),
                status: pb::IncidentStatus::Dismissed as i32,
                note: String::new(),
                claim_id: String::new(),
            },
        ))
        .await
        .expect_err("claimed by Alice");
    assert_eq!(no_claim.code(), Code::FailedPrecondition);
    assert!(
        no_claim.message().contains("operator:alice"),
        "{}",
        no_claim.message()
    );

    // Alice can.
    let done = client
        .dispatch_units(from(
            "alice",
            pb::DispatchUnitsRequest {
                claim_id: claim,
                unit_ids: vec![patrol.call_sign],
            },
        ))
        .await
        .expect("the holder dispatches")
        .into_inner();
    assert_eq!(
        done.incident.expect("incident").status,
        pb::IncidentStatus::Dispatched as i32
    );
    let actors: Vec<String> = audit_entries(&occ.grpc, &number)
        .await
        .into_iter()
        .map(|a| a.actor)
        .collect();
    assert_eq!(actors, ["system:rules", "operator:alice", "operator:alice"]);
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn queues_are_configured_at_run_time(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-queues").await;
    let mut client = dispatch(&occ.grpc).await;
    let created = client
        .put_queue(pb::PutQueueRequest {
            name: "river_rescue".into(),
            display_name: "River rescue".into(),
            agency: "river_rescue".into(),
        })
        .await
        .expect("PutQueue")
        .into_inner();
    assert!(created.created);
    let names: Vec<String> = client
        .list_queues(pb::ListQueuesRequest {})
        .await
        .expect("ListQueues")
        .into_inner()
        .queues
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert!(names.iter().any(|n| n == "river_rescue"), "{names:?}");
    // Its agency's units can be declared, and its queue claimed from (empty for now).
    upsert_unit(&occ.grpc, "BOAT-1", "river_rescue", 51.15, 71.42).await;
    let empty = claim_next(&occ.grpc, "river_rescue", 60).await;
    assert!(empty.claim.is_none() && empty.incident.is_none());

    let unknown = client
        .claim_next(pb::ClaimNextRequest {
            queue: "coast_guard".into(),
            lease: None,
        })
        .await
        .expect_err("no such queue");
    assert_eq!(unknown.code(), Code::NotFound);
    let long_lease = client
        .claim_next(pb::ClaimNextRequest {
            queue: "police".into(),
            lease: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            }),
        })
        .await
        .expect_err("too long a lease");
    assert_eq!(long_lease.code(), Code::InvalidArgument);
    occ.stop().await.expect("stop");
}
