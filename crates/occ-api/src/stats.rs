//! `StatsService`: the operations center's wall, counts of events and incidents per zone and
//! type per hour or day, read from the counts the store keeps as they commit
//! ([`occ_store::counts`]).
//!
//! Event counts are for every role that reads incidents (the wall is the whole room's);
//! incident counts only cover the queues the caller sees, as incidents themselves do.

use occ_domain::access::Principal;
use occ_domain::wall::{Buckets, Counted, Dimension, Granularity, MAX_COUNTS, Split};
use occ_domain::{FieldError, QueueName};
use occ_proto::v1::{self as pb, stats_service_server::StatsService};
use occ_store::counts::{self, Count, CountQuery};
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert::timestamp;
use crate::error::{ApiError, ApiResult};
use crate::fields::{self, Check, list};

#[derive(Debug, Clone)]
pub struct StatsApi {
    state: ApiState,
}

/// What every counting request asks, read and checked.
struct Asked<'a> {
    time_range: Option<&'a pb::TimeRange>,
    granularity: i32,
    zones: &'a [String],
    types_field: &'static str,
    types: &'a [String],
    group_by: &'a [i32],
}

impl StatsApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    /// The query `asked` makes, or every bad field named.
    fn query(&self, counted: Counted, asked: &Asked<'_>, check: &mut Check) -> Option<CountQuery> {
        let granularity = match pb::Granularity::try_from(asked.granularity) {
            Ok(pb::Granularity::Hour) => Some(Granularity::Hour),
            Ok(pb::Granularity::Day) => Some(Granularity::Day),
            _ => {
                check.push(FieldError::new(
                    "granularity",
                    "is required: GRANULARITY_HOUR or GRANULARITY_DAY",
                ));
                None
            }
        };
        let buckets = granularity.and_then(|g| {
            let window = check.take(fields::window("time_range", asked.time_range, g.longest()))?;
            let kept = self.state.hourly_counts_kept;
            if g == Granularity::Hour && window.from < self.state.clock.now() - kept {
                check.push(FieldError::new(
                    "time_range.start_time",
                    format!(
                        "hours are kept for {} days (--hourly-count-retention); ask for days",
                        kept.num_days()
                    ),
                ));
                return None;
            }
            check.take(Buckets::parse(
                "time_range",
                Some(window.from),
                Some(window.to),
                g,
            ))
        });
        list("zones", asked.zones, check);
        let kinds = fields::types(asked.types_field, asked.types, check);
        let mut dimensions = Vec::with_capacity(asked.group_by.len());
        for (i, d) in asked.group_by.iter().enumerate() {
            match pb::CountDimension::try_from(*d) {
                Ok(pb::CountDimension::Time) => dimensions.push(Dimension::Time),
                Ok(pb::CountDimension::Zone) => dimensions.push(Dimension::Zone),
                Ok(pb::CountDimension::Type) => dimensions.push(Dimension::Kind),
                Ok(pb::CountDimension::Queue) => dimensions.push(Dimension::Queue),
                Ok(pb::CountDimension::Priority) => dimensions.push(Dimension::Priority),
                _ => check.push(FieldError::new(
                    format!("group_by[{i}]"),
                    "must be a dimension: TIME, ZONE, TYPE, QUEUE or PRIORITY",
                )),
            }
        }
        let split = (dimensions.len() == asked.group_by.len())
            .then(|| check.take(Split::parse("group_by", counted, &dimensions)))
            .flatten();
        Some(CountQuery {
            buckets: buckets?,
            split: split?,
            zones: (!asked.zones.is_empty()).then(|| asked.zones.to_vec()),
            kinds: (!kinds.is_empty()).then(|| kinds.iter().map(|(_, g)| g.to_like()).collect()),
            queues: None,
            // One more than allowed: telling a full answer from a cut one.
            limit: i64::try_from(MAX_COUNTS).unwrap_or(i64::MAX) + 1,
        })
    }

    /// The counts and the city's time zone, refusing an answer too large.
    async fn answer(
        &self,
        counted: Counted,
        q: &CountQuery,
    ) -> ApiResult<(Vec<pb::Count>, String)> {
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let found = match counted {
            Counted::Events => counts::events(&mut conn, q).await?,
            Counted::Incidents => counts::incidents(&mut conn, q).await?,
        };
        if found.len() > MAX_COUNTS {
            return Err(ApiError::invalid(
                "group_by",
                format!(
                    "the answer would hold more than {MAX_COUNTS} counts: group by fewer \
                     dimensions, narrow the time range, or ask for days"
                ),
            ));
        }
        let time_zone = counts::time_zone(&mut conn).await?;
        Ok((found.into_iter().map(count_of).collect(), time_zone))
    }
}

fn count_of(c: Count) -> pb::Count {
    pb::Count {
        bucket: c.bucket.map(timestamp),
        zone: c.zone.unwrap_or_default(),
        r#type: c.kind.unwrap_or_default(),
        queue: c.queue.unwrap_or_default(),
        priority: c.priority.map_or(0, i32::from),
        count: c.n,
    }
}

/// The queues counted for `who`: those it named, each within its scope, or all it sees.
fn queues(who: &Principal, named: &[String], check: &mut Check) -> ApiResult<Option<Vec<String>>> {
    if named.is_empty() {
        return Ok(who.scope.queues());
    }
    list("queues", named, check);
    let mut queues = Vec::with_capacity(named.len());
    for (i, q) in named.iter().enumerate() {
        let Some(queue) = check.take(QueueName::parse(&format!("queues[{i}]"), q)) else {
            continue;
        };
        crate::incidents::queue_in_scope(who, &queue)?;
        queues.push(queue.as_str().to_owned());
    }
    Ok(Some(queues))
}

#[tonic::async_trait]
impl StatsService for StatsApi {
    async fn count_events(
        &self,
        request: Request<pb::CountEventsRequest>,
    ) -> Result<Response<pb::CountEventsResponse>, Status> {
        let req = request.into_inner();
        let mut check = Check::default();
        let asked = Asked {
            time_range: req.time_range.as_ref(),
            granularity: req.granularity,
            zones: &req.zones,
            types_field: "types",
            types: &req.types,
            group_by: &req.group_by,
        };
        let q = self.query(Counted::Events, &asked, &mut check);
        check.finish()?;
        let q = q.ok_or_else(|| ApiError::Internal("a checked field is missing".into()))?;
        let (counts, time_zone) = self.answer(Counted::Events, &q).await?;
        Ok(Response::new(pb::CountEventsResponse { counts, time_zone }))
    }

    async fn count_incidents(
        &self,
        request: Request<pb::CountIncidentsRequest>,
    ) -> Result<Response<pb::CountIncidentsResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let asked = Asked {
            time_range: req.time_range.as_ref(),
            granularity: req.granularity,
            zones: &req.zones,
            types_field: "categories",
            types: &req.categories,
            group_by: &req.group_by,
        };
        let q = self.query(Counted::Incidents, &asked, &mut check);
        let queues = queues(&who, &req.queues, &mut check)?;
        check.finish()?;
        let mut q = q.ok_or_else(|| ApiError::Internal("a checked field is missing".into()))?;
        q.queues = queues;
        let (counts, time_zone) = self.answer(Counted::Incidents, &q).await?;
        Ok(Response::new(pb::CountIncidentsResponse {
            counts,
            time_zone,
        }))
    }
}
