//! `occ simulate`: a city's cameras and sensors over MQTT, each speaking what such a device
//! really speaks:
//!
//! - **Frigate NVR** cameras (`frigate/...`): street cameras tracking people and vehicles,
//!   substation cameras, plate-reading avenue cameras; objects as `new` → `update` → `end`,
//!   review alerts, plate reads, and now and then a camera whose stream drops;
//! - **ChirpStack v4** LoRaWAN river-level sensors (`application/.../event/up|status`) with a
//!   codec that names the level `waterLevelCm`;
//! - **SenML** air-quality stations (`occ/v1/senml/...`) with relative times;
//! - **OCC's own envelope** from gateways for smoke and gas detectors, panic buttons, acoustic
//!   sensors and medical alarms.
//!
//! Most of the stream is the ordinary life of a city, which the default rules do not turn into
//! incidents. At a configurable rate a *situation* starts — a flat fire seen by several smoke
//! detectors, a gas leak, a panic button, gunshots, someone inside a substation fence, a
//! watch-listed car, a rising river, smog, a medical alarm, a camera gone dark, a sensor's
//! battery running low — and unfolds over seconds as the devices would report it. A few
//! messages are malformed on purpose (each producer's usual mistakes) and a few are sent
//! twice, to show dead letters and deduplication.
//!
//! Before it publishes, the simulator registers the city as its IT would, over the API: every
//! device with its place, the level sensors' profile (so `waterLevelCm` reaches the flood rule
//! as `water_level_cm`), and the police's watch list.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use occ_proto::v1 as pb;
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
/// The police's stolen-vehicle list, as the simulator registers it.
const WATCHLIST: [&str; 2] = ["777ABC01", "505AAA02"];

/// The Frigate NVR's topic prefix.
const NVR: &str = "frigate";
/// The ChirpStack application the level sensors belong to.
const APPLICATION: &str = "9b2e4c7a-1f3d-4e8b-a6c5-2d7f0e9b3c44";
/// The ChirpStack device profile of the level sensors, and OCC's profile of that name.
const LEVEL_PROFILE: &str = "ultrasonic-level-v2";

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
}

impl Msg {
    fn json(topic: String, payload: &Value) -> Self {
        Self {
            topic,
            payload: payload.to_string().into_bytes(),
        }
    }
}

/// A message waiting for its time: (due, tie-breaker, message).
type Scheduled = (Instant, u64, Msg);

/// How a device talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// A Frigate camera (its name is the camera's).
    Frigate,
    /// A LoRaWAN device through ChirpStack (its id is the DevEUI).
    Chirpstack,
    Senml,
    Native,
}

/// A device somewhere in the city.
#[derive(Debug, Clone)]
struct Device {
    id: String,
    kind: &'static str,
    speaks: Speaks,
    district: &'static str,
    zone: String,
    lat: f64,
    lon: f64,
}

impl Device {
    /// Its id in OCC's registry.
    fn source_id(&self) -> String {
        match self.speaks {
            Speaks::Frigate => format!("frigate:{NVR}:{}", self.id),
            Speaks::Chirpstack => format!("lorawan:{}", self.id),
            Speaks::Senml | Speaks::Native => self.id.clone(),
        }
    }
}

