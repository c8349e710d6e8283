//! How long events are kept, and the time partitions they are kept in.
//!
//! Events are stored in partitions of a day or a month of `seen_at` (see
//! [`crate::Event::observed_at`]). OCC creates them ahead of time; retention thins a partition
//! once every event kind in it that may go has passed its age, keeping what incidents and
//! watch-list hits link to and what a legal hold covers.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeDelta, TimeZone, Utc};

use crate::glob::Glob;

/// How much time one partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "daily" | "day" => Ok(Period::Day),
            "monthly" | "month" => Ok(Period::Month),
            _ => Err(format!("{s:?}: daily or monthly")),
        }
    }
}

impl Period {
    /// The start of the period `t` is in (UTC).
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let day = match self {
            Period::Day => t.date_naive(),
            Period::Month => NaiveDate::from_ymd_opt(t.year(), t.month(), 1).unwrap_or_default(),
        };
        Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
    }

    /// The start of the period after the one `t` is in.
    pub fn next(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let start = self.floor(t);
        match self {
            Period::Day => start + TimeDelta::days(1),
            Period::Month => start
                .checked_add_months(Months::new(1))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }
}

/// A partition's time range, `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Range {
    /// The table's name: `events_2026_12` for a month, `events_2026_12_01` for a day, and the
    /// full start time for a range that is neither (left by a change of period).
    pub fn name(&self) -> String {
        let f = self.from;
        let whole_month = Period::Month.floor(f) == f && Period::Month.next(f) == self.to;
        let whole_day = Period::Day.floor(f) == f && Period::Day.next(f) == self.to;
        if whole_month {
            f.format("events_%Y_%m").to_string()
        } else if whole_day {
            f.format("events_%Y_%m_%d").to_string()
        } else {
            f.format("events_%Y_%m_%d_%H%M%S").to_string()
        }
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.from < other.to && other.from < self.to
    }
}

/// The partitions to create so that every period touching `wanted` (and every time in
/// `also`, events waiting in the default partition) is covered, given the `existing` ranges.
/// Where an existing range covers part of a period (after the period was changed), only the
/// rest is created.
pub fn missing(
    existing: &[Range],
    wanted: Range,
    also: &[DateTime<Utc>],
    period: Period,
) -> Vec<Range> {
    let mut periods: Vec<Range> = Vec::new();
    let mut t = period.floor(wanted.from);
    while t < wanted.to {
        let next = period.next(t);
        periods.push(Range { from: t, to: next });
        t = next;
    }
    for &at in also {
        let p = Range {
            from: period.floor(at),
            to: period.next(at),
        };
        if !periods.contains(&p) {
            periods.push(p);
        }
    }
    periods.sort();
    let mut out = Vec::new();
    for p in periods {
        // What of p no existing range covers.
        let mut pieces = vec![p];
        for e in existing.iter().filter(|e| e.overlaps(&p)) {
            pieces = pieces
                .into_iter()
                .flat_map(|piece| {
                    let mut left = Vec::new();
                    if piece.from < e.from {
                        left.push(Range {
                            from: piece.from,
                            to: e.from.min(piece.to),
                        });
                    }
                    if e.to < piece.to {
                        left.push(Range {
                            from: e.to.max(piece.from),
                            to: piece.to,
                        });
                    }
                    if e.overlaps(&piece) {
                        left
                    } else {
                        vec![piece]
                    }
                })
                .collect();
        }
        out.extend(pieces.into_iter().filter(|r| r.from < r.to));
    }
    out
}

/// How long events of a kind are kept: the first rule whose pattern matches the event type,
/// else the default; `None` keeps them for ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub rules: Vec<(Glob, TimeDelta)>,
    pub default: Option<TimeDelta>,
}

impl Default for Retention {
    /// A year of everything.
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            default: Some(TimeDelta::days(365)),
        }
    }
}

fn parse_age(s: &str) -> Result<Option<TimeDelta>, String> {
    if s == "forever" {
        return Ok(None);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?}: an age like 30d, 12w, 1y or forever"))?;
    let days = match unit {
        "d" => n,
        "w" => n * 7,
        "y" => n * 365,
        _ => return Err(format!("{s:?}: an age like 30d, 12w, 1y or forever")),
    };
    if days < 1 {
        return Err(format!("{s:?}: at least a day"));
    }
    Ok(Some(TimeDelta::days(days)))
}

impl FromStr for Retention {
    type Err = String;

    /// `motion.*=30d,lpr.*=2y,default=1y` (`forever` keeps).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut retention = Retention::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (pattern, age) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: PATTERN=AGE, e.g. motion.*=30d"))?;
            let age = parse_age(age.trim())?;
            match pattern.trim() {
                "default" => retention.default = age,
                "" => return Err(format!("{item:?}: an event type pattern before '='")),
                p => retention
                    .rules
                    .push((Glob::new(p), age.unwrap_or(TimeDelta::MAX))),
            }
        }
        Ok(retention)
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = |a: Option<TimeDelta>| match a {
            Some(a) if a < TimeDelta::MAX => format!("{}d", a.num_days()),
            _ => "forever".to_owned(),
        };
        for (glob, a) in &self.rules {
            write!(f, "{glob}={},", age(Some(*a)))?;
        }
        write!(f, "default={}", age(self.default))
    }
}

