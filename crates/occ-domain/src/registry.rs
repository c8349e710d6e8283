//! What OCC knows of the city beyond an event itself — registered sources, profiles, zones and
//! watch lists — and the one pure step that applies it to an event before rules see it.
//!
//! Adapters decode what producers send; [`Registry::enrich`] then fills in what the producer
//! did not say: the source's kind and place, OCC's names for the producer's measurements, the
//! zone that contains the event's position, whether a recognised plate is wanted.

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::{Event, EventType, SourceId, SourceKind};
use crate::source::{Mapping, Profile, SourceConfig};
use crate::watchlist::{Plate, WatchList};
use crate::zone::ZoneMap;

/// The attribute that carries a recognised licence plate.
pub const PLATE_ATTRIBUTE: &str = "plate";
/// The attribute that carries a producer's device profile (a LoRaWAN device profile's name).
pub const DEVICE_PROFILE_ATTRIBUTE: &str = "device_profile";

/// A snapshot of the registry, cheap to share behind an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    sources: HashMap<SourceId, SourceConfig>,
    profiles: HashMap<String, Mapping>,
    zones: ZoneMap,
    watchlist: WatchList,
}

/// A plate on a watch list, seen.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchHit {
    pub entry_id: Uuid,
    pub plate: Plate,
}

/// An event ready for storage: enriched, with what the registry decided about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Enriched {
    pub event: Event,
    /// False for a disabled source: its events are stored, but open no incident.
    pub evaluate_rules: bool,
    pub watch_hit: Option<WatchHit>,
}

impl Enriched {
    /// An event taken as it is (nothing registered).
    pub fn plain(event: Event) -> Self {
        Self {
            event,
            evaluate_rules: true,
            watch_hit: None,
        }
    }
}

impl Registry {
    pub fn new(
        sources: Vec<SourceConfig>,
        profiles: Vec<Profile>,
        zones: ZoneMap,
        watchlist: WatchList,
    ) -> Self {
        Self {
            sources: sources.into_iter().map(|s| (s.id.clone(), s)).collect(),
            profiles: profiles.into_iter().map(|p| (p.name, p.mapping)).collect(),
            zones,
            watchlist,
        }
    }

    pub fn zones(&self) -> &ZoneMap {
        &self.zones
    }

    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.sources.len(),
            self.profiles.len(),
            self.zones.len(),
            self.watchlist.len(),
        )
    }

    /// Applies what the registry knows to `event`:
    ///
    /// 1. its mapping (the source's profile, or the profile named by the producer's device
    ///    profile, overlaid by the source's own renames): event type and measurement names;
    /// 2. the source's kind, position, zone and district where the event gives none (the
    ///    producer's own values win: a patrol car knows where it is better than its registry
    ///    entry);
    /// 3. the zone that contains its position when it names none, and that zone's district;
    /// 4. a recognised plate against the watch lists: `watchlisted` says whether OCC's lists
    ///    hold it (whatever the camera's own idea, kept as `camera_watchlisted`).
    pub fn enrich(&self, mut event: Event) -> Enriched {
        let source = self.sources.get(&event.source_id);

        let profile = source
            .and_then(|s| s.profile.as_deref())
            .or_else(|| {
                event
                    .attributes
                    .get(DEVICE_PROFILE_ATTRIBUTE)
                    .and_then(|v| v.as_str())
            })
            .and_then(|name| self.profiles.get(name));
        let own = source.map(|s| &s.mapping).filter(|m| !m.is_empty());
        let mapping = match (profile, own) {
            (Some(p), Some(o)) => Some(std::borrow::Cow::Owned(p.overlaid(o))),
            (Some(p), None) => Some(std::borrow::Cow::Borrowed(p)),
            (None, Some(o)) => Some(std::borrow::Cow::Borrowed(o)),
            (None, None) => None,
        };
        if let Some(m) = mapping {
            apply_mapping(&mut event, &m);
        }

        let own_location = event.location.is_some();
        if let Some(s) = source {
            if let Some(kind) = &s.kind {
                event.source_kind = Some(kind.clone());
            }
            if event.location.is_none() {
                event.location = s.location;
            }
        }
        if event.zone.is_none() {
            let located = event
                .location
                .filter(|_| own_location)
                .and_then(|p| self.zones.locate(p));
            event.zone = match (located, source.and_then(|s| s.zone.clone())) {
                (Some(z), _) => Some(z.name.clone()),
                (None, Some(z)) => Some(z),
                (None, None) => event
                    .location
                    .and_then(|p| self.zones.locate(p))
                    .map(|z| z.name.clone()),
            };
        }
        if event.district.is_none() {
            event.district = event
                .zone
                .as_ref()
                .and_then(|z| self.zones.get(z))
                .and_then(|z| z.district.clone())
                .or_else(|| source.and_then(|s| s.district.clone()));
        }

        let watch_hit = self.check_plate(&mut event);
        Enriched {
            evaluate_rules: source.is_none_or(|s| s.enabled),
            watch_hit,
            event,
        }
    }

    fn check_plate(&self, event: &mut Event) -> Option<WatchHit> {
        // Only OCC's lists say what is wanted: a producer's own claim is kept aside, with or
        // without a plate OCC can read.
        if let Some(claimed) = event.attributes.remove("watchlisted") {
            event
                .attributes
                .insert("camera_watchlisted".into(), claimed);
        }
        event.attributes.remove("plate_normalized");
        let plate = event
            .attributes
            .get(PLATE_ATTRIBUTE)
            .and_then(|v| v.as_str())
            .and_then(Plate::normalize)?;
        event.attributes.insert(
            "plate_normalized".into(),
            serde_json::Value::String(plate.to_string()),
        );
        let hit = self.watchlist.find(&plate, event.received_at);
        event
            .attributes
            .insert("watchlisted".into(), serde_json::Value::Bool(hit.is_some()));
        let entry = hit?;
        event.attributes.insert(
            "watchlist".into(),
            serde_json::Value::String(entry.list.clone()),
        );
        event.attributes.insert(
            "watchlist_reason".into(),
            serde_json::Value::String(entry.reason.clone()),
        );
        Some(WatchHit {
            entry_id: entry.id,
            plate,
        })
    }
}

