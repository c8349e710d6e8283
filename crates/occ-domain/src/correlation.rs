//! Correlation: which new events join an open incident and which open a new one.
//!
//! Events with the same correlation key belong to one incident while each arrives within the
//! rule's window of the incident's last event (a sliding window: a fire that keeps setting off
//! detectors stays one incident). An event after a quiet gap longer than the window starts a new
//! incident; the old one stays open for its responders but no longer absorbs events.
//!
//! At most one incident per key is *correlating* at any time; the store enforces that with a
//! unique index, which is what keeps two OCC instances from opening the same incident twice.

use chrono::{DateTime, TimeDelta, Utc};

use crate::incident::{IncidentId, Priority};

/// The correlating incident of a key, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIncident {
    pub id: IncidentId,
    pub priority: Priority,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// A new event that carries a key: when it was observed and what priority it deserves.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub observed_at: DateTime<Utc>,
    pub priority: Priority,
}

/// A run of events that are one incident.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The existing incident these events join; `None` opens a new one.
    pub joins: Option<IncidentId>,
    /// Indexes into the candidates, oldest first.
    pub events: Vec<usize>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The incident's priority after these events.
    pub priority: Priority,
    /// The joined incident's priority before them, when joining.
    pub previous_priority: Option<Priority>,
    /// Whether the incident still absorbs later events (only the newest segment does).
    pub keeps_correlating: bool,
}

impl Segment {
    /// True when joining events made the incident more urgent.
    pub fn raised_priority(&self) -> bool {
        self.previous_priority.is_some_and(|p| self.priority > p)
    }
}

/// What to do with one key's new events.
#[derive(Debug, Clone, PartialEq)]
pub struct CorrelationPlan {
    /// An existing incident that no event joins and that stops correlating because a newer
    /// incident takes over the key.
    pub retire: Option<IncidentId>,
    pub segments: Vec<Segment>,
}

/// Plans one correlation key: `existing` is its correlating incident, if any; `candidates` are
/// the new events with that key, in any order.
///
/// Events from well before the correlating incident (more than a window before its first
/// event: a replayed backlog, a device with a stale clock) are a situation of their own, long
/// over: they get incidents of their own that never take the key over.
pub fn plan_correlation(
    existing: Option<&OpenIncident>,
    window: TimeDelta,
    candidates: &[Candidate],
) -> CorrelationPlan {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| candidates[i].observed_at);
    let split = existing.map_or(0, |inc| {
        order.partition_point(|&i| candidates[i].observed_at < inc.first_seen - window)
    });
    let (early, rest) = order.split_at(split);

    let (mut segments, _) = segment(None, window, candidates, early);
    for s in &mut segments {
        s.keeps_correlating = false;
    }
    let (current, retire) = segment(existing, window, candidates, rest);
    segments.extend(current);
    CorrelationPlan { retire, segments }
}

