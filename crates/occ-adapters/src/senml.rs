//! SenML JSON packs (RFC 8428, with the versions of RFC 9100) on `occ/v1/senml/{source_id}`.
//!
//! A pack is resolved as the RFC says: base fields (`bn`, `bt`, `bu`, `bv`, `bs`) apply to
//! their record and every later one until replaced; a record's name is `bn` + `n`; its time is
//! `bt` + `t`, and a time below 2^28 is relative to now (the moment OCC received the pack: `0`
//! is now, `-60` a minute ago); `v` is `bv` + `v`, a sum `bs` + `s`. Unknown fields are ignored,
//! except those ending in `_`, which the RFC says must be understood: such a pack is refused.
//! The version (`bver`, 10 by default) is a feature bitmap (RFC 9100): 10, or 26 with
//! secondary units (`ug/m3`), are understood; anything else is refused.
//!
//! Records that share a time (and base name) are one event. A record's measurement is its
//! name without the base name (`pm2_5`); numbers (`v`) and booleans (`vb`, as 1 or 0) are
//! measurements, a sum (`s`) is `<name>.sum`, text (`vs`) and data (`vd`) are attributes, and
//! units are kept in the `units` attribute. The event's type comes from its measurements (see
//! [`event_type_for`]): air quality, weather, water level or noise, else `senml.reading`; a
//! source's profile can rename both. A pack with absolute times is keyed by name and time, so
//! a repeat of the same readings is recognised (another quantity at the same time is another
//! event); a pack with relative times has no such key: its content, scoped to its delivery,
//! so the same bytes sent again are new readings and only their redelivery is a duplicate.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::{Event, EventInput, IdempotencyKey, Limits, SourceId};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::adapter::{
    Adapter, Message, Rejection, TemplateError, TopicTemplate, measurement_name, rfc3339, unix_time,
};

/// Where SenML packs arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenmlConfig {
    pub topic: String,
}

impl Default for SenmlConfig {
    fn default() -> Self {
        Self {
            topic: "occ/v1/senml/{source_id}".into(),
        }
    }
}

/// Times below this are relative to now (RFC 8428 §4.5.3).
const RELATIVE_BELOW: f64 = 268_435_456.0;
/// The SenML version without extra features.
const BASE_VERSION: u64 = 10;
/// Feature bits OCC understands: the base version's (1 and 3) and secondary units (4).
const UNDERSTOOD_FEATURES: u64 = 0b1_1010;

/// The event type for a reading by its measurement name (lower case), when no profile says
/// otherwise.
pub fn event_type_for(measurement: &str) -> &'static str {
    match measurement.to_ascii_lowercase().as_str() {
        "pm1" | "pm1_0" | "pm2_5" | "pm25" | "pm2.5" | "pm10" | "no2" | "o3" | "co" | "so2"
        | "co2" | "aqi" | "voc" | "tvoc" | "nh3" => "air.quality",
        "temp" | "temperature" | "humidity" | "rh" | "pressure" | "wind_speed"
        | "wind_direction" | "rain" | "rainfall" | "precipitation" => "weather",
        "water_level" | "water_level_cm" | "level" | "river_level" => "water.level",
        "noise" | "laeq" | "lae" | "dba" | "spl" | "sound_level" => "noise.level",
        _ => "senml.reading",
    }
}

#[derive(Debug)]
pub struct SenmlAdapter {
    topic: TopicTemplate,
}

impl SenmlAdapter {
    pub fn new(config: &SenmlConfig) -> Result<Self, TemplateError> {
        Ok(Self {
            topic: TopicTemplate::parse(&config.topic, &["source_id"])?,
        })
    }
}

