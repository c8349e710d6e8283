//! Proto ⇄ domain mapping. Input is parsed into domain types here, at the edge; every field
//! error carries the path of the proto field it came from.

use chrono::TimeDelta;
use chrono::{DateTime, Utc};
use occ_domain::{
    ClaimInfo, Comparison, FieldError, FieldErrors, Incident, IncidentId, IncidentStatus, Priority,
    Rule, RuleInput, Severity, SourceId, ThresholdInput, UnitStatus,
};
use occ_domain::{EventInput, Evidence, EvidenceKind, LocationInput};
use occ_proto::v1 as pb;
use occ_store::changes::{ChangeKind, StoredChange};
use occ_store::events::StoredEvent;
use occ_store::timeline::StoredAudit;
use occ_store::units::Unit;
use prost_types::value::Kind;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, FieldError> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| FieldError::new(field, "is not a valid timestamp"))
}

pub fn priority(p: Priority) -> i32 {
    (match p {
        Priority::P1 => pb::Priority::P1,
        Priority::P2 => pb::Priority::P2,
        Priority::P3 => pb::Priority::P3,
        Priority::P4 => pb::Priority::P4,
    }) as i32
}

/// A priority from the API; `None` for PRIORITY_UNSPECIFIED.
pub fn parse_priority(field: &str, v: i32) -> Result<Option<Priority>, FieldError> {
    match pb::Priority::try_from(v) {
        Ok(pb::Priority::Unspecified) => Ok(None),
        Ok(pb::Priority::P1) => Ok(Some(Priority::P1)),
        Ok(pb::Priority::P2) => Ok(Some(Priority::P2)),
        Ok(pb::Priority::P3) => Ok(Some(Priority::P3)),
        Ok(pb::Priority::P4) => Ok(Some(Priority::P4)),
        Err(_) => Err(FieldError::new(field, format!("unknown priority {v}"))),
    }
}

pub fn status(s: IncidentStatus) -> i32 {
    use pb::IncidentStatus as P;
    (match s {
        IncidentStatus::New => P::New,
        IncidentStatus::Queued => P::Queued,
        IncidentStatus::Claimed => P::Claimed,
        IncidentStatus::Dispatched => P::Dispatched,
        IncidentStatus::EnRoute => P::EnRoute,
        IncidentStatus::OnScene => P::OnScene,
        IncidentStatus::Resolved => P::Resolved,
        IncidentStatus::Closed => P::Closed,
        IncidentStatus::Dismissed => P::Dismissed,
    }) as i32
}

pub fn parse_status(field: &str, v: i32) -> Result<IncidentStatus, FieldError> {
    IncidentStatus::ALL
        .into_iter()
        .find(|s| status(*s) == v)
        .ok_or_else(|| {
            FieldError::new(
                field,
                format!("must be a specified incident status, got {v}"),
            )
        })
}

fn severity(s: Severity) -> i32 {
    (match s {
        Severity::Info => pb::Severity::Info,
        Severity::Minor => pb::Severity::Minor,
        Severity::Major => pb::Severity::Major,
        Severity::Critical => pb::Severity::Critical,
    }) as i32
}

fn parse_severity(field: &str, v: i32) -> Result<Option<Severity>, FieldError> {
    match pb::Severity::try_from(v) {
        Ok(pb::Severity::Unspecified) => Ok(None),
        Ok(pb::Severity::Info) => Ok(Some(Severity::Info)),
        Ok(pb::Severity::Minor) => Ok(Some(Severity::Minor)),
        Ok(pb::Severity::Major) => Ok(Some(Severity::Major)),
        Ok(pb::Severity::Critical) => Ok(Some(Severity::Critical)),
        Err(_) => Err(FieldError::new(field, format!("unknown severity {v}"))),
    }
}

pub fn json_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object from a `Struct`; numbers must be finite (JSON has no NaN).
pub fn struct_to_json(
    field: &str,
    s: &prost_types::Struct,
) -> Result<serde_json::Map<String, serde_json::Value>, FieldError> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), value_to_json(&format!("{field}.{k}"), v)?)))
        .collect()
}

