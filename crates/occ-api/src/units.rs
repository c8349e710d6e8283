//! `UnitService`: responders, their status and position, and recommendations.

use occ_domain::{GeoPoint, distance_m};
use occ_proto::v1::{self as pb, unit_service_server::UnitService};
use occ_store::units::{self, UnitFilter, UnitSpec};
use occ_store::{dispatch, queues};
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert;
use crate::dispatch::rename;
use crate::error::{ApiError, ApiResult};
use crate::incidents::find_visible;
use crate::paging;
use crate::principal::Principal;

#[derive(Debug, Clone)]
pub struct UnitApi {
    state: ApiState,
}

fn point(field: &str, p: Option<&pb::GeoPoint>) -> ApiResult<Option<GeoPoint>> {
    p.map(|p| GeoPoint::new(p.lat, p.lon))
        .transpose()
        .map_err(|e| {
            ApiError::invalid(
                format!("{field}.{}", e.field.trim_start_matches("location.")),
                e.message,
            )
        })
}

fn text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} bytes without control characters"),
        ));
    }
    Ok(())
}

async fn resolve(
    conn: &mut occ_store::PgConnection,
    field: &str,
    reference: &str,
) -> ApiResult<occ_domain::UnitId> {
    if reference.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Ok(units::resolve(conn, reference).await?)
}

/// A unit the caller may work: one of another agency is refused.
fn workable(who: &Principal, unit: units::Unit) -> ApiResult<units::Unit> {
    if who.works_agency(&unit.agency) {
        Ok(unit)
    } else {
        crate::principal::out_of_scope(who, "unit");
        Err(ApiError::PermissionDenied(format!(
            "{} does not work units of agency {}",
            who.subject, unit.agency
        )))
    }
}

