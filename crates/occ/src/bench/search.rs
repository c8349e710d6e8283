//! The search stage: EventService's questions asked of the events of a year (the `stored`
//! stage's database), through OCC's API as an investigator asks them, each call recorded in
//! the audit log as every search is; and the wall's counts of them (StatsService).

use std::time::Instant;

use anyhow::ensure;
use chrono::{DateTime, TimeDelta, Utc};
use occ_proto::v1 as pb;
use occ_proto::v1::event_service_client::EventServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::stats_service_client::StatsServiceClient;
use tonic::transport::Channel;

use super::dispatch::Latencies;

/// One kind of question, measured.
pub(super) struct Measured {
    pub what: &'static str,
    pub latency: Latencies,
    /// Results per call, on average.
    pub results: f64,
}

/// Calls of each kind, after a tenth as many untimed.
const CALLS: usize = 200;
/// The prefill's zones, sources and plates (see `prefill_events`).
const ZONES: u64 = 300;
const SOURCES: u64 = 2_000;
const PLATES: u64 = 50_000;

/// A small deterministic generator: the same questions every run.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(occ_api::convert::timestamp(t))
}

fn range(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<pb::TimeRange> {
    Some(pb::TimeRange {
        start_time: ts(from),
        end_time: ts(to),
    })
}

const CASE: &str = "BENCH-0001";

/// Asks `question` [`CALLS`] times (after a tenth untimed): its latencies and results per call.
async fn time<F, Fut>(what: &'static str, mut question: F) -> anyhow::Result<Measured>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    eprintln!("  {what} …");
    for i in 0..CALLS / 10 {
        question(CALLS + i).await?;
    }
    let mut samples = Vec::with_capacity(CALLS);
    let mut results = 0;
    for i in 0..CALLS {
        let t = Instant::now();
        results += question(i).await?;
        samples.push(t.elapsed());
    }
    Ok(Measured {
        what,
        latency: Latencies::of(samples),
        results: results as f64 / CALLS as f64,
    })
}

/// Runs the stage against the OCC serving gRPC at `grpc` over the stored events of the year
/// before `now`.
pub(super) async fn run(grpc: &str, now: DateTime<Utc>) -> anyhow::Result<Vec<Measured>> {
    let channel = Channel::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let client =
        EventServiceClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
    let mut out = Vec::new();
    // A day in the past year, from midnight.
    let day = |dice: &mut Dice| {
        let start = now - TimeDelta::days(1 + dice.below(360) as i64);
        (start, start + TimeDelta::days(1))
    };

    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    out.push(
        time("SearchEvents: one zone, one day", |_| {
            let (from, to) = day(&mut dice);
            let zone = format!("zone_{}", dice.below(ZONES));
            let mut client = client.clone();
            async move {
                let page = client
                    .search_events(pb::SearchEventsRequest {
                        case_reference: CASE.into(),
                        time_range: range(from, to),
                        zones: vec![zone],
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(page.events.len())
            }
        })
        .await?,
    );

    let mut dice = Dice(0x2545_f491_4f6c_dd1d);
    out.push(
        time(
            "SearchEvents: a polygon (1/16 of the city), one day",
            |_| {
                let (from, to) = day(&mut dice);
                // The prefill's positions span 51.0–51.2 N, 71.3–71.5 E.
                let lat = 51.0 + dice.below(150) as f64 / 1000.0;
                let lon = 71.3 + dice.below(150) as f64 / 1000.0;
                let vertices = [(0.0, 0.0), (0.0, 0.05), (0.05, 0.05), (0.05, 0.0)]
                    .into_iter()
                    .map(|(dlat, dlon)| pb::GeoPoint {
                        lat: lat + dlat,
                        lon: lon + dlon,
                    })
                    .collect();
                let mut client = client.clone();
                async move {
                    let page = client
                        .search_events(pb::SearchEventsRequest {
                            case_reference: CASE.into(),
                            time_range: range(from, to),
                            area: Some(pb::search_events_request::Area::Polygon(pb::Polygon {
                                vertices,
                            })),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok(page.events.len())
                }
            },
        )
        .await?,
    );

    let mut dice = Dice(0x1234_5678_9abc_def1);
    out.push(
        time("SearchEvents: one camera, a week", |_| {
            let from = now - TimeDelta::days(7 + dice.below(350) as i64);
            let source = format!("src-{}", dice.below(SOURCES));
            let mut client = client.clone();
            async move {
                let page = client
                    .search_events(pb::SearchEventsRequest {
                        case_reference: CASE.into(),
                        time_range: range(from, from + TimeDelta::days(7)),
                        source_ids: vec![source],
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(page.events.len())
            }
        })
        .await?,
    );

    let mut dice = Dice(0x0fed_cba9_8765_4321);
    out.push(
        time("PlateHistory: one plate, a year", |_| {
            let plate = format!("P{}", dice.below(PLATES));
            let mut client = client.clone();
            async move {
                let page = client
                    .plate_history(pb::PlateHistoryRequest {
                        case_reference: CASE.into(),
                        plate,
                        time_range: range(now - TimeDelta::days(366), now),
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(page.sightings.len())
            }
        })
        .await?,
    );

    // The wall: counts, from the counts kept of the year's events.
    let stats = StatsServiceClient::new(channel.clone());
    let counts = |range: Option<pb::TimeRange>,
                  granularity: pb::Granularity,
                  group_by: &[pb::CountDimension]| pb::CountEventsRequest {
        time_range: range,
        granularity: granularity as i32,
        group_by: group_by.iter().map(|d| *d as i32).collect(),
        ..Default::default()
    };
    let mut dice = Dice(0x5851_f42d_4c95_7f2d);
    out.push(
        time("CountEvents: one day per zone (a heat map)", |_| {
            let (from, to) = day(&mut dice);
            let request = counts(
                range(from, to),
                pb::Granularity::Day,
                &[pb::CountDimension::Zone],
            );
            let mut stats = stats.clone();
            async move { Ok(stats.count_events(request).await?.into_inner().counts.len()) }
        })
        .await?,
    );
    let mut dice = Dice(0x6a09_e667_f3bc_c908);
    out.push(
        time("CountEvents: a week per hour and type (a trend)", |_| {
            let from = now - TimeDelta::days(7 + dice.below(80) as i64);
            let request = counts(
                range(from, from + TimeDelta::days(7)),
                pb::Granularity::Hour,
                &[pb::CountDimension::Time, pb::CountDimension::Type],
            );
            let mut stats = stats.clone();
            async move { Ok(stats.count_events(request).await?.into_inner().counts.len()) }
        })
        .await?,
    );
    let mut dice = Dice(0xbb67_ae85_84ca_a73b);
    out.push(
        time("CountEvents: one zone, a week per hour", |_| {
            let from = now - TimeDelta::days(7 + dice.below(80) as i64);
            let request = pb::CountEventsRequest {
                zones: vec![format!("zone_{}", dice.below(ZONES))],
                ..counts(
                    range(from, from + TimeDelta::days(7)),
                    pb::Granularity::Hour,
                    &[pb::CountDimension::Time],
                )
            };
            let mut stats = stats.clone();
            async move { Ok(stats.count_events(request).await?.into_inner().counts.len()) }
        })
        .await?,
    );
    out.push(
        time("CountEvents: the year per day", |_| {
            let request = counts(
                range(now - TimeDelta::days(366), now),
                pb::Granularity::Day,
                &[pb::CountDimension::Time],
            );
            let mut stats = stats.clone();
            async move { Ok(stats.count_events(request).await?.into_inner().counts.len()) }
        })
        .await?,
    );

    // Incidents the drain opened, with a position.
    let listed = IncidentServiceClient::new(channel)
        .list_incidents(pb::ListIncidentsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .incidents;
    let incidents: Vec<String> = listed
        .into_iter()
        .filter(|i| i.location.is_some())
        .map(|i| i.number)
        .collect();
    ensure!(
        !incidents.is_empty(),
        "no incident with a position to look around"
    );
    out.push(
        time("AroundIncident: 500 m, a quarter hour either side", |i| {
            let incident = incidents[i % incidents.len()].clone();
            let mut client = client.clone();
            async move {
                let page = client
                    .around_incident(pb::AroundIncidentRequest {
                        case_reference: CASE.into(),
                        incident,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(page.events.len())
            }
        })
        .await?,
    );
    Ok(out)
}
