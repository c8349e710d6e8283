use chrono::Utc;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::testing::{any_json, fixture, fixture_json, mutate};

fn adapter() -> FrigateAdapter {
    FrigateAdapter::new(&"frigate=http://nvr-1.city:5000".parse().expect("config")).expect("valid")
}

fn decode_with(
    adapter: &FrigateAdapter,
    topic: &str,
    payload: &[u8],
) -> Result<Vec<Event>, Rejection> {
    adapter.decode(
        &Message {
            topic,
            payload,
            received_at: Utc::now(),
        },
        &Limits::default(),
    )
}

fn decode(topic: &str, payload: &[u8]) -> Result<Vec<Event>, Rejection> {
    decode_with(&adapter(), topic, payload)
}

fn one(topic: &str, payload: &[u8]) -> Event {
    let mut events = decode(topic, payload).expect("valid message");
    assert_eq!(events.len(), 1, "{events:?}");
    events.remove(0)
}

fn message(kind: &str, after: serde_json::Value) -> Vec<u8> {
    json!({"type": kind, "before": after.clone(), "after": after})
        .to_string()
        .into_bytes()
}

#[test]
fn new_update_and_end_are_revisions_of_one_detection() {
    let new = one("frigate/events", &fixture("frigate/events-new.json"));
    let update = one("frigate/events", &fixture("frigate/events-update.json"));
    let end = one("frigate/events", &fixture("frigate/events-end.json"));
    for e in [&new, &update, &end] {
        assert_eq!(
            e.source_id.as_str(),
            "frigate:frigate:left_bank_park_cam_12"
        );
        assert_eq!(e.external_id.as_deref(), Some("1764081123.512034-k3v9qa"));
        assert_eq!(e.idempotency_key, new.idempotency_key);
        assert_eq!(e.event_type.as_str(), "object.person");
        assert_eq!(e.source_kind.as_ref().map(|k| k.as_str()), Some("camera"));
        // The object's start, not the message's.
        assert_eq!(rfc3339(e.occurred_at), "2025-11-25T14:32:03.512034000Z");
    }
    assert!(new.zone.is_none(), "zones are often empty in new");
    assert_eq!(
        update.zone.as_ref().map(|z| z.as_str()),
        Some("restricted_substation")
    );
    assert_eq!(
        update.attributes["entered_zones"],
        json!(["park_path", "restricted_substation"])
    );
    assert!(new.revision < update.revision);
    assert!(update.revision < end.revision, "end after the last update");
    assert_eq!(end.attributes["phase"], json!("end"));
    assert_eq!(
        end.attributes["end_time"],
        json!("2025-11-25T14:32:40.750000000Z")
    );
    assert_eq!(update.confidence.map(|c| c.value()), Some(0.93));
    assert_eq!(update.attributes["score"], json!(0.88));
}

