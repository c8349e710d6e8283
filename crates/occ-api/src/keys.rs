//! `KeyService`: administrators make, list and revoke API keys.

use occ_domain::access::Roles;
use occ_proto::v1::{self as pb, key_service_server::KeyService};
use occ_store::keys::{self, KeyInfo, NewKey};
use tonic::{Request, Response, Status};

use crate::ApiState;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::principal::{self, Principal};

#[derive(Debug, Clone)]
pub struct KeyApi {
    state: ApiState,
}

pub fn key(k: &KeyInfo) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        roles: k.roles.names(),
        queues: k.queues.clone(),
        agencies: k.agencies.clone(),
        sources: k.sources.clone(),
        may_update_status: k.may_update_status,
        create_time: Some(convert::timestamp(k.created_at)),
        created_by: k.created_by.clone(),
        expire_time: k.expires_at.map(convert::timestamp),
        revoke_time: k.revoked_at.map(convert::timestamp),
        last_use_time: k.last_used_at.map(convert::timestamp),
        certificate_subject: k.certificate_subject.clone().unwrap_or_default(),
    }
}

impl KeyApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    async fn create(
        &self,
        who: &Principal,
        req: pb::CreateKeyRequest,
    ) -> ApiResult<pb::CreateKeyResponse> {
        let roles = Roles::parse(&req.roles).map_err(|e| ApiError::invalid("roles", e))?;
        let now = self.state.clock.now();
        let expires_at = req
            .expire_time
            .as_ref()
            .map(|t| convert::from_timestamp("expire_time", t))
            .transpose()
            .map_err(|e| ApiError::InvalidArgument(e.into()))?;
        if expires_at.is_some_and(|t| t <= now) {
            return Err(ApiError::invalid("expire_time", "must be in the future"));
        }
        let new = NewKey {
            name: req.name,
            roles,
            queues: req.queues,
            agencies: req.agencies,
            sources: req.sources,
            may_update_status: req.may_update_status,
            expires_at,
            replace: req.replace,
            certificate_subject: (!req.certificate_subject.is_empty())
                .then_some(req.certificate_subject),
        };
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let (info, secret) = keys::create(&mut tx, &new, &who.subject, now).await?;
        occ_store::commit(tx).await?;
        tracing::info!(key = %info.name, prefix = %info.prefix, roles = %info.roles, actor = %who.subject, "API key created");
        Ok(pb::CreateKeyResponse {
            key: Some(key(&info)),
            secret,
        })
    }

    async fn revoke(
        &self,
        who: &Principal,
        req: pb::RevokeKeyRequest,
    ) -> ApiResult<pb::RevokeKeyResponse> {
        if req.key.is_empty() {
            return Err(ApiError::invalid("key", "is required"));
        }
        let mut tx = occ_store::begin(&self.state.pool).await?;
        let info = keys::revoke(&mut tx, &req.key, &who.subject, self.state.clock.now()).await?;
        occ_store::commit(tx).await?;
        tracing::info!(key = %info.name, prefix = %info.prefix, actor = %who.subject, "API key revoked");
        Ok(pb::RevokeKeyResponse {
            key: Some(key(&info)),
        })
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let who = principal::of(&request);
        Ok(Response::new(
            self.create(&who, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let keys = keys::list(&mut conn, request.get_ref().include_revoked)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(key).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let who = principal::of(&request);
        Ok(Response::new(
            self.revoke(&who, request.into_inner()).await?,
        ))
    }
}
