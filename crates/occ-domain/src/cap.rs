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

/// The message's identifier: the incident's number for the first alert, and the number with
/// the time of the change for every later one.
fn identifier(i: &Incident) -> String {
    if i.updated_at == i.created_at {
        i.number.to_string()
    } else {
        format!("{}-{}", i.number, i.updated_at.format("%Y%m%dT%H%M%S%6f"))
    }
}

/// The alert for `incident` as it is now. `polygons` are the zone's outer rings as
/// `(lat, lon)` points, closed.
pub fn alert(incident: &Incident, polygons: &[Vec<(f64, f64)>], sender: &CapSender) -> String {
    let i = incident;
    let (cap_category, event) = category(i.category.as_str());
    let first = i.updated_at == i.created_at;
    let msg_type = match i.status {
        IncidentStatus::Dismissed => "Cancel",
        _ if first => "Alert",
        _ => "Update",
    };
    let sent = if first { i.created_at } else { i.updated_at };
    let mut x = String::with_capacity(2048);
    let _ = write!(
        x,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <alert xmlns=\"urn:oasis:names:tc:emergency:cap:1.2\">\n\
         <identifier>{}</identifier>\n<sender>{}</sender>\n<sent>{}</sent>\n\
         <status>Actual</status>\n<msgType>{msg_type}</msgType>\n<source>OCC</source>\n\
         <scope>Restricted</scope>\n\
         <restriction>Operational control center and responding agencies only</restriction>\n",
        escape(&identifier(i)),
        escape(&sender.sender),
        time(sent, sender.offset),
    );
    if msg_type != "Alert" {
        let _ = writeln!(
            x,
            "<references>{},{},{}</references>",
            escape(&sender.sender),
            escape(i.number.as_str()),
            time(i.created_at, sender.offset)
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
