//! Searching stored events for an investigation: what a search may ask, and the decisions made
//! about it without the database: the case it is for, its time window, the area it covers, and
//! which kinds of event the caller's agencies may see.
//!
//! The database narrows by time, zone, source, plate and a bounding box; whether a position
//! lies inside a searched area is decided here, by the same geometry as zones (a point on the
//! edge is inside).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use geo::{Area as _, Coord, Intersects, LineString, Point, Polygon};

use crate::access::{Principal, Role};
use crate::event::GeoPoint;
use crate::glob::Glob;
use crate::unit::distance_m;
use crate::validation::FieldError;

/// The investigation a search is made for: a police case number, a court order. Required of
/// every search, and recorded with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CaseRef(String);

impl CaseRef {
    pub const MAX_LEN: usize = 128;

    pub fn parse(field: &str, value: &str) -> Result<CaseRef, FieldError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(FieldError::new(
                field,
                "is required: every search names the case it is made for",
            ));
        }
        if value.chars().count() > Self::MAX_LEN {
            return Err(FieldError::new(
                field,
                format!("must be at most {} characters", Self::MAX_LEN),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(FieldError::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(CaseRef(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A time window `[from, to)` a search covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    /// The window from `from` to `to`, both required, at most `max` long.
    pub fn parse(
        field: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        max: TimeDelta,
    ) -> Result<Window, FieldError> {
        let (Some(from), Some(to)) = (from, to) else {
            return Err(FieldError::new(
                field,
                "is required: a start_time and an end_time",
            ));
        };
        if from >= to {
            return Err(FieldError::new(
                format!("{field}.end_time"),
                "must be after start_time",
            ));
        }
        if to - from > max {
            return Err(FieldError::new(
                field,
                format!("must span at most {}", human(max)),
            ));
        }
        Ok(Window { from, to })
    }

    /// `[start − before, end + after]`: the window around something that lasted from `start`
    /// to `end`.
    pub fn around(
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        before: TimeDelta,
        after: TimeDelta,
    ) -> Window {
        Window {
            from: start - before,
            to: end.max(start) + after,
        }
    }
}

fn human(d: TimeDelta) -> String {
    if d.num_days() >= 1 && d == TimeDelta::days(d.num_days()) {
        format!("{} days", d.num_days())
    } else if d.num_hours() >= 1 && d == TimeDelta::hours(d.num_hours()) {
        format!("{} hours", d.num_hours())
    } else {
        format!("{} minutes", d.num_minutes())
    }
}

/// A latitude/longitude box: what the database narrows by before [`Area::contains`] decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min_lat: f64,
    pub max_lat: f64,
    pub min_lon: f64,
    pub max_lon: f64,
}

/// The area of a search: a polygon drawn on the map, or a radius around a point.
#[derive(Debug, Clone, PartialEq)]
pub enum Area {
    Polygon {
        vertices: Vec<GeoPoint>,
        shape: Polygon<f64>,
    },
    Circle {
        center: GeoPoint,
        radius_m: f64,
    },
}

/// The most vertices a searched polygon may have.
pub const MAX_VERTICES: usize = 1_000;

/// Metres per degree of latitude (mean Earth radius), for bounding boxes.
const METRES_PER_DEGREE: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;

impl Area {
    /// A polygon through `vertices` in order (closing it is optional): at least three distinct
    /// points, at most [`MAX_VERTICES`], enclosing an area, and not across the antimeridian.
    pub fn polygon(field: &str, vertices: &[GeoPoint]) -> Result<Area, FieldError> {
        let mut ring: Vec<GeoPoint> = vertices.to_vec();
        if ring.len() > 1 && ring.first() == ring.last() {
            ring.pop();
        }
        if ring.len() < 3 {
            return Err(FieldError::new(
                field,
                format!("needs at least 3 vertices, got {}", ring.len()),
            ));
        }
        if ring.len() > MAX_VERTICES {
            return Err(FieldError::new(
                field,
                format!("may have at most {MAX_VERTICES} vertices"),
            ));
        }
        let (min_lon, max_lon) = ring.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.lon()), hi.max(p.lon()))
        });
        if max_lon - min_lon > 180.0 {
            return Err(FieldError::new(
                field,
                "must not span more than 180 degrees of longitude (split one across the antimeridian in two searches)",
            ));
        }
        let mut coords: Vec<Coord<f64>> = ring
            .iter()
            .map(|p| Coord {
                x: p.lon(),
                y: p.lat(),
            })
            .collect();
        coords.push(coords[0]);
        let shape = Polygon::new(LineString(coords), Vec::new());
        if shape.unsigned_area() <= 0.0 {
            return Err(FieldError::new(
                field,
                "encloses no area (its vertices are on one line)",
            ));
        }
        Ok(Area::Polygon {
            vertices: ring,
            shape,
        })
    }

    /// Everything within `radius_m` metres (great-circle) of `center`; the radius above 0 and at
    /// most `max_m`.
    pub fn circle(
        field: &str,
        center: GeoPoint,
        radius_m: f64,
        max_m: f64,
    ) -> Result<Area, FieldError> {
        if !(radius_m.is_finite() && radius_m > 0.0) {
            return Err(FieldError::new(
                format!("{field}.radius_m"),
                format!("must be above 0, got {radius_m}"),
            ));
        }
        if radius_m > max_m {
            return Err(FieldError::new(
                format!("{field}.radius_m"),
                format!("must be at most {max_m} m, got {radius_m}"),
            ));
        }
        Ok(Area::Circle { center, radius_m })
    }

    /// A box that holds the whole area.
    pub fn bounds(&self) -> Bounds {
        match self {
            Area::Polygon { vertices, .. } => vertices.iter().fold(
                Bounds {
                    min_lat: f64::MAX,
                    max_lat: f64::MIN,
                    min_lon: f64::MAX,
                    max_lon: f64::MIN,
                },
                |b, p| Bounds {
                    min_lat: b.min_lat.min(p.lat()),
                    max_lat: b.max_lat.max(p.lat()),
                    min_lon: b.min_lon.min(p.lon()),
                    max_lon: b.max_lon.max(p.lon()),
                },
            ),
            Area::Circle { center, radius_m } => {
                // A little wider than exact, never narrower.
                let dlat = radius_m / METRES_PER_DEGREE * 1.01;
                let min_lat = (center.lat() - dlat).max(-90.0);
                let max_lat = (center.lat() + dlat).min(90.0);
                let widest = min_lat.abs().max(max_lat.abs());
                let (min_lon, max_lon) = if widest >= 89.0 {
                    (-180.0, 180.0)
                } else {
                    let dlon = dlat / widest.to_radians().cos();
                    (
                        (center.lon() - dlon).max(-180.0),
                        (center.lon() + dlon).min(180.0),
                    )
                };
                Bounds {
                    min_lat,
                    max_lat,
                    min_lon,
                    max_lon,
                }
            }
        }
    }

    /// Whether `p` is in the area; a point on a polygon's edge or at exactly the radius is.
    pub fn contains(&self, p: GeoPoint) -> bool {
        match self {
            Area::Polygon { shape, .. } => shape.intersects(&Point::new(p.lon(), p.lat())),
            Area::Circle { center, radius_m } => distance_m(*center, p) <= *radius_m,
        }
    }

    /// The area as the audit record keeps it (GeoJSON-like: `[lon, lat]` positions).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Area::Polygon { vertices, .. } => serde_json::json!({
                "polygon": vertices.iter().map(|p| [p.lon(), p.lat()]).collect::<Vec<_>>(),
            }),
            Area::Circle { center, radius_m } => serde_json::json!({
                "center": [center.lon(), center.lat()],
                "radius_m": radius_m,
            }),
        }
    }
}

