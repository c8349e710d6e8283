//! An incident as a NENA Emergency Incident Data Object (EIDO, NENA-STA-021, version 1.0), the
//! JSON one computer-aided dispatch system sends another: the incident, the agency that owns it
//! and where it is (a PIDF-LO point).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::cap;
use crate::incident::Incident;

/// `2026-11-29T08:15:30.123456Z` (RFC 3339, as EIDO wants).
fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The EIDO for `incident`, issued by `issuer` (an id such as `occ.city.example`) on behalf of
/// `agency`, the agency that works the incident's queue.
pub fn incident(i: &Incident, issuer: &str, agency: &str) -> Value {
    let updated = time(i.updated_at);
    let agency_id = format!("urn:occ:agency:{agency}:{issuer}");
    let prologue = |id: String| {
        json!({
            "$id": id,
            "lastUpdateTimeStamp": updated,
            "updatedByAgencyReference": {"$ref": agency_id},
        })
    };
    let with = |mut base: Value, more: Value| {
        if let (Some(b), Value::Object(m)) = (base.as_object_mut(), more) {
            b.extend(m);
        }
        base
    };
    let incident_id = format!("urn:emergency:uid:incidentid:{}:{issuer}", i.id);
    let location_id = format!("urn:occ:location:{}", i.id);
    let (_, event) = cap::category(i.category.as_str());
    let mut incident = with(
        prologue(incident_id.clone()),
        json!({
            "incidentTypeCommonRegistryText": event,
            "incidentTypeInternalCode": i.category.as_str(),
            "incidentTypeInternalText": i.title,
            "incidentStatusInternalText": [i.status.as_str()],
            "internalIncidentId": i.number.as_str(),
            "incidentPriorityInternalText": i.priority.to_string(),
            "beatOrDispatchGroupText": i.queue.as_str(),
        }),
    );
    let mut locations = Vec::new();
    if i.location.is_some() || i.zone.is_some() {
        incident["locationReference"] = json!([{"$ref": location_id}]);
        let mut location = with(
            prologue(location_id),
            json!({"locationTypeDescriptionRegistryText": "Incident"}),
        );
        if let Some(zone) = &i.zone {
            location["locationDescriptionText"] = json!(zone.as_str());
        }
        if let Some(p) = i.location {
            location["locationByValue"] = json!(format!(
                "<presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
                 xmlns:gp=\"urn:ietf:params:xml:ns:pidf:geopriv10\" \
                 xmlns:gml=\"http://www.opengis.net/gml\" entity=\"pres:{issuer}\">\
                 <tuple id=\"location\"><status><gp:geopriv><gp:location-info>\
                 <gml:Point srsName=\"urn:ogc:def:crs:EPSG::4326\"><gml:pos>{:.6} {:.6}</gml:pos>\
                 </gml:Point></gp:location-info><gp:usage-rules/></gp:geopriv></status>\
                 </tuple></presence>",
                p.lat(),
                p.lon()
            ));
        }
        locations.push(location);
    }
    let mut eido = with(
        prologue(incident_id),
        json!({
            "eidoVersion": "1.0",
            "issuingElementIdentification": issuer,
            "incidentComponent": incident,
            "agencyComponent": [with(prologue(agency_id.clone()), json!({
                "agencyRoleDescriptionRegistryText": ["Dispatch"],
                "agencyType": [agency],
                "incidentOwningAgencyIndicator": true,
            }))],
        }),
    );
    if !locations.is_empty() {
        eido["locationComponent"] = Value::Array(locations);
    }
    eido
}
