//! Rules: which events are incidents, for which agency, how urgent, and which events belong to
//! the same incident.
//!
//! Rules are stored in the database and compiled into a [`RuleSet`] that is evaluated in memory
//! for every event. A rule matches on event type patterns, source kinds, zones, measurement
//! thresholds, attribute values, minimum severity and minimum confidence (all given conditions
//! must hold) and says what incident to open or join: category, queue, priority, title template,
//! correlation key fields and window.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{Confidence, Event, Severity, SourceKind, Zone, string_newtype};
use crate::glob::Glob;
use crate::incident::Priority;
use crate::validation::{self, Collector, FieldError, FieldErrors};

/// Identifies a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleId(pub Uuid);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn slug(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > 64 {
        return Err(FieldError::new(field, "must be 1 to 64 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(FieldError::new(
            field,
            format!("may only contain a-z, 0-9, '_' and '-', got {value:?}"),
        ));
    }
    Ok(())
}

string_newtype!(
    /// A rule's unique, human-chosen name (`fire-smoke`).
    RuleName
);
string_newtype!(
    /// What kind of situation an incident is (`fire`, `gas_leak`, `intrusion`).
    Category
);
string_newtype!(
    /// The dispatch queue of one agency or discipline (`fire`, `ems`, `police`).
    QueueName
);

impl RuleName {
    pub fn parse(value: &str) -> Result<Self, FieldError> {
        slug("name", value).map(|()| Self(value.to_owned()))
    }
}

impl Category {
    pub fn parse(value: &str) -> Result<Self, FieldError> {
        slug("category", value).map(|()| Self(value.to_owned()))
    }
}

impl QueueName {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        slug(field, value).map(|()| Self(value.to_owned()))
    }
}

/// How a measurement is compared with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Gte,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Lte,
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Gte => ">=",
            Comparison::Lt => "<",
            Comparison::Lte => "<=",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        [
            Comparison::Gt,
            Comparison::Gte,
            Comparison::Lt,
            Comparison::Lte,
        ]
        .into_iter()
        .find(|c| c.as_str() == value)
        .ok_or_else(|| FieldError::new(field, format!("must be >, >=, < or <=, got {value:?}")))
    }

    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Gt => value > threshold,
            Comparison::Gte => value >= threshold,
            Comparison::Lt => value < threshold,
            Comparison::Lte => value <= threshold,
        }
    }
}

/// A condition on one measurement (`pm2_5 > 55.4`). An event without that measurement does
/// not meet it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub measurement: String,
    pub comparison: Comparison,
    pub value: f64,
}

impl Threshold {
    fn holds(&self, event: &Event) -> bool {
        event
            .measurements
            .get(&self.measurement)
            .is_some_and(|v| self.comparison.holds(*v, self.value))
    }
}

/// An event value that identifies "the same situation" for correlation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationField {
    SourceId,
    Zone,
    District,
    EventType,
    Attribute(String),
}

impl CorrelationField {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        match value {
            "source_id" => Ok(Self::SourceId),
            "zone" => Ok(Self::Zone),
            "district" => Ok(Self::District),
            "type" => Ok(Self::EventType),
            _ => match value.strip_prefix("attribute.") {
                Some(name) if !name.is_empty() && name.len() <= 64 => {
                    Ok(Self::Attribute(name.to_owned()))
                }
                _ => Err(FieldError::new(
                    field,
                    format!(
                        "must be source_id, zone, district, type or attribute.<name>, got {value:?}"
                    ),
                )),
            },
        }
    }

    /// The name used in rules and in correlation keys.
    pub fn name(&self) -> String {
        match self {
            Self::SourceId => "source_id".into(),
            Self::Zone => "zone".into(),
            Self::District => "district".into(),
            Self::EventType => "type".into(),
            Self::Attribute(a) => format!("attribute.{a}"),
        }
    }
}