/// One record as written. Known labels are typed (a wrong type names the label); the rest
/// is kept to find labels that must be understood.
#[derive(Debug, Deserialize)]
struct Record {
    bn: Option<String>,
    bt: Option<f64>,
    bu: Option<String>,
    bv: Option<f64>,
    bs: Option<f64>,
    bver: Option<u64>,
    n: Option<String>,
    u: Option<String>,
    v: Option<f64>,
    vs: Option<String>,
    vb: Option<bool>,
    vd: Option<String>,
    s: Option<f64>,
    t: Option<f64>,
    ut: Option<f64>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// A resolved record's value.
#[derive(Debug, Clone, PartialEq)]
enum Reading {
    Number(f64),
    Text(String),
    Bool(bool),
    Data(String),
}

/// A resolved record.
#[derive(Debug, Clone, PartialEq)]
struct Resolved {
    base_name: String,
    /// The measurement (the name without its base).
    measurement: String,
    time: DateTime<Utc>,
    relative: bool,
    unit: Option<String>,
    value: Option<Reading>,
    sum: Option<f64>,
    update_interval: Option<f64>,
}

#[derive(Debug, Default)]
struct Bases {
    name: String,
    time: f64,
    unit: Option<String>,
    value: f64,
    sum: Option<f64>,
    version: Option<u64>,
}

/// Resolves a pack (RFC 8428 §4.6).
fn resolve(payload: &[u8], received_at: DateTime<Utc>) -> Result<Vec<Resolved>, Rejection> {
    let items: Vec<Record> = crate::adapter::from_json(payload, "SenML pack")?;
    if items.is_empty() {
        return Err(Rejection::new("a SenML pack has at least one record"));
    }
    let mut bases = Bases::default();
    let mut out = Vec::with_capacity(items.len());
    for (i, r) in items.into_iter().enumerate() {
        let at = |label: &str| format!("[{i}].{label}");
        if let Some(label) = r.rest.keys().find(|k| k.ends_with('_')) {
            return Err(Rejection::field(
                &at(label),
                "a field that must be understood, and OCC does not (RFC 8428 §4.4)",
            ));
        }
        if let Some(v) = r.bver {
            match bases.version {
                Some(pack) if pack != v => {
                    return Err(Rejection::field(
                        &at("bver"),
                        format!(
                            "every record of a pack has the same version, got {v} after {pack}"
                        ),
                    ));
                }
                _ => {}
            }
            if v & 0xF != BASE_VERSION || v & !UNDERSTOOD_FEATURES != 0 {
                return Err(Rejection::field(
                    &at("bver"),
                    format!(
                        "version {v} uses SenML features OCC does not understand (it reads 10, and 26 with secondary units)"
                    ),
                ));
            }
            bases.version = Some(v);
        }
        let has_base = r.bn.is_some() || r.bt.is_some() || r.bu.is_some() || r.bv.is_some();
        if let Some(bn) = r.bn {
            bases.name = bn;
        }
        if let Some(bt) = r.bt {
            bases.time = bt;
        }
        if let Some(bu) = r.bu {
            bases.unit = Some(bu);
        }
        if let Some(bv) = r.bv {
            bases.value = bv;
        }
        if let Some(bs) = r.bs {
            bases.sum = Some(bs);
        }

        let values = [
            r.v.is_some(),
            r.vs.is_some(),
            r.vb.is_some(),
            r.vd.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        let sum = match (bases.sum, r.s) {
            (None, None) => None,
            (b, s) => Some(b.unwrap_or(0.0) + s.unwrap_or(0.0)),
        };
        if values > 1 {
            return Err(Rejection::field(
                &format!("[{i}]"),
                "has more than one value (v, vs, vb, vd); a record holds one",
            ));
        }
        if values == 0 && sum.is_none() {
            if has_base || r.bver.is_some() || r.bs.is_some() {
                // A record that only sets base values for the ones after it.
                continue;
            }
            return Err(Rejection::field(
                &format!("[{i}]"),
                "has no value (v, vs, vb or vd) and no sum (s)",
            ));
        }

        let name = format!("{}{}", bases.name, r.n.as_deref().unwrap_or(""));
        // OMA LwM2M devices name records by path (`/3303/0/5700`), against RFC 8428's first
        // character; they are common enough in cities to be read all the same.
        let well_formed = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_'));
        if !well_formed {
            return Err(Rejection::field(
                &at("n"),
                format!(
                    "the name {name:?} (base name and name) must start with a letter, a digit or '/' and hold only letters, digits, '-', ':', '.', '/' and '_'"
                ),
            ));
        }
        let own = r.n.as_deref().filter(|n| !n.is_empty()).unwrap_or_else(|| {
            name.rsplit([':', '/'])
                .find(|s| !s.is_empty())
                .unwrap_or(&name)
        });
        let measurement = measurement_name(own).ok_or_else(|| {
            Rejection::field(
                &at("n"),
                format!("{own:?} is too long for a measurement name"),
            )
        })?;

        let t = bases.time + r.t.unwrap_or(0.0);
        let relative = t < RELATIVE_BELOW;
        let time = if relative {
            if !t.is_finite() || t.abs() > 10.0 * 365.0 * 86_400.0 {
                return Err(Rejection::field(
                    &at("t"),
                    format!("a relative time of {t} seconds is not one a device means"),
                ));
            }
            received_at + TimeDelta::microseconds((t * 1e6).round() as i64)
        } else {
            unix_time(&at("t"), t)?
        };
        let value = if let Some(v) = r.v {
            let v = bases.value + v;
            if !v.is_finite() {
                return Err(Rejection::field(&at("v"), "must be a finite number"));
            }
            Some(Reading::Number(v))
        } else if let Some(s) = r.vs {
            Some(Reading::Text(s))
        } else if let Some(b) = r.vb {
            Some(Reading::Bool(b))
        } else if let Some(d) = r.vd {
            let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            engine
                .decode(d.trim_end_matches('='))
                .map_err(|e| Rejection::field(&at("vd"), format!("must be base64url ({e})")))?;
            Some(Reading::Data(d))
        } else {
            None
        };
        if sum.is_some_and(|s| !s.is_finite()) {
            return Err(Rejection::field(&at("s"), "must be a finite number"));
        }
        out.push(Resolved {
            base_name: bases.name.clone(),
            measurement,
            time,
            relative,
            unit: r.u.or_else(|| bases.unit.clone()),
            value,
            sum,
            update_interval: r.ut,
        });
    }
    // Resolved records are in chronological order (RFC 8428 §4.6).
    out.sort_by_key(|r| r.time);
    Ok(out)
}

impl Adapter for SenmlAdapter {
    fn name(&self) -> &'static str {
        "senml"
    }

    fn topic_filters(&self) -> Vec<String> {
        vec![self.topic.filter()]
    }

    fn decode(&self, m: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        let captures = self
            .topic
            .captures(m.topic)
            .ok_or_else(|| Rejection(format!("topic {:?} does not fit {}", m.topic, self.topic)))?;
        let source = SourceId::parse(captures["source_id"])
            .map_err(|e| Rejection(format!("topic {:?}: {e}", m.topic)))?;
        let records = resolve(m.payload, m.received_at)?;

        // One event per (time, base name, type).
        let mut groups: BTreeMap<(DateTime<Utc>, String, &'static str), Vec<Resolved>> =
            BTreeMap::new();
        for r in records {
            let kind = event_type_for(&r.measurement);
            groups
                .entry((r.time, r.base_name.clone(), kind))
                .or_default()
                .push(r);
        }
        let pack_digest = hex8(&Sha256::digest(m.payload));
        let mut events = Vec::with_capacity(groups.len());
        for (n, ((time, base_name, kind), records)) in groups.into_iter().enumerate() {
            let mut input = EventInput {
                event_type: Some(kind.into()),
                occurred_at: Some(rfc3339(time)),
                ..EventInput::default()
            };
            let relative = records.iter().any(|r| r.relative);
            let mut names: Vec<&str> = records.iter().map(|r| r.measurement.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            let names = names.join(",");
            let mut units = Map::new();
            let mut dropped = 0;
            for r in records {
                let mut put_number = |input: &mut EventInput, name: String, v: f64| {
                    if input.measurements.len() < limits.max_measurements {
                        input.measurements.insert(name, v);
                    } else {
                        dropped += 1;
                    }
                };
                match r.value {
                    Some(Reading::Number(v)) => put_number(&mut input, r.measurement.clone(), v),
                    Some(Reading::Bool(b)) => {
                        put_number(&mut input, r.measurement.clone(), f64::from(u8::from(b)));
                    }
                    Some(Reading::Text(s) | Reading::Data(s)) => {
                        input.attributes.insert(
                            r.measurement.clone(),
                            Value::String(s.chars().take(1024).collect()),
                        );
                    }
                    None => {}
                }
                if let Some(s) = r.sum {
                    put_number(&mut input, format!("{}.sum", r.measurement), s);
                }
                if let Some(u) = &r.unit {
                    units.insert(r.measurement.clone(), Value::String(u.clone()));
                }
                if let Some(ut) = r.update_interval {
                    input
                        .attributes
                        .insert("update_interval_s".into(), Value::from(ut));
                }
            }
            if !units.is_empty() {
                input
                    .attributes
                    .insert("units".into(), Value::Object(units));
            }
            if !base_name.is_empty() {
                input
                    .attributes
                    .insert("senml_base_name".into(), Value::String(base_name.clone()));
            }
            if dropped > 0 {
                input
                    .attributes
                    .insert("values_dropped".into(), Value::from(dropped));
            }
            // A reading at an absolute time is that reading however often it is sent; a pack
            // without a clock is recognised by its bytes and its delivery (the same pack sent
            // again is a new reading, only its redelivery is not).
            let content_key = relative.then(|| format!("senml:{pack_digest}:{n}"));
            if content_key.is_none() {
                let key = format!("senml:{base_name}@{}:{names}", rfc3339(time));
                input.id = Some(if key.len() <= limits.max_external_id_len {
                    key
                } else {
                    format!("senml:{}", hex8(&Sha256::digest(key.as_bytes())))
                });
            }
            let mut event = Event::parse(source.clone(), input, m.payload, m.received_at, limits)?;
            if let Some(key) = content_key {
                event.idempotency_key = IdempotencyKey::content_named(key);
            }
            events.push(event);
        }
        Ok(events)
    }
}

fn hex8(digest: &[u8]) -> String {
    crate::adapter::hex_prefix(digest)
}

#[cfg(test)]
mod tests;
