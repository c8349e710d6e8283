//! The operations center's wall: how many events and incidents, per zone and type, per hour or
//! per day (for heat maps and trends). What a question may ask is decided here; the counts are
//! kept by the store as events commit.

use chrono::{DateTime, TimeDelta, Utc};

use crate::search::Window;
use crate::validation::FieldError;

/// The most counts one answer holds: a wall asking for more is asking for raw data.
pub const MAX_COUNTS: usize = 50_000;

/// How long a bucket is. Hours and days are those of the city's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    /// The longest window one question may cover: a month of hours, two years of days.
    pub fn longest(self) -> TimeDelta {
        match self {
            Granularity::Hour => TimeDelta::days(31),
            Granularity::Day => TimeDelta::days(732),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

/// What counts are told apart by; counts are summed over the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Split {
    pub time: bool,
    pub zone: bool,
    /// The event type, or the incident category.
    pub kind: bool,
    /// Incidents only: the queue that opened it.
    pub queue: bool,
    /// Incidents only: its priority when opened.
    pub priority: bool,
}

/// One dimension a caller may split counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Time,
    Zone,
    Kind,
    Queue,
    Priority,
}

/// Whether the counts are of events or of incidents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Events,
    Incidents,
}

impl Split {
    /// The split `dimensions` ask for, each at most once and meaningful for what is counted;
    /// none means by time, zone and type (and, for incidents, queue and priority too).
    pub fn parse(
        field: &str,
        counted: Counted,
        dimensions: &[Dimension],
    ) -> Result<Split, FieldError> {
        if dimensions.is_empty() {
            let incidents = counted == Counted::Incidents;
            return Ok(Split {
                time: true,
                zone: true,
                kind: true,
                queue: incidents,
                priority: incidents,
            });
        }
        let mut split = Split::default();
        for (i, d) in dimensions.iter().enumerate() {
            let slot = match d {
                Dimension::Time => &mut split.time,
                Dimension::Zone => &mut split.zone,
                Dimension::Kind => &mut split.kind,
                Dimension::Queue | Dimension::Priority if counted == Counted::Events => {
                    return Err(FieldError::new(
                        format!("{field}[{i}]"),
                        "events have no queue or priority; only incidents are split by them",
                    ));
                }
                Dimension::Queue => &mut split.queue,
                Dimension::Priority => &mut split.priority,
            };
            if std::mem::replace(slot, true) {
                return Err(FieldError::new(
                    format!("{field}[{i}]"),
                    "names a dimension already given",
                ));
            }
        }
        Ok(split)
    }
}

/// The buckets a question covers: those that begin within `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    pub window: Window,
    pub granularity: Granularity,
}

impl Buckets {
    /// Both ends required, at most [`Granularity::longest`] apart.
    pub fn parse(
        field: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        granularity: Granularity,
    ) -> Result<Buckets, FieldError> {
        Ok(Buckets {
            window: Window::parse(field, from, to, granularity.longest())?,
            granularity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_split_defaults_to_everything_counted_and_refuses_what_events_lack() {
        let all = Split::parse("group_by", Counted::Incidents, &[]).unwrap();
        assert!(all.time && all.zone && all.kind && all.queue && all.priority);
        let events = Split::parse("group_by", Counted::Events, &[]).unwrap();
        assert!(events.time && events.zone && events.kind);
        assert!(!events.queue && !events.priority);

        let zone = Split::parse("group_by", Counted::Events, &[Dimension::Zone]).unwrap();
        assert_eq!(
            zone,
            Split {
                zone: true,
                ..Split::default()
            }
        );
        let refused = Split::parse(
            "group_by",
            Counted::Events,
            &[Dimension::Zone, Dimension::Queue],
        )
        .unwrap_err();
        assert_eq!(refused.field, "group_by[1]");
        let twice = Split::parse(
            "group_by",
            Counted::Incidents,
            &[Dimension::Queue, Dimension::Queue],
        )
        .unwrap_err();
        assert_eq!(twice.field, "group_by[1]");
    }

    #[test]
    fn hours_cover_a_month_and_days_two_years() {
        let from = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let ok = |g: Granularity, days| {
            Buckets::parse(
                "time_range",
                Some(from),
                Some(from + TimeDelta::days(days)),
                g,
            )
        };
        assert!(ok(Granularity::Hour, 31).is_ok());
        assert_eq!(
            ok(Granularity::Hour, 32).unwrap_err().message,
            "must span at most 31 days"
        );
        assert!(ok(Granularity::Day, 732).is_ok());
        assert!(ok(Granularity::Day, 733).is_err());
        assert_eq!(
            Buckets::parse("time_range", None, Some(from), Granularity::Day)
                .unwrap_err()
                .field,
            "time_range"
        );
    }
}
