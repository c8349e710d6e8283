//! Zones: named areas of the city drawn as polygons (GeoJSON), each in a district. An event
//! that has a position but no zone is placed in the zone that contains it.

use std::collections::HashMap;

use geo::{Area, BoundingRect, Coord, Intersects, LineString, MultiPolygon, Point, Polygon, Rect};
use serde_json::Value;

use crate::event::{District, GeoPoint, Zone};
use crate::validation::{Collector, FieldError, FieldErrors};

/// A zone as written (a GeoJSON feature, or a gRPC request), before it is checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneInput {
    pub name: String,
    pub district: Option<String>,
    pub description: String,
    /// A GeoJSON `Polygon` or `MultiPolygon` geometry, WGS 84 longitude/latitude.
    pub geometry: Value,
}

/// A checked zone: its name, district and area.
#[derive(Debug, Clone)]
pub struct ZoneArea {
    pub name: Zone,
    pub district: Option<District>,
    pub description: String,
    /// The geometry as given (normalised to a GeoJSON object).
    pub geometry: Value,
    shape: MultiPolygon<f64>,
    bounds: Rect<f64>,
    area: f64,
}

impl PartialEq for ZoneArea {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.district == other.district
            && self.description == other.description
            && self.geometry == other.geometry
    }
}

/// The most rings and positions a zone may have: a district boundary drawn in detail fits,
/// a mistake (a whole country's coastline) does not.
const MAX_POSITIONS: usize = 100_000;

impl ZoneArea {
    /// Checks a zone; errors name the field (`geometry.coordinates[0][3]`).
    pub fn parse(input: ZoneInput) -> Result<Self, FieldErrors> {
        let mut c = Collector::default();
        let name = c.take(Zone::parse(&input.name, 128).map_err(|e| rename(e, "name")));
        let district = input
            .district
            .filter(|d| !d.is_empty())
            .and_then(|d| c.take(District::parse("district", &d)));
        if input.description.len() > 2000 {
            c.push("description", "must be at most 2000 bytes");
        }
        let shape = c.take(geometry(&input.geometry));
        c.finish(|| ())?;
        let shape = shape.expect("checked");
        let bounds = shape
            .bounding_rect()
            .expect("a checked geometry has positions");
        Ok(Self {
            name: name.expect("checked"),
            district,
            description: input.description,
            area: shape.unsigned_area(),
            geometry: input.geometry,
            shape,
            bounds,
        })
    }

    /// Whether the point is inside the zone or on its edge.
    /// The outer ring of each polygon, as closed `(lat, lon)` lists (holes left out).
    pub fn outer_rings(&self) -> Vec<Vec<(f64, f64)>> {
        self.shape
            .0
            .iter()
            .map(|p| p.exterior().coords().map(|c| (c.y, c.x)).collect())
            .collect()
    }

    pub fn covers(&self, p: GeoPoint) -> bool {
        let point = Point::new(p.lon(), p.lat());
        self.bounds.intersects(&point) && self.shape.intersects(&point)
    }
}

fn rename(e: FieldError, field: &str) -> FieldError {
    FieldError::new(field, e.message)
}

/// Parses a GeoJSON `Polygon` or `MultiPolygon` geometry (or a `Feature` holding one).
fn geometry(value: &Value) -> Result<MultiPolygon<f64>, FieldError> {
    const FIELD: &str = "geometry";
    let obj = value
        .as_object()
        .ok_or_else(|| FieldError::new(FIELD, "must be a GeoJSON Polygon or MultiPolygon"))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if kind == "Feature" {
        return geometry(obj.get("geometry").unwrap_or(&Value::Null));
    }
    let coords = obj
        .get("coordinates")
        .ok_or_else(|| FieldError::new(format!("{FIELD}.coordinates"), "is required"))?;
    let mut positions = 0;
    let polygons = match kind {
        "Polygon" => vec![polygon(
            &format!("{FIELD}.coordinates"),
            coords,
            &mut positions,
        )?],
        "MultiPolygon" => array(&format!("{FIELD}.coordinates"), coords)?
            .iter()
            .enumerate()
            .map(|(i, p)| polygon(&format!("{FIELD}.coordinates[{i}]"), p, &mut positions))
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(FieldError::new(
                format!("{FIELD}.type"),
                format!("must be Polygon or MultiPolygon, got {other:?}"),
            ));
        }
    };
    if polygons.is_empty() {
        return Err(FieldError::new(
            format!("{FIELD}.coordinates"),
            "needs at least one polygon",
        ));
    }
    Ok(MultiPolygon(polygons))
}

