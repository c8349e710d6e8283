//! Page sizes and opaque page tokens.
//!
//! A token is the position after the last item of a page, base64url-encoded so clients treat
//! it as opaque. Positions are keysets, not offsets: a page never repeats or skips an item
//! because of inserts before it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use occ_domain::{IncidentId, Priority};
use occ_store::incidents::IncidentCursor;
use occ_store::timeline::TimelineCursor;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};

/// The page size a request asks for: `default` when 0, at most `max`.
pub fn page_size(requested: i32, default: i64, max: i64) -> ApiResult<i64> {
    match requested {
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(default),
        n => Ok(i64::from(n).min(max)),
    }
}

fn encode(parts: &[String]) -> String {
    URL_SAFE_NO_PAD.encode(parts.join("|"))
}

fn decode(token: &str, n: usize) -> ApiResult<Vec<String>> {
    let invalid = || ApiError::invalid("page_token", "is not a token this list returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let parts: Vec<String> = text.split('|').map(str::to_owned).collect();
    if parts.len() == n {
        Ok(parts)
    } else {
        Err(invalid())
    }
}

pub(crate) fn invalid_token() -> ApiError {
    ApiError::invalid("page_token", "is not a token this list returned")
}

/// A token returned for other filters than the request's (AIP-158).
pub(crate) fn other_filters() -> ApiError {
    ApiError::invalid(
        "page_token",
        "was returned for other filters; repeat the request's filters with its token",
    )
}

/// A token for the page after `c`, valid only with the same filters (`filters` is any
/// stable rendering of them).
pub fn incident_token(c: &IncidentCursor, filters: &str) -> String {
    encode(&[
        "i1".into(),
        c.priority.level().to_string(),
        c.created_at.timestamp_micros().to_string(),
        c.id.to_string(),
        fingerprint(filters),
    ])
}

/// A short digest of a request's filters: a token is refused with other filters (AIP-158).
pub(crate) fn fingerprint(filters: &str) -> String {
    // FNV-1a: stable across builds and platforms, and enough to tell filter sets apart.
    let hash = filters.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

pub fn parse_incident_token(token: &str, filters: &str) -> ApiResult<Option<IncidentCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let p = decode(token, 5)?;
    if p[0] != "i1" {
        return Err(invalid_token());
    }
    if p[4] != fingerprint(filters) {
        return Err(other_filters());
    }
    let priority = p[1]
        .parse()
        .ok()
        .and_then(Priority::from_level)
        .ok_or_else(invalid_token)?;
    let created_at = p[2]
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid_token)?;
    let id = Uuid::parse_str(&p[3]).map_err(|_| invalid_token())?;
    Ok(Some(IncidentCursor {
        priority,
        created_at,
        id: IncidentId(id),
    }))
}

pub fn timeline_token(c: &TimelineCursor) -> String {
    encode(&[
        "t1".into(),
        c.at.timestamp_micros().to_string(),
        c.rank.to_string(),
        c.audit_id.to_string(),
        c.event_id.to_string(),
    ])
}

pub fn parse_timeline_token(token: &str) -> ApiResult<Option<TimelineCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let p = decode(token, 5)?;
    if p[0] != "t1" {
        return Err(invalid_token());
    }
    Ok(Some(TimelineCursor {
        at: p[1]
            .parse()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid_token)?,
        rank: p[2].parse().map_err(|_| invalid_token())?,
        audit_id: p[3].parse().map_err(|_| invalid_token())?,
        event_id: Uuid::parse_str(&p[4]).map_err(|_| invalid_token())?,
    }))
}

/// A token for a keyset position of `n` parts, tagged with the list it belongs to.
pub fn key_token(tag: &str, parts: &[&str]) -> String {
    let mut all = vec![tag.to_owned()];
    all.extend(parts.iter().map(|p| (*p).to_owned()));
    encode(&all)
}

/// The parts of a [`key_token`] of `tag` with `n` parts.
pub fn parse_key_token(tag: &str, token: &str, n: usize) -> ApiResult<Option<Vec<String>>> {
    if token.is_empty() {
        return Ok(None);
    }
    let mut p = decode(token, n + 1)?;
    if p[0] != tag {
        return Err(invalid_token());
    }
    p.remove(0);
    Ok(Some(p))
}

/// Cuts `items` (fetched with `limit + 1`) to `limit`, and returns the token of the next
/// page (`token` of its last item), or an empty token when there is none.
pub fn next_page<T>(items: &mut Vec<T>, limit: i64, token: impl Fn(&T) -> String) -> String {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items.last().map(token).unwrap_or_default()
}

/// Checks the number of items a batch call carries.
pub fn batch_size(field: &str, len: usize, max: usize) -> ApiResult<()> {
    match len {
        0 => Err(ApiError::invalid(field, "must not be empty")),
        n if n > max => Err(ApiError::invalid(field, format!("at most {max} per call"))),
        _ => Ok(()),
    }
}

pub fn name_token(name: &str) -> String {
    encode(&["r1".into(), name.to_owned()])
}

pub fn parse_name_token(token: &str) -> ApiResult<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let p = decode(token, 2)?;
    if p[0] != "r1" {
        return Err(invalid_token());
    }
    Ok(Some(p[1].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn tokens_round_trip() {
        let c = IncidentCursor {
            priority: Priority::P2,
            created_at: DateTime::from_timestamp_micros(Utc::now().timestamp_micros())
                .expect("valid time"),
            id: IncidentId::new(),
        };
        assert_eq!(
            parse_incident_token(&incident_token(&c, "fire"), "fire").expect("valid"),
            Some(c)
        );
        assert!(parse_incident_token(&incident_token(&c, "fire"), "police").is_err());
        let t = TimelineCursor {
            at: c.created_at,
            rank: 1,
            audit_id: 42,
            event_id: Uuid::nil(),
        };
        assert_eq!(
            parse_timeline_token(&timeline_token(&t)).expect("valid"),
            Some(t)
        );
        assert_eq!(
            parse_name_token(&name_token("fire-smoke"))
                .expect("valid")
                .as_deref(),
            Some("fire-smoke")
        );
    }

    #[test]
    fn key_tokens_round_trip_and_keep_to_their_list() {
        let t = key_token("w1", &["stolen_vehicles", "777ABC01"]);
        assert_eq!(
            parse_key_token("w1", &t, 2).expect("valid"),
            Some(vec!["stolen_vehicles".to_owned(), "777ABC01".to_owned()])
        );
        assert!(parse_key_token("d1", &t, 2).is_err());
        assert_eq!(parse_key_token("w1", "", 2).expect("empty"), None);
    }

    #[test]
    fn foreign_tokens_are_invalid_arguments() {
        let c = TimelineCursor {
            at: Utc::now(),
            rank: 0,
            audit_id: 0,
            event_id: Uuid::nil(),
        };
        assert!(parse_incident_token(&timeline_token(&c), "").is_err());
        assert!(parse_incident_token("not a token!", "").is_err());
        assert!(page_size(-1, 50, 500).is_err());
        assert_eq!(page_size(0, 50, 500).ok(), Some(50));
        assert_eq!(page_size(10_000, 50, 500).ok(), Some(500));
    }
}
