//! CAP 1.2 out: every incident category, in every stage of an incident's life, as an alert the
//! OASIS CAP 1.2 schema accepts (checked by xmllint against the schema in tests/fixtures), and
//! `GetIncidentCap` over the API for a real incident with its zone; alerts published on the
//! broker for the public-warning system, once each, by whichever instance is left.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use occ_domain::cap::{CapSender, alert};
use occ_domain::{
    Category, GeoPoint, Incident, IncidentId, IncidentNumber, IncidentStatus, Priority, QueueName,
    Zone,
};
use occ_proto::v1 as pb;
use occ_tests::{Broker, Occ, database_url, panic_button, serve_args, workspace_root};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sqlx::PgPool;
use tokio::sync::mpsc;

/// Validates `xml` against the CAP 1.2 schema; the error text if it does not validate.
fn validate(xml: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("occ-cap-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file: PathBuf = dir.join("alert.xml");
    std::fs::write(&file, xml).expect("write");
    let schema = workspace_root().join("tests/fixtures/cap/CAP-v1.2.xsd");
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(&schema)
        .arg(&file)
        .output()
        .expect("xmllint runs (package libxml2-utils; .ci/run installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn sender() -> CapSender {
    CapSender {
        sender: "occ@astana.example".into(),
        sender_name: "Astana operational control center".into(),
        offset: FixedOffset::east_opt(5 * 3600).expect("offset"),
        radius_km: 0.1,
    }
}

fn incident(category: &str, status: IncidentStatus, changed: bool) -> Incident {
    let t: DateTime<Utc> = "2026-11-29T08:15:30.123456Z".parse().expect("time");
    Incident {
        id: IncidentId(uuid::Uuid::now_v7()),
        number: IncidentNumber::new(t, 123),
        category: Category::parse(category).expect("category"),
        queue: QueueName::parse("queue", "police").expect("queue"),
        priority: Priority::P1,
        status,
        title: "Smoke & fire <3rd floor> at \"Kabanbay 3\"".into(),
        location: Some(GeoPoint::new(51.128, 71.43).expect("point")),
        zone: Some(Zone::parse("esil_residential_1", 128).expect("zone")),
        correlation_key: "k".into(),
        correlating: true,
        rule_id: None,
        rule_name: "fire-smoke".into(),
        first_seen: t,
        last_seen: t + TimeDelta::seconds(40),
        event_count: 3,
        created_at: t,
        updated_at: if changed {
            t + TimeDelta::minutes(3)
        } else {
            t
        },
        claim_within: TimeDelta::seconds(60),
        claim_deadline: None,
        escalated_at: None,
        acknowledged_at: None,
        acknowledged_by: None,
        claim: None,
    }
}

#[test]
fn every_category_at_every_stage_is_a_valid_cap_alert() {
    let zone = vec![vec![
        (51.12, 71.42),
        (51.12, 71.44),
        (51.14, 71.44),
        (51.14, 71.42),
        (51.12, 71.42),
    ]];
    let categories = [
        "fire",
        "gas_leak",
        "panic_alarm",
        "shots_fired",
        "intrusion",
        "watchlisted_vehicle",
        "flood",
        "air_quality",
        "medical",
        "device_offline",
        "maintenance",
        "something_new",
    ];
    let stages = [
        (IncidentStatus::Queued, false, "Alert"),
        (IncidentStatus::OnScene, true, "Update"),
        (IncidentStatus::Closed, true, "Update"),
        (IncidentStatus::Dismissed, true, "Cancel"),
    ];
    for category in categories {
        for (status, changed, msg_type) in stages {
            let i = incident(category, status, changed);
            let xml = alert(&i, &zone, &sender());
            if let Err(e) = validate(&xml) {
                panic!("{category} {status:?}: not valid CAP 1.2:\n{e}\n{xml}");
            }
            assert!(
                xml.contains(&format!("<msgType>{msg_type}</msgType>")),
                "{xml}"
            );
            assert!(
                xml.contains("<sent>2026-11-29T13:"),
                "local time, offset: {xml}"
            );
            assert_eq!(
                xml.contains("<references>occ@astana.example,INC-2026-000123,2026-11-29T13:15:30+05:00</references>"),
                msg_type != "Alert",
                "{xml}"
            );
        }
    }
    let fire = alert(
        &incident("fire", IncidentStatus::Queued, false),
        &zone,
        &sender(),
    );
    for expected in [
        "<category>Fire</category>",
        "<urgency>Immediate</urgency>",
        "<severity>Extreme</severity>",
        "<certainty>Likely</certainty>",
        "<polygon>51.120000,71.420000 51.120000,71.440000",
        "<circle>51.128000,71.430000 0.1</circle>",
        "Smoke &amp; fire &lt;3rd floor&gt;",
    ] {
        assert!(fire.contains(expected), "{expected} in {fire}");
    }
    // A broken document is caught by the check itself.
    assert!(validate(&fire.replace("+05:00</sent>", "Z</sent>")).is_err());
}

#[sqlx::test(migrations = false)]
async fn get_incident_cap_answers_an_incident_with_its_zone(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-cap",
        &["--cap-utc-offset", "+05:00"],
    ))
    .await
    .expect("OCC starts");
    occ_tests::zones(&occ.grpc)
        .await
        .put_zone(pb::PutZoneRequest {
            zone: Some(pb::Zone {
                name: "esil_transit_stop_1".into(),
                geometry: Some(occ_api::convert::json_to_struct(
                    serde_json::json!({"type": "Polygon", "coordinates": [[
                        [71.42, 51.12], [71.44, 51.12], [71.44, 51.14], [71.42, 51.14], [71.42, 51.12]
                    ]]})
                    .as_object()
                    .expect("object"),
                )),
                ..Default::default()
            }),
        })
        .await
        .expect("zone");
    let number = occ_tests::press_panic_button(&occ.grpc).await;
    let xml = occ_tests::incidents(&occ.grpc)
        .await
        .get_incident_cap(pb::GetIncidentCapRequest { id: number.clone() })
        .await
        .expect("GetIncidentCap")
        .into_inner()
        .alert;
    validate(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    assert!(
        xml.contains(&format!("<identifier>{number}</identifier>")),
        "{xml}"
    );
    assert!(xml.contains("<category>Security</category>"), "{xml}");
    assert!(
        xml.contains("<areaDesc>esil_transit_stop_1</areaDesc>"),
        "{xml}"
    );
    assert!(xml.contains("<polygon>51.120000,71.420000"), "{xml}");
    assert!(xml.contains("+05:00</sent>"), "{xml}");
    occ.stop().await.expect("stop");
}

/// What a public-warning system receives: (topic, payload) of every message on `filter`.
async fn warning_system(
    port: u16,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, String)>) {
    let mut o = MqttOptions::new(
        format!("warning-{}", uuid::Uuid::now_v7().simple()),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed_tx.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    if tx.send((topic, payload)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("subscribed within 10 s")
        .expect("subscribed");
    (client, rx)
}

async fn next_alert(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an alert within 30 s")
        .expect("the subscription goes on")
}

#[sqlx::test(migrations = false)]
async fn alerts_reach_the_warning_system_once_each_from_whichever_instance_is_left(pool: PgPool) {
    let broker = Broker::start().await.expect("broker");
    let (_client, mut alerts) = warning_system(broker.port, "occ/cap/#").await;
    let args = |id: &str| {
        serve_args(
            &database_url(&pool),
            broker.port,
            id,
            &["--cap-publish", "panic_alarm", "--cap-utc-offset", "+05:00"],
        )
    };
    let a = Occ::start(args("occ-cap-a")).await.expect("A starts");
    let b = Occ::start(args("occ-cap-b")).await.expect("B starts");

    // A smoke detector (fire: not a published category), then a panic button.
    let smoke = pb::Event {
        source_id: "det-1".into(),
        external_id: "smoke-1".into(),
        r#type: "smoke.detected".into(),
        zone: "esil_residential_1".into(),
        ..Default::default()
    };
    let fire = occ_tests::open_incidents(&a.grpc, vec![smoke])
        .await
        .remove(0);
    let number = occ_tests::open_incidents(&a.grpc, vec![panic_button(1)])
        .await
        .remove(0);

    let (topic, xml) = next_alert(&mut alerts).await;
    assert_eq!(topic, "occ/cap/panic_alarm");
    validate(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    assert!(
        xml.contains(&format!("<identifier>{number}</identifier>")),
        "{xml}"
    );
    assert!(xml.contains("<msgType>Alert</msgType>"), "{xml}");

    // A false alarm: the alert is cancelled, referencing it.
    occ_tests::incidents(&b.grpc)
        .await
        .update_incident_status(pb::UpdateIncidentStatusRequest {
            id: number.clone(),
            status: pb::IncidentStatus::Dismissed as i32,
            note: "pressed by a child".into(),
            ..Default::default()
        })
        .await
        .expect("dismissed");
    let (_, cancel) = next_alert(&mut alerts).await;
    validate(&cancel).unwrap_or_else(|e| panic!("{e}\n{cancel}"));
    assert!(cancel.contains("<msgType>Cancel</msgType>"), "{cancel}");
    assert!(
        cancel.contains(&format!("<references>occ@city.example,{number},")),
        "{cancel}"
    );

    // Whichever instance published, the other takes over when it stops.
    a.stop().await.expect("A stops");
    let second = occ_tests::open_incidents(&b.grpc, vec![panic_button(2)])
        .await
        .remove(0);
    let (_, xml) = next_alert(&mut alerts).await;
    assert!(
        xml.contains(&format!("<identifier>{second}</identifier>")),
        "{xml}"
    );

    // Two instances, three messages: none twice, and none about the fire. The publisher
    // records a message once the broker acknowledged it, which may be a moment after the
    // warning system received it.
    let records: Vec<(String, String, bool)> = occ_tests::eventually(
        Duration::from_secs(10),
        "the second alert on record",
        || async {
            let rows: Vec<(String, String, bool)> = sqlx::query_as(
                "SELECT i.number, a.last_msg_type, a.ended FROM cap_alerts a \
                 JOIN incidents i ON i.id = a.incident_id ORDER BY a.first_sent",
            )
            .fetch_all(&pool)
            .await
            .expect("records");
            (rows.len() == 2).then_some(rows)
        },
    )
    .await;
    assert_eq!(
        records,
        vec![
            (number.clone(), "Cancel".to_string(), true),
            (second.clone(), "Alert".to_string(), false),
        ],
        "one record per announced incident, none for the fire ({fire})"
    );
    b.stop().await.expect("B stops");
    if let Ok((_, extra)) = alerts.try_recv() {
        panic!("a message more than three (fire {fire}): {extra}");
    }
}
