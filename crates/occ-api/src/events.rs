//! `EventService`: stored events searched for investigations, every call on the record.
//!
//! A call is checked whole (every bad field named), then its caller's kinds are decided
//! ([`SearchGrants::kinds_for`]): a type asked for outside them is refused, and the search only
//! ever returns kinds within them. The search and the record of it (who, the case, everything
//! asked, how many results) are one transaction: nothing is returned that is not recorded.

use chrono::{DateTime, TimeDelta, Utc};
use occ_domain::access::Principal;
use occ_domain::glob::Glob;
use occ_domain::search::{Area, CaseRef, Kinds, Window};
use occ_domain::watchlist::parse_plate;
use occ_domain::{FieldError, GeoPoint};
use occ_proto::v1::{self as pb, event_service_server::EventService};
use occ_store::search::{self, EventCursor, EventFilter, Found, Order, Page, Search};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert::{incident, stored_event, struct_to_json, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::fields::{self, Check, list, window};
use crate::paging;

/// The longest window of a search, and of a plate's history.
const SEARCH_SPAN: TimeDelta = TimeDelta::days(31);
const PLATE_SPAN: TimeDelta = TimeDelta::days(366);
/// The widest area of a search, and of a look around an incident.
const SEARCH_RADIUS_M: f64 = 50_000.0;
const AROUND_RADIUS_M: f64 = 5_000.0;
const AROUND_DEFAULT_RADIUS_M: f64 = 500.0;
const AROUND_DEFAULT_MARGIN: TimeDelta = TimeDelta::minutes(15);
const AROUND_MAX_MARGIN: TimeDelta = TimeDelta::hours(24);
/// Rows an area search reads per call, at most (its page may then be short, with a next one).
const MAX_READ: i64 = 20_000;

#[derive(Debug, Clone)]
pub struct EventApi {
    state: ApiState,
}

impl EventApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    /// The kinds `who` may search, refusing a caller granted none.
    fn kinds(&self, who: &Principal) -> ApiResult<Kinds> {
        let kinds = self.state.search_grants.kinds_for(who);
        if kinds.is_nothing() {
            crate::principal::out_of_scope(who, "event search");
            return Err(ApiError::PermissionDenied(
                "no kind of event is granted to the caller's agencies for search \
                 (see --search-grants)"
                    .into(),
            ));
        }
        Ok(kinds)
    }

    /// Runs `search` and records it for `case`, in one transaction.
    async fn recorded<T>(
        &self,
        who: &Principal,
        case: &CaseRef,
        method: &str,
        parameters: Value,
        search: impl AsyncFnOnce(&mut occ_store::PgConnection) -> occ_store::Result<(T, usize)>,
    ) -> ApiResult<T> {
        let mut tx = search::begin(&self.state.pool).await?;
        let (out, results) = search(&mut tx).await?;
        search::record(
            &mut tx,
            &Search {
                at: self.state.clock.now(),
                actor: &who.subject,
                case,
                method,
                parameters,
                results,
            },
        )
        .await?;
        tx.commit().await.map_err(occ_store::StoreError::from)?;
        tracing::info!(actor = %who.subject, case = %case, method, results, "events searched");
        metrics::counter!("occ_event_searches_total", "method" => method.to_owned()).increment(1);
        Ok(out)
    }
}

/// What a paged search asks, beside its filter.
struct Paged<'a> {
    /// Which kind of search its page tokens belong to.
    tag: &'static str,
    page_token: &'a str,
    /// Every filter as given: recorded, and what a page token is bound to.
    filters: &'a Value,
    window: Window,
    area: Option<&'a Area>,
    order: Order,
    limit: i64,
}

impl EventApi {
    /// A page of events for `method`, run and recorded for `case`, and the next page's token.
    async fn page(
        &self,
        who: &Principal,
        case: &CaseRef,
        method: &str,
        filter: &EventFilter,
        paged: Paged<'_>,
    ) -> ApiResult<(Page, String)> {
        let after = cursor(paged.tag, paged.page_token, paged.filters)?;
        let mut parameters = paged.filters.clone();
        parameters["page_token"] = json!(paged.page_token);
        let page = self
            .recorded(who, case, method, parameters, async |conn| {
                let page = search::events(
                    conn,
                    paged.window,
                    filter,
                    paged.area,
                    paged.order,
                    after,
                    paged.limit,
                    MAX_READ,
                )
                .await?;
                let n = page.found.len();
                Ok((page, n))
            })
            .await?;
        let next = token(paged.tag, page.next, paged.filters);
        Ok((page, next))
    }
}