/// The title of an incident, with `{placeholders}` filled from its first event: `{zone}`,
/// `{district}`, `{source_id}`, `{type}`, `{severity}`, `{source_kind}`,
/// `{measurement.<name>}`, `{attribute.<name>}`. A value the event does not carry renders as
/// `unknown`.
#[derive(Debug, Clone, PartialEq)]
pub struct TitleTemplate {
    source: String,
    parts: Vec<TitlePart>,
}

#[derive(Debug, Clone, PartialEq)]
enum TitlePart {
    Text(String),
    Field(String),
}

impl TitleTemplate {
    pub const MAX_LEN: usize = 200;

    pub fn parse(value: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "title_template";
        validation::text(FIELD, value, Self::MAX_LEN)?;
        let mut parts = Vec::new();
        let mut rest = value;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TitlePart::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| FieldError::new(FIELD, "has a '{' without a closing '}'"))?;
            let name = &after[..close];
            let known = matches!(
                name,
                "zone" | "district" | "source_id" | "type" | "severity" | "source_kind"
            ) || name
                .strip_prefix("measurement.")
                .or_else(|| name.strip_prefix("attribute."))
                .is_some_and(|n| !n.is_empty());
            if !known {
                return Err(FieldError::new(
                    FIELD,
                    format!(
                        "unknown placeholder {{{name}}}; use zone, district, source_id, type, severity, source_kind, measurement.<name> or attribute.<name>"
                    ),
                ));
            }
            parts.push(TitlePart::Field(name.to_owned()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(FieldError::new(FIELD, "has a '}' without an opening '{'"));
        }
        if !rest.is_empty() {
            parts.push(TitlePart::Text(rest.to_owned()));
        }
        Ok(Self {
            source: value.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn render(&self, event: &Event) -> String {
        self.render_in(event, event.zone.as_ref())
    }

    /// Renders with `{zone}` standing for `zone`: the one of the event's zones a rule matched.
    pub fn render_in(&self, event: &Event, zone: Option<&Zone>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TitlePart::Text(t) => out.push_str(t),
                TitlePart::Field(f) => {
                    out.push_str(field_in(event, zone, f).as_deref().unwrap_or("unknown"));
                }
            }
        }
        if out.len() > Self::MAX_LEN {
            let mut cut = Self::MAX_LEN;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        out
    }
}

/// An event's value by rule name, with `zone` standing for the zone a rule matched.
fn field_in(event: &Event, zone: Option<&Zone>, field: &str) -> Option<String> {
    if field == "zone" {
        zone.map(ToString::to_string)
    } else {
        event.field_text(field)
    }
}

/// What a rule looks at. Empty lists and absent minimums place no condition.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMatch {
    /// At least one must match the event type (never empty; `*` matches every type).
    pub event_types: Vec<Glob>,
    pub source_kinds: Vec<SourceKind>,
    /// Zone patterns; when given, an event matches when one of its zones does (and an event
    /// without a zone does not).
    pub zones: Vec<Glob>,
    /// District patterns; when given, an event without a district does not match.
    pub districts: Vec<Glob>,
    /// An event that carries no confidence (a smoke detector, a panic button) is taken as
    /// certain.
    pub min_confidence: Option<Confidence>,
    /// An event that carries no severity does not meet a minimum severity.
    pub min_severity: Option<Severity>,
    pub thresholds: Vec<Threshold>,
    /// Attributes that must have exactly these values.
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl RuleMatch {
    pub fn matches(&self, event: &Event) -> bool {
        self.check(event).is_some()
    }

    /// `None` when the event does not match; otherwise the zone the incident is about: the
    /// first of the event's zones that the zone patterns match (its first zone when the rule
    /// names none).
    pub fn check<'e>(&self, event: &'e Event) -> Option<Option<&'e Zone>> {
        let zone = if self.zones.is_empty() {
            event.zone.as_ref()
        } else {
            Some(
                event
                    .zones()
                    .find(|z| self.zones.iter().any(|g| g.is_match(z.as_str())))?,
            )
        };
        let rest = self
            .event_types
            .iter()
            .any(|g| g.is_match(event.event_type.as_str()))
            && (self.source_kinds.is_empty()
                || event
                    .source_kind
                    .as_ref()
                    .is_some_and(|k| self.source_kinds.contains(k)))
            && (self.districts.is_empty()
                || event
                    .district
                    .as_ref()
                    .is_some_and(|d| self.districts.iter().any(|g| g.is_match(d.as_str()))))
            && self
                .min_confidence
                .is_none_or(|min| event.confidence.is_none_or(|c| c >= min))
            && self
                .min_severity
                .is_none_or(|min| event.severity.is_some_and(|s| s >= min))
            && self.thresholds.iter().all(|t| t.holds(event))
            && self
                .attributes
                .iter()
                .all(|(k, v)| event.attributes.get(k) == Some(v));
        rest.then_some(zone)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleAction {
    pub category: Category,
    pub queue: QueueName,
    /// The priority for an event of ordinary severity; a critical event raises it one step and
    /// an informational one lowers it one step.
    pub priority: Priority,
    pub title: TitleTemplate,
    /// Events of this category with the same values of these fields are one situation.
    pub correlation_fields: Vec<CorrelationField>,
    /// How long after the last event of an incident a new one still joins it.
    pub correlation_window: TimeDelta,
    /// How long its incidents may wait to be claimed before escalation; the default for
    /// their priority when `None`.
    pub claim_within: Option<TimeDelta>,
}

impl RuleAction {
    /// The priority this event deserves under this rule.
    pub fn priority_for(&self, event: &Event) -> Priority {
        match event.severity {
            Some(Severity::Critical) => self.priority.raised(),
            Some(Severity::Info) => self.priority.lowered(),
            _ => self.priority,
        }
    }

    /// The longest correlation key stored as written; a longer one is stored as a hash.
    pub const MAX_KEY_LEN: usize = 512;

    /// The correlation key of this event: the category, then each field's value. A field the
    /// event does not carry is replaced by the source, so such events correlate per source
    /// rather than all together. A key longer than [`Self::MAX_KEY_LEN`] (an attribute holding
    /// a long text) becomes the category and a SHA-256 of the key.
    pub fn correlation_key(&self, event: &Event) -> String {
        self.correlation_key_in(event, event.zone.as_ref())
    }

    /// The correlation key with `zone` as the event's zone (the zone a rule matched).
    pub fn correlation_key_in(&self, event: &Event, zone: Option<&Zone>) -> String {
        let key = self.readable_key(event, zone);
        if key.len() <= Self::MAX_KEY_LEN {
            key
        } else {
            use sha2::{Digest, Sha256};
            format!(
                "{}|sha256:{}",
                escape(self.category.as_str()),
                hex::encode(Sha256::digest(key.as_bytes()))
            )
        }
    }

    fn readable_key(&self, event: &Event, zone: Option<&Zone>) -> String {
        let mut key = escape(self.category.as_str());
        let mut by_source = false;
        for field in &self.correlation_fields {
            let name = field.name();
            match field_in(event, zone, &name) {
                Some(value) => {
                    key.push('|');
                    key.push_str(&name);
                    key.push('=');
                    key.push_str(&escape(&value));
                    by_source |= *field == CorrelationField::SourceId;
                }
                None if !by_source => {
                    key.push_str("|source_id=");
                    key.push_str(&escape(event.source_id.as_str()));
                    by_source = true;
                }
                None => {}
            }
        }
        key
    }
}

fn escape(value: &str) -> String {
    if value.contains(['|', '\\', '=']) {
        value
            .replace('\\', "\\\\")
            .replace('|', "\\|")
            .replace('=', "\\=")
    } else {
        value.to_owned()
    }
}

/// A rule: conditions and action.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: RuleId,
    pub name: RuleName,
    pub description: String,
    pub enabled: bool,
    pub matcher: RuleMatch,
    pub action: RuleAction,
    pub updated_at: DateTime<Utc>,
}

/// A rule as written by a person or read from storage, before it is checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleInput {
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub event_types: Vec<String>,
    pub source_kinds: Vec<String>,
    pub zones: Vec<String>,
    #[serde(default)]
    pub districts: Vec<String>,
    pub min_confidence: Option<f64>,
    pub min_severity: Option<String>,
    pub thresholds: Vec<ThresholdInput>,
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub category: String,
    pub queue: String,
    /// 1 (P1) to 4 (P4).
    pub priority: i16,
    pub title_template: String,
    pub correlation_fields: Vec<String>,
    pub correlation_window_seconds: i64,
    /// None: the default for the priority (P1 1 min, P2 3 min, P3 10 min, P4 30 min).
    #[serde(default)]
    pub claim_within_seconds: Option<i64>,
}

