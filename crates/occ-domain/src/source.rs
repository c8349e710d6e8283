//! Sources: the cameras, sensors and gateways events come from, as the city registers them
//! (where they are, what they are, whether they count), with the measurement mappings that
//! make a producer's names fit OCC's rules, and their health (online, offline).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{District, EventType, GeoPoint, SourceId, SourceKind, Zone};
use crate::validation::{self, Collector, FieldError, FieldErrors};

/// Renames that make a producer's vocabulary OCC's: a codec's `waterLevelCm` becomes
/// `water_level_cm`, a LoRaWAN uplink of a level sensor becomes a `water.level` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Event type as the adapter names it → the type rules see (`lorawan.uplink` →
    /// `water.level`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub event_types: BTreeMap<String, String>,
    /// Measurement name as the producer names it → OCC's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measurements: BTreeMap<String, String>,
    /// The kind of device, when its events do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_kind: Option<String>,
}

impl Mapping {
    pub const MAX_ENTRIES: usize = 256;

    pub fn is_empty(&self) -> bool {
        self.event_types.is_empty() && self.measurements.is_empty() && self.source_kind.is_none()
    }

    /// Checks every name, reporting each bad one under `field`.
    pub fn check(&self, field: &str) -> Result<(), FieldErrors> {
        let mut c = Collector::default();
        if self.event_types.len() + self.measurements.len() > Self::MAX_ENTRIES {
            c.push(field, format!("at most {} renames", Self::MAX_ENTRIES));
        }
        for (from, to) in &self.event_types {
            let f = format!("{field}.event_types.{from}");
            if let Err(e) = EventType::parse(from, 64) {
                c.push(f.clone(), e.message);
            }
            if let Err(e) = EventType::parse(to, 64) {
                c.push(f, e.message);
            }
        }
        for (from, to) in &self.measurements {
            let f = format!("{field}.measurements.{from}");
            if let Err(e) = validation::text(&f, from, 128) {
                c.take::<()>(Err(e));
            }
            if let Err(e) = validation::ident(&f, to, 64) {
                c.take::<()>(Err(e));
            }
        }
        if let Some(kind) = &self.source_kind
            && let Err(e) = SourceKind::parse(&format!("{field}.source_kind"), kind)
        {
            c.take::<()>(Err(e));
        }
        c.finish(|| ())
    }

    /// This mapping with `over`'s entries replacing its own.
    pub fn overlaid(&self, over: &Mapping) -> Mapping {
        let mut m = self.clone();
        m.event_types
            .extend(over.event_types.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.measurements.extend(
            over.measurements
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        if over.source_kind.is_some() {
            m.source_kind.clone_from(&over.source_kind);
        }
        m
    }
}

/// A named mapping shared by many sources: a device model, a LoRaWAN device profile (a
/// ChirpStack uplink's `deviceProfileName` picks the profile of that name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub mapping: Mapping,
}

impl Profile {
    pub fn parse(name: &str, description: &str, mapping: Mapping) -> Result<Self, FieldErrors> {
        let mut c = Collector::default();
        if let Err(e) = validation::text("name", name, 128) {
            c.take::<()>(Err(e));
        }
        if description.len() > 2000 {
            c.push("description", "must be at most 2000 bytes");
        }
        if let Err(errors) = mapping.check("mapping") {
            for e in errors.errors() {
                c.push(e.field.clone(), e.message.clone());
            }
        }
        c.finish(|| Profile {
            name: name.to_owned(),
            description: description.to_owned(),
            mapping,
        })
    }
}

/// Whether a source is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    /// Registered but never heard from, or without an expected interval.
    Unknown,
    Online,
    /// Silent for longer than expected, or reported offline (a camera's status, a broker's
    /// last will).
    Offline,
}

impl SourceStatus {
    pub const ALL: [SourceStatus; 3] = [
        SourceStatus::Unknown,
        SourceStatus::Online,
        SourceStatus::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceStatus::Unknown => "unknown",
            SourceStatus::Online => "online",
            SourceStatus::Offline => "offline",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// The event type that announces a change to this status, if it is announced.
    pub fn event_type(self) -> Option<&'static str> {
        match self {
            SourceStatus::Online => Some(SOURCE_ONLINE),
            SourceStatus::Offline => Some(SOURCE_OFFLINE),
            SourceStatus::Unknown => None,
        }
    }
}

