//! The simulated dispatch room: units of every agency across the city, and one operator per
//! queue working it through the gRPC API like a real console would — claim the next incident,
//! ask for the nearest units, dispatch them, follow the crews en route and on scene, resolve
//! and close. Now and then an operator dismisses a false alarm or transfers a panic alarm to
//! EMS. With the city simulator, a newcomer sees incidents go through their whole lifecycle.

use std::time::Duration;

use anyhow::Context;
use occ_proto::v1 as pb;
use occ_proto::v1::dispatch_service_client::DispatchServiceClient;
use occ_proto::v1::incident_service_client::IncidentServiceClient;
use occ_proto::v1::key_service_client::KeyServiceClient;
use occ_proto::v1::unit_service_client::UnitServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::client;
use crate::simulate::DISTRICTS;

/// Units per district, by agency: (agency, call sign prefix, count).
const FLEET: [(&str, &str, usize); 6] = [
    ("fire", "E", 2),
    ("ems", "AMB", 2),
    ("police", "P", 3),
    ("utilities", "U", 1),
    ("environment", "ENV", 1),
    ("municipal", "M", 1),
];

/// A request made by a simulated console. Each console has a key of its own; without
/// authentication, it names its operator in the `x-occ-operator` header instead.
pub(crate) fn ask<T>(desk: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(name) = desk.parse() {
        request.metadata_mut().insert("x-occ-operator", name);
    }
    request
}

#[derive(Clone)]
struct Api {
    dispatch: DispatchServiceClient<client::Api>,
    incidents: IncidentServiceClient<client::Api>,
    units: UnitServiceClient<client::Api>,
}

impl Api {
    fn new(channel: &Channel, key: Option<&str>) -> anyhow::Result<Api> {
        let api = client::with_key(channel.clone(), key)?;
        Ok(Api {
            dispatch: DispatchServiceClient::new(api.clone()),
            incidents: IncidentServiceClient::new(api.clone()),
            units: UnitServiceClient::new(api),
        })
    }
}