/// A threshold as written, before it is checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdInput {
    pub measurement: String,
    pub comparison: String,
    pub value: f64,
}

impl Rule {
    /// The longest correlation window a rule may have.
    pub const MAX_WINDOW_SECONDS: i64 = 7 * 24 * 3600;

    /// Checks every field of `input`, reporting each invalid one.
    pub fn parse(
        id: RuleId,
        input: RuleInput,
        updated_at: DateTime<Utc>,
    ) -> Result<Rule, FieldErrors> {
        let mut c = Collector::default();
        let name = c.take(RuleName::parse(&input.name));
        if input.description.len() > 2000 {
            c.push("description", "must be at most 2000 bytes");
        }
        if input.event_types.is_empty() {
            c.push(
                "event_types",
                "needs at least one pattern (\"*\" matches every type)",
            );
        }
        for (i, t) in input.event_types.iter().enumerate() {
            let field = format!("event_types[{i}]");
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'.' | b'_' | b'-' | b'*')
                });
            if !ok {
                c.push(
                    field,
                    format!("must be a type pattern of [a-z0-9._-] and '*', got {t:?}"),
                );
            }
        }
        let source_kinds: Vec<_> = input
            .source_kinds
            .iter()
            .enumerate()
            .filter_map(|(i, k)| c.take(SourceKind::parse(&format!("source_kinds[{i}]"), k)))
            .collect();
        for (i, z) in input.zones.iter().enumerate() {
            if let Err(e) = validation::text(&format!("zones[{i}]"), z, 128) {
                c.take::<()>(Err(e));
            }
        }
        for (i, d) in input.districts.iter().enumerate() {
            if let Err(e) = validation::text(&format!("districts[{i}]"), d, 128) {
                c.take::<()>(Err(e));
            }
        }
        let min_confidence = input
            .min_confidence
            .and_then(|v| c.take(Confidence::new("min_confidence", v)));
        let min_severity = input
            .min_severity
            .as_deref()
            .and_then(|s| c.take(Severity::parse("min_severity", s)));
        let thresholds: Vec<_> = input
            .thresholds
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let field = format!("thresholds[{i}]");
                let measurement = c.take(
                    validation::ident(&format!("{field}.measurement"), &t.measurement, 64)
                        .map(|()| t.measurement.clone()),
                );
                let comparison = c.take(Comparison::parse(
                    &format!("{field}.comparison"),
                    &t.comparison,
                ));
                if !t.value.is_finite() {
                    c.push(format!("{field}.value"), "must be a finite number");
                }
                Some(Threshold {
                    measurement: measurement?,
                    comparison: comparison?,
                    value: t.value,
                })
            })
            .collect();
        for key in input.attributes.keys() {
            if let Err(e) = validation::text("attributes", key, 64) {
                c.push(format!("attributes.{key}"), e.message);
            }
        }
        let category = c.take(Category::parse(&input.category));
        let queue = c.take(QueueName::parse("queue", &input.queue));
        let priority = match Priority::from_level(input.priority) {
            Some(p) => Some(p),
            None => {
                c.push(
                    "priority",
                    format!("must be 1 (P1) to 4 (P4), got {}", input.priority),
                );
                None
            }
        };
        let title = c.take(TitleTemplate::parse(&input.title_template));
        let correlation_fields: Vec<_> = input
            .correlation_fields
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                c.take(CorrelationField::parse(
                    &format!("correlation_fields[{i}]"),
                    f,
                ))
            })
            .collect();
        if !(0..=Self::MAX_WINDOW_SECONDS).contains(&input.correlation_window_seconds) {
            c.push(
                "correlation_window",
                format!(
                    "must be between 0 and {} seconds (7 days), got {}",
                    Self::MAX_WINDOW_SECONDS,
                    input.correlation_window_seconds
                ),
            );
        }
        if let Some(secs) = input.claim_within_seconds
            && !(1..=86_400).contains(&secs)
        {
            c.push(
                "claim_within",
                format!("must be between 1 second and 1 day, got {secs} seconds"),
            );
        }
        c.finish(|| Rule {
            id,
            name: name.expect("checked"),
            description: input.description,
            enabled: input.enabled,
            matcher: RuleMatch {
                event_types: input.event_types.iter().map(|t| Glob::new(t)).collect(),
                source_kinds,
                zones: input.zones.iter().map(|z| Glob::new(z)).collect(),
                districts: input.districts.iter().map(|d| Glob::new(d)).collect(),
                min_confidence,
                min_severity,
                thresholds,
                attributes: input.attributes,
            },
            action: RuleAction {
                category: category.expect("checked"),
                queue: queue.expect("checked"),
                priority: priority.expect("checked"),
                title: title.expect("checked"),
                correlation_fields,
                correlation_window: TimeDelta::seconds(input.correlation_window_seconds),
                claim_within: input.claim_within_seconds.map(TimeDelta::seconds),
            },
            updated_at,
        })
    }

    /// The rule written back as input, for storage and for the API.
    pub fn to_input(&self) -> RuleInput {
        RuleInput {
            name: self.name.to_string(),
            description: self.description.clone(),
            enabled: self.enabled,
            event_types: self
                .matcher
                .event_types
                .iter()
                .map(|g| g.to_string())
                .collect(),
            source_kinds: self
                .matcher
                .source_kinds
                .iter()
                .map(|k| k.to_string())
                .collect(),
            zones: self.matcher.zones.iter().map(|g| g.to_string()).collect(),
            districts: self
                .matcher
                .districts
                .iter()
                .map(|g| g.to_string())
                .collect(),
            min_confidence: self.matcher.min_confidence.map(Confidence::value),
            min_severity: self.matcher.min_severity.map(|s| s.as_str().to_owned()),
            thresholds: self
                .matcher
                .thresholds
                .iter()
                .map(|t| ThresholdInput {
                    measurement: t.measurement.clone(),
                    comparison: t.comparison.as_str().to_owned(),
                    value: t.value,
                })
                .collect(),
            attributes: self.matcher.attributes.clone(),
            category: self.action.category.to_string(),
            queue: self.action.queue.to_string(),
            priority: self.action.priority.level(),
            title_template: self.action.title.as_str().to_owned(),
            correlation_fields: self
                .action
                .correlation_fields
                .iter()
                .map(CorrelationField::name)
                .collect(),
            correlation_window_seconds: self.action.correlation_window.num_seconds(),
            claim_within_seconds: self.action.claim_within.map(|d| d.num_seconds()),
        }
    }

    /// What this rule makes of `event`, if it matches.
    pub fn evaluate(&self, event: &Event) -> Option<RuleHit> {
        if !self.enabled {
            return None;
        }
        let zone = self.matcher.check(event)?;
        Some(RuleHit {
            rule_id: self.id,
            rule_name: self.name.clone(),
            category: self.action.category.clone(),
            queue: self.action.queue.clone(),
            priority: self.action.priority_for(event),
            title: self.action.title.render_in(event, zone),
            correlation_key: self.action.correlation_key_in(event, zone),
            correlation_window: self.action.correlation_window,
            claim_within: self.action.claim_within,
            zone: zone.cloned(),
        })
    }
}

