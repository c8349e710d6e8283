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
//!
//! A device or gateway also reports whether it is up on `occ/v1/status/{source_id}`: `online`
//! or `offline` (plain text, or `{"status": "offline"}`), typically as its MQTT last will, so
//! the broker announces a gateway that dropped off the network.

use std::collections::BTreeMap;

use occ_domain::{Event, EventInput, Evidence, Limits, LocationInput, SourceId, SourceStatus};
use serde::Deserialize;

use crate::adapter::{Adapter, Message, Rejection, TemplateError, TopicTemplate, from_json};
use crate::status::status_event;

/// Where native producers publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeConfig {
    /// Events: `occ/v1/events/{source_id}`.
    pub events_topic: String,
    /// Online/offline reports and last wills: `occ/v1/status/{source_id}`.
    pub status_topic: String,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            events_topic: "occ/v1/events/{source_id}".into(),
            status_topic: "occ/v1/status/{source_id}".into(),
        }
    }
}

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
    district: Option<String>,
    confidence: Option<f64>,
    source_kind: Option<String>,
    #[serde(default)]
    measurements: BTreeMap<String, f64>,
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    evidence: Vec<Evidence>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Location {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusReport {
    status: String,
}

/// OCC's own envelope and status reports.
#[derive(Debug)]
pub struct NativeAdapter {
    events: TopicTemplate,
    status: TopicTemplate,
}

impl NativeAdapter {
    pub fn new(config: &NativeConfig) -> Result<Self, TemplateError> {
        Ok(Self {
            events: TopicTemplate::parse(&config.events_topic, &["source_id"])?,
            status: TopicTemplate::parse(&config.status_topic, &["source_id"])?,
        })
    }

    fn decode_event(
        &self,
        source: SourceId,
        message: &Message<'_>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection> {
        let envelope: Envelope = from_json(message.payload, "envelope")?;
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
            district: envelope.district,
            confidence: envelope.confidence,
            source_kind: envelope.source_kind,
            measurements: envelope.measurements,
            attributes: envelope.attributes,
            evidence: envelope.evidence,
            ..EventInput::default()
        };
        Ok(vec![Event::parse(
            source,
            input,
            message.payload,
            message.received_at,
            limits,
        )?])
    }

    fn decode_status(
        &self,
        source: SourceId,
        message: &Message<'_>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection> {
        let text = std::str::from_utf8(message.payload)
            .map_err(|_| Rejection::new("status: must be UTF-8 text"))?
            .trim();
        let word = if text.starts_with('{') {
            from_json::<StatusReport>(message.payload, "status report")?.status
        } else {
            text.to_owned()
        };
        let status = match word.to_ascii_lowercase().as_str() {
            "online" => SourceStatus::Online,
            "offline" => SourceStatus::Offline,
            _ => {
                return Err(Rejection::field(
                    "status",
                    format!("must be online or offline, got {word:?}"),
                ));
            }
        };
        Ok(vec![status_event(
            source,
            status,
            "reported on the status topic (a last will, when the broker sent it)",
            message,
            limits,
        )?])
    }
}

fn source_of(template: &TopicTemplate, topic: &str) -> Option<Result<SourceId, Rejection>> {
    let captures = template.captures(topic)?;
    Some(
        SourceId::parse(captures["source_id"])
            .map_err(|e| Rejection(format!("topic {topic:?}: {e}"))),
    )
}

impl Adapter for NativeAdapter {
    fn name(&self) -> &'static str {
        "native"
    }

    fn topic_filters(&self) -> Vec<String> {
        vec![self.events.filter(), self.status.filter()]
    }

    fn decode(&self, message: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        if let Some(source) = source_of(&self.events, message.topic) {
            self.decode_event(source?, message, limits)
        } else if let Some(source) = source_of(&self.status, message.topic) {
            self.decode_status(source?, message, limits)
        } else {
            Err(Rejection(format!(
                "topic {:?} is neither {} nor {}",
                message.topic, self.events, self.status
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use chrono::Utc;

    const SMOKE: &str = include_str!("../../../tests/fixtures/native/smoke.json");

    fn decode(topic: &str, payload: &[u8]) -> Result<Vec<Event>, Rejection> {
        NativeAdapter::new(&NativeConfig::default())
            .expect("default topics")
            .decode(
                &Message {
                    topic,
                    payload,
                    received_at: Utc::now(),
                },
                &Limits::default(),
            )
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
    fn a_status_report_or_last_will_is_a_status_event() {
        for payload in [&b"offline"[..], b" OFFLINE\n", br#"{"status": "offline"}"#] {
            let events = decode("occ/v1/status/gw-esil-1", payload).expect("valid");
            assert_eq!(events[0].event_type.as_str(), "source.offline");
            assert_eq!(events[0].source_id.as_str(), "gw-esil-1");
        }
        let online = decode("occ/v1/status/gw-esil-1", b"online").expect("valid");
        assert_eq!(online[0].event_type.as_str(), "source.online");
        let err = decode("occ/v1/status/gw-esil-1", b"sleeping").expect_err("unknown");
        assert_eq!(err.0, "status: must be online or offline, got \"sleeping\"");
    }

    #[test]
    fn evidence_and_district_are_taken() {
        let events = decode(
            "occ/v1/events/vms-7",
            br#"{"type": "object.person", "district": "esil",
                 "evidence": [{"kind": "snapshot", "reference": "vms:881", "url": "https://vms.city/881.jpg"}]}"#,
        )
        .expect("valid");
        assert_eq!(
            events[0].district.as_ref().map(|d| d.as_str()),
            Some("esil")
        );
        assert_eq!(events[0].evidence[0].reference, "vms:881");
        let err = decode(
            "occ/v1/events/vms-7",
            br#"{"type": "object.person", "evidence": [{"kind": "snapshot", "reference": "x", "url": "ftp://x"}]}"#,
        )
        .expect_err("bad url");
        assert!(
            err.0.starts_with("evidence[0].url: must be an http"),
            "{err}"
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
