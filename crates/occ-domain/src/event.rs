//! Events: what a camera, sensor or gateway reports, validated into a trusted [`Event`].
//!
//! Every transport (MQTT envelopes, gRPC `PublishEvents`) produces an [`EventInput`], the raw
//! shape with nothing checked, and calls [`Event::parse`], so that all of them enforce the same
//! types, ranges and limits.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::validation::{self, Collector, FieldError, FieldErrors};

/// Size limits enforced on every event, whatever its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted payload (an MQTT message body); larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    pub max_external_id_len: usize,
    pub max_type_len: usize,
    pub max_zone_len: usize,
    pub max_measurements: usize,
    pub max_attributes: usize,
    /// Largest JSON encoding of all attributes together.
    pub max_attributes_bytes: usize,
    /// Most zones one event may be in at once (a camera's object in overlapping zones).
    pub max_zones: usize,
    /// Most evidence references (snapshots, clips) one event may carry.
    pub max_evidence: usize,
}

/// How much older than its receipt an event's time may be and still be taken as when it
/// happened (a day: the longest a broker keeps OCC's session by default).
pub const CLOCK_TRUSTED_FOR: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// A time a device clock can give: from 1970 (a clock reset to zero is still a device
/// speaking, and its event is kept) to a day after receipt (a fast clock; later times are a
/// corrupt field, not a clock).
fn plausible_time(
    t: DateTime<Utc>,
    received_at: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    let latest = received_at + chrono::TimeDelta::days(1);
    if t < DateTime::UNIX_EPOCH || t > latest {
        return Err(FieldError::new(
            "occurred_at",
            format!(
                "must be between 1970-01-01T00:00:00Z and a day after receipt ({}), got {}",
                latest.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ));
    }
    Ok(t)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_external_id_len: 128,
            max_type_len: 64,
            max_zone_len: 128,
            max_measurements: 64,
            max_attributes: 64,
            max_attributes_bytes: 16 * 1024,
            max_zones: 16,
            max_evidence: 8,
        }
    }
}

/// Identifies an event. UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventId(pub Uuid);

impl EventId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Rebuilds a value OCC validated before storing it.
            pub fn from_stored(value: String) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
pub(crate) use string_newtype;

string_newtype!(
    /// The camera, sensor or gateway an event comes from (`cam-esil-0042`): 1 to 128 characters
    /// from `[A-Za-z0-9._:-]`, so it is always a valid single MQTT topic level.
    SourceId
);

impl SourceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(value: &str) -> Result<Self, FieldError> {
        validation::ident("source_id", value, Self::MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }
}

string_newtype!(
    /// What happened, as lowercase dot-separated words (`smoke.detected`, `water.level`).
    EventType
);

impl EventType {
    pub fn parse(value: &str, max_len: usize) -> Result<Self, FieldError> {
        const FIELD: &str = "type";
        if value.is_empty() {
            return Err(FieldError::new(FIELD, "must not be empty"));
        }
        if value.len() > max_len {
            return Err(FieldError::new(
                FIELD,
                format!("must be at most {max_len} characters, got {}", value.len()),
            ));
        }
        let well_formed = value.split('.').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        });
        if !well_formed {
            return Err(FieldError::new(
                FIELD,
                format!(
                    "must be lowercase words of [a-z0-9_-] separated by dots (like \"smoke.detected\"), got {value:?}"
                ),
            ));
        }
        Ok(Self(value.to_owned()))
    }
}

string_newtype!(
    /// A named area of the city (`left_bank_residential_4`, `restricted_substation`).
    Zone
);

impl Zone {
    pub fn parse(value: &str, max_len: usize) -> Result<Self, FieldError> {
        validation::text("zone", value, max_len)?;
        Ok(Self(value.to_owned()))
    }
}

string_newtype!(
    /// A city district (`esil`, `almaty`): a zone belongs to one, and rules may match on it.
    District
);

impl District {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        validation::text(field, value, 128)?;
        Ok(Self(value.to_owned()))
    }
}

string_newtype!(
    /// What kind of device produced an event (`camera`, `smoke_detector`, `panic_button`), used
    /// by rules that only apply to some kinds of source.
    SourceKind
);

