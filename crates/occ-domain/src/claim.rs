//! Claims: an operator's exclusive hold on an incident, from `ClaimNext` until the operator
//! releases it, dispatches units, transfers the incident or dismisses it, or the lease runs
//! out. The decisions about a claim (who may use it, until when, how it ends) and the deadline
//! arithmetic around queues live here; the store persists what they decide, on the database's
//! clock.

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::incident::Priority;
use crate::validation::FieldErrors;

/// How long a claim holds without being extended: between [`Lease::MIN`] and [`Lease::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(TimeDelta);

impl Lease {
    pub const MIN: TimeDelta = TimeDelta::seconds(1);
    pub const MAX: TimeDelta = TimeDelta::hours(1);

    /// A lease of `duration`, refused (on field `lease`) outside its bounds.
    pub fn new(duration: TimeDelta) -> Result<Lease, FieldErrors> {
        if duration < Self::MIN || duration > Self::MAX {
            return Err(FieldErrors::one(
                "lease",
                format!(
                    "must be between {} and {} seconds, got {}",
                    Self::MIN.num_seconds(),
                    Self::MAX.num_seconds(),
                    duration.num_seconds()
                ),
            ));
        }
        Ok(Lease(duration))
    }

    pub fn duration(self) -> TimeDelta {
        self.0
    }

    /// When a lease taken or renewed at `now` runs out.
    pub fn until(self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + self.0
    }
}

/// How a claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimEnd {
    /// Given back to the queue by its holder.
    Released,
    /// Its holder dispatched units.
    Dispatched,
    /// The incident was moved to another queue.
    Transferred,
    /// The incident was dismissed while claimed.
    Dismissed,
    /// The lease ran out; the incident went back to its queue.
    Expired,
}

impl ClaimEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimEnd::Released => "released",
            ClaimEnd::Dispatched => "dispatched",
            ClaimEnd::Transferred => "transferred",
            ClaimEnd::Dismissed => "dismissed",
            ClaimEnd::Expired => "expired",
        }
    }

    pub fn parse(value: &str) -> Option<ClaimEnd> {
        [
            ClaimEnd::Released,
            ClaimEnd::Dispatched,
            ClaimEnd::Transferred,
            ClaimEnd::Dismissed,
            ClaimEnd::Expired,
        ]
        .into_iter()
        .find(|e| e.as_str() == value)
    }
}

impl fmt::Display for ClaimEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A claim as stored: active while `ended` is `None` and its lease runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: Uuid,
    pub holder: String,
    pub claimed_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    pub ended: Option<(DateTime<Utc>, ClaimEnd)>,
}

/// Why a claim cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// Someone else holds it: the caller may not act on the incident through it.
    HeldByAnother { holder: String },
    /// It ended: the incident moved on.
    Ended { at: DateTime<Utc>, end: ClaimEnd },
    /// Its lease ran out (the sweep has not yet put the incident back).
    Expired { at: DateTime<Utc> },
}

impl fmt::Display for ClaimRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimRefusal::HeldByAnother { holder } => write!(f, "held by {holder}"),
            ClaimRefusal::Ended { at, end } => write!(f, "ended at {at} ({end})"),
            ClaimRefusal::Expired { at } => write!(f, "expired at {at}"),
        }
    }
}

impl Claim {
    /// Whether `holder` may act through this claim at `now`: it is theirs, it has not ended
    /// and its lease runs.
    pub fn check(&self, holder: &str, now: DateTime<Utc>) -> Result<(), ClaimRefusal> {
        if self.holder != holder {
            return Err(ClaimRefusal::HeldByAnother {
                holder: self.holder.clone(),
            });
        }
        if let Some((at, end)) = self.ended {
            return Err(ClaimRefusal::Ended { at, end });
        }
        if self.has_expired(now) {
            return Err(ClaimRefusal::Expired {
                at: self.lease_until,
            });
        }
        Ok(())
    }

