//! An incident as an OASIS Common Alerting Protocol 1.2 alert, for the city's public-warning
//! system and other agencies' systems that speak CAP.
//!
//! What maps how: the category from the incident's (fire → Fire, a panic alarm → Security…);
//! urgency from priority while the incident is open, Past once it is over; severity from
//! priority; certainty Likely while sensors alone say so, Observed once a crew is on scene,
//! Unlikely for a dismissed alarm. The first alert is an `Alert`; once the incident has changed
//! it is an `Update`, and a dismissed (false) alarm a `Cancel`, each referencing the first.
//! Times carry the configured offset, never `Z` (CAP forbids it). The area is the zone's
//! polygons when the zone is known, and a circle around the incident's position.
//! Incidents hold personal and police data: alerts are `Restricted` to responding agencies.

use std::fmt::Write;

use chrono::{DateTime, FixedOffset, Utc};

use crate::incident::{Incident, IncidentStatus, Priority};

/// What every alert says about its sender.
#[derive(Debug, Clone, PartialEq)]
pub struct CapSender {
    /// The sender's id (`occ@city.example`): no spaces, commas or `<&`.
    pub sender: String,
    pub sender_name: String,
    /// The offset times are written in (the city's).
    pub offset: FixedOffset,
    /// The radius of the circle around an incident's position, in km.
    pub radius_km: f64,
}

/// The CAP category (and the event's wording) of an incident category.
pub fn category(category: &str) -> (&'static str, &'static str) {
    match category {
        "fire" => ("Fire", "Fire"),
        "gas_leak" => ("Fire", "Gas leak"),
        "panic_alarm" => ("Security", "Panic alarm"),
        "shots_fired" => ("Security", "Shots fired"),
        "intrusion" => ("Security", "Intrusion"),
        "watchlisted_vehicle" => ("Security", "Watch-listed vehicle"),
        "flood" => ("Met", "Flood"),
        "air_quality" => ("Env", "Air pollution"),
        "medical" => ("Health", "Medical emergency"),
        "device_offline" => ("Infra", "Device offline"),
        "maintenance" => ("Infra", "Device maintenance"),
        _ => ("Other", "Incident"),
    }
}

fn over(status: IncidentStatus) -> bool {
    matches!(
        status,
        IncidentStatus::Resolved | IncidentStatus::Closed | IncidentStatus::Dismissed
    )
}

fn urgency(i: &Incident) -> &'static str {
    if over(i.status) {
        return "Past";
    }
    match i.priority {
        Priority::P1 | Priority::P2 => "Immediate",
        Priority::P3 => "Expected",
        Priority::P4 => "Future",
    }
}

fn severity(p: Priority) -> &'static str {
    match p {
        Priority::P1 => "Extreme",
        Priority::P2 => "Severe",
        Priority::P3 => "Moderate",
        Priority::P4 => "Minor",
    }
}

fn certainty(i: &Incident) -> &'static str {
    match i.status {
        IncidentStatus::Dismissed => "Unlikely",
        IncidentStatus::OnScene | IncidentStatus::Resolved | IncidentStatus::Closed => "Observed",
        _ => "Likely",
    }
}

/// `2026-11-30T14:05:09+05:00`: seconds, an offset, never `Z` (UTC is `-00:00`, as CAP says).
pub fn time(t: DateTime<Utc>, offset: FixedOffset) -> String {
    let local = t
        .with_timezone(&offset)
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string();
    match local.strip_suffix("+00:00") {
        Some(utc) => format!("{utc}-00:00"),
        None => local,
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no place for other control characters.
            c if c.is_control() && !matches!(c, '\n' | '\t') => {}
            c => out.push(c),
        }
    }
    out
}

/// What kind of CAP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Alert,
    Update,
    Cancel,
}

impl MsgType {
    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::Alert => "Alert",
            MsgType::Update => "Update",
            MsgType::Cancel => "Cancel",
        }
    }
}

/// A message's envelope: which message it is, and the first one it follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub msg_type: MsgType,
    pub identifier: String,
    pub sent: DateTime<Utc>,
    /// The first alert about the incident (its identifier and when it was sent), which an
    /// `Update` or `Cancel` references.
    pub first: Option<(String, DateTime<Utc>)>,
}