fn epoch(t: DateTime<Utc>) -> f64 {
    // Microseconds are what a float of this size holds.
    #[allow(clippy::cast_precision_loss)]
    let micros = t.timestamp_micros() as f64;
    micros / 1e6
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

struct City {
    rng: StdRng,
    seq: u64,
    street_cams: Vec<Device>,
    substation_cams: Vec<Device>,
    avenue_cams: Vec<Device>,
    smoke: Vec<Device>,
    gas: Vec<Device>,
    panic: Vec<Device>,
    acoustic: Vec<Device>,
    medical: Vec<Device>,
    level: Vec<Device>,
    air: Vec<Device>,
}

impl City {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut devices = |kind: &'static str,
                           speaks: Speaks,
                           per_district: usize,
                           name: &dyn Fn(&str, usize) -> String,
                           zone: &dyn Fn(&str, usize) -> String| {
            let mut out = Vec::new();
            for (district, lat, lon) in DISTRICTS {
                for n in 0..per_district {
                    out.push(Device {
                        id: name(district, n),
                        kind,
                        speaks,
                        district,
                        zone: zone(district, n),
                        lat: lat + rng.random_range(-0.02..0.02),
                        lon: lon + rng.random_range(-0.03..0.03),
                    });
                }
            }
            out
        };
        let street_cams = devices(
            "camera",
            Speaks::Frigate,
            12,
            &|d, n| format!("{d}_street_cam_{n:02}"),
            &|d, n| format!("{d}_street_{}", n % 4),
        );
        let substation_cams = devices(
            "camera",
            Speaks::Frigate,
            2,
            &|d, n| format!("{d}_substation_cam_{n}"),
            &|d, _| format!("restricted_substation_{d}"),
        );
        let avenue_cams = devices(
            "lpr_camera",
            Speaks::Frigate,
            3,
            &|d, n| format!("{d}_avenue_cam_{n}"),
            &|d, n| format!("{d}_avenue_{n}"),
        );
        let smoke = devices(
            "smoke_detector",
            Speaks::Native,
            10,
            &|d, n| format!("smoke-{d}-{n:03}"),
            &|d, n| format!("{d}_residential_{}", n / 3),
        );
        let gas = devices(
            "gas_detector",
            Speaks::Native,
            4,
            &|d, n| format!("gas-{d}-{n:03}"),
            &|d, n| format!("{d}_industrial_{}", n / 2),
        );
        let panic = devices(
            "panic_button",
            Speaks::Native,
            4,
            &|d, n| format!("panic-{d}-{n:03}"),
            &|d, n| format!("{d}_transit_stop_{n}"),
        );
        let acoustic = devices(
            "acoustic_sensor",
            Speaks::Native,
            6,
            &|d, n| format!("acoustic-{d}-{n:03}"),
            &|d, n| format!("{d}_street_{}", n / 2),
        );
        let medical = devices(
            "medical_alarm",
            Speaks::Native,
            5,
            &|d, n| format!("medalarm-{d}-{n:03}"),
            &|d, n| format!("{d}_residential_{}", n / 2),
        );
        // DevEUIs from the vendor's block, one per device.
        let mut level = devices(
            "water_level_sensor",
            Speaks::Chirpstack,
            2,
            &|_, _| String::new(),
            &|d, _| format!("{d}_embankment"),
        );
        level.retain(|d| matches!(d.district, "esil" | "nura" | "almaty"));
        for (n, d) in level.iter_mut().enumerate() {
            d.id = format!("a84041000181c{n:03x}");
        }
        let air = devices(
            "air_quality_station",
            Speaks::Senml,
            3,
            &|d, n| format!("aq-{d}-{n:03}"),
            &|d, _| format!("{d}_air"),
        );
        Self {
            rng,
            seq: 0,
            street_cams,
            substation_cams,
            avenue_cams,
            smoke,
            gas,
            panic,
            acoustic,
            medical,
            level,
            air,
        }
    }

    fn all(&self) -> impl Iterator<Item = &Device> {
        self.street_cams
            .iter()
            .chain(&self.substation_cams)
            .chain(&self.avenue_cams)
            .chain(&self.smoke)
            .chain(&self.gas)
            .chain(&self.panic)
            .chain(&self.acoustic)
            .chain(&self.medical)
            .chain(&self.level)
            .chain(&self.air)
    }

    fn pick(&mut self, devices: fn(&City) -> &Vec<Device>) -> Device {
        let list = devices(self);
        let i = self.rng.random_range(0..list.len());
        devices(self)[i].clone()
    }

    fn token(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..len)
            .map(|_| char::from(ALPHABET[self.rng.random_range(0..ALPHABET.len())]))
            .collect()
    }

    fn uuid(&mut self) -> String {
        uuid::Uuid::from_u128(self.rng.random()).to_string()
    }

    /// OCC's envelope from a gateway, with a producer id most of the time (some devices send
    /// none and are recognised by content).
    fn native(
        &mut self,
        device: &Device,
        event_type: &str,
        severity: &str,
        at: DateTime<Utc>,
        extra: Value,
    ) -> Msg {
        self.seq += 1;
        let mut payload = json!({
            "type": event_type,
            "severity": severity,
            "occurred_at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "location": {"lat": device.lat, "lon": device.lon},
            "zone": device.zone,
            "source_kind": device.kind,
        });
        if self.rng.random_bool(0.9) {
            payload["id"] = json!(format!("{}-{}", device.id, self.seq));
        }
        if let (Value::Object(p), Value::Object(e)) = (&mut payload, extra) {
            p.extend(e);
        }
        Msg::json(format!("occ/v1/events/{}", device.id), &payload)
    }

    /// A tracked object's life on a Frigate camera: `new` (not yet in a zone), an `update` in
    /// each zone step, then `end`. `plate` for a car whose plate the camera read.
    fn frigate_object(
        &mut self,
        cam: &Device,
        label: &str,
        steps: &[Vec<String>],
        plate: Option<&str>,
        start: DateTime<Utc>,
    ) -> (String, Vec<(Duration, Msg)>) {
        let t0 = epoch(start);
        let id = format!("{t0:.6}-{}", self.token(6));
        let top = round2(self.rng.random_range(0.72..0.97));
        let mut out = Vec::new();
        let mut entered: Vec<String> = Vec::new();
        let mut phases: Vec<(&str, Vec<String>, f64)> = vec![("new", Vec::new(), 0.0)];
        for (i, zones) in steps.iter().enumerate() {
            phases.push(("update", zones.clone(), 1.0 + 1.5 * i as f64));
        }
        let last = phases.last().map_or(0.0, |p| p.2);
        phases.push((
            "end",
            steps.last().cloned().unwrap_or_default(),
            last + self.rng.random_range(1.0..4.0),
        ));
        for (kind, zones, offset) in phases {
            for z in &zones {
                if !entered.contains(z) {
                    entered.push(z.clone());
                }
            }
            let mut after = json!({
                "id": id, "camera": cam.id, "frame_time": t0 + offset,
                "snapshot": null, "label": label, "sub_label": null,
                "top_score": top, "false_positive": false, "start_time": t0,
                "end_time": if kind == "end" { json!(t0 + offset) } else { Value::Null },
                "score": round2(top - 0.03), "box": [310, 120, 402, 388], "area": 24656,
                "ratio": 0.34, "region": [200, 60, 520, 380],
                "current_zones": zones, "entered_zones": entered,
                "has_snapshot": true, "has_clip": true, "active": true, "stationary": false,
                "motionless_count": 0, "position_changes": 1, "attributes": {},
                "current_attributes": [], "max_severity": "detection",
                "current_estimated_speed": 0, "average_estimated_speed": 0, "velocity_angle": 0,
                "path_data": [],
                "recognized_license_plate": null,
            });
            if let Some(p) = plate.filter(|_| kind != "new") {
                after["recognized_license_plate"] = json!([p, 0.94]);
                after["current_estimated_speed"] = json!(round1(self.rng.random_range(25.0..70.0)));
            }
            out.push((
                Duration::from_secs_f64(offset),
                Msg::json(
                    format!("{NVR}/events"),
                    &json!({"type": kind, "before": after.clone(), "after": after}),
                ),
            ));
        }
        (id, out)
    }

    /// A ChirpStack uplink of a level sensor, with its codec's names.
    fn level_uplink(&mut self, dev: &Device, cm: f64, at: DateTime<Utc>) -> Msg {
        self.seq += 1;
        let f_cnt = self.seq;
        let payload = json!({
            "deduplicationId": self.uuid(),
            "time": at.to_rfc3339(),
            "deviceInfo": self.device_info(dev),
            "devAddr": "01ab23cd", "adr": true, "dr": 5, "fCnt": f_cnt, "fPort": 2,
            "confirmed": false, "data": "AZAC5A==",
            "object": {"waterLevelCm": cm, "batteryV": 3.61, "alarm": cm >= 300.0},
            "rxInfo": [{"gatewayId": "0016c001f1500a01", "uplinkId": f_cnt, "rssi": -97,
                        "snr": 4.25, "context": "AAAAAA==", "metadata": {"region_config_id": "eu868"},
                        "crcStatus": "CRC_OK"}],
            "txInfo": {"frequency": 868100000, "modulation": {"lora": {"bandwidth": 125000,
                       "spreadingFactor": 7, "codeRate": "CR_4_5"}}},
            "regionConfigId": "eu868"
        });
        Msg::json(
            format!("application/{APPLICATION}/device/{}/event/up", dev.id),
            &payload,
        )
    }

    fn level_status(&mut self, dev: &Device, battery: f64, at: DateTime<Utc>) -> Msg {
        let payload = json!({
            "deduplicationId": self.uuid(),
            "time": at.to_rfc3339(),
            "deviceInfo": self.device_info(dev),
            "margin": 7, "externalPowerSource": false, "batteryLevelUnavailable": false,
            "batteryLevel": battery
        });
        Msg::json(
            format!("application/{APPLICATION}/device/{}/event/status", dev.id),
            &payload,
        )
    }

    fn device_info(&self, dev: &Device) -> Value {
        json!({
            "tenantId": "6a0c2f1e-7d3b-4c55-9e1a-0b8f4d2c9a11", "tenantName": "Astana City",
            "applicationId": APPLICATION, "applicationName": "flood-sensors",
            "deviceProfileId": "3c8d1e2f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
            "deviceProfileName": LEVEL_PROFILE,
            "deviceName": format!("{}-embankment-{}", dev.district, &dev.id[13..]),
            "devEui": dev.id, "deviceClassEnabled": "CLASS_A",
            "tags": {"district": dev.district, "zone": dev.zone}
        })
    }

    /// A SenML pack of an air-quality station: particulates now, the temperature a minute
    /// ago (the station keeps no clock: relative times).
    fn air_pack(&mut self, station: &Device, pm25: f64) -> Msg {
        let temp = round1(self.rng.random_range(-20.0..5.0));
        let pack = json!([
            {"bn": format!("urn:dev:mac:0024befffe80{}:", &station.id[station.id.len() - 3..]),
             "n": "pm2_5", "u": "ug/m3", "v": round1(pm25)},
            {"n": "pm10", "u": "ug/m3", "v": round1(pm25 * 1.5)},
            {"n": "temp", "u": "Cel", "v": temp, "t": -60}
        ]);
        Msg::json(format!("occ/v1/senml/{}", station.id), &pack)
    }

    /// An ordinary reading or detection that no default rule turns into an incident.
    fn background(&mut self, now: DateTime<Utc>) -> Vec<(Duration, Msg)> {
        match self.rng.random_range(0..100) {
            0..=39 => {
                let cam = self.pick(|c| &c.street_cams);
                let label = *["person", "car", "bicycle", "bus", "person"]
                    .choose(&mut self.rng)
                    .unwrap_or(&"person");
                self.frigate_object(&cam, label, &[vec![cam.zone.clone()]], None, now)
                    .1
            }
            40..=54 => {
                let station = self.pick(|c| &c.air);
                let pm25 = self.rng.random_range(4.0..40.0);
                vec![(Duration::ZERO, self.air_pack(&station, pm25))]
            }
            55..=64 => {
                let dev = self.pick(|c| &c.level);
                let cm = round1(self.rng.random_range(80.0..250.0));
                let mut out = vec![(Duration::ZERO, self.level_uplink(&dev, cm, now))];
                if self.rng.random_bool(0.1) {
                    let battery = round1(self.rng.random_range(60.0..95.0));
                    out.push((
                        Duration::from_millis(500),
                        self.level_status(&dev, battery, now),
                    ));
                }
                out
            }
            65..=79 => {
                let d = self.pick(|c| &c.acoustic);
                let dba = round1(self.rng.random_range(42.0..78.0));
                vec![(
                    Duration::ZERO,
                    self.native(
                        &d,
                        "noise.level",
                        "info",
                        now,
                        json!({"measurements": {"dba": dba}}),
                    ),
                )]
            }
            _ => {
                let cam = self.pick(|c| &c.avenue_cams);
                // Now and then a wanted car drives past: OCC's watch list, not the camera,
                // knows it is wanted.
                let plate = *PLATES.choose(&mut self.rng).unwrap_or(&PLATES[1]);
                let plate = if WATCHLIST.contains(&plate) && !self.rng.random_bool(0.02) {
                    PLATES[1]
                } else {
                    plate
                };
                self.plate_read(&cam, plate, now)
            }
        }
    }

    /// A car on an avenue camera with its plate read, as the tracked object and as the LPR
    /// update Frigate sends for it.
    fn plate_read(
        &mut self,
        cam: &Device,
        plate: &str,
        now: DateTime<Utc>,
    ) -> Vec<(Duration, Msg)> {
        let (id, mut msgs) =
            self.frigate_object(cam, "car", &[vec![cam.zone.clone()]], Some(plate), now);
        let spaced = format!("{} {} {}", &plate[..3], &plate[3..6], &plate[6..]);
        msgs.push((
            Duration::from_millis(1200),
            Msg::json(
                format!("{NVR}/tracked_object_update"),
                &json!({"type": "lpr", "id": id, "name": null, "plate": spaced,
                        "score": 0.93, "camera": cam.id, "timestamp": epoch(now) + 1.2}),
            ),
        ));
        msgs
    }

    /// A situation the default rules catch, as (delay from now, message) pairs.
    fn situation(&mut self, now: DateTime<Utc>) -> (&'static str, Vec<(Duration, Msg)>) {
        let secs = Duration::from_secs_f64;
        let at = |d: f64| now + chrono::TimeDelta::milliseconds((d * 1000.0) as i64);
        let mut out = Vec::new();
        let name = match self.rng.random_range(0..11) {
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
                    let obscuration = round1(self.rng.random_range(2.0..9.0));
                    let delay = i as f64 * 4.0;
                    let m = self.native(d, "smoke.detected", sev, at(delay), json!({
                        "confidence": 0.95,
                        "measurements": {"obscuration_pct_per_m": obscuration},
                        "attributes": {"building": format!("{} block {}", d.district, d.zone.len())}
                    }));
                    out.push((secs(delay), m));
                }
                "fire"
            }
            1 => {
                let d = self.pick(|c| &c.gas);
                for i in 0..3 {
                    let delay = f64::from(i) * 5.0;
                    let m = self.native(
                        &d,
                        "gas.detected",
                        "major",
                        at(delay),
                        json!({"confidence": 0.9,
                               "measurements": {"methane_ppm": 5000.0 + 2500.0 * f64::from(i)}}),
                    );
                    out.push((secs(delay), m));
                }
                "gas leak"
            }
            2 => {
                // Pressed twice: two presses, two events, one incident.
                let d = self.pick(|c| &c.panic);
                for i in 0..2 {
                    let delay = f64::from(i) * 6.0;
                    let m = self.native(&d, "panic.pressed", "critical", at(delay), json!({}));
                    out.push((secs(delay), m));
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
                    let conf = round2(self.rng.random_range(0.7..0.96));
                    let peak = round1(self.rng.random_range(120.0..140.0));
                    let delay = i as f64 * 0.5;
                    let m = self.native(
                        d,
                        "audio.gunshot",
                        "critical",
                        at(delay),
                        json!({"confidence": conf, "measurements": {"peak_dba": peak}}),
                    );
                    out.push((secs(delay), m));
                }
                "gunshots"
            }
            4 => {
                // Someone climbs the substation fence: the object enters the restricted zone,
                // the camera's review becomes an alert.
                let cam = self.pick(|c| &c.substation_cams);
                let inside = vec![cam.zone.clone()];
                let (id, msgs) = self.frigate_object(
                    &cam,
                    "person",
                    &[
                        vec![format!("{}_perimeter", cam.district)],
                        inside.clone(),
                        inside,
                    ],
                    None,
                    now,
                );
                out.extend(msgs);
                let review_id = format!("{:.6}-{}", epoch(now) + 0.4, self.token(6));
                for (kind, delay) in [("new", 2.6), ("end", 9.0)] {
                    let after = json!({
                        "id": review_id, "camera": cam.id, "start_time": epoch(now) + 0.4,
                        "end_time": if kind == "end" { json!(epoch(now) + 9.0) } else { Value::Null },
                        "severity": "alert",
                        "thumb_path": format!("/media/frigate/clips/review/thumb-{}-{review_id}.webp", cam.id),
                        "data": {"detections": [id], "objects": ["person"], "sub_labels": [],
                                 "zones": [cam.zone], "audio": []}
                    });
                    out.push((
                        secs(delay),
                        Msg::json(
                            format!("{NVR}/reviews"),
                            &json!({"type": kind, "before": after.clone(), "after": after}),
                        ),
                    ));
                }
                "intrusion"
            }
            5 => {
                let cam = self.pick(|c| &c.avenue_cams);
                let plate = *WATCHLIST.choose(&mut self.rng).unwrap_or(&WATCHLIST[0]);
                out.extend(self.plate_read(&cam, plate, now));
                "watch-listed plate"
            }
            6 => {
                let d = self.pick(|c| &c.level);
                for i in 0..4 {
                    let delay = f64::from(i) * 5.0;
                    let m = self.level_uplink(&d, 290.0 + 15.0 * f64::from(i), at(delay));
                    out.push((secs(delay), m));
                }
                "rising river"
            }
            7 => {
                let station = self.pick(|c| &c.air);
                for i in 0..3 {
                    let m = self.air_pack(&station, 70.0 + 40.0 * f64::from(i));
                    out.push((secs(f64::from(i) * 5.0), m));
                }
                "smog"
            }
            8 => {
                let d = self.pick(|c| &c.medical);
                let m = self.native(
                    &d,
                    "medical.alarm",
                    "critical",
                    now,
                    json!({"attributes": {"alarm": "fall detected", "resident_age": 84}}),
                );
                out.push((secs(0.0), m));
                "medical alarm"
            }
            9 => {
                // A street camera's stream drops, and comes back half a minute later.
                let cam = self.pick(|c| &c.street_cams);
                let topic = format!("{NVR}/{}/status/detect", cam.id);
                out.push((
                    secs(0.0),
                    Msg {
                        topic: topic.clone(),
                        payload: b"offline".to_vec(),
                    },
                ));
                out.push((
                    secs(30.0),
                    Msg {
                        topic,
                        payload: b"online".to_vec(),
                    },
                ));
                "camera offline"
            }
            _ => {
                let d = self.pick(|c| &c.level);
                let battery = round1(self.rng.random_range(8.0..18.0));
                out.push((secs(0.0), self.level_status(&d, battery, now)));
                "low battery"
            }
        };
        (name, out)
    }

    /// A message no producer should send: each kind of mistake lands in the dead letters with
    /// its own reason naming the field.
    fn malformed(&mut self) -> Msg {
        let cam = self.pick(|c| &c.street_cams);
        let station = self.pick(|c| &c.air);
        let smoke = self.pick(|c| &c.smoke);
        let (topic, body): (String, Vec<u8>) = match self.rng.random_range(0..6) {
            0 => (
                format!("occ/v1/events/{}", smoke.id),
                b"{\"type\": \"smoke.detected\", \"confidence\": ".to_vec(),
            ),
            1 => (
                format!("occ/v1/events/{}", smoke.id),
                b"{\"type\": \"smoke.detected\", \"location\": {\"lat\": 151.2, \"lon\": 71.4}}"
                    .to_vec(),
            ),
            2 => (
                format!("occ/v1/events/{}", smoke.id),
                b"{\"type\": \"smoke.detected\", \"severty\": \"major\"}".to_vec(),
            ),
            3 => (
                format!("{NVR}/events"),
                json!({"type": "update", "after": {"id": "1.0-bad", "camera": cam.id,
                       "label": "person", "current_zones": "crosswalk"}})
                .to_string()
                .into_bytes(),
            ),
            4 => (
                format!("occ/v1/senml/{}", station.id),
                br#"[{"n": "pm2_5", "u": "ug/m3", "v": 12.5, "calib_": true}]"#.to_vec(),
            ),
            _ => (
                format!("occ/v1/senml/{}", station.id),
                br#"[{"n": "pm2_5", "v": "twelve"}]"#.to_vec(),
            ),
        };
        Msg {
            topic,
            payload: body,
        }
    }
}

