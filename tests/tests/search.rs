//! Searching stored events as an investigator does, over a real socket against a data set
//! with known answers: zones (their own and further ones), the ends of a time window, polygon
//! edges and corners, a radius, plate spellings, attributes, confidence, paging; a plate's
//! journey; an event with its evidence and incident; what sources around an incident reported.
//! Searches without a case, outside the caller's kinds or by the wrong role are refused; every
//! search made is in the case's chain of the audit log, listed by `occ audit searches`.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use occ_proto::v1 as pb;
use occ_proto::v1::event_service_client::EventServiceClient;
use occ_proto::v1::ingest_service_client::IngestServiceClient;
use occ_proto::v1::search_events_request::Area;
use occ_proto::v1::source_service_client::SourceServiceClient;
use occ_tests::secure::{Grant, channel, make_key, start};
use occ_tests::{Broker, occ_command, with_key};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

const CASE: &str = "KR-2026-0412";

/// The data set: when each event happened, minutes after `base`.
struct Data {
    base: DateTime<Utc>,
    /// Event ids by name.
    ids: BTreeMap<&'static str, String>,
    /// The incident the panic button opened.
    panic_incident: String,
}

impl Data {
    fn at(&self, minutes: i64) -> prost_types::Timestamp {
        occ_api::convert::timestamp(self.base + TimeDelta::minutes(minutes))
    }

    fn range(&self, from: i64, to: i64) -> Option<pb::TimeRange> {
        Some(pb::TimeRange {
            start_time: Some(self.at(from)),
            end_time: Some(self.at(to)),
        })
    }

    /// The names of `events`, in their order.
    fn names(&self, events: &[pb::Event]) -> Vec<&'static str> {
        events.iter().map(|e| self.name(&e.id)).collect()
    }

    fn name(&self, id: &str) -> &'static str {
        self.ids
            .iter()
            .find(|(_, v)| *v == id)
            .map_or("?", |(k, _)| *k)
    }
}

struct Spec {
    name: &'static str,
    source: &'static str,
    kind: &'static str,
    minute: i64,
    at: Option<(f64, f64)>,
    zone: &'static str,
    extra_zones: &'static [&'static str],
    attributes: &'static [(&'static str, &'static str)],
    confidence: Option<f64>,
}

const fn spec(
    name: &'static str,
    source: &'static str,
    kind: &'static str,
    minute: i64,
    at: Option<(f64, f64)>,
    zone: &'static str,
) -> Spec {
    Spec {
        name,
        source,
        kind,
        minute,
        at,
        zone,
        extra_zones: &[],
        attributes: &[],
        confidence: None,
    }
}

impl Spec {
    const fn extra(self, extra_zones: &'static [&'static str]) -> Spec {
        Spec {
            extra_zones,
            ..self
        }
    }

    const fn attrs(self, attributes: &'static [(&'static str, &'static str)]) -> Spec {
        Spec { attributes, ..self }
    }

    const fn sure(self, confidence: f64) -> Spec {
        Spec {
            confidence: Some(confidence),
            ..self
        }
    }
}