impl Retention {
    /// How long events of `event_type` are kept (`None`: for ever).
    pub fn age_of(&self, event_type: &str) -> Option<TimeDelta> {
        match self.rules.iter().find(|(g, _)| g.is_match(event_type)) {
            Some((_, age)) if *age == TimeDelta::MAX => None,
            Some((_, age)) => Some(*age),
            None => self.default,
        }
    }

    /// What of a partition ending at `to` may go at `now`: a description of the rules whose
    /// age has passed for it (`None` when none has). Retention thins a partition again only
    /// when this grows.
    pub fn expired(&self, to: DateTime<Utc>, now: DateTime<Utc>) -> Option<String> {
        let past = |age: TimeDelta| age < TimeDelta::MAX && to <= now - age;
        let mut expired: Vec<String> = self
            .rules
            .iter()
            .filter(|(_, a)| past(*a))
            .map(|(g, _)| g.to_string())
            .collect();
        if self.default.is_some_and(past) {
            expired.push("default".into());
        }
        (!expired.is_empty()).then(|| expired.join(","))
    }

    /// The rules as SQL `LIKE` patterns with their ages in days (`None`: for ever), in order,
    /// and the default's age, for the database to apply row by row.
    pub fn as_sql(&self) -> (Vec<String>, Vec<Option<i64>>, Option<i64>) {
        let (patterns, ages) = self
            .rules
            .iter()
            .map(|(g, a)| (g.to_like(), (*a < TimeDelta::MAX).then(|| a.num_days())))
            .unzip();
        (patterns, ages, self.default.map(|d| d.num_days()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    #[test]
    fn periods_and_names() {
        let at = t("2026-12-31T23:59:59Z");
        assert_eq!(Period::Month.floor(at), t("2026-12-01T00:00:00Z"));
        assert_eq!(Period::Month.next(at), t("2027-01-01T00:00:00Z"));
        assert_eq!(Period::Day.next(at), t("2027-01-01T00:00:00Z"));
        let month = Range {
            from: t("2026-12-01T00:00:00Z"),
            to: t("2027-01-01T00:00:00Z"),
        };
        assert_eq!(month.name(), "events_2026_12");
        let day = Range {
            from: t("2026-12-05T00:00:00Z"),
            to: t("2026-12-06T00:00:00Z"),
        };
        assert_eq!(day.name(), "events_2026_12_05");
    }

    #[test]
    fn missing_partitions_cover_the_window_and_stragglers_around_what_exists() {
        let december = Range {
            from: t("2026-12-01T00:00:00Z"),
            to: t("2027-01-01T00:00:00Z"),
        };
        let wanted = Range {
            from: t("2026-12-30T00:00:00Z"),
            to: t("2027-02-15T00:00:00Z"),
        };
        let made = missing(
            &[december],
            wanted,
            &[t("1970-01-01T00:00:07Z")],
            Period::Month,
        );
        let names: Vec<String> = made.iter().map(Range::name).collect();
        assert_eq!(
            names,
            ["events_1970_01", "events_2027_01", "events_2027_02"]
        );

        // Switched to days half way through a month: only the uncovered days.
        let days = missing(
            &[december],
            Range {
                from: t("2026-12-31T00:00:00Z"),
                to: t("2027-01-02T00:00:00Z"),
            },
            &[],
            Period::Day,
        );
        assert_eq!(
            days.iter().map(Range::name).collect::<Vec<_>>(),
            ["events_2027_01_01"]
        );
        // An odd existing range splits a period.
        let odd = Range {
            from: t("2027-01-10T00:00:00Z"),
            to: t("2027-01-20T00:00:00Z"),
        };
        let pieces = missing(
            &[odd],
            Range {
                from: t("2027-01-05T00:00:00Z"),
                to: t("2027-01-06T00:00:00Z"),
            },
            &[],
            Period::Month,
        );
        assert_eq!(
            pieces,
            [
                Range {
                    from: t("2027-01-01T00:00:00Z"),
                    to: t("2027-01-10T00:00:00Z")
                },
                Range {
                    from: t("2027-01-20T00:00:00Z"),
                    to: t("2027-02-01T00:00:00Z")
                }
            ]
        );
    }

    #[test]
    fn retention_by_kind_first_rule_wins() {
        let r: Retention = "motion.*=30d, lpr.*=forever, default=1y"
            .parse()
            .expect("parses");
        assert_eq!(r.age_of("motion.detected"), Some(TimeDelta::days(30)));
        assert_eq!(r.age_of("lpr.plate"), None);
        assert_eq!(r.age_of("smoke.detected"), Some(TimeDelta::days(365)));
        let now = t("2027-06-01T00:00:00Z");
        assert_eq!(r.expired(t("2027-05-15T00:00:00Z"), now), None);
        assert_eq!(
            r.expired(t("2027-05-01T00:00:00Z"), now).as_deref(),
            Some("motion.*")
        );
        assert_eq!(
            r.expired(t("2026-05-01T00:00:00Z"), now).as_deref(),
            Some("motion.*,default")
        );
        assert_eq!(r.to_string(), "motion.*=30d,lpr.*=forever,default=365d");
        assert_eq!(
            r.as_sql(),
            (
                vec!["motion.%".to_owned(), "lpr.%".to_owned()],
                vec![Some(30), None],
                Some(365)
            )
        );
        for bad in ["motion.*", "x=3", "=30d", "x=0d"] {
            assert!(bad.parse::<Retention>().is_err(), "{bad}");
        }
    }
}