/// An event matched a rule: the incident it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleHit {
    pub rule_id: RuleId,
    pub rule_name: RuleName,
    pub category: Category,
    pub queue: QueueName,
    pub priority: Priority,
    pub title: String,
    pub correlation_key: String,
    pub correlation_window: TimeDelta,
    /// The rule's claim deadline; the priority's default when `None`.
    pub claim_within: Option<TimeDelta>,
    /// The zone the incident is about (of the event's zones, the one the rule matched).
    pub zone: Option<Zone>,
}

/// The rules in force, compiled for evaluation. Cheap to share behind an `Arc`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Keeps the rules sorted by name, so evaluation order never depends on storage order.
    pub fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Self { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every incident this event belongs to: one hit per correlation key. When several rules
    /// lead to the same key (the same situation seen by two rules), the event counts once,
    /// with the most urgent of their priorities.
    pub fn evaluate(&self, event: &Event) -> Vec<RuleHit> {
        let mut hits: Vec<RuleHit> = Vec::new();
        for hit in self.rules.iter().filter_map(|r| r.evaluate(event)) {
            match hits
                .iter_mut()
                .find(|h| h.correlation_key == hit.correlation_key)
            {
                Some(existing) if hit.priority > existing.priority => *existing = hit,
                Some(_) => {}
                None => hits.push(hit),
            }
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventInput, Limits, LocationInput, SourceId};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 1, 0, 0)
            .single()
            .expect("valid time")
    }

    fn event(f: impl FnOnce(&mut EventInput)) -> Event {
        let mut input = EventInput {
            event_type: Some("smoke.detected".into()),
            zone: Some("left_bank_residential_4".into()),
            location: Some(LocationInput {
                lat: 51.12,
                lon: 71.43,
            }),
            ..EventInput::default()
        };
        f(&mut input);
        Event::parse(
            SourceId::parse("det-0042").expect("valid source"),
            input,
            b"",
            now(),
            &Limits::default(),
        )
        .expect("valid event")
    }

    fn smoke_rule() -> RuleInput {
        RuleInput {
            name: "fire-smoke".into(),
            enabled: true,
            event_types: vec!["smoke.*".into(), "fire.*".into()],
            category: "fire".into(),
            queue: "fire".into(),
            priority: 1,
            title_template: "Smoke or fire in {zone}".into(),
            correlation_fields: vec!["zone".into()],
            correlation_window_seconds: 1800,
            ..RuleInput::default()
        }
    }

    fn rule(input: RuleInput) -> Rule {
        Rule::parse(RuleId(Uuid::nil()), input, now()).expect("valid rule")
    }

    #[test]
    fn type_patterns_select_events() {
        let r = rule(smoke_rule());
        assert!(r.evaluate(&event(|_| {})).is_some());
        assert!(
            r.evaluate(&event(|e| e.event_type = Some("fire.flame".into())))
                .is_some()
        );
        assert!(
            r.evaluate(&event(|e| e.event_type = Some("gas.detected".into())))
                .is_none()
        );
    }

    #[test]
    fn disabled_rules_never_match() {
        let r = rule(RuleInput {
            enabled: false,
            ..smoke_rule()
        });
        assert!(r.evaluate(&event(|_| {})).is_none());
    }

    #[test]
    fn zones_kinds_confidence_and_severity_are_conditions() {
        let r = rule(RuleInput {
            name: "restricted-intrusion".into(),
            event_types: vec!["object.person".into()],
            zones: vec!["restricted_*".into()],
            source_kinds: vec!["camera".into()],
            min_confidence: Some(0.7),
            min_severity: Some("minor".into()),
            ..smoke_rule()
        });
        let person = |f: &dyn Fn(&mut EventInput)| {
            event(|e| {
                e.event_type = Some("object.person".into());
                e.zone = Some("restricted_substation".into());
                e.source_kind = Some("camera".into());
                e.confidence = Some(0.9);
                e.severity = Some("major".into());
                f(e);
            })
        };
        assert!(r.evaluate(&person(&|_| {})).is_some());
        assert!(
            r.evaluate(&person(&|e| e.zone = Some("park_path".into())))
                .is_none()
        );
        assert!(r.evaluate(&person(&|e| e.zone = None)).is_none());
        assert!(r.evaluate(&person(&|e| e.confidence = Some(0.5))).is_none());
        assert!(r.evaluate(&person(&|e| e.confidence = None)).is_some());
        assert!(
            r.evaluate(&person(&|e| e.source_kind = Some("sensor".into())))
                .is_none()
        );
        assert!(r.evaluate(&person(&|e| e.source_kind = None)).is_none());
        assert!(
            r.evaluate(&person(&|e| e.severity = Some("info".into())))
                .is_none()
        );
        assert!(r.evaluate(&person(&|e| e.severity = None)).is_none());
    }

    #[test]
    fn thresholds_compare_measurements() {
        let r = rule(RuleInput {
            name: "air-quality".into(),
            event_types: vec!["air.quality".into()],
            thresholds: vec![ThresholdInput {
                measurement: "pm2_5".into(),
                comparison: ">".into(),
                value: 55.4,
            }],
            ..smoke_rule()
        });
        let air = |pm: Option<f64>| {
            event(|e| {
                e.event_type = Some("air.quality".into());
                if let Some(v) = pm {
                    e.measurements.insert("pm2_5".into(), v);
                }
            })
        };
        assert!(r.evaluate(&air(Some(187.0))).is_some());
        assert!(r.evaluate(&air(Some(55.4))).is_none());
        assert!(r.evaluate(&air(None)).is_none());
    }

    #[test]
    fn attributes_must_equal() {
        let r = rule(RuleInput {
            name: "watchlisted-plate".into(),
            event_types: vec!["vehicle.plate".into()],
            attributes: [("watchlisted".to_owned(), serde_json::Value::Bool(true))].into(),
            correlation_fields: vec!["attribute.plate".into()],
            ..smoke_rule()
        });
        let plate = |listed: bool| {
            event(|e| {
                e.event_type = Some("vehicle.plate".into());
                e.attributes.insert("watchlisted".into(), listed.into());
                e.attributes.insert("plate".into(), "777ABC01".into());
            })
        };
        let hit = r
            .evaluate(&plate(true))
            .expect("watch-listed plate matches");
        assert_eq!(hit.correlation_key, "fire|attribute.plate=777ABC01");
        assert!(r.evaluate(&plate(false)).is_none());
    }

    #[test]
    fn severity_moves_priority_one_step() {
        let r = rule(RuleInput {
            priority: 2,
            ..smoke_rule()
        });
        let p = |sev: Option<&str>| {
            r.evaluate(&event(|e| e.severity = sev.map(Into::into)))
                .expect("matches")
                .priority
        };
        assert_eq!(p(Some("critical")), Priority::P1);
        assert_eq!(p(Some("major")), Priority::P2);
        assert_eq!(p(Some("minor")), Priority::P2);
        assert_eq!(p(None), Priority::P2);
        assert_eq!(p(Some("info")), Priority::P3);
    }

    #[test]
    fn correlation_keys_fall_back_to_the_source() {
        let r = rule(smoke_rule());
        let in_zone = r.evaluate(&event(|_| {})).expect("matches");
        assert_eq!(in_zone.correlation_key, "fire|zone=left_bank_residential_4");
        let no_zone = r.evaluate(&event(|e| e.zone = None)).expect("matches");
        assert_eq!(no_zone.correlation_key, "fire|source_id=det-0042");
        let weird = r
            .evaluate(&event(|e| e.zone = Some("a|b=c".into())))
            .expect("matches");
        assert_eq!(weird.correlation_key, "fire|zone=a\\|b\\=c");
    }

    #[test]
    fn long_keys_are_hashed_and_stay_distinct() {
        let r = rule(RuleInput {
            correlation_fields: vec!["attribute.plate".into()],
            ..smoke_rule()
        });
        let key = |plate: String| {
            r.evaluate(&event(|e| {
                e.attributes.insert("plate".into(), plate.into());
            }))
            .expect("matches")
            .correlation_key
        };
        let a = key("A".repeat(5000));
        let b = key("B".repeat(5000));
        assert!(a.starts_with("fire|sha256:") && a.len() < 100, "{a}");
        assert_ne!(a, b);
        assert_eq!(a, key("A".repeat(5000)));
    }

    #[test]
    fn titles_render_from_the_event() {
        let r = rule(RuleInput {
            title_template: "Water at {measurement.level_cm} cm on {zone} ({attribute.x})".into(),
            ..smoke_rule()
        });
        let hit = r
            .evaluate(&event(|e| {
                e.measurements.insert("level_cm".into(), 412.0);
            }))
            .expect("matches");
        assert_eq!(
            hit.title,
            "Water at 412 cm on left_bank_residential_4 (unknown)"
        );
    }

    #[test]
    fn bad_rules_report_each_field() {
        let errs = Rule::parse(
            RuleId(Uuid::nil()),
            RuleInput {
                name: "Bad Name".into(),
                event_types: vec![],
                priority: 7,
                title_template: "Fire in {room}".into(),
                correlation_fields: vec!["street".into()],
                correlation_window_seconds: -1,
                thresholds: vec![ThresholdInput {
                    measurement: "pm2_5".into(),
                    comparison: "~".into(),
                    value: 1.0,
                }],
                ..smoke_rule()
            },
            now(),
        )
        .expect_err("invalid rule");
        let fields: Vec<_> = errs.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "event_types",
                "thresholds[0].comparison",
                "priority",
                "title_template",
                "correlation_fields[0]",
                "correlation_window"
            ]
        );
    }

    #[test]
    fn a_rule_round_trips_through_its_input() {
        let input = RuleInput {
            thresholds: vec![ThresholdInput {
                measurement: "pm2_5".into(),
                comparison: ">=".into(),
                value: 55.5,
            }],
            zones: vec!["restricted_*".into()],
            min_confidence: Some(0.5),
            min_severity: Some("major".into()),
            ..smoke_rule()
        };
        assert_eq!(rule(input.clone()).to_input(), input);
    }

    #[test]
    fn rules_with_the_same_key_count_an_event_once_at_the_higher_priority() {
        let a = rule(RuleInput {
            priority: 3,
            ..smoke_rule()
        });
        let b = rule(RuleInput {
            name: "fire-any".into(),
            event_types: vec!["*".into()],
            priority: 2,
            ..smoke_rule()
        });
        let c = rule(RuleInput {
            name: "ems-smoke".into(),
            category: "smoke_inhalation".into(),
            queue: "ems".into(),
            priority: 3,
            ..smoke_rule()
        });
        let set = RuleSet::new(vec![a, b, c]);
        let hits = set.evaluate(&event(|_| {}));
        let summary: Vec<_> = hits
            .iter()
            .map(|h| (h.rule_name.as_str(), h.queue.as_str(), h.priority))
            .collect();
        assert_eq!(
            summary,
            [
                ("ems-smoke", "ems", Priority::P3),
                ("fire-any", "fire", Priority::P2)
            ]
        );
    }
}
