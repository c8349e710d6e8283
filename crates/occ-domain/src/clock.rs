//! The clock OCC reads an instance's time from, injected at start: one per process, handed
//! to the API and to ingest. Domain decisions take the time they decide at as an argument.
//!
//! Two clocks exist by design. Everything instances must agree on (claim leases, claim
//! deadlines, escalations, audit and change times, ingest slot leases) is timed by PostgreSQL's
//! clock, read in the transaction that decides, so that instances with drifting clocks still
//! order changes the way they commit. What one instance observes (when a message or a call
//! arrived, how far an event's time may lie ahead, ingest lag, the times of rule and unit
//! edits) comes from this [`Clock`], handed to the API and to ingest at start.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The clock handed around: one per process.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

impl SystemClock {
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}
