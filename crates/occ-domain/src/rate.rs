//! How fast each source may send: a token bucket per source, filled at a steady rate up to a
//! burst. Time is passed in (the message's time of receipt), so the decision is the same in a
//! test as in a city.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

/// The most sources tracked at once; past it, sources whose buckets are full again are
/// forgotten (they would start full anyway).
const MAX_SOURCES: usize = 100_000;

#[derive(Debug, Clone)]
pub struct SourceRates {
    per_second: f64,
    burst: f64,
    buckets: HashMap<String, (f64, DateTime<Utc>)>,
}

impl SourceRates {
    /// `per_second` events on average per source (0 or less: no limit), `burst` at once.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst: burst.max(1.0),
            buckets: HashMap::new(),
        }
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Whether `source` may send `events` more at `at`; if so, they are taken from its bucket.
    pub fn admit(&mut self, source: &str, events: usize, at: DateTime<Utc>) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.per_second, self.burst);
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(source) {
            self.buckets.retain(|_, (tokens, last)| {
                let idle = (at - *last).num_milliseconds().max(0) as f64 / 1000.0;
                *tokens + idle * rate < burst
            });
        }
        let (tokens, last) = self.buckets.entry(source.to_owned()).or_insert((burst, at));
        let elapsed = (at - *last).num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1e6;
        *tokens = (*tokens + elapsed * rate).min(burst);
        if at > *last {
            *last = at;
        }
        let wanted = events as f64;
        if *tokens >= wanted {
            *tokens -= wanted;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn a_flooding_source_is_held_to_its_rate_and_others_are_not() {
        let t0: DateTime<Utc> = "2026-11-29T10:00:00Z".parse().expect("time");
        let mut rates = SourceRates::new(5.0, 10.0);
        let admitted = (0..100).filter(|_| rates.admit("cam-1", 1, t0)).count();
        assert_eq!(admitted, 10, "the burst, then nothing");
        assert!(
            rates.admit("panic-7", 1, t0),
            "another source is not held back"
        );
        // A second later, five more.
        let t1 = t0 + TimeDelta::seconds(1);
        let admitted = (0..100).filter(|_| rates.admit("cam-1", 1, t1)).count();
        assert_eq!(admitted, 5);
        assert!(
            SourceRates::new(0.0, 0.0).admit("any", 1_000_000, t0),
            "0 is no limit"
        );
    }
}
