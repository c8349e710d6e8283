//! Real producers end to end, through a real Mosquitto and PostgreSQL: Frigate NVRs,
//! ChirpStack, SenML stations and OCC's own status topic, with the source registry, zones and
//! watch lists they meet on the way.

use std::time::Duration;

use occ_proto::v1 as pb;
use occ_tests::{
    Broker, Occ, Publisher, database_url, eventually, fixture, fixture_json, incidents, serve_args,
};
use serde_json::json;
use sqlx::PgPool;

const NVR: &str = "http://nvr-1.city.test:5000";

async fn start(pool: &PgPool, broker: &Broker, id: &str) -> Occ {
    let nvr = format!("frigate={NVR}");
    Occ::start(serve_args(
        &database_url(pool),
        broker.port,
        id,
        &["--frigate-nvr", &nvr, "--health-interval", "100ms"],
    ))
    .await
    .expect("occ starts")
}

async fn list(grpc: &str, queue: &str) -> Vec<pb::Incident> {
    incidents(grpc)
        .await
        .list_incidents(pb::ListIncidentsRequest {
            queue: queue.into(),
            ..Default::default()
        })
        .await
        .expect("ListIncidents")
        .into_inner()
        .incidents
}

async fn events_of(pool: &PgPool, source: &str) -> Vec<(String, i32, serde_json::Value)> {
    sqlx::query_as::<_, (String, i32, serde_json::Value)>(
        "SELECT event_type, revisions, attributes FROM events WHERE source_id = $1 ORDER BY received_at, id",
    )
    .bind(source)
    .fetch_all(pool)
    .await
    .expect("events")
}

async fn timeline_events(grpc: &str, id: &str) -> Vec<pb::Event> {
    incidents(grpc)
        .await
        .get_timeline(pb::GetTimelineRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .expect("GetTimeline")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| match e.entry {
            Some(pb::timeline_entry::Entry::Event(ev)) => Some(ev),
            _ => None,
        })
        .collect()
}