fn apply_mapping(event: &mut Event, m: &Mapping) {
    if let Some(to) = m.event_types.get(event.event_type.as_str())
        && let Ok(t) = EventType::parse(to, 64)
    {
        event.event_type = t;
    }
    if !m.measurements.is_empty() {
        let old = std::mem::take(&mut event.measurements);
        for (name, value) in old {
            let name = m.measurements.get(&name).cloned().unwrap_or(name);
            event.measurements.insert(name, value);
        }
    }
    if event.source_kind.is_none()
        && let Some(kind) = &m.source_kind
        && let Ok(k) = SourceKind::parse("source_kind", kind)
    {
        event.source_kind = Some(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventInput, Limits, LocationInput};
    use crate::source::SourceInput;
    use crate::watchlist::{WatchEntry, WatchEntryInput};
    use crate::zone::{ZoneArea, ZoneInput};
    use chrono::Utc;
    use serde_json::json;

    fn event(source: &str, f: impl FnOnce(&mut EventInput)) -> Event {
        let mut input = EventInput {
            event_type: Some("lorawan.uplink".into()),
            ..EventInput::default()
        };
        f(&mut input);
        Event::parse(
            SourceId::parse(source).expect("source"),
            input,
            b"",
            Utc::now(),
            &Limits::default(),
        )
        .expect("valid event")
    }

    fn registry() -> Registry {
        let source = |input: SourceInput| SourceConfig::parse(input).expect("valid source");
        let zones = ZoneMap::new(vec![
            ZoneArea::parse(ZoneInput {
                name: "ishim_embankment".into(),
                district: Some("esil".into()),
                geometry: json!({"type": "Polygon", "coordinates": [[[71.42, 51.15], [71.44, 51.15], [71.44, 51.17], [71.42, 51.17], [71.42, 51.15]]]}),
                ..ZoneInput::default()
            })
            .expect("zone"),
        ]);
        let watch = WatchList::new(vec![
            WatchEntry::parse(
                Uuid::now_v7(),
                WatchEntryInput {
                    plate: "505 AAA 02".into(),
                    list: "stolen_vehicles".into(),
                    reason: "stolen 2026-11-20".into(),
                    expires_at: None,
                },
                Utc::now(),
            )
            .expect("entry"),
        ]);
        Registry::new(
            vec![
                source(SourceInput {
                    id: "lorawan:a84041000181c0a7".into(),
                    lat: Some(51.16),
                    lon: Some(71.43),
                    mapping: Mapping {
                        measurements: [("batteryV".to_owned(), "supply_v".to_owned())].into(),
                        ..Mapping::default()
                    },
                    ..SourceInput::default()
                }),
                source(SourceInput {
                    id: "cam-off".into(),
                    enabled: Some(false),
                    zone: Some("depot".into()),
                    district: Some("nura".into()),
                    ..SourceInput::default()
                }),
            ],
            vec![
                Profile::parse(
                    "ultrasonic-level-v2",
                    "",
                    Mapping {
                        event_types: [("lorawan.uplink".to_owned(), "water.level".to_owned())]
                            .into(),
                        measurements: [
                            ("waterLevelCm".to_owned(), "water_level_cm".to_owned()),
                            ("batteryV".to_owned(), "battery_v".to_owned()),
                        ]
                        .into(),
                        source_kind: Some("water_level_sensor".into()),
                    },
                )
                .expect("profile"),
            ],
            zones,
            watch,
        )
    }

    #[test]
    fn a_device_profile_maps_type_and_measurements_and_the_source_places_it() {
        let e = event("lorawan:a84041000181c0a7", |i| {
            i.measurements = [
                ("waterLevelCm".to_owned(), 412.0),
                ("batteryV".to_owned(), 3.6),
            ]
            .into();
            i.attributes.insert(
                DEVICE_PROFILE_ATTRIBUTE.into(),
                json!("ultrasonic-level-v2"),
            );
        });
        let r = registry().enrich(e);
        let e = &r.event;
        assert_eq!(e.event_type.as_str(), "water.level");
        assert_eq!(e.measurements["water_level_cm"], 412.0);
        assert_eq!(
            e.measurements["supply_v"], 3.6,
            "the source's own rename wins"
        );
        assert_eq!(
            e.source_kind.as_ref().map(|k| k.as_str()),
            Some("water_level_sensor")
        );
        assert!((e.location.expect("inherited").lat() - 51.16).abs() < 1e-9);
        assert_eq!(
            e.zone.as_ref().map(|z| z.as_str()),
            Some("ishim_embankment")
        );
        assert_eq!(e.district.as_ref().map(|d| d.as_str()), Some("esil"));
        assert!(r.evaluate_rules);
    }

    #[test]
    fn an_event_with_a_position_gets_the_zone_that_contains_it() {
        let e = event("unknown-gauge", |i| {
            i.location = Some(LocationInput {
                lat: 51.155,
                lon: 71.425,
            });
        });
        let r = registry().enrich(e);
        assert_eq!(
            r.event.zone.as_ref().map(|z| z.as_str()),
            Some("ishim_embankment")
        );
        assert!(r.evaluate_rules, "unknown sources count");
    }

    #[test]
    fn a_disabled_source_is_stored_without_rules() {
        let r = registry().enrich(event("cam-off", |_| {}));
        assert!(!r.evaluate_rules);
        assert_eq!(r.event.zone.as_ref().map(|z| z.as_str()), Some("depot"));
        assert_eq!(r.event.district.as_ref().map(|d| d.as_str()), Some("nura"));
    }

    #[test]
    fn the_watch_list_decides_whatever_the_camera_says() {
        let wanted = registry().enrich(event("lpr-1", |i| {
            i.event_type = Some("vehicle.plate".into());
            i.attributes.insert("plate".into(), json!("505aaa 02"));
            i.attributes.insert("watchlisted".into(), json!(false));
        }));
        assert_eq!(wanted.event.attributes["watchlisted"], json!(true));
        assert_eq!(wanted.event.attributes["camera_watchlisted"], json!(false));
        assert_eq!(
            wanted.event.attributes["watchlist"],
            json!("stolen_vehicles")
        );
        assert_eq!(
            wanted.event.attributes["plate_normalized"],
            json!("505AAA02")
        );
        assert_eq!(
            wanted.watch_hit.as_ref().map(|h| h.plate.as_str()),
            Some("505AAA02")
        );

        // A claim without a plate OCC can read opens nothing either.
        let claim_only = registry().enrich(event("lpr-1", |i| {
            i.event_type = Some("vehicle.plate".into());
            i.attributes.insert("watchlisted".into(), json!(true));
        }));
        assert!(!claim_only.event.attributes.contains_key("watchlisted"));
        assert_eq!(
            claim_only.event.attributes["camera_watchlisted"],
            json!(true)
        );

        let not_wanted = registry().enrich(event("lpr-1", |i| {
            i.event_type = Some("vehicle.plate".into());
            i.attributes.insert("plate".into(), json!("123KZX01"));
            i.attributes.insert("watchlisted".into(), json!(true));
        }));
        assert_eq!(not_wanted.event.attributes["watchlisted"], json!(false));
        assert!(not_wanted.watch_hit.is_none());
    }
}