    /// Whether the lease has run out at `now` on a claim not yet ended: the sweep ends it.
    pub fn has_expired(&self, now: DateTime<Utc>) -> bool {
        self.ended.is_none() && self.lease_until <= now
    }
}

/// When an incident that enters its queue at `now` escalates if nobody claims it.
pub fn claim_deadline(now: DateTime<Utc>, claim_within: TimeDelta) -> DateTime<Utc> {
    now + claim_within
}

/// What escalation does to an incident still waiting past its claim deadline: one priority
/// step higher (P1 stays P1), flagged for supervisors, any acknowledgement of an earlier
/// escalation cleared, no new deadline (supervisors now watch it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalation {
    pub priority: Priority,
    pub escalated_at: DateTime<Utc>,
}

/// Escalates an incident of `priority` whose deadline passed, at `now`; `None` if the
/// deadline has not passed.
pub fn escalate(
    priority: Priority,
    deadline: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Escalation> {
    deadline.filter(|d| *d <= now).map(|_| Escalation {
        priority: priority.raised(),
        escalated_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn lease(s: i64) -> Lease {
        Lease::new(TimeDelta::seconds(s)).unwrap()
    }

    #[test]
    fn a_lease_is_bounded() {
        assert!(Lease::new(TimeDelta::milliseconds(500)).is_err());
        assert!(Lease::new(TimeDelta::hours(2)).is_err());
        assert_eq!(lease(30).until(at(0)), at(30));
        let refused = Lease::new(TimeDelta::zero()).unwrap_err();
        assert!(refused.to_string().contains("lease"), "{refused}");
    }

    /// A claim by `holder` taken at 0 with a lease of `lease` seconds.
    fn claim(holder: &str, lease: i64) -> Claim {
        Claim {
            id: Uuid::nil(),
            holder: holder.into(),
            claimed_at: at(0),
            lease_until: at(lease),
            ended: None,
        }
    }

    #[test]
    fn only_its_holder_uses_a_running_claim() {
        let claim = claim("op-1", 30);
        assert_eq!(claim.check("op-1", at(29)), Ok(()));
        assert_eq!(
            claim.check("op-2", at(1)),
            Err(ClaimRefusal::HeldByAnother {
                holder: "op-1".into()
            })
        );
        assert_eq!(
            claim.check("op-1", at(30)),
            Err(ClaimRefusal::Expired { at: at(30) })
        );
        assert!(claim.has_expired(at(30)) && !claim.has_expired(at(29)));
    }

    #[test]
    fn an_ended_claim_is_refused_and_never_expires() {
        let claim = Claim {
            ended: Some((at(25), ClaimEnd::Dispatched)),
            ..claim("op-1", 30)
        };
        assert_eq!(
            claim.check("op-1", at(27)),
            Err(ClaimRefusal::Ended {
                at: at(25),
                end: ClaimEnd::Dispatched
            })
        );
        assert!(!claim.has_expired(at(1000)));
    }

    #[test]
    fn claim_ends_read_back_as_written() {
        for end in [
            ClaimEnd::Released,
            ClaimEnd::Dispatched,
            ClaimEnd::Transferred,
            ClaimEnd::Dismissed,
            ClaimEnd::Expired,
        ] {
            assert_eq!(ClaimEnd::parse(end.as_str()), Some(end));
        }
        assert_eq!(ClaimEnd::parse("lost"), None);
    }

    #[test]
    fn an_incident_escalates_once_its_deadline_passed() {
        let deadline = claim_deadline(at(0), TimeDelta::seconds(60));
        assert_eq!(deadline, at(60));
        assert_eq!(escalate(Priority::P3, Some(deadline), at(59)), None);
        assert_eq!(
            escalate(Priority::P3, Some(deadline), at(60)),
            Some(Escalation {
                priority: Priority::P2,
                escalated_at: at(60)
            })
        );
        assert_eq!(
            escalate(Priority::P1, Some(deadline), at(61)).map(|e| e.priority),
            Some(Priority::P1)
        );
        assert_eq!(escalate(Priority::P2, None, at(1000)), None);
    }
}