/// Which kinds of event an agency's investigators may search: `police:*`, `fire:smoke.*`. An
/// agency granted nothing searches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchGrants {
    by_agency: BTreeMap<String, Vec<Glob>>,
}

impl SearchGrants {
    /// Parses `agency:type-pattern` pairs separated by commas (`police:*,fire:smoke.*,fire:gas.*`).
    pub fn parse(text: &str) -> Result<SearchGrants, String> {
        let mut grants = SearchGrants::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((agency, pattern)) = pair.split_once(':') else {
                return Err(format!(
                    "{pair:?} is not agency:event-type-pattern (police:*, fire:smoke.*)"
                ));
            };
            let (agency, pattern) = (agency.trim(), pattern.trim());
            if agency.is_empty() || pattern.is_empty() {
                return Err(format!("{pair:?} needs both an agency and a pattern"));
            }
            grants
                .by_agency
                .entry(agency.to_owned())
                .or_default()
                .push(Glob::new(pattern));
        }
        Ok(grants)
    }

    /// What `who` may search: nothing without the investigator or supervisor role; every kind
    /// for a caller scoped to every agency; else the kinds granted to its agencies.
    pub fn kinds_for(&self, who: &Principal) -> Kinds {
        if !who.roles.any(&[Role::Investigator, Role::Supervisor]) {
            return Kinds::Only(Vec::new());
        }
        let Some(agencies) = who.scope.agencies() else {
            return Kinds::All;
        };
        let mut patterns: Vec<Glob> = Vec::new();
        for agency in &agencies {
            for g in self.by_agency.get(agency).into_iter().flatten() {
                if g.as_str() == "*" {
                    return Kinds::All;
                }
                if !patterns.contains(g) {
                    patterns.push(g.clone());
                }
            }
        }
        Kinds::Only(patterns)
    }
}