fn value_to_json(field: &str, v: &prost_types::Value) -> Result<serde_json::Value, FieldError> {
    use serde_json::Value as J;
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(J::Number)
            .ok_or_else(|| FieldError::new(field, "must be a finite number"))?,
        Some(Kind::StringValue(s)) => J::String(s.clone()),
        Some(Kind::ListValue(l)) => J::Array(
            l.values
                .iter()
                .enumerate()
                .map(|(i, v)| value_to_json(&format!("{field}[{i}]"), v))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => J::Object(struct_to_json(field, s)?),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// The source and the unchecked input of a published event. Fields that cannot even be
/// represented as input (an unknown enum value, a bad timestamp) are reported here; the rest
/// is checked by `Event::parse`.
pub fn event_input(e: &pb::Event) -> Result<(SourceId, EventInput), FieldErrors> {
    let mut errors = Vec::new();
    let source = if e.source_id.is_empty() {
        errors.push(FieldError::new("source_id", "is required"));
        None
    } else {
        SourceId::parse(&e.source_id)
            .map_err(|err| errors.push(err))
            .ok()
    };
    let severity = parse_severity("severity", e.severity)
        .map_err(|err| errors.push(err))
        .ok()
        .flatten();
    let occurred_at = e.occurred_at.as_ref().and_then(|t| {
        from_timestamp("occurred_at", t)
            .map_err(|err| errors.push(err))
            .ok()
    });
    let attributes = e
        .attributes
        .as_ref()
        .map(|s| struct_to_json("attributes", s))
        .transpose()
        .map_err(|err| errors.push(err))
        .ok()
        .flatten()
        .unwrap_or_default();
    let evidence = e
        .evidence
        .iter()
        .enumerate()
        .filter_map(|(i, x)| {
            let kind = match pb::EvidenceKind::try_from(x.kind) {
                Ok(pb::EvidenceKind::Snapshot) => EvidenceKind::Snapshot,
                Ok(pb::EvidenceKind::Clip) => EvidenceKind::Clip,
                Ok(pb::EvidenceKind::Thumbnail) => EvidenceKind::Thumbnail,
                _ => {
                    errors.push(FieldError::new(
                        format!("evidence[{i}].kind"),
                        "must be a specified evidence kind",
                    ));
                    return None;
                }
            };
            Some(Evidence {
                kind,
                reference: x.reference.clone(),
                url: non_empty(&x.url),
            })
        })
        .collect();
    let input = EventInput {
        id: non_empty(&e.external_id),
        event_type: (!e.r#type.is_empty()).then(|| e.r#type.clone()),
        severity: severity.map(|s| s.as_str().to_owned()),
        occurred_at: occurred_at.map(|t| t.to_rfc3339()),
        location: e.location.as_ref().map(|l| LocationInput {
            lat: l.lat,
            lon: l.lon,
        }),
        zone: non_empty(&e.zone),
        extra_zones: e.extra_zones.clone(),
        district: non_empty(&e.district),
        confidence: e.confidence,
        source_kind: non_empty(&e.source_kind),
        measurements: e.measurements.clone(),
        attributes,
        evidence,
        revision: None,
    };
    match (source, FieldErrors::from_vec(errors)) {
        (Some(source), None) => Ok((source, input)),
        (_, Some(errors)) => Err(errors),
        (None, None) => Err(FieldErrors::one("source_id", "is required")),
    }
}

pub fn incident(i: &Incident) -> pb::Incident {
    pb::Incident {
        id: i.id.to_string(),
        number: i.number.to_string(),
        category: i.category.to_string(),
        queue: i.queue.to_string(),
        priority: priority(i.priority),
        status: status(i.status),
        title: i.title.clone(),
        location: i.location.map(|l| pb::GeoPoint {
            lat: l.lat(),
            lon: l.lon(),
        }),
        zone: i.zone.as_ref().map(ToString::to_string).unwrap_or_default(),
        event_count: i.event_count,
        first_seen: Some(timestamp(i.first_seen)),
        last_seen: Some(timestamp(i.last_seen)),
        create_time: Some(timestamp(i.created_at)),
        update_time: Some(timestamp(i.updated_at)),
        rule_name: i.rule_name.clone(),
        correlation_key: i.correlation_key.clone(),
        correlating: i.correlating,
        escalated: i.escalated_at.is_some(),
        escalate_time: i.escalated_at.map(timestamp),
        claim_deadline: i.claim_deadline.map(timestamp),
        acknowledged_by: i.acknowledged_by.clone().unwrap_or_default(),
        acknowledge_time: i.acknowledged_at.map(timestamp),
        // Who holds it and until when; the claim's id goes to its holder only.
        claim: i.claim.as_ref().map(|c| pb::Claim {
            id: String::new(),
            ..claim(i.id, c)
        }),
    }
}

pub fn claim(incident: IncidentId, c: &ClaimInfo) -> pb::Claim {
    pb::Claim {
        id: c.id.to_string(),
        incident_id: incident.to_string(),
        holder: c.holder.clone(),
        claim_time: Some(timestamp(c.claimed_at)),
        lease_expire_time: Some(timestamp(c.lease_until)),
    }
}

pub fn duration(d: TimeDelta) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

/// A duration in whole seconds.
pub fn whole_seconds(field: &str, d: &prost_types::Duration) -> Result<i64, FieldError> {
    if d.nanos != 0 || d.seconds < 0 {
        return Err(FieldError::new(
            field,
            "must be a whole, non-negative number of seconds",
        ));
    }
    Ok(d.seconds)
}

pub fn unit_status(s: UnitStatus) -> i32 {
    use pb::UnitStatus as P;
    (match s {
        UnitStatus::Available => P::Available,
        UnitStatus::Dispatched => P::Dispatched,
        UnitStatus::EnRoute => P::EnRoute,
        UnitStatus::OnScene => P::OnScene,
        UnitStatus::OutOfService => P::OutOfService,
    }) as i32
}

pub fn parse_unit_status(field: &str, v: i32) -> Result<UnitStatus, FieldError> {
    UnitStatus::ALL
        .into_iter()
        .find(|s| unit_status(*s) == v)
        .ok_or_else(|| FieldError::new(field, format!("must be a specified unit status, got {v}")))
}

pub fn unit(u: &Unit) -> pb::Unit {
    pb::Unit {
        id: u.id.to_string(),
        call_sign: u.call_sign.clone(),
        agency: u.agency.clone(),
        home_station: u.home_station.clone(),
        status: unit_status(u.status),
        incident_id: u.incident.map(|i| i.to_string()).unwrap_or_default(),
        location: u.location.map(|l| pb::GeoPoint {
            lat: l.lat(),
            lon: l.lon(),
        }),
        location_time: u.location_at.map(timestamp),
        update_time: Some(timestamp(u.updated_at)),
    }
}

pub fn change_kind(k: ChangeKind) -> i32 {
    use pb::ChangeKind as P;
    (match k {
        ChangeKind::Opened => P::Opened,
        ChangeKind::Updated => P::Updated,
        ChangeKind::Claimed => P::Claimed,
        ChangeKind::ClaimExtended => P::ClaimExtended,
        ChangeKind::Released => P::Released,
        ChangeKind::ClaimExpired => P::ClaimExpired,
        ChangeKind::Dispatched => P::Dispatched,
        ChangeKind::StatusChanged => P::StatusChanged,
        ChangeKind::Escalated => P::Escalated,
        ChangeKind::Transferred => P::Transferred,
        ChangeKind::Acknowledged => P::Acknowledged,
        ChangeKind::NoteAdded => P::NoteAdded,
    }) as i32
}

pub fn change(c: &StoredChange) -> pb::IncidentChange {
    pb::IncidentChange {
        sequence: c.seq,
        kind: change_kind(c.kind),
        incident: Some(incident(&c.incident)),
        time: Some(timestamp(c.at)),
        actor: c.actor.clone(),
        detail: c.detail.clone(),
    }
}

pub fn stored_event(e: &StoredEvent) -> pb::Event {
    let measurements = match &e.measurements {
        serde_json::Value::Object(m) => m
            .iter()
            .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
            .collect(),
        _ => Default::default(),
    };
    let attributes = match &e.attributes {
        serde_json::Value::Object(m) => Some(json_to_struct(m)),
        _ => None,
    };
    pb::Event {
        id: e.id.to_string(),
        source_id: e.source_id.clone(),
        external_id: e.external_id.clone().unwrap_or_default(),
        r#type: e.event_type.clone(),
        severity: e
            .severity
            .as_deref()
            .and_then(|s| Severity::parse("severity", s).ok())
            .map_or(0, severity),
        occurred_at: Some(timestamp(e.occurred_at)),
        received_at: Some(timestamp(e.received_at)),
        location: e.lat.zip(e.lon).map(|(lat, lon)| pb::GeoPoint { lat, lon }),
        zone: e.zone.clone().unwrap_or_default(),
        confidence: e.confidence,
        source_kind: e.source_kind.clone().unwrap_or_default(),
        measurements,
        attributes,
        district: e.district.clone().unwrap_or_default(),
        extra_zones: e.extra_zones.clone(),
        evidence: e.evidence.iter().map(evidence).collect(),
        revisions: e.revisions,
        revise_time: e.revised_at.map(timestamp),
    }
}

pub fn evidence(x: &Evidence) -> pb::Evidence {
    pb::Evidence {
        kind: (match x.kind {
            EvidenceKind::Snapshot => pb::EvidenceKind::Snapshot,
            EvidenceKind::Clip => pb::EvidenceKind::Clip,
            EvidenceKind::Thumbnail => pb::EvidenceKind::Thumbnail,
        }) as i32,
        reference: x.reference.clone(),
        url: x.url.clone().unwrap_or_default(),
    }
}

fn json_object(v: &Option<serde_json::Value>) -> Option<prost_types::Struct> {
    match v {
        Some(serde_json::Value::Object(m)) => Some(json_to_struct(m)),
        _ => None,
    }
}

pub fn audit(a: &StoredAudit) -> pb::AuditEntry {
    pb::AuditEntry {
        actor: a.actor.clone(),
        action: a.action.clone(),
        before: json_object(&a.before),
        after: json_object(&a.after),
        detail: a.detail.clone(),
    }
}

/// An audit entry as `reader` may see it: a claim's id is its holder's proof, so only the
/// principal that made the entry sees it.
pub fn audit_for(a: &StoredAudit, reader: &str) -> pb::AuditEntry {
    let mut entry = audit(a);
    if a.actor != reader
        && a.action.starts_with("incident.claim")
        && entry.detail.starts_with("claim ")
    {
        entry.detail = "claim".into();
    }
    entry
}

fn comparison(c: Comparison) -> i32 {
    (match c {
        Comparison::Gt => pb::Comparison::GreaterThan,
        Comparison::Gte => pb::Comparison::GreaterOrEqual,
        Comparison::Lt => pb::Comparison::LessThan,
        Comparison::Lte => pb::Comparison::LessOrEqual,
    }) as i32
}

fn parse_comparison(field: &str, v: i32) -> Result<&'static str, FieldError> {
    match pb::Comparison::try_from(v) {
        Ok(pb::Comparison::GreaterThan) => Ok(">"),
        Ok(pb::Comparison::GreaterOrEqual) => Ok(">="),
        Ok(pb::Comparison::LessThan) => Ok("<"),
        Ok(pb::Comparison::LessOrEqual) => Ok("<="),
        _ => Err(FieldError::new(field, "must be a specified comparison")),
    }
}

pub fn rule(r: &Rule) -> pb::Rule {
    let m = &r.matcher;
    let a = &r.action;
    pb::Rule {
        id: r.id.to_string(),
        name: r.name.to_string(),
        description: r.description.clone(),
        enabled: r.enabled,
        condition: Some(pb::RuleCondition {
            event_types: m.event_types.iter().map(ToString::to_string).collect(),
            source_kinds: m.source_kinds.iter().map(ToString::to_string).collect(),
            zones: m.zones.iter().map(ToString::to_string).collect(),
            districts: m.districts.iter().map(ToString::to_string).collect(),
            min_confidence: m.min_confidence.map(|c| c.value()),
            min_severity: m.min_severity.map_or(0, severity),
            thresholds: m
                .thresholds
                .iter()
                .map(|t| pb::Threshold {
                    measurement: t.measurement.clone(),
                    comparison: comparison(t.comparison),
                    value: t.value,
                })
                .collect(),
            attributes: Some(json_to_struct(&m.attributes.clone().into_iter().collect())),
        }),
        action: Some(pb::RuleAction {
            category: a.category.to_string(),
            queue: a.queue.to_string(),
            priority: priority(a.priority),
            title_template: a.title.as_str().to_owned(),
            correlation_fields: a.correlation_fields.iter().map(|f| f.name()).collect(),
            correlation_window: Some(duration(a.correlation_window)),
            claim_within: a.claim_within.map(duration),
        }),
        update_time: Some(timestamp(r.updated_at)),
    }
}

/// Where a `RuleInput` field lives in the `Rule` message.
pub fn rule_field_path(field: &str) -> String {
    let root = field.split(['[', '.']).next().unwrap_or(field);
    let section = match root {
        "event_types" | "source_kinds" | "zones" | "districts" | "min_confidence"
        | "min_severity" | "thresholds" | "attributes" => "condition.",
        "category" | "queue" | "priority" | "title_template" | "correlation_fields"
        | "correlation_window" | "claim_within" => "action.",
        _ => "",
    };
    format!("{section}{field}")
}

/// The unchecked input of a rule from the API. Checking is the domain's (`Rule::parse`).
pub fn rule_input(r: &pb::Rule) -> Result<RuleInput, FieldErrors> {
    let mut errors: Vec<FieldError> = Vec::new();
    let empty_condition = pb::RuleCondition::default();
    let condition = r.condition.as_ref().unwrap_or_else(|| {
        errors.push(FieldError::new("condition", "is required"));
        &empty_condition
    });
    let empty_action = pb::RuleAction::default();
    let action = r.action.as_ref().unwrap_or_else(|| {
        errors.push(FieldError::new("action", "is required"));
        &empty_action
    });
    let min_severity = parse_severity("condition.min_severity", condition.min_severity)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    let thresholds = condition
        .thresholds
        .iter()
        .enumerate()
        .map(|(i, t)| ThresholdInput {
            measurement: t.measurement.clone(),
            comparison: parse_comparison(
                &format!("condition.thresholds[{i}].comparison"),
                t.comparison,
            )
            .map_err(|e| errors.push(e))
            .unwrap_or(">")
            .to_owned(),
            value: t.value,
        })
        .collect();
    let attributes = condition
        .attributes
        .as_ref()
        .map(|s| struct_to_json("condition.attributes", s))
        .transpose()
        .map_err(|e| errors.push(e))
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let priority = match parse_priority("action.priority", action.priority) {
        Ok(Some(p)) => p.level(),
        Ok(None) => {
            errors.push(FieldError::new("action.priority", "is required"));
            0
        }
        Err(e) => {
            errors.push(e);
            0
        }
    };
    let window = action
        .correlation_window
        .as_ref()
        .map(|d| whole_seconds("action.correlation_window", d))
        .transpose()
        .map_err(|e| errors.push(e))
        .ok()
        .flatten()
        .unwrap_or(0);
    let claim_within = action
        .claim_within
        .as_ref()
        .map(|d| whole_seconds("action.claim_within", d))
        .transpose()
        .map_err(|e| errors.push(e))
        .ok()
        .flatten();
    let input = RuleInput {
        name: r.name.clone(),
        description: r.description.clone(),
        enabled: r.enabled,
        event_types: condition.event_types.clone(),
        source_kinds: condition.source_kinds.clone(),
        zones: condition.zones.clone(),
        districts: condition.districts.clone(),
        min_confidence: condition.min_confidence,
        min_severity: min_severity.map(|s| s.as_str().to_owned()),
        thresholds,
        attributes,
        category: action.category.clone(),
        queue: action.queue.clone(),
        priority,
        title_template: action.title_template.clone(),
        correlation_fields: action.correlation_fields.clone(),
        correlation_window_seconds: window,
        claim_within_seconds: claim_within,
    };
    match FieldErrors::from_vec(errors) {
        None => Ok(input),
        Some(e) => Err(e),
    }
}