/// The city's events over two hours. A square block spans 51.10–51.12 N, 71.40–71.42 E.
const EVENTS: &[Spec] = &[
    // One car's plate read three times, spelled three ways, and another car's.
    spec(
        "lpr1",
        "cam-lpr-1",
        "lpr.read",
        1,
        Some((51.100, 71.400)),
        "esil_1",
    )
    .attrs(&[("plate", "505 AAA 02")])
    .sure(0.95),
    spec(
        "lpr2",
        "cam-lpr-2",
        "lpr.read",
        20,
        Some((51.105, 71.405)),
        "esil_2",
    )
    .attrs(&[("plate", "505aaa02")])
    .sure(0.9),
    spec(
        "lpr3",
        "cam-lpr-3",
        "lpr.read",
        40,
        Some((51.110, 71.410)),
        "esil_3",
    )
    .attrs(&[("plate", "505-ААА-02")]) // Cyrillic А
    .sure(0.7),
    spec("lpr4", "cam-lpr-1", "lpr.read", 30, None, "esil_1")
        .attrs(&[("plate", "505AAA03")])
        .sure(0.9),
    // People and cars: inside the block, on its edge, on its corner, just outside.
    spec(
        "person",
        "cam-5",
        "object.person",
        5,
        Some((51.11, 71.41)),
        "esil_1",
    )
    .attrs(&[("color", "red")])
    .sure(0.4),
    spec(
        "car_edge",
        "cam-6",
        "object.car",
        10,
        Some((51.10, 71.41)),
        "esil_9",
    )
    .extra(&["esil_1"])
    .attrs(&[("color", "red")])
    .sure(0.9),
    spec(
        "car_corner",
        "cam-7",
        "object.car",
        15,
        Some((51.12, 71.42)),
        "esil_4",
    )
    .attrs(&[("color", "blue")]),
    spec(
        "car_out",
        "cam-8",
        "object.car",
        16,
        Some((51.0999, 71.41)),
        "esil_4",
    ),
    // Smoke: the fire service's kind, not the police's.
    spec(
        "smoke",
        "smoke-1",
        "smoke.detected",
        12,
        Some((51.11, 71.41)),
        "esil_1",
    ),
    // Around the panic button pressed at minute 100 (51.128, 71.431): near and far, inside
    // and outside the quarter hour before and after.
    spec(
        "near_before",
        "cam-near",
        "object.person",
        95,
        Some((51.1290, 71.4310)),
        "esil_transit_stop_1",
    ),
    spec(
        "far",
        "cam-far",
        "object.person",
        96,
        Some((51.1500, 71.4310)),
        "esil_7",
    ),
    spec(
        "near_early",
        "cam-near",
        "object.person",
        80,
        Some((51.1290, 71.4310)),
        "esil_transit_stop_1",
    ),
    spec(
        "near_after",
        "cam-near",
        "object.person",
        110,
        Some((51.1290, 71.4310)),
        "esil_transit_stop_1",
    ),
    spec(
        "smoke_near",
        "smoke-2",
        "smoke.detected",
        100,
        Some((51.1285, 71.4310)),
        "esil_transit_stop_1",
    ),
];