/// A page size: 100 when 0, at most 1,000.
fn page_size(requested: i32) -> Result<i64, FieldError> {
    paging::page_size(requested, 100, 1000)
        .map_err(|_| FieldError::new("page_size", "must not be negative"))
}

fn case(value: &str) -> Result<CaseRef, FieldError> {
    CaseRef::parse("case_reference", value)
}

fn point(field: &str, p: Option<&pb::GeoPoint>) -> Result<GeoPoint, FieldError> {
    let p = p.ok_or_else(|| FieldError::new(field, "is required"))?;
    GeoPoint::new(p.lat, p.lon).map_err(|e| {
        FieldError::new(
            format!("{field}.{}", e.field.trim_start_matches("location.")),
            e.message,
        )
    })
}

fn area(a: Option<&pb::search_events_request::Area>) -> Result<Option<Area>, FieldError> {
    use pb::search_events_request::Area as A;
    Ok(match a {
        None => None,
        Some(A::Polygon(p)) => {
            let vertices = p
                .vertices
                .iter()
                .enumerate()
                .map(|(i, v)| point(&format!("polygon.vertices[{i}]"), Some(v)))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Area::polygon("polygon.vertices", &vertices)?)
        }
        Some(A::Circle(c)) => Some(Area::circle(
            "circle",
            point("circle.center", c.center.as_ref())?,
            c.radius_m,
            SEARCH_RADIUS_M,
        )?),
    })
}

/// Event types asked for: exact or with `*`, each within the caller's kinds.
fn types(
    who: &Principal,
    kinds: &Kinds,
    requested: &[String],
    check: &mut Check,
) -> ApiResult<Vec<Glob>> {
    let globs = fields::types("types", requested, check);
    for (i, glob) in &globs {
        if !kinds.covers(glob) {
            crate::principal::out_of_scope(who, "event search");
            return Err(ApiError::PermissionDenied(format!(
                "types[{i}]: {:?} is outside the kinds of event granted to the caller's agencies",
                glob.as_str()
            )));
        }
    }
    Ok(globs.into_iter().map(|(_, g)| g).collect())
}

fn time_json(w: &Window) -> Value {
    json!({ "start_time": w.from.to_rfc3339(), "end_time": w.to.to_rfc3339() })
}

/// The page after `after`, and its token: valid only with the same parameters.
fn cursor(tag: &str, token: &str, parameters: &Value) -> ApiResult<Option<EventCursor>> {
    let Some(p) = paging::parse_key_token(tag, token, 3)? else {
        return Ok(None);
    };
    if p[2] != paging::fingerprint(&parameters.to_string()) {
        return Err(paging::other_filters());
    }
    let micros: i64 = p[0].parse().map_err(|_| paging::invalid_token())?;
    Ok(Some(EventCursor {
        seen_at: DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(paging::invalid_token)?,
        id: Uuid::parse_str(&p[1]).map_err(|_| paging::invalid_token())?,
    }))
}

fn token(tag: &str, next: Option<EventCursor>, parameters: &Value) -> String {
    next.map_or_else(String::new, |c| {
        paging::key_token(
            tag,
            &[
                &c.seen_at.timestamp_micros().to_string(),
                &c.id.to_string(),
                &paging::fingerprint(&parameters.to_string()),
            ],
        )
    })
}

fn sighting(f: &Found) -> pb::Sighting {
    let e = &f.event;
    let attr = |k: &str| e.attributes.get(k);
    pb::Sighting {
        event_id: e.id.to_string(),
        time: Some(timestamp(f.seen_at)),
        source_id: e.source_id.clone(),
        source_name: f.source_name.clone().unwrap_or_default(),
        location: e.lat.zip(e.lon).map(|(lat, lon)| pb::GeoPoint { lat, lon }),
        zone: e.zone.clone().unwrap_or_default(),
        district: e.district.clone().unwrap_or_default(),
        plate_read: attr("plate")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        confidence: e.confidence,
        watchlisted: attr("watchlisted").and_then(Value::as_bool) == Some(true),
        evidence: e.evidence.iter().map(crate::convert::evidence).collect(),
        event_type: e.event_type.clone(),
    }
}