impl fmt::Display for SourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event type of a source that went silent or reported itself offline.
pub const SOURCE_OFFLINE: &str = "source.offline";
/// The event type of a source heard from again after being offline.
pub const SOURCE_ONLINE: &str = "source.online";

/// The measurement that carries a battery's charge in percent (a LoRaWAN status, a gateway):
/// the registry keeps the latest.
pub const BATTERY_MEASUREMENT: &str = "battery_pct";
/// The event type of an error a device or its network server reports; its `description`
/// attribute becomes the source's last error.
pub const DEVICE_ERROR: &str = "device.error";

/// A `source.online` / `source.offline` event for `source`: `why` says what reported it,
/// `occurred_at` when the change happened (the last time it was heard from, for a silence),
/// `received_at` when OCC learnt of it.
///
/// Such an event changes its source's status when it is stored; one that reports the status
/// the source already has changes nothing (a retained status message delivered again on every
/// subscription, a redelivery), so each carries an id of its own and the store decides by the
/// source's state (see [`on_report`]).
pub fn status_event(
    source: SourceId,
    status: SourceStatus,
    why: &str,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    limits: &crate::event::Limits,
) -> Result<crate::event::Event, FieldErrors> {
    let mut attributes = serde_json::Map::new();
    attributes.insert("reason".into(), why.into());
    let input = crate::event::EventInput {
        id: Some(format!(
            "{}@{}",
            status.as_str(),
            received_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        )),
        event_type: Some(
            status
                .event_type()
                .ok_or_else(|| FieldErrors::one("status", "must be online or offline"))?
                .into(),
        ),
        severity: Some(
            match status {
                SourceStatus::Offline => "minor",
                _ => "info",
            }
            .into(),
        ),
        occurred_at: Some(occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        attributes,
        ..crate::event::EventInput::default()
    };
    crate::event::Event::parse(source, input, &[], received_at, limits)
}

/// The status an event of this type reports for its source, if it is a status event.
pub fn reported_status(event_type: &str) -> Option<SourceStatus> {
    match event_type {
        SOURCE_OFFLINE => Some(SourceStatus::Offline),
        SOURCE_ONLINE => Some(SourceStatus::Online),
        _ => None,
    }
}

/// A source as written (import file, gRPC), before it is checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceInput {
    pub id: String,
    pub kind: Option<String>,
    pub name: String,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub zone: Option<String>,
    pub district: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// False keeps its events (stored) from opening incidents. Absent means enabled.
    pub enabled: Option<bool>,
    pub profile: Option<String>,
    pub mapping: Mapping,
    /// How often it reports at least; silent for longer, it goes offline. Absent: no check.
    pub expected_interval_seconds: Option<i64>,
}

/// A registered source's settings: what enrichment and health checks use.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub id: SourceId,
    pub kind: Option<SourceKind>,
    pub name: String,
    pub location: Option<GeoPoint>,
    pub zone: Option<Zone>,
    pub district: Option<District>,
    pub tags: BTreeMap<String, String>,
    pub enabled: bool,
    /// Registered by the city (true), or registered by OCC when its first event arrived.
    pub verified: bool,
    pub profile: Option<String>,
    pub mapping: Mapping,
    pub expected_interval: Option<TimeDelta>,
}

impl SourceConfig {
    pub const MAX_TAGS: usize = 64;
    /// The longest expected interval: a week.
    pub const MAX_INTERVAL_SECONDS: i64 = 7 * 86_400;