impl SourceKind {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        validation::ident(field, value, 64)?;
        Ok(Self(value.to_ascii_lowercase()))
    }
}

/// How serious the producer says an event is. Ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Minor,
    Major,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Minor,
        Severity::Major,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == value)
            .ok_or_else(|| {
                FieldError::new(
                    field,
                    format!("must be one of critical, major, minor, info; got {value:?}"),
                )
            })
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A WGS 84 position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    lat: f64,
    lon: f64,
}

impl GeoPoint {
    pub fn new(lat: f64, lon: f64) -> Result<Self, FieldError> {
        if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
            return Err(FieldError::new(
                "location.lat",
                format!("must be between -90 and 90, got {lat}"),
            ));
        }
        if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
            return Err(FieldError::new(
                "location.lon",
                format!("must be between -180 and 180, got {lon}"),
            ));
        }
        Ok(Self { lat, lon })
    }

    pub fn lat(&self) -> f64 {
        self.lat
    }

    pub fn lon(&self) -> f64 {
        self.lon
    }
}

/// How sure a detector is, from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Confidence(f64);

impl Confidence {
    pub fn new(field: &str, value: f64) -> Result<Self, FieldError> {
        if value.is_finite() && (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(FieldError::new(
                field,
                format!("must be between 0 and 1, got {value}"),
            ))
        }
    }

    pub fn value(self) -> f64 {
        self.0
    }
}

/// What makes a redelivered event recognisable: the producer's own id when it sends one;
/// otherwise what OCC knows of the delivery. Unique per source.
///
/// Without a producer's id, the same bytes sent twice are two events (a panic button pressed
/// twice, a sensor repeating its reading): only a redelivery of one message is a duplicate.
/// Such a key starts as a hash of the content and is then [scoped](IdempotencyKey::scoped) to
/// the delivery that brought it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey {
    value: String,
    #[serde(skip)]
    kind: KeyKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
enum KeyKind {
    /// The producer's id, or a key read back from storage: final.
    #[default]
    Final,
    /// A hash of the content, not yet tied to a delivery.
    Content,
    /// The first delivery of a message to OCC's session: if the key is already stored, it
    /// belongs to an earlier message that had the same bytes and the same packet id (the
    /// broker reuses packet ids), and this one is stored as a new event.
    FirstDelivery,
}

/// How a message reached OCC: what tells a redelivery from a repeat when the producer gives
/// no id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// An MQTT message at QoS 1 or 2 in OCC's session (its client id). The broker redelivers a
    /// message it has not seen acknowledged only on a new connection, with the same packet id
    /// and the DUP flag set.
    Mqtt {
        session: &'a str,
        packet_id: u16,
        redelivered: bool,
    },
    /// A message decoded again from a dead letter: replaying one letter twice stores once.
    DeadLetter(Uuid),
    /// Never delivered again (a gRPC call, an MQTT message at QoS 0): always a new event.
    Once,
}

impl IdempotencyKey {
    /// The producer's id for the event (Frigate event id, ChirpStack deduplication id, the
    /// native envelope's `id`).
    pub fn external(id: &str) -> Self {
        Self {
            value: format!("id:{id}"),
            kind: KeyKind::Final,
        }
    }

