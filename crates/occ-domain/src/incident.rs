//! Incidents: the situations operators act on, their priority and their status machine.
//!
//! ```text
//! NEW → QUEUED → CLAIMED → DISPATCHED → EN_ROUTE → ON_SCENE → RESOLVED → CLOSED
//!         ▲ └─────────┘ release / lease expiry       └───────────▲
//!         └── transfer (QUEUED or CLAIMED, to another queue)
//! any open status → DISMISSED (false alarm)
//! ```
//!
//! Each transition is [`IncidentStatus::apply`], a pure function; the store persists its result
//! together with the audit entry that records it.

use std::fmt;

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{GeoPoint, Zone};
use crate::rule::{Category, QueueName, RuleId};

/// Identifies an incident. UUID v7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IncidentId(pub Uuid);

impl IncidentId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for IncidentId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for IncidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How urgently an incident must be handled: P1 is the most urgent.
///
/// `Ord` follows urgency: `P1 > P2 > P3 > P4`, so `max` picks the more urgent of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Priority {
    P1,
    P2,
    P3,
    P4,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::P1, Priority::P2, Priority::P3, Priority::P4];

    /// 1 for P1 .. 4 for P4, as stored and shown.
    pub fn level(self) -> i16 {
        match self {
            Priority::P1 => 1,
            Priority::P2 => 2,
            Priority::P3 => 3,
            Priority::P4 => 4,
        }
    }

    pub fn from_level(level: i16) -> Option<Self> {
        match level {
            1 => Some(Priority::P1),
            2 => Some(Priority::P2),
            3 => Some(Priority::P3),
            4 => Some(Priority::P4),
            _ => None,
        }
    }

    /// One step more urgent (P1 stays P1).
    pub fn raised(self) -> Self {
        Self::from_level((self.level() - 1).max(1)).unwrap_or(self)
    }

    /// One step less urgent (P4 stays P4).
    pub fn lowered(self) -> Self {
        Self::from_level((self.level() + 1).min(4)).unwrap_or(self)
    }

    /// How long an incident of this priority may wait in its queue before it is escalated,
    /// unless its rule says otherwise.
    pub fn default_claim_within(self) -> TimeDelta {
        TimeDelta::seconds(match self {
            Priority::P1 => 60,
            Priority::P2 => 180,
            Priority::P3 => 600,
            Priority::P4 => 1800,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::P1 => "P1",
            Priority::P2 => "P2",
            Priority::P3 => "P3",
            Priority::P4 => "P4",
        }
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.level().cmp(&self.level())
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incident is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IncidentStatus {
    New,
    Queued,
    Claimed,
    Dispatched,
    EnRoute,
    OnScene,
    Resolved,
    Closed,
    Dismissed,
}

/// What an operator, a lease or the system does to an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncidentCommand {
    /// Put a new incident on its queue.
    Queue,
    /// An operator takes it from the queue under a lease.
    Claim,
    /// The claim ends without dispatch (released, or the lease expired).
    Release,
    /// Units are assigned.
    Dispatch,
    MarkEnRoute,
    MarkOnScene,
    Resolve,
    Close,
    /// A false alarm.
    Dismiss,
    /// Moved to another agency's queue; it waits there.
    Transfer,
}

/// A command that does not apply to the incident's current status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} an incident that is {from}")]
pub struct TransitionError {
    pub from: IncidentStatus,
    pub command: IncidentCommand,
}

impl IncidentStatus {
    pub const ALL: [IncidentStatus; 9] = [
        IncidentStatus::New,
        IncidentStatus::Queued,
        IncidentStatus::Claimed,
        IncidentStatus::Dispatched,
        IncidentStatus::EnRoute,
        IncidentStatus::OnScene,
        IncidentStatus::Resolved,
        IncidentStatus::Closed,
        IncidentStatus::Dismissed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::New => "NEW",
            IncidentStatus::Queued => "QUEUED",
            IncidentStatus::Claimed => "CLAIMED",
            IncidentStatus::Dispatched => "DISPATCHED",
            IncidentStatus::EnRoute => "EN_ROUTE",
            IncidentStatus::OnScene => "ON_SCENE",
            IncidentStatus::Resolved => "RESOLVED",
            IncidentStatus::Closed => "CLOSED",
            IncidentStatus::Dismissed => "DISMISSED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// Still being worked: new events with the same correlation key may join it.
    pub fn is_open(self) -> bool {
        !matches!(
            self,
            IncidentStatus::Resolved | IncidentStatus::Closed | IncidentStatus::Dismissed
        )
    }

    /// Reaching this status frees the incident's units: no one works it any more.
    pub fn releases_units(self) -> bool {
        matches!(self, IncidentStatus::Resolved | IncidentStatus::Dismissed)
    }

    /// The status after `command`, or why it does not apply.
    pub fn apply(self, command: IncidentCommand) -> Result<IncidentStatus, TransitionError> {
        use IncidentCommand as C;
        use IncidentStatus as S;
        let next = match (self, command) {
            (S::New, C::Queue) => S::Queued,
            (S::Queued, C::Claim) => S::Claimed,
            (S::Claimed, C::Release) => S::Queued,
            (S::Queued | S::Claimed, C::Transfer) => S::Queued,
            (S::Claimed, C::Dispatch) => S::Dispatched,
            (S::Dispatched, C::MarkEnRoute) => S::EnRoute,
            (S::Dispatched | S::EnRoute, C::MarkOnScene) => S::OnScene,
            (S::Dispatched | S::EnRoute | S::OnScene, C::Resolve) => S::Resolved,
            (S::Resolved, C::Close) => S::Closed,
            (s, C::Dismiss) if s.is_open() => S::Dismissed,
            (from, command) => return Err(TransitionError { from, command }),
        };
        Ok(next)
    }
}

impl fmt::Display for IncidentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for IncidentCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IncidentCommand::Queue => "queue",
            IncidentCommand::Claim => "claim",
            IncidentCommand::Release => "release",
            IncidentCommand::Dispatch => "dispatch",
            IncidentCommand::MarkEnRoute => "mark en route",
            IncidentCommand::MarkOnScene => "mark on scene",
            IncidentCommand::Resolve => "resolve",
            IncidentCommand::Close => "close",
            IncidentCommand::Dismiss => "dismiss",
            IncidentCommand::Transfer => "transfer",
        })
    }
}

