//! Frigate NVR, versions 0.14 to 0.17, under a configurable topic prefix (`frigate` by
//! default; several NVRs each have their own). What Frigate's code publishes is the authority
//! where its documentation differs.
//!
//! | topic | becomes |
//! |---|---|
//! | `<prefix>/events` (`new`, `update`, `end` of a tracked object) | one evolving `object.<label>` event per object, its latest state winning (revisions ordered by frame time) |
//! | `<prefix>/reviews` | a `camera.alert` event for a review item once its severity is `alert` (evolving as well); `detection` items carry nothing new |
//! | `<prefix>/tracked_object_update` | `vehicle.plate` (LPR), `object.face`, `object.description` (GenAI), `object.classification` |
//! | `<prefix>/<camera>/status/detect` | the camera's `source.online` / `source.offline` |
//! | `<prefix>/available` | the NVR's own status: `online`, or `offline` from its MQTT last will (`stopped` from 0.18) |
//!
//! Cameras are sources `frigate:<prefix>:<camera>` (a `/` in the prefix becomes `.`), the NVR
//! itself `frigate:<prefix>`. An object's snapshot and clip are referenced by Frigate's event
//! id, with links on the NVR's base URL when it is configured.

use chrono::{DateTime, Utc};
use occ_domain::{
    Event, EventInput, Evidence, EvidenceKind, Limits, Revision, SourceId, SourceStatus,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::adapter::{
    Adapter, Message, Rejection, TemplateError, from_json, hex_prefix, rfc3339, type_word,
    unix_time,
};
use crate::status::status_event;

/// One Frigate NVR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrigateConfig {
    /// Frigate's `mqtt.topic_prefix`.
    pub prefix: String,
    /// Where consoles reach the NVR's API (`http://nvr-1.city:5000`), for evidence links.
    pub base_url: Option<String>,
}

impl Default for FrigateConfig {
    fn default() -> Self {
        Self {
            prefix: "frigate".into(),
            base_url: None,
        }
    }
}

impl std::str::FromStr for FrigateConfig {
    type Err = String;

    /// `PREFIX` or `PREFIX=BASE_URL` (`frigate=http://nvr-1.city:5000`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (prefix, url) = match s.split_once('=') {
            Some((p, u)) => (p.trim(), Some(u.trim())),
            None => (s.trim(), None),
        };
        if let Some(u) = url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(format!(
                "{s:?}: the NVR's base URL must start with http:// or https://"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            base_url: url.map(|u| u.trim_end_matches('/').to_owned()),
        })
    }
}

impl std::fmt::Display for FrigateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.base_url {
            Some(url) => write!(f, "{}={url}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
}

impl serde::Serialize for FrigateConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The adapter for one NVR.
#[derive(Debug)]
pub struct FrigateAdapter {
    prefix: String,
    /// The prefix as it appears in source ids.
    source_prefix: String,
    base_url: Option<String>,
    nvr: SourceId,
}

impl FrigateAdapter {
    pub fn new(config: &FrigateConfig) -> Result<Self, TemplateError> {
        let err = |reason: &str| TemplateError {
            template: config.prefix.clone(),
            reason: reason.into(),
        };
        let prefix = config.prefix.trim_matches('/').to_owned();
        if prefix.is_empty() || prefix.contains(['+', '#']) {
            return Err(err(
                "a Frigate prefix is one or more topic levels without wildcards",
            ));
        }
        let source_prefix = prefix.replace('/', ".");
        let nvr = SourceId::parse(&format!("frigate:{source_prefix}"))
            .map_err(|e| err(&format!("cannot name sources after it: {e}")))?;
        Ok(Self {
            prefix,
            source_prefix,
            base_url: config.base_url.clone(),
            nvr,
        })
    }

    fn camera(&self, field: &str, camera: &str) -> Result<SourceId, Rejection> {
        SourceId::parse(&format!("frigate:{}:{camera}", self.source_prefix))
            .map_err(|e| Rejection::field(field, format!("camera {camera:?}: {}", e.message)))
    }

    fn evidence(&self, kind: EvidenceKind, id: &str, path: String) -> Evidence {
        Evidence {
            kind,
            reference: format!("frigate:{}:{id}", self.source_prefix),
            url: self.base_url.as_ref().map(|b| format!("{b}{path}")),
        }
    }
}

impl Adapter for FrigateAdapter {
    fn name(&self) -> &'static str {
        "frigate"
    }

