//! `IncidentService`: reading incidents and their timelines.

use occ_domain::{Incident, IncidentId, IncidentNumber, QueueName};
use occ_proto::v1::{self as pb, incident_service_server::IncidentService};
use occ_store::PgConnection;
use occ_store::incidents::{self, IncidentCursor, IncidentFilter};
use occ_store::timeline::{self, TimelineEntry};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::paging;
use crate::principal::Principal;
use crate::watch::{self, WatchStream};
use occ_store::dispatch;

#[derive(Debug, Clone)]
pub struct IncidentApi {
    state: ApiState,
}

/// Finds an incident by id (UUID) or number (`INC-2026-000123`).
pub(crate) async fn find(conn: &mut PgConnection, id: &str) -> ApiResult<Incident> {
    if let Ok(uuid) = Uuid::parse_str(id) {
        Ok(incidents::get(conn, IncidentId(uuid)).await?)
    } else if IncidentNumber::looks_valid(id) {
        Ok(incidents::get_by_number(conn, id).await?)
    } else if id.is_empty() {
        Err(ApiError::invalid("id", "is required"))
    } else {
        Err(ApiError::invalid(
            "id",
            format!("must be an incident id (UUID) or number (INC-2026-000123), got {id:?}"),
        ))
    }
}

/// The incident, if the caller may see it: one outside its scope is not found, exactly as
/// one that does not exist.
pub(crate) fn visible(who: &Principal, incident: Incident) -> ApiResult<Incident> {
    if who.sees_queue(incident.queue.as_str()) {
        Ok(incident)
    } else {
        crate::principal::out_of_scope(who, "incident");
        Err(ApiError::NotFound("incident"))
    }
}

/// Finds an incident the caller may see.
pub(crate) async fn find_visible(
    conn: &mut PgConnection,
    who: &Principal,
    id: &str,
) -> ApiResult<Incident> {
    visible(who, find(conn, id).await?)
}

/// A queue the caller works (or reads): refused, not hidden, since queues are no secret.
pub(crate) fn queue_in_scope(who: &Principal, queue: &QueueName) -> ApiResult<()> {
    if who.sees_queue(queue.as_str()) {
        Ok(())
    } else {
        crate::principal::out_of_scope(who, "queue");
        Err(ApiError::PermissionDenied(format!(
            "{} is not granted queue {queue}",
            who.subject
        )))
    }
}

/// The queues a caller asked for, within its scope: the one it named, or all it sees.
pub(crate) fn scoped_queues(
    who: &Principal,
    queue: Option<&QueueName>,
) -> ApiResult<Option<Vec<String>>> {
    match queue {
        Some(q) => {
            queue_in_scope(who, q)?;
            Ok(Some(vec![q.as_str().to_owned()]))
        }
        None => Ok(who.scope.queues()),
    }
}

