//! `occ simulate`: a city's cameras and sensors publishing OCC's native envelope over MQTT.
//!
//! Most of the stream is the ordinary life of a city — people and cars on camera, air quality,
//! river levels, noise, licence plates — which the default rules do not turn into incidents.
//! At a configurable rate a *situation* starts: a fire seen by several smoke detectors, a gas
//! leak, a panic button, gunshots heard by acoustic sensors, someone inside a substation fence,
//! a watch-listed car, a rising river, a smog episode, a medical alarm. Each unfolds over
//! seconds as the real devices would report it, so correlation has something to correlate. A
//! few messages are malformed on purpose, and a few are published twice (as gateways retry),
//! to show dead letters and deduplication.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerArgs, SimulatorArgs};

/// Astana's districts, with a centre to scatter devices around.
pub(crate) const DISTRICTS: [(&str, f64, f64); 5] = [
    ("esil", 51.1280, 71.4300),
    ("almaty", 51.1500, 71.4800),
    ("saryarka", 51.1850, 71.4100),
    ("baikonur", 51.1700, 71.4500),
    ("nura", 51.0950, 71.4000),
];

const PLATES: [&str; 6] = [
    "777ABC01", "123KZX01", "505AAA02", "901BCD01", "318MNO01", "646QRS01",
];
const WATCHLIST: [&str; 2] = ["777ABC01", "505AAA02"];

/// A situation's message waiting for its time: (due, tie-breaker, source, payload). Its
/// `occurred_at` is stamped when it is published.
type Scheduled = (Instant, u64, String, String);

/// One message to publish.
#[derive(Debug, Clone)]
struct Message {
    source: String,
    payload: Value,
}

/// A device somewhere in the city.
#[derive(Debug, Clone)]
struct Device {
    id: String,
    district: &'static str,
    zone: String,
    lat: f64,
    lon: f64,
}

struct City {
    rng: StdRng,
    seq: u64,
    cameras: Vec<Device>,
    substation_cameras: Vec<Device>,
    smoke: Vec<Device>,
    gas: Vec<Device>,
    panic: Vec<Device>,
    acoustic: Vec<Device>,
    lpr: Vec<Device>,
    level: Vec<Device>,
    air: Vec<Device>,
    medical: Vec<Device>,
}

