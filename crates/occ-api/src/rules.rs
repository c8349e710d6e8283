//! `RuleService`: reading, changing and trying rules.

use occ_domain::{
    Candidate, Event, FieldError, FieldErrors, Rule, RuleId, RuleSet, plan_correlation,
};
use occ_proto::v1::{self as pb, rule_service_server::RuleService};
use occ_store::incidents;
use occ_store::rules;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::paging;
use crate::principal::Principal;

#[derive(Debug, Clone)]
pub struct RuleApi {
    state: ApiState,
}

/// Re-roots a rule's field errors under the request field that holds the rule.
fn rule_errors(prefix: &str, errors: FieldErrors) -> ApiError {
    let all: Vec<FieldError> = errors
        .errors()
        .iter()
        .map(|e| {
            FieldError::new(
                format!("{prefix}{}", convert::rule_field_path(&e.field)),
                e.message.clone(),
            )
        })
        .collect();
    ApiError::InvalidArgument(FieldErrors::from_vec(all).unwrap_or(errors))
}

fn input_errors(prefix: &str, errors: FieldErrors) -> ApiError {
    ApiError::InvalidArgument(errors.prefixed(prefix))
}

impl RuleApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn list(&self, req: pb::ListRulesRequest) -> ApiResult<pb::ListRulesResponse> {
        let limit = usize::try_from(paging::page_size(req.page_size, 100, 500)?).unwrap_or(100);
        let after = paging::parse_name_token(&req.page_token)?;
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let all = rules::list(&mut conn).await?;
        let mut page: Vec<&Rule> = all
            .iter()
            .filter(|r| after.as_deref().is_none_or(|a| r.name.as_str() > a))
            .take(limit + 1)
            .collect();
        let next_page_token = if page.len() > limit {
            page.truncate(limit);
            page.last()
                .map(|r| paging::name_token(r.name.as_str()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListRulesResponse {
            rules: page.into_iter().map(convert::rule).collect(),
            next_page_token,
        })
    }

    async fn put(
        &self,
        principal: &Principal,
        req: pb::PutRuleRequest,
    ) -> ApiResult<pb::PutRuleResponse> {
        let rule = req
            .rule
            .ok_or_else(|| ApiError::invalid("rule", "is required"))?;
        let input = convert::rule_input(&rule).map_err(|e| input_errors("rule.", e))?;
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let (stored, created) =
            rules::put(&mut tx, input, &principal.subject, self.state.clock.now())
                .await
                .map_err(|e| match e {
                    occ_store::StoreError::Invalid(errors) => rule_errors("rule.", errors),
                    other => other.into(),
                })?;
        occ_store::commit(tx).await?;
        self.state.rules.reload_now();
        tracing::info!(rule = %stored.name, created, actor = %principal.subject, "rule stored");
        Ok(pb::PutRuleResponse {
            rule: Some(convert::rule(&stored)),
            created,
        })
    }

    async fn delete(
        &self,
        principal: &Principal,
        req: pb::DeleteRuleRequest,
    ) -> ApiResult<pb::DeleteRuleResponse> {
        if req.name.is_empty() {
            return Err(ApiError::invalid("name", "is required"));
        }
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let rule = rules::delete(
            &mut tx,
            &req.name,
            &principal.subject,
            self.state.clock.now(),
        )
        .await?;
        occ_store::commit(tx).await?;
        self.state.rules.reload_now();
        tracing::info!(rule = %rule.name, actor = %principal.subject, "rule deleted");
        Ok(pb::DeleteRuleResponse {})
    }

    async fn test(&self, req: pb::TestRuleRequest) -> ApiResult<pb::TestRuleResponse> {
        let event = req
            .event
            .ok_or_else(|| ApiError::invalid("event", "is required"))?;
        let event = convert::event_input(&event)
            .and_then(|(source, input)| {
                Event::parse(
                    source,
                    input,
                    b"",
                    self.state.clock.now(),
                    &self.state.limits,
                )
            })
            .map_err(|e| input_errors("event.", e))?;
        // As ingest would see it: mapped, placed and checked against the watch lists. A
        // disabled source's events open nothing.
        let enriched = self.state.registry.current().enrich(event);
        if !enriched.evaluate_rules {
            return Ok(pb::TestRuleResponse {
                matches: Vec::new(),
            });
        }
        let event = enriched.event;
        let rules: std::sync::Arc<RuleSet> = match req.rule {
            // A draft is tried as if enabled: trying it is the point.
            Some(draft) => {
                let input = convert::rule_input(&draft).map_err(|e| input_errors("rule.", e))?;
                let rule = Rule::parse(
                    RuleId(Uuid::nil()),
                    occ_domain::RuleInput {
                        enabled: true,
                        ..input
                    },
                    self.state.clock.now(),
                )
                .map_err(|e| rule_errors("rule.", e))?;
                std::sync::Arc::new(RuleSet::new(vec![rule]))
            }
            None => self.state.rules.current(),
        };
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let mut matches = Vec::new();
        for hit in rules.evaluate(&event) {
            let current = incidents::find_correlating(&mut conn, &hit.correlation_key).await?;
            let open = current.as_ref().map(|i| occ_domain::OpenIncident {
                id: i.id,
                priority: i.priority,
                first_seen: i.first_seen,
                last_seen: i.last_seen,
            });
            let plan = plan_correlation(
                open.as_ref(),
                hit.correlation_window,
                &[Candidate {
                    observed_at: event.observed_at(),
                    priority: hit.priority,
                }],
            );
            let joins = plan.segments.first().and_then(|s| s.joins).is_some();
            matches.push(pb::RuleMatch {
                rule_name: hit.rule_name.to_string(),
                category: hit.category.to_string(),
                queue: hit.queue.to_string(),
                priority: convert::priority(hit.priority),
                title: hit.title.clone(),
                correlation_key: hit.correlation_key.clone(),
                outcome: if joins {
                    pb::TestOutcome::WouldJoin
                } else {
                    pb::TestOutcome::WouldOpen
                } as i32,
                incident: current.filter(|_| joins).as_ref().map(convert::incident),
            });
        }
        Ok(pb::TestRuleResponse { matches })
    }
}

#[tonic::async_trait]
impl RuleService for RuleApi {
    #[tracing::instrument(skip_all)]
    async fn list_rules(
        &self,
        request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn put_rule(
        &self,
        request: Request<pb::PutRuleRequest>,
    ) -> Result<Response<pb::PutRuleResponse>, Status> {
        let principal = crate::principal::of(&request);
        Ok(Response::new(
            self.put(&principal, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let principal = crate::principal::of(&request);
        Ok(Response::new(
            self.delete(&principal, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn test_rule(
        &self,
        request: Request<pb::TestRuleRequest>,
    ) -> Result<Response<pb::TestRuleResponse>, Status> {
        Ok(Response::new(self.test(request.into_inner()).await?))
    }
}