/// Registers the simulated city over the API, as city IT would: its devices, the level
/// sensors' profile and the police's watch list. Best effort: without it events still flow,
/// but the level sensors' readings reach no flood rule and wanted plates open nothing.
async fn register(
    endpoint: &str,
    key: Option<&str>,
    city: &City,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = crate::client::with_key(crate::client::connect(endpoint, shutdown).await?, key)?;
    let mut sources = pb::source_service_client::SourceServiceClient::new(channel.clone());
    sources
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: LEVEL_PROFILE.into(),
                description: "Ultrasonic river-level sensors; the codec reports waterLevelCm"
                    .into(),
                mapping: Some(pb::Mapping {
                    event_types: [("lorawan.uplink".into(), "water.level".into())].into(),
                    measurements: [
                        ("waterLevelCm".into(), "water_level_cm".into()),
                        ("batteryV".into(), "battery_v".into()),
                    ]
                    .into(),
                    source_kind: "water_level_sensor".into(),
                }),
            }),
        })
        .await
        .context("cannot register the level sensors' profile")?;
    let registered = city
        .all()
        .map(|d| pb::Source {
            id: d.source_id(),
            kind: d.kind.into(),
            name: format!("{} ({})", d.id, d.district),
            location: Some(pb::GeoPoint {
                lat: d.lat,
                lon: d.lon,
            }),
            zone: d.zone.clone(),
            district: d.district.into(),
            profile: if d.speaks == Speaks::Chirpstack {
                LEVEL_PROFILE.into()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .collect();
    let imported = sources
        .import_sources(pb::ImportSourcesRequest {
            sources: registered,
        })
        .await
        .context("cannot register the simulated devices")?
        .into_inner();
    let mut watch = pb::watchlist_service_client::WatchlistServiceClient::new(channel);
    watch
        .add_watchlist_entries(pb::AddWatchlistEntriesRequest {
            entries: WATCHLIST
                .iter()
                .map(|p| pb::WatchlistEntry {
                    plate: (*p).into(),
                    list: "stolen_vehicles".into(),
                    reason: "reported stolen (simulated)".into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .context("cannot register the watch list")?;
    tracing::info!(
        devices = imported.created + imported.updated,
        "simulated city registered: devices, the level sensors' profile, the watch list"
    );
    Ok(())
}

/// Reads an API key from `file`, waiting while it does not exist yet (OCC writes it on its
/// first start).
async fn read_key_file(
    file: &std::path::Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<String> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match std::fs::read_to_string(file) {
            Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "no API key in {} after 2 minutes",
            file.display()
        );
        tracing::debug!(file = %file.display(), "waiting for the API key");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => anyhow::bail!("stopped while waiting for the API key"),
        }
    }
}

/// Publishes the simulated city until `shutdown` (or `args.count` messages), with the
/// simulated dispatch room working the incidents when `args.operators`.
pub async fn run(
    broker: BrokerArgs,
    args: SimulatorArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--sim-rate must be positive");
    let mut args = args;
    if args.api_key.is_none()
        && let Some(file) = &args.api_key_file
    {
        args.api_key = Some(read_key_file(file, &shutdown).await?);
    }
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let city = City::new(seed);
    let registered = tokio::time::timeout(
        Duration::from_secs(15),
        register(&args.grpc, args.api_key.as_deref(), &city, &shutdown),
    )
    .await;
    match registered {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "the simulated city is not registered; events flow, but level sensors and wanted plates open nothing")
        }
        Err(_) => {
            tracing::warn!(api = %args.grpc, "the OCC API did not answer; the simulated city is not registered")
        }
    }
    let room_stop = shutdown.child_token();
    let room = args.operators.then(|| {
        let endpoint = args.grpc.clone();
        let key = args.api_key.clone();
        let stop = room_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::operators::run(endpoint, key, seed, stop).await {
                tracing::error!(error = %e, "the simulated dispatch room stopped");
            }
        })
    });
    let published = publish(broker, args, city, seed, shutdown).await;
    room_stop.cancel();
    if let Some(room) = room {
        let _ = room.await;
    }
    published
}

