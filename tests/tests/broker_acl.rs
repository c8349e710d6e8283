//! The broker configuration deploy/ ships for a city (deploy/mosquitto-secure.conf with
//! deploy/mosquitto-acl.conf), run by the machine's Mosquitto: OCC reads every event topic
//! with its own user; a gateway publishes only on its own topics and reads nothing; OCC's CAP
//! alerts reach the public-warning system's user and no gateway; anonymous clients are refused.

use std::time::Duration;

use occ_tests::{Broker, Occ, Publisher, database_url, serve_args, workspace_root};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sqlx::PgPool;

/// The shipped secure configuration on a plain loopback listener (TLS is tried in tls.rs),
/// with a password file made here.
async fn city_broker() -> Broker {
    let dir = std::env::temp_dir().join(format!("occ-acl-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let passwd = dir.join("passwd");
    for (i, (user, password)) in [
        ("occ", "occ-secret"),
        ("det-1", "one"),
        ("det-2", "two"),
        ("warning", "warn"),
    ]
    .iter()
    .enumerate()
    {
        let mut command = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        let status = command
            .args(["-b", &passwd.display().to_string(), user, password])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success());
    }
    let shipped = std::fs::read_to_string(workspace_root().join("deploy/mosquitto-secure.conf"))
        .expect("deploy/mosquitto-secure.conf");
    let acl = workspace_root().join("deploy/mosquitto-acl.conf");
    Broker::start_config(|port| {
        shipped
            .lines()
            .filter(|l| {
                !matches!(
                    l.split_whitespace().next().unwrap_or(""),
                    "cafile"
                        | "certfile"
                        | "keyfile"
                        | "persistence"
                        | "persistence_location"
                        | "autosave_interval"
                        | "log_dest"
                )
            })
            .map(|l| match l.split_whitespace().next().unwrap_or("") {
                "listener" => format!("listener {port} 127.0.0.1"),
                "password_file" => format!("password_file {}", passwd.display()),
                "acl_file" => format!("acl_file {}", acl.display()),
                _ => l.to_owned(),
            })
            .chain(["persistence false".to_owned(), "log_dest stderr".to_owned()])
            .collect::<Vec<_>>()
            .join("\n")
    })
    .await
    .expect("the city's broker starts")
}

/// Whether a client signing in as `user` (or anonymously) is let in.
async fn let_in(port: u16, credentials: Option<(&str, &str)>) -> bool {
    let mut o = MqttOptions::new(
        format!("probe-{}", uuid::Uuid::now_v7().simple()),
        "127.0.0.1",
        port,
    );
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    let (_client, mut eventloop) = AsyncClient::new(o, 10);
    let answer = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await;
    matches!(answer, Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success)
}

#[sqlx::test(migrations = false)]
async fn a_gateway_publishes_only_its_own_topics_and_reads_nothing(pool: PgPool) {
    let broker = city_broker().await;
    assert!(
        !let_in(broker.port, None).await,
        "anonymous clients are refused"
    );
    assert!(
        !let_in(broker.port, Some(("det-1", "wrong"))).await,
        "a wrong password is refused"
    );

    let occ = Occ::start(serve_args(
        &database_url(&pool),
        broker.port,
        "occ-acl",
        &[
            "--mqtt-username",
            "occ",
            "--mqtt-password",
            "occ-secret",
            "--cap-publish",
            "panic_alarm",
        ],
    ))
    .await
    .expect("OCC subscribes with its own user");

    // det-1 listens in on every event topic and on the alerts; the warning system on the alerts.
    let listen = |client: &str,
                  user: &'static str,
                  password: &'static str,
                  filters: &'static [&'static str]| {
        let mut o = MqttOptions::new(client, "127.0.0.1", broker.port);
        o.set_credentials(user, password);
        let (listener, mut events) = AsyncClient::new(o, 10);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let heard = tokio::spawn(async move {
            for filter in filters {
                listener
                    .subscribe(*filter, QoS::AtLeastOnce)
                    .await
                    .expect("subscribe queued");
            }
            let mut heard = Vec::new();
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            heard.push(String::from_utf8_lossy(&p.topic).into_owned());
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                }
            }
            heard
        });
        (stop, heard)
    };
    let (stop_spy, overheard) = listen(
        "det-1-spy",
        "det-1",
        "one",
        &["occ/v1/events/#", "occ/cap/#"],
    );
    let (stop_warning, warned) = listen("warning-1", "warning", "warn", &["occ/cap/#"]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // ...and publishes as itself and as det-2.
    let mut det1 = Publisher::connect_as(broker.port, Some(("det-1", "one"))).await;
    let smoke =
        serde_json::json!({"id": "a", "type": "smoke.detected", "zone": "esil_residential_1"});
    det1.publish("occ/v1/events/det-1", smoke.to_string()).await;
    det1.publish("occ/v1/events/det-2", smoke.to_string()).await;
    det1.flush().await;
    let mut det2 = Publisher::connect_as(broker.port, Some(("det-2", "two"))).await;
    det2.publish("occ/v1/events/det-2", smoke.to_string()).await;
    let press =
        serde_json::json!({"id": "p", "type": "panic.pressed", "zone": "esil_transit_stop_1"});
    det2.publish("occ/v1/events/det-2", press.to_string()).await;
    det2.flush().await;

    occ_tests::eventually(Duration::from_secs(10), "the allowed events", || async {
        (occ_tests::event_count(&pool).await >= 3).then_some(())
    })
    .await;
    occ_tests::eventually(
        Duration::from_secs(15),
        "the panic alarm announced",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cap_alerts")
                .fetch_one(&pool)
                .await
                .expect("count");
            (n == 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_warning.cancel();
    stop_spy.cancel();
    assert_eq!(
        warned.await.expect("warning system"),
        ["occ/cap/panic_alarm"],
        "OCC may publish its alerts, and the warning system read them"
    );
    let sources: Vec<(String, i64)> = sqlx::query_as(
        "SELECT source_id, count(*) FROM events GROUP BY source_id ORDER BY source_id",
    )
    .fetch_all(&pool)
    .await
    .expect("events");
    assert_eq!(
        sources,
        [("det-1".to_owned(), 1), ("det-2".to_owned(), 2)],
        "det-1 could not speak for det-2"
    );
    assert_eq!(
        overheard.await.expect("spy"),
        Vec::<String>::new(),
        "a gateway reads no one's events, nor the alerts"
    );
    occ.stop().await.expect("stop");
}