fn array<'a>(field: &str, v: &'a Value) -> Result<&'a Vec<Value>, FieldError> {
    v.as_array()
        .ok_or_else(|| FieldError::new(field, "expected an array"))
}

fn polygon(field: &str, v: &Value, positions: &mut usize) -> Result<Polygon<f64>, FieldError> {
    let rings = array(field, v)?;
    if rings.is_empty() {
        return Err(FieldError::new(field, "needs an outer ring"));
    }
    let mut parsed = Vec::with_capacity(rings.len());
    for (i, ring) in rings.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let points = array(&field, ring)?;
        *positions += points.len();
        if *positions > MAX_POSITIONS {
            return Err(FieldError::new(
                field,
                format!("a zone may have at most {MAX_POSITIONS} positions"),
            ));
        }
        if points.len() < 4 {
            return Err(FieldError::new(
                field,
                format!(
                    "a ring needs at least 4 positions (closed), got {}",
                    points.len()
                ),
            ));
        }
        let coords = points
            .iter()
            .enumerate()
            .map(|(j, p)| position(&format!("{field}[{j}]"), p))
            .collect::<Result<Vec<Coord<f64>>, _>>()?;
        if coords.first() != coords.last() {
            return Err(FieldError::new(
                field,
                "a ring must end where it starts (GeoJSON rings are closed)",
            ));
        }
        parsed.push(LineString(coords));
    }
    let exterior = parsed.remove(0);
    Ok(Polygon::new(exterior, parsed))
}

fn position(field: &str, v: &Value) -> Result<Coord<f64>, FieldError> {
    let p = array(field, v)?;
    let number = |i: usize| p.get(i).and_then(Value::as_f64);
    match (number(0), number(1)) {
        (Some(lon), Some(lat)) if p.len() <= 3 => {
            GeoPoint::new(lat, lon).map_err(|e| FieldError::new(field, e.message))?;
            Ok(Coord { x: lon, y: lat })
        }
        _ => Err(FieldError::new(
            field,
            "a position is [longitude, latitude] (optionally with an altitude)",
        )),
    }
}

/// Reads a GeoJSON `FeatureCollection` (or a single `Feature`) of zones: each feature's
/// `properties.name` names the zone, `properties.district` and `properties.description` are
/// optional. Errors name the feature (`features[3].properties.name`).
pub fn zones_from_geojson(doc: &Value) -> Result<Vec<ZoneInput>, FieldErrors> {
    let features: Vec<(String, &Value)> =
        match doc.get("type").and_then(Value::as_str).unwrap_or("") {
            "FeatureCollection" => match doc.get("features").and_then(Value::as_array) {
                Some(f) => f
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (format!("features[{i}]"), f))
                    .collect(),
                None => return Err(FieldErrors::one("features", "expected an array")),
            },
            "Feature" => vec![("feature".to_owned(), doc)],
            other => {
                return Err(FieldErrors::one(
                    "type",
                    format!("must be FeatureCollection or Feature, got {other:?}"),
                ));
            }
        };
    let mut c = Collector::default();
    let mut out = Vec::with_capacity(features.len());
    for (path, f) in features {
        let props = f.get("properties").cloned().unwrap_or(Value::Null);
        let text = |key: &str| props.get(key).and_then(Value::as_str).map(str::to_owned);
        let Some(name) = text("name") else {
            c.push(
                format!("{path}.properties.name"),
                "is required (the zone's name)",
            );
            continue;
        };
        out.push(ZoneInput {
            name,
            district: text("district"),
            description: text("description").unwrap_or_default(),
            geometry: f.get("geometry").cloned().unwrap_or(Value::Null),
        });
    }
    c.finish(|| out)
}

/// The city's zones, for placing events.
#[derive(Debug, Clone, Default)]
pub struct ZoneMap {
    zones: Vec<ZoneArea>,
    by_name: HashMap<Zone, usize>,
}

impl ZoneMap {
    pub fn new(mut zones: Vec<ZoneArea>) -> Self {
        // Smallest first: where zones overlap (a substation inside a district's park), the most
        // specific one is where the event happened.
        zones.sort_by(|a, b| a.area.total_cmp(&b.area).then_with(|| a.name.cmp(&b.name)));
        let by_name = zones
            .iter()
            .enumerate()
            .map(|(i, z)| (z.name.clone(), i))
            .collect();
        Self { zones, by_name }
    }