async fn seed(grpc: &str, gateway: &str, admin: &str) -> Data {
    // Two hours back from a whole minute, all within the last day.
    let base = (Utc::now() - TimeDelta::hours(3))
        .duration_trunc(TimeDelta::minutes(1))
        .expect("minute");
    let mut data = Data {
        base,
        ids: BTreeMap::new(),
        panic_incident: String::new(),
    };
    SourceServiceClient::new(channel(grpc).await)
        .upsert_source(with_key(
            admin,
            pb::UpsertSourceRequest {
                source: Some(pb::Source {
                    id: "cam-lpr-1".into(),
                    kind: "camera".into(),
                    name: "Kabanbay batyr / Turan".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("register the first plate reader");

    let mut events: Vec<pb::Event> = EVENTS
        .iter()
        .map(|s| pb::Event {
            source_id: s.source.into(),
            external_id: s.name.into(),
            r#type: s.kind.into(),
            occurred_at: Some(data.at(s.minute)),
            location: s.at.map(|(lat, lon)| pb::GeoPoint { lat, lon }),
            zone: s.zone.into(),
            extra_zones: s.extra_zones.iter().map(|z| (*z).to_owned()).collect(),
            attributes: (!s.attributes.is_empty()).then(|| prost_types::Struct {
                fields: s
                    .attributes
                    .iter()
                    .map(|(k, v)| {
                        (
                            (*k).to_owned(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue((*v).into())),
                            },
                        )
                    })
                    .collect(),
            }),
            confidence: s.confidence,
            evidence: if s.name == "lpr1" {
                vec![pb::Evidence {
                    kind: pb::EvidenceKind::Snapshot as i32,
                    reference: "nvr-1:snap-505aaa02-1".into(),
                    url: "https://nvr-1.city.example/snap/505aaa02-1.jpg".into(),
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        })
        .collect();
    let mut panic = occ_tests::panic_button(1);
    panic.occurred_at = Some(data.at(100));
    events.push(panic);
    let results = IngestServiceClient::new(channel(grpc).await)
        .publish_events(with_key(gateway, pb::PublishEventsRequest { events }))
        .await
        .expect("publish")
        .into_inner()
        .results;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.outcome(),
            pb::PublishOutcome::Accepted,
            "event {i}: {r:?}"
        );
    }
    for (s, r) in EVENTS.iter().zip(&results) {
        data.ids.insert(s.name, r.event_id.clone());
    }
    let panic = results.last().expect("the panic press");
    data.ids.insert("panic", panic.event_id.clone());
    data.panic_incident = panic.incidents[0].number.clone();
    data
}

fn search(data: &Data, from: i64, to: i64) -> pb::SearchEventsRequest {
    pb::SearchEventsRequest {
        case_reference: CASE.into(),
        time_range: data.range(from, to),
        ..Default::default()
    }
}

/// Searches, returning the names found (newest first) and the next page's token.
async fn find(
    client: &mut EventServiceClient<Channel>,
    key: &str,
    data: &Data,
    request: pb::SearchEventsRequest,
) -> (Vec<&'static str>, String) {
    let page = client
        .search_events(with_key(key, request))
        .await
        .expect("SearchEvents")
        .into_inner();
    (data.names(&page.events), page.next_page_token)
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[sqlx::test(migrations = false)]
async fn investigators_find_what_the_city_saw_within_their_kinds_and_every_search_is_recorded(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let grants = "police:lpr.*,police:object.*,police:panic.*,fire:smoke.*";
    let (occ, admin) = start(&pool, &broker, "occ-search", &["--search-grants", grants]).await;
    let gateway = make_key(&occ.grpc, &admin, "gw", Grant::role(&"gateway")).await;
    let detective = make_key(
        &occ.grpc,
        &admin,
        "detective-7",
        Grant::role(&"investigator").agencies(&["police"]),
    )
    .await;
    let fire = make_key(
        &occ.grpc,
        &admin,
        "fire-investigator",
        Grant::role(&"investigator").agencies(&["fire"]),
    )
    .await;
    let water = make_key(
        &occ.grpc,
        &admin,
        "water-investigator",
        Grant::role(&"investigator").agencies(&["water"]),
    )
    .await;
    let desk = make_key(
        &occ.grpc,
        &admin,
        "police-desk",
        Grant::role(&"dispatcher").queues(&["police"]),
    )
    .await;
    let data = seed(&occ.grpc, &gateway, &admin).await;
    let mut client = EventServiceClient::new(channel(&occ.grpc).await);
    let mut recorded = 0;

    // One zone: its own events and those also in it, newest first; smoke is not police's.
    let esil_1 = |from, to| pb::SearchEventsRequest {
        zones: vec!["esil_1".into()],
        ..search(&data, from, to)
    };
    assert_eq!(
        find(&mut client, &detective, &data, esil_1(0, 16)).await,
        (vec!["car_edge", "person", "lpr1"], String::new())
    );
    assert_eq!(
        find(&mut client, &fire, &data, esil_1(0, 16)).await.0,
        vec!["smoke"],
        "the fire service's investigator sees only its kind"
    );
    // A window includes its start and excludes its end.
    assert_eq!(
        find(&mut client, &detective, &data, esil_1(0, 10)).await.0,
        vec!["person", "lpr1"]
    );
    assert_eq!(
        find(&mut client, &detective, &data, esil_1(5, 11)).await.0,
        vec!["car_edge", "person"]
    );
    recorded += 4;

    // Paging: two, then the last one; a token is only good for its own search.
    let (first, token) = find(
        &mut client,
        &detective,
        &data,
        pb::SearchEventsRequest {
            page_size: 2,
            ..esil_1(0, 16)
        },
    )
    .await;
    assert_eq!(first, vec!["car_edge", "person"]);
    assert!(!token.is_empty());
    let (second, last) = find(
        &mut client,
        &detective,
        &data,
        pb::SearchEventsRequest {
            page_size: 2,
            page_token: token.clone(),
            ..esil_1(0, 16)
        },
    )
    .await;
    assert_eq!((second, last), (vec!["lpr1"], String::new()));
    recorded += 2;
    let other = client
        .search_events(with_key(
            &detective,
            pb::SearchEventsRequest {
                page_token: token,
                ..esil_1(0, 17)
            },
        ))
        .await;
    assert_eq!(code(other), Code::InvalidArgument);

    // A polygon: inside, on an edge and on a corner are in it; a metre past its edge is not.
    let block = Area::Polygon(pb::Polygon {
        vertices: [
            (51.10, 71.40),
            (51.10, 71.42),
            (51.12, 71.42),
            (51.12, 71.40),
        ]
        .into_iter()
        .map(|(lat, lon)| pb::GeoPoint { lat, lon })
        .collect(),
    });
    let in_block = |types: Vec<String>| pb::SearchEventsRequest {
        area: Some(block.clone()),
        types,
        ..search(&data, 0, 60)
    };
    assert_eq!(
        find(
            &mut client,
            &detective,
            &data,
            in_block(vec!["object.*".into()])
        )
        .await
        .0,
        vec!["car_corner", "car_edge", "person"]
    );
    assert_eq!(
        find(&mut client, &detective, &data, in_block(Vec::new()))
            .await
            .0,
        vec!["lpr3", "lpr2", "car_corner", "car_edge", "person", "lpr1"],
        "every police kind with a position in the block (lpr4 has none; smoke is not police's)"
    );
    // A radius: 100 m around the block's centre.
    let (around, _) = find(
        &mut client,
        &detective,
        &data,
        pb::SearchEventsRequest {
            area: Some(Area::Circle(pb::Circle {
                center: Some(pb::GeoPoint {
                    lat: 51.11,
                    lon: 71.41,
                }),
                radius_m: 100.0,
            })),
            ..search(&data, 0, 60)
        },
    )
    .await;
    assert_eq!(around, vec!["lpr3", "person"]);
    recorded += 3;

    // A plate in any spelling; attribute values; confidence.
    let (plate, _) = find(
        &mut client,
        &detective,
        &data,
        pb::SearchEventsRequest {
            plate: "505 ааа 02".into(),
            ..search(&data, 0, 60)
        },
    )
    .await;
    assert_eq!(plate, vec!["lpr3", "lpr2", "lpr1"]);
    let red = |min_confidence| pb::SearchEventsRequest {
        attributes: Some(prost_types::Struct {
            fields: [(
                "color".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("red".into())),
                },
            )]
            .into(),
        }),
        min_confidence,
        ..search(&data, 0, 60)
    };
    assert_eq!(
        find(&mut client, &detective, &data, red(None)).await.0,
        vec!["car_edge", "person"]
    );
    assert_eq!(
        find(&mut client, &detective, &data, red(Some(0.5))).await.0,
        vec!["car_edge"]
    );
    // Sources.
    let (reader, _) = find(
        &mut client,
        &detective,
        &data,
        pb::SearchEventsRequest {
            source_ids: vec!["cam-lpr-1".into()],
            ..search(&data, 0, 60)
        },
    )
    .await;
    assert_eq!(reader, vec!["lpr4", "lpr1"]);
    recorded += 4;

    // A plate's journey, oldest first, in pages, with the reader's name and what it read.
    let history = |page_token: String| pb::PlateHistoryRequest {
        case_reference: CASE.into(),
        plate: "505AAA02".into(),
        time_range: data.range(-60, 200),
        page_size: 2,
        page_token,
    };
    let first = client
        .plate_history(with_key(&detective, history(String::new())))
        .await
        .expect("PlateHistory")
        .into_inner();
    assert_eq!(first.plate_normalized, "505AAA02");
    let seen: Vec<(&str, &str, &str)> = first
        .sightings
        .iter()
        .map(|s| {
            (
                data.name(&s.event_id),
                s.source_name.as_str(),
                s.plate_read.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("lpr1", "Kabanbay batyr / Turan", "505 AAA 02"),
            ("lpr2", "", "505aaa02")
        ]
    );
    assert_eq!(first.sightings[0].time, Some(data.at(1)));
    assert_eq!(first.sightings[0].evidence.len(), 1);
    let second = client
        .plate_history(with_key(&detective, history(first.next_page_token)))
        .await
        .expect("PlateHistory")
        .into_inner();
    assert_eq!(
        second
            .sightings
            .iter()
            .map(|s| data.name(&s.event_id))
            .collect::<Vec<_>>(),
        vec!["lpr3"]
    );
    assert!(second.next_page_token.is_empty());
    recorded += 2;

    // One event with its evidence; the panic press with its incident; smoke does not exist
    // for the police.
    let get = |id: &str| pb::GetEventRequest {
        case_reference: CASE.into(),
        id: data.ids[id].clone(),
    };
    let lpr1 = client
        .get_event(with_key(&detective, get("lpr1")))
        .await
        .expect("GetEvent")
        .into_inner();
    let evidence = &lpr1.event.expect("event").evidence;
    assert_eq!(evidence[0].reference, "nvr-1:snap-505aaa02-1");
    assert_eq!(
        evidence[0].url,
        "https://nvr-1.city.example/snap/505aaa02-1.jpg"
    );
    let panic = client
        .get_event(with_key(&detective, get("panic")))
        .await
        .expect("GetEvent")
        .into_inner();
    assert_eq!(panic.incidents[0].number, data.panic_incident);
    assert_eq!(
        code(client.get_event(with_key(&detective, get("smoke"))).await),
        Code::NotFound
    );
    recorded += 3;

    // Around the panic press: near sources in the quarter hour before and after, oldest first.
    let around = client
        .around_incident(with_key(
            &detective,
            pb::AroundIncidentRequest {
                case_reference: CASE.into(),
                incident: data.panic_incident.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("AroundIncident")
        .into_inner();
    assert_eq!(
        data.names(&around.events),
        vec!["near_before", "panic", "near_after"]
    );
    assert_eq!(
        around.time_range,
        data.range(85, 115),
        "the window: 15 minutes either side"
    );
    recorded += 1;

    // Refused: no case; too long a window; a kind not granted; an agency granted nothing; a
    // role that does not search. None of them is run, so none is recorded.
    let refused = [
        (
            &detective,
            pb::SearchEventsRequest {
                case_reference: String::new(),
                ..search(&data, 0, 60)
            },
            Code::InvalidArgument,
        ),
        (
            &detective,
            search(&data, 0, 32 * 24 * 60),
            Code::InvalidArgument,
        ),
        (
            &detective,
            pb::SearchEventsRequest {
                types: vec!["smoke.*".into()],
                ..search(&data, 0, 60)
            },
            Code::PermissionDenied,
        ),
        (
            &detective,
            pb::SearchEventsRequest {
                types: vec!["*".into()],
                ..search(&data, 0, 60)
            },
            Code::PermissionDenied,
        ),
        (&water, search(&data, 0, 60), Code::PermissionDenied),
        (&desk, search(&data, 0, 60), Code::PermissionDenied),
    ];
    for (i, (key, request, expected)) in refused.into_iter().enumerate() {
        let got = client.search_events(with_key(key, request)).await;
        assert_eq!(code(got), expected, "refusal {i}");
    }

    // Every search on the record, for oversight: who, the case, what, how many results.
    let program = env!("CARGO_BIN_EXE_occ-under-test");
    let (ok, out, err) = occ_command(
        program,
        &pool,
        &[
            "audit", "searches", "--case", CASE, "--json", "--limit", "1000",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), recorded, "{out}");
    let fire_searches = lines
        .iter()
        .filter(|l| l["by"] == "key:fire-investigator")
        .count();
    assert_eq!(fire_searches, 1);
    let newest = &lines[0];
    assert_eq!(newest["method"], "AroundIncident");
    assert_eq!(newest["by"], "key:detective-7");
    assert_eq!(newest["results"], 3);
    assert_eq!(
        newest["parameters"]["incident"],
        data.panic_incident.as_str()
    );
    let plate_search = lines
        .iter()
        .find(|l| l["parameters"]["plate"] == "505AAA02" && l["method"] == "SearchEvents")
        .expect("the plate search is on the record");
    assert_eq!(plate_search["results"], 3);
    let (ok, out, _) = occ_command(program, &pool, &["audit", "verify", "--case", CASE]).await;
    assert!(ok && out.contains("intact"), "{out}");

    // A legal hold on the block's cameras for the case: placed, listed, released, on the record.
    let placed = client
        .place_legal_hold(with_key(
            &detective,
            pb::PlaceLegalHoldRequest {
                case_reference: CASE.into(),
                reason: "court order 2-114/2026".into(),
                time_range: data.range(0, 60),
                source_ids: vec!["cam-5".into(), "cam-6".into()],
                zones: Vec::new(),
            },
        ))
        .await
        .expect("PlaceLegalHold")
        .into_inner()
        .hold
        .expect("hold");
    assert_eq!(placed.created_by, "key:detective-7");
    let in_force = |include_released| pb::ListLegalHoldsRequest { include_released };
    let listed = client
        .list_legal_holds(with_key(&detective, in_force(false)))
        .await
        .expect("ListLegalHolds")
        .into_inner()
        .holds;
    assert_eq!(listed, vec![placed.clone()]);
    let backwards = client
        .place_legal_hold(with_key(
            &detective,
            pb::PlaceLegalHoldRequest {
                case_reference: CASE.into(),
                time_range: data.range(60, 0),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(backwards), Code::InvalidArgument);
    let released = client
        .release_legal_hold(with_key(
            &detective,
            pb::ReleaseLegalHoldRequest {
                id: placed.id.clone(),
            },
        ))
        .await
        .expect("ReleaseLegalHold")
        .into_inner()
        .hold
        .expect("hold");
    assert_eq!(released.released_by, "key:detective-7");
    let again = client
        .release_legal_hold(with_key(
            &detective,
            pb::ReleaseLegalHoldRequest { id: placed.id },
        ))
        .await;
    assert_eq!(code(again), Code::NotFound);
    let listed = |include_released| {
        let mut client = client.clone();
        let detective = detective.clone();
        async move {
            client
                .list_legal_holds(with_key(&detective, in_force(include_released)))
                .await
                .expect("ListLegalHolds")
                .into_inner()
                .holds
                .len()
        }
    };
    assert_eq!((listed(false).await, listed(true).await), (0, 1));
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE entity_type = 'legal_hold' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("audit");
    assert_eq!(actions, ["legal_hold.placed", "legal_hold.released"]);
    occ.stop().await.expect("stop");
}
