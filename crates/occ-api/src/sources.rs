//! `SourceService`: the registry of cameras, sensors and gateways, their profiles, and their
//! health.

use std::collections::BTreeMap;

use occ_domain::{FieldError, FieldErrors, Mapping, Profile, Source, SourceInput, SourceStatus};
use occ_proto::v1::{self as pb, source_service_server::SourceService};
use occ_store::sources::{self, SourceFilter};
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert::{duration, timestamp, whole_seconds};
use crate::error::{ApiError, ApiResult};
use crate::paging;
use crate::principal::Principal;

#[derive(Debug, Clone)]
pub struct SourceApi {
    state: ApiState,
}

fn status(s: SourceStatus) -> i32 {
    (match s {
        SourceStatus::Unknown => pb::SourceStatus::Unknown,
        SourceStatus::Online => pb::SourceStatus::Online,
        SourceStatus::Offline => pb::SourceStatus::Offline,
    }) as i32
}

fn parse_status(field: &str, v: i32) -> Result<Option<SourceStatus>, FieldError> {
    match pb::SourceStatus::try_from(v) {
        Ok(pb::SourceStatus::Unspecified) => Ok(None),
        Ok(pb::SourceStatus::Unknown) => Ok(Some(SourceStatus::Unknown)),
        Ok(pb::SourceStatus::Online) => Ok(Some(SourceStatus::Online)),
        Ok(pb::SourceStatus::Offline) => Ok(Some(SourceStatus::Offline)),
        Err(_) => Err(FieldError::new(field, format!("unknown source status {v}"))),
    }
}

fn mapping(m: &Mapping) -> pb::Mapping {
    pb::Mapping {
        event_types: m.event_types.clone(),
        measurements: m.measurements.clone(),
        source_kind: m.source_kind.clone().unwrap_or_default(),
    }
}

fn mapping_input(m: Option<&pb::Mapping>) -> Mapping {
    m.map(|m| Mapping {
        event_types: m.event_types.clone(),
        measurements: m.measurements.clone(),
        source_kind: (!m.source_kind.is_empty()).then(|| m.source_kind.clone()),
    })
    .unwrap_or_default()
}

pub fn source(s: &Source) -> pb::Source {
    let c = &s.config;
    pb::Source {
        id: c.id.to_string(),
        kind: c.kind.as_ref().map(ToString::to_string).unwrap_or_default(),
        name: c.name.clone(),
        location: c.location.map(|l| pb::GeoPoint {
            lat: l.lat(),
            lon: l.lon(),
        }),
        zone: c.zone.as_ref().map(ToString::to_string).unwrap_or_default(),
        district: c
            .district
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        tags: c.tags.clone().into_iter().collect(),
        disabled: !c.enabled,
        verified: c.verified,
        profile: c.profile.clone().unwrap_or_default(),
        mapping: Some(mapping(&c.mapping)),
        expected_interval: c.expected_interval.map(duration),
        status: status(s.status),
        status_change_time: s.status_changed_at.map(timestamp),
        last_seen_time: s.last_seen.map(timestamp),
        battery_pct: s.battery_pct,
        last_error: s.last_error.clone().unwrap_or_default(),
        last_error_time: s.last_error_at.map(timestamp),
        qos0_events: s.qos0_events,
        create_time: Some(timestamp(s.created_at)),
        update_time: Some(timestamp(s.updated_at)),
    }
}

/// A source from the API as domain input; `prefix` is the request field that holds it.
fn source_input(prefix: &str, s: &pb::Source) -> Result<SourceInput, FieldErrors> {
    let interval = s
        .expected_interval
        .as_ref()
        .map(|d| whole_seconds(&format!("{prefix}expected_interval"), d))
        .transpose()?;
    Ok(SourceInput {
        id: s.id.clone(),
        kind: (!s.kind.is_empty()).then(|| s.kind.clone()),
        name: s.name.clone(),
        lat: s.location.map(|l| l.lat),
        lon: s.location.map(|l| l.lon),
        zone: (!s.zone.is_empty()).then(|| s.zone.clone()),
        district: (!s.district.is_empty()).then(|| s.district.clone()),
        tags: s.tags.clone().into_iter().collect::<BTreeMap<_, _>>(),
        enabled: Some(!s.disabled),
        profile: (!s.profile.is_empty()).then(|| s.profile.clone()),
        mapping: mapping_input(s.mapping.as_ref()),
        expected_interval_seconds: interval,
    })
}

/// The store's field errors (`sources[2].lat`) as the request's fields: `source.location.lat`
/// for one source, `sources[2].location.lat` for an import.
fn request_fields(single: bool, errors: FieldErrors) -> ApiError {
    let all: Vec<FieldError> = errors
        .errors()
        .iter()
        .map(|e| {
            let (index, rest) = match e
                .field
                .strip_prefix("sources[")
                .and_then(|r| r.split_once("]."))
            {
                Some((i, rest)) => (i, rest),
                None => ("0", e.field.as_str()),
            };
            let rest = match rest {
                "lat" | "lon" => format!("location.{rest}"),
                other => other.to_owned(),
            };
            let field = if single {
                format!("source.{rest}")
            } else {
                format!("sources[{index}].{rest}")
            };
            FieldError::new(field, e.message.clone())
        })
        .collect();
    ApiError::InvalidArgument(FieldErrors::from_vec(all).unwrap_or(errors))
}

fn profile(p: &Profile) -> pb::Profile {
    pb::Profile {
        name: p.name.clone(),
        description: p.description.clone(),
        mapping: Some(mapping(&p.mapping)),
    }
}