/// Cuts `order` (sorted by time) into runs without a gap longer than `window`, the first run
/// joining `existing` when it is close enough. Returns the runs and the existing incident if
/// it is retired without being joined.
fn segment(
    existing: Option<&OpenIncident>,
    window: TimeDelta,
    candidates: &[Candidate],
    order: &[usize],
) -> (Vec<Segment>, Option<IncidentId>) {
    let mut retire = None;
    let mut done: Vec<Segment> = Vec::new();
    let mut current = existing.map(|inc| Segment {
        joins: Some(inc.id),
        events: Vec::new(),
        first_seen: inc.first_seen,
        last_seen: inc.last_seen,
        priority: inc.priority,
        previous_priority: Some(inc.priority),
        keeps_correlating: true,
    });

    for &i in order {
        let c = &candidates[i];
        match current.as_mut() {
            Some(seg) if c.observed_at <= seg.last_seen + window => {
                seg.events.push(i);
                seg.first_seen = seg.first_seen.min(c.observed_at);
                seg.last_seen = seg.last_seen.max(c.observed_at);
                seg.priority = seg.priority.max(c.priority);
            }
            _ => {
                if let Some(mut old) = current.take() {
                    old.keeps_correlating = false;
                    if old.events.is_empty() {
                        retire = old.joins;
                    } else {
                        done.push(old);
                    }
                }
                current = Some(Segment {
                    joins: None,
                    events: vec![i],
                    first_seen: c.observed_at,
                    last_seen: c.observed_at,
                    priority: c.priority,
                    previous_priority: None,
                    keeps_correlating: true,
                });
            }
        }
    }
    if let Some(last) = current.filter(|s| !s.events.is_empty()) {
        done.push(last);
    }
    (done, retire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn t(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
            .single()
            .expect("valid time")
            + TimeDelta::minutes(min)
    }

    fn c(min: i64, priority: Priority) -> Candidate {
        Candidate {
            observed_at: t(min),
            priority,
        }
    }

    fn open(last_seen_min: i64, priority: Priority) -> OpenIncident {
        OpenIncident {
            id: IncidentId(Uuid::nil()),
            priority,
            first_seen: t(last_seen_min - 5),
            last_seen: t(last_seen_min),
        }
    }

    const WINDOW: TimeDelta = TimeDelta::minutes(30);

    #[test]
    fn the_first_event_opens_an_incident() {
        let plan = plan_correlation(None, WINDOW, &[c(0, Priority::P2)]);
        assert_eq!(plan.retire, None);
        assert_eq!(plan.segments.len(), 1);
        let s = &plan.segments[0];
        assert_eq!(s.joins, None);
        assert_eq!(s.events, [0]);
        assert!(s.keeps_correlating);
        assert!(!s.raised_priority());
    }

    #[test]
    fn events_inside_the_window_join_and_slide_it() {
        let existing = open(0, Priority::P2);
        // 25 minutes after the last event, then 50 (25 after that one): one sliding window.
        let plan = plan_correlation(
            Some(&existing),
            WINDOW,
            &[c(50, Priority::P2), c(25, Priority::P2)],
        );
        assert_eq!(plan.retire, None);
        assert_eq!(plan.segments.len(), 1);
        let s = &plan.segments[0];
        assert_eq!(s.joins, Some(existing.id));
        assert_eq!(s.events, [1, 0], "oldest first");
        assert_eq!(s.last_seen, t(50));
        assert_eq!(s.first_seen, t(-5));
    }

    #[test]
    fn a_more_urgent_event_raises_the_priority_a_less_urgent_one_never_lowers_it() {
        let existing = open(0, Priority::P2);
        let plan = plan_correlation(Some(&existing), WINDOW, &[c(1, Priority::P1)]);
        assert_eq!(plan.segments[0].priority, Priority::P1);
        assert!(plan.segments[0].raised_priority());

        let plan = plan_correlation(Some(&existing), WINDOW, &[c(1, Priority::P4)]);
        assert_eq!(plan.segments[0].priority, Priority::P2);
        assert!(!plan.segments[0].raised_priority());
    }

    #[test]
    fn after_a_quiet_gap_a_new_incident_takes_over_the_key() {
        let existing = open(0, Priority::P2);
        let plan = plan_correlation(Some(&existing), WINDOW, &[c(31, Priority::P2)]);
        assert_eq!(plan.retire, Some(existing.id));
        assert_eq!(plan.segments.len(), 1);
        assert_eq!(plan.segments[0].joins, None);
        assert!(plan.segments[0].keeps_correlating);
    }

    #[test]
    fn a_backlog_spanning_gaps_splits_into_incidents_only_the_newest_correlating() {
        let existing = open(0, Priority::P3);
        let plan = plan_correlation(
            Some(&existing),
            WINDOW,
            &[
                c(10, Priority::P3),
                c(100, Priority::P3),
                c(120, Priority::P2),
                c(200, Priority::P3),
            ],
        );
        assert_eq!(
            plan.retire, None,
            "the existing incident is joined, not retired"
        );
        let shape: Vec<_> = plan
            .segments
            .iter()
            .map(|s| {
                (
                    s.joins.is_some(),
                    s.events.clone(),
                    s.keeps_correlating,
                    s.priority,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (true, vec![0], false, Priority::P3),
                (false, vec![1, 2], false, Priority::P2),
                (false, vec![3], true, Priority::P3),
            ]
        );
    }

    #[test]
    fn a_late_event_within_a_window_of_the_start_joins() {
        // The incident runs from minute 55 to 60; an event from minute 30 arrives late.
        let existing = open(60, Priority::P2);
        let plan = plan_correlation(Some(&existing), WINDOW, &[c(30, Priority::P2)]);
        assert_eq!(plan.segments.len(), 1);
        assert_eq!(plan.segments[0].joins, Some(existing.id));
        assert_eq!(plan.segments[0].first_seen, t(30));
        assert_eq!(plan.segments[0].last_seen, t(60));
    }

    #[test]
    fn a_replayed_backlog_from_long_before_gets_its_own_incident() {
        // Three days before the current incident, two readings ten minutes apart.
        let existing = open(60, Priority::P2);
        let days_ago = -3 * 24 * 60;
        let plan = plan_correlation(
            Some(&existing),
            WINDOW,
            &[
                c(days_ago + 10, Priority::P2),
                c(61, Priority::P2),
                c(days_ago, Priority::P2),
            ],
        );
        assert_eq!(plan.retire, None);
        let shape: Vec<_> = plan
            .segments
            .iter()
            .map(|s| (s.joins.is_some(), s.events.clone(), s.keeps_correlating))
            .collect();
        assert_eq!(shape, [(false, vec![2, 0], false), (true, vec![1], true)]);
        assert_eq!(
            plan.segments[1].first_seen,
            t(55),
            "the current incident keeps its start"
        );
    }

    #[test]
    fn a_zero_window_gives_each_later_event_its_own_incident() {
        let plan = plan_correlation(
            None,
            TimeDelta::zero(),
            &[c(0, Priority::P1), c(1, Priority::P1)],
        );
        assert_eq!(plan.segments.len(), 2);
        assert!(!plan.segments[0].keeps_correlating);
        assert!(plan.segments[1].keeps_correlating);
    }
}
