//! Source health: what ingest saw of each source (kept in memory, written once a second in
//! one statement rather than once per event), the return of a source that was offline, and
//! the silence check that turns a source quiet past its expected interval into a
//! `source.offline` event.
//!
//! Both announcements go through the same path as any event (rules, incidents, audit), in the
//! transaction that changes the source's status, so each change is announced once however
//! many instances run. Activity not yet written when an instance dies is lost (at most one
//! flush interval of "last seen"); the source's next event brings it back. A source is only
//! taken for silent two flush intervals after its expected interval ran out, so activity
//! another instance has not written yet does not make it go offline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use occ_domain::source::{BATTERY_MEASUREMENT, DEVICE_ERROR, reported_status, status_event};
use occ_domain::{Event, Limits, SourceId, SourceStatus};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::events::Transport;
use crate::ingest::{self, Batch, BatchOutcome};
use crate::registry::LiveRegistry;
use crate::rules::LiveRules;
use crate::sources::{self, Activity};

/// What ingest saw of sources since the last flush. Cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct ActivityLog {
    pending: Arc<Mutex<BTreeMap<String, Activity>>>,
}

impl ActivityLog {
    /// Records the events of a committed batch: when each source was heard from (a repeat or
    /// a redelivery is hearing from it too), its battery, its errors; with `counted_qos0`, the
    /// events to count as arrived at MQTT QoS 0. Status reports are not activity (an NVR
    /// reporting a camera offline has not heard from the camera).
    pub fn record<'a>(&self, events: impl IntoIterator<Item = (&'a Event, bool)>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (e, qos0) in events {
            if reported_status(e.event_type.as_str()).is_some() {
                continue;
            }
            let seen = Activity {
                last_seen: Some(e.received_at),
                battery_pct: e
                    .measurements
                    .get(BATTERY_MEASUREMENT)
                    .map(|b| (e.received_at, *b)),
                last_error: (e.event_type.as_str() == DEVICE_ERROR).then(|| {
                    let text = e
                        .attributes
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or("error reported")
                        .chars()
                        .take(500)
                        .collect();
                    (e.received_at, text)
                }),
                qos0_events: i64::from(qos0),
            };
            match pending.get_mut(e.source_id.as_str()) {
                Some(a) => a.merge(seen),
                None => {
                    pending.insert(e.source_id.to_string(), seen);
                }
            }
        }
    }

    fn take(&self) -> BTreeMap<String, Activity> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts back what a failed flush took, merged with what arrived meanwhile.
    fn restore(&self, taken: BTreeMap<String, Activity>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, mut a) in taken {
            if let Some(newer) = pending.remove(&id) {
                a.merge(newer);
            }
            pending.insert(id, a);
        }
    }
}

/// What the health work needs.
#[derive(Debug, Clone)]
pub struct Health {
    pub pool: PgPool,
    pub log: ActivityLog,
    pub rules: LiveRules,
    pub registry: LiveRegistry,
    pub limits: Limits,
}

/// Who the audit log names for what the health checks do.
pub const ACTOR: &str = "system:health";

impl Health {
    /// Writes the activity log. Returns how many sources it touched.
    pub async fn flush(&self) -> Result<usize> {
        let taken = self.log.take();
        if taken.is_empty() {
            return Ok(0);
        }
        match self.write(&taken).await {
            Ok(()) => Ok(taken.len()),
            Err(e) => {
                self.log.restore(taken);
                Err(e)
            }
        }
    }

    /// Writes activity in one short transaction, then announces the returns of sources that
    /// were offline, each change locking only its own sources: the flush never holds every
    /// active source while rules are evaluated.
    async fn write(&self, activity: &BTreeMap<String, Activity>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let returned = sources::record_activity(&mut tx, activity).await?;
        tx.commit().await?;
        if returned.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let now = crate::dispatch::now(&mut tx).await?;
        let events: Vec<Event> = returned
            .into_iter()
            .filter_map(|(id, seen)| {
                self.announce(id, SourceStatus::Online, "heard from again", seen, now)
            })
            .collect();
        self.apply(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Turns up to `limit` sources silent past their expected interval (and `grace` more, for
    /// activity other instances have not written yet) into `source.offline` events. Returns
    /// how many sources it looked at.
    pub async fn sweep_silent(&self, grace: Duration, limit: i64) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let now = crate::dispatch::now(&mut tx).await?;
        let grace = chrono::TimeDelta::from_std(grace).unwrap_or_default();
        let silent = sources::lock_silent(&mut tx, now - grace, limit).await?;
        if silent.is_empty() {
            return Ok(0);
        }
        let looked = silent.len();
        let events: Vec<Event> = silent
            .into_iter()
            .filter_map(|(id, seen)| {
                let why = format!(
                    "silent since {} (past its expected interval)",
                    seen.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                self.announce(id, SourceStatus::Offline, &why, seen, now)
            })
            .collect();
        self.apply(&mut tx, events).await?;
        tx.commit().await?;
        Ok(looked)
    }

    fn announce(
        &self,
        id: SourceId,
        status: SourceStatus,
        why: &str,
        occurred_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<Event> {
        match status_event(id.clone(), status, why, occurred_at, now, &self.limits) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!(source = %id, error = %e, "cannot make a status event");
                None
            }
        }
    }

    async fn apply(
        &self,
        conn: &mut sqlx::PgConnection,
        events: Vec<Event>,
    ) -> Result<Option<BatchOutcome>> {
        if events.is_empty() {
            return Ok(None);
        }
        let registry = self.registry.current();
        let enriched: Vec<_> = events.into_iter().map(|e| registry.enrich(e)).collect();
        let outcome = ingest::apply(
            conn,
            Batch::new(&enriched, Transport::System, &[]),
            &self.rules.current(),
        )
        .await?;
        for (e, o) in enriched.iter().zip(&outcome.events) {
            if matches!(o, ingest::EventOutcome::Accepted { .. }) {
                tracing::info!(source = %e.event.source_id, event_type = %e.event.event_type, "source status changed");
            }
        }
        Ok(Some(outcome))
    }

    /// Flushes activity and checks for silent sources every `interval` until `shutdown`,
    /// then flushes once more.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "cannot record source activity; retrying");
            }
            loop {
                // Two flushes of margin: another instance may have heard from the source and
                // not written it yet.
                match self.sweep_silent(interval * 2, 100).await {
                    Ok(100) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "silence check failed");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "cannot record the last source activity");
        }
    }
}