/// A source's registry entry once `ready` holds for it (its health is written once a flush).
async fn source_when(
    grpc: &str,
    id: &str,
    what: &str,
    ready: impl Fn(&pb::Source) -> bool,
) -> pb::Source {
    eventually(Duration::from_secs(10), what, || async {
        occ_tests::sources(grpc)
            .await
            .get_source(pb::GetSourceRequest { id: id.into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().source)
            .filter(|s| ready(s))
    })
    .await
}

/// Waits until this instance's registry has taken in a change: a dry run of `event` matches
/// `rule`.
async fn until_registry_applies(grpc: &str, event: pb::Event, rule: &str) {
    eventually(Duration::from_secs(10), "the registry reloads", || {
        let event = event.clone();
        async move {
            let matches = occ_tests::rules(grpc)
                .await
                .test_rule(pb::TestRuleRequest {
                    event: Some(event),
                    rule: None,
                })
                .await
                .expect("TestRule")
                .into_inner()
                .matches;
            matches.iter().any(|m| m.rule_name == rule).then_some(())
        }
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_frigate_object_entering_a_restricted_zone_is_one_detection_and_one_police_incident(
    pool: PgPool,
) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-frigate").await;
    let mut nvr = Publisher::connect(broker.port).await;

    // new (no zone yet) → update (in the substation) → the same update redelivered → the
    // review becomes an alert → end.
    nvr.publish("frigate/events", fixture("frigate/events-new.json"))
        .await;
    nvr.publish("frigate/events", fixture("frigate/events-update.json"))
        .await;
    nvr.publish("frigate/events", fixture("frigate/events-update.json"))
        .await;
    nvr.publish("frigate/reviews", fixture("frigate/reviews-update.json"))
        .await;
    nvr.publish("frigate/events", fixture("frigate/events-end.json"))
        .await;
    nvr.flush().await;

    let camera = "frigate:frigate:left_bank_park_cam_12";
    let stored = eventually(Duration::from_secs(10), "the detection ended", || async {
        let all = events_of(&pool, camera).await;
        all.iter()
            .any(|(t, _, a)| t == "object.person" && a["phase"] == json!("end"))
            .then_some(all)
    })
    .await;
    let detections: Vec<_> = stored
        .iter()
        .filter(|(t, ..)| t == "object.person")
        .collect();
    assert_eq!(detections.len(), 1, "one evolving detection: {stored:?}");
    assert_eq!(
        detections[0].1, 3,
        "new, update and end; the redelivery changed nothing"
    );
    let alerts: Vec<_> = stored
        .iter()
        .filter(|(t, ..)| t == "camera.alert")
        .collect();
    assert_eq!(alerts.len(), 1, "the review alert is an event of its own");

    let police = list(&occ.grpc, "police").await;
    assert_eq!(police.len(), 1, "{police:?}");
    let inc = &police[0];
    assert_eq!(inc.title, "Intrusion into restricted_substation");
    assert_eq!(inc.zone, "restricted_substation");
    assert_eq!(
        inc.event_count, 1,
        "the detection counts once however often it is updated"
    );

    // The timeline shows the detection with its evidence on the NVR.
    let events = timeline_events(&occ.grpc, &inc.id).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.revisions, 3);
    let urls: Vec<&str> = e.evidence.iter().map(|x| x.url.as_str()).collect();
    assert!(
        urls.contains(&format!("{NVR}/api/events/1764081123.512034-k3v9qa/snapshot.jpg").as_str())
            && urls
                .contains(&format!("{NVR}/api/events/1764081123.512034-k3v9qa/clip.mp4").as_str()),
        "{urls:?}"
    );

    // The camera is registered, unverified, as heard from.
    let source = source_when(&occ.grpc, camera, "the camera registered", |s| {
        s.last_seen_time.is_some()
    })
    .await;
    assert!(!source.verified);
    assert_eq!(source.status, pb::SourceStatus::Online as i32);
}

#[sqlx::test(migrations = false)]
async fn a_chirpstack_uplink_over_threshold_opens_one_utilities_incident(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-chirpstack").await;

    // The codec names the level its own way; the device profile maps it for the default rules.
    occ_tests::sources(&occ.grpc)
        .await
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: "ultrasonic-level-v2".into(),
                description: "Ishim embankment level sensors".into(),
                mapping: Some(pb::Mapping {
                    event_types: [("lorawan.uplink".into(), "water.level".into())].into(),
                    measurements: [("waterLevelCm".into(), "water_level_cm".into())].into(),
                    source_kind: "water_level_sensor".into(),
                }),
            }),
        })
        .await
        .expect("PutProfile");
    until_registry_applies(
        &occ.grpc,
        pb::Event {
            source_id: "lorawan:a84041000181c0a7".into(),
            r#type: "lorawan.uplink".into(),
            zone: "ishim_embankment".into(),
            measurements: [("waterLevelCm".into(), 412.0)].into(),
            attributes: Some(occ_api::convert::json_to_struct(
                json!({"device_profile": "ultrasonic-level-v2"})
                    .as_object()
                    .expect("object"),
            )),
            ..Default::default()
        },
        "flood-water-level",
    )
    .await;

    let topic = "application/9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44/device/a84041000181c0a7/event/up";
    let mut chirpstack = Publisher::connect(broker.port).await;
    chirpstack
        .publish(topic, fixture("chirpstack/up-water-level.json"))
        .await;
    chirpstack.flush().await;
    let utilities = eventually(Duration::from_secs(10), "a flood incident", || async {
        let all = list(&occ.grpc, "utilities").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(utilities[0].title, "Water level 412 cm at ishim_embankment");

    // A redelivery, re-serialised by another hop: same deduplicationId, nothing changes.
    let mut again = fixture_json("chirpstack/up-water-level.json");
    again["object"]["waterLevelCm"] = json!(412);
    chirpstack
        .publish(topic, serde_json::to_vec(&again).expect("json"))
        .await;
    // And a status report, to know the redelivery was processed before it.
    chirpstack
        .publish(
            &topic.replace("/up", "/status"),
            fixture("chirpstack/status.json"),
        )
        .await;
    chirpstack.flush().await;
    let source = "lorawan:a84041000181c0a7";
    eventually(Duration::from_secs(10), "the status stored", || async {
        let all = events_of(&pool, source).await;
        all.iter().any(|(t, ..)| t == "device.status").then_some(())
    })
    .await;
    let stored = events_of(&pool, source).await;
    assert_eq!(
        stored.iter().filter(|(t, ..)| t == "water.level").count(),
        1,
        "{stored:?}"
    );
    let utilities = list(&occ.grpc, "utilities").await;
    assert_eq!(utilities.len(), 1);
    assert_eq!(utilities[0].event_count, 1);

    // The status reached the registry: battery, and the device heard from.
    let s = source_when(&occ.grpc, source, "the battery recorded", |s| {
        s.battery_pct.is_some()
    })
    .await;
    assert_eq!(s.battery_pct, Some(71.5));

    // The network server's errors about the device show on its registry entry.
    chirpstack
        .publish(
            &topic.replace("/up", "/log"),
            json!({"time": "2026-11-25T06:20:11.002341+00:00",
                   "deviceInfo": {"devEui": "a84041000181c0a7"},
                   "level": "ERROR", "code": "UPLINK_CODEC",
                   "description": "TypeError: cannot read property 'x' of undefined",
                   "context": {"deduplication_id": "5f1e3b2a-8c4d-4e6f-9a0b-1c2d3e4f5a6b"}})
            .to_string(),
        )
        .await;
    chirpstack.flush().await;
    let s = source_when(&occ.grpc, source, "the error recorded", |s| {
        !s.last_error.is_empty()
    })
    .await;
    assert_eq!(
        s.last_error,
        "TypeError: cannot read property 'x' of undefined"
    );
}

#[sqlx::test(migrations = false)]
async fn a_senml_pack_with_relative_times_stores_absolute_times(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-senml").await;
    let mut station = Publisher::connect(broker.port).await;
    let before = chrono::Utc::now();
    station
        .publish(
            "occ/v1/senml/aq-esil-001",
            json!([
                {"bn": "urn:dev:mac:0024befffe804ff1:", "n": "pm2_5", "u": "ug/m3", "v": 187.0},
                {"n": "pm10", "u": "ug/m3", "v": 240.5},
                {"n": "temp", "u": "Cel", "v": -14.2, "t": -60}
            ])
            .to_string(),
        )
        .await;
    station.flush().await;
    let after = chrono::Utc::now();

    let rows = eventually(Duration::from_secs(10), "the pack stored", || async {
        let rows = sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>(
            "SELECT event_type, occurred_at, received_at FROM events WHERE source_id = 'aq-esil-001' ORDER BY occurred_at",
        )
        .fetch_all(&pool)
        .await
        .expect("events");
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let (temp_type, temp_at, received) = &rows[0];
    let (air_type, air_at, _) = &rows[1];
    assert_eq!(temp_type, "weather");
    assert_eq!(air_type, "air.quality");
    // "Now" is when OCC received the pack; the temperature a minute before it.
    assert_eq!(air_at, received);
    assert_eq!(*temp_at, *received - chrono::TimeDelta::seconds(60));
    assert!(*received >= before && *received <= after + chrono::TimeDelta::seconds(1));

    // 187 µg/m³ of PM2.5 is smog: the default rule opens an environment incident.
    let env = eventually(Duration::from_secs(10), "a smog incident", || async {
        let all = list(&occ.grpc, "environment").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(env.len(), 1);
}

#[sqlx::test(migrations = false)]
async fn a_watch_listed_plate_opens_a_police_incident_in_any_spelling(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-watchlist").await;
    let added = occ_tests::watchlist(&occ.grpc)
        .await
        .add_watchlist_entries(pb::AddWatchlistEntriesRequest {
            entries: vec![pb::WatchlistEntry {
                plate: "505 AAA 02".into(),
                list: "stolen_vehicles".into(),
                reason: "reported stolen 2026-11-20".into(),
                ..Default::default()
            }],
        })
        .await
        .expect("AddWatchlistEntries")
        .into_inner();
    assert_eq!(added.created, 1);
    let entry = &added.entries[0];
    assert_eq!(entry.plate_normalized, "505AAA02");
    until_registry_applies(
        &occ.grpc,
        pb::Event {
            source_id: "lpr-x".into(),
            r#type: "vehicle.plate".into(),
            attributes: Some(occ_api::convert::json_to_struct(
                json!({"plate": "505AAA02"}).as_object().expect("object"),
            )),
            ..Default::default()
        },
        "watchlisted-plate",
    )
    .await;

    // The camera's plate reader says "505aaa 02" and has no idea it is wanted.
    let mut nvr = Publisher::connect(broker.port).await;
    nvr.publish(
        "frigate/tracked_object_update",
        json!({"type": "lpr", "id": "1764082001.100200-p8z1rt", "name": null,
               "plate": "505aaa 02", "score": 0.93, "camera": "kabanbay_batyr_ave_cam_03",
               "timestamp": 1764082003.2})
        .to_string(),
    )
    .await;
    // The same car as the camera's tracked object, its plate spelt the code's way.
    let mut car = fixture_json("frigate/events-update-lpr.json");
    car["after"]["recognized_license_plate"] = json!(["505AAA02", 0.91]);
    nvr.publish("frigate/events", car.to_string()).await;
    // A plate that is not wanted, though the camera claims it is.
    nvr.publish(
        "occ/v1/events/lpr-esil-001",
        json!({"type": "vehicle.plate", "attributes": {"plate": "123KZX01", "watchlisted": true}})
            .to_string(),
    )
    .await;
    nvr.flush().await;

    let police = eventually(Duration::from_secs(10), "a police incident", || async {
        let all = list(&occ.grpc, "police").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(
        police.len(),
        1,
        "one incident for the wanted plate, however spelt: {police:?}"
    );
    assert!(
        police[0]
            .title
            .starts_with("Watch-listed vehicle 505AAA02 seen in "),
        "{}",
        police[0].title
    );
    // The plate read and the tracked car: two sightings, one incident.
    let joined = eventually(Duration::from_secs(5), "both sightings joined", || async {
        let p = list(&occ.grpc, "police").await;
        (p.first().map(|i| i.event_count) == Some(2)).then_some(p)
    })
    .await;
    assert_eq!(joined.len(), 1);
    let hits = eventually(Duration::from_secs(5), "the hit recorded", || async {
        let hits = occ_tests::watchlist(&occ.grpc)
            .await
            .list_watchlist_hits(pb::ListWatchlistHitsRequest {
                entry_id: entry.id.clone(),
                ..Default::default()
            })
            .await
            .expect("hits")
            .into_inner()
            .hits;
        (!hits.is_empty()).then_some(hits)
    })
    .await;
    assert_eq!(
        hits[0].source_id,
        "frigate:frigate:kabanbay_batyr_ave_cam_03"
    );
    let events = timeline_events(&occ.grpc, &police[0].id).await;
    let attrs = events[0].attributes.clone().expect("attributes");
    assert_eq!(
        attrs.fields["watchlist_reason"].kind,
        Some(prost_types::value::Kind::StringValue(
            "reported stolen 2026-11-20".into()
        ))
    );

    // Off the list: a later sighting opens nothing new; the removal is on the record.
    occ_tests::watchlist(&occ.grpc)
        .await
        .remove_watchlist_entry(pb::RemoveWatchlistEntryRequest {
            id: entry.id.clone(),
            reason: "vehicle recovered".into(),
        })
        .await
        .expect("remove");
    let audit: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE entity_type = 'watchlist' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("audit");
    assert_eq!(
        audit,
        [
            "watchlist.added",
            "watchlist.hit",
            "watchlist.hit",
            "watchlist.removed"
        ],
        "the entry, both sightings (plate read and tracked car), the removal"
    );
}

#[sqlx::test(migrations = false)]
async fn a_source_that_stops_reporting_goes_offline_and_comes_back(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-health").await;
    occ_tests::sources(&occ.grpc)
        .await
        .upsert_source(pb::UpsertSourceRequest {
            source: Some(pb::Source {
                id: "gas-nura-003".into(),
                kind: "gas_detector".into(),
                name: "Nura industrial park, hall 3".into(),
                location: Some(pb::GeoPoint {
                    lat: 51.095,
                    lon: 71.4,
                }),
                zone: "nura_industrial_1".into(),
                district: "nura".into(),
                expected_interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("UpsertSource");
    let mut detector = Publisher::connect(broker.port).await;
    detector
        .publish(
            "occ/v1/events/gas-nura-003",
            r#"{"type": "gas.level", "measurements": {"ch4_ppm": 3}}"#,
        )
        .await;
    detector.flush().await;

    // Silent for more than its second: offline, and a maintenance incident.
    let municipal = eventually(Duration::from_secs(10), "an offline incident", || async {
        let all = list(&occ.grpc, "municipal").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(
        municipal[0].title,
        "Source gas-nura-003 offline (nura_industrial_1)"
    );
    let get = || async {
        occ_tests::sources(&occ.grpc)
            .await
            .get_source(pb::GetSourceRequest {
                id: "gas-nura-003".into(),
            })
            .await
            .expect("GetSource")
            .into_inner()
            .source
            .expect("source")
    };
    assert_eq!(get().await.status, pb::SourceStatus::Offline as i32);

    // Heard from again: a source.online event, exactly once.
    detector
        .publish(
            "occ/v1/events/gas-nura-003",
            r#"{"type": "gas.level", "measurements": {"ch4_ppm": 4}}"#,
        )
        .await;
    detector.flush().await;
    eventually(Duration::from_secs(10), "back online", || async {
        let kinds: Vec<String> = events_of(&pool, "gas-nura-003")
            .await
            .into_iter()
            .map(|(t, ..)| t)
            .collect();
        kinds.contains(&"source.online".to_owned()).then_some(())
    })
    .await;
    let kinds: Vec<String> = events_of(&pool, "gas-nura-003")
        .await
        .into_iter()
        .map(|(t, ..)| t)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "source.offline").count(),
        kinds.iter().filter(|k| *k == "source.online").count(),
        "{kinds:?}"
    );
    // The offline event took the source's place, registered by the city.
    let zone: Option<String> = sqlx::query_scalar(
        "SELECT zone FROM events WHERE source_id = 'gas-nura-003' AND event_type = 'source.offline' LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("offline event");
    assert_eq!(zone.as_deref(), Some("nura_industrial_1"));
}

#[sqlx::test(migrations = false)]
async fn camera_status_and_the_nvrs_last_will_change_sources_once(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-camera-status").await;
    let mut nvr = Publisher::connect(broker.port).await;
    // Frigate re-sends a camera's status now and then: twice offline is one change.
    nvr.publish("frigate/gate_cam/status/detect", "offline")
        .await;
    nvr.publish("frigate/gate_cam/status/detect", "offline")
        .await;
    nvr.publish("frigate/gate_cam/status/record", "offline")
        .await;
    nvr.publish("frigate/available", "offline").await;
    nvr.flush().await;
    let municipal = eventually(Duration::from_secs(10), "two offline incidents", || async {
        let all = list(&occ.grpc, "municipal").await;
        (all.len() >= 2).then_some(all)
    })
    .await;
    let mut titles: Vec<&str> = municipal.iter().map(|i| i.title.as_str()).collect();
    titles.sort_unstable();
    assert_eq!(
        titles,
        [
            "Source frigate:frigate offline (unknown)",
            "Source frigate:frigate:gate_cam offline (unknown)"
        ]
    );
    let offline: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'source.offline'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(offline, 2);

    nvr.publish("frigate/gate_cam/status/detect", "online")
        .await;
    nvr.flush().await;
    eventually(Duration::from_secs(10), "the camera back", || async {
        let all = events_of(&pool, "frigate:frigate:gate_cam").await;
        all.iter().any(|(t, ..)| t == "source.online").then_some(())
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn zones_place_events_and_a_disabled_source_opens_nothing(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-zones").await;
    let imported = occ_tests::zones(&occ.grpc)
        .await
        .import_zones(pb::ImportZonesRequest {
            feature_collection: Some(occ_api::convert::json_to_struct(
                json!({"type": "FeatureCollection", "features": [
                    {"type": "Feature",
                     "properties": {"name": "restricted_substation_esil", "district": "esil"},
                     "geometry": {"type": "Polygon", "coordinates": [[
                        [71.420, 51.120], [71.425, 51.120], [71.425, 51.125],
                        [71.420, 51.125], [71.420, 51.120]]]}},
                    {"type": "Feature",
                     "properties": {"name": "esil_park", "district": "esil"},
                     "geometry": {"type": "Polygon", "coordinates": [[
                        [71.40, 51.10], [71.45, 51.10], [71.45, 51.15],
                        [71.40, 51.15], [71.40, 51.10]]]}}
                ]})
                .as_object()
                .expect("object"),
            )),
        })
        .await
        .expect("ImportZones")
        .into_inner();
    assert_eq!(imported.created, 2);
    let open_ring = occ_tests::zones(&occ.grpc)
        .await
        .put_zone(pb::PutZoneRequest {
            zone: Some(pb::Zone {
                name: "broken".into(),
                geometry: Some(occ_api::convert::json_to_struct(
                    json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]})
                        .as_object()
                        .expect("object"),
                )),
                ..Default::default()
            }),
        })
        .await
        .expect_err("an open ring");
    assert_eq!(open_ring.code(), tonic::Code::InvalidArgument);
    assert!(
        open_ring
            .message()
            .contains("zone.geometry.coordinates[0]: a ring must end where it starts"),
        "{}",
        open_ring.message()
    );
    let located = eventually(Duration::from_secs(10), "the zones loaded", || async {
        let z = occ_tests::zones(&occ.grpc)
            .await
            .locate_zone(pb::LocateZoneRequest {
                location: Some(pb::GeoPoint {
                    lat: 51.1222,
                    lon: 71.4222,
                }),
            })
            .await
            .expect("LocateZone")
            .into_inner();
        (!z.zone.is_empty()).then_some(z)
    })
    .await;
    assert_eq!(
        located.zone, "restricted_substation_esil",
        "the smallest zone"
    );
    assert_eq!(located.district, "esil");

    // A camera that only knows where the person is: the zone is found, the rule applies.
    let mut cam = Publisher::connect(broker.port).await;
    cam.publish(
        "occ/v1/events/cam-esil-0042",
        json!({"type": "object.person", "confidence": 0.9,
               "location": {"lat": 51.1222, "lon": 71.4222}})
        .to_string(),
    )
    .await;
    cam.flush().await;
    let police = eventually(Duration::from_secs(10), "an intrusion incident", || async {
        let all = list(&occ.grpc, "police").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(police[0].title, "Intrusion into restricted_substation_esil");

    // A camera under maintenance: its events are stored, they open nothing.
    occ_tests::sources(&occ.grpc)
        .await
        .upsert_source(pb::UpsertSourceRequest {
            source: Some(pb::Source {
                id: "cam-esil-0099".into(),
                kind: "camera".into(),
                disabled: true,
                ..Default::default()
            }),
        })
        .await
        .expect("UpsertSource");
    let smoke = pb::Event {
        source_id: "cam-esil-0099".into(),
        r#type: "smoke.detected".into(),
        zone: "esil_park".into(),
        ..Default::default()
    };
    eventually(Duration::from_secs(10), "the registry reloads", || {
        let smoke = smoke.clone();
        let grpc = occ.grpc.clone();
        async move {
            let matches = occ_tests::rules(&grpc)
                .await
                .test_rule(pb::TestRuleRequest {
                    event: Some(smoke),
                    rule: None,
                })
                .await
                .expect("TestRule")
                .into_inner()
                .matches;
            matches.is_empty().then_some(())
        }
    })
    .await;
    cam.publish(
        "occ/v1/events/cam-esil-0099",
        json!({"type": "smoke.detected", "zone": "esil_park", "id": "s-1"}).to_string(),
    )
    .await;
    cam.flush().await;
    eventually(Duration::from_secs(10), "the event stored", || async {
        (!events_of(&pool, "cam-esil-0099").await.is_empty()).then_some(())
    })
    .await;
    assert!(list(&occ.grpc, "fire").await.is_empty());
}

#[sqlx::test(migrations = false)]
async fn events_at_qos_0_are_counted_per_source(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-qos0").await;
    let mut nvr = Publisher::connect(broker.port).await;
    for _ in 0..3 {
        nvr.publish_qos0("frigate/events", fixture("frigate/events-update-lpr.json"))
            .await;
    }
    // At QoS 1, to know the ones before were processed.
    nvr.publish("frigate/events", fixture("frigate/events-update.json"))
        .await;
    nvr.flush().await;
    let counted = source_when(
        &occ.grpc,
        "frigate:frigate:kabanbay_batyr_ave_cam_03",
        "QoS 0 counted",
        |s| s.qos0_events > 0,
    )
    .await
    .qos0_events;
    // The same object three times is one event, and one event arrived at QoS 0.
    assert_eq!(counted, 1);
    let other = source_when(
        &occ.grpc,
        "frigate:frigate:left_bank_park_cam_12",
        "the other camera",
        |s| s.last_seen_time.is_some(),
    )
    .await;
    assert_eq!(other.qos0_events, 0);
}

#[sqlx::test(migrations = false)]
async fn dead_letters_are_listed_and_replayed_once_they_decode(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-replay").await;
    // Kept by an earlier OCC that could not read Frigate: a Frigate event, and one that no
    // version reads.
    let good = fixture("frigate/events-update.json");
    for (topic, payload, reason) in [
        (
            "frigate/events",
            good.clone(),
            "no adapter handles topic \"frigate/events\"",
        ),
        (
            "frigate/events",
            b"{\"type\": \"moved\"}".to_vec(),
            "no adapter handles topic \"frigate/events\"",
        ),
    ] {
        sqlx::query(
            "INSERT INTO dead_letters (id, received_at, transport, topic, payload, payload_size, payload_sha256, reason)
             VALUES ($1, now(), 'mqtt', $2, $3, $4, sha256($3), $5)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(topic)
        .bind(&payload)
        .bind(i32::try_from(payload.len()).expect("small"))
        .bind(reason)
        .execute(&pool)
        .await
        .expect("dead letter");
    }
    let mut client = occ_tests::dead_letters(&occ.grpc).await;
    let listed = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            unresolved_only: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .dead_letters;
    assert_eq!(listed.len(), 2);

    let results = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            topic_prefix: "frigate/".into(),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner()
        .results;
    let outcomes: Vec<(i32, i32)> = results.iter().map(|r| (r.outcome, r.events)).collect();
    assert_eq!(
        outcomes,
        [
            (pb::ReplayOutcome::Resolved as i32, 1),
            (pb::ReplayOutcome::StillFailing as i32, 0)
        ]
    );
    assert_eq!(results[1].reason, "Frigate event: missing field `after`");
    let police = list(&occ.grpc, "police").await;
    assert_eq!(
        police.len(),
        1,
        "the replayed detection opened its incident"
    );

    // Again: nothing changes.
    let again = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            ids: vec![results[0].id.clone()],
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner()
        .results;
    assert_eq!(again[0].outcome, pb::ReplayOutcome::AlreadyResolved as i32);
    let unresolved = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            unresolved_only: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .dead_letters;
    assert_eq!(unresolved.len(), 1);
    assert_eq!(unresolved[0].replays, 1);
    assert_eq!(list(&occ.grpc, "police").await[0].event_count, 1);
}

#[sqlx::test(migrations = false)]
async fn sources_are_registered_listed_and_lend_their_place_to_events(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = start(&pool, &broker, "occ-sources").await;
    let mut client = occ_tests::sources(&occ.grpc).await;
    let bad = client
        .import_sources(pb::ImportSourcesRequest {
            sources: vec![
                pb::Source {
                    id: "smoke-esil-001".into(),
                    ..Default::default()
                },
                pb::Source {
                    id: "bad id".into(),
                    location: Some(pb::GeoPoint {
                        lat: 91.0,
                        lon: 0.0,
                    }),
                    ..Default::default()
                },
            ],
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("sources[1].id"), "{}", bad.message());
    assert!(
        bad.message().contains("sources[1].location.lat"),
        "{}",
        bad.message()
    );

    let imported = client
        .import_sources(pb::ImportSourcesRequest {
            sources: (0..3)
                .map(|i| pb::Source {
                    id: format!("smoke-esil-{i:03}"),
                    kind: "smoke_detector".into(),
                    name: format!("Mangilik El 55/12, floor {i}"),
                    location: Some(pb::GeoPoint {
                        lat: 51.128207,
                        lon: 71.430411,
                    }),
                    zone: "left_bank_residential_4".into(),
                    district: "esil".into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("import")
        .into_inner();
    assert_eq!((imported.created, imported.updated), (3, 0));
    let page = client
        .list_sources(pb::ListSourcesRequest {
            district: "esil".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.sources.len(), 2);
    let rest = client
        .list_sources(pb::ListSourcesRequest {
            district: "esil".into(),
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.sources.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // An event that says neither where nor what takes both from its source.
    until_registry_applies(
        &occ.grpc,
        pb::Event {
            source_id: "smoke-esil-001".into(),
            r#type: "smoke.detected".into(),
            ..Default::default()
        },
        "fire-smoke",
    )
    .await;
    let mut detector = Publisher::connect(broker.port).await;
    detector
        .publish(
            "occ/v1/events/smoke-esil-001",
            r#"{"type": "smoke.detected", "id": "s-9"}"#,
        )
        .await;
    detector.flush().await;
    let fire = eventually(Duration::from_secs(10), "a fire incident", || async {
        let all = list(&occ.grpc, "fire").await;
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(
        fire[0].title,
        "Smoke or fire detected in left_bank_residential_4"
    );
    let location = fire[0].location.expect("the source's position");
    assert!((location.lat - 51.128207).abs() < 1e-9);
    let events = timeline_events(&occ.grpc, &fire[0].id).await;
    assert_eq!(events[0].source_kind, "smoke_detector");
    assert_eq!(events[0].district, "esil");
}
