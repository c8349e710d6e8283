//! OCC's gRPC API: `IngestService`, `IncidentService`, `DispatchService`, `UnitService`,
//! `RuleService`, with `grpc.health.v1.Health` and server reflection.
//!
//! Handlers parse requests into domain types ([`convert`]), call the store, and return errors
//! through the one mapping in [`error`]. Every request carries a [`principal::Principal`],
//! attached by a layer in front of all services.
#![forbid(unsafe_code)]

pub mod convert;
pub mod dispatch;
pub mod error;
pub mod incidents;
pub mod ingest;
pub mod paging;
pub mod principal;
pub mod rules;
mod server;
pub mod units;
pub mod watch;

use occ_domain::Limits;
use occ_store::PgPool;
use occ_store::changes::Feed;
use occ_store::rules::LiveRules;

pub use server::{GrpcConfig, serve};

/// What every handler needs: the database, the rules in force, the input limits and the
/// feed of incident changes for watch streams.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub rules: LiveRules,
    pub limits: Limits,
    pub feed: Feed,
}