impl Message {
    /// The message for `incident` as it is now, judged from its times alone: the first alert
    /// while it has not changed, an update (or a cancel for a dismissed alarm) after.
    pub fn of(incident: &Incident) -> Message {
        let i = incident;
        if i.updated_at == i.created_at && i.status != IncidentStatus::Dismissed {
            return Message::first(i);
        }
        Message::following(i, (i.number.to_string(), i.created_at))
    }

    /// The first alert about `incident`: its number, sent when it opened.
    fn first(i: &Incident) -> Message {
        Message {
            msg_type: MsgType::Alert,
            identifier: i.number.to_string(),
            sent: i.created_at,
            first: None,
        }
    }

    /// An update (a cancel for a dismissed alarm) following `first`, identified by the
    /// incident's number and the time it changed.
    fn following(i: &Incident, first: (String, DateTime<Utc>)) -> Message {
        Message {
            msg_type: if i.status == IncidentStatus::Dismissed {
                MsgType::Cancel
            } else {
                MsgType::Update
            },
            identifier: format!("{}-{}", i.number, i.updated_at.format("%Y%m%dT%H%M%S%6f")),
            sent: i.updated_at,
            first: Some(first),
        }
    }
}

/// What was last published about an incident.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The first alert's identifier and when it was sent.
    pub first: (String, DateTime<Utc>),
    /// What the last message said, in [`signature`] form.
    pub signature: String,
    /// The last message closed the matter (all clear or cancel): nothing follows it.
    pub ended: bool,
}

/// What a warning system shows of an alert: a new message is due when this changes.
/// Claims, dispatches and joined events that change none of it are not news to the public.
pub fn signature(i: &Incident) -> String {
    let place = i
        .location
        .map(|p| format!("{:.4},{:.4}", p.lat(), p.lon()))
        .unwrap_or_default();
    format!(
        "{}|{}|{}|{}|{}|{}",
        urgency(i),
        severity(i.priority),
        certainty(i),
        i.zone.as_ref().map(ToString::to_string).unwrap_or_default(),
        place,
        over(i.status),
    )
}

/// The message to publish about `incident` now, given what was published before, and what
/// is then on record as published; `None` when there is nothing new to say.
///
/// An incident is first announced while it is open (one over before anyone announced it is
/// not news); then an `Update` whenever its [`signature`] changes, the last one an all clear
/// when it is resolved, or a `Cancel` when it was a false alarm; after that, nothing.
pub fn next(incident: &Incident, before: Option<&Published>) -> Option<(Message, Published)> {
    let i = incident;
    let signature = signature(i);
    let ended = over(i.status);
    let message = match before {
        None if ended => return None,
        None => Message::first(i),
        Some(p) if p.ended || p.signature == signature => return None,
        Some(p) => Message::following(i, p.first.clone()),
    };
    let first = message
        .first
        .clone()
        .unwrap_or_else(|| (message.identifier.clone(), message.sent));
    Some((
        message,
        Published {
            first,
            signature,
            ended,
        },
    ))
}

/// The alert for `incident` as it is now. `polygons` are the zone's outer rings as
/// `(lat, lon)` points, closed.
pub fn alert(incident: &Incident, polygons: &[Vec<(f64, f64)>], sender: &CapSender) -> String {
    alert_as(incident, polygons, sender, &Message::of(incident))
}