    /// A SHA-256 of the bytes that carried an event without a producer's id, to be scoped to
    /// its delivery.
    pub fn content(bytes: &[u8]) -> Self {
        Self::content_named(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// A content key made by an adapter (one of several events of one message), to be scoped
    /// to its delivery.
    pub fn content_named(value: String) -> Self {
        Self {
            value,
            kind: KeyKind::Content,
        }
    }

    /// Ties a content key to the delivery that brought it; a producer's id is left as it is.
    /// A redelivery (same session, packet id and bytes) gets the key its first delivery got.
    pub fn scoped(self, delivery: &Delivery<'_>) -> Self {
        if self.kind != KeyKind::Content {
            return self;
        }
        match delivery {
            Delivery::Mqtt {
                session,
                packet_id,
                redelivered,
            } => Self {
                value: format!("{}@{session}#{packet_id}", self.value),
                kind: if *redelivered {
                    KeyKind::Final
                } else {
                    KeyKind::FirstDelivery
                },
            },
            Delivery::DeadLetter(id) => Self {
                value: format!("{}@dead-letter:{id}", self.value),
                kind: KeyKind::Final,
            },
            Delivery::Once => Self {
                value: format!("{}@{}", self.value, Uuid::now_v7()),
                kind: KeyKind::Final,
            },
        }
    }

    /// True for the first delivery of a message without a producer's id: a stored event with
    /// this key is an earlier message, not this one.
    pub fn is_first_delivery(&self) -> bool {
        self.kind == KeyKind::FirstDelivery
    }

    /// This first delivery's key when an earlier message holds the plain one.
    pub fn another(&self, event: EventId) -> Self {
        Self {
            value: format!("{}+{event}", self.value),
            kind: KeyKind::Final,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Rebuilds a key read back from storage.
    pub fn from_stored(value: String) -> Self {
        Self {
            value,
            kind: KeyKind::Final,
        }
    }
}

/// What a piece of evidence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvidenceKind {
    /// A still picture of the moment (a camera's best frame of the object).
    Snapshot,
    /// A video recording.
    Clip,
    /// A small picture for lists.
    Thumbnail,
}

impl EvidenceKind {
    pub const ALL: [EvidenceKind; 3] = [
        EvidenceKind::Snapshot,
        EvidenceKind::Clip,
        EvidenceKind::Thumbnail,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceKind::Snapshot => "snapshot",
            EvidenceKind::Clip => "clip",
            EvidenceKind::Thumbnail => "thumbnail",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == value)
            .ok_or_else(|| {
                FieldError::new(
                    field,
                    format!("must be snapshot, clip or thumbnail; got {value:?}"),
                )
            })
    }
}

/// A reference to evidence kept elsewhere (a recorder's snapshot or clip): OCC stores where to
/// find it, not the media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub kind: EvidenceKind,
    /// The keeper and its id for the item: `frigate:<event id>`.
    pub reference: String,
    /// Where a console fetches it, when the keeper's address is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Evidence {
    pub const MAX_REFERENCE_LEN: usize = 256;
    pub const MAX_URL_LEN: usize = 2048;

    fn check(&self, field: &str) -> Result<(), FieldError> {
        validation::text(
            &format!("{field}.reference"),
            &self.reference,
            Self::MAX_REFERENCE_LEN,
        )?;
        if let Some(url) = &self.url {
            validation::text(&format!("{field}.url"), url, Self::MAX_URL_LEN)?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(FieldError::new(
                    format!("{field}.url"),
                    format!("must be an http:// or https:// URL, got {url:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Where one message stands in the life of an *evolving* event: one that its producer
/// reports several times as it develops (a camera's tracked object: new, updates, end), and
/// that OCC stores once, keeping the latest state. A message whose revision is not newer than
/// the stored one changes nothing (a redelivery, or an update overtaken by a later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Revision {
    /// The producer's time for this state (a frame's time).
    pub at: DateTime<Utc>,
    /// Breaks ties at the same time: a later phase of the event ranks higher (an object's
    /// end after its last update).
    pub rank: i16,
}

/// A position as received, before its range is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocationInput {
    pub lat: f64,
    pub lon: f64,
}

/// An event as a transport received it: shapes are right, nothing else is checked yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventInput {
    /// The producer's id for this event, if it has one.
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub severity: Option<String>,
    /// RFC 3339; receipt time when absent.
    pub occurred_at: Option<String>,
    pub location: Option<LocationInput>,
    pub zone: Option<String>,
    /// Further zones the event is in at the same time (overlapping zones).
    pub extra_zones: Vec<String>,
    pub district: Option<String>,
    pub confidence: Option<f64>,
    pub source_kind: Option<String>,
    pub measurements: BTreeMap<String, f64>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub evidence: Vec<Evidence>,
    /// Set for a message about an evolving event (see [`Revision`]).
    pub revision: Option<Revision>,
}

/// A validated event, ready to be stored and evaluated by rules.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: EventId,
    pub source_id: SourceId,
    pub source_kind: Option<SourceKind>,
    pub external_id: Option<String>,
    pub idempotency_key: IdempotencyKey,
    pub event_type: EventType,
    pub severity: Option<Severity>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub location: Option<GeoPoint>,
    /// The zone it happened in (the first, when it is in several).
    pub zone: Option<Zone>,
    /// Further zones it is in at the same time; rules match on any of them.
    pub extra_zones: Vec<Zone>,
    pub district: Option<District>,
    pub confidence: Option<Confidence>,
    pub measurements: BTreeMap<String, f64>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub evidence: Vec<Evidence>,
    pub revision: Option<Revision>,
}

impl Event {
    /// Validates `input` from `source_id`. `content` is the bytes that carried the event; its
    /// hash is the idempotency key when the producer sent no id of its own. Every invalid
    /// field is reported, not just the first.
    pub fn parse(
        source_id: SourceId,
        input: EventInput,
        content: &[u8],
        received_at: DateTime<Utc>,
        limits: &Limits,
    ) -> Result<Event, FieldErrors> {
        let mut c = Collector::default();

        let external_id = input.id.and_then(|id| {
            c.take(validation::text("id", &id, limits.max_external_id_len).map(|()| id))
        });
        let event_type = match input.event_type.as_deref() {
            None => {
                c.push("type", "is required");
                None
            }
            Some(t) => c.take(EventType::parse(t, limits.max_type_len)),
        };
        let severity = input
            .severity
            .and_then(|s| c.take(Severity::parse("severity", &s)));
        let occurred_at = match input.occurred_at {
            None => Some(received_at),
            Some(s) => c.take(
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        FieldError::new(
                            "occurred_at",
                            format!("must be an RFC 3339 time such as 2026-11-25T06:31:07Z ({e}), got {s:?}"),
                        )
                    })
                    .and_then(|t| plausible_time(t, received_at)),
            ),
        };
        // A revision far ahead of receipt would rank above every later state of the event
        // and freeze it; the same bounds as for `occurred_at`.
        if let Some(r) = &input.revision
            && let Err(e) = plausible_time(r.at, received_at)
        {
            c.push(
                "revision",
                e.message.replace("got", "the producer's frame time is"),
            );
        }
        let location = input
            .location
            .and_then(|l| c.take(GeoPoint::new(l.lat, l.lon)));
        let zone = input
            .zone
            .and_then(|z| c.take(Zone::parse(&z, limits.max_zone_len)));
        if input.extra_zones.len() + 1 > limits.max_zones {
            c.push(
                "zones",
                format!(
                    "at most {} zones, got {}",
                    limits.max_zones,
                    input.extra_zones.len() + 1
                ),
            );
        }
        let mut extra_zones: Vec<Zone> = Vec::with_capacity(input.extra_zones.len());
        for (i, z) in input.extra_zones.iter().enumerate() {
            let parsed = Zone::parse(z, limits.max_zone_len)
                .map_err(|e| FieldError::new(format!("zones[{}]", i + 1), e.message));
            if let Some(z) = c.take(parsed)
                && zone.as_ref() != Some(&z)
                && !extra_zones.contains(&z)
            {
                extra_zones.push(z);
            }
        }
        let district = input
            .district
            .and_then(|d| c.take(District::parse("district", &d)));
        if input.evidence.len() > limits.max_evidence {
            c.push(
                "evidence",
                format!(
                    "at most {} evidence references, got {}",
                    limits.max_evidence,
                    input.evidence.len()
                ),
            );
        }
        for (i, e) in input.evidence.iter().enumerate() {
            if let Err(err) = e.check(&format!("evidence[{i}]")) {
                c.take::<()>(Err(err));
            }
        }
        let confidence = input
            .confidence
            .and_then(|v| c.take(Confidence::new("confidence", v)));
        let source_kind = input
            .source_kind
            .and_then(|k| c.take(SourceKind::parse("source_kind", &k)));

        if input.measurements.len() > limits.max_measurements {
            c.push(
                "measurements",
                format!(
                    "at most {} measurements, got {}",
                    limits.max_measurements,
                    input.measurements.len()
                ),
            );
        }
        for (name, value) in &input.measurements {
            let field = format!("measurements.{name}");
            if let Err(e) = validation::ident(&field, name, 64) {
                c.push(field, e.message);
            } else if !value.is_finite() {
                c.push(field, "must be a finite number");
            }
        }

        if input.attributes.len() > limits.max_attributes {
            c.push(
                "attributes",
                format!(
                    "at most {} attributes, got {}",
                    limits.max_attributes,
                    input.attributes.len()
                ),
            );
        } else {
            let size = serde_json::to_vec(&input.attributes).map_or(usize::MAX, |v| v.len());
            if size > limits.max_attributes_bytes {
                c.push(
                    "attributes",
                    format!(
                        "must be at most {} bytes as JSON, got {size}",
                        limits.max_attributes_bytes
                    ),
                );
            }
        }
        for (key, value) in &input.attributes {
            if let Err(e) = validation::text("attributes", key, 64) {
                c.push(format!("attributes.{key}"), e.message);
            } else if contains_nul(value) {
                // PostgreSQL cannot store U+0000 in text or JSON.
                c.push(
                    format!("attributes.{key}"),
                    "must not contain the NUL character",
                );
            }
        }

        let idempotency_key = match &external_id {
            Some(id) => IdempotencyKey::external(id),
            None => IdempotencyKey::content(content),
        };
        c.finish(|| Event {
            id: EventId::new(),
            source_id,
            source_kind,
            external_id,
            idempotency_key,
            event_type: event_type.expect("checked by the collector"),
            severity,
            occurred_at: occurred_at.expect("checked by the collector"),
            received_at,
            location,
            zone,
            extra_zones,
            district,
            confidence,
            measurements: input.measurements,
            attributes: input.attributes,
            evidence: input.evidence,
            revision: input.revision,
        })
    }

    /// Every zone the event is in, the first one first.
    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zone.iter().chain(&self.extra_zones)
    }

