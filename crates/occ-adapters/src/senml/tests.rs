use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::testing::{any_json, fixture, fixture_json, mutate};

const TOPIC: &str = "occ/v1/senml/aq-esil-001";

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 6, 0, 0)
        .single()
        .expect("valid time")
}

fn decode(payload: &[u8]) -> Result<Vec<Event>, Rejection> {
    SenmlAdapter::new(&SenmlConfig::default())
        .expect("default topic")
        .decode(
            &Message {
                topic: TOPIC,
                payload,
                received_at: received(),
            },
            &Limits::default(),
        )
}

fn pack(v: serde_json::Value) -> Vec<Event> {
    decode(v.to_string().as_bytes()).expect("valid pack")
}

fn err(v: serde_json::Value) -> String {
    decode(v.to_string().as_bytes())
        .expect_err("invalid pack")
        .0
}

#[test]
fn the_reference_pack_gives_one_event_per_time() {
    let events = decode(&fixture("senml/air-quality.json")).expect("valid");
    assert_eq!(events.len(), 2);
    // Chronological: the temperature a minute before the base time, then the particulates.
    let (temp, air) = (&events[0], &events[1]);
    assert_eq!(air.event_type.as_str(), "air.quality");
    assert_eq!(air.source_id.as_str(), "aq-esil-001");
    assert_eq!(air.measurements["pm2_5"], 187.0);
    assert_eq!(air.measurements["pm10"], 240.5);
    assert_eq!(
        air.occurred_at,
        Utc.timestamp_opt(1_764_050_400, 0).single().expect("t")
    );
    assert_eq!(
        air.attributes["units"],
        json!({"pm2_5": "ug/m3", "pm10": "ug/m3"})
    );
    assert_eq!(
        air.attributes["senml_base_name"],
        json!("urn:dev:mac:0024befffe804ff1:")
    );
    assert_eq!(temp.event_type.as_str(), "weather");
    assert_eq!(temp.measurements["temp"], -14.2);
    assert_eq!(
        temp.occurred_at,
        Utc.timestamp_opt(1_764_050_340, 0).single().expect("t")
    );
    assert_ne!(temp.idempotency_key, air.idempotency_key);
}

#[test]
fn relative_times_count_from_receipt() {
    let events = pack(json!([
        {"bn": "urn:dev:ow:10e2073a01080063:", "n": "temp", "u": "Cel", "v": 23.1},
        {"n": "temp", "u": "Cel", "v": 22.8, "t": -60},
        {"n": "humidity", "u": "%RH", "v": 41, "t": -60},
        {"n": "temp", "v": 22.5, "t": -120.5}
    ]));
    let times: Vec<_> = events.iter().map(|e| e.occurred_at).collect();
    assert_eq!(
        times,
        [
            received() - TimeDelta::milliseconds(120_500),
            received() - TimeDelta::seconds(60),
            received()
        ]
    );
    assert_eq!(events[1].measurements["humidity"], 41.0);
    assert_eq!(events[1].measurements["temp"], 22.8);
    // Base time plus a relative offset that stays below 2^28 is relative too.
    let events = pack(json!([{"bt": -30, "n": "dba", "v": 71.0, "t": -30}]));
    assert_eq!(events[0].occurred_at, received() - TimeDelta::seconds(60));
    assert_eq!(events[0].event_type.as_str(), "noise.level");
}

#[test]
fn base_values_and_names_resolve_as_the_rfc_says() {
    let events = pack(json!([
        {"bn": "gw-1/level/", "bt": 1764050400, "bv": 100, "bu": "cm", "n": "water_level", "v": 312},
        {"bn": "gw-1/meter/", "n": "energy", "u": "J", "s": 5000, "v": 20},
        {"n": "door", "vb": true, "t": 10},
        {"n": "note", "vs": "checked", "t": 10},
        {"n": "blob", "vd": "aGkgCg", "t": 10}
    ]));
    let level = events
        .iter()
        .find(|e| e.event_type.as_str() == "water.level")
        .expect("level");
    assert_eq!(level.measurements["water_level"], 412.0, "bv + v");
    assert_eq!(level.attributes["units"], json!({"water_level": "cm"}));
    let meter = events
        .iter()
        .find(|e| e.measurements.contains_key("energy"))
        .expect("meter");
    assert_eq!(meter.measurements["energy"], 120.0, "bv still applies");
    assert_eq!(meter.measurements["energy.sum"], 5000.0);
    let later = events
        .iter()
        .find(|e| e.measurements.contains_key("door"))
        .expect("door");
    assert_eq!(later.measurements["door"], 1.0);
    assert_eq!(later.attributes["note"], json!("checked"));
    assert_eq!(later.attributes["blob"], json!("aGkgCg"));
    assert_eq!(later.attributes["senml_base_name"], json!("gw-1/meter/"));
}

