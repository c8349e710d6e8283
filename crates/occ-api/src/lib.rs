//! OCC's gRPC API: `IngestService`, `IncidentService`, `DispatchService`, `UnitService`,
//! `RuleService`, `SourceService`, `ZoneService`, `WatchlistService`, `DeadLetterService`,
//! with `grpc.health.v1.Health` and server reflection.
//!
//! Handlers parse requests into domain types ([`convert`]), call the store, and return errors
//! through the one mapping in [`error`]. One layer in front of all services authenticates the
//! caller and checks the method against [`policy`]; handlers check the data against the
//! caller's [`principal::Principal`] scope.
#![forbid(unsafe_code)]

pub mod connections;
pub mod convert;
pub mod dead_letters;
pub mod dispatch;
pub mod edge;
pub mod error;
pub mod events;
mod fields;
pub mod incidents;
pub mod ingest;
pub mod jwt;
pub mod keys;
pub mod metrics;
pub mod paging;
pub mod policy;
pub mod principal;
pub mod rules;
mod server;
pub mod sources;
pub mod stats;
pub mod tls;
pub mod units;
pub mod watch;
pub mod watchlist;
pub mod zones;

use std::sync::Arc;

use occ_adapters::Adapters;
use occ_domain::Limits;
use occ_store::PgPool;
use occ_store::changes::Feed;
use occ_store::health::ActivityLog;
use occ_store::registry::LiveRegistry;
use occ_store::rules::LiveRules;

pub use principal::{AuthConfig, Authenticator, Reflection};
pub use server::{GrpcConfig, serve};

/// What every handler needs: the database, the rules and registry in force, the input
/// limits, the feed of incident changes for watch streams, what ingest hears from sources,
/// and the adapters (to decode dead letters again).
#[derive(Debug, Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub rules: LiveRules,
    pub registry: LiveRegistry,
    pub limits: Limits,
    pub feed: Feed,
    pub activity: ActivityLog,
    pub adapters: Arc<Adapters>,
    /// What this instance reads the time from (see [`occ_domain::clock`]).
    pub clock: occ_domain::SharedClock,
    /// Who callers are.
    pub auth: Arc<Authenticator>,
    /// What CAP alerts say about their sender.
    pub cap: Arc<occ_domain::cap::CapSender>,
    /// The agencies whose incidents' reads are recorded (who read what, when).
    pub recorded_agencies: Arc<Vec<String>>,
    /// Which kinds of stored event each agency may search.
    pub search_grants: Arc<occ_domain::search::SearchGrants>,
    /// How long the wall's hourly counts are kept (`--hourly-count-retention`).
    pub hourly_counts_kept: chrono::TimeDelta,
}

impl ApiState {
    /// Changes the registry in one transaction; this instance takes the change in at once,
    /// the others on its notification.
    pub(crate) async fn change_registry<T>(
        &self,
        change: impl AsyncFnOnce(&mut occ_store::PgConnection) -> occ_store::Result<T>,
    ) -> occ_store::Result<T> {
        let mut tx = occ_store::begin(&self.pool).await?;
        let out = change(&mut tx).await?;
        occ_store::commit(tx).await?;
        self.registry.reload_now();
        Ok(out)
    }
}
