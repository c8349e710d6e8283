use chrono::Utc;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::testing::{any_json, fixture, fixture_json, mutate};

const UP: &str =
    "application/9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44/device/a84041000181c0a7/event/up";
const STATUS: &str =
    "application/9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44/device/a84041000181c0a7/event/status";

fn topic(event: &str) -> String {
    format!(
        "application/9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44/device/a84041000181c0a7/event/{event}"
    )
}

fn decode(topic: &str, payload: &[u8]) -> Result<Vec<Event>, Rejection> {
    ChirpstackAdapter::new(&ChirpstackConfig::default())
        .expect("default topic")
        .decode(
            &Message {
                topic,
                payload,
                received_at: Utc::now(),
            },
            &Limits::default(),
        )
}

fn one(topic: &str, payload: &[u8]) -> Event {
    let mut events = decode(topic, payload).expect("valid message");
    assert_eq!(events.len(), 1, "{events:?}");
    events.remove(0)
}

#[test]
fn an_uplinks_decoded_object_becomes_measurements() {
    let e = one(UP, &fixture("chirpstack/up-water-level.json"));
    assert_eq!(e.source_id.as_str(), "lorawan:a84041000181c0a7");
    assert_eq!(e.event_type.as_str(), "lorawan.uplink");
    assert_eq!(
        e.external_id.as_deref(),
        Some("5f1e3b2a-8c4d-4e6f-9a0b-1c2d3e4f5a6b")
    );
    assert_eq!(e.measurements["waterLevelCm"], 412.0);
    assert_eq!(e.measurements["batteryV"], 3.61);
    assert_eq!(e.measurements["alarm"], 1.0, "booleans are 1 or 0");
    assert_eq!(e.attributes["device_name"], json!("ishim-embankment-07"));
    assert_eq!(e.attributes["device_profile"], json!("ultrasonic-level-v2"));
    assert_eq!(e.attributes["application"], json!("flood-sensors"));
    assert_eq!(e.attributes["tag.district"], json!("esil"));
    assert_eq!(e.attributes["f_cnt"], json!(1842));
    assert_eq!(e.attributes["gateway_id"], json!("0016c001f1500a01"));
    assert_eq!(e.attributes["rssi"], json!(-97.0));
    // The tags place the device.
    assert_eq!(
        e.zone.as_ref().map(|z| z.as_str()),
        Some("ishim_embankment")
    );
    assert_eq!(e.district.as_ref().map(|d| d.as_str()), Some("esil"));
    assert_eq!(
        e.occurred_at.to_rfc3339(),
        "2026-11-25T06:14:03.118242+00:00"
    );
}

#[test]
fn a_redelivered_reserialised_uplink_has_the_same_key() {
    let first = one(UP, &fixture("chirpstack/up-water-level.json"));
    // Another serialiser: other key order, no spaces, numbers written differently.
    let mut v = fixture_json("chirpstack/up-water-level.json");
    v["object"]["waterLevelCm"] = json!(412);
    let again = one(UP, serde_json::to_string(&v).expect("json").as_bytes());
    assert_eq!(first.idempotency_key, again.idempotency_key);
}

#[test]
fn an_uplink_without_a_codec_is_kept_without_measurements() {
    let mut v = fixture_json("chirpstack/up-water-level.json");
    v.as_object_mut().expect("object").remove("object");
    let e = one(UP, v.to_string().as_bytes());
    assert!(e.measurements.is_empty());
    assert_eq!(e.event_type.as_str(), "lorawan.uplink");
    assert_eq!(e.attributes["data"], json!("AZAC5A=="));

    // 4.0 left default values out altogether.
    let minimal = json!({
        "deduplicationId": "0b8a2c1e-0000-4000-8000-000000000001",
        "time": "2023-01-01T00:00:00Z",
        "deviceInfo": {"devEui": "A84041000181C0A7", "deviceName": "x"},
        "devAddr": "01ab23cd", "fCnt": 3, "data": "AQ==",
        "rxInfo": [{"gatewayId": "0016c001f1500a01", "rssi": -100, "snr": 2.5}],
        "txInfo": {"frequency": 868100000}
    });
    let e = one(UP, minimal.to_string().as_bytes());
    assert_eq!(
        e.source_id.as_str(),
        "lorawan:a84041000181c0a7",
        "lower case"
    );
}

#[test]
fn nested_objects_arrays_and_text_are_flattened() {
    let mut v = fixture_json("chirpstack/up-water-level.json");
    v["object"] = json!({
        "water": {"levelCm": 301.5, "trend": "rising"},
        "temps": [1.5, 2.5],
        "flags": {"tamper": false},
        "note": null
    });
    let e = one(UP, v.to_string().as_bytes());
    assert_eq!(e.measurements["water.levelCm"], 301.5);
    assert_eq!(e.measurements["temps.0"], 1.5);
    assert_eq!(e.measurements["temps.1"], 2.5);
    assert_eq!(e.measurements["flags.tamper"], 0.0);
    assert_eq!(e.attributes["object.water.trend"], json!("rising"));
}