impl City {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = |rng: &mut StdRng,
                       kind: &str,
                       per_district: usize,
                       zone: &dyn Fn(&str, usize) -> String| {
            let mut out = Vec::new();
            for (district, lat, lon) in DISTRICTS {
                for n in 0..per_district {
                    out.push(Device {
                        id: format!("{kind}-{district}-{n:03}"),
                        district,
                        zone: zone(district, n),
                        lat: lat + rng.random_range(-0.02..0.02),
                        lon: lon + rng.random_range(-0.03..0.03),
                    });
                }
            }
            out
        };
        let cameras = devices(&mut rng, "cam", 12, &|d, n| format!("{d}_street_{}", n % 4));
        let substation_cameras = devices(&mut rng, "cam-sub", 2, &|d, _| {
            format!("restricted_substation_{d}")
        });
        let smoke = devices(&mut rng, "smoke", 10, &|d, n| {
            format!("{d}_residential_{}", n / 3)
        });
        let gas = devices(&mut rng, "gas", 4, &|d, n| {
            format!("{d}_industrial_{}", n / 2)
        });
        let panic = devices(&mut rng, "panic", 4, &|d, n| {
            format!("{d}_transit_stop_{n}")
        });
        let acoustic = devices(&mut rng, "acoustic", 6, &|d, n| {
            format!("{d}_street_{}", n / 2)
        });
        let lpr = devices(&mut rng, "lpr", 3, &|d, n| format!("{d}_avenue_{n}"));
        let mut level = devices(&mut rng, "level", 2, &|d, _| format!("{d}_embankment"));
        level.retain(|d| matches!(d.district, "esil" | "nura" | "almaty"));
        let air = devices(&mut rng, "aq", 3, &|d, _| format!("{d}_air"));
        let medical = devices(&mut rng, "medalarm", 5, &|d, n| {
            format!("{d}_residential_{}", n / 2)
        });
        Self {
            rng,
            seq: 0,
            cameras,
            substation_cameras,
            smoke,
            gas,
            panic,
            acoustic,
            lpr,
            level,
            air,
            medical,
        }
    }

    fn pick(&mut self, devices: fn(&City) -> &Vec<Device>) -> Device {
        let list = devices(self);
        let i = self.rng.random_range(0..list.len());
        devices(self)[i].clone()
    }

    /// An envelope from `device`, with a producer id most of the time (some devices send none
    /// and are deduplicated by content).
    fn envelope(
        &mut self,
        device: &Device,
        kind: &str,
        event_type: &str,
        severity: &str,
        extra: Value,
    ) -> Message {
        self.seq += 1;
        let mut payload = json!({
            "type": event_type,
            "severity": severity,
            "occurred_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "location": {"lat": device.lat, "lon": device.lon},
            "zone": device.zone,
            "source_kind": kind,
        });
        if self.rng.random_bool(0.9) {
            payload["id"] = json!(format!("{}-{}", device.id, self.seq));
        }
        if let (Value::Object(p), Value::Object(e)) = (&mut payload, extra) {
            p.extend(e);
        }
        Message {
            source: device.id.clone(),
            payload,
        }
    }

    /// An ordinary reading or detection that no default rule turns into an incident.
    fn background(&mut self) -> Message {
        match self.rng.random_range(0..100) {
            0..=44 => {
                let d = self.pick(|c| &c.cameras);
                let label = *["person", "car", "bicycle", "bus"]
                    .choose(&mut self.rng)
                    .unwrap_or(&"person");
                let conf = self.rng.random_range(0.55..0.97);
                self.envelope(
                    &d,
                    "camera",
                    &format!("object.{label}"),
                    "info",
                    json!({"confidence": conf}),
                )
            }
            45..=59 => {
                let d = self.pick(|c| &c.air);
                let pm25 = self.rng.random_range(4.0..40.0_f64);
                let temp = self.rng.random_range(-20.0..5.0_f64);
                self.envelope(&d, "air_quality_sensor", "air.quality", "info", json!({
                    "measurements": {"pm2_5": round1(pm25), "pm10": round1(pm25 * 1.6), "temp_c": round1(temp)}
                }))
            }
            60..=69 => {
                let d = self.pick(|c| &c.level);
                let cm = self.rng.random_range(80.0..250.0_f64);
                self.envelope(
                    &d,
                    "water_level_sensor",
                    "water.level",
                    "info",
                    json!({"measurements": {"water_level_cm": round1(cm)}}),
                )
            }
            70..=84 => {
                let d = self.pick(|c| &c.acoustic);
                let dba = self.rng.random_range(42.0..78.0_f64);
                self.envelope(
                    &d,
                    "acoustic_sensor",
                    "noise.level",
                    "info",
                    json!({"measurements": {"dba": round1(dba)}}),
                )
            }
            _ => {
                let d = self.pick(|c| &c.lpr);
                let plate = *PLATES.choose(&mut self.rng).unwrap_or(&PLATES[1]);
                let listed = WATCHLIST.contains(&plate) && self.rng.random_bool(0.02);
                let conf = self.rng.random_range(0.8..0.99_f64);
                self.envelope(
                    &d,
                    "lpr_camera",
                    "vehicle.plate",
                    "info",
                    json!({
                        "confidence": round2(conf),
                        "attributes": {"plate": plate, "watchlisted": listed}
                    }),
                )
            }
        }
    }

    /// A situation the default rules catch, as (delay from now, message) pairs.
    fn situation(&mut self) -> (&'static str, Vec<(Duration, Message)>) {
        let secs = |s: f64| Duration::from_secs_f64(s);
        let mut out = Vec::new();
        let name = match self.rng.random_range(0..9) {
            0 => {
                // A flat fire: the detectors of one building go off one after another.
                let first = self.pick(|c| &c.smoke);
                let neighbours: Vec<Device> = self
                    .smoke
                    .iter()
                    .filter(|d| d.zone == first.zone)
                    .cloned()
                    .collect();
                for (i, d) in neighbours.iter().enumerate() {
                    let sev = if i == 0 { "major" } else { "critical" };
                    let obscuration = self.rng.random_range(2.0..9.0_f64);
                    let m = self.envelope(d, "smoke_detector", "smoke.detected", sev, json!({
                        "confidence": 0.95,
                        "measurements": {"obscuration_pct_per_m": round1(obscuration)},
                        "attributes": {"building": format!("{} block {}", d.district, d.zone.len())}
                    }));
                    out.push((secs(i as f64 * 4.0), m));
                }
                "fire"
            }
            1 => {
                let d = self.pick(|c| &c.gas);
                for i in 0..3 {
                    let m = self.envelope(
                        &d,
                        "gas_detector",
                        "gas.detected",
                        "major",
                        json!({
                            "confidence": 0.9,
                            "measurements": {"methane_ppm": round1(5000.0 + 2500.0 * f64::from(i))}
                        }),
                    );
                    out.push((secs(f64::from(i) * 5.0), m));
                }
                "gas leak"
            }
            2 => {
                let d = self.pick(|c| &c.panic);
                for i in 0..2 {
                    let m =
                        self.envelope(&d, "panic_button", "panic.pressed", "critical", json!({}));
                    out.push((secs(f64::from(i) * 6.0), m));
                }
                "panic button"
            }
            3 => {
                let first = self.pick(|c| &c.acoustic);
                let near: Vec<Device> = self
                    .acoustic
                    .iter()
                    .filter(|d| d.zone == first.zone)
                    .cloned()
                    .collect();
                for (i, d) in near.iter().enumerate() {
                    let conf = self.rng.random_range(0.7..0.96_f64);
                    let peak = self.rng.random_range(120.0..140.0_f64);
                    let m = self.envelope(
                        d,
                        "acoustic_sensor",
                        "audio.gunshot",
                        "critical",
                        json!({
                            "confidence": round2(conf),
                            "measurements": {"peak_dba": round1(peak)}
                        }),
                    );
                    out.push((secs(i as f64 * 0.5), m));
                }
                "gunshots"
            }
            4 => {
                let d = self.pick(|c| &c.substation_cameras);
                for i in 0..3 {
                    let conf = self.rng.random_range(0.8..0.97_f64);
                    let m = self.envelope(
                        &d,
                        "camera",
                        "object.person",
                        "major",
                        json!({
                            "confidence": round2(conf)
                        }),
                    );
                    out.push((secs(f64::from(i) * 3.0), m));
                }
                "intrusion"
            }
            5 => {
                let d = self.pick(|c| &c.lpr);
                let plate = *WATCHLIST.choose(&mut self.rng).unwrap_or(&WATCHLIST[0]);
                let m = self.envelope(&d, "lpr_camera", "vehicle.plate", "major", json!({
                    "confidence": 0.96,
                    "attributes": {"plate": plate, "watchlisted": true, "watchlist": "stolen vehicles"}
                }));
                out.push((secs(0.0), m));
                "watch-listed plate"
            }
            6 => {
                let d = self.pick(|c| &c.level);
                for i in 0..4 {
                    let cm = 290.0 + 15.0 * f64::from(i);
                    let sev = if cm > 320.0 { "critical" } else { "major" };
                    let m = self.envelope(
                        &d,
                        "water_level_sensor",
                        "water.level",
                        sev,
                        json!({"measurements": {"water_level_cm": cm}}),
                    );
                    out.push((secs(f64::from(i) * 5.0), m));
                }
                "rising river"
            }
            7 => {
                let d = self.pick(|c| &c.air);
                for i in 0..3 {
                    let pm25 = 70.0 + 40.0 * f64::from(i);
                    let m = self.envelope(
                        &d,
                        "air_quality_sensor",
                        "air.quality",
                        "minor",
                        json!({
                            "measurements": {"pm2_5": pm25, "pm10": round1(pm25 * 1.4)}
                        }),
                    );
                    out.push((secs(f64::from(i) * 5.0), m));
                }
                "smog"
            }
            _ => {
                let d = self.pick(|c| &c.medical);
                let m = self.envelope(
                    &d,
                    "medical_alarm",
                    "medical.alarm",
                    "critical",
                    json!({
                        "attributes": {"alarm": "fall detected", "resident_age": 84}
                    }),
                );
                out.push((secs(0.0), m));
                "medical alarm"
            }
        };
        (name, out)
    }

    /// A message no producer should send: each kind of mistake lands in the dead letters with
    /// its own reason.
    fn malformed(&mut self) -> (String, Vec<u8>) {
        let d = self.pick(|c| &c.cameras);
        let body: &[u8] = match self.rng.random_range(0..4) {
            0 => b"{\"type\": \"object.person\", \"confidence\": ",
            1 => b"{\"type\": \"object.person\", \"location\": {\"lat\": 151.2, \"lon\": 71.4}}",
            2 => b"{\"severity\": \"major\"}",
            _ => b"{\"type\": \"object.person\", \"severty\": \"major\"}",
        };
        (d.id, body.to_vec())
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Publishes the simulated city until `shutdown` (or `args.count` events), with the
/// simulated dispatch room working the incidents when `args.operators`.
pub async fn run(
    broker: BrokerArgs,
    args: SimulatorArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--sim-rate must be positive");
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let room_stop = shutdown.child_token();
    let room = args.operators.then(|| {
        let endpoint = args.grpc.clone();
        let stop = room_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::operators::run(endpoint, seed, stop).await {
                tracing::error!(error = %e, "the simulated dispatch room stopped");
            }
        })
    });
    let published = publish(broker, args, seed, shutdown).await;
    room_stop.cancel();
    if let Some(room) = room {
        let _ = room.await;
    }
    published
}

