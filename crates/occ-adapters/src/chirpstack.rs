//! ChirpStack v4's MQTT integration with the JSON marshaler, on its event topic
//! (`application/{application_id}/device/{dev_eui}/event/{event}` unless the network server
//! is configured otherwise). The event name is only in the topic; the payload is the
//! integration's protobuf message as JSON (camelCase; from 4.1 every plain field is written,
//! 4.0 left default values out, so every field is optional here).
//!
//! | event | becomes |
//! |---|---|
//! | `up` | `lorawan.uplink`: the codec's decoded `object` as measurements (numbers and booleans, nested keys joined with `.`), text values as `object.<path>` attributes; no `object` (no codec) is an event without measurements |
//! | `status` | `device.status` with `battery_pct` and `margin_db`, or `device.battery_low` under the configured charge |
//! | `join` | `lorawan.join` |
//! | `log` | `device.error`, `device.warning` or `device.log` by level, with code and description |
//! | `location` | `device.location` with the position |
//! | `ack`, `txack`, `integration` | nothing (downlink bookkeeping) |
//!
//! Devices are sources `lorawan:<dev_eui>`. `deduplicationId` is the idempotency key, so a
//! redelivered or re-serialised uplink changes nothing. Device name, profile, application and
//! tags (`tag.<name>`) reach rules as attributes; the tags `zone`, `district`, `kind` and
//! `lat`/`lon` place the device. A device profile's name picks the OCC profile of that name,
//! which maps the codec's names (`waterLevelCm`) and the event type.

use std::collections::BTreeMap;

use occ_domain::{Event, EventInput, Limits, LocationInput, SourceId};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::adapter::{
    Adapter, Message, Rejection, TemplateError, TopicTemplate, from_json, measurement_name,
    type_word,
};

/// How ChirpStack publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct ChirpstackConfig {
    /// ChirpStack's `[integration.mqtt] event_topic`, with `{{…}}` written `{…}`.
    pub topic: String,
    /// A status below this charge (percent) is a `device.battery_low` maintenance event.
    pub low_battery_pct: f64,
}

impl Default for ChirpstackConfig {
    fn default() -> Self {
        Self {
            topic: "application/{application_id}/device/{dev_eui}/event/{event}".into(),
            low_battery_pct: 20.0,
        }
    }
}

#[derive(Debug)]
pub struct ChirpstackAdapter {
    topic: TopicTemplate,
    low_battery_pct: f64,
}

