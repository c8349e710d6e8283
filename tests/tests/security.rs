//! Access to the API, tried over a real socket: every method authenticated, allowed or refused
//! by role as the table below says, incidents outside a caller's queues as if they did not
//! exist, keys revoked on every instance, and the first start on a developer's machine.

use std::collections::BTreeMap;
use std::time::Duration;

use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_proto::v1::key_service_client::KeyServiceClient;
use occ_proto::v1::unit_service_client::UnitServiceClient;
use occ_tests::secure::{Grant, channel, make_key, secure_args, start};
use occ_tests::{
    Broker, Occ, database_url, eventually, health, next_message, panic_button, with_key,
};
use sqlx::PgPool;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// A dispatcher of `queue`, named `name`.
async fn desk(grpc: &str, admin: &str, name: &str, queue: &str) -> String {
    let queues = [queue];
    make_key(
        grpc,
        admin,
        name,
        Grant::role(&"dispatcher").queues(&queues),
    )
    .await
}

fn code<T>(result: Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Calls `path` with an empty request (every proto3 message decodes from no bytes), as
/// `key` (or without credentials), and returns the status code.
async fn call(channel: &Channel, path: &str, streaming: bool, key: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = Request::new(());
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ASCII"),
        );
    }
    let path = path.parse().expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    if streaming {
        // Allowed or not is decided before the first message: the stream's opening is enough.
        code(grpc.server_streaming(request, path, codec).await)
    } else {
        code(grpc.unary(request, path, codec).await)
    }
}

/// Every method of OCC's API, and whether it streams its answers: read from the descriptor
/// set the server itself registers, so a new method cannot be left out of the matrix.
fn api_methods() -> Vec<(String, bool)> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(occ_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    methods.sort();
    methods
}

/// Who may call what: g gateway, d dispatcher, s supervisor, i integration, u integration
/// granted status updates, a admin, v investigator. Written from the roles' descriptions, not from OCC's table.
const EXPECTED: &[(&str, &str)] = &[
    ("IngestService/PublishEvents", "g"),
    ("IncidentService/GetIncident", "dsiuav"),
    ("IncidentService/GetIncidentCap", "dsiuav"),
    ("IncidentService/GetIncidentEido", "dsiuav"),
    ("IncidentService/ListIncidents", "dsiuav"),
    ("IncidentService/GetTimeline", "dsiuav"),
    ("IncidentService/WatchIncidents", "dsiuav"),
    ("IncidentService/ExportIncident", "sv"),
    ("IncidentService/UpdateIncidentStatus", "dsu"),
    ("IncidentService/AcknowledgeIncident", "s"),
    ("IncidentService/AddNote", "dsiu"),
    ("DispatchService/ListQueues", "dsiuav"),
    ("DispatchService/PutQueue", "a"),
    ("DispatchService/ClaimNext", "ds"),
    ("DispatchService/ReleaseClaim", "ds"),
    ("DispatchService/ExtendClaim", "ds"),
    ("DispatchService/DispatchUnits", "ds"),
    ("DispatchService/TransferIncident", "s"),
    ("DispatchService/WatchQueue", "dsiuav"),
    ("UnitService/UpsertUnit", "s"),
    ("UnitService/ListUnits", "ds"),
    ("UnitService/UpdateUnitStatus", "ds"),
    ("UnitService/ReportUnitLocation", "ds"),
    ("UnitService/RecommendUnits", "ds"),
    ("RuleService/ListRules", "a"),
    ("RuleService/PutRule", "a"),
    ("RuleService/DeleteRule", "a"),
    ("RuleService/TestRule", "a"),
    ("SourceService/UpsertSource", "sa"),
    ("SourceService/ImportSources", "sa"),
    ("SourceService/GetSource", "sa"),
    ("SourceService/ListSources", "sa"),
    ("SourceService/DeleteSource", "sa"),
    ("SourceService/PutProfile", "sa"),
    ("SourceService/ListProfiles", "sa"),
    ("SourceService/DeleteProfile", "sa"),
    ("ZoneService/PutZone", "a"),
    ("ZoneService/ImportZones", "a"),
    ("ZoneService/ListZones", "dsiuav"),
    ("ZoneService/DeleteZone", "a"),
    ("ZoneService/LocateZone", "dsiuav"),
    ("WatchlistService/AddWatchlistEntries", "s"),
    ("WatchlistService/RemoveWatchlistEntry", "s"),
    ("WatchlistService/ListWatchlistEntries", "s"),
    ("WatchlistService/ListWatchlistHits", "s"),
    ("DeadLetterService/ListDeadLetters", "s"),
    ("DeadLetterService/ReplayDeadLetters", "s"),
    ("EventService/SearchEvents", "sv"),
    ("EventService/GetEvent", "sv"),
    ("EventService/PlateHistory", "sv"),
    ("EventService/AroundIncident", "sv"),
    ("EventService/PlaceLegalHold", "sv"),
    ("EventService/ListLegalHolds", "sv"),
    ("EventService/ReleaseLegalHold", "sv"),
    ("StatsService/CountEvents", "dsiuav"),
    ("StatsService/CountIncidents", "dsiuav"),
    ("KeyService/CreateKey", "a"),
    ("KeyService/ListKeys", "a"),
    ("KeyService/RevokeKey", "a"),
];