#[test]
fn the_same_absolute_reading_twice_is_one_reading() {
    let a = pack(json!([{"bn": "x:", "bt": 1764050400, "n": "pm2_5", "v": 12}]));
    let b = pack(json!([{"bt": 1764050400.0, "bn": "x:", "v": 12, "n": "pm2_5"}]));
    assert_eq!(a[0].idempotency_key, b[0].idempotency_key);
    let c = pack(json!([{"bn": "x:", "bt": 1764050460, "n": "pm2_5", "v": 12}]));
    assert_ne!(a[0].idempotency_key, c[0].idempotency_key);
    // Another quantity at the same time is another reading, not a repeat.
    let d = pack(json!([{"bn": "x:", "bt": 1764050400, "n": "no2", "v": 40}]));
    assert_ne!(a[0].idempotency_key, d[0].idempotency_key);
}

#[test]
fn versions_are_feature_bitmaps() {
    assert_eq!(pack(json!([{"bver": 10, "n": "t", "v": 1}])).len(), 1);
    assert_eq!(
        pack(json!([{"bver": 26, "n": "pm2_5", "u": "ug/m3", "v": 1}])).len(),
        1,
        "secondary units"
    );
    assert_eq!(
        err(json!([{"bver": 42, "n": "t", "v": 1}])),
        "[0].bver: version 42 uses SenML features OCC does not understand (it reads 10, and 26 with secondary units)"
    );
    assert!(err(json!([{"bver": 5, "n": "t", "v": 1}])).starts_with("[0].bver"));
    assert_eq!(
        err(json!([{"bver": 10, "n": "a", "v": 1}, {"bver": 26, "n": "b", "v": 1}])),
        "[1].bver: every record of a pack has the same version, got 26 after 10"
    );
}

#[test]
fn invalid_packs_are_refused_with_the_record_and_label() {
    assert_eq!(
        err(json!([{"n": "t", "v": 1, "crit_": true}])),
        "[0].crit_: a field that must be understood, and OCC does not (RFC 8428 §4.4)"
    );
    // Unknown fields without the underscore are ignored.
    assert_eq!(
        pack(json!([{"n": "t", "v": 1, "vendor": {"x": 1}}])).len(),
        1
    );
    assert_eq!(
        err(json!([{"n": "t", "v": 1, "vs": "x"}])),
        "[0]: has more than one value (v, vs, vb, vd); a record holds one"
    );
    assert_eq!(
        err(json!([{"n": "t"}])),
        "[0]: has no value (v, vs, vb or vd) and no sum (s)"
    );
    assert_eq!(
        err(json!([{"n": "t", "v": "23.1"}])),
        "[0].v: expected f64, got string \"23.1\""
    );
    assert!(err(json!([{"n": "-bad", "v": 1}])).starts_with("[0].n: the name \"-bad\""));
    assert!(err(json!([{"n": "a b", "v": 1}])).starts_with("[0].n:"));
    assert_eq!(err(json!([])), "a SenML pack has at least one record");
    assert_eq!(
        err(json!({"bn": "x", "e": []})),
        "SenML pack: expected an array, got map"
    );
    assert!(err(json!([{"n": "d", "vd": "***"}])).starts_with("[0].vd: must be base64url"));
    assert!(err(json!([{"n": "t", "v": 1, "t": 1e300}])).starts_with("[0].t:"));
    assert!(
        decode(br#"[{"n": "t", "v": 1, "v": 2}]"#)
            .expect_err("duplicate label")
            .0
            .contains("duplicate field `v`")
    );
}

#[test]
fn a_base_only_record_sets_bases_for_the_next_ones() {
    let events = pack(json!([
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1764050400},
        {"n": "temp", "v": 3.5}
    ]));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].measurements["temp"], 3.5);
}

#[test]
fn a_name_given_only_as_base_name_uses_its_last_part() {
    let events = pack(json!([{"bn": "urn:dev:ow:10e2073a01080063:temp", "v": 3.5}]));
    assert_eq!(events[0].measurements["temp"], 3.5);
    // OMA LwM2M's paths, read although RFC 8428 wants a letter or digit first.
    let lwm2m = pack(json!([{"bn": "/3303/0/", "n": "5700", "v": 21.5}]));
    assert_eq!(lwm2m[0].measurements["5700"], 21.5);
}

proptest! {
    #[test]
    fn any_bytes_are_decoded_or_rejected(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&payload);
    }

    #[test]
    fn mutated_packs_are_decoded_or_rejected(
        pick in any::<usize>(),
        replacement in proptest::option::of(any_json()),
    ) {
        let mutated = mutate(fixture_json("senml/air-quality.json"), pick, replacement);
        match decode(mutated.to_string().as_bytes()) {
            Ok(events) => prop_assert!(events.len() <= 3),
            Err(reason) => prop_assert!(!reason.0.is_empty()),
        }
    }

    /// Any pack of well-formed records decodes, each record's value landing in an event.
    #[test]
    fn well_formed_packs_decode(
        records in proptest::collection::vec(
            ("[a-z][a-z0-9_]{0,10}", -1e6..1e6f64, proptest::option::of(-3600..0i64)), 1..12),
    ) {
        let items: Vec<_> = records
            .iter()
            .map(|(n, v, t)| match t {
                Some(t) => json!({"n": n, "v": v, "t": t}),
                None => json!({"n": n, "v": v}),
            })
            .collect();
        let events = decode(serde_json::Value::Array(items).to_string().as_bytes())
            .expect("well-formed pack");
        let values: usize = events.iter().map(|e| e.measurements.len()).sum();
        prop_assert!(values >= 1 && values <= records.len());
    }
}