impl IncidentApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    /// Records that `who` saw `incidents` (those of the recorded agencies), on `conn`.
    async fn record_read(
        &self,
        conn: &mut PgConnection,
        who: &Principal,
        method: &str,
        incidents: &[IncidentId],
    ) -> ApiResult<()> {
        occ_store::reads::record(
            conn,
            self.state.clock.now(),
            &who.subject,
            method,
            incidents,
            &self.state.recorded_agencies,
        )
        .await?;
        Ok(())
    }

    async fn get(
        &self,
        who: &Principal,
        req: pb::GetIncidentRequest,
    ) -> ApiResult<pb::GetIncidentResponse> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = find_visible(&mut conn, who, &req.id).await?;
        self.record_read(&mut conn, who, "GetIncident", &[incident.id])
            .await?;
        Ok(pb::GetIncidentResponse {
            incident: Some(convert::incident(&incident)),
        })
    }

    async fn cap(
        &self,
        who: &Principal,
        req: pb::GetIncidentCapRequest,
    ) -> ApiResult<pb::GetIncidentCapResponse> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = find_visible(&mut conn, who, &req.id).await?;
        self.record_read(&mut conn, who, "GetIncidentCap", &[incident.id])
            .await?;
        let polygons = incident
            .zone
            .as_ref()
            .and_then(|z| {
                self.state
                    .registry
                    .current()
                    .zones()
                    .get(z)
                    .map(|area| area.outer_rings())
            })
            .unwrap_or_default();
        Ok(pb::GetIncidentCapResponse {
            alert: occ_domain::cap::alert(&incident, &polygons, &self.state.cap),
        })
    }

    async fn eido(
        &self,
        who: &Principal,
        req: pb::GetIncidentEidoRequest,
    ) -> ApiResult<pb::GetIncidentEidoResponse> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = find_visible(&mut conn, who, &req.id).await?;
        self.record_read(&mut conn, who, "GetIncidentEido", &[incident.id])
            .await?;
        let agency = occ_store::queues::agency(&mut conn, incident.queue.as_str())
            .await?
            .unwrap_or_else(|| incident.queue.to_string());
        let issuer = self
            .state
            .cap
            .sender
            .rsplit('@')
            .next()
            .unwrap_or("occ")
            .to_owned();
        Ok(pb::GetIncidentEidoResponse {
            eido: occ_domain::eido::incident(&incident, &issuer, &agency).to_string(),
        })
    }

    async fn list(
        &self,
        who: &Principal,
        req: pb::ListIncidentsRequest,
    ) -> ApiResult<pb::ListIncidentsResponse> {
        let queue = if req.queue.is_empty() {
            None
        } else {
            Some(
                QueueName::parse("queue", &req.queue)
                    .map_err(|e| ApiError::InvalidArgument(e.into()))?,
            )
        };
        let statuses = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| convert::parse_status(&format!("statuses[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let min_priority = convert::parse_priority("min_priority", req.min_priority)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let limit = paging::page_size(req.page_size, 50, 500)?;
        let filters = format!("{:?}|{:?}|{:?}", queue, statuses, min_priority);
        let after = paging::parse_incident_token(&req.page_token, &filters)?;

        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let filter = IncidentFilter {
            within: scoped_queues(who, queue.as_ref())?,
            queue,
            statuses,
            min_priority,
        };
        let mut page = incidents::list(&mut conn, &filter, after, limit + 1).await?;
        let seen: Vec<IncidentId> = page.iter().take(limit as usize).map(|i| i.id).collect();
        self.record_read(&mut conn, who, "ListIncidents", &seen)
            .await?;
        let next_page_token = if page.len() as i64 > limit {
            page.truncate(usize::try_from(limit).unwrap_or(0));
            page.last()
                .map(|i| paging::incident_token(&IncidentCursor::after(i), &filters))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListIncidentsResponse {
            incidents: page.iter().map(convert::incident).collect(),
            next_page_token,
        })
    }

    async fn timeline(
        &self,
        who: &Principal,
        req: pb::GetTimelineRequest,
    ) -> ApiResult<pb::GetTimelineResponse> {
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let after = paging::parse_timeline_token(&req.page_token)?;
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = find_visible(&mut conn, who, &req.id).await?;
        self.record_read(&mut conn, who, "GetTimeline", &[incident.id])
            .await?;
        let mut page = timeline::page(&mut conn, incident.id, after, limit + 1).await?;
        let next_page_token = if page.len() as i64 > limit {
            page.truncate(usize::try_from(limit).unwrap_or(0));
            page.last()
                .map(|e| paging::timeline_token(&e.cursor()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let entries = page
            .iter()
            .map(|e| pb::TimelineEntry {
                time: Some(convert::timestamp(e.at())),
                entry: Some(match e {
                    TimelineEntry::Audit(a) => {
                        pb::timeline_entry::Entry::Audit(convert::audit_for(a, &who.subject))
                    }
                    TimelineEntry::Event(ev) => {
                        pb::timeline_entry::Entry::Event(convert::stored_event(ev))
                    }
                }),
            })
            .collect();
        Ok(pb::GetTimelineResponse {
            entries,
            next_page_token,
        })
    }
}

impl IncidentApi {
    async fn update_status(
        &self,
        who: &Principal,
        req: pb::UpdateIncidentStatusRequest,
    ) -> ApiResult<pb::UpdateIncidentStatusResponse> {
        let to = convert::parse_status("status", req.status)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        if req.note.len() > dispatch::MAX_NOTE_LEN {
            return Err(ApiError::invalid(
                "note",
                format!("must be at most {} bytes", dispatch::MAX_NOTE_LEN),
            ));
        }
        let claim = if req.claim_id.is_empty() {
            None
        } else {
            Some(crate::dispatch::parse_uuid("claim_id", &req.claim_id)?)
        };
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let incident = find_visible(&mut tx, who, &req.id).await?;
        // Checked again on the locked row: a transfer may have moved it in between.
        let updated = visible(
            who,
            dispatch::update_status(&mut tx, incident.id, to, &req.note, claim, &who.subject)
                .await?,
        )?;
        occ_store::commit(tx).await?;
        Ok(pb::UpdateIncidentStatusResponse {
            incident: Some(convert::incident(&updated)),
        })
    }

    async fn acknowledge(
        &self,
        who: &Principal,
        req: pb::AcknowledgeIncidentRequest,
    ) -> ApiResult<pb::AcknowledgeIncidentResponse> {
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let incident = find_visible(&mut tx, who, &req.id).await?;
        let updated = visible(
            who,
            dispatch::acknowledge(&mut tx, incident.id, &who.subject).await?,
        )?;
        occ_store::commit(tx).await?;
        Ok(pb::AcknowledgeIncidentResponse {
            incident: Some(convert::incident(&updated)),
        })
    }

    async fn add_note(
        &self,
        who: &Principal,
        req: pb::AddNoteRequest,
    ) -> ApiResult<pb::AddNoteResponse> {
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let incident = find_visible(&mut tx, who, &req.id).await?;
        let note = dispatch::add_note(&mut tx, incident.id, &req.text, &who.subject).await?;
        // The note's transaction holds the incident: a transfer committed since is seen here.
        visible(who, occ_store::incidents::get(&mut tx, incident.id).await?)?;
        occ_store::commit(tx).await?;
        Ok(pb::AddNoteResponse {
            entry: Some(pb::TimelineEntry {
                time: Some(convert::timestamp(note.at)),
                entry: Some(pb::timeline_entry::Entry::Audit(convert::audit(&note))),
            }),
        })
    }
}

#[tonic::async_trait]
impl IncidentService for IncidentApi {
    type WatchIncidentsStream = WatchStream<pb::WatchIncidentsResponse>;

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn update_incident_status(
        &self,
        request: Request<pb::UpdateIncidentStatusRequest>,
    ) -> Result<Response<pb::UpdateIncidentStatusResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.update_status(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn acknowledge_incident(
        &self,
        request: Request<pb::AcknowledgeIncidentRequest>,
    ) -> Result<Response<pb::AcknowledgeIncidentResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.acknowledge(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn add_note(
        &self,
        request: Request<pb::AddNoteRequest>,
    ) -> Result<Response<pb::AddNoteResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            IncidentApi::add_note(self, &who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(queue = %request.get_ref().queue))]
    async fn watch_incidents(
        &self,
        request: Request<pb::WatchIncidentsRequest>,
    ) -> Result<Response<Self::WatchIncidentsStream>, Status> {
        let who = crate::principal::of(&request);
        let queue = &request.get_ref().queue;
        let queue = if queue.is_empty() {
            None
        } else {
            let queue = crate::dispatch::parse_queue("queue", queue)?;
            queue_in_scope(&who, &queue)?;
            let mut conn = occ_store::acquire(&self.state.pool)
                .await
                .map_err(ApiError::from)?;
            if occ_store::queues::agency(&mut conn, queue.as_str())
                .await
                .map_err(ApiError::from)?
                .is_none()
            {
                return Err(ApiError::NotFound("queue").into());
            }
            Some(queue)
        };
        let queues = scoped_queues(&who, queue.as_ref())?;
        let stream = watch::watch(&self.state, &who, queues, "WatchIncidents", |change| {
            pb::WatchIncidentsResponse {
                change: Some(change),
            }
        })
        .await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn get_incident(
        &self,
        request: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::GetIncidentResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(self.get(&who, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn get_incident_cap(
        &self,
        request: Request<pb::GetIncidentCapRequest>,
    ) -> Result<Response<pb::GetIncidentCapResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(self.cap(&who, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn get_incident_eido(
        &self,
        request: Request<pb::GetIncidentEidoRequest>,
    ) -> Result<Response<pb::GetIncidentEidoResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(self.eido(&who, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_incidents(
        &self,
        request: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(self.list(&who, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().incident))]
    async fn export_incident(
        &self,
        request: Request<pb::ExportIncidentRequest>,
    ) -> Result<Response<pb::ExportIncidentResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let case = occ_domain::search::CaseRef::parse("case_reference", &req.case_reference)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let incident = {
            let mut conn = occ_store::acquire(&self.state.pool)
                .await
                .map_err(ApiError::from)?;
            find_visible(&mut conn, &who, &req.incident)
                .await
                .map_err(|e| crate::dispatch::rename(e, "incident"))?
        };
        let package = occ_store::export::incident(
            &self.state.pool,
            incident.id,
            &case,
            &who.subject,
            self.state.clock.now(),
        )
        .await
        .map_err(ApiError::from)?;
        tracing::info!(incident = %package.number, case = %case, actor = %who.subject,
            manifest_sha256 = %package.manifest_sha256, "incident exported");
        Ok(Response::new(pb::ExportIncidentResponse {
            files: package
                .files
                .into_iter()
                .map(|f| pb::ExportedFile {
                    path: f.path,
                    content: f.bytes,
                })
                .collect(),
            manifest_sha256: package.manifest_sha256,
        }))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn get_timeline(
        &self,
        request: Request<pb::GetTimelineRequest>,
    ) -> Result<Response<pb::GetTimelineResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.timeline(&who, request.into_inner()).await?,
        ))
    }
}