impl ChirpstackAdapter {
    pub fn new(config: &ChirpstackConfig) -> Result<Self, TemplateError> {
        let topic = config.topic.replace("{{", "{").replace("}}", "}");
        Ok(Self {
            topic: TopicTemplate::parse(&topic, &["dev_eui", "event"])?,
            low_battery_pct: config.low_battery_pct,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct DeviceInfo {
    tenant_name: String,
    application_id: String,
    application_name: String,
    device_profile_name: String,
    device_name: String,
    dev_eui: String,
    tags: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RxInfo {
    gateway_id: String,
    rssi: Option<f64>,
    snr: Option<f64>,
}

/// The fields of every ChirpStack event OCC reads; each event uses its own.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Payload {
    deduplication_id: String,
    time: Option<String>,
    device_info: Option<DeviceInfo>,
    // up
    dev_addr: String,
    dr: Option<u32>,
    f_cnt: Option<u32>,
    f_port: Option<u32>,
    confirmed: Option<bool>,
    adr: Option<bool>,
    data: Option<String>,
    object: Option<Map<String, Value>>,
    rx_info: Vec<RxInfo>,
    region_config_id: Option<String>,
    // status
    margin: Option<i32>,
    external_power_source: Option<bool>,
    battery_level_unavailable: Option<bool>,
    battery_level: Option<f64>,
    // log
    level: Option<String>,
    code: Option<String>,
    description: Option<String>,
    context: BTreeMap<String, String>,
    // location
    location: Option<Location>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Location {
    latitude: f64,
    longitude: f64,
    altitude: Option<f64>,
    source: Option<String>,
    accuracy: Option<f64>,
}

impl Adapter for ChirpstackAdapter {
    fn name(&self) -> &'static str {
        "chirpstack"
    }

    fn topic_filters(&self) -> Vec<String> {
        vec![self.topic.filter()]
    }

    fn decode(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let captures = self
            .topic
            .captures(m.topic)
            .ok_or_else(|| Rejection(format!("topic {:?} does not fit {}", m.topic, self.topic)))?;
        let event = captures["event"];
        if !matches!(event, "up" | "status" | "join" | "log" | "location") {
            // Downlink bookkeeping (ack, txack), the old integration event, or a later
            // ChirpStack's event: nothing a control room acts on.
            return Ok(Vec::new());
        }
        let p: Payload = from_json(m.payload, "ChirpStack event")?;
        let info = p.device_info.as_ref();
        let dev_eui = info
            .map(|i| i.dev_eui.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(captures["dev_eui"])
            .to_ascii_lowercase();
        if dev_eui.len() != 16 || !dev_eui.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Rejection::field(
                "deviceInfo.devEui",
                format!("must be 16 hexadecimal digits, got {dev_eui:?}"),
            ));
        }
        let source = SourceId::parse(&format!("lorawan:{dev_eui}"))
            .map_err(|e| Rejection::field("deviceInfo.devEui", e.message))?;

        if let Some(t) = &p.time {
            chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                Rejection::field("time", format!("must be an RFC 3339 time ({e}), got {t:?}"))
            })?;
        }
        let mut input = EventInput {
            id: (!p.deduplication_id.is_empty()).then(|| p.deduplication_id.clone()),
            occurred_at: p.time.clone(),
            ..EventInput::default()
        };
        let a = &mut input.attributes;
        a.insert("dev_eui".into(), dev_eui.clone().into());
        if let Some(i) = info {
            for (key, value) in [
                ("device_name", &i.device_name),
                ("device_profile", &i.device_profile_name),
                ("application", &i.application_name),
                ("application_id", &i.application_id),
                ("tenant", &i.tenant_name),
            ] {
                if !value.is_empty() {
                    a.insert(key.into(), value.as_str().into());
                }
            }
            place(&mut input, &i.tags);
        }

        match event {
            "up" => self.uplink(&p, &mut input, limits),
            "status" => self.status(&p, &mut input),
            "join" => {
                input.event_type = Some("lorawan.join".into());
                input.severity = Some("info".into());
                if !p.dev_addr.is_empty() {
                    input
                        .attributes
                        .insert("dev_addr".into(), p.dev_addr.into());
                }
            }
            "log" => log(&p, &mut input),
            "location" => {
                input.event_type = Some("device.location".into());
                if let Some(l) = &p.location {
                    input.location = Some(LocationInput {
                        lat: l.latitude,
                        lon: l.longitude,
                    });
                    if let Some(alt) = l.altitude {
                        input.measurements.insert("altitude_m".into(), alt);
                    }
                    if let Some(acc) = l.accuracy {
                        input.measurements.insert("accuracy_m".into(), acc);
                    }
                    if let Some(s) = &l.source {
                        input
                            .attributes
                            .insert("location_source".into(), s.as_str().into());
                    }
                }
            }
            _ => unreachable!("filtered above"),
        }
        Ok(vec![Event::parse(
            source,
            input,
            m.payload,
            m.received_at,
            limits,
        )?])
    }
}

/// Tags reach rules as `tag.<name>`; `zone`, `district`, `kind` and `lat`/`lon` place the
/// device. A tag that cannot do its part (a kind with spaces, a position off the globe) is
/// left out rather than costing the uplink.
fn place(input: &mut EventInput, tags: &BTreeMap<String, String>) {
    for (k, v) in tags.iter().take(MAX_TAGS) {
        let key: String = format!("tag.{k}").chars().take(64).collect();
        input
            .attributes
            .insert(key, Value::String(v.chars().take(256).collect()));
    }
    let tag = |k: &str| tags.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let text = |v: &str| v.len() <= 128 && !v.chars().any(char::is_control);
    input.zone = tag("zone").filter(|v| text(v)).map(str::to_owned);
    input.district = tag("district").filter(|v| text(v)).map(str::to_owned);
    input.source_kind = tag("kind")
        .or_else(|| tag("source_kind"))
        .map(str::to_ascii_lowercase)
        .filter(|k| occ_domain::SourceKind::parse("kind", k).is_ok());
    if let (Some(lat), Some(lon)) = (
        tag("lat").and_then(|v| v.parse().ok()),
        tag("lon").and_then(|v| v.parse().ok()),
    ) && occ_domain::GeoPoint::new(lat, lon).is_ok()
    {
        input.location = Some(LocationInput { lat, lon });
    }
}

/// Most tags taken into an event's attributes (the rest stay with ChirpStack).
const MAX_TAGS: usize = 16;

impl ChirpstackAdapter {
    fn uplink(&self, p: &Payload, input: &mut EventInput, limits: &Limits) {
        input.event_type = Some("lorawan.uplink".into());
        let a = &mut input.attributes;
        for (key, value) in [("f_cnt", p.f_cnt), ("f_port", p.f_port), ("dr", p.dr)] {
            if let Some(v) = value {
                a.insert(key.into(), v.into());
            }
        }
        for (key, value) in [("confirmed", p.confirmed), ("adr", p.adr)] {
            if let Some(v) = value {
                a.insert(key.into(), v.into());
            }
        }
        if !p.dev_addr.is_empty() {
            a.insert("dev_addr".into(), p.dev_addr.as_str().into());
        }
        if let Some(r) = p.region_config_id.as_deref().filter(|r| !r.is_empty()) {
            a.insert("region".into(), r.into());
        }
        if let Some(d) = p
            .data
            .as_deref()
            .filter(|d| !d.is_empty() && d.len() <= 1024)
        {
            a.insert("data".into(), d.into());
        }
        // The gateway that heard it best.
        if let Some(best) = p
            .rx_info
            .iter()
            .filter(|r| r.rssi.is_some())
            .max_by(|x, y| {
                x.rssi
                    .unwrap_or(f64::MIN)
                    .total_cmp(&y.rssi.unwrap_or(f64::MIN))
            })
        {
            a.insert("gateway_id".into(), best.gateway_id.as_str().into());
            if let Some(v) = best.rssi {
                a.insert("rssi".into(), v.into());
            }
            if let Some(v) = best.snr {
                a.insert("snr".into(), v.into());
            }
        }
        a.insert("gateways".into(), p.rx_info.len().into());
        if let Some(object) = &p.object {
            let mut flat = Vec::new();
            flatten("", &Value::Object(object.clone()), &mut flat);
            let mut dropped = 0;
            // What is left of the attribute budget, with room for the count of what was not.
            let room = limits
                .max_attributes
                .saturating_sub(input.attributes.len() + 1);
            let mut texts = 0;
            for (path, value) in flat {
                match value {
                    Leaf::Number(v) => match measurement_name(&path) {
                        Some(name) if input.measurements.len() < limits.max_measurements => {
                            input.measurements.insert(name, v);
                        }
                        _ => dropped += 1,
                    },
                    Leaf::Text(t) if texts < room.min(24) => {
                        texts += 1;
                        input.attributes.insert(
                            format!("object.{}", path.chars().take(56).collect::<String>()),
                            Value::String(t.chars().take(256).collect()),
                        );
                    }
                    Leaf::Text(_) => dropped += 1,
                }
            }
            if dropped > 0 {
                // Kept rather than refused: the uplink happened; what did not fit is said.
                input
                    .attributes
                    .insert("object_values_dropped".into(), dropped.into());
            }
        }
    }

