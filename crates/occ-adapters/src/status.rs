//! Status reports (a camera gone offline, a gateway's last will) as `source.online` /
//! `source.offline` events, the same for every producer (see
//! [`occ_domain::source::status_event`]).

use occ_domain::{Event, IdempotencyKey, Limits, SourceId, SourceStatus};

use crate::adapter::{Message, Rejection};

/// A status event for `source`, reported by message `m`: `why` says what reported it.
///
/// Keyed by the message's bytes, to be scoped to its delivery: the broker's redelivery of a
/// report changes nothing, while a report sent again (a retained status on every subscription)
/// is a new report, which changes nothing either when the source already has that status.
pub fn status_event(
    source: SourceId,
    status: SourceStatus,
    why: &str,
    m: &Message<'_>,
    limits: &Limits,
) -> Result<Event, Rejection> {
    let mut event = occ_domain::source::status_event(
        source,
        status,
        why,
        m.received_at,
        m.received_at,
        limits,
    )?;
    event.external_id = None;
    event.idempotency_key = IdempotencyKey::content_named(format!(
        "status:{}",
        IdempotencyKey::content(m.payload).as_str()
    ));
    Ok(event)
}
