//! `WatchlistService`: the plates police want to know about, and where they were seen.

use occ_domain::watchlist::parse_plate;
use occ_domain::{FieldErrors, WatchEntryInput};
use occ_proto::v1::{self as pb, watchlist_service_server::WatchlistService};
use occ_store::watchlist::{self, EntryFilter, StoredEntry};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::ApiState;
use crate::convert::{from_timestamp, timestamp};
use crate::error::ApiError;
use crate::paging;

#[derive(Debug, Clone)]
pub struct WatchlistApi {
    state: ApiState,
}

impl WatchlistApi {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }
}

fn entry(e: &StoredEntry) -> pb::WatchlistEntry {
    pb::WatchlistEntry {
        id: e.entry.id.to_string(),
        plate: e.entry.display.clone(),
        plate_normalized: e.entry.plate.to_string(),
        list: e.entry.list.clone(),
        reason: e.entry.reason.clone(),
        expire_time: e.entry.expires_at.map(timestamp),
        created_by: e.created_by.clone(),
        create_time: Some(timestamp(e.created_at)),
        update_time: Some(timestamp(e.updated_at)),
    }
}

fn entry_id(field: &str, id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::invalid(field, format!("must be an entry id (UUID), got {id:?}")))
}

#[tonic::async_trait]
impl WatchlistService for WatchlistApi {
    async fn add_watchlist_entries(
        &self,
        request: Request<pb::AddWatchlistEntriesRequest>,
    ) -> Result<Response<pb::AddWatchlistEntriesResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        paging::batch_size("entries", req.entries.len(), 10_000)?;
        let mut inputs = Vec::with_capacity(req.entries.len());
        let mut errors = Vec::new();
        for (i, e) in req.entries.iter().enumerate() {
            let expires_at = match e
                .expire_time
                .as_ref()
                .map(|t| from_timestamp(&format!("entries[{i}].expire_time"), t))
            {
                Some(Ok(t)) => Some(t),
                Some(Err(err)) => {
                    errors.push(err);
                    None
                }
                None => None,
            };
            inputs.push(WatchEntryInput {
                plate: e.plate.clone(),
                list: e.list.clone(),
                reason: e.reason.clone(),
                expires_at,
            });
        }
        if let Some(errors) = FieldErrors::from_vec(errors) {
            return Err(ApiError::InvalidArgument(errors).into());
        }
        let stored = self
            .state
            .change_registry(async |tx| watchlist::add(tx, inputs, &who.subject).await)
            .await
            .map_err(|e| match e {
                // The domain says expires_at; the request says expire_time.
                occ_store::StoreError::Invalid(errors) => {
                    let all = errors
                        .errors()
                        .iter()
                        .map(|f| {
                            occ_domain::FieldError::new(
                                f.field.replace(".expires_at", ".expire_time"),
                                f.message.clone(),
                            )
                        })
                        .collect();
                    ApiError::InvalidArgument(FieldErrors::from_vec(all).unwrap_or(errors))
                }
                other => other.into(),
            })?;
        let created = stored.iter().filter(|(_, c)| *c).count();
        tracing::info!(created, updated = stored.len() - created, actor = %who.subject, "watch-list entries added");
        Ok(Response::new(pb::AddWatchlistEntriesResponse {
            entries: stored.iter().map(|(e, _)| entry(e)).collect(),
            created: i32::try_from(created).unwrap_or(i32::MAX),
            updated: i32::try_from(stored.len() - created).unwrap_or(i32::MAX),
        }))
    }

    async fn remove_watchlist_entry(
        &self,
        request: Request<pb::RemoveWatchlistEntryRequest>,
    ) -> Result<Response<pb::RemoveWatchlistEntryResponse>, Status> {
        let who = crate::principal::of(&request);
        let req = request.into_inner();
        let id = entry_id("id", &req.id)?;
        if req.reason.len() > 1000 {
            return Err(ApiError::invalid("reason", "must be at most 1000 bytes").into());
        }
        let removed = self
            .state
            .change_registry(async |tx| watchlist::remove(tx, id, &who.subject, &req.reason).await)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(entry = %id, actor = %who.subject, "watch-list entry removed");
        Ok(Response::new(pb::RemoveWatchlistEntryResponse {
            entry: Some(entry(&removed)),
        }))
    }

    async fn list_watchlist_entries(
        &self,
        request: Request<pb::ListWatchlistEntriesRequest>,
    ) -> Result<Response<pb::ListWatchlistEntriesResponse>, Status> {
        let req = request.into_inner();
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let filters = paging::fingerprint(&format!(
            "{}|{}|{}",
            req.list, req.plate, req.include_expired
        ));
        let after = paging::parse_key_token("w1", &req.page_token, 3)?
            .map(|p| {
                if p[2] == filters {
                    Ok(p)
                } else {
                    Err(paging::other_filters())
                }
            })
            .transpose()?;
        let filter = EntryFilter {
            list: (!req.list.is_empty()).then_some(req.list),
            plate: if req.plate.is_empty() {
                None
            } else {
                Some(
                    parse_plate("plate", &req.plate)
                        .map_err(|e| ApiError::InvalidArgument(e.into()))?,
                )
            },
            include_expired: req.include_expired,
        };
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let mut page = watchlist::list(
            &mut conn,
            &filter,
            self.state.clock.now(),
            after.as_ref().map(|a| (a[0].as_str(), a[1].as_str())),
            limit + 1,
        )
        .await
        .map_err(ApiError::from)?;
        let next_page_token = paging::next_page(&mut page, limit, |e| {
            paging::key_token("w1", &[&e.entry.list, e.entry.plate.as_str(), &filters])
        });
        Ok(Response::new(pb::ListWatchlistEntriesResponse {
            entries: page.iter().map(entry).collect(),
            next_page_token,
        }))
    }

    async fn list_watchlist_hits(
        &self,
        request: Request<pb::ListWatchlistHitsRequest>,
    ) -> Result<Response<pb::ListWatchlistHitsResponse>, Status> {
        let req = request.into_inner();
        let id = entry_id("entry_id", &req.entry_id)?;
        let limit = paging::page_size(req.page_size, 100, 1000)?;
        let after = paging::parse_key_token("h1", &req.page_token, 3)?
            .map(|p| {
                if p[2] != req.entry_id {
                    return Err(paging::other_filters());
                }
                let at = p[0]
                    .parse()
                    .ok()
                    .and_then(chrono::DateTime::from_timestamp_micros)
                    .ok_or_else(paging::invalid_token)?;
                let event = Uuid::parse_str(&p[1]).map_err(|_| paging::invalid_token())?;
                Ok((at, event))
            })
            .transpose()?;
        let mut conn = occ_store::acquire(&self.state.pool)
            .await
            .map_err(ApiError::from)?;
        let mut hits = watchlist::hits(&mut conn, id, after, limit + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = paging::next_page(&mut hits, limit, |h| {
            paging::key_token(
                "h1",
                &[
                    &h.seen_at.timestamp_micros().to_string(),
                    &h.event_id.to_string(),
                    &req.entry_id,
                ],
            )
        });
        Ok(Response::new(pb::ListWatchlistHitsResponse {
            next_page_token,
            hits: hits
                .iter()
                .map(|h| pb::WatchlistHit {
                    entry_id: h.entry_id.to_string(),
                    event_id: h.event_id.to_string(),
                    plate: h.plate.clone(),
                    source_id: h.source_id.clone(),
                    zone: h.zone.clone().unwrap_or_default(),
                    seen_time: Some(timestamp(h.seen_at)),
                })
                .collect(),
        }))
    }
}