impl SourceApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn upsert(
        &self,
        who: &Principal,
        inputs: Vec<SourceInput>,
        single: bool,
    ) -> ApiResult<Vec<(Source, bool)>> {
        let stored = self
            .state
            .change_registry(async |tx| sources::upsert(tx, inputs, &who.subject).await)
            .await
            .map_err(|e| match e {
                occ_store::StoreError::Invalid(errors) => request_fields(single, errors),
                other => other.into(),
            })?;
        Ok(stored)
    }
}

#[tonic::async_trait]
impl SourceService for SourceApi {
    async fn upsert_source(
        &self,
        request: Request<pb::UpsertSourceRequest>,
    ) -> Result<Response<pb::UpsertSourceResponse>, Status> {
        let who = crate::principal::of(&request);
        let s = request
            .into_inner()
            .source
            .ok_or_else(|| ApiError::invalid("source", "is required"))?;
        let input = source_input("source.", &s).map_err(ApiError::InvalidArgument)?;
        let (stored, created) = self
            .upsert(&who, vec![input], true)
            .await?
            .pop()
            .ok_or_else(|| ApiError::Internal("upsert returned nothing".into()))?;
        tracing::info!(source = %stored.config.id, created, actor = %who.subject, "source registered");
        Ok(Response::new(pb::UpsertSourceResponse {
            source: Some(source(&stored)),
            created,
        }))
    }

    async fn import_sources(
        &self,
        request: Request<pb::ImportSourcesRequest>,
    ) -> Result<Response<pb::ImportSourcesResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        paging::batch_size("sources", req.sources.len(), 10_000)?;
        let mut inputs = Vec::with_capacity(req.sources.len());
        let mut errors = Vec::new();
        for (i, s) in req.sources.iter().enumerate() {
            match source_input(&format!("sources[{i}]."), s) {
                Ok(input) => inputs.push(input),
                Err(e) => errors.extend(e.errors().to_vec()),
            }
        }
        if let Some(errors) = FieldErrors::from_vec(errors) {
            return Err(ApiError::InvalidArgument(errors).into());
        }
        let stored = self.upsert(&who, inputs, false).await?;
        let created = stored.iter().filter(|(_, c)| *c).count();
        tracing::info!(created, updated = stored.len() - created, actor = %who.subject, "sources imported");
        Ok(Response::new(pb::ImportSourcesResponse {
            created: i32::try_from(created).unwrap_or(i32::MAX),
            updated: i32::try_from(stored.len() - created).unwrap_or(i32::MAX),
        }))
    }

    async fn get_source(
        &self,
        request: Request<pb::GetSourceRequest>,
    ) -> Result<Response<pb::GetSourceResponse>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "is required").into());
        }
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let s = sources::get(&mut conn, &id).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::GetSourceResponse {
            source: Some(source(&s)),
        }))
    }

    async fn list_sources(
        &self,
        request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let req = request.into_inner();
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let filters = paging::fingerprint(&format!(
            "{}|{}|{}|{}|{:?}",
            req.kind, req.zone, req.district, req.status, req.unverified
        ));
        let after = paging::parse_key_token("s1", &req.page_token, 2)?
            .map(|p| {
                if p[1] == filters {
                    Ok(p)
                } else {
                    Err(paging::other_filters())
                }
            })
            .transpose()?;
        let filter = SourceFilter {
            kind: (!req.kind.is_empty()).then_some(req.kind),
            zone: (!req.zone.is_empty()).then_some(req.zone),
            district: (!req.district.is_empty()).then_some(req.district),
            status: parse_status("status", req.status)
                .map_err(|e| ApiError::InvalidArgument(e.into()))?,
            verified: req.unverified.map(|u| !u),
        };
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let mut page = sources::list(
            &mut conn,
            &filter,
            after.as_ref().map(|a| a[0].as_str()),
            limit + 1,
        )
        .await
        .map_err(ApiError::from)?;
        let next_page_token = paging::next_page(&mut page, limit, |s| {
            paging::key_token("s1", &[s.config.id.as_str(), &filters])
        });
        Ok(Response::new(pb::ListSourcesResponse {
            sources: page.iter().map(source).collect(),
            next_page_token,
        }))
    }

    async fn delete_source(
        &self,
        request: Request<pb::DeleteSourceRequest>,
    ) -> Result<Response<pb::DeleteSourceResponse>, Status> {
        let who = crate::principal::of(&request);
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "is required").into());
        }
        self.state
            .change_registry(async |tx| sources::delete(tx, &id, &who.subject).await)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(source = %id, actor = %who.subject, "source deleted");
        Ok(Response::new(pb::DeleteSourceResponse {}))
    }

    async fn put_profile(
        &self,
        request: Request<pb::PutProfileRequest>,
    ) -> Result<Response<pb::PutProfileResponse>, Status> {
        let who = crate::principal::of(&request);
        let p = request
            .into_inner()
            .profile
            .ok_or_else(|| ApiError::invalid("profile", "is required"))?;
        let parsed = Profile::parse(&p.name, &p.description, mapping_input(p.mapping.as_ref()))
            .map_err(|e| ApiError::InvalidArgument(e.prefixed("profile.")))?;
        let created = self
            .state
            .change_registry(async |tx| sources::put_profile(tx, &parsed, &who.subject).await)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(profile = %parsed.name, created, actor = %who.subject, "profile stored");
        Ok(Response::new(pb::PutProfileResponse {
            profile: Some(profile(&parsed)),
            created,
        }))
    }

    async fn list_profiles(
        &self,
        _request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let all = sources::profiles(&mut conn).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: all.iter().map(profile).collect(),
        }))
    }

    async fn delete_profile(
        &self,
        request: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let who = crate::principal::of(&request);
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(ApiError::invalid("name", "is required").into());
        }
        self.state
            .change_registry(async |tx| sources::delete_profile(tx, &name, &who.subject).await)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteProfileResponse {}))
    }
}
