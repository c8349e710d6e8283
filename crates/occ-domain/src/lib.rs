//! OCC's domain: what an event, a rule and an incident are, and the pure decisions made about
//! them (validation, rule matching, correlation, status transitions).
//!
//! This crate does no I/O: no runtime, no database, no network. Adapters (MQTT, PostgreSQL, gRPC)
//! turn their input into these types at the edge and trust them inside.
#![forbid(unsafe_code)]

pub mod access;
pub mod cap;
pub mod claim;
pub mod clock;
pub mod correlation;
pub mod eido;
pub mod event;
pub mod glob;
pub mod incident;
pub mod rate;
pub mod registry;
pub mod retention;
pub mod rule;
pub mod search;
pub mod source;
pub mod unit;
pub mod validation;
pub mod wall;
pub mod watchlist;
pub mod zone;

/// Checks a status machine against its table of allowed transitions: every (status, command)
/// pair either reaches exactly the listed status or is refused with an error naming both.
#[cfg(test)]
pub(crate) fn check_transitions<S, C, E>(
    statuses: &[S],
    commands: &[C],
    allowed: &[(S, C, S)],
    apply: impl Fn(S, C) -> Result<S, E>,
    refusal: impl Fn(S, C) -> E,
) where
    S: Copy + PartialEq + std::fmt::Debug,
    C: Copy + PartialEq + std::fmt::Debug,
    E: PartialEq + std::fmt::Debug,
{
    for &from in statuses {
        for &command in commands {
            let expected = allowed
                .iter()
                .find(|(f, c, _)| *f == from && *c == command)
                .map(|(_, _, to)| *to);
            match (apply(from, command), expected) {
                (Ok(to), Some(e)) => assert_eq!(to, e, "{from:?} {command:?}"),
                (Err(err), None) => assert_eq!(err, refusal(from, command)),
                (got, want) => panic!("{from:?} + {command:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}

pub use clock::{Clock, SharedClock, SystemClock};
pub use correlation::{Candidate, CorrelationPlan, OpenIncident, Segment, plan_correlation};
pub use event::{
    Confidence, Delivery, District, Event, EventId, EventInput, EventType, Evidence, EvidenceKind,
    GeoPoint, IdempotencyKey, Limits, LocationInput, Revision, Severity, SourceId, SourceKind,
    Zone,
};
pub use incident::{
    ClaimInfo, Incident, IncidentCommand, IncidentId, IncidentNumber, IncidentStatus, Priority,
    TransitionError,
};
pub use registry::{Enriched, Registry, WatchHit};
pub use rule::{
    Category, Comparison, CorrelationField, QueueName, Rule, RuleAction, RuleHit, RuleId,
    RuleInput, RuleMatch, RuleName, RuleSet, Threshold, ThresholdInput, TitleTemplate,
};
pub use source::{Mapping, Profile, Source, SourceConfig, SourceInput, SourceStatus};
pub use unit::{UnitCommand, UnitId, UnitStatus, UnitTransitionError, distance_m};
pub use validation::{FieldError, FieldErrors};
pub use watchlist::{Plate, WatchEntry, WatchEntryInput, WatchList};
pub use zone::{ZoneArea, ZoneInput, ZoneMap};