    pub fn len(&self) -> usize {
        self.zones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// The smallest zone that contains the point (edges included).
    pub fn locate(&self, p: GeoPoint) -> Option<&ZoneArea> {
        self.zones.iter().find(|z| z.covers(p))
    }

    pub fn get(&self, name: &Zone) -> Option<&ZoneArea> {
        self.by_name.get(name).map(|&i| &self.zones[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn square(name: &str, district: &str, lon: f64, lat: f64, size: f64) -> ZoneArea {
        ZoneArea::parse(ZoneInput {
            name: name.into(),
            district: Some(district.into()),
            description: String::new(),
            geometry: json!({"type": "Polygon", "coordinates": [[
                [lon, lat], [lon + size, lat], [lon + size, lat + size], [lon, lat + size], [lon, lat]
            ]]}),
        })
        .expect("valid zone")
    }

    fn point(lat: f64, lon: f64) -> GeoPoint {
        GeoPoint::new(lat, lon).expect("valid point")
    }

    #[test]
    fn the_smallest_zone_containing_a_point_is_chosen() {
        let map = ZoneMap::new(vec![
            square("esil_district_park", "esil", 71.40, 51.10, 0.10),
            square("restricted_substation", "esil", 71.42, 51.12, 0.01),
        ]);
        let inside_both = map.locate(point(51.125, 71.425)).expect("a zone");
        assert_eq!(inside_both.name.as_str(), "restricted_substation");
        let park_only = map.locate(point(51.15, 71.45)).expect("a zone");
        assert_eq!(park_only.name.as_str(), "esil_district_park");
        assert!(map.locate(point(51.30, 71.45)).is_none());
    }

    #[test]
    fn points_on_an_edge_or_corner_are_inside() {
        let map = ZoneMap::new(vec![square("z", "d", 71.0, 51.0, 1.0)]);
        assert!(map.locate(point(51.0, 71.5)).is_some(), "edge");
        assert!(map.locate(point(51.0, 71.0)).is_some(), "corner");
        assert!(
            map.locate(point(50.999_999, 71.5)).is_none(),
            "just outside"
        );
    }

    #[test]
    fn holes_are_outside() {
        let zone = ZoneArea::parse(ZoneInput {
            name: "ring_road".into(),
            geometry: json!({"type": "Polygon", "coordinates": [
                [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [0.0, 0.0]],
                [[4.0, 4.0], [6.0, 4.0], [6.0, 6.0], [4.0, 6.0], [4.0, 4.0]]
            ]}),
            ..ZoneInput::default()
        })
        .expect("valid zone");
        assert!(zone.covers(point(2.0, 2.0)));
        assert!(!zone.covers(point(5.0, 5.0)));
    }

    #[test]
    fn bad_geometry_is_reported_by_field() {
        let err = |geometry: Value| {
            ZoneArea::parse(ZoneInput {
                name: "z".into(),
                geometry,
                ..ZoneInput::default()
            })
            .expect_err("invalid")
            .to_string()
        };
        assert_eq!(
            err(json!({"type": "Point", "coordinates": [1, 2]})),
            "geometry.type: must be Polygon or MultiPolygon, got \"Point\""
        );
        assert_eq!(
            err(json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]})),
            "geometry.coordinates[0]: a ring must end where it starts (GeoJSON rings are closed)"
        );
        assert_eq!(
            err(json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 95], [0, 0]]]})),
            "geometry.coordinates[0][2]: must be between -90 and 90, got 95"
        );
        assert_eq!(
            err(json!({"type": "MultiPolygon", "coordinates": [[[[0, 0], "x"]]]})),
            "geometry.coordinates[0][0]: a ring needs at least 4 positions (closed), got 2"
        );
    }

    #[test]
    fn a_feature_collection_gives_named_zones() {
        let doc = json!({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": "a", "district": "esil"},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}},
            {"type": "Feature", "properties": {},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}
        ]});
        let err = zones_from_geojson(&doc).expect_err("second has no name");
        assert_eq!(
            err.to_string(),
            "features[1].properties.name: is required (the zone's name)"
        );
    }

    proptest! {
        /// A convex polygon contains exactly the points a direct computation says it does.
        #[test]
        fn squares_contain_what_they_should(
            lon in -179.0..178.0f64, lat in -89.0..88.0f64, size in 0.001..1.0f64,
            dx in -0.5..1.5f64, dy in -0.5..1.5f64,
        ) {
            let zone = square("z", "d", lon, lat, size);
            let (plon, plat) = (lon + dx * size, lat + dy * size);
            let inside = (lon..=lon + size).contains(&plon) && (lat..=lat + size).contains(&plat);
            prop_assert_eq!(zone.covers(point(plat, plon)), inside);
        }
    }
}
