//! Status reports (a camera gone offline, a gateway's last will) as `source.online` /
//! `source.offline` events, the same for every producer (see
//! [`occ_domain::source::status_event`]).

use chrono::{DateTime, Utc};
use occ_domain::{Event, Limits, SourceId, SourceStatus};

use crate::adapter::Rejection;

/// A status event for `source`, reported now: `why` says what reported it.
pub fn status_event(
    source: SourceId,
    status: SourceStatus,
    why: &str,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Event, Rejection> {
    Ok(occ_domain::source::status_event(
        source,
        status,
        why,
        received_at,
        received_at,
        limits,
    )?)
}