#[test]
fn an_oversized_object_is_kept_with_what_fits() {
    let mut v = fixture_json("chirpstack/up-water-level.json");
    let many: serde_json::Map<String, serde_json::Value> =
        (0..100).map(|i| (format!("ch{i:03}"), json!(i))).collect();
    v["object"] = serde_json::Value::Object(many);
    let e = one(UP, v.to_string().as_bytes());
    assert_eq!(e.measurements.len(), 64);
    assert_eq!(e.attributes["object_values_dropped"], json!(36));
}

#[test]
fn status_carries_battery_and_margin_and_a_low_battery_is_maintenance() {
    let e = one(STATUS, &fixture("chirpstack/status.json"));
    assert_eq!(e.event_type.as_str(), "device.status");
    assert_eq!(e.measurements["battery_pct"], 71.5);
    assert_eq!(e.measurements["margin_db"], 7.0);
    assert_eq!(
        e.external_id.as_deref(),
        Some("0d4c2b1a-9e8f-4a7b-8c6d-5e4f3a2b1c0d")
    );

    let mut low = fixture_json("chirpstack/status.json");
    low["batteryLevel"] = json!(12.6);
    let e = one(STATUS, low.to_string().as_bytes());
    assert_eq!(e.event_type.as_str(), "device.battery_low");

    // Mains-powered, or unable to say: no battery reading, nothing low.
    for (key, value) in [
        ("externalPowerSource", true),
        ("batteryLevelUnavailable", true),
    ] {
        let mut v = fixture_json("chirpstack/status.json");
        v["batteryLevel"] = json!(0.0);
        v[key] = json!(value);
        let e = one(STATUS, v.to_string().as_bytes());
        assert_eq!(e.event_type.as_str(), "device.status");
        assert!(!e.measurements.contains_key("battery_pct"));
    }
}

#[test]
fn logs_joins_and_locations() {
    let log = json!({
        "time": "2026-11-25T06:20:11.002341+00:00",
        "deviceInfo": {"devEui": "a84041000181c0a7", "deviceName": "ishim-embankment-07", "tags": {}},
        "level": "ERROR", "code": "UPLINK_CODEC",
        "description": "TypeError: cannot read property 'x' of undefined",
        "context": {"deduplication_id": "5f1e3b2a-8c4d-4e6f-9a0b-1c2d3e4f5a6b"}
    });
    let e = one(&topic("log"), log.to_string().as_bytes());
    assert_eq!(e.event_type.as_str(), "device.error");
    assert_eq!(e.attributes["code"], json!("UPLINK_CODEC"));
    assert_eq!(
        e.external_id.as_deref(),
        Some(
            "log:2026-11-25T06:20:11.002341+00:00:UPLINK_CODEC:5f1e3b2a-8c4d-4e6f-9a0b-1c2d3e4f5a6b"
        )
    );
    let mut warning = log.clone();
    warning["level"] = json!("WARNING");
    assert_eq!(
        one(&topic("log"), warning.to_string().as_bytes())
            .event_type
            .as_str(),
        "device.warning"
    );

    let join = json!({"deduplicationId": "j-1", "time": "2026-11-25T06:00:00Z",
                      "deviceInfo": {"devEui": "a84041000181c0a7"}, "devAddr": "01ab23cd",
                      "regionConfigId": "eu868"});
    assert_eq!(
        one(&topic("join"), join.to_string().as_bytes())
            .event_type
            .as_str(),
        "lorawan.join"
    );

    let location = json!({"deduplicationId": "l-1", "deviceInfo": {"devEui": "a84041000181c0a7"},
                          "location": {"latitude": 51.16, "longitude": 71.43, "source": "GEO_RESOLVER_TDOA", "accuracy": 120.0}});
    let e = one(&topic("location"), location.to_string().as_bytes());
    assert_eq!(e.event_type.as_str(), "device.location");
    assert!((e.location.expect("position").lat() - 51.16).abs() < 1e-9);

    for ignored in ["ack", "txack", "integration", "something-later"] {
        assert!(decode(&topic(ignored), b"{}").expect("valid").is_empty());
    }
}

#[test]
fn errors_name_the_field() {
    let mut v = fixture_json("chirpstack/up-water-level.json");
    v["fCnt"] = json!("many");
    let err = decode(UP, v.to_string().as_bytes()).expect_err("invalid");
    assert_eq!(err.0, "fCnt: expected u32, got string \"many\"");

    let mut v = fixture_json("chirpstack/up-water-level.json");
    v["deviceInfo"]["devEui"] = json!("not-an-eui");
    let err = decode(UP, v.to_string().as_bytes()).expect_err("invalid");
    assert_eq!(
        err.0,
        "deviceInfo.devEui: must be 16 hexadecimal digits, got \"not-an-eui\""
    );

    let mut v = fixture_json("chirpstack/up-water-level.json");
    v["time"] = json!("yesterday");
    let err = decode(UP, v.to_string().as_bytes()).expect_err("invalid");
    assert!(err.0.starts_with("time: must be an RFC 3339 time"), "{err}");
}

