//! `IngestService`: events from gateways that do not speak MQTT.

use chrono::Utc;
use occ_domain::{Delivery, Enriched, Event, FieldErrors, RuleSet};
use occ_proto::v1::{self as pb, ingest_service_server::IngestService};
use occ_store::Transport;
use occ_store::dead_letters::DeadLetter;
use occ_store::ingest::{
    Batch, BatchOutcome, Commit, EventOutcome, Parts, commit_batch, commit_parts,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::principal::Principal;

/// The most events one `PublishEvents` call may carry.
pub const MAX_EVENTS_PER_CALL: usize = 1000;

/// What dead letters from this service name as their topic.
const DEAD_LETTER_TOPIC: &str = "grpc:/occ.v1.IngestService/PublishEvents";

#[derive(Debug, Clone)]
pub struct IngestApi {
    state: ApiState,
}

impl IngestApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn publish(
        &self,
        who: &Principal,
        req: pb::PublishEventsRequest,
    ) -> ApiResult<pb::PublishEventsResponse> {
        if req.events.is_empty() {
            return Err(ApiError::invalid("events", "must not be empty"));
        }
        if req.events.len() > MAX_EVENTS_PER_CALL {
            return Err(ApiError::invalid(
                "events",
                format!(
                    "at most {MAX_EVENTS_PER_CALL} events per call, got {}",
                    req.events.len()
                ),
            ));
        }
        // A gateway bound to sources speaks for those only: a call naming another is refused
        // whole, before anything is stored.
        if let Some(i) = req
            .events
            .iter()
            .position(|e| !who.may_publish(&e.source_id))
        {
            crate::principal::out_of_scope(who, "source");
            return Err(ApiError::PermissionDenied(format!(
                "events[{i}].source_id: {} may not publish for source {:?}",
                who.subject, req.events[i].source_id
            )));
        }
        let received_at = self.state.clock.now();
        let limits = &self.state.limits;
        // Per request event: its index among the valid events, or its errors.
        let mut parsed: Vec<Result<usize, FieldErrors>> = Vec::with_capacity(req.events.len());
        let mut events: Vec<Enriched> = Vec::new();
        let registry = self.state.registry.current();
        let mut dead_letters = Vec::new();
        for e in &req.events {
            // The producer-visible content: what it sent, without output-only fields.
            let content = pb::Event {
                id: String::new(),
                received_at: None,
                ..e.clone()
            }
            .encode_to_vec();
            let result = convert::event_input(e).and_then(|(source, input)| {
                Event::parse(source, input, &content, received_at, limits)
            });
            match result {
                Ok(mut event) => {
                    // A call is never delivered again: without an id, each event is new (a
                    // client that retries a call must send ids to be recognised).
                    event.idempotency_key = event.idempotency_key.scoped(&Delivery::Once);
                    parsed.push(Ok(events.len()));
                    events.push(registry.enrich(event));
                }
                Err(errors) => {
                    dead_letters.push(DeadLetter::new(
                        Transport::Grpc,
                        DEAD_LETTER_TOPIC,
                        &content,
                        limits.max_payload_bytes,
                        errors.to_string(),
                        received_at,
                    ));
                    parsed.push(Err(errors));
                }
            }
        }

        let stored = self.commit(&events, &dead_letters, received_at).await?;
        self.state.activity.record(
            events
                .iter()
                .zip(&stored.events)
                .filter(|(_, s)| !matches!(s, EventOutcome::Refused { .. }))
                .map(|(e, _)| (&e.event, false)),
        );

        let results = parsed
            .into_iter()
            .map(|p| match p {
                Err(errors) => pb::PublishResult {
                    outcome: pb::PublishOutcome::Rejected as i32,
                    violations: errors
                        .errors()
                        .iter()
                        .map(|f| pb::FieldViolation {
                            field: f.field.clone(),
                            description: f.message.clone(),
                        })
                        .collect(),
                    ..Default::default()
                },
                Ok(i) => match &stored.events[i] {
                    EventOutcome::Refused { .. } => pb::PublishResult {
                        outcome: pb::PublishOutcome::Rejected as i32,
                        violations: vec![pb::FieldViolation {
                            field: String::new(),
                            description: "the database refused a value of this event".into(),
                        }],
                        ..Default::default()
                    },
                    EventOutcome::Accepted {
                        event_id,
                        incidents,
                        ..
                    } => pb::PublishResult {
                        outcome: pb::PublishOutcome::Accepted as i32,
                        event_id: event_id.to_string(),
                        incidents: incidents
                            .iter()
                            .map(|l| pb::IncidentRef {
                                id: l.id.to_string(),
                                number: l.number.to_string(),
                                opened: l.opened,
                            })
                            .collect(),
                        violations: Vec::new(),
                    },
                    EventOutcome::Duplicate { existing } => pb::PublishResult {
                        outcome: pb::PublishOutcome::Duplicate as i32,
                        event_id: existing.map(|id| id.to_string()).unwrap_or_default(),
                        ..Default::default()
                    },
                },
            })
            .collect();
        Ok(pb::PublishEventsResponse { results })
    }

    /// Commits valid events and dead letters in one transaction; if PostgreSQL refuses a
    /// value in it, each event alone (see [`commit_parts`]): only the refused events are
    /// rejected, and kept as dead letters.
    async fn commit(
        &self,
        events: &[Enriched],
        dead_letters: &[DeadLetter],
        received_at: chrono::DateTime<Utc>,
    ) -> ApiResult<BatchOutcome> {
        let rules = self.state.rules.current();
        let pool = &self.state.pool;
        // Each event stands alone, then each dead letter of an invalid one.
        let n = events.len();
        let parts: Vec<_> = (0..n)
            .map(|i| (i..i + 1, 0..0))
            .chain((0..dead_letters.len()).map(|d| (n..n, d..d + 1)))
            .collect();
        let batch = Parts {
            events,
            dead_letters,
            transport: Transport::Grpc,
            parts: &parts,
        };
        let letter = |i: usize, reason: String| {
            let payload = match events.get(i) {
                Some(e) => serde_json::to_vec(&e.event).unwrap_or_default(),
                None => dead_letters[i - n].payload.clone(),
            };
            DeadLetter::new(
                Transport::Grpc,
                DEAD_LETTER_TOPIC,
                &payload,
                self.state.limits.max_payload_bytes,
                reason,
                received_at,
            )
        };
        // `Once` never gives up on its own: no `None` comes back.
        let committed = commit_parts(
            batch,
            &Once {
                pool,
                rules: &rules,
            },
            letter,
        )
        .await
        .ok_or(ApiError::Unavailable)?;
        Ok(committed?)
    }
}

/// A call's commit: once, its error answered to the caller.
struct Once<'a> {
    pool: &'a occ_store::PgPool,
    rules: &'a RuleSet,
}

impl Commit for Once<'_> {
    async fn commit(&self, batch: Batch<'_>) -> Option<occ_store::Result<BatchOutcome>> {
        Some(commit_batch(self.pool, batch, self.rules).await)
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    #[tracing::instrument(skip_all, fields(events = request.get_ref().events.len()))]
    async fn publish_events(
        &self,
        request: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.publish(&who, request.into_inner()).await?,
        ))
    }
}
