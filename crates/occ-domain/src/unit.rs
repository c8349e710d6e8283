//! Units: the crews and vehicles that respond, their status machine, and distances for
//! recommending the nearest.
//!
//! ```text
//! AVAILABLE ──dispatch──► DISPATCHED ──► EN_ROUTE ──► ON_SCENE
//!     ▲  │                     └────────────────────────▲ (arrived without reporting en route)
//!     │  └─► OUT_OF_SERVICE     any assigned status ──release / clear──► AVAILABLE
//!     └──────────┘ back in service
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::GeoPoint;
use crate::incident::{IncidentCommand, IncidentStatus};

/// Identifies a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitId(pub Uuid);

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a unit is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnitStatus {
    Available,
    Dispatched,
    EnRoute,
    OnScene,
    OutOfService,
}

/// What happens to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitCommand {
    /// Assigned to an incident by a dispatcher.
    Dispatch,
    MarkEnRoute,
    MarkOnScene,
    /// Back to available: its incident was resolved or dismissed, or the crew cleared.
    Release,
    TakeOutOfService,
    ReturnToService,
}

/// A command that does not apply to the unit's current status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a unit that is {from}")]
pub struct UnitTransitionError {
    pub from: UnitStatus,
    pub command: UnitCommand,
}

impl UnitStatus {
    pub const ALL: [UnitStatus; 5] = [
        UnitStatus::Available,
        UnitStatus::Dispatched,
        UnitStatus::EnRoute,
        UnitStatus::OnScene,
        UnitStatus::OutOfService,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Available => "AVAILABLE",
            UnitStatus::Dispatched => "DISPATCHED",
            UnitStatus::EnRoute => "EN_ROUTE",
            UnitStatus::OnScene => "ON_SCENE",
            UnitStatus::OutOfService => "OUT_OF_SERVICE",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// Working an incident.
    pub fn is_assigned(self) -> bool {
        matches!(
            self,
            UnitStatus::Dispatched | UnitStatus::EnRoute | UnitStatus::OnScene
        )
    }

    pub fn apply(self, command: UnitCommand) -> Result<UnitStatus, UnitTransitionError> {
        use UnitCommand as C;
        use UnitStatus as S;
        let next = match (self, command) {
            (S::Available, C::Dispatch) => S::Dispatched,
            (S::Dispatched, C::MarkEnRoute) => S::EnRoute,
            (S::Dispatched | S::EnRoute, C::MarkOnScene) => S::OnScene,
            (s, C::Release) if s.is_assigned() => S::Available,
            (S::Available, C::TakeOutOfService) => S::OutOfService,
            (S::OutOfService, C::ReturnToService) => S::Available,
            (from, command) => return Err(UnitTransitionError { from, command }),
        };
        Ok(next)
    }

    /// The command that takes a unit from this status to `to`, as a crew's status report
    /// asks (`EN_ROUTE`, `ON_SCENE`, `AVAILABLE`, `OUT_OF_SERVICE`).
    pub fn command_to(self, to: UnitStatus) -> Option<UnitCommand> {
        match to {
            UnitStatus::EnRoute => Some(UnitCommand::MarkEnRoute),
            UnitStatus::OnScene => Some(UnitCommand::MarkOnScene),
            UnitStatus::OutOfService => Some(UnitCommand::TakeOutOfService),
            UnitStatus::Available if self == UnitStatus::OutOfService => {
                Some(UnitCommand::ReturnToService)
            }
            UnitStatus::Available => Some(UnitCommand::Release),
            // Only a dispatcher assigns a unit.
            UnitStatus::Dispatched => None,
        }
    }
}

impl fmt::Display for UnitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for UnitCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnitCommand::Dispatch => "dispatch",
            UnitCommand::MarkEnRoute => "mark en route",
            UnitCommand::MarkOnScene => "mark on scene",
            UnitCommand::Release => "release",
            UnitCommand::TakeOutOfService => "take out of service",
            UnitCommand::ReturnToService => "return to service",
        })
    }
}

