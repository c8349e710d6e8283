//! The adapter trait, the topic templates adapters are configured with, and the set of
//! adapters that routes each message to the one whose topic it arrived on.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use occ_domain::{Event, Limits};
use serde::de::DeserializeOwned;

/// One message as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub received_at: DateTime<Utc>,
}

/// Why a message could not become events. It goes to the dead letters with this text, which
/// names the field at fault (`after.current_zones: expected an array`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl Rejection {
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }

    pub fn field(field: &str, reason: impl fmt::Display) -> Self {
        Self(format!("{field}: {reason}"))
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<occ_domain::FieldErrors> for Rejection {
    fn from(e: occ_domain::FieldErrors) -> Self {
        Self(e.to_string())
    }
}

/// A producer format: a pure function from one message to the events it carries.
pub trait Adapter: Send + Sync + fmt::Debug {
    /// A short name for logs and metrics: `native`, `frigate`, `chirpstack`, `senml`.
    fn name(&self) -> &'static str;

    /// The MQTT topic filters its producers publish on.
    fn topic_filters(&self) -> Vec<String>;

    /// The events in one message: several, or none that matter (`Ok(vec![])`, acknowledged
    /// and dropped: a camera's motion flag, a downlink receipt); anything malformed is a
    /// `Rejection`.
    fn decode(&self, message: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection>;
}

/// The adapters in use; each message goes to the first whose filters match its topic. Each
/// adapter's filters are read once, here, not for every message.
#[derive(Debug, Default)]
pub struct Adapters(Vec<(Box<dyn Adapter>, Vec<String>)>);

impl Adapters {
    pub fn new(adapters: Vec<Box<dyn Adapter>>) -> Self {
        Self(
            adapters
                .into_iter()
                .map(|a| {
                    let filters = a.topic_filters();
                    (a, filters)
                })
                .collect(),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Adapter> {
        self.0.iter().map(|(a, _)| a.as_ref())
    }

    /// Every topic filter, once.
    pub fn topic_filters(&self) -> Vec<String> {
        let mut filters: Vec<String> = Vec::new();
        for f in self.0.iter().flat_map(|(_, f)| f) {
            if !filters.contains(f) {
                filters.push(f.clone());
            }
        }
        filters
    }

    /// The adapter for a topic.
    pub fn for_topic(&self, topic: &str) -> Option<&dyn Adapter> {
        self.0
            .iter()
            .find(|(_, filters)| filters.iter().any(|f| topic_matches(topic, f)))
            .map(|(a, _)| a.as_ref())
    }

    /// Decodes a message with the adapter for its topic. Payloads over the size limit are
    /// rejected before any adapter looks at them.
    pub fn decode(&self, message: &Message<'_>, limits: &Limits) -> Result<Vec<Event>, Rejection> {
        self.decode_named(message, limits).1
    }

    /// As [`Adapters::decode`], with the name of the adapter that read the message (`None`
    /// when none handles its topic).
    pub fn decode_named(
        &self,
        message: &Message<'_>,
        limits: &Limits,
    ) -> (Option<&'static str>, Result<Vec<Event>, Rejection>) {
        let Some(adapter) = self.for_topic(message.topic) else {
            return (
                None,
                Err(Rejection(format!(
                    "no adapter handles topic {:?}",
                    message.topic
                ))),
            );
        };
        if message.payload.len() > limits.max_payload_bytes {
            return (
                Some(adapter.name()),
                Err(Rejection(format!(
                    "payload is {} bytes, over the limit of {} bytes",
                    message.payload.len(),
                    limits.max_payload_bytes
                ))),
            );
        }
        (Some(adapter.name()), adapter.decode(message, limits))
    }
}

/// Whether an MQTT topic name matches a topic filter (`+` one level, `#` the rest).
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A topic with named levels, as producers are configured: `occ/v1/events/{source_id}`,
/// `application/{application_id}/device/{dev_eui}/event/{event}`. Each `{name}` is one whole
/// level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Var(String),
}

/// A topic template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topic template {template:?}: {reason}")]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

impl TopicTemplate {
    /// Parses a template; `required` names the levels the adapter needs.
    pub fn parse(template: &str, required: &[&str]) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        if template.is_empty() {
            return Err(err("is empty".into()));
        }
        let mut levels = Vec::new();
        for level in template.split('/') {
            if let Some(name) = level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                if name.is_empty() || name.contains(['{', '}']) {
                    return Err(err(format!("{level:?} is not a {{name}} level")));
                }
                levels.push(Level::Var(name.to_owned()));
            } else if level.contains(['{', '}', '+', '#']) {
                return Err(err(format!(
                    "{level:?}: a level is a literal or a whole {{name}}, without wildcards"
                )));
            } else {
                levels.push(Level::Literal(level.to_owned()));
            }
        }
        for name in required {
            if !levels.iter().any(|l| *l == Level::Var((*name).to_owned())) {
                return Err(err(format!("needs a {{{name}}} level")));
            }
        }
        Ok(Self {
            template: template.to_owned(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The MQTT filter for it: every `{name}` level becomes `+`.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Var(_) => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The named levels of a topic that fits the template.
    pub fn captures<'t>(&self, topic: &'t str) -> Option<HashMap<&str, &'t str>> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.len() != self.levels.len() {
            return None;
        }
        let mut out = HashMap::new();
        for (level, part) in self.levels.iter().zip(parts) {
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Var(name) => {
                    out.insert(name.as_str(), part);
                }
            }
        }
        Some(out)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

/// Deserializes JSON, turning serde's error into a reason that names the field at fault in
/// JSON's own words (`after.current_zones: expected an array`).
pub fn from_json<T: DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, Rejection> {
    let de = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            // Where the JSON breaks is worth knowing.
            return Rejection(format!("invalid JSON {what}: {inner}"));
        }
        let text = inner.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text);
        let message = json_words(text);
        if path == "." || path == "?" {
            Rejection(format!("{what}: {message}"))
        } else {
            Rejection(format!("{path}: {message}"))
        }
    })
}

