//! `DispatchService`: queues, claims, dispatch, transfers and queue watches.

use chrono::TimeDelta;
use occ_domain::QueueName;
use occ_domain::claim::Lease;
use occ_proto::v1::{self as pb, dispatch_service_server::DispatchService};
use occ_store::{dispatch, queues};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::incidents::{find_visible, queue_in_scope};
use crate::principal::Principal;
use crate::watch::{self, WatchStream};

/// A claim's lease when the request names none.
const DEFAULT_LEASE: TimeDelta = TimeDelta::minutes(2);

#[derive(Debug, Clone)]
pub struct DispatchApi {
    state: ApiState,
}

pub(crate) fn parse_uuid(field: &str, value: &str) -> ApiResult<Uuid> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value)
        .map_err(|_| ApiError::invalid(field, format!("must be a UUID, got {value:?}")))
}

pub(crate) fn parse_queue(field: &str, value: &str) -> ApiResult<QueueName> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    QueueName::parse(field, value).map_err(|e| ApiError::InvalidArgument(e.into()))
}

fn lease(field: &str, d: Option<&prost_types::Duration>) -> ApiResult<Lease> {
    let duration = match d {
        None => DEFAULT_LEASE,
        Some(d) => convert::whole_seconds(field, d)
            .map(TimeDelta::seconds)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?,
    };
    Lease::new(duration).map_err(ApiError::InvalidArgument)
}

impl DispatchApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn list_queues(&self) -> ApiResult<pb::ListQueuesResponse> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let queues = queues::summaries(&mut conn)
            .await?
            .into_iter()
            .map(|q| pb::Queue {
                waiting_total: q.waiting_total(),
                waiting: q
                    .waiting
                    .iter()
                    .map(|(p, n)| pb::PriorityCount {
                        priority: convert::priority(*p),
                        count: *n,
                    })
                    .collect(),
                oldest_waiting_age: q.oldest_waiting_age.map(convert::duration),
                claimed: q.claimed,
                escalated_waiting: q.escalated_waiting,
                name: q.name,
                display_name: q.display_name,
                agency: q.agency,
            })
            .collect();
        Ok(pb::ListQueuesResponse { queues })
    }

    async fn put_queue(
        &self,
        who: &Principal,
        req: pb::PutQueueRequest,
    ) -> ApiResult<pb::PutQueueResponse> {
        let name = parse_queue("name", &req.name)?;
        for (field, value) in [("display_name", &req.display_name), ("agency", &req.agency)] {
            if value.trim().is_empty() || value.len() > 100 || value.chars().any(char::is_control) {
                return Err(ApiError::invalid(
                    field,
                    "must be 1 to 100 bytes without control characters",
                ));
            }
        }
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let created =
            queues::put(&mut tx, &name, &req.display_name, &req.agency, &who.subject).await?;
        occ_store::commit(tx).await?;
        tracing::info!(queue = %name, agency = %req.agency, created, actor = %who.subject, "queue stored");
        Ok(pb::PutQueueResponse { created })
    }

    async fn claim_next(
        &self,
        who: &Principal,
        req: pb::ClaimNextRequest,
    ) -> ApiResult<pb::ClaimNextResponse> {
        let queue = parse_queue("queue", &req.queue)?;
        let lease = lease("lease", req.lease.as_ref())?;
        queue_in_scope(who, &queue)?;
        // The claim is one statement: no transaction around it.
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let claimed = dispatch::claim_next(&mut conn, queue.as_str(), &who.subject, lease).await?;
        // Only an empty answer needs to know whether the queue exists: a claim proves it.
        if claimed.is_none() && queues::agency(&mut conn, queue.as_str()).await?.is_none() {
            return Err(ApiError::NotFound("queue"));
        }
        let outcome = if claimed.is_some() {
            "claimed"
        } else {
            "empty"
        };
        metrics::counter!("occ_claims_total", "queue" => queue.as_str().to_owned(), "outcome" => outcome)
            .increment(1);
        Ok(match claimed {
            None => pb::ClaimNextResponse::default(),
            Some(incident) => pb::ClaimNextResponse {
                claim: incident
                    .claim
                    .as_ref()
                    .map(|c| convert::claim(incident.id, c)),
                incident: Some(convert::incident(&incident)),
            },
        })
    }

    async fn release(
        &self,
        who: &Principal,
        req: pb::ReleaseClaimRequest,
    ) -> ApiResult<pb::ReleaseClaimResponse> {
        let claim = parse_uuid("claim_id", &req.claim_id)?;
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let incident = dispatch::release(&mut tx, claim, &who.subject, &req.reason).await?;
        occ_store::commit(tx).await?;
        Ok(pb::ReleaseClaimResponse {
            incident: Some(convert::incident(&incident)),
        })
    }

    async fn extend(
        &self,
        who: &Principal,
        req: pb::ExtendClaimRequest,
    ) -> ApiResult<pb::ExtendClaimResponse> {
        let claim = parse_uuid("claim_id", &req.claim_id)?;
        let lease = lease("lease", req.lease.as_ref())?;
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let (incident, info) = dispatch::extend(&mut tx, claim, &who.subject, lease).await?;
        occ_store::commit(tx).await?;
        Ok(pb::ExtendClaimResponse {
            claim: Some(convert::claim(incident.id, &info)),
        })
    }

    async fn dispatch_units(
        &self,
        who: &Principal,
        req: pb::DispatchUnitsRequest,
    ) -> ApiResult<pb::DispatchUnitsResponse> {
        let claim = parse_uuid("claim_id", &req.claim_id)?;
        if req.unit_ids.is_empty() {
            return Err(ApiError::invalid("unit_ids", "name at least one unit"));
        }
        let references: Vec<&str> = req.unit_ids.iter().map(String::as_str).collect();
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let (incident, dispatched) =
            dispatch::dispatch_units(&mut tx, claim, &who.subject, &references).await?;
        // Only units of the caller's agencies (the transaction rolls back otherwise).
        if let Some(i) = dispatched.iter().position(|u| !who.works_agency(&u.agency)) {
            crate::principal::out_of_scope(who, "unit");
            return Err(ApiError::PermissionDenied(format!(
                "unit_ids[{i}]: {} does not work units of agency {}",
                who.subject, dispatched[i].agency
            )));
        }
        occ_store::commit(tx).await?;
        Ok(pb::DispatchUnitsResponse {
            incident: Some(convert::incident(&incident)),
            units: dispatched.iter().map(convert::unit).collect(),
        })
    }

    async fn transfer(
        &self,
        who: &Principal,
        req: pb::TransferIncidentRequest,
    ) -> ApiResult<pb::TransferIncidentResponse> {
        let queue = parse_queue("queue", &req.queue)?;
        let claim = if req.claim_id.is_empty() {
            None
        } else {
            Some(parse_uuid("claim_id", &req.claim_id)?)
        };
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let incident = find_visible(&mut tx, who, &req.incident_id)
            .await
            .map_err(|e| rename(e, "incident_id"))?;
        let moved = dispatch::transfer(
            &mut tx,
            incident.id,
            queue.as_str(),
            &req.reason,
            claim,
            &who.subject,
        )
        .await?;
        occ_store::commit(tx).await?;
        Ok(pb::TransferIncidentResponse {
            incident: Some(convert::incident(&moved)),
        })
    }
}