    fn status(&self, p: &Payload, input: &mut EventInput) {
        let external = p.external_power_source.unwrap_or(false);
        let unavailable = p.battery_level_unavailable.unwrap_or(false);
        let battery = p.battery_level.filter(|_| !external && !unavailable);
        if let Some(b) = battery {
            input
                .measurements
                .insert(occ_domain::source::BATTERY_MEASUREMENT.into(), b);
        }
        if let Some(m) = p.margin {
            input.measurements.insert("margin_db".into(), f64::from(m));
        }
        input
            .attributes
            .insert("external_power".into(), external.into());
        let low = battery.is_some_and(|b| b < self.low_battery_pct);
        input.event_type = Some(
            if low {
                "device.battery_low"
            } else {
                "device.status"
            }
            .into(),
        );
        input.severity = Some(if low { "minor" } else { "info" }.into());
    }
}

fn log(p: &Payload, input: &mut EventInput) {
    let level = p.level.as_deref().unwrap_or("INFO");
    let (event_type, severity) = match level {
        "ERROR" => ("device.error", "major"),
        "WARNING" => ("device.warning", "minor"),
        _ => ("device.log", "info"),
    };
    input.event_type = Some(event_type.into());
    input.severity = Some(severity.into());
    let code = p.code.as_deref().unwrap_or("UNKNOWN");
    let a = &mut input.attributes;
    a.insert("level".into(), level.into());
    a.insert("code".into(), code.into());
    if let Some(d) = &p.description {
        a.insert(
            "description".into(),
            Value::String(d.chars().take(1000).collect()),
        );
    }
    for (k, v) in p.context.iter().take(16) {
        a.insert(
            format!("context.{}", type_word(k)),
            Value::String(v.chars().take(256).collect()),
        );
    }
    // A log entry has no id of its own: its time, code and the uplink it is about name it.
    input.id = p.time.as_ref().map(|t| {
        let uplink = p
            .context
            .get("deduplication_id")
            .map_or(String::new(), |d| format!(":{d}"));
        format!("log:{t}:{code}{uplink}")
    });
}

enum Leaf {
    Number(f64),
    Text(String),
}

/// The leaves of a decoded object: numbers (and booleans as 1 / 0) by their `.`-joined path,
/// text values apart.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Leaf)>) {
    if out.len() >= 512 {
        return;
    }
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.push((prefix.to_owned(), Leaf::Number(f)));
            }
        }
        Value::Bool(b) => out.push((prefix.to_owned(), Leaf::Number(f64::from(u8::from(*b))))),
        Value::String(s) => out.push((prefix.to_owned(), Leaf::Text(s.clone()))),
        Value::Object(o) => {
            for (k, v) in o {
                flatten(&join(k), v, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&join(&i.to_string()), v, out);
            }
        }
        Value::Null => {}
    }
}

#[cfg(test)]
mod tests;
