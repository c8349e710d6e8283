//! OCC's native envelope on `occ/v1/events/{source_id}`:
//!
//! ```json
//! {"id": "det-2026-11-25-000871", "type": "smoke.detected", "severity": "critical",
//!  "occurred_at": "2026-11-25T06:31:07.220+05:00", "location": {"lat": 51.128, "lon": 71.430},
//!  "zone": "left_bank_residential_4", "confidence": 0.97, "source_kind": "smoke_detector",
//!  "measurements": {"obscuration_pct_per_m": 4.1}, "attributes": {"floor": "7"}}
//! ```
//!
//! Only `type` is required. Unknown fields are refused, so a misspelt field is reported rather
//! than silently ignored.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use occ_domain::{Event, EventInput, Limits, LocationInput, SourceId};
use serde::Deserialize;

use crate::adapter::{Adapter, Rejection};

/// The topic prefix of native events; the last level is the source id.
pub const TOPIC_PREFIX: &str = "occ/v1/events/";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    severity: Option<String>,
    occurred_at: Option<String>,
    location: Option<Location>,
    zone: Option<String>,
    confidence: Option<f64>,
    source_kind: Option<String>,
    #[serde(default)]
    measurements: BTreeMap<String, f64>,
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Location {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Default)]
pub struct NativeAdapter {
    filter: String,
}

impl NativeAdapter {
    pub fn new() -> Self {
        Self {
            filter: format!("{TOPIC_PREFIX}+"),
        }
    }
}

impl Adapter for NativeAdapter {
    fn name(&self) -> &'static str {
        "native"
    }

    fn topic_filter(&self) -> &str {
        &self.filter
    }

    fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection> {
        let source = topic.strip_prefix(TOPIC_PREFIX).ok_or_else(|| {
            Rejection(format!(
                "topic {topic:?} is not {TOPIC_PREFIX}{{source_id}}"
            ))
        })?;
        let source =
            SourceId::parse(source).map_err(|e| Rejection(format!("topic {topic:?}: {e}")))?;
        let de = &mut serde_json::Deserializer::from_slice(payload);
        let envelope: Envelope = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() || path == "." || path == "?" {
                Rejection(format!("invalid JSON envelope: {inner}"))
            } else {
                Rejection(format!("{path}: {inner}"))
            }
        })?;
        let input = EventInput {
            id: envelope.id,
            event_type: envelope.event_type,
            severity: envelope.severity,
            occurred_at: envelope.occurred_at,
            location: envelope.location.map(|l| LocationInput {
                lat: l.lat,
                lon: l.lon,
            }),
            zone: envelope.zone,
            confidence: envelope.confidence,
            source_kind: envelope.source_kind,
            measurements: envelope.measurements,
            attributes: envelope.attributes,
        };
        Event::parse(source, input, payload, received_at, limits)
            .map(|e| vec![e])
            .map_err(|e| Rejection(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMOKE: &str = include_str!("../../../tests/fixtures/native/smoke.json");

    fn decode(topic: &str, payload: &[u8]) -> Result<Vec<Event>, Rejection> {
        NativeAdapter::new().decode(topic, payload, Utc::now(), &Limits::default())
    }

    #[test]
    fn the_reference_envelope_decodes() {
        let events = decode("occ/v1/events/det-esil-0042", SMOKE.as_bytes()).expect("valid");
        let e = &events[0];
        assert_eq!(e.source_id.as_str(), "det-esil-0042");
        assert_eq!(e.event_type.as_str(), "smoke.detected");
        assert_eq!(e.external_id.as_deref(), Some("det-2026-11-25-000871"));
        assert_eq!(
            e.zone.as_ref().map(|z| z.as_str()),
            Some("left_bank_residential_4")
        );
        assert_eq!(e.measurements["obscuration_pct_per_m"], 4.1);
        assert_eq!(e.attributes["floor"], "7");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |payload: &str| {
            decode("occ/v1/events/cam-1", payload.as_bytes())
                .expect_err("invalid")
                .0
        };
        assert_eq!(
            err(r#"{"type": "x", "location": {"lat": "north", "lon": 1}}"#)
                .split(':')
                .next(),
            Some("location.lat")
        );
        assert!(err(r#"{"type": "x", "severty": "major"}"#).contains("unknown field `severty`"));
        assert!(
            err(r#"{"type": "smoke.detected", "confidence": 3}"#)
                .contains("confidence: must be between 0 and 1")
        );
        assert!(err("{not json").starts_with("invalid JSON envelope"));
        assert_eq!(err("{}"), "type: is required");
        assert!(
            err(r#"{"type": "x", "measurements": {"pm2_5": "high"}}"#)
                .starts_with("measurements.pm2_5")
        );
    }

    #[test]
    fn the_topic_names_a_valid_source() {
        assert!(decode("occ/v1/events/bad source", br#"{"type":"x"}"#).is_err());
        assert!(decode("elsewhere/cam-1", br#"{"type":"x"}"#).is_err());
    }

    proptest! {
        /// Whatever the bytes, decoding answers (events or a reason) and never panics.
        #[test]
        fn any_payload_is_decoded_or_rejected(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode("occ/v1/events/cam-1", &payload);
        }

        #[test]
        fn any_json_shape_is_decoded_or_rejected(
            t in "[a-z.]{0,12}",
            lat in proptest::num::f64::ANY,
            conf in proptest::num::f64::ANY,
        ) {
            let payload = serde_json::json!({"type": t, "location": {"lat": lat, "lon": 0.0}, "confidence": conf});
            if let Ok(events) = decode("occ/v1/events/cam-1", payload.to_string().as_bytes()) {
                let e = &events[0];
                // (Non-finite numbers become JSON null, which means "absent".)
                prop_assert!(e.location.is_none_or(|l| (-90.0..=90.0).contains(&l.lat())));
                prop_assert!(e.confidence.is_none_or(|c| (0.0..=1.0).contains(&c.value())));
            }
        }
    }
}