/// The same error, reported on the request's own field name.
pub(crate) fn rename(e: ApiError, field: &str) -> ApiError {
    match e {
        ApiError::InvalidArgument(errors) => {
            ApiError::InvalidArgument(occ_domain::FieldErrors::one(
                field,
                errors
                    .errors()
                    .first()
                    .map(|f| f.message.clone())
                    .unwrap_or_default(),
            ))
        }
        other => other,
    }
}

#[tonic::async_trait]
impl DispatchService for DispatchApi {
    type WatchQueueStream = WatchStream<pb::WatchQueueResponse>;

    #[tracing::instrument(skip_all)]
    async fn list_queues(
        &self,
        _: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        Ok(Response::new(self.list_queues().await?))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().name))]
    async fn put_queue(
        &self,
        request: Request<pb::PutQueueRequest>,
    ) -> Result<Response<pb::PutQueueResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.put_queue(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn claim_next(
        &self,
        request: Request<pb::ClaimNextRequest>,
    ) -> Result<Response<pb::ClaimNextResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.claim_next(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(claim = %request.get_ref().claim_id))]
    async fn release_claim(
        &self,
        request: Request<pb::ReleaseClaimRequest>,
    ) -> Result<Response<pb::ReleaseClaimResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.release(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(claim = %request.get_ref().claim_id))]
    async fn extend_claim(
        &self,
        request: Request<pb::ExtendClaimRequest>,
    ) -> Result<Response<pb::ExtendClaimResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.extend(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(claim = %request.get_ref().claim_id))]
    async fn dispatch_units(
        &self,
        request: Request<pb::DispatchUnitsRequest>,
    ) -> Result<Response<pb::DispatchUnitsResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.dispatch_units(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(incident = %request.get_ref().incident_id))]
    async fn transfer_incident(
        &self,
        request: Request<pb::TransferIncidentRequest>,
    ) -> Result<Response<pb::TransferIncidentResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.transfer(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn watch_queue(
        &self,
        request: Request<pb::WatchQueueRequest>,
    ) -> Result<Response<Self::WatchQueueStream>, Status> {
        let who = crate::principal::of(&request);
        let queue = parse_queue("queue", &request.get_ref().queue)?;
        queue_in_scope(&who, &queue)?;
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        if queues::agency(&mut conn, queue.as_str())
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::NotFound("queue").into());
        }
        drop(conn);
        let queues = Some(vec![queue.as_str().to_owned()]);
        let stream = watch::watch(&self.state, &who, queues, "WatchQueue", |change| {
            pb::WatchQueueResponse {
                change: Some(change),
            }
        })
        .await?;
        Ok(Response::new(stream))
    }
}