#[sqlx::test(migrations = false)]
async fn every_role_may_call_exactly_the_methods_its_row_gives(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = start(&pool, &broker, "occ-matrix", &[]).await;
    let mut principals: BTreeMap<char, String> = BTreeMap::new();
    for (letter, name, grant) in [
        ('g', "gw", Grant::role(&"gateway")),
        (
            'd',
            "police-desk",
            Grant::role(&"dispatcher").queues(&["police"]),
        ),
        (
            's',
            "police-supervisor",
            Grant::role(&"supervisor").agencies(&["police"]),
        ),
        (
            'i',
            "police-cad",
            Grant::role(&"integration").queues(&["police"]),
        ),
        (
            'u',
            "police-cad-rw",
            Grant::role(&"integration")
                .queues(&["police"])
                .updating_status(),
        ),
        ('a', "it", Grant::role(&"admin")),
        (
            'v',
            "police-detective",
            Grant::role(&"investigator").agencies(&["police"]),
        ),
    ] {
        principals.insert(letter, make_key(&occ.grpc, &admin, name, grant).await);
    }

    let expected: BTreeMap<String, &str> = EXPECTED
        .iter()
        .map(|(m, who)| (format!("/occ.v1.{m}"), *who))
        .collect();
    let methods = api_methods();
    let listed: Vec<&String> = methods.iter().map(|(m, _)| m).collect();
    assert_eq!(
        listed,
        expected.keys().collect::<Vec<_>>(),
        "every method of the API has exactly one row in the expected table"
    );

    let channel = channel(&occ.grpc).await;
    let mut wrong = Vec::new();
    for (method, streaming) in &methods {
        let allowed = expected[method];
        assert_eq!(
            call(&channel, method, *streaming, None).await,
            Code::Unauthenticated,
            "{method} without credentials"
        );
        assert_eq!(
            call(&channel, method, *streaming, Some("occ_not-a-key")).await,
            Code::Unauthenticated,
            "{method} with an unknown key"
        );
        for (letter, key) in &principals {
            let got = call(&channel, method, *streaming, Some(key)).await;
            let ok = if allowed.contains(*letter) {
                !matches!(got, Code::Unauthenticated | Code::PermissionDenied)
            } else {
                got == Code::PermissionDenied
            };
            if !ok {
                wrong.push(format!(
                    "{method} as {letter}: {got:?} (allowed to {allowed:?})"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "cells that differ from the table:\n{}",
        wrong.join("\n")
    );

    // Health needs no credentials.
    assert_eq!(health(&occ.grpc).await, Some(ServingStatus::Serving));
    occ.stop().await.expect("stop");
}

fn smoke(n: usize) -> pb::Event {
    pb::Event {
        source_id: format!("det-{n}"),
        external_id: format!("smoke-{n}"),
        r#type: "smoke.detected".into(),
        zone: format!("esil_residential_{n}"),
        ..Default::default()
    }
}

async fn publish(grpc: &str, key: &str, events: Vec<pb::Event>) -> Result<Vec<String>, Status> {
    Ok(IngestServiceClient::new(channel(grpc).await)
        .publish_events(with_key(key, pb::PublishEventsRequest { events }))
        .await?
        .into_inner()
        .results
        .into_iter()
        .flat_map(|r| r.incidents)
        .filter(|i| i.opened)
        .map(|i| i.number)
        .collect())
}

async fn get(grpc: &str, key: &str, id: &str) -> Result<pb::Incident, Status> {
    Ok(IncidentServiceClient::new(channel(grpc).await)
        .get_incident(with_key(key, pb::GetIncidentRequest { id: id.into() }))
        .await?
        .into_inner()
        .incident
        .expect("an incident"))
}

async fn listed_queues(grpc: &str, key: &str, queue: &str) -> Result<Vec<String>, Status> {
    let mut queues: Vec<String> = IncidentServiceClient::new(channel(grpc).await)
        .list_incidents(with_key(
            key,
            pb::ListIncidentsRequest {
                queue: queue.into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .incidents
        .into_iter()
        .map(|i| i.queue)
        .collect();
    queues.dedup();
    Ok(queues)
}

async fn next_change(
    stream: &mut tonic::Streaming<pb::WatchIncidentsResponse>,
) -> pb::IncidentChange {
    occ_tests::next_message(stream)
        .await
        .change
        .expect("a change")
}

#[sqlx::test(migrations = false)]
async fn incidents_outside_a_callers_queues_do_not_exist_for_it(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = start(&pool, &broker, "occ-scope", &[]).await;
    let grpc = occ.grpc.as_str();
    let gateway = make_key(grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let police = desk(grpc, &admin, "police-desk", "police").await;
    let fire = desk(grpc, &admin, "fire-desk", "fire").await;
    let supervisor = make_key(
        grpc,
        &admin,
        "police-supervisor",
        Grant::role(&"supervisor").agencies(&["police"]),
    )
    .await;
    let cad = make_key(
        grpc,
        &admin,
        "police-cad",
        Grant::role(&"integration").queues(&["police"]),
    )
    .await;
    let it = make_key(grpc, &admin, "it", Grant::role(&"admin")).await;
    let panic_gw = make_key(
        grpc,
        &admin,
        "panic-gw",
        Grant::role(&"gateway").sources(&["panic-*"]),
    )
    .await;

    let police_incident = publish(grpc, &gateway, vec![panic_button(1)])
        .await
        .expect("publish")
        .remove(0);
    let fire_incident = publish(grpc, &gateway, vec![smoke(1)])
        .await
        .expect("publish")
        .remove(0);

    // Reads: one's own queues only; another queue's incident is not found, a list of another
    // queue refused, a list of all shows only one's own.
    assert_eq!(
        get(grpc, &police, &police_incident)
            .await
            .expect("own")
            .queue,
        "police"
    );
    assert_eq!(
        code(get(grpc, &police, &fire_incident).await),
        Code::NotFound
    );
    assert_eq!(
        code(get(grpc, &police, "INC-2099-999999").await),
        Code::NotFound,
        "as for one that does not exist"
    );
    assert_eq!(
        get(grpc, &fire, &fire_incident).await.expect("own").queue,
        "fire"
    );
    assert_eq!(
        listed_queues(grpc, &police, "").await.expect("list"),
        ["police"]
    );
    assert_eq!(
        listed_queues(grpc, &fire, "").await.expect("list"),
        ["fire"]
    );
    assert_eq!(
        code(listed_queues(grpc, &police, "fire").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(get(grpc, &it, &police_incident).await),
        Code::NotFound,
        "an admin sees no incidents"
    );
    assert!(listed_queues(grpc, &it, "").await.expect("list").is_empty());
    let mut incidents = IncidentServiceClient::new(channel(grpc).await);
    assert_eq!(
        code(
            incidents
                .get_timeline(with_key(
                    &police,
                    pb::GetTimelineRequest {
                        id: fire_incident.clone(),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::NotFound
    );

    // Work: another queue's incident cannot be claimed, changed or annotated.
    let mut dispatch = DispatchServiceClient::new(channel(grpc).await);
    assert_eq!(
        code(
            dispatch
                .claim_next(with_key(
                    &police,
                    pb::ClaimNextRequest {
                        queue: "fire".into(),
                        lease: None
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            incidents
                .update_incident_status(with_key(
                    &police,
                    pb::UpdateIncidentStatusRequest {
                        id: fire_incident.clone(),
                        status: pb::IncidentStatus::Dismissed as i32,
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            incidents
                .add_note(with_key(
                    &police,
                    pb::AddNoteRequest {
                        id: fire_incident.clone(),
                        text: "x".into()
                    }
                ))
                .await
        ),
        Code::NotFound
    );
    // An integration reads and annotates its queue's incidents, and changes nothing else.
    incidents
        .add_note(with_key(
            &cad,
            pb::AddNoteRequest {
                id: police_incident.clone(),
                text: "patrol 12 informed".into(),
            },
        ))
        .await
        .expect("the CAD link adds a note");
    assert_eq!(
        code(
            incidents
                .update_incident_status(with_key(
                    &cad,
                    pb::UpdateIncidentStatusRequest {
                        id: police_incident.clone(),
                        status: pb::IncidentStatus::Dismissed as i32,
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );

    // A gateway bound to its sources cannot speak for another.
    let refused = publish(grpc, &panic_gw, vec![panic_button(2), smoke(2)])
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("events[1].source_id"),
        "{}",
        refused.message()
    );
    assert_eq!(
        publish(grpc, &panic_gw, vec![panic_button(3)])
            .await
            .expect("its own source")
            .len(),
        1
    );

    // Units: only one's own agency's.
    let mut units = UnitServiceClient::new(channel(grpc).await);
    let fire_supervisor = make_key(
        grpc,
        &admin,
        "fire-supervisor",
        Grant::role(&"supervisor").agencies(&["fire"]),
    )
    .await;
    let engine = units
        .upsert_unit(with_key(
            &fire_supervisor,
            pb::UpsertUnitRequest {
                unit: Some(pb::Unit {
                    call_sign: "E-1".into(),
                    agency: "fire".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("a fire supervisor stations a fire unit")
        .into_inner()
        .unit
        .expect("unit");
    assert_eq!(
        code(
            units
                .upsert_unit(with_key(
                    &supervisor,
                    pb::UpsertUnitRequest {
                        unit: Some(pb::Unit {
                            call_sign: "E-1".into(),
                            agency: "police".into(),
                            ..Default::default()
                        }),
                    }
                ))
                .await
        ),
        Code::PermissionDenied,
        "a police supervisor cannot take the fire service's unit"
    );
    assert_eq!(
        code(
            units
                .report_unit_location(with_key(
                    &police,
                    pb::ReportUnitLocationRequest {
                        unit_id: engine.id.clone(),
                        location: Some(pb::GeoPoint {
                            lat: 51.1,
                            lon: 71.4
                        }),
                        ..Default::default()
                    }
                ))
                .await
        ),
        Code::PermissionDenied
    );
    let listed = units
        .list_units(with_key(&police, pb::ListUnitsRequest::default()))
        .await
        .expect("ListUnits")
        .into_inner()
        .units;
    assert!(
        listed.is_empty(),
        "the police desk sees no fire units: {listed:?}"
    );

    // A watcher sees its queues; an incident transferred away ends with the transfer.
    let mut watch = incidents
        .watch_incidents(with_key(&supervisor, pb::WatchIncidentsRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    let mut snapshot = Vec::new();
    loop {
        let change = next_change(&mut watch).await;
        if change.kind == pb::ChangeKind::SnapshotComplete as i32 {
            break;
        }
        snapshot.push(change.incident.expect("incident").queue);
    }
    assert!(
        !snapshot.is_empty() && snapshot.iter().all(|q| q == "police"),
        "{snapshot:?}"
    );
    dispatch
        .transfer_incident(with_key(
            &supervisor,
            pb::TransferIncidentRequest {
                incident_id: police_incident.clone(),
                queue: "ems".into(),
                reason: "medical emergency".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("the police supervisor transfers its incident to EMS");
    let transferred = next_change(&mut watch).await;
    assert_eq!(transferred.kind, pb::ChangeKind::Transferred as i32);
    assert_eq!(
        transferred.actor, "key:police-supervisor",
        "the change names the key"
    );
    assert_eq!(
        code(get(grpc, &supervisor, &police_incident).await),
        Code::NotFound,
        "gone from its view"
    );
    // A later change to it is not shown; one in its queues is.
    let ems = make_key(
        grpc,
        &admin,
        "ems-desk",
        Grant::role(&"dispatcher").queues(&["ems"]),
    )
    .await;
    incidents
        .add_note(with_key(
            &ems,
            pb::AddNoteRequest {
                id: police_incident.clone(),
                text: "crew informed".into(),
            },
        ))
        .await
        .expect("EMS annotates it now");
    let next_police = publish(grpc, &gateway, vec![panic_button(4)])
        .await
        .expect("publish")
        .remove(0);
    let seen = next_change(&mut watch).await;
    assert_eq!(
        seen.incident.expect("incident").number,
        next_police,
        "the EMS note was not shown"
    );

    // The audit log names the authenticated principal.
    let timeline = incidents
        .get_timeline(with_key(
            &ems,
            pb::GetTimelineRequest {
                id: police_incident.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("timeline")
        .into_inner()
        .entries;
    let actors: Vec<String> = timeline
        .iter()
        .filter_map(|e| match &e.entry {
            Some(pb::timeline_entry::Entry::Audit(a)) => Some(a.actor.clone()),
            _ => None,
        })
        .collect();
    assert!(
        actors.contains(&"key:police-supervisor".to_owned()),
        "{actors:?}"
    );
    assert!(actors.contains(&"key:police-cad".to_owned()), "{actors:?}");
    assert!(actors.contains(&"key:ems-desk".to_owned()), "{actors:?}");
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_claim_id_is_shown_only_to_its_holder(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = start(&pool, &broker, "occ-claim-id", &[]).await;
    let grpc = occ.grpc.as_str();
    let gateway = make_key(grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let alice = desk(grpc, &admin, "alice", "police").await;
    let bob = desk(grpc, &admin, "bob", "police").await;
    let number = publish(grpc, &gateway, vec![panic_button(1)])
        .await
        .expect("publish")
        .remove(0);
    let claim = DispatchServiceClient::new(channel(grpc).await)
        .claim_next(with_key(
            &alice,
            pb::ClaimNextRequest {
                queue: "police".into(),
                lease: None,
            },
        ))
        .await
        .expect("claim")
        .into_inner()
        .claim
        .expect("a claim");
    let claim_detail = |key: String| {
        let number = number.clone();
        async move {
            IncidentServiceClient::new(channel(grpc).await)
                .get_timeline(with_key(
                    &key,
                    pb::GetTimelineRequest {
                        id: number,
                        ..Default::default()
                    },
                ))
                .await
                .expect("timeline")
                .into_inner()
                .entries
                .into_iter()
                .find_map(|e| match e.entry {
                    Some(pb::timeline_entry::Entry::Audit(a)) if a.action == "incident.claimed" => {
                        Some(a.detail)
                    }
                    _ => None,
                })
                .expect("the claim is on the record")
        }
    };
    assert!(claim_detail(alice.clone()).await.contains(&claim.id));
    assert!(!claim_detail(bob.clone()).await.contains(&claim.id));
    // Knowing the id would not help: the claim is the key's.
    let stolen = DispatchServiceClient::new(channel(grpc).await)
        .release_claim(with_key(
            &bob,
            pb::ReleaseClaimRequest {
                claim_id: claim.id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .expect_err("not bob's claim");
    assert_eq!(stolen.code(), Code::PermissionDenied);
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_revoked_key_is_refused_by_every_instance_within_seconds(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (a, admin) = start(&pool, &broker, "occ-revoke-a", &[]).await;
    let (args, _) = secure_args(&pool, &broker, "occ-revoke-b", &[]);
    let b = Occ::start(args).await.expect("second instance");
    let key = make_key(
        &a.grpc,
        &admin,
        "desk",
        Grant::role(&"dispatcher").queues(&["police"]),
    )
    .await;
    let list = |grpc: String, key: String| async move {
        code(
            DispatchServiceClient::new(channel(&grpc).await)
                .list_queues(with_key(&key, pb::ListQueuesRequest {}))
                .await,
        )
    };
    assert_eq!(
        list(b.grpc.clone(), key.clone()).await,
        Code::Ok,
        "B knows the key"
    );
    let revoked = KeyServiceClient::new(channel(&a.grpc).await)
        .revoke_key(with_key(
            &admin,
            pb::RevokeKeyRequest { key: "desk".into() },
        ))
        .await
        .expect("revoked on A")
        .into_inner()
        .key
        .expect("key");
    assert!(revoked.revoke_time.is_some());
    assert_eq!(
        list(a.grpc.clone(), key.clone()).await,
        Code::Unauthenticated,
        "A refuses it at once"
    );
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(10), "B refuses the revoked key", || {
        let (grpc, key) = (b.grpc.clone(), key.clone());
        async move { (list(grpc, key).await == Code::Unauthenticated).then_some(()) }
    })
    .await;
    eprintln!("B refused the revoked key after {:?}", started.elapsed());
    a.stop().await.expect("stop A");
    b.stop().await.expect("stop B");
}

#[sqlx::test(migrations = false)]
async fn a_first_start_on_loopback_makes_an_admin_key_and_elsewhere_refuses_without_one(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let (args, file) = secure_args(&pool, &broker, "occ-first", &[]);
    let occ = Occ::start(args.clone())
        .await
        .expect("OCC starts on loopback");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("key file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only its owner reads the admin key");
    let admin = std::fs::read_to_string(&file)
        .expect("key")
        .trim()
        .to_owned();
    assert!(admin.starts_with("occ_"));
    let mut keys = KeyServiceClient::new(channel(&occ.grpc).await);
    let listed = keys
        .list_keys(with_key(&admin, pb::ListKeysRequest::default()))
        .await
        .expect("the admin key works")
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 1);
    assert!(
        !format!("{listed:?}").contains(&admin),
        "a list never shows a secret"
    );
    occ.stop().await.expect("stop");

    // A second start keeps the key it made.
    let occ = Occ::start(args.clone()).await.expect("OCC starts again");
    assert_eq!(std::fs::read_to_string(&file).expect("key").trim(), admin);
    occ.stop().await.expect("stop");

    // Beyond loopback, with no key at all, OCC will not start unprotected...
    sqlx::query("UPDATE api_keys SET revoked_at = now(), revoked_by = 'test'")
        .execute(&pool)
        .await
        .expect("revoke all");
    let without_file: Vec<String> = {
        let at = args
            .iter()
            .position(|a| a == "--admin-key-file")
            .expect("flag");
        [&args[..at], &args[at + 2..]].concat()
    };
    let refused = Occ::launch_at("0.0.0.0:0", without_file.clone())
        .await
        .expect_err("refuses to start");
    assert!(
        format!("{refused:#}").contains("occ keys create"),
        "{refused:#}"
    );
    // ...unless a deployment asks it to make the admin key, in a file it names...
    let occ = Occ::start_at("0.0.0.0:0", args)
        .await
        .expect("starts with --admin-key-file");
    let made = std::fs::read_to_string(&file)
        .expect("key")
        .trim()
        .to_owned();
    assert!(made.starts_with("occ_") && made != admin, "a new admin key");
    occ.stop().await.expect("stop");
    // ...or is told to serve without authentication.
    sqlx::query("UPDATE api_keys SET revoked_at = now(), revoked_by = 'test'")
        .execute(&pool)
        .await
        .expect("revoke all");
    let mut insecure = without_file;
    insecure.push("--insecure".into());
    let occ = Occ::start_at("0.0.0.0:0", insecure)
        .await
        .expect("starts with --insecure");
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn occ_keys_prints_a_key_once_and_revokes_it(pool: PgPool) {
    let occ_cli = |args: Vec<String>| {
        let url = database_url(&pool);
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_occ-under-test"))
                .args(args)
                .args(["--database-url", &url])
                .env("OCC_LOG", "warn")
                .output()
                .await
                .expect("occ runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let mut create = args("keys create --role integration --queues police --name");
    create.push("Police CAD link".into());
    let printed = occ_cli(create).await;
    let key = printed.lines().last().expect("a last line").to_owned();
    assert!(key.starts_with("occ_") && key.len() == 47, "{printed}");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_sha256 FROM api_keys")
        .fetch_one(&pool)
        .await
        .expect("stored");
    assert_eq!(stored.len(), 32, "a hash is stored");
    let secrets: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE position($1 IN row_to_json(api_keys)::text) > 0",
    )
    .bind(&key[4..])
    .fetch_one(&pool)
    .await
    .expect("search");
    assert_eq!(secrets, 0, "the key itself is nowhere in the table");

    let listed = occ_cli(args("keys list")).await;
    assert!(
        listed.contains("Police CAD link") && listed.contains("roles=integration"),
        "{listed}"
    );
    assert!(!listed.contains(&key), "{listed}");

    let broker = Broker::start().await.expect("broker");
    let (args_serve, _) = secure_args(&pool, &broker, "occ-cli-keys", &[]);
    let occ = Occ::start(args_serve).await.expect("OCC starts");
    let reads = |key: String| {
        let grpc = occ.grpc.clone();
        async move {
            code(
                IncidentServiceClient::new(channel(&grpc).await)
                    .list_incidents(with_key(
                        &key,
                        pb::ListIncidentsRequest {
                            queue: "police".into(),
                            ..Default::default()
                        },
                    ))
                    .await,
            )
        }
    };
    assert_eq!(reads(key.clone()).await, Code::Ok);
    let mut revoke = args("keys revoke");
    revoke.push("Police CAD link".into());
    assert!(occ_cli(revoke).await.starts_with("revoked"));
    eventually(
        Duration::from_secs(10),
        "the revoked key is refused",
        || {
            let r = reads(key.clone());
            async move { (r.await == Code::Unauthenticated).then_some(()) }
        },
    )
    .await;
    occ.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn reads_of_police_incidents_are_on_the_record(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (occ, admin) = start(&pool, &broker, "occ-reads", &[]).await;
    let grpc = occ.grpc.as_str();
    let gateway = make_key(grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let police = desk(grpc, &admin, "police-desk", "police").await;
    let fire = desk(grpc, &admin, "fire-desk", "fire").await;
    let police_incident = publish(grpc, &gateway, vec![panic_button(1)])
        .await
        .expect("publish")
        .remove(0);
    let fire_incident = publish(grpc, &gateway, vec![smoke(1)])
        .await
        .expect("publish")
        .remove(0);

    get(grpc, &police, &police_incident).await.expect("read");
    listed_queues(grpc, &police, "police").await.expect("list");
    get(grpc, &fire, &fire_incident).await.expect("read");

    let recorded: Vec<(String, String)> =
        sqlx::query_as("SELECT principal, method FROM data_reads ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("reads");
    assert_eq!(
        recorded,
        [
            ("key:police-desk".to_owned(), "GetIncident".to_owned()),
            ("key:police-desk".to_owned(), "ListIncidents".to_owned()),
        ],
        "police reads are recorded, the fire service's are not"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_occ-under-test"))
        .args(["audit", "reads", "--incident", &police_incident])
        .args(["--database-url", &database_url(&pool)])
        .env("OCC_LOG", "warn")
        .output()
        .await
        .expect("occ runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("key:police-desk GetIncident {police_incident}")),
        "{report}"
    );

    // A watch stream's reads: its snapshot on the record before it is sent, then what its
    // changes showed.
    let watched = |number: String| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM data_reads r JOIN incidents i ON i.id = ANY(r.incident_ids) \
                  WHERE r.method = 'WatchIncidents' AND r.principal = 'key:police-desk' \
                    AND i.number = $1",
            )
            .bind(number)
            .fetch_one(&pool)
            .await
            .expect("reads");
            n
        }
    };
    let mut stream = IncidentServiceClient::new(channel(grpc).await)
        .watch_incidents(with_key(&police, pb::WatchIncidentsRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    let first = next_message(&mut stream).await.change.expect("a change");
    assert_eq!(
        first.incident.map(|i| i.number),
        Some(police_incident.clone())
    );
    assert_eq!(
        watched(police_incident.clone()).await,
        1,
        "the snapshot was recorded before it reached the desk"
    );
    let second = publish(grpc, &gateway, vec![panic_button(2)])
        .await
        .expect("publish")
        .remove(0);
    loop {
        let change = next_message(&mut stream).await.change.expect("a change");
        if change.incident.is_some_and(|i| i.number == second) {
            break;
        }
    }
    drop(stream);
    eventually(
        Duration::from_secs(15),
        "the change the stream showed is on the record",
        || {
            let n = watched(second.clone());
            async move { (n.await == 1).then_some(()) }
        },
    )
    .await;

    let erased = sqlx::query("DELETE FROM data_reads").execute(&pool).await;
    assert!(erased.is_err(), "the record of reads is append-only");
    occ.stop().await.expect("stop");
}