/// The alert for `incident` in the envelope `message`.
pub fn alert_as(
    incident: &Incident,
    polygons: &[Vec<(f64, f64)>],
    sender: &CapSender,
    message: &Message,
) -> String {
    let i = incident;
    let (cap_category, event) = category(i.category.as_str());
    let msg_type = message.msg_type.as_str();
    let mut x = String::with_capacity(2048);
    let _ = write!(
        x,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <alert xmlns=\"urn:oasis:names:tc:emergency:cap:1.2\">\n\
         <identifier>{}</identifier>\n<sender>{}</sender>\n<sent>{}</sent>\n\
         <status>Actual</status>\n<msgType>{msg_type}</msgType>\n<source>OCC</source>\n\
         <scope>Restricted</scope>\n\
         <restriction>Operational control center and responding agencies only</restriction>\n",
        escape(&message.identifier),
        escape(&sender.sender),
        time(message.sent, sender.offset),
    );
    if let Some((identifier, sent)) = &message.first {
        let _ = writeln!(
            x,
            "<references>{},{},{}</references>",
            escape(&sender.sender),
            escape(identifier),
            time(*sent, sender.offset)
        );
    }
    let _ = writeln!(x, "<incidents>{}</incidents>", escape(i.number.as_str()));
    let _ = write!(
        x,
        "<info>\n<language>en-US</language>\n<category>{cap_category}</category>\n\
         <event>{event}</event>\n",
    );
    if over(i.status) && i.status != IncidentStatus::Dismissed {
        x.push_str("<responseType>AllClear</responseType>\n");
    }
    let headline: String = i.title.chars().take(160).collect();
    let _ = write!(
        x,
        "<urgency>{}</urgency>\n<severity>{}</severity>\n<certainty>{}</certainty>\n\
         <eventCode><valueName>urn:occ:category</valueName><value>{}</value></eventCode>\n\
         <effective>{}</effective>\n<onset>{}</onset>\n<senderName>{}</senderName>\n\
         <headline>{}</headline>\n\
         <description>{} · {} · {} · queue {} · {} events, first {}, last {}</description>\n",
        urgency(i),
        severity(i.priority),
        certainty(i),
        escape(i.category.as_str()),
        time(i.created_at, sender.offset),
        time(i.first_seen, sender.offset),
        escape(&sender.sender_name),
        escape(&headline),
        escape(i.number.as_str()),
        i.priority,
        i.status,
        escape(i.queue.as_str()),
        i.event_count,
        time(i.first_seen, sender.offset),
        time(i.last_seen, sender.offset),
    );
    for (name, value) in [
        ("occ:number", i.number.to_string()),
        ("occ:priority", i.priority.to_string()),
        ("occ:status", i.status.to_string()),
        ("occ:queue", i.queue.to_string()),
        ("occ:eventCount", i.event_count.to_string()),
    ] {
        let _ = writeln!(
            x,
            "<parameter><valueName>{name}</valueName><value>{}</value></parameter>",
            escape(&value)
        );
    }
    let rings: Vec<&Vec<(f64, f64)>> = polygons.iter().filter(|r| r.len() >= 4).collect();
    if !rings.is_empty() || i.location.is_some() {
        let area = i
            .zone
            .as_ref()
            .map_or_else(|| i.number.to_string(), ToString::to_string);
        let _ = writeln!(x, "<area>\n<areaDesc>{}</areaDesc>", escape(&area));
        for ring in rings {
            let points: Vec<String> = ring
                .iter()
                .map(|(lat, lon)| format!("{lat:.6},{lon:.6}"))
                .collect();
            let _ = writeln!(x, "<polygon>{}</polygon>", points.join(" "));
        }
        if let Some(p) = i.location {
            let _ = writeln!(
                x,
                "<circle>{:.6},{:.6} {}</circle>",
                p.lat(),
                p.lon(),
                sender.radius_km
            );
        }
        x.push_str("</area>\n");
    }
    x.push_str("</info>\n</alert>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{GeoPoint, Zone};
    use crate::incident::{IncidentId, IncidentNumber};
    use crate::rule::{Category, QueueName};

    fn fire() -> Incident {
        let opened = DateTime::<Utc>::from_timestamp(1_764_500_000, 0).expect("time");
        Incident {
            id: IncidentId::new(),
            number: IncidentNumber::new(opened, 7),
            category: Category::parse("fire").expect("category"),
            queue: QueueName::parse("queue", "fire").expect("queue"),
            priority: Priority::P2,
            status: IncidentStatus::Queued,
            title: "Smoke".into(),
            location: Some(GeoPoint::new(51.1, 71.4).expect("point")),
            zone: Some(Zone::parse("esil_residential_3", 64).expect("zone")),
            correlation_key: "k".into(),
            correlating: true,
            rule_id: None,
            rule_name: "fire-smoke".into(),
            first_seen: opened,
            last_seen: opened,
            event_count: 1,
            created_at: opened,
            updated_at: opened,
            claim_within: chrono::TimeDelta::minutes(2),
            claim_deadline: None,
            escalated_at: None,
            acknowledged_at: None,
            acknowledged_by: None,
            claim: None,
        }
    }

    /// `i` changed a second later by `change`.
    fn later(i: &Incident, change: impl FnOnce(&mut Incident)) -> Incident {
        let mut next = i.clone();
        next.updated_at += chrono::TimeDelta::seconds(1);
        change(&mut next);
        next
    }

    #[test]
    fn an_incident_is_announced_then_updated_only_when_what_the_public_sees_changes() {
        let opened = fire();
        let (alert, published) = next(&opened, None).expect("the first alert");
        assert_eq!(alert.msg_type, MsgType::Alert);
        assert_eq!(alert.identifier, opened.number.to_string());
        assert_eq!(alert.first, None);

        // More smoke readings and a claim: nothing a warning system shows has changed.
        let claimed = later(&opened, |i| {
            i.event_count = 5;
            i.status = IncidentStatus::Claimed;
        });
        assert_eq!(next(&claimed, Some(&published)), None);

        // Raised to P1: an update referencing the first alert.
        let raised = later(&claimed, |i| i.priority = Priority::P1);
        let (update, published) = next(&raised, Some(&published)).expect("an update");
        assert_eq!(update.msg_type, MsgType::Update);
        assert_eq!(
            update.first,
            Some((opened.number.to_string(), opened.created_at))
        );
        assert_ne!(update.identifier, alert.identifier);

        // Resolved: the all clear, and after it nothing more.
        let resolved = later(&raised, |i| i.status = IncidentStatus::Resolved);
        let (clear, published) = next(&resolved, Some(&published)).expect("an all clear");
        assert_eq!(clear.msg_type, MsgType::Update);
        assert!(published.ended);
        let xml = alert_as(&resolved, &[], &sender(), &clear);
        assert!(
            xml.contains("<responseType>AllClear</responseType>"),
            "{xml}"
        );
        let closed = later(&resolved, |i| i.status = IncidentStatus::Closed);
        assert_eq!(next(&closed, Some(&published)), None);
    }

    #[test]
    fn a_false_alarm_is_cancelled_and_one_never_announced_is_not_news() {
        let opened = fire();
        let (_, published) = next(&opened, None).expect("the first alert");
        let dismissed = later(&opened, |i| i.status = IncidentStatus::Dismissed);
        let (cancel, published) = next(&dismissed, Some(&published)).expect("a cancel");
        assert_eq!(cancel.msg_type, MsgType::Cancel);
        assert!(published.ended);
        let xml = alert_as(&dismissed, &[], &sender(), &cancel);
        assert!(
            xml.contains(&format!(
                "<references>occ@city.example,{},2025-11-30T15:53:20+05:00</references>",
                opened.number
            )),
            "{xml}"
        );
        // Dismissed before anyone announced it: nothing to say.
        assert_eq!(next(&dismissed, None), None);
    }

    fn sender() -> CapSender {
        CapSender {
            sender: "occ@city.example".into(),
            sender_name: "OCC".into(),
            offset: FixedOffset::east_opt(5 * 3600).expect("offset"),
            radius_km: 0.5,
        }
    }

    #[test]
    fn times_carry_an_offset_and_utc_is_minus_zero() {
        let t = DateTime::<Utc>::from_timestamp(1_764_500_000, 123_000_000).expect("time");
        let city = FixedOffset::east_opt(5 * 3600).expect("offset");
        assert_eq!(time(t, city), "2025-11-30T15:53:20+05:00");
        let utc = FixedOffset::east_opt(0).expect("offset");
        assert_eq!(time(t, utc), "2025-11-30T10:53:20-00:00");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("A&B <x> \"q\"\u{7}"),
            "A&amp;B &lt;x&gt; &quot;q&quot;"
        );
    }
}