/// The kinds of event a caller may see in a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kinds {
    All,
    /// Events whose type matches one of these (none: nothing).
    Only(Vec<Glob>),
}

impl Kinds {
    pub fn is_nothing(&self) -> bool {
        matches!(self, Kinds::Only(p) if p.is_empty())
    }

    pub fn allows(&self, event_type: &str) -> bool {
        match self {
            Kinds::All => true,
            Kinds::Only(patterns) => patterns.iter().any(|g| g.is_match(event_type)),
        }
    }

    /// Whether every type a requested pattern (`lpr.*`, `smoke.detected`) stands for is
    /// allowed: some granted pattern matches the requested one read as text. Sound because a
    /// grant's literal parts hold no `*`, so they only ever match the request's literal parts.
    pub fn covers(&self, requested: &Glob) -> bool {
        self.allows(requested.as_str())
    }

    /// The patterns for SQL's `LIKE`; `None` for every kind.
    pub fn to_like(&self) -> Option<Vec<String>> {
        match self {
            Kinds::All => None,
            Kinds::Only(patterns) => Some(patterns.iter().map(Glob::to_like).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Roles, Scope};

    fn p(lat: f64, lon: f64) -> GeoPoint {
        GeoPoint::new(lat, lon).expect("point")
    }

    #[test]
    fn a_polygon_holds_its_inside_and_its_edges_and_nothing_beyond() {
        // A square block, given without the closing vertex.
        let area = Area::polygon(
            "polygon",
            &[
                p(51.10, 71.40),
                p(51.10, 71.42),
                p(51.12, 71.42),
                p(51.12, 71.40),
            ],
        )
        .expect("polygon");
        assert!(area.contains(p(51.11, 71.41)), "inside");
        assert!(area.contains(p(51.10, 71.41)), "on an edge");
        assert!(area.contains(p(51.12, 71.42)), "on a corner");
        assert!(!area.contains(p(51.0999, 71.41)), "just south");
        assert!(!area.contains(p(51.11, 71.4201)), "just east");
        let b = area.bounds();
        assert_eq!(
            (b.min_lat, b.max_lat, b.min_lon, b.max_lon),
            (51.10, 51.12, 71.40, 71.42)
        );

        // A concave L: the notch is outside though inside the box.
        let l = Area::polygon(
            "polygon",
            &[
                p(0.0, 0.0),
                p(0.0, 2.0),
                p(1.0, 2.0),
                p(1.0, 1.0),
                p(2.0, 1.0),
                p(2.0, 0.0),
                p(0.0, 0.0),
            ],
        )
        .expect("polygon");
        assert!(l.contains(p(0.5, 1.5)));
        assert!(!l.contains(p(1.5, 1.5)), "the notch");
    }

    #[test]
    fn polygons_that_are_not_areas_are_refused_by_field() {
        let line = Area::polygon("area.polygon", &[p(0.0, 0.0), p(1.0, 1.0), p(2.0, 2.0)]);
        assert!(line.unwrap_err().message.contains("no area"));
        let two = Area::polygon("area.polygon", &[p(0.0, 0.0), p(1.0, 1.0), p(0.0, 0.0)]);
        assert_eq!(two.unwrap_err().field, "area.polygon");
        let wide = Area::polygon(
            "area.polygon",
            &[p(0.0, -170.0), p(1.0, 170.0), p(2.0, 0.0)],
        );
        assert!(wide.unwrap_err().message.contains("antimeridian"));
    }

    #[test]
    fn a_circle_is_great_circle_distance_and_its_box_holds_it() {
        let centre = p(51.1280, 71.4300);
        let area = Area::circle("circle", centre, 500.0, 50_000.0).expect("circle");
        // 0.0045° of latitude is ~500.4 m; 0.0044° ~489 m.
        assert!(area.contains(p(51.1324, 71.4300)));
        assert!(!area.contains(p(51.1326, 71.4300)));
        let b = area.bounds();
        for bearing in 0..360 {
            let r = f64::from(bearing).to_radians();
            // Points at 499 m all around are inside the box.
            let dlat = 499.0 * r.cos() / METRES_PER_DEGREE;
            let dlon = 499.0 * r.sin() / (METRES_PER_DEGREE * centre.lat().to_radians().cos());
            let q = p(centre.lat() + dlat, centre.lon() + dlon);
            assert!(area.contains(q), "{bearing}°");
            assert!(
                (b.min_lat..=b.max_lat).contains(&q.lat())
                    && (b.min_lon..=b.max_lon).contains(&q.lon()),
                "{bearing}° outside the box"
            );
        }
        assert!(Area::circle("circle", centre, 0.0, 50_000.0).is_err());
        let far = Area::circle("circle", centre, 60_000.0, 50_000.0).unwrap_err();
        assert_eq!(far.field, "circle.radius_m");
    }

    #[test]
    fn windows_are_required_ordered_and_bounded() {
        let t = DateTime::parse_from_rfc3339("2026-11-20T02:10:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let day = TimeDelta::days(1);
        assert!(Window::parse("time_range", Some(t), Some(t + day), day).is_ok());
        let long = Window::parse("time_range", Some(t), Some(t + day * 2), day).unwrap_err();
        assert_eq!(long.message, "must span at most 1 days");
        assert!(Window::parse("time_range", None, Some(t), day).is_err());
        let backwards = Window::parse("time_range", Some(t), Some(t), day).unwrap_err();
        assert_eq!(backwards.field, "time_range.end_time");
        let around = Window::around(t, t + TimeDelta::minutes(5), day, day);
        assert_eq!(around.to - around.from, day * 2 + TimeDelta::minutes(5));
    }

    #[test]
    fn a_case_reference_is_required() {
        assert!(CaseRef::parse("case_reference", "  ").is_err());
        assert_eq!(
            CaseRef::parse("case_reference", " 2026-0412-KR ")
                .expect("case")
                .as_str(),
            "2026-0412-KR"
        );
        assert!(CaseRef::parse("case_reference", &"x".repeat(129)).is_err());
    }

    fn caller(roles: &[Role], agencies: &[&str]) -> Principal {
        Principal {
            subject: "key:someone".into(),
            roles: Roles::from_iter(roles.iter().copied()),
            scope: Scope::resolve(&[], agencies, &BTreeMap::new()),
            sources: Vec::new(),
            may_update_status: false,
        }
    }

    #[test]
    fn investigators_search_the_kinds_granted_to_their_agencies() {
        let grants = SearchGrants::parse("police:lpr.*, police:object.*,fire:smoke.*,ems:*")
            .expect("grants");
        let police = grants.kinds_for(&caller(&[Role::Investigator], &["police"]));
        assert!(police.allows("lpr.plate") && police.allows("object.car"));
        assert!(!police.allows("smoke.detected"));
        assert!(police.covers(&Glob::new("lpr.*")));
        assert!(police.covers(&Glob::new("lpr.plate")));
        assert!(!police.covers(&Glob::new("*")), "a wildcard past the grant");
        assert!(!police.covers(&Glob::new("l*")));
        assert_eq!(
            police.to_like(),
            Some(vec!["lpr.%".to_owned(), "object.%".to_owned()])
        );

        assert_eq!(
            grants.kinds_for(&caller(&[Role::Supervisor], &["ems"])),
            Kinds::All
        );
        assert!(
            grants
                .kinds_for(&caller(&[Role::Dispatcher], &["police"]))
                .is_nothing(),
            "a dispatcher does not search"
        );
        assert!(
            grants
                .kinds_for(&caller(&[Role::Investigator], &["water"]))
                .is_nothing()
        );
        let mut everywhere = caller(&[Role::Investigator], &[]);
        everywhere.scope = Scope::everything();
        assert_eq!(grants.kinds_for(&everywhere), Kinds::All);
        assert!(SearchGrants::parse("police").is_err());
        assert_eq!(
            SearchGrants::parse("").expect("none"),
            SearchGrants::default()
        );
    }
}