impl UnitApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn upsert(
        &self,
        who: &Principal,
        req: pb::UpsertUnitRequest,
    ) -> ApiResult<pb::UpsertUnitResponse> {
        let unit = req
            .unit
            .ok_or_else(|| ApiError::invalid("unit", "is required"))?;
        text("unit.call_sign", &unit.call_sign, 64)?;
        text("unit.agency", &unit.agency, 64)?;
        if unit.home_station.len() > 200 {
            return Err(ApiError::invalid(
                "unit.home_station",
                "must be at most 200 bytes",
            ));
        }
        let spec = UnitSpec {
            call_sign: unit.call_sign,
            agency: unit.agency,
            home_station: unit.home_station,
            location: point("unit.location", unit.location.as_ref())?,
        };
        if !who.works_agency(&spec.agency) {
            crate::principal::out_of_scope(who, "unit");
            return Err(ApiError::PermissionDenied(format!(
                "{} does not work units of agency {}",
                who.subject, spec.agency
            )));
        }
        let mut tx = occ_store::begin(&self.state.pool).await?;
        // A unit that exists must be the caller's agency's before it may be changed.
        match units::resolve(&mut tx, &spec.call_sign).await {
            Ok(id) => {
                workable(who, units::get(&mut tx, id, true).await?)?;
            }
            Err(occ_store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (stored, created) =
            units::upsert(&mut tx, &spec, &who.subject, self.state.clock.now()).await?;
        occ_store::commit(tx).await?;
        Ok(pb::UpsertUnitResponse {
            unit: Some(convert::unit(&stored)),
            created,
        })
    }

    async fn list(
        &self,
        who: &Principal,
        req: pb::ListUnitsRequest,
    ) -> ApiResult<pb::ListUnitsResponse> {
        let statuses = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| convert::parse_unit_status(&format!("statuses[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let after = paging::parse_name_token(&req.page_token)?;
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = if req.incident_id.is_empty() {
            None
        } else {
            Some(
                find_visible(&mut conn, who, &req.incident_id)
                    .await
                    .map_err(|e| rename(e, "incident_id"))?
                    .id,
            )
        };
        let filter = UnitFilter {
            agency: (!req.agency.is_empty()).then_some(req.agency),
            within: who.scope.agencies(),
            statuses,
            incident,
        };
        let mut page = units::list(&mut conn, &filter, after.as_deref(), limit + 1).await?;
        let next_page_token = if page.len() as i64 > limit {
            page.truncate(usize::try_from(limit).unwrap_or(0));
            page.last()
                .map(|u| paging::name_token(&u.call_sign))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListUnitsResponse {
            units: page.iter().map(convert::unit).collect(),
            next_page_token,
        })
    }

    async fn update_status(
        &self,
        who: &Principal,
        req: pb::UpdateUnitStatusRequest,
    ) -> ApiResult<pb::UpdateUnitStatusResponse> {
        let to = convert::parse_unit_status("status", req.status)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let id = resolve(&mut tx, "unit_id", &req.unit_id).await?;
        workable(who, units::get(&mut tx, id, false).await?)?;
        let unit = dispatch::unit_status(&mut tx, id, to, &who.subject).await?;
        occ_store::commit(tx).await?;
        Ok(pb::UpdateUnitStatusResponse {
            unit: Some(convert::unit(&unit)),
        })
    }

    async fn report_location(
        &self,
        who: &Principal,
        req: pb::ReportUnitLocationRequest,
    ) -> ApiResult<pb::ReportUnitLocationResponse> {
        let at = point("location", req.location.as_ref())?
            .ok_or_else(|| ApiError::invalid("location", "is required"))?;
        let now = self.state.clock.now();
        let when = match &req.time {
            None => now,
            Some(t) => convert::from_timestamp("time", t)
                .map_err(|e| ApiError::InvalidArgument(e.into()))?,
        };
        // A fix from the future would hide every later one (older fixes are ignored).
        if when > now + chrono::TimeDelta::minutes(1) {
            return Err(ApiError::invalid("time", "is in the future"));
        }
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let id = resolve(&mut conn, "unit_id", &req.unit_id).await?;
        // A unit's agency does not change under a position report that matters: both are
        // the unit's own.
        workable(who, units::get(&mut conn, id, false).await?)?;
        let unit = units::report_location(&mut conn, id, at, when).await?;
        Ok(pb::ReportUnitLocationResponse {
            unit: Some(convert::unit(&unit)),
        })
    }

    async fn recommend(
        &self,
        who: &Principal,
        req: pb::RecommendUnitsRequest,
    ) -> ApiResult<pb::RecommendUnitsResponse> {
        let max = match req.max_units {
            n if n < 0 => return Err(ApiError::invalid("max_units", "must not be negative")),
            0 => 5,
            n => usize::try_from(n).unwrap_or(100).min(100),
        };
        let mut conn = occ_store::acquire(&self.state.pool).await?;
        let incident = find_visible(&mut conn, who, &req.incident_id)
            .await
            .map_err(|e| rename(e, "incident_id"))?;
        let agency = queues::agency(&mut conn, incident.queue.as_str())
            .await?
            .ok_or(ApiError::NotFound("queue"))?;
        let mut ranked: Vec<(Option<f64>, units::Unit)> = units::available(&mut conn, &agency)
            .await?
            .into_iter()
            .map(|u| {
                let d = incident
                    .location
                    .zip(u.location)
                    .map(|(a, b)| distance_m(a, b));
                (d, u)
            })
            .collect();
        // Nearest first; unknown distances last, by call sign.
        ranked.sort_by(|(da, a), (db, b)| match (da, db) {
            (Some(x), Some(y)) => x.total_cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.call_sign.cmp(&b.call_sign),
        });
        ranked.truncate(max);
        Ok(pb::RecommendUnitsResponse {
            recommendations: ranked
                .iter()
                .map(|(d, u)| pb::UnitRecommendation {
                    unit: Some(convert::unit(u)),
                    distance_m: *d,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl UnitService for UnitApi {
    #[tracing::instrument(skip_all)]
    async fn upsert_unit(
        &self,
        request: Request<pb::UpsertUnitRequest>,
    ) -> Result<Response<pb::UpsertUnitResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.upsert(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn list_units(
        &self,
        request: Request<pb::ListUnitsRequest>,
    ) -> Result<Response<pb::ListUnitsResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(self.list(&who, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(unit = %request.get_ref().unit_id))]
    async fn update_unit_status(
        &self,
        request: Request<pb::UpdateUnitStatusRequest>,
    ) -> Result<Response<pb::UpdateUnitStatusResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.update_status(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(unit = %request.get_ref().unit_id))]
    async fn report_unit_location(
        &self,
        request: Request<pb::ReportUnitLocationRequest>,
    ) -> Result<Response<pb::ReportUnitLocationResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.report_location(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(incident = %request.get_ref().incident_id))]
    async fn recommend_units(
        &self,
        request: Request<pb::RecommendUnitsRequest>,
    ) -> Result<Response<pb::RecommendUnitsResponse>, Status> {
        let who = crate::principal::of(&request);
        Ok(Response::new(
            self.recommend(&who, request.into_inner()).await?,
        ))
    }
}