#[test]
fn the_topic_template_is_configurable() {
    let adapter = ChirpstackAdapter::new(&ChirpstackConfig {
        topic: "lns/{{application_id}}/{{dev_eui}}/{{event}}".into(),
        ..ChirpstackConfig::default()
    })
    .expect("valid template");
    assert_eq!(adapter.topic_filters(), ["lns/+/+/+"]);
    let events = adapter
        .decode(
            &Message {
                topic: "lns/app/a84041000181c0a7/up",
                payload: &fixture("chirpstack/up-water-level.json"),
                received_at: Utc::now(),
            },
            &Limits::default(),
        )
        .expect("valid");
    assert_eq!(events.len(), 1);
    assert!(
        ChirpstackAdapter::new(&ChirpstackConfig {
            topic: "lns/{application_id}/{event}".into(),
            ..ChirpstackConfig::default()
        })
        .is_err(),
        "a template without {{dev_eui}}"
    );
}

proptest! {
    #[test]
    fn any_bytes_are_decoded_or_rejected(
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        event in prop::sample::select(vec!["up", "status", "join", "log", "location", "ack"]),
    ) {
        let _ = decode(&topic(event), &payload);
    }

    #[test]
    fn mutated_messages_are_decoded_or_rejected(
        which in 0..5usize,
        pick in any::<usize>(),
        replacement in proptest::option::of(any_json()),
    ) {
        let log = topic("log");
        let (t, file) = [
            (UP, "chirpstack/up-water-level.json"),
            (STATUS, "chirpstack/status.json"),
            (UP, "chirpstack/v4-up.json"),
            (STATUS, "chirpstack/v4-status.json"),
            (log.as_str(), "chirpstack/v4-log.json"),
        ][which];
        let mutated = mutate(fixture_json(file), pick, replacement);
        match decode(t, mutated.to_string().as_bytes()) {
            Ok(events) => prop_assert_eq!(events.len(), 1),
            Err(reason) => prop_assert!(!reason.0.is_empty()),
        }
    }
}

/// The JSON ChirpStack itself writes (its chirpstack_api crate's serialisation, see
/// tests/fixtures/README.md): every event it publishes decodes as documented above.
#[test]
fn what_chirpstacks_own_serialisation_writes_decodes() {
    let up = one(UP, &fixture("chirpstack/v4-up.json"));
    assert_eq!(up.event_type.as_str(), "lorawan.uplink");
    assert_eq!(up.measurements["waterLevelCm"], 412.0);
    assert_eq!(up.measurements["alarm"], 1.0);
    assert_eq!(up.attributes["object.trend"], json!("rising"));
    assert_eq!(
        up.attributes["gateway_id"],
        json!("0016c001f1500a01"),
        "the best of two"
    );
    assert_eq!(up.attributes["gateways"], json!(2));
    assert_eq!(up.attributes["region"], json!("eu868"));

    let bare = one(UP, &fixture("chirpstack/v4-up-no-codec.json"));
    assert!(bare.measurements.is_empty());
    assert_ne!(bare.idempotency_key, up.idempotency_key);

    let status = one(STATUS, &fixture("chirpstack/v4-status.json"));
    assert_eq!(
        status.event_type.as_str(),
        "device.battery_low",
        "12.5 % is low"
    );
    assert_eq!(status.measurements["battery_pct"], 12.5);

    let join = one(&topic("join"), &fixture("chirpstack/v4-join.json"));
    assert_eq!(join.event_type.as_str(), "lorawan.join");
    assert_eq!(join.attributes["dev_addr"], json!("01ab23ce"));

    let log = one(&topic("log"), &fixture("chirpstack/v4-log.json"));
    assert_eq!(log.event_type.as_str(), "device.error");
    assert_eq!(log.attributes["code"], json!("UPLINK_CODEC"));
    assert!(log.external_id.is_some(), "named by time, code and uplink");

    let location = one(&topic("location"), &fixture("chirpstack/v4-location.json"));
    assert_eq!(location.event_type.as_str(), "device.location");
    assert_eq!(location.measurements["accuracy_m"], 120.0);

    assert!(
        decode(&topic("txack"), &fixture("chirpstack/v4-txack.json"))
            .expect("valid")
            .is_empty()
    );
}

#[test]
fn tags_that_cannot_place_a_device_cost_nothing() {
    let mut v = fixture_json("chirpstack/up-water-level.json");
    let mut tags = serde_json::Map::new();
    tags.insert("kind".into(), json!("Water Sensor"));
    tags.insert("lat".into(), json!("95"));
    tags.insert("lon".into(), json!("71.4"));
    tags.insert("x".repeat(80), json!("long key"));
    for i in 0..40 {
        tags.insert(format!("t{i:02}"), json!("v"));
    }
    v["deviceInfo"]["tags"] = serde_json::Value::Object(tags);
    let texts: serde_json::Map<String, serde_json::Value> = (0..40)
        .map(|i| (format!("s{i:02}"), json!("text")))
        .collect();
    v["object"] = serde_json::Value::Object(texts);
    let e = one(UP, v.to_string().as_bytes());
    assert!(e.source_kind.is_none());
    assert!(e.location.is_none());
    assert!(e.attributes.len() <= 64);
    assert!(e.attributes.contains_key("object_values_dropped"));
}