async fn publish(
    broker: BrokerArgs,
    args: SimulatorArgs,
    mut city: City,
    seed: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
    if let Some(tls) = broker.tls()? {
        options.set_transport(tls.transport());
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
        "simulating the city: Frigate cameras, LoRaWAN sensors through ChirpStack, SenML stations, native gateways"
    );
    let mut pending: BinaryHeap<Reverse<Scheduled>> = BinaryHeap::new();
    let mut tie = 0u64;
    let mut schedule = |pending: &mut BinaryHeap<Reverse<Scheduled>>,
                        now: Instant,
                        steps: Vec<(Duration, Msg)>| {
        for (delay, m) in steps {
            tie += 1;
            pending.push(Reverse((now + delay, tie, m)));
        }
    };
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let situation_probability = (args.situations_per_minute / 60.0 / args.rate).clamp(0.0, 1.0);
    let mut sent = 0u64;
    let mut last: Option<Msg> = None;
    while args.count.is_none_or(|n| sent < n) {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let wall = Utc::now();
        if city.rng.random_bool(situation_probability) {
            let (name, steps) = city.situation(wall);
            tracing::info!(situation = name, messages = steps.len(), "situation starts");
            schedule(&mut pending, now, steps);
        }
        let message = match pending.peek() {
            Some(Reverse((due, ..))) if *due <= now => match pending.pop() {
                Some(Reverse((_, _, m))) => m,
                None => continue,
            },
            _ if city.rng.random_bool(args.malformed_ratio.clamp(0.0, 1.0)) => city.malformed(),
            // A gateway that retries: the same message again, recognised as a redelivery.
            _ if city.rng.random_bool(0.005) && last.is_some() => {
                last.clone().unwrap_or_else(|| city.malformed())
            }
            _ => {
                let mut steps = city.background(wall);
                if steps.is_empty() {
                    continue;
                }
                let (_, first) = steps.remove(0);
                schedule(&mut pending, now, steps);
                first
            }
        };
        tokio::select! {
            published = client.publish(message.topic.clone(), QoS::AtLeastOnce, false, message.payload.clone()) => {
                published.context("the simulator's MQTT client stopped")?;
            }
            () = shutdown.cancelled() => break,
        }
        last = Some(message);
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

/// How many messages a second the city of [`mix`] makes.
const MIX_RATE: f64 = 10_000.0;

/// `n` messages of the city's day for `occ bench`, in publishing order (delays ignored): its
/// ordinary readings and detections, and one in twenty from a situation the default rules
/// turn into an incident (or join to one). They are dated as a city producing
/// [`MIX_RATE`] messages a second would have made them, the last now: a backlog is what
/// producers sent over a while, not a burst of one instant.
pub(crate) fn mix(seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut city = City::new(seed);
    let start = Utc::now() - chrono::TimeDelta::microseconds((n as f64 * 1e6 / MIX_RATE) as i64);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let now =
            start + chrono::TimeDelta::microseconds((out.len() as f64 * 1e6 / MIX_RATE) as i64);
        let steps = if city.rng.random_bool(0.05) {
            city.situation(now).1
        } else {
            city.background(now)
        };
        out.extend(steps.into_iter().map(|(_, m)| (m.topic, m.payload)));
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use occ_adapters::{
        AdaptersConfig, ChirpstackConfig, FrigateConfig, Message, NativeConfig, SenmlConfig,
    };
    use occ_domain::Limits;

    /// Every message the simulator makes is read by OCC's adapters as its producer's format:
    /// events (or nothing that matters), and a dead letter only for the deliberate mistakes.
    #[test]
    fn every_simulated_message_decodes_as_its_producers_format() {
        let adapters = occ_adapters::build(&AdaptersConfig {
            native: Some(NativeConfig::default()),
            frigate: vec![FrigateConfig::default()],
            chirpstack: Some(ChirpstackConfig::default()),
            senml: Some(SenmlConfig::default()),
        })
        .expect("default adapters");
        let mut city = City::new(7);
        let now = Utc::now();
        let mut messages: Vec<Msg> = Vec::new();
        for _ in 0..400 {
            messages.extend(city.background(now).into_iter().map(|(_, m)| m));
        }
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (name, steps) = city.situation(now);
            kinds.insert(name);
            messages.extend(steps.into_iter().map(|(_, m)| m));
        }
        assert_eq!(kinds.len(), 11, "every situation comes up: {kinds:?}");
        let mut events = 0;
        for m in &messages {
            let decoded = adapters.decode(
                &Message {
                    topic: &m.topic,
                    payload: &m.payload,
                    received_at: now,
                },
                &Limits::default(),
            );
            match decoded {
                Ok(e) => events += e.len(),
                Err(r) => panic!("{} {}: {r}", m.topic, String::from_utf8_lossy(&m.payload)),
            }
        }
        assert!(events > messages.len() / 2);
        for _ in 0..50 {
            let m = city.malformed();
            let r = adapters.decode(
                &Message {
                    topic: &m.topic,
                    payload: &m.payload,
                    received_at: now,
                },
                &Limits::default(),
            );
            assert!(r.is_err(), "{}: meant to be refused", m.topic);
        }
    }
}
