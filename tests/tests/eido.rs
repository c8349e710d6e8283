//! EIDO out: incidents as NENA EIDO 1.0 JSON objects, valid against the EIDO schema (NENA's
//! OpenAPI document converted to JSON Schema, in tests/fixtures/eido), and `GetIncidentEido`
//! over the API.

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::{
    Category, GeoPoint, Incident, IncidentId, IncidentNumber, IncidentStatus, Priority, QueueName,
    Zone,
};
use occ_proto::v1 as pb;
use occ_tests::{Broker, Occ, database_url, serve_args, workspace_root};
use serde_json::Value;
use sqlx::PgPool;

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("tests/fixtures/eido/eido-1.0.schema.json"))
            .expect("schema"),
    )
    .expect("JSON");
    jsonschema::draft7::new(&schema).expect("the EIDO schema compiles")
}

fn check(validator: &jsonschema::Validator, eido: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(eido)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "not a valid EIDO: {errors:#?}\n{eido:#}");
}

fn incident(location: bool, zone: bool) -> Incident {
    let t: DateTime<Utc> = "2026-11-29T08:15:30.123456Z".parse().expect("time");
    Incident {
        id: IncidentId(uuid::Uuid::now_v7()),
        number: IncidentNumber::new(t, 42),
        category: Category::parse("panic_alarm").expect("category"),
        queue: QueueName::parse("queue", "police").expect("queue"),
        priority: Priority::P2,
        status: IncidentStatus::Dispatched,
        title: "Panic button at \"stop 3\" & <kiosk>".into(),
        location: location.then(|| GeoPoint::new(51.128, 71.43).expect("point")),
        zone: zone.then(|| Zone::parse("esil_transit_stop_3", 128).expect("zone")),
        correlation_key: "k".into(),
        correlating: true,
        rule_id: None,
        rule_name: "panic-button".into(),
        first_seen: t,
        last_seen: t,
        event_count: 1,
        created_at: t,
        updated_at: t + TimeDelta::minutes(2),
        claim_within: TimeDelta::seconds(60),
        claim_deadline: None,
        escalated_at: None,
        acknowledged_at: None,
        acknowledged_by: None,
        claim: None,
    }
}

#[test]
fn incidents_are_valid_eido_objects() {
    let validator = validator();
    for (location, zone) in [(true, true), (true, false), (false, true), (false, false)] {
        let eido =
            occ_domain::eido::incident(&incident(location, zone), "occ.astana.example", "police");
        check(&validator, &eido);
        assert_eq!(eido["eidoVersion"], "1.0");
        assert_eq!(
            eido["incidentComponent"]["internalIncidentId"],
            "INC-2026-000042"
        );
        assert_eq!(eido["agencyComponent"][0]["agencyType"][0], "police");
        assert_eq!(eido.get("locationComponent").is_some(), location || zone);
    }
    // The check itself catches a broken object.
    let mut broken =
        occ_domain::eido::incident(&incident(true, true), "occ.astana.example", "police");
    broken["incidentComponent"]
        .as_object_mut()
        .expect("object")
        .remove("incidentTypeCommonRegistryText");
    assert!(!validator.is_valid(&broken));
}

#[sqlx::test(migrations = false)]
async fn get_incident_eido_answers_a_live_incident(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-eido",
        &[],
    ))
    .await
    .expect("OCC starts");
    let number = occ_tests::press_panic_button(&occ.grpc).await;
    let eido: Value = serde_json::from_str(
        &occ_tests::incidents(&occ.grpc)
            .await
            .get_incident_eido(pb::GetIncidentEidoRequest { id: number.clone() })
            .await
            .expect("GetIncidentEido")
            .into_inner()
            .eido,
    )
    .expect("JSON");
    check(&validator(), &eido);
    assert_eq!(
        eido["incidentComponent"]["internalIncidentId"],
        number.as_str()
    );
    assert_eq!(eido["agencyComponent"][0]["agencyType"][0], "police");
    occ.stop().await.expect("stop");
}