#[test]
fn snapshot_and_clip_are_referenced_on_the_nvr() {
    let e = one("frigate/events", &fixture("frigate/events-update.json"));
    let urls: Vec<_> = e
        .evidence
        .iter()
        .map(|x| (x.kind, x.url.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        urls,
        [
            (
                EvidenceKind::Snapshot,
                "http://nvr-1.city:5000/api/events/1764081123.512034-k3v9qa/snapshot.jpg".into()
            ),
            (
                EvidenceKind::Clip,
                "http://nvr-1.city:5000/api/events/1764081123.512034-k3v9qa/clip.mp4".into()
            ),
            (
                EvidenceKind::Thumbnail,
                "http://nvr-1.city:5000/api/events/1764081123.512034-k3v9qa/thumbnail.jpg".into()
            ),
        ]
    );
    assert_eq!(
        e.evidence[0].reference,
        "frigate:frigate:1764081123.512034-k3v9qa"
    );
    // Without a base URL the reference is still kept.
    let bare = FrigateAdapter::new(&FrigateConfig::default()).expect("valid");
    let e = decode_with(
        &bare,
        "frigate/events",
        &fixture("frigate/events-update.json"),
    )
    .expect("valid")
    .remove(0);
    assert!(e.evidence.iter().all(|x| x.url.is_none()));
    assert_eq!(e.evidence.len(), 3);
}

#[test]
fn a_plate_as_documented_and_as_the_code_publishes_it() {
    // The documentation's form: a string, with the score beside it.
    let documented = one("frigate/events", &fixture("frigate/events-update-lpr.json"));
    assert_eq!(documented.event_type.as_str(), "object.car");
    assert_eq!(documented.attributes["plate"], json!("777ABC01"));
    assert_eq!(documented.attributes["plate_score"], json!(0.94));
    assert_eq!(documented.measurements["speed"], 38.5);
    assert_eq!(documented.measurements["average_speed"], 41.2);
    assert_eq!(documented.zone.as_ref().map(|z| z.as_str()), Some("lane_2"));
    assert!(
        documented
            .evidence
            .iter()
            .all(|x| x.kind != EvidenceKind::Clip)
    );

    // What Frigate 0.16+ actually publishes: a [plate, score] pair, and the sub label too.
    let mut after = fixture_json("frigate/events-update-lpr.json")["after"].clone();
    after["recognized_license_plate"] = json!(["505AAA02", 0.91]);
    after["recognized_license_plate_score"] = json!(null);
    after["sub_label"] = json!(["Ambulance 12", 0.88]);
    after["current_estimated_speed"] = json!(0);
    let code = one("frigate/events", &message("update", after.clone()));
    assert_eq!(code.attributes["plate"], json!("505AAA02"));
    assert_eq!(code.attributes["plate_score"], json!(0.91));
    assert_eq!(code.attributes["sub_label"], json!("Ambulance 12"));
    assert_eq!(code.attributes["sub_label_score"], json!(0.88));
    assert!(
        !code.measurements.contains_key("speed"),
        "0 outside a speed zone is no reading"
    );

    // A cleared sub label is [null, null].
    after["sub_label"] = json!([null, null]);
    after["recognized_license_plate"] = json!(null);
    let cleared = one("frigate/events", &message("update", after));
    assert!(!cleared.attributes.contains_key("sub_label"));
    assert!(!cleared.attributes.contains_key("plate"));
}

#[test]
fn a_014_object_without_later_fields_decodes() {
    let after = json!({
        "id": "1700000000.1-abc123", "camera": "gate", "label": "person",
        "sub_label": null, "top_score": 0.8, "false_positive": false,
        "start_time": 1700000000.1, "end_time": null, "score": 0.8,
        "frame_time": 1700000001.0, "box": [0, 0, 1, 1], "area": 1, "ratio": 1.0,
        "region": [0, 0, 1, 1], "current_zones": [], "entered_zones": [],
        "thumbnail": null, "has_snapshot": false, "has_clip": false,
        "stationary": false, "motionless_count": 0, "position_changes": 0,
        "attributes": {}, "current_attributes": [], "snapshot": null
    });
    let e = one("frigate/events", &message("new", after));
    assert_eq!(e.event_type.as_str(), "object.person");
    assert!(e.evidence.is_empty());
}

#[test]
fn an_object_in_overlapping_zones_is_in_all_of_them() {
    let mut after = fixture_json("frigate/events-update.json")["after"].clone();
    after["current_zones"] = json!(["park_path", "restricted_substation"]);
    let e = one("frigate/events", &message("update", after));
    let zones: Vec<_> = e.zones().map(|z| z.as_str()).collect();
    assert_eq!(zones, ["park_path", "restricted_substation"]);
}

#[test]
fn a_false_positive_is_not_a_detection() {
    let mut after = fixture_json("frigate/events-update.json")["after"].clone();
    after["false_positive"] = json!(true);
    assert!(
        decode("frigate/events", &message("update", after))
            .expect("valid")
            .is_empty()
    );
}

#[test]
fn errors_name_the_field() {
    let mut bad = fixture_json("frigate/events-update.json");
    bad["after"]["current_zones"] = json!("restricted_substation");
    let err = decode("frigate/events", bad.to_string().as_bytes()).expect_err("invalid");
    assert_eq!(
        err.0,
        "after.current_zones: expected an array, got string \"restricted_substation\""
    );

    let mut bad = fixture_json("frigate/events-update.json");
    bad["after"]["sub_label"] = json!(42);
    let err = decode("frigate/events", bad.to_string().as_bytes()).expect_err("invalid");
    assert_eq!(
        err.0,
        "after.sub_label: expected a string or a [name, score] pair"
    );

    let mut bad = fixture_json("frigate/events-update.json");
    bad["type"] = json!("moved");
    let err = decode("frigate/events", bad.to_string().as_bytes()).expect_err("invalid");
    assert_eq!(err.0, "type: must be new, update or end, got \"moved\"");

    let mut bad = fixture_json("frigate/events-update.json");
    bad["after"]["camera"] = json!("cam one");
    let err = decode("frigate/events", bad.to_string().as_bytes()).expect_err("invalid");
    assert!(
        err.0.starts_with("after.camera: camera \"cam one\""),
        "{err}"
    );

    let err = decode("frigate/events", b"{\"type\": \"new\"}").expect_err("no object");
    assert_eq!(err.0, "Frigate event: missing field `after`");
}

#[test]
fn a_review_that_becomes_an_alert_is_an_event_of_its_own() {
    let e = one("frigate/reviews", &fixture("frigate/reviews-update.json"));
    assert_eq!(e.event_type.as_str(), "camera.alert");
    assert_eq!(
        e.external_id.as_deref(),
        Some("review:1764081123.900100-r2d2aa")
    );
    assert_eq!(
        e.zone.as_ref().map(|z| z.as_str()),
        Some("restricted_substation")
    );
    assert_eq!(e.attributes["objects"], json!(["person"]));
    assert_eq!(
        e.attributes["detections"],
        json!(["1764081123.512034-k3v9qa"])
    );
    assert_eq!(
        e.evidence[0].url.as_deref(),
        Some(
            "http://nvr-1.city:5000/clips/review/thumb-left_bank_park_cam_12-1764081123.900100-r2d2aa.webp"
        )
    );

    // Still a detection: nothing new for OCC.
    let mut detection = fixture_json("frigate/reviews-update.json");
    detection["after"]["severity"] = json!("detection");
    assert!(
        decode("frigate/reviews", detection.to_string().as_bytes())
            .expect("valid")
            .is_empty()
    );

    // Its end and GenAI's summary (0.17) are later revisions of the same alert.
    let mut end = fixture_json("frigate/reviews-update.json");
    end["type"] = json!("end");
    end["after"]["end_time"] = json!(1764081200.5);
    let end = one("frigate/reviews", end.to_string().as_bytes());
    let mut genai = fixture_json("frigate/reviews-update.json");
    genai["type"] = json!("genai");
    genai["after"]["data"]["metadata"] = json!({
        "title": "Person at the substation fence",
        "scene": "A person climbs the fence of the substation at night.",
        "shortSummary": "Person climbing the substation fence.",
        "confidence": 0.8, "potential_threat_level": 2, "other_concerns": null, "time": null
    });
    let genai = one("frigate/reviews", genai.to_string().as_bytes());
    assert!(e.revision < end.revision && end.revision < genai.revision);
    assert_eq!(genai.idempotency_key, e.idempotency_key);
    assert_eq!(genai.measurements["threat_level"], 2.0);
    assert_eq!(
        genai.attributes["description"],
        json!("Person climbing the substation fence.")
    );
}

#[test]
fn tracked_object_updates_become_plates_faces_descriptions_and_classes() {
    let lpr = one(
        "frigate/tracked_object_update",
        json!({"type": "lpr", "id": "1764082001.100200-p8z1rt", "name": null,
               "plate": "505 AAA 02", "score": 0.93, "camera": "kabanbay_batyr_ave_cam_03",
               "timestamp": 1764082003.2})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(lpr.event_type.as_str(), "vehicle.plate");
    assert_eq!(lpr.attributes["plate"], json!("505 AAA 02"));
    assert_eq!(
        lpr.attributes["detection_id"],
        json!("1764082001.100200-p8z1rt")
    );
    assert_eq!(lpr.confidence.map(|c| c.value()), Some(0.93));
    assert_eq!(
        lpr.source_id.as_str(),
        "frigate:frigate:kabanbay_batyr_ave_cam_03"
    );

    let face = one(
        "frigate/tracked_object_update",
        br#"{"type": "face", "id": "1.2-x", "name": "alice", "score": 0.9, "camera": "gate", "timestamp": 1764082003.2}"#,
    );
    assert_eq!(face.event_type.as_str(), "object.face");
    assert_eq!(face.attributes["face"], json!("alice"));

    // A description without a camera (0.15) is the NVR's.
    let described = one(
        "frigate/tracked_object_update",
        br#"{"type": "description", "id": "1.2-x", "description": "A man in a red jacket."}"#,
    );
    assert_eq!(described.source_id.as_str(), "frigate:frigate");
    assert_eq!(described.event_type.as_str(), "object.description");
    let again = one(
        "frigate/tracked_object_update",
        br#"{"type": "description", "id": "1.2-x", "description": "A man in a red jacket.", "camera": "gate"}"#,
    );
    let other = one(
        "frigate/tracked_object_update",
        br#"{"type": "description", "id": "1.2-x", "description": "A man in a blue jacket.", "camera": "gate"}"#,
    );
    assert_eq!(
        described.external_id, again.external_id,
        "same words, same key"
    );
    assert_ne!(again.external_id, other.external_id);

    let class = one(
        "frigate/tracked_object_update",
        br#"{"type": "classification", "id": "1.2-x", "camera": "gate", "timestamp": 1764082003.2, "model": "vehicle_type", "sub_label": "ambulance", "score": 0.97}"#,
    );
    assert_eq!(class.event_type.as_str(), "object.classification");
    assert_eq!(class.attributes["class"], json!("ambulance"));

    for nothing in [
        &br#"{"type": "face", "id": "1.2-x", "name": null, "score": 0.0, "camera": "gate", "timestamp": 1.0}"#[..],
        br#"{"type": "lpr", "name": null, "plate": null, "camera": "gate"}"#,
        br#"{"type": "something_new", "id": "1.2-x"}"#,
    ] {
        assert!(
            decode("frigate/tracked_object_update", nothing)
                .expect("valid")
                .is_empty()
        );
    }
}

#[test]
fn camera_status_and_the_nvrs_last_will_are_status_events() {
    let off = one("frigate/left_bank_park_cam_12/status/detect", b"offline");
    assert_eq!(off.event_type.as_str(), "source.offline");
    assert_eq!(
        off.source_id.as_str(),
        "frigate:frigate:left_bank_park_cam_12"
    );
    let on = one("frigate/left_bank_park_cam_12/status/detect", b"online");
    assert_eq!(on.event_type.as_str(), "source.online");
    for ignored in [
        ("frigate/cam/status/record", &b"offline"[..]),
        ("frigate/cam/status/audio", b"offline"),
        ("frigate/cam/status/detect", b"disabled"),
    ] {
        assert!(decode(ignored.0, ignored.1).expect("valid").is_empty());
    }
    assert!(decode("frigate/cam/status/detect", b"sleepy").is_err());

    let will = one("frigate/available", b"offline");
    assert_eq!(will.event_type.as_str(), "source.offline");
    assert_eq!(will.source_id.as_str(), "frigate:frigate");
    let stopped = one("frigate/available", b"stopped");
    assert_eq!(stopped.event_type.as_str(), "source.offline");
    assert_eq!(
        one("frigate/available", b"online").event_type.as_str(),
        "source.online"
    );
}

#[test]
fn several_nvrs_under_their_own_prefixes() {
    let nvr2 = FrigateAdapter::new(&"city/nvr-2".parse().expect("config")).expect("valid");
    assert!(
        nvr2.topic_filters()
            .contains(&"city/nvr-2/events".to_owned())
    );
    let e = decode_with(
        &nvr2,
        "city/nvr-2/events",
        &fixture("frigate/events-update.json"),
    )
    .expect("valid")
    .remove(0);
    assert_eq!(
        e.source_id.as_str(),
        "frigate:city.nvr-2:left_bank_park_cam_12"
    );
    assert!(
        decode_with(
            &nvr2,
            "frigate/events",
            &fixture("frigate/events-update.json")
        )
        .is_err()
    );
    assert!(FrigateAdapter::new(&"frigate/+".parse().expect("config")).is_err());
    assert!("frigate=ftp://x".parse::<FrigateConfig>().is_err());
}

const FIXTURES: [(&str, &str); 5] = [
    ("frigate/events", "frigate/events-new.json"),
    ("frigate/events", "frigate/events-update.json"),
    ("frigate/events", "frigate/events-end.json"),
    ("frigate/events", "frigate/events-update-lpr.json"),
    ("frigate/reviews", "frigate/reviews-update.json"),
];

proptest! {
    /// Whatever the bytes, on whichever topic: events or a reason, never a panic.
    #[test]
    fn any_bytes_are_decoded_or_rejected(
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        topic in prop::sample::select(vec![
            "frigate/events", "frigate/reviews", "frigate/tracked_object_update",
            "frigate/cam/status/detect", "frigate/available",
        ]),
    ) {
        let _ = decode(topic, &payload);
    }

    /// A valid message with any one part changed or removed: events or a reason that says
    /// what is wrong, never a panic.
    #[test]
    fn mutated_messages_are_decoded_or_rejected(
        which in 0..FIXTURES.len(),
        pick in any::<usize>(),
        replacement in proptest::option::of(any_json()),
    ) {
        let (topic, file) = FIXTURES[which];
        let mutated = mutate(fixture_json(file), pick, replacement);
        match decode(topic, mutated.to_string().as_bytes()) {
            Ok(events) => prop_assert!(events.len() <= 1),
            Err(reason) => prop_assert!(!reason.0.is_empty()),
        }
    }
}