/// A console's own key, made with the simulator's (an admin's) key, so its claims and audit
/// entries name it. Each run replaces the last run's key of that name.
async fn desk_key(channel: &Channel, key: &str, queue: &str) -> anyhow::Result<String> {
    let mut keys = KeyServiceClient::new(client::with_key(channel.clone(), Some(key))?);
    let made = keys
        .create_key(pb::CreateKeyRequest {
            name: format!("sim-{queue}-desk"),
            roles: vec!["dispatcher".into(), "supervisor".into()],
            queues: vec![queue.to_owned()],
            replace: true,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot make a key for the {queue} desk"))?;
    Ok(made.into_inner().secret)
}

/// Runs the dispatch room against the OCC API at `endpoint`, with the simulator's `key` (none
/// without authentication), until `shutdown`.
pub async fn run(
    endpoint: String,
    key: Option<String>,
    seed: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = client::connect(&endpoint, &shutdown).await?;
    let api = Api::new(&channel, key.as_deref())?;
    station_units(&api, seed).await?;
    recover(&api).await?;
    let queues: Vec<String> = api
        .dispatch
        .clone()
        .list_queues(pb::ListQueuesRequest {})
        .await?
        .into_inner()
        .queues
        .into_iter()
        .map(|q| q.name)
        .collect();
    tracing::info!(
        queues = queues.len(),
        "simulated operators at their consoles"
    );
    let mut desks = Vec::new();
    for (i, queue) in queues.into_iter().enumerate() {
        let desk = match &key {
            Some(key) => Api::new(&channel, Some(&desk_key(&channel, key, &queue).await?))?,
            None => api.clone(),
        };
        desks.push(tokio::spawn(operator(
            desk,
            queue,
            seed.wrapping_add(i as u64),
            shutdown.clone(),
        )));
    }
    for desk in desks {
        let _ = desk.await;
    }
    Ok(())
}

/// Declares the city's fleet, each unit parked near its district's centre.
async fn station_units(api: &Api, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = api.units.clone();
    let mut count = 0;
    for (district, lat, lon) in DISTRICTS {
        for (agency, prefix, per_district) in FLEET {
            for n in 1..=per_district {
                let call_sign = format!("{prefix}-{}-{n}", district.to_uppercase());
                client
                    .upsert_unit(pb::UpsertUnitRequest {
                        unit: Some(pb::Unit {
                            call_sign,
                            agency: agency.into(),
                            home_station: format!("{district} station"),
                            location: Some(pb::GeoPoint {
                                lat: lat + rng.random_range(-0.01..0.01),
                                lon: lon + rng.random_range(-0.015..0.015),
                            }),
                            ..Default::default()
                        }),
                    })
                    .await
                    .context("cannot declare the simulated units")?;
                count += 1;
            }
        }
    }
    tracing::info!(units = count, "simulated units in service");
    Ok(())
}

/// Incidents an earlier run of the simulator left with units on them (it was stopped
/// mid-response): resolved and closed now, so the fleet is available again.
async fn recover(api: &Api) -> anyhow::Result<()> {
    let busy = api
        .units
        .clone()
        .list_units(pb::ListUnitsRequest {
            statuses: vec![
                pb::UnitStatus::Dispatched as i32,
                pb::UnitStatus::EnRoute as i32,
                pb::UnitStatus::OnScene as i32,
            ],
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .units;
    let mut incidents: Vec<String> = busy.into_iter().map(|u| u.incident_id).collect();
    incidents.sort();
    incidents.dedup();
    let mut client = api.incidents.clone();
    for id in &incidents {
        for (status, note) in [
            (
                pb::IncidentStatus::Resolved,
                "resolved when the simulator restarted",
            ),
            (pb::IncidentStatus::Closed, ""),
        ] {
            let _ = client
                .update_incident_status(ask(
                    "sim-supervisor",
                    pb::UpdateIncidentStatusRequest {
                        id: id.clone(),
                        status: status as i32,
                        note: note.into(),
                        claim_id: String::new(),
                    },
                ))
                .await;
        }
    }
    if !incidents.is_empty() {
        tracing::info!(
            incidents = incidents.len(),
            "closed what an earlier simulation left open"
        );
    }
    Ok(())
}

async fn pause(
    range: std::ops::Range<f64>,
    rng: &mut StdRng,
    shutdown: &CancellationToken,
) -> bool {
    let d = Duration::from_secs_f64(rng.random_range(range));
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

/// One console: claims from its queue and works each incident it takes.
async fn operator(api: Api, queue: String, seed: u64, shutdown: CancellationToken) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dispatch = api.dispatch.clone();
    let desk = format!("sim-{queue}-desk");
    while !shutdown.is_cancelled() {
        let claimed = dispatch
            .claim_next(ask(
                &desk,
                pb::ClaimNextRequest {
                    queue: queue.clone(),
                    lease: Some(prost_types::Duration {
                        seconds: 90,
                        nanos: 0,
                    }),
                },
            ))
            .await;
        let (claim, incident) = match claimed.map(tonic::Response::into_inner) {
            Ok(pb::ClaimNextResponse {
                claim: Some(claim),
                incident: Some(incident),
            }) => (claim, incident),
            Ok(_) => {
                // Nothing waits: look again in a moment.
                if !pause(1.5..3.0, &mut rng, &shutdown).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::debug!(queue, error = %e, "claim failed");
                if !pause(2.0..4.0, &mut rng, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Reading the incident, calling back the caller...
        if !pause(2.0..6.0, &mut rng, &shutdown).await {
            return;
        }
        let claim_id = claim.id.clone();
        if let Err(e) = work(&api, &desk, &queue, claim, incident, &mut rng, &shutdown).await {
            tracing::debug!(queue, error = %e, "simulated operator gave up an incident");
            // Back to the queue for the next attempt (if the claim still stands).
            let _ = dispatch
                .release_claim(ask(
                    &desk,
                    pb::ReleaseClaimRequest {
                        claim_id,
                        reason: format!("console error: {e}"),
                    },
                ))
                .await;
        }
    }
}

async fn work(
    api: &Api,
    desk: &str,
    queue: &str,
    claim: pb::Claim,
    incident: pb::Incident,
    rng: &mut StdRng,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut dispatch = api.dispatch.clone();
    let mut incidents = api.incidents.clone();
    if rng.random_bool(0.08) {
        incidents
            .update_incident_status(ask(
                desk,
                pb::UpdateIncidentStatusRequest {
                    id: incident.id.clone(),
                    status: pb::IncidentStatus::Dismissed as i32,
                    note: "false alarm: confirmed on camera".into(),
                    claim_id: claim.id,
                },
            ))
            .await?;
        tracing::info!(number = %incident.number, "simulated operator dismissed a false alarm");
        return Ok(());
    }
    if queue == "police" && incident.category == "panic_alarm" && rng.random_bool(0.2) {
        dispatch
            .transfer_incident(ask(
                desk,
                pb::TransferIncidentRequest {
                    incident_id: incident.id.clone(),
                    queue: "ems".into(),
                    reason: "the caller reports a medical emergency".into(),
                    claim_id: claim.id,
                },
            ))
            .await?;
        tracing::info!(number = %incident.number, "simulated operator transferred an incident to EMS");
        return Ok(());
    }
    let wanted = if incident.priority == pb::Priority::P1 as i32 {
        2
    } else {
        1
    };
    let recommended = api
        .units
        .clone()
        .recommend_units(pb::RecommendUnitsRequest {
            incident_id: incident.id.clone(),
            max_units: wanted,
        })
        .await?
        .into_inner()
        .recommendations;
    let crews: Vec<pb::Unit> = recommended.into_iter().filter_map(|r| r.unit).collect();
    if crews.is_empty() {
        dispatch
            .release_claim(ask(
                desk,
                pb::ReleaseClaimRequest {
                    claim_id: claim.id,
                    reason: "no unit available".into(),
                },
            ))
            .await?;
        pause(5.0..10.0, rng, shutdown).await;
        return Ok(());
    }
    dispatch
        .dispatch_units(ask(
            desk,
            pb::DispatchUnitsRequest {
                claim_id: claim.id,
                unit_ids: crews.iter().map(|u| u.id.clone()).collect(),
            },
        ))
        .await?;
    let names: Vec<&str> = crews.iter().map(|u| u.call_sign.as_str()).collect();
    tracing::info!(number = %incident.number, units = ?names, "simulated operator dispatched units");
    // The response runs on while the operator takes the next incident.
    let api = api.clone();
    let mut crew_rng = StdRng::seed_from_u64(rng.random());
    let shutdown = shutdown.clone();
    let desk = desk.to_owned();
    tokio::spawn(async move {
        if let Err(e) = respond(&api, &desk, &incident, &crews, &mut crew_rng, &shutdown).await {
            tracing::debug!(number = %incident.number, error = %e, "simulated response ended early");
        }
    });
    Ok(())
}

/// Each crew reports a status, as itself.
async fn report(
    units: &mut UnitServiceClient<client::Api>,
    crews: &[pb::Unit],
    status: pb::UnitStatus,
) -> anyhow::Result<()> {
    for crew in crews {
        units
            .update_unit_status(ask(
                &crew.call_sign,
                pb::UpdateUnitStatusRequest {
                    unit_id: crew.id.clone(),
                    status: status as i32,
                },
            ))
            .await?;
    }
    Ok(())
}

/// The crews drive there, work the scene, and the operator resolves and closes the incident.
async fn respond(
    api: &Api,
    desk: &str,
    incident: &pb::Incident,
    crews: &[pb::Unit],
    rng: &mut StdRng,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut units = api.units.clone();
    let mut incidents = api.incidents.clone();
    if !pause(3.0..8.0, rng, shutdown).await {
        return Ok(());
    }
    report(&mut units, crews, pb::UnitStatus::EnRoute).await?;
    // On the way: each crew reports its position, closing in on the scene.
    let target = incident.location;
    for step in 1..=4 {
        if !pause(2.0..4.0, rng, shutdown).await {
            return Ok(());
        }
        for crew in crews {
            if let (Some(from), Some(to)) = (crew.location, target) {
                let f = f64::from(step) / 4.0;
                units
                    .report_unit_location(pb::ReportUnitLocationRequest {
                        unit_id: crew.id.clone(),
                        location: Some(pb::GeoPoint {
                            lat: from.lat + (to.lat - from.lat) * f,
                            lon: from.lon + (to.lon - from.lon) * f,
                        }),
                        time: None,
                    })
                    .await?;
            }
        }
    }
    report(&mut units, crews, pb::UnitStatus::OnScene).await?;
    if !pause(10.0..25.0, rng, shutdown).await {
        return Ok(());
    }
    for (status, note) in [
        (
            pb::IncidentStatus::Resolved,
            "situation under control; units released",
        ),
        (pb::IncidentStatus::Closed, "report filed"),
    ] {
        incidents
            .update_incident_status(ask(
                desk,
                pb::UpdateIncidentStatusRequest {
                    id: incident.id.clone(),
                    status: status as i32,
                    note: note.into(),
                    claim_id: String::new(),
                },
            ))
            .await?;
        if !pause(3.0..6.0, rng, shutdown).await {
            return Ok(());
        }
    }
    tracing::info!(number = %incident.number, "incident closed");
    Ok(())
}
