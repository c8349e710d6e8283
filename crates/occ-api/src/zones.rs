//! `ZoneService`: the city's zones as polygons.

use occ_domain::zone::zones_from_geojson;
use occ_domain::{FieldErrors, GeoPoint, ZoneInput};
use occ_proto::v1::{self as pb, zone_service_server::ZoneService};
use occ_store::zones::{self, StoredZone};
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert::{json_to_struct, struct_to_json, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::paging;
use crate::principal::Principal;

#[derive(Debug, Clone)]
pub struct ZoneApi {
    state: ApiState,
}

fn zone(z: &StoredZone) -> pb::Zone {
    pb::Zone {
        name: z.zone.name.to_string(),
        district: z
            .zone
            .district
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        description: z.zone.description.clone(),
        geometry: match &z.zone.geometry {
            serde_json::Value::Object(m) => Some(json_to_struct(m)),
            _ => None,
        },
        create_time: Some(timestamp(z.created_at)),
        update_time: Some(timestamp(z.updated_at)),
    }
}

/// The store's `zones[i].` field paths as the request's.
fn renamed(e: ApiError, from: &str, to: &str) -> ApiError {
    match e {
        ApiError::InvalidArgument(errors) => {
            let all = errors
                .errors()
                .iter()
                .map(|f| {
                    occ_domain::FieldError::new(f.field.replacen(from, to, 1), f.message.clone())
                })
                .collect();
            ApiError::InvalidArgument(FieldErrors::from_vec(all).unwrap_or(errors))
        }
        other => other,
    }
}

impl ZoneApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn put(
        &self,
        who: &Principal,
        inputs: Vec<ZoneInput>,
    ) -> ApiResult<Vec<(StoredZone, bool)>> {
        Ok(self
            .state
            .change_registry(async |tx| zones::put(tx, inputs, &who.subject).await)
            .await?)
    }
}

#[tonic::async_trait]
impl ZoneService for ZoneApi {
    async fn put_zone(
        &self,
        request: Request<pb::PutZoneRequest>,
    ) -> Result<Response<pb::PutZoneResponse>, Status> {
        let who = crate::principal::of(&request);
        let z = request
            .into_inner()
            .zone
            .ok_or_else(|| ApiError::invalid("zone", "is required"))?;
        let geometry = z
            .geometry
            .as_ref()
            .map(|g| struct_to_json("zone.geometry", g))
            .transpose()
            .map_err(|e| ApiError::InvalidArgument(e.into()))?
            .map_or(serde_json::Value::Null, serde_json::Value::Object);
        let input = ZoneInput {
            name: z.name,
            district: (!z.district.is_empty()).then_some(z.district),
            description: z.description,
            geometry,
        };
        let (stored, created) = self
            .put(&who, vec![input])
            .await
            .map_err(|e| renamed(e, "zones[0].", "zone."))?
            .pop()
            .ok_or_else(|| ApiError::Internal("put returned nothing".into()))?;
        tracing::info!(zone = %stored.zone.name, created, actor = %who.subject, "zone stored");
        Ok(Response::new(pb::PutZoneResponse {
            zone: Some(zone(&stored)),
            created,
        }))
    }

    async fn import_zones(
        &self,
        request: Request<pb::ImportZonesRequest>,
    ) -> Result<Response<pb::ImportZonesResponse>, Status> {
        let who = crate::principal::of(&request);
        let doc = request
            .into_inner()
            .feature_collection
            .ok_or_else(|| ApiError::invalid("feature_collection", "is required"))?;
        let doc = struct_to_json("feature_collection", &doc)
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let inputs =
            zones_from_geojson(&serde_json::Value::Object(doc)).map_err(|e: FieldErrors| {
                ApiError::InvalidArgument(e.prefixed("feature_collection."))
            })?;
        if inputs.is_empty() {
            return Err(
                ApiError::invalid("feature_collection.features", "must not be empty").into(),
            );
        }
        let stored = self
            .put(&who, inputs)
            .await
            .map_err(|e| renamed(e, "zones[", "feature_collection.features["))?;
        let created = stored.iter().filter(|(_, c)| *c).count();
        tracing::info!(created, updated = stored.len() - created, actor = %who.subject, "zones imported");
        Ok(Response::new(pb::ImportZonesResponse {
            created: i32::try_from(created).unwrap_or(i32::MAX),
            updated: i32::try_from(stored.len() - created).unwrap_or(i32::MAX),
        }))
    }

    async fn list_zones(
        &self,
        request: Request<pb::ListZonesRequest>,
    ) -> Result<Response<pb::ListZonesResponse>, Status> {
        let req = request.into_inner();
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let after = paging::parse_key_token("z1", &req.page_token, 1)?;
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let mut page = zones::list(
            &mut conn,
            (!req.district.is_empty()).then_some(req.district.as_str()),
            after.as_ref().map(|a| a[0].as_str()),
            Some(limit + 1),
        )
        .await
        .map_err(ApiError::from)?;
        let next_page_token = paging::next_page(&mut page, limit, |z| {
            paging::key_token("z1", &[z.zone.name.as_str()])
        });
        Ok(Response::new(pb::ListZonesResponse {
            zones: page.iter().map(zone).collect(),
            next_page_token,
        }))
    }

    async fn delete_zone(
        &self,
        request: Request<pb::DeleteZoneRequest>,
    ) -> Result<Response<pb::DeleteZoneResponse>, Status> {
        let who = crate::principal::of(&request);
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(ApiError::invalid("name", "is required").into());
        }
        self.state
            .change_registry(async |tx| zones::delete(tx, &name, &who.subject).await)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteZoneResponse {}))
    }

    async fn locate_zone(
        &self,
        request: Request<pb::LocateZoneRequest>,
    ) -> Result<Response<pb::LocateZoneResponse>, Status> {
        let l = request
            .into_inner()
            .location
            .ok_or_else(|| ApiError::invalid("location", "is required"))?;
        let point = GeoPoint::new(l.lat, l.lon).map_err(|e| ApiError::InvalidArgument(e.into()))?;
        let registry = self.state.registry.current();
        let found = registry.zones().locate(point);
        Ok(Response::new(pb::LocateZoneResponse {
            zone: found.map(|z| z.name.to_string()).unwrap_or_default(),
            district: found
                .and_then(|z| z.district.as_ref())
                .map(ToString::to_string)
                .unwrap_or_default(),
        }))
    }
}