    /// When the event is taken to have happened for correlation windows and first/last seen:
    /// the producer's time, but never later than receipt, so a source with a fast clock cannot
    /// hold an incident open into the future; and receipt when the producer's time is more
    /// than [`CLOCK_TRUSTED_FOR`] older, which no broker or gateway holds a message for: a
    /// clock reset to 1970 or to its firmware's build date. Such a device's events would
    /// otherwise each be an old situation of their own, opening an incident per batch.
    pub fn observed_at(&self) -> DateTime<Utc> {
        if self.occurred_at < self.received_at - CLOCK_TRUSTED_FOR {
            self.received_at
        } else {
            self.occurred_at.min(self.received_at)
        }
    }

    /// Looks up a value named by a rule: `source_id`, `zone`, `district`, `type`, `severity`,
    /// `source_kind`, `measurement.<name>` or `attribute.<name>`.
    pub fn field_text(&self, field: &str) -> Option<String> {
        match field {
            "source_id" => Some(self.source_id.to_string()),
            "zone" => self.zone.as_ref().map(ToString::to_string),
            "district" => self.district.as_ref().map(ToString::to_string),
            "type" => Some(self.event_type.to_string()),
            "severity" => self.severity.map(|s| s.to_string()),
            "source_kind" => self.source_kind.as_ref().map(ToString::to_string),
            _ => {
                if let Some(name) = field.strip_prefix("measurement.") {
                    self.measurements.get(name).map(ToString::to_string)
                } else if let Some(name) = field.strip_prefix("attribute.") {
                    self.attributes.get(name).and_then(|v| match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    })
                } else {
                    None
                }
            }
        }
    }
}