/// An incident as stored: a situation for one agency's queue, built from one or more events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub id: IncidentId,
    pub number: IncidentNumber,
    pub category: Category,
    pub queue: QueueName,
    pub priority: Priority,
    pub status: IncidentStatus,
    pub title: String,
    pub location: Option<GeoPoint>,
    pub zone: Option<Zone>,
    pub correlation_key: String,
    /// Whether new events with the same key still join it.
    pub correlating: bool,
    /// The rule that opened it; `None` once that rule is deleted.
    pub rule_id: Option<RuleId>,
    pub rule_name: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub event_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// How long it may wait in its queue before escalation.
    pub claim_within: TimeDelta,
    /// When it escalates if still waiting (set while QUEUED).
    pub claim_deadline: Option<DateTime<Utc>>,
    /// It waited past its deadline: its priority was raised and supervisors are told.
    pub escalated_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    /// The active claim, while CLAIMED.
    pub claim: Option<ClaimInfo>,
}

/// Who holds an incident and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimInfo {
    pub id: Uuid,
    pub holder: String,
    pub claimed_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
}

/// The number people say on the radio: `INC-2026-000123` (year of creation, then a sequence
/// shared by all OCC instances).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IncidentNumber(String);

impl IncidentNumber {
    pub fn new(created_at: DateTime<Utc>, sequence: i64) -> Self {
        Self(format!("INC-{}-{sequence:06}", created_at.year()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_stored(value: String) -> Self {
        Self(value)
    }

    /// Recognises the shape `INC-YYYY-NNNNNN` (six or more digits).
    pub fn looks_valid(value: &str) -> bool {
        let mut parts = value.split('-');
        matches!(
            (parts.next(), parts.next(), parts.next(), parts.next()),
            (Some("INC"), Some(y), Some(n), None)
                if y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit())
                    && n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit())
        )
    }
}

impl fmt::Display for IncidentNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IncidentCommand as C;
    use IncidentStatus as S;
    use chrono::TimeZone;

