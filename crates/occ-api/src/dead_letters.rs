//! `DeadLetterService`: what could not become events, to look at and to decode again.

use chrono::DateTime;
use occ_adapters::Message;
use occ_proto::v1::{self as pb, dead_letter_service_server::DeadLetterService};
use occ_store::dead_letters::{self, DeadLetterFilter, ReplayOutcome, StoredDeadLetter};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert::{from_timestamp, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::paging;
use crate::principal::Principal;

#[derive(Debug, Clone)]
pub struct DeadLetterApi {
    state: ApiState,
}

fn letter(d: &StoredDeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: d.id.to_string(),
        receive_time: Some(timestamp(d.received_at)),
        transport: d.transport.clone(),
        topic: d.topic.clone(),
        payload: d.payload.clone(),
        payload_size: d.payload_size,
        reason: d.reason.clone(),
        replays: d.replays,
        last_replay_time: d.last_replay_at.map(timestamp),
        resolve_time: d.resolved_at.map(timestamp),
        resolved_by: d.resolved_by.clone().unwrap_or_default(),
        resolved_events: d.resolved_events.unwrap_or(0),
    }
}

/// Decodes a stored message again with `adapters` and `registry`, as it would have been when
/// it arrived (relative times count from its receipt). The API and `occ dead-letters replay`
/// decode alike.
pub fn redecode<'a>(
    adapters: &'a occ_adapters::Adapters,
    registry: &'a occ_domain::Registry,
    limits: &'a occ_domain::Limits,
) -> impl Fn(&StoredDeadLetter) -> Result<Vec<occ_domain::Enriched>, String> + 'a {
    move |l: &StoredDeadLetter| {
        let message = Message {
            topic: &l.topic,
            payload: &l.payload,
            received_at: l.received_at,
        };
        // Replaying one letter twice stores its events once.
        let delivery = occ_domain::Delivery::DeadLetter(l.id);
        adapters
            .decode(&message, limits)
            .map(|events| {
                events
                    .into_iter()
                    .map(|mut e| {
                        e.idempotency_key = e.idempotency_key.scoped(&delivery);
                        registry.enrich(e)
                    })
                    .collect()
            })
            .map_err(|r| r.0)
    }
}

impl DeadLetterApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn replay(
        &self,
        who: &Principal,
        req: pb::ReplayDeadLettersRequest,
    ) -> ApiResult<pb::ReplayDeadLettersResponse> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let letters = if req.ids.is_empty() {
            let limit = paging::page_size(req.limit, 100, 1000)
                .map_err(|_| ApiError::invalid("limit", "must not be negative"))?;
            dead_letters::oldest_unresolved(
                &mut conn,
                (!req.topic_prefix.is_empty()).then_some(req.topic_prefix.as_str()),
                limit,
            )
            .await?
        } else {
            if req.ids.len() > 1000 {
                return Err(ApiError::invalid("ids", "at most 1000 per call"));
            }
            let ids = req
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    Uuid::parse_str(id).map_err(|_| {
                        ApiError::invalid(
                            format!("ids[{i}]"),
                            format!("must be a dead letter id (UUID), got {id:?}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let found = dead_letters::get_many(&mut conn, &ids).await?;
            if ids.iter().any(|id| !found.iter().any(|l| l.id == *id)) {
                return Err(ApiError::NotFound("dead letter"));
            }
            found
        };
        drop(conn);
        let rules = self.state.rules.current();
        let registry = self.state.registry.current();
        let outcomes = dead_letters::replay(
            &self.state.pool,
            &letters,
            redecode(&self.state.adapters, &registry, &self.state.limits),
            &rules,
            &who.subject,
        )
        .await?;
        let resolved = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, ReplayOutcome::Resolved { .. }))
            .count();
        tracing::info!(replayed = outcomes.len(), resolved, actor = %who.subject, "dead letters replayed");
        Ok(pb::ReplayDeadLettersResponse {
            results: outcomes
                .into_iter()
                .map(|(id, o)| {
                    let (outcome, events, reason) = match o {
                        ReplayOutcome::Resolved { events } => {
                            (pb::ReplayOutcome::Resolved, events, String::new())
                        }
                        ReplayOutcome::AlreadyResolved => {
                            (pb::ReplayOutcome::AlreadyResolved, 0, String::new())
                        }
                        ReplayOutcome::StillFailing(r) => (pb::ReplayOutcome::StillFailing, 0, r),
                        ReplayOutcome::NotReplayable(r) => (pb::ReplayOutcome::NotReplayable, 0, r),
                    };
                    pb::ReplayResult {
                        id: id.to_string(),
                        outcome: outcome as i32,
                        events: i32::try_from(events).unwrap_or(i32::MAX),
                        reason,
                    }
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetterApi {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let filter = DeadLetterFilter {
            unresolved: req.unresolved_only,
            topic_prefix: (!req.topic_prefix.is_empty()).then_some(req.topic_prefix.clone()),
            since: req
                .since
                .as_ref()
                .map(|t| from_timestamp("since", t))
                .transpose()
                .map_err(|e| ApiError::InvalidArgument(e.into()))?,
            until: req
                .until
                .as_ref()
                .map(|t| from_timestamp("until", t))
                .transpose()
                .map_err(|e| ApiError::InvalidArgument(e.into()))?,
        };
        let filters = paging::fingerprint(&format!(
            "{}|{}|{:?}|{:?}",
            filter.unresolved, req.topic_prefix, filter.since, filter.until
        ));
        let after = paging::parse_key_token("d1", &req.page_token, 3)?
            .map(|p| {
                if p[2] != filters {
                    return Err(paging::other_filters());
                }
                let at = p[0]
                    .parse()
                    .ok()
                    .and_then(DateTime::from_timestamp_micros)
                    .ok_or_else(paging::invalid_token)?;
                let id = Uuid::parse_str(&p[1]).map_err(|_| paging::invalid_token())?;
                Ok((at, id))
            })
            .transpose()?;
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let mut page = dead_letters::list(&mut conn, &filter, after, limit + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = paging::next_page(&mut page, limit, |d| {
            paging::key_token(
                "d1",
                &[
                    &d.received_at.timestamp_micros().to_string(),
                    &d.id.to_string(),
                    &filters,
                ],
            )
        });
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: page.iter().map(letter).collect(),
            next_page_token,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.replay(&who, request.into_inner()).await?,
        ))
    }
}
