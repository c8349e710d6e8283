//! OCC's domain: what an event, a rule and an incident are, and the pure decisions made about
//! them (validation, rule matching, correlation, status transitions).
//!
//! This crate does no I/O: no runtime, no database, no network. Adapters (MQTT, PostgreSQL, gRPC)
//! turn their input into these types at the edge and trust them inside.
#![forbid(unsafe_code)]

pub mod correlation;
pub mod event;
pub mod glob;
pub mod incident;
pub mod rule;
pub mod unit;
pub mod validation;

pub use correlation::{Candidate, CorrelationPlan, OpenIncident, Segment, plan_correlation};
pub use event::{
    Confidence, Event, EventId, EventInput, EventType, GeoPoint, IdempotencyKey, Limits,
    LocationInput, Severity, SourceId, SourceKind, Zone,
};
pub use incident::{
    ClaimInfo, Incident, IncidentCommand, IncidentId, IncidentNumber, IncidentStatus, Priority,
    TransitionError,
};
pub use rule::{
    Category, Comparison, CorrelationField, QueueName, Rule, RuleAction, RuleHit, RuleId,
    RuleInput, RuleMatch, RuleName, RuleSet, Threshold, ThresholdInput, TitleTemplate,
};
pub use unit::{UnitCommand, UnitId, UnitStatus, UnitTransitionError, distance_m};
pub use validation::{FieldError, FieldErrors};