    #[test]
    fn priorities_order_by_urgency() {
        assert!(Priority::P1 > Priority::P2);
        assert_eq!(Priority::P3.max(Priority::P2), Priority::P2);
        assert_eq!(Priority::P2.raised(), Priority::P1);
        assert_eq!(Priority::P1.raised(), Priority::P1);
        assert_eq!(Priority::P4.lowered(), Priority::P4);
        for p in Priority::ALL {
            assert_eq!(Priority::from_level(p.level()), Some(p));
        }
        assert_eq!(Priority::from_level(0), None);
        assert_eq!(Priority::from_level(5), None);
    }

    #[test]
    fn the_whole_lifecycle_walks_through() {
        let mut s = S::New;
        for (cmd, expect) in [
            (C::Queue, S::Queued),
            (C::Claim, S::Claimed),
            (C::Dispatch, S::Dispatched),
            (C::MarkEnRoute, S::EnRoute),
            (C::MarkOnScene, S::OnScene),
            (C::Resolve, S::Resolved),
            (C::Close, S::Closed),
        ] {
            s = s.apply(cmd).expect("valid step");
            assert_eq!(s, expect);
        }
    }

    /// Every (status, command) pair: exactly the listed ones are allowed.
    #[test]
    fn every_transition_is_allowed_or_refused_as_specified() {
        let allowed = [
            (S::New, C::Queue, S::Queued),
            (S::Queued, C::Claim, S::Claimed),
            (S::Claimed, C::Release, S::Queued),
            (S::Queued, C::Transfer, S::Queued),
            (S::Claimed, C::Transfer, S::Queued),
            (S::Claimed, C::Dispatch, S::Dispatched),
            (S::Dispatched, C::MarkEnRoute, S::EnRoute),
            (S::Dispatched, C::MarkOnScene, S::OnScene),
            (S::EnRoute, C::MarkOnScene, S::OnScene),
            (S::Dispatched, C::Resolve, S::Resolved),
            (S::EnRoute, C::Resolve, S::Resolved),
            (S::OnScene, C::Resolve, S::Resolved),
            (S::Resolved, C::Close, S::Closed),
            (S::New, C::Dismiss, S::Dismissed),
            (S::Queued, C::Dismiss, S::Dismissed),
            (S::Claimed, C::Dismiss, S::Dismissed),
            (S::Dispatched, C::Dismiss, S::Dismissed),
            (S::EnRoute, C::Dismiss, S::Dismissed),
            (S::OnScene, C::Dismiss, S::Dismissed),
        ];
        let commands = [
            C::Queue,
            C::Claim,
            C::Release,
            C::Dispatch,
            C::MarkEnRoute,
            C::MarkOnScene,
            C::Resolve,
            C::Close,
            C::Dismiss,
            C::Transfer,
        ];
        crate::check_transitions(&S::ALL, &commands, &allowed, S::apply, |from, command| {
            TransitionError { from, command }
        });
    }

    #[test]
    fn refusals_name_the_current_status() {
        let err = S::Closed
            .apply(C::Claim)
            .expect_err("closed cannot be claimed");
        assert_eq!(err.to_string(), "cannot claim an incident that is CLOSED");
    }

    #[test]
    fn terminal_statuses_are_not_open() {
        let open: Vec<_> = S::ALL.into_iter().filter(|s| s.is_open()).collect();
        assert_eq!(
            open,
            [
                S::New,
                S::Queued,
                S::Claimed,
                S::Dispatched,
                S::EnRoute,
                S::OnScene
            ]
        );
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn numbers_carry_the_year_and_a_padded_sequence() {
        let t = Utc
            .with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
            .single()
            .expect("valid time");
        let n = IncidentNumber::new(t, 123);
        assert_eq!(n.as_str(), "INC-2026-000123");
        assert!(IncidentNumber::looks_valid(n.as_str()));
        assert_eq!(
            IncidentNumber::new(t, 1_234_567).as_str(),
            "INC-2026-1234567"
        );
        assert!(!IncidentNumber::looks_valid("INC-26-000123"));
        assert!(!IncidentNumber::looks_valid("0192d7"));
    }
}