fn contains_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn received() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 1, 32, 0)
            .single()
            .expect("valid time")
    }

    fn source() -> SourceId {
        SourceId::parse("det-esil-0042").expect("valid source")
    }

    fn input() -> EventInput {
        EventInput {
            id: Some("det-2026-11-25-000871".into()),
            event_type: Some("smoke.detected".into()),
            severity: Some("critical".into()),
            occurred_at: Some("2026-11-25T06:31:07.220+05:00".into()),
            location: Some(LocationInput {
                lat: 51.128207,
                lon: 71.430411,
            }),
            zone: Some("left_bank_residential_4".into()),
            confidence: Some(0.97),
            source_kind: None,
            measurements: [("obscuration_pct_per_m".to_owned(), 4.1)].into(),
            ..EventInput::default()
        }
    }

    #[test]
    fn a_complete_event_is_accepted_with_the_producers_id_as_key() {
        let e = Event::parse(source(), input(), b"{}", received(), &Limits::default())
            .expect("valid event");
        assert_eq!(e.event_type.as_str(), "smoke.detected");
        assert_eq!(e.severity, Some(Severity::Critical));
        assert_eq!(e.idempotency_key.as_str(), "id:det-2026-11-25-000871");
        // 06:31:07.220+05:00 is 01:31:07.220 UTC.
        assert_eq!(e.occurred_at.to_rfc3339(), "2026-11-25T01:31:07.220+00:00");
    }

    #[test]
    fn only_the_type_is_required_and_time_defaults_to_receipt() {
        let input = EventInput {
            event_type: Some("panic.pressed".into()),
            ..EventInput::default()
        };
        let e = Event::parse(source(), input, b"payload", received(), &Limits::default())
            .expect("valid event");
        assert_eq!(e.occurred_at, received());
        assert!(e.idempotency_key.as_str().starts_with("sha256:"));
    }

    fn mqtt(packet_id: u16, redelivered: bool) -> Delivery<'static> {
        Delivery::Mqtt {
            session: "occ-a",
            packet_id,
            redelivered,
        }
    }

    #[test]
    fn a_redelivery_gets_its_first_deliverys_key_and_a_repeat_does_not() {
        let bytes = b"{\"type\":\"panic.pressed\"}";
        let first = IdempotencyKey::content(bytes).scoped(&mqtt(7, false));
        let redelivered = IdempotencyKey::content(bytes).scoped(&mqtt(7, true));
        let pressed_again = IdempotencyKey::content(bytes).scoped(&mqtt(8, false));
        assert_eq!(first.as_str(), redelivered.as_str());
        assert!(first.is_first_delivery() && !redelivered.is_first_delivery());
        assert_ne!(first.as_str(), pressed_again.as_str());
        let other = IdempotencyKey::content(b"{}").scoped(&mqtt(7, true));
        assert_ne!(other.as_str(), redelivered.as_str());
        // Calls and QoS 0 messages are never delivered again: each is an event.
        let a = IdempotencyKey::content(bytes).scoped(&Delivery::Once);
        let b = IdempotencyKey::content(bytes).scoped(&Delivery::Once);
        assert_ne!(a, b);
        // One dead letter replayed twice is one event.
        let letter = Uuid::now_v7();
        assert_eq!(
            IdempotencyKey::content(bytes).scoped(&Delivery::DeadLetter(letter)),
            IdempotencyKey::content(bytes).scoped(&Delivery::DeadLetter(letter))
        );
        // A producer's id is the key, however the message came.
        let id = IdempotencyKey::external("det-1").scoped(&mqtt(9, false));
        assert_eq!(id.as_str(), "id:det-1");
        assert!(!id.is_first_delivery());
    }

    #[test]
    fn every_invalid_field_is_reported_by_name() {
        let mut bad = input();
        bad.event_type = Some("Smoke Detected".into());
        bad.location = Some(LocationInput {
            lat: 91.0,
            lon: 71.0,
        });
        bad.confidence = Some(1.5);
        bad.severity = Some("urgent".into());
        bad.occurred_at = Some("yesterday".into());
        let errs = Event::parse(source(), bad, b"", received(), &Limits::default())
            .expect_err("invalid event");
        let fields: Vec<_> = errs.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "type",
                "severity",
                "occurred_at",
                "location.lat",
                "confidence"
            ]
        );
        assert!(
            errs.to_string()
                .contains("location.lat: must be between -90 and 90, got 91")
        );
    }

    #[test]
    fn a_missing_type_is_an_error() {
        let errs = Event::parse(
            source(),
            EventInput::default(),
            b"",
            received(),
            &Limits::default(),
        )
        .expect_err("type missing");
        assert_eq!(errs.to_string(), "type: is required");
    }

    #[test]
    fn limits_on_measurements_and_attributes_hold() {
        let limits = Limits {
            max_measurements: 1,
            max_attributes_bytes: 20,
            ..Limits::default()
        };
        let mut big = input();
        big.measurements.insert("pm10".into(), 1.0);
        big.attributes.insert("note".into(), "x".repeat(40).into());
        let errs = Event::parse(source(), big, b"", received(), &limits).expect_err("too big");
        let fields: Vec<_> = errs.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["measurements", "attributes"]);
    }

    #[test]
    fn nul_characters_in_attributes_are_rejected() {
        let mut bad = input();
        bad.attributes.insert(
            "note".into(),
            serde_json::json!({"inner": ["ok", "a\u{0}b"]}),
        );
        let errs = Event::parse(source(), bad, b"", received(), &Limits::default())
            .expect_err("NUL refused");
        assert_eq!(
            errs.to_string(),
            "attributes.note: must not contain the NUL character"
        );
    }

    #[test]
    fn non_finite_measurements_are_rejected() {
        let mut bad = input();
        bad.measurements.insert("level".into(), f64::NAN);
        let errs =
            Event::parse(source(), bad, b"", received(), &Limits::default()).expect_err("nan");
        assert_eq!(errs.errors()[0].field, "measurements.level");
    }

    #[test]
    fn source_ids_are_single_topic_levels() {
        assert!(SourceId::parse("cam-esil-0042").is_ok());
        assert!(SourceId::parse("a/b").is_err());
        assert!(SourceId::parse("+").is_err());
        assert!(SourceId::parse("").is_err());
        assert!(SourceId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn times_no_clock_gives_are_refused() {
        for bad in [
            "0001-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
        ] {
            let mut e = input();
            e.occurred_at = Some(bad.into());
            let errors =
                Event::parse(source(), e, b"", received(), &Limits::default()).expect_err(bad);
            assert_eq!(errors.errors()[0].field, "occurred_at", "{bad}");
        }
        let mut reset = input();
        reset.occurred_at = Some("1970-01-01T00:00:00Z".into());
        assert!(Event::parse(source(), reset, b"", received(), &Limits::default()).is_ok());
    }

    #[test]
    fn a_revision_far_in_the_future_is_refused() {
        let mut ahead = input();
        ahead.revision = Some(Revision {
            at: received() + chrono::TimeDelta::days(400),
            rank: 1,
        });
        let errors = Event::parse(source(), ahead, b"", received(), &Limits::default())
            .expect_err("a frame time a year ahead");
        assert_eq!(errors.errors()[0].field, "revision");
        let mut fine = input();
        fine.revision = Some(Revision {
            at: received() - chrono::TimeDelta::seconds(2),
            rank: 1,
        });
        assert!(Event::parse(source(), fine, b"", received(), &Limits::default()).is_ok());
    }

    #[test]
    fn a_reset_clock_is_not_taken_as_when_the_event_happened() {
        let mut reset = input();
        reset.occurred_at = Some("1970-01-01T00:00:07Z".into());
        let e = Event::parse(source(), reset, b"", received(), &Limits::default())
            .expect("valid event");
        assert_eq!(e.observed_at(), received());
        let mut late = input();
        late.occurred_at = Some("2026-11-24T09:00:00Z".into());
        let e =
            Event::parse(source(), late, b"", received(), &Limits::default()).expect("valid event");
        assert_eq!(
            e.observed_at().to_rfc3339(),
            "2026-11-24T09:00:00+00:00",
            "a message held by the broker for hours keeps its time"
        );
    }

    #[test]
    fn observed_time_never_runs_ahead_of_receipt() {
        let mut future = input();
        future.occurred_at = Some("2026-11-26T00:00:00Z".into());
        let e = Event::parse(source(), future, b"", received(), &Limits::default())
            .expect("valid event");
        assert_eq!(e.observed_at(), received());
    }

    #[test]
    fn fields_are_looked_up_by_rule_names() {
        let mut with_attrs = input();
        with_attrs
            .attributes
            .insert("plate".into(), "777ABC01".into());
        with_attrs.attributes.insert("floor".into(), 7.into());
        let e = Event::parse(source(), with_attrs, b"", received(), &Limits::default())
            .expect("valid event");
        assert_eq!(
            e.field_text("zone").as_deref(),
            Some("left_bank_residential_4")
        );
        assert_eq!(e.field_text("attribute.plate").as_deref(), Some("777ABC01"));
        assert_eq!(e.field_text("attribute.floor").as_deref(), Some("7"));
        assert_eq!(
            e.field_text("measurement.obscuration_pct_per_m").as_deref(),
            Some("4.1")
        );
        assert_eq!(e.field_text("attribute.missing"), None);
    }
}