/// Units lead, the incident follows: when a unit reports EN_ROUTE or ON_SCENE, its incident
/// advances if it is behind.
pub fn incident_follows(unit: UnitStatus, incident: IncidentStatus) -> Option<IncidentCommand> {
    match (unit, incident) {
        (UnitStatus::EnRoute, IncidentStatus::Dispatched) => Some(IncidentCommand::MarkEnRoute),
        (UnitStatus::OnScene, IncidentStatus::Dispatched | IncidentStatus::EnRoute) => {
            Some(IncidentCommand::MarkOnScene)
        }
        _ => None,
    }
}

/// Whether a unit may report `command` while `others` other units work its incident: the last
/// unit of an incident still being worked cannot clear, or the incident would be left with
/// no one on it (dispatch another, or resolve or dismiss it).
pub fn may_report(command: UnitCommand, others: usize) -> bool {
    command != UnitCommand::Release || others > 0
}

/// Great-circle distance in metres (haversine, mean Earth radius).
pub fn distance_m(a: GeoPoint, b: GeoPoint) -> f64 {
    const EARTH_RADIUS_M: f64 = 6_371_008.8;
    let (lat1, lat2) = (a.lat().to_radians(), b.lat().to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon() - a.lon()).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incidents_follow_their_first_unit() {
        use IncidentStatus as I;
        use UnitStatus as U;
        assert_eq!(
            incident_follows(U::EnRoute, I::Dispatched),
            Some(IncidentCommand::MarkEnRoute)
        );
        assert_eq!(incident_follows(U::EnRoute, I::OnScene), None);
        assert_eq!(
            incident_follows(U::OnScene, I::EnRoute),
            Some(IncidentCommand::MarkOnScene)
        );
        assert_eq!(incident_follows(U::OnScene, I::Resolved), None);
        assert_eq!(incident_follows(U::Available, I::Dispatched), None);
    }

    #[test]
    fn the_last_unit_on_an_incident_cannot_clear() {
        assert!(!may_report(UnitCommand::Release, 0));
        assert!(may_report(UnitCommand::Release, 1));
        assert!(may_report(UnitCommand::MarkOnScene, 0));
    }
    use UnitCommand as C;
    use UnitStatus as S;

    #[test]
    fn every_unit_transition_is_allowed_or_refused_as_specified() {
        let allowed = [
            (S::Available, C::Dispatch, S::Dispatched),
            (S::Dispatched, C::MarkEnRoute, S::EnRoute),
            (S::Dispatched, C::MarkOnScene, S::OnScene),
            (S::EnRoute, C::MarkOnScene, S::OnScene),
            (S::Dispatched, C::Release, S::Available),
            (S::EnRoute, C::Release, S::Available),
            (S::OnScene, C::Release, S::Available),
            (S::Available, C::TakeOutOfService, S::OutOfService),
            (S::OutOfService, C::ReturnToService, S::Available),
        ];
        let commands = [
            C::Dispatch,
            C::MarkEnRoute,
            C::MarkOnScene,
            C::Release,
            C::TakeOutOfService,
            C::ReturnToService,
        ];
        crate::check_transitions(&S::ALL, &commands, &allowed, S::apply, |from, command| {
            UnitTransitionError { from, command }
        });
    }

    #[test]
    fn crews_report_statuses_as_commands() {
        assert_eq!(S::Dispatched.command_to(S::EnRoute), Some(C::MarkEnRoute));
        assert_eq!(
            S::OutOfService.command_to(S::Available),
            Some(C::ReturnToService)
        );
        assert_eq!(S::OnScene.command_to(S::Available), Some(C::Release));
        assert_eq!(S::Available.command_to(S::Dispatched), None);
        assert_eq!(
            S::Available
                .apply(C::MarkOnScene)
                .expect_err("not assigned")
                .to_string(),
            "cannot mark on scene a unit that is AVAILABLE"
        );
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn distances_are_great_circle() {
        let p = |lat, lon| GeoPoint::new(lat, lon).expect("valid point");
        // Astana's Baiterek tower to Khan Shatyr: about 1.9 km.
        let d = distance_m(p(51.128207, 71.430411), p(51.132562, 71.403605));
        assert!((d - 1_937.0).abs() < 25.0, "{d}");
        // A quarter of the equator.
        let q = distance_m(p(0.0, 0.0), p(0.0, 90.0));
        assert!((q - 10_007_557.0).abs() < 100.0, "{q}");
        assert_eq!(distance_m(p(51.1, 71.4), p(51.1, 71.4)), 0.0);
    }
}