    /// Checks a source registered by the city.
    pub fn parse(input: SourceInput) -> Result<SourceConfig, FieldErrors> {
        let mut c = Collector::default();
        let id = c.take(SourceId::parse(&input.id).map_err(|e| FieldError::new("id", e.message)));
        let kind = input
            .kind
            .filter(|k| !k.is_empty())
            .and_then(|k| c.take(SourceKind::parse("kind", &k)));
        if input.name.len() > 200 || input.name.chars().any(char::is_control) {
            c.push(
                "name",
                "must be at most 200 bytes without control characters",
            );
        }
        let location =
            match (input.lat, input.lon) {
                (Some(lat), Some(lon)) => c.take(GeoPoint::new(lat, lon).map_err(|e| {
                    FieldError::new(e.field.trim_start_matches("location."), e.message)
                })),
                (None, None) => None,
                _ => {
                    c.push("lat", "lat and lon are given together or not at all");
                    None
                }
            };
        let zone = input
            .zone
            .filter(|z| !z.is_empty())
            .and_then(|z| c.take(Zone::parse(&z, 128)));
        let district = input
            .district
            .filter(|d| !d.is_empty())
            .and_then(|d| c.take(District::parse("district", &d)));
        if input.tags.len() > Self::MAX_TAGS {
            c.push("tags", format!("at most {} tags", Self::MAX_TAGS));
        }
        for (k, v) in &input.tags {
            if let Err(e) = validation::text(&format!("tags.{k}"), k, 64) {
                c.take::<()>(Err(e));
            }
            if v.len() > 256 || v.chars().any(char::is_control) {
                c.push(
                    format!("tags.{k}"),
                    "must be at most 256 bytes without control characters",
                );
            }
        }
        let profile = input.profile.filter(|p| !p.is_empty());
        if let Some(p) = &profile
            && let Err(e) = validation::text("profile", p, 128)
        {
            c.take::<()>(Err(e));
        }
        if let Err(errors) = input.mapping.check("mapping") {
            for e in errors.errors() {
                c.push(e.field.clone(), e.message.clone());
            }
        }
        let expected_interval = match input.expected_interval_seconds {
            None | Some(0) => None,
            Some(s) if (1..=Self::MAX_INTERVAL_SECONDS).contains(&s) => Some(TimeDelta::seconds(s)),
            Some(s) => {
                c.push(
                    "expected_interval",
                    format!("must be between 1 second and 7 days, got {s} seconds"),
                );
                None
            }
        };
        c.finish(|| SourceConfig {
            id: id.expect("checked"),
            kind,
            name: input.name,
            location,
            zone,
            district,
            tags: input.tags,
            enabled: input.enabled.unwrap_or(true),
            verified: true,
            profile,
            mapping: input.mapping,
            expected_interval,
        })
    }

    /// The settings written back as input.
    pub fn to_input(&self) -> SourceInput {
        SourceInput {
            id: self.id.to_string(),
            kind: self.kind.as_ref().map(ToString::to_string),
            name: self.name.clone(),
            lat: self.location.map(|l| l.lat()),
            lon: self.location.map(|l| l.lon()),
            zone: self.zone.as_ref().map(ToString::to_string),
            district: self.district.as_ref().map(ToString::to_string),
            tags: self.tags.clone(),
            enabled: Some(self.enabled),
            profile: self.profile.clone(),
            mapping: self.mapping.clone(),
            expected_interval_seconds: self.expected_interval.map(|d| d.num_seconds()),
        }
    }
}

/// A source as the registry shows it: settings and health.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub config: SourceConfig,
    pub status: SourceStatus,
    pub status_changed_at: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    /// Battery charge in percent, as last reported.
    pub battery_pct: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Events that arrived at MQTT QoS 0: the producer does not wait for the broker, so what a
    /// broker or network loses on the first hop is lost without a trace.
    pub qos0_events: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A change of a source's status, decided by [`on_report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusTransition {
    pub to: SourceStatus,
    /// Whether the change is news, announced by a status event.
    pub announce: bool,
}

/// What a status report (a camera's status, a last will, a silence) received at `at` does to
/// a source whose status is `current` and whose latest report was received at `last_report`,
/// or `None` when it changes nothing: the source already has that status, or the report is
/// older than one already seen (delivered late by another instance: it is stale, whatever it
/// says).
///
/// Coming online from `unknown` is not announced: only a return from offline is news.
pub fn on_report(
    current: SourceStatus,
    last_report: Option<DateTime<Utc>>,
    reported: SourceStatus,
    at: DateTime<Utc>,
) -> Option<StatusTransition> {
    if last_report.is_some_and(|c| at <= c) {
        return None;
    }
    let (to, announce) = match (current, reported) {
        (SourceStatus::Offline, SourceStatus::Online) => (SourceStatus::Online, true),
        (SourceStatus::Unknown, SourceStatus::Online) => (SourceStatus::Online, false),
        (SourceStatus::Online | SourceStatus::Unknown, SourceStatus::Offline) => {
            (SourceStatus::Offline, true)
        }
        _ => return None,
    };
    Some(StatusTransition { to, announce })
}