/// The longest window a legal hold may cover.
const HOLD_SPAN: TimeDelta = TimeDelta::days(3660);

fn hold(h: &occ_store::partitions::Hold) -> pb::LegalHold {
    pb::LegalHold {
        id: h.id.to_string(),
        case_reference: h.case_ref.clone(),
        reason: h.reason.clone(),
        time_range: Some(pb::TimeRange {
            start_time: Some(timestamp(h.from)),
            end_time: Some(timestamp(h.to)),
        }),
        source_ids: h.sources.clone(),
        zones: h.zones.clone(),
        created_by: h.created_by.clone(),
        create_time: Some(timestamp(h.created_at)),
        released_by: h
            .released
            .as_ref()
            .map(|(by, _)| by.clone())
            .unwrap_or_default(),
        release_time: h.released.as_ref().map(|(_, at)| timestamp(*at)),
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn place_legal_hold(
        &self,
        request: Request<pb::PlaceLegalHoldRequest>,
    ) -> Result<Response<pb::PlaceLegalHoldResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let case = check.take(case(&req.case_reference));
        let window = check.take(window("time_range", req.time_range.as_ref(), HOLD_SPAN));
        if req.reason.len() > 1000 {
            check.push(FieldError::new("reason", "must be at most 1000 bytes"));
        }
        list("source_ids", &req.source_ids, &mut check);
        list("zones", &req.zones, &mut check);
        check.finish()?;
        let (Some(case), Some(window)) = (case, window) else {
            return Err(ApiError::Internal("a checked field is missing".into()).into());
        };
        let placed = occ_store::partitions::Hold {
            id: Uuid::now_v7(),
            case_ref: case.as_str().to_owned(),
            reason: req.reason,
            from: window.from,
            to: window.to,
            sources: req.source_ids,
            zones: req.zones,
            created_by: who.subject.clone(),
            // As PostgreSQL keeps it (microseconds), so the answer is what a list shows later.
            created_at: {
                let now = self.state.clock.now();
                DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
            },
            released: None,
        };
        let mut tx = occ_store::begin(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        occ_store::partitions::hold(&mut tx, &placed)
            .await
            .map_err(ApiError::from)?;
        occ_store::commit(tx).await.map_err(ApiError::from)?;
        tracing::info!(hold = %placed.id, case = %case, actor = %who.subject, "legal hold placed");
        Ok(Response::new(pb::PlaceLegalHoldResponse {
            hold: Some(hold(&placed)),
        }))
    }

    async fn list_legal_holds(
        &self,
        request: Request<pb::ListLegalHoldsRequest>,
    ) -> Result<Response<pb::ListLegalHoldsResponse>, Status> {
        let req = request.into_inner();
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let holds = occ_store::partitions::holds(&mut conn)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListLegalHoldsResponse {
            holds: holds
                .iter()
                .filter(|h| req.include_released || h.released.is_none())
                .map(hold)
                .collect(),
        }))
    }

    async fn release_legal_hold(
        &self,
        request: Request<pb::ReleaseLegalHoldRequest>,
    ) -> Result<Response<pb::ReleaseLegalHoldResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let id = Uuid::parse_str(&req.id).map_err(|_| {
            ApiError::invalid("id", format!("must be a hold id (UUID), got {:?}", req.id))
        })?;
        let mut tx = occ_store::begin(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let released =
            occ_store::partitions::release(&mut tx, id, &who.subject, self.state.clock.now())
                .await
                .map_err(ApiError::from)?;
        occ_store::commit(tx).await.map_err(ApiError::from)?;
        if !released {
            return Err(ApiError::NotFound("legal hold in force").into());
        }
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let holds = occ_store::partitions::holds(&mut conn)
            .await
            .map_err(ApiError::from)?;
        let Some(h) = holds.iter().find(|h| h.id == id) else {
            return Err(ApiError::NotFound("legal hold").into());
        };
        tracing::info!(hold = %id, actor = %who.subject, "legal hold released");
        Ok(Response::new(pb::ReleaseLegalHoldResponse {
            hold: Some(hold(h)),
        }))
    }

    async fn search_events(
        &self,
        request: Request<pb::SearchEventsRequest>,
    ) -> Result<Response<pb::SearchEventsResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let case = check.take(case(&req.case_reference));
        let window = check.take(window("time_range", req.time_range.as_ref(), SEARCH_SPAN));
        let area = check.take(area(req.area.as_ref())).flatten();
        let plate = (!req.plate.is_empty())
            .then(|| check.take(parse_plate("plate", &req.plate)))
            .flatten();
        let attributes = req
            .attributes
            .as_ref()
            .filter(|a| !a.fields.is_empty())
            .and_then(|a| check.take(struct_to_json("attributes", a)));
        if let Some(min) = req.min_confidence
            && !(0.0..=1.0).contains(&min)
        {
            check.push(FieldError::new(
                "min_confidence",
                format!("must be between 0 and 1, got {min}"),
            ));
        }
        list("source_ids", &req.source_ids, &mut check);
        list("zones", &req.zones, &mut check);
        let limit = check.take(page_size(req.page_size));
        let kinds = self.kinds(&who)?;
        let types = types(&who, &kinds, &req.types, &mut check)?;
        check.finish()?;
        let (Some(case), Some(window), Some(limit)) = (case, window, limit) else {
            return Err(ApiError::Internal("a checked field is missing".into()).into());
        };

        let filters = json!({
            "time_range": time_json(&window),
            "types": req.types,
            "source_ids": req.source_ids,
            "zones": req.zones,
            "area": area.as_ref().map(Area::to_json),
            "plate": plate.as_ref().map(|p| p.as_str()),
            "attributes": attributes,
            "min_confidence": req.min_confidence,
        });
        let filter = EventFilter {
            types: types.iter().map(Glob::to_like).collect(),
            kinds: kinds.to_like(),
            sources: req.source_ids.clone(),
            zones: req.zones.clone(),
            plate: plate.map(|p| p.as_str().to_owned()),
            attributes: attributes.map(Value::Object),
            min_confidence: req.min_confidence,
        };
        let (page, next) = self
            .page(
                &who,
                &case,
                "SearchEvents",
                &filter,
                Paged {
                    tag: "s1",
                    page_token: &req.page_token,
                    filters: &filters,
                    window,
                    area: area.as_ref(),
                    order: Order::NewestFirst,
                    limit,
                },
            )
            .await?;
        Ok(Response::new(pb::SearchEventsResponse {
            events: page.found.iter().map(|f| stored_event(&f.event)).collect(),
            next_page_token: next,
        }))
    }

    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::GetEventResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let case = check.take(case(&req.case_reference));
        let id = check.take(Uuid::parse_str(&req.id).map_err(|_| {
            FieldError::new(
                "id",
                format!("must be an event id (UUID), got {:?}", req.id),
            )
        }));
        check.finish()?;
        let (Some(case), Some(id)) = (case, id) else {
            return Err(ApiError::Internal("a checked field is missing".into()).into());
        };
        let kinds = self.kinds(&who)?;
        let found = self
            .recorded(&who, &case, "GetEvent", json!({ "id": id }), async |conn| {
                // An event of a kind the caller may not see does not exist for it.
                let Some(found) = search::event(conn, id)
                    .await?
                    .filter(|f| kinds.allows(&f.event.event_type))
                else {
                    return Ok((None, 0));
                };
                let incidents = search::incidents_of(conn, id).await?;
                Ok((Some((found, incidents)), 1))
            })
            .await?;
        let Some((found, incidents)) = found else {
            return Err(ApiError::NotFound("event").into());
        };
        Ok(Response::new(pb::GetEventResponse {
            event: Some(stored_event(&found.event)),
            incidents: incidents
                .into_iter()
                .filter(|i| who.sees_queue(&i.queue))
                .map(|i| pb::IncidentReference {
                    id: i.id.to_string(),
                    number: i.number,
                    queue: i.queue,
                })
                .collect(),
        }))
    }

    async fn plate_history(
        &self,
        request: Request<pb::PlateHistoryRequest>,
    ) -> Result<Response<pb::PlateHistoryResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let case = check.take(case(&req.case_reference));
        let window = check.take(window("time_range", req.time_range.as_ref(), PLATE_SPAN));
        let plate = check.take(parse_plate("plate", &req.plate));
        let limit = check.take(page_size(req.page_size));
        check.finish()?;
        let (Some(case), Some(window), Some(plate), Some(limit)) = (case, window, plate, limit)
        else {
            return Err(ApiError::Internal("a checked field is missing".into()).into());
        };
        let kinds = self.kinds(&who)?;
        let filters = json!({
            "plate": req.plate,
            "plate_normalized": plate.as_str(),
            "time_range": time_json(&window),
        });
        let filter = EventFilter {
            kinds: kinds.to_like(),
            plate: Some(plate.as_str().to_owned()),
            ..EventFilter::default()
        };
        let (page, next) = self
            .page(
                &who,
                &case,
                "PlateHistory",
                &filter,
                Paged {
                    tag: "p1",
                    page_token: &req.page_token,
                    filters: &filters,
                    window,
                    area: None,
                    order: Order::OldestFirst,
                    limit,
                },
            )
            .await?;
        Ok(Response::new(pb::PlateHistoryResponse {
            plate_normalized: plate.to_string(),
            sightings: page.found.iter().map(sighting).collect(),
            next_page_token: next,
        }))
    }

    async fn around_incident(
        &self,
        request: Request<pb::AroundIncidentRequest>,
    ) -> Result<Response<pb::AroundIncidentResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let mut check = Check::default();
        let case = check.take(case(&req.case_reference));
        let radius = if req.radius_m == 0.0 {
            AROUND_DEFAULT_RADIUS_M
        } else {
            req.radius_m
        };
        let margin = |field: &str, d: Option<&prost_types::Duration>| {
            let Some(d) = d else {
                return Ok(AROUND_DEFAULT_MARGIN);
            };
            let d = crate::convert::whole_seconds(field, d).map(TimeDelta::seconds)?;
            if d > AROUND_MAX_MARGIN {
                return Err(FieldError::new(field, "must be at most 24 hours"));
            }
            Ok(d)
        };
        let before = check.take(margin("before", req.before.as_ref()));
        let after_margin = check.take(margin("after", req.after.as_ref()));
        let limit = check.take(page_size(req.page_size));
        if req.incident.is_empty() {
            check.push(FieldError::new("incident", "is required"));
        }
        let kinds = self.kinds(&who)?;
        let types = types(&who, &kinds, &req.types, &mut check)?;
        // The radius is checked against a point once the incident is known.
        if !(radius.is_finite() && radius > 0.0 && radius <= AROUND_RADIUS_M) {
            check.push(FieldError::new(
                "radius_m",
                format!("must be above 0 and at most {AROUND_RADIUS_M} m, got {radius}"),
            ));
        }
        check.finish()?;
        let (Some(case), Some(before), Some(after_margin), Some(limit)) =
            (case, before, after_margin, limit)
        else {
            return Err(ApiError::Internal("a checked field is missing".into()).into());
        };

        let found = {
            let mut conn = self
                .state
                .pool
                .acquire()
                .await
                .map_err(occ_store::StoreError::from)
                .map_err(ApiError::from)?;
            crate::incidents::find_visible(&mut conn, &who, &req.incident)
                .await
                .map_err(|e| crate::dispatch::rename(e, "incident"))?
        };
        let Some(center) = found.location else {
            return Err(ApiError::FailedPrecondition(format!(
                "incident {} has no position to search around",
                found.number
            ))
            .into());
        };
        let area = Area::circle("radius_m", center, radius, AROUND_RADIUS_M)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let window = Window::around(found.first_seen, found.last_seen, before, after_margin);
        let filters = json!({
            "incident": found.number.to_string(),
            "incident_id": found.id.to_string(),
            "radius_m": radius,
            "before": before.num_seconds(),
            "after": after_margin.num_seconds(),
            "types": req.types,
            "time_range": time_json(&window),
        });
        let filter = EventFilter {
            types: types.iter().map(Glob::to_like).collect(),
            kinds: kinds.to_like(),
            ..EventFilter::default()
        };
        let (page, next) = self
            .page(
                &who,
                &case,
                "AroundIncident",
                &filter,
                Paged {
                    tag: "a1",
                    page_token: &req.page_token,
                    filters: &filters,
                    window,
                    area: Some(&area),
                    order: Order::OldestFirst,
                    limit,
                },
            )
            .await?;
        Ok(Response::new(pb::AroundIncidentResponse {
            incident: Some(incident(&found)),
            time_range: Some(pb::TimeRange {
                start_time: Some(timestamp(window.from)),
                end_time: Some(timestamp(window.to)),
            }),
            events: page.found.iter().map(|f| stored_event(&f.event)).collect(),
            next_page_token: next,
        }))
    }
}