/// serde speaks of sequences and maps; producers write arrays and objects.
pub(crate) fn json_words(message: &str) -> String {
    let message = message
        .replace("a sequence", "an array")
        .replace("a map", "an object");
    // "invalid type: string \"x\", expected an array" → "expected an array, got string \"x\""
    match message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        Some((got, expected)) => format!("expected {expected}, got {got}"),
        None => message,
    }
}

/// A Unix time in seconds (a float, as producers send it) as a UTC time, to the microsecond.
pub fn unix_time(field: &str, secs: f64) -> Result<DateTime<Utc>, Rejection> {
    // Years 1970 to 9999: anything else is not a time a device meant.
    const MAX: f64 = 253_402_300_799.0;
    if !(secs.is_finite() && (0.0..=MAX).contains(&secs)) {
        return Err(Rejection::field(
            field,
            format!("must be a Unix time in seconds, got {secs}"),
        ));
    }
    // A float of this size holds microseconds, not nanoseconds: keep what it holds.
    let whole = secs.floor();
    let nanos = ((secs - whole) * 1e6).round().min(999_999.0) * 1e3;
    // In range by the check above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    DateTime::from_timestamp(whole as i64, nanos as u32).ok_or_else(|| {
        Rejection::field(field, format!("must be a Unix time in seconds, got {secs}"))
    })
}

/// The first 8 bytes of a digest in hex: a short, stable name for content.
pub fn hex_prefix(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 with nanoseconds, for `EventInput::occurred_at`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A producer's word (a Frigate label, a LoRaWAN event name) as one word of an event type:
/// lower case, `[a-z0-9_-]`, anything else `_`.
pub fn type_word(word: &str) -> String {
    let w: String = word
        .chars()
        .take(40)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if w.is_empty() { "unknown".into() } else { w }
}

/// A producer's name as a measurement name (`[A-Za-z0-9._:-]`, at most 64 characters), or
/// `None` when nothing usable is left.
pub fn measurement_name(name: &str) -> Option<String> {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else if c == '/' {
                '.'
            } else {
                '_'
            }
        })
        .collect();
    (!n.is_empty() && n.len() <= 64).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_are_checked() {
        let t = unix_time("t", 1_764_081_123.512_034).expect("valid");
        assert_eq!(rfc3339(t), "2025-11-25T14:32:03.512034000Z");
        assert!(unix_time("t", -1.0).is_err());
        assert!(unix_time("t", 1e300).is_err());
        assert_eq!(
            unix_time("after.start_time", f64::NAN).expect_err("nan").0,
            "after.start_time: must be a Unix time in seconds, got NaN"
        );
    }

    #[test]
    fn producer_words_become_type_words_and_measurement_names() {
        assert_eq!(type_word("License Plate"), "license_plate");
        assert_eq!(type_word(""), "unknown");
        assert_eq!(
            measurement_name("waterLevelCm").as_deref(),
            Some("waterLevelCm")
        );
        assert_eq!(
            measurement_name("3303/0/5700").as_deref(),
            Some("3303.0.5700")
        );
        assert_eq!(measurement_name("pm 2.5").as_deref(), Some("pm_2.5"));
        assert_eq!(measurement_name(&"x".repeat(65)), None);
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(topic_matches("occ/v1/events/cam-1", "occ/v1/events/+"));
        assert!(!topic_matches("occ/v1/events/cam-1/x", "occ/v1/events/+"));
        assert!(topic_matches(
            "frigate/cam/status/detect",
            "frigate/+/status/+"
        ));
        assert!(topic_matches("a/b/c", "a/#"));
        assert!(topic_matches("a", "a/#"));
        assert!(!topic_matches("b/c", "a/#"));
        assert!(!topic_matches("occ/v1/events", "occ/v1/events/+"));
    }

    #[test]
    fn templates_give_filters_and_captures() {
        let t = TopicTemplate::parse(
            "application/{application_id}/device/{dev_eui}/event/{event}",
            &["dev_eui", "event"],
        )
        .expect("valid");
        assert_eq!(t.filter(), "application/+/device/+/event/+");
        let c = t
            .captures("application/9b2e/device/a84041000181c0a7/event/up")
            .expect("fits");
        assert_eq!(c["dev_eui"], "a84041000181c0a7");
        assert_eq!(c["event"], "up");
        assert!(t.captures("application/9b2e/device/x/event").is_none());
        assert!(TopicTemplate::parse("occ/v1/events/{source_id}", &["dev_eui"]).is_err());
        assert!(TopicTemplate::parse("occ/+/{source_id}", &[]).is_err());
        assert!(TopicTemplate::parse("occ/x{source_id}", &[]).is_err());
    }

    #[test]
    fn json_errors_speak_json() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct After {
            current_zones: Vec<String>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Msg {
            after: After,
        }
        let err = from_json::<Msg>(br#"{"after": {"current_zones": "park"}}"#, "message")
            .expect_err("wrong type");
        assert_eq!(
            err.0,
            "after.current_zones: expected an array, got string \"park\""
        );
        let err = from_json::<Msg>(b"{", "message").expect_err("syntax");
        assert!(err.0.starts_with("invalid JSON message: "), "{err}");
    }
}