/// The status a source has after it was heard from. A source that was offline stays so until
/// its return is announced (a `source.online` event changes it).
pub fn on_activity(current: SourceStatus) -> SourceStatus {
    match current {
        SourceStatus::Unknown | SourceStatus::Online => SourceStatus::Online,
        SourceStatus::Offline => SourceStatus::Offline,
    }
}

/// When a source in `status`, last heard from at `last_seen`, counts as silent: its expected
/// interval after it was last heard from, while it is online; never otherwise.
pub fn silent_after(
    status: SourceStatus,
    last_seen: Option<DateTime<Utc>>,
    expected_interval: Option<TimeDelta>,
) -> Option<DateTime<Utc>> {
    match (status, last_seen, expected_interval) {
        (SourceStatus::Online, Some(seen), Some(interval)) => Some(seen + interval),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_checked_field_by_field() {
        let err = SourceConfig::parse(SourceInput {
            id: "cam esil".into(),
            lat: Some(95.0),
            lon: Some(71.0),
            tags: [("zone".to_owned(), "a\u{7}".to_owned())].into(),
            mapping: Mapping {
                event_types: [("lorawan.uplink".to_owned(), "Water Level".to_owned())].into(),
                ..Mapping::default()
            },
            expected_interval_seconds: Some(-5),
            ..SourceInput::default()
        })
        .expect_err("invalid");
        let fields: Vec<_> = err.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "id",
                "lat",
                "tags.zone",
                "mapping.event_types.lorawan.uplink",
                "expected_interval"
            ]
        );
    }

    #[test]
    fn status_reports_change_only_what_they_should() {
        use SourceStatus::*;
        let t0 = Utc::now();
        let t1 = t0 + TimeDelta::seconds(1);
        let change = |to, announce| Some(StatusTransition { to, announce });
        for (current, reported, want) in [
            (Unknown, Offline, change(Offline, true)),
            (Online, Offline, change(Offline, true)),
            (Offline, Offline, None),
            (Offline, Online, change(Online, true)),
            (Unknown, Online, change(Online, false)),
            (Online, Online, None),
            (Online, Unknown, None),
        ] {
            assert_eq!(
                on_report(current, Some(t0), reported, t1),
                want,
                "{current:?} + {reported:?}"
            );
        }
        // A report older than the latest one seen changes nothing.
        assert_eq!(on_report(Online, Some(t1), Offline, t0), None);
        assert_eq!(on_activity(Unknown), Online);
        assert_eq!(on_activity(Offline), Offline);
    }

    #[test]
    fn only_an_online_source_with_an_interval_can_go_silent() {
        let seen = Some(Utc::now());
        let minute = Some(TimeDelta::minutes(1));
        assert_eq!(
            silent_after(SourceStatus::Online, seen, minute),
            seen.map(|s| s + TimeDelta::minutes(1))
        );
        assert_eq!(silent_after(SourceStatus::Offline, seen, minute), None);
        assert_eq!(silent_after(SourceStatus::Unknown, seen, minute), None);
        assert_eq!(silent_after(SourceStatus::Online, seen, None), None);
    }

    #[test]
    fn a_sources_own_mapping_overrides_its_profile() {
        let profile = Mapping {
            measurements: [
                ("waterLevelCm".to_owned(), "water_level_cm".to_owned()),
                ("batteryV".to_owned(), "battery_v".to_owned()),
            ]
            .into(),
            ..Mapping::default()
        };
        let own = Mapping {
            measurements: [("batteryV".to_owned(), "supply_v".to_owned())].into(),
            ..Mapping::default()
        };
        let m = profile.overlaid(&own);
        assert_eq!(m.measurements["waterLevelCm"], "water_level_cm");
        assert_eq!(m.measurements["batteryV"], "supply_v");
    }
}