async fn publish(
    broker: BrokerArgs,
    args: SimulatorArgs,
    seed: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut city = City::new(seed);

    let mut options = MqttOptions::new(
        format!("occ-sim-{seed:x}"),
        broker.host.clone(),
        broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true);
    if let Some(user) = &broker.username {
        options.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let poll_stop = CancellationToken::new();
    let stop = poll_stop.clone();
    let mut poller = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(250);
                        tracing::info!("simulator connected");
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "simulator connection lost");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                },
            }
        }
    });

    tracing::info!(
        rate = args.rate,
        situations_per_minute = args.situations_per_minute,
        seed,
        "simulating the city"
    );
    let mut pending: BinaryHeap<Reverse<Scheduled>> = BinaryHeap::new();
    let mut tie = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let situation_probability = (args.situations_per_minute / 60.0 / args.rate).clamp(0.0, 1.0);
    let mut sent = 0u64;
    let mut last_duplicate: Option<(String, Vec<u8>)> = None;
    while args.count.is_none_or(|n| sent < n) {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        if city.rng.random_bool(situation_probability) {
            let (name, steps) = city.situation();
            tracing::info!(situation = name, messages = steps.len(), "situation starts");
            for (delay, m) in steps {
                tie += 1;
                pending.push(Reverse((now + delay, tie, m.source, m.payload.to_string())));
            }
        }
        let (source, payload) = match pending.peek() {
            Some(Reverse((due, ..))) if *due <= now => {
                let Some(Reverse((_, _, source, payload))) = pending.pop() else {
                    continue;
                };
                let mut payload: Value = serde_json::from_str(&payload).unwrap_or_default();
                payload["occurred_at"] =
                    json!(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                (source, payload.to_string().into_bytes())
            }
            _ if city.rng.random_bool(args.malformed_ratio.clamp(0.0, 1.0)) => city.malformed(),
            _ if city.rng.random_bool(0.005) && last_duplicate.is_some() => {
                last_duplicate.clone().unwrap_or_default()
            }
            _ => {
                let m = city.background();
                (m.source, m.payload.to_string().into_bytes())
            }
        };
        let topic = format!("occ/v1/events/{source}");
        tokio::select! {
            published = client.publish(topic, QoS::AtLeastOnce, false, payload.clone()) => {
                published.context("the simulator's MQTT client stopped")?;
            }
            () = shutdown.cancelled() => break,
        }
        last_duplicate = Some((source, payload));
        sent += 1;
        if sent.is_multiple_of(1000) {
            tracing::info!(sent, "simulator progress");
        }
    }
    tracing::info!(sent, "simulator stopping");
    // The poller ends once the DISCONNECT is out (or gives up after a moment).
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), &mut poller)
        .await
        .is_err()
    {
        poll_stop.cancel();
        let _ = poller.await;
    }
    Ok(())
}