    fn topic_filters(&self) -> Vec<String> {
        let p = &self.prefix;
        vec![
            format!("{p}/events"),
            format!("{p}/reviews"),
            format!("{p}/tracked_object_update"),
            format!("{p}/+/status/+"),
            format!("{p}/available"),
        ]
    }

    fn decode(&self, message: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let rest = message
            .topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                Rejection(format!(
                    "topic {:?} is not under {}/",
                    message.topic, self.prefix
                ))
            })?;
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["events"] => self.tracked_object(message, limits),
            ["reviews"] => self.review(message, limits),
            ["tracked_object_update"] => self.object_update(message, limits),
            ["available"] => self.available(message, limits),
            [camera, "status", role] => self.camera_status(camera, role, message, limits),
            _ => Err(Rejection(format!(
                "topic {:?} is not one OCC reads from Frigate",
                message.topic
            ))),
        }
    }
}

/// A name with a score, as Frigate writes sub labels and plates: `[name, score]` in its code
/// (either may be null), a bare string in its documentation and older versions.
fn labelled<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(String, Option<f64>)>, D::Error> {
    let v = Value::deserialize(d)?;
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some((s, None))),
        Value::Array(a) if a.len() <= 2 => match (a.first(), a.get(1)) {
            (None | Some(Value::Null), _) => Ok(None),
            (Some(Value::String(s)), score) => {
                let score = match score {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(_) => {
                        return Err(serde::de::Error::custom(
                            "expected a string or a [name, score] pair",
                        ));
                    }
                };
                Ok((!s.is_empty()).then_some((s.clone(), score)))
            }
            _ => Err(serde::de::Error::custom(
                "expected a string or a [name, score] pair",
            )),
        },
        _ => Err(serde::de::Error::custom(
            "expected a string or a [name, score] pair",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct EventMessage {
    #[serde(rename = "type")]
    kind: String,
    after: TrackedObject,
}

/// A tracked object as Frigate's `to_dict()` writes it; fields added after 0.14 are optional
/// and fields OCC does not use are ignored.
#[derive(Debug, Deserialize)]
struct TrackedObject {
    id: String,
    camera: String,
    label: String,
    #[serde(default, deserialize_with = "labelled")]
    sub_label: Option<(String, Option<f64>)>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    top_score: Option<f64>,
    #[serde(default)]
    false_positive: bool,
    #[serde(default)]
    start_time: Option<f64>,
    #[serde(default)]
    end_time: Option<f64>,
    #[serde(default)]
    frame_time: Option<f64>,
    #[serde(default)]
    current_zones: Vec<String>,
    #[serde(default)]
    entered_zones: Vec<String>,
    #[serde(default)]
    has_snapshot: bool,
    #[serde(default)]
    has_clip: bool,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    stationary: Option<bool>,
    #[serde(default)]
    pending_loitering: Option<bool>,
    #[serde(default)]
    max_severity: Option<String>,
    #[serde(default, deserialize_with = "labelled")]
    recognized_license_plate: Option<(String, Option<f64>)>,
    #[serde(default)]
    recognized_license_plate_score: Option<f64>,
    #[serde(default)]
    current_estimated_speed: Option<f64>,
    #[serde(default)]
    average_estimated_speed: Option<f64>,
    #[serde(default)]
    velocity_angle: Option<f64>,
}

/// Where a message stands in an object's (or a review's) life.
fn phase_rank(kind: &str) -> Result<i16, Rejection> {
    match kind {
        "new" => Ok(0),
        "update" => Ok(1),
        "end" => Ok(2),
        other => Err(Rejection::field(
            "type",
            format!("must be new, update or end, got {other:?}"),
        )),
    }
}

fn time(field: &str, t: Option<f64>) -> Result<Option<DateTime<Utc>>, Rejection> {
    t.map(|t| unix_time(field, t)).transpose()
}

/// Zones as the event takes them: at most as many as the limits allow (an object in more
/// zones than that is still an object).
fn split_zones(mut zones: Vec<String>, limits: &Limits) -> (Option<String>, Vec<String>) {
    zones.retain(|z| !z.is_empty());
    zones.truncate(limits.max_zones);
    let mut it = zones.into_iter();
    (it.next(), it.collect())
}

fn put(attributes: &mut Map<String, Value>, key: &str, value: impl Into<Value>) {
    attributes.insert(key.to_owned(), value.into());
}

impl FrigateAdapter {
    fn tracked_object(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let msg: EventMessage = from_json(m.payload, "Frigate event")?;
        let rank = phase_rank(&msg.kind)?;
        let o = msg.after;
        if o.false_positive {
            // Frigate publishes objects once they pass their threshold; one still marked a
            // false positive is not a detection.
            return Ok(Vec::new());
        }
        let source = self.camera("after.camera", &o.camera)?;
        let frame = time("after.frame_time", o.frame_time)?;
        let start = time("after.start_time", o.start_time)?;
        let end = time("after.end_time", o.end_time)?;
        let revision_at = frame.or(end).or(start).unwrap_or(m.received_at);

        let mut a = Map::new();
        put(&mut a, "frigate_id", o.id.as_str());
        put(&mut a, "nvr", self.prefix.as_str());
        put(&mut a, "camera", o.camera.as_str());
        put(&mut a, "label", o.label.as_str());
        put(&mut a, "phase", msg.kind.as_str());
        if let Some((name, score)) = &o.sub_label {
            put(&mut a, "sub_label", name.as_str());
            if let Some(s) = score {
                put(&mut a, "sub_label_score", *s);
            }
        }
        if let Some(s) = o.score {
            put(&mut a, "score", s);
        }
        if let Some(s) = o.top_score {
            put(&mut a, "top_score", s);
        }
        put(&mut a, "current_zones", o.current_zones.clone());
        put(&mut a, "entered_zones", o.entered_zones.clone());
        if let Some(v) = o.active {
            put(&mut a, "active", v);
        }
        if let Some(v) = o.stationary {
            put(&mut a, "stationary", v);
        }
        if let Some(v) = o.pending_loitering {
            put(&mut a, "loitering", v);
        }
        if let Some(v) = &o.max_severity {
            put(&mut a, "max_severity", v.as_str());
        }
        put(&mut a, "has_snapshot", o.has_snapshot);
        put(&mut a, "has_clip", o.has_clip);
        if let Some(e) = end {
            put(&mut a, "end_time", rfc3339(e));
        }
        if let Some((plate, score)) = &o.recognized_license_plate {
            put(&mut a, "plate", plate.as_str());
            if let Some(s) = score.or(o.recognized_license_plate_score) {
                put(&mut a, "plate_score", s);
            }
        }

        let mut measurements = std::collections::BTreeMap::new();
        for (name, value) in [
            ("speed", o.current_estimated_speed),
            ("average_speed", o.average_estimated_speed),
        ] {
            // Frigate reports 0 outside its speed zones: no reading, not a standstill.
            if let Some(v) = value.filter(|v| v.is_finite() && *v > 0.0) {
                measurements.insert(name.to_owned(), v);
            }
        }
        if let Some(v) = o.velocity_angle.filter(|v| v.is_finite())
            && measurements.contains_key("speed")
        {
            measurements.insert("velocity_angle".to_owned(), v);
        }

        let mut evidence = Vec::new();
        if o.has_snapshot {
            evidence.push(self.evidence(
                EvidenceKind::Snapshot,
                &o.id,
                format!("/api/events/{}/snapshot.jpg", o.id),
            ));
        }
        if o.has_clip {
            evidence.push(self.evidence(
                EvidenceKind::Clip,
                &o.id,
                format!("/api/events/{}/clip.mp4", o.id),
            ));
        }
        if o.has_snapshot || o.has_clip {
            evidence.push(self.evidence(
                EvidenceKind::Thumbnail,
                &o.id,
                format!("/api/events/{}/thumbnail.jpg", o.id),
            ));
        }

        let (zone, extra_zones) = split_zones(o.current_zones, limits);
        let input = EventInput {
            id: Some(o.id),
            event_type: Some(format!("object.{}", type_word(&o.label))),
            occurred_at: start.or(frame).map(rfc3339),
            zone,
            extra_zones,
            confidence: o.top_score.or(o.score),
            source_kind: Some("camera".into()),
            measurements,
            attributes: a,
            evidence,
            revision: Some(Revision {
                at: revision_at,
                rank,
            }),
            ..EventInput::default()
        };
        Ok(vec![Event::parse(
            source,
            input,
            m.payload,
            m.received_at,
            limits,
        )?])
    }

    fn review(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let msg: ReviewMessage = from_json(m.payload, "Frigate review")?;
        let r = msg.after;
        if r.severity != "alert" {
            // A detection-level review groups objects that arrive on frigate/events anyway.
            return Ok(Vec::new());
        }
        let source = self.camera("after.camera", &r.camera)?;
        let start = unix_time("after.start_time", r.start_time)?;
        let end = time("after.end_time", r.end_time)?;
        let d = r.data;
        // Reviews carry no frame time: their revisions rank by phase, and within updates by
        // how much the review has gathered (updates add objects, zones and labels).
        let grown = d.detections.len() + d.zones.len() + d.objects.len() + d.sub_labels.len();
        let rank = match msg.kind.as_str() {
            "new" => 0,
            "update" => 100 + i16::try_from(grown.min(99)).unwrap_or(99),
            "end" => 300,
            "genai" => 400,
            other => {
                return Err(Rejection::field(
                    "type",
                    format!("must be new, update, end or genai, got {other:?}"),
                ));
            }
        };
        let mut a = Map::new();
        put(&mut a, "review_id", r.id.as_str());
        put(&mut a, "nvr", self.prefix.as_str());
        put(&mut a, "camera", r.camera.as_str());
        put(&mut a, "phase", msg.kind.as_str());
        put(&mut a, "severity", r.severity.as_str());
        put(&mut a, "objects", d.objects.clone());
        put(&mut a, "detections", d.detections.clone());
        let sub_labels: Vec<&str> = d.sub_labels.iter().filter_map(Value::as_str).collect();
        put(&mut a, "sub_labels", sub_labels);
        if !d.audio.is_empty() {
            put(&mut a, "audio", d.audio.clone());
        }
        if let Some(e) = end {
            put(&mut a, "end_time", rfc3339(e));
        }
        let mut measurements = std::collections::BTreeMap::new();
        if let Some(Value::Object(meta)) = &d.metadata {
            let text = |k: &str| meta.get(k).and_then(Value::as_str);
            if let Some(t) = text("title") {
                put(&mut a, "title", t);
            }
            if let Some(t) = text("shortSummary").or_else(|| text("scene")) {
                put(&mut a, "description", truncate(t, 4000));
            }
            if let Some(level) = meta.get("potential_threat_level").and_then(Value::as_f64) {
                measurements.insert("threat_level".to_owned(), level);
            }
        }
        let mut evidence = Vec::new();
        if let Some(path) = r
            .thumb_path
            .as_deref()
            .and_then(|p| p.strip_prefix("/media/frigate/"))
        {
            evidence.push(self.evidence(
                EvidenceKind::Thumbnail,
                &format!("review:{}", r.id),
                format!("/{path}"),
            ));
        }
        let (zone, extra_zones) = split_zones(d.zones, limits);
        let input = EventInput {
            id: Some(format!("review:{}", r.id)),
            event_type: Some("camera.alert".into()),
            occurred_at: Some(rfc3339(start)),
            zone,
            extra_zones,
            source_kind: Some("camera".into()),
            measurements,
            attributes: a,
            evidence,
            revision: Some(Revision { at: start, rank }),
            ..EventInput::default()
        };
        Ok(vec![Event::parse(
            source,
            input,
            m.payload,
            m.received_at,
            limits,
        )?])
    }

    fn object_update(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let u: ObjectUpdate = from_json(m.payload, "Frigate tracked object update")?;
        let Some(id) = u.id.filter(|i| !i.is_empty()) else {
            // LPR's "camera cleared" notice has no object.
            return Ok(Vec::new());
        };
        let source = match &u.camera {
            Some(c) => self.camera("camera", c)?,
            // A description of 0.15/0.16 names no camera: the NVR said it.
            None => self.nvr.clone(),
        };
        let mut a = Map::new();
        put(&mut a, "detection_id", id.as_str());
        put(&mut a, "nvr", self.prefix.as_str());
        if let Some(c) = &u.camera {
            put(&mut a, "camera", c.as_str());
        }
        let (event_type, key) = match u.kind.as_str() {
            "description" => {
                let Some(text) = u.description.filter(|d| !d.trim().is_empty()) else {
                    return Ok(Vec::new());
                };
                // A description regenerated with other words is news; the same words again are
                // a redelivery.
                let digest = hex_prefix(&Sha256::digest(text.as_bytes()));
                put(&mut a, "description", truncate(&text, 4000));
                ("object.description", format!("description:{id}:{digest}"))
            }
            "face" => {
                let Some(name) = u.name.filter(|n| !n.is_empty()) else {
                    // Frigate reports every attempt, unrecognised faces included.
                    return Ok(Vec::new());
                };
                put(&mut a, "face", name.as_str());
                ("object.face", format!("face:{id}:{name}"))
            }
            "lpr" => {
                let Some(plate) = u.plate.filter(|p| !p.is_empty()) else {
                    return Ok(Vec::new());
                };
                put(&mut a, "plate", plate.as_str());
                if let Some(s) = u.score {
                    put(&mut a, "plate_score", s);
                }
                if let Some(name) = u.name.filter(|n| !n.is_empty()) {
                    put(&mut a, "known_plate", name);
                }
                ("vehicle.plate", format!("lpr:{id}:{plate}"))
            }
            "classification" => {
                let model = u.model.unwrap_or_default();
                let (kind, class) = match (u.sub_label, u.attribute) {
                    (Some(s), _) => ("sub_label", s),
                    (None, Some(at)) => ("attribute", at),
                    (None, None) => return Ok(Vec::new()),
                };
                put(&mut a, "model", model.as_str());
                put(&mut a, "class", class.as_str());
                put(&mut a, "class_kind", kind);
                (
                    "object.classification",
                    format!("classification:{id}:{model}:{class}"),
                )
            }
            // A kind a later Frigate adds: nothing OCC reads yet.
            _ => return Ok(Vec::new()),
        };
        let occurred = time("timestamp", u.timestamp)?;
        let input = EventInput {
            id: Some(truncate(&key, limits.max_external_id_len)),
            event_type: Some(event_type.into()),
            occurred_at: occurred.map(rfc3339),
            confidence: u.score,
            source_kind: Some("camera".into()),
            attributes: a,
            ..EventInput::default()
        };
        Ok(vec![Event::parse(
            source,
            input,
            m.payload,
            m.received_at,
            limits,
        )?])
    }

    fn camera_status(
        &self,
        camera: &str,
        role: &str,
        m: &Message<'_>,
        limits: &Limits,
    ) -> Result<Vec<Event>, Rejection> {
        let text = std::str::from_utf8(m.payload)
            .map_err(|_| Rejection::new("status: must be UTF-8 text"))?
            .trim();
        let status = match text {
            "online" => SourceStatus::Online,
            "offline" => SourceStatus::Offline,
            // Turned off on purpose: not a fault.
            "disabled" => return Ok(Vec::new()),
            other => {
                return Err(Rejection::field(
                    "status",
                    format!("must be online, offline or disabled, got {other:?}"),
                ));
            }
        };
        if role != "detect" {
            // The camera's health is its detection stream; recording and audio have their own
            // processes that report separately.
            return Ok(Vec::new());
        }
        let source = self.camera("topic", camera)?;
        Ok(vec![status_event(
            source,
            status,
            "reported by the NVR: the camera's detection stream",
            m,
            limits,
        )?])
    }

    fn available(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let text = std::str::from_utf8(m.payload)
            .map_err(|_| Rejection::new("available: must be UTF-8 text"))?
            .trim();
        let (status, why) = match text {
            "online" => (SourceStatus::Online, "the NVR connected"),
            "offline" => (
                SourceStatus::Offline,
                "the NVR's MQTT last will: it dropped off the broker",
            ),
            "stopped" => (SourceStatus::Offline, "the NVR stopped"),
            other => {
                return Err(Rejection::field(
                    "available",
                    format!("must be online, offline or stopped, got {other:?}"),
                ));
            }
        };
        Ok(vec![status_event(
            self.nvr.clone(),
            status,
            why,
            m,
            limits,
        )?])
    }
}

#[derive(Debug, Deserialize)]
struct ReviewMessage {
    #[serde(rename = "type")]
    kind: String,
    after: Review,
}

#[derive(Debug, Deserialize)]
struct Review {
    id: String,
    camera: String,
    start_time: f64,
    #[serde(default)]
    end_time: Option<f64>,
    severity: String,
    #[serde(default)]
    thumb_path: Option<String>,
    #[serde(default)]
    data: ReviewData,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewData {
    #[serde(default)]
    detections: Vec<String>,
    #[serde(default)]
    objects: Vec<String>,
    /// Names, possibly repeated or null.
    #[serde(default)]
    sub_labels: Vec<Value>,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default)]
    audio: Vec<String>,
    /// GenAI's summary (0.17).
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ObjectUpdate {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    camera: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    plate: Option<String>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    sub_label: Option<String>,
    #[serde(default)]
    attribute: Option<String>,
}

fn truncate(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

#[cfg(test)]
mod tests;
