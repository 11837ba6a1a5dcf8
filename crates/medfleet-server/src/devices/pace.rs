//! How fast one device may make its session write: every report and state change is a database transaction
//! (and an audit row, and a dispatch), so a device that floods them — broken, or in an attacker's hands — is
//! slowed to a steady rate instead of taking the database from the rest of the fleet. Nothing is dropped: the
//! session reads its next message only when the pace allows, and HTTP/2 flow control holds the device back.

use std::time::{Duration, Instant};

/// A token bucket: `burst` writes at once, then `per_second`.
#[derive(Debug, Clone)]
pub(super) struct Pace {
    per_second: f64,
    burst: f64,
    /// Below zero: writes already let through ahead of the rate, to be waited off.
    tokens: f64,
    at: Instant,
}

/// What a legitimate device needs with room to spare: download progress at most once a second, a state change a
/// second, a configuration report per push, a few firmware steps.
pub(super) const WRITES_PER_SECOND: u32 = 20;
pub(super) const BURST: u32 = 100;

impl Pace {
    pub(super) fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Takes one write at `now`: how long to wait before it (zero within the rate).
    pub(super) fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_through_then_the_rate_holds() {
        let start = Instant::now();
        let mut pace = Pace::new(10, 5, start);
        for _ in 0..5 {
            assert_eq!(pace.take(start), Duration::ZERO);
        }
        let wait = pace.take(start);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        let wait = pace.take(start);
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-9, "debt adds up: {wait:?}");
    }

    #[test]
    fn quiet_refills_up_to_the_burst_only() {
        let start = Instant::now();
        let mut pace = Pace::new(10, 5, start);
        for _ in 0..5 {
            pace.take(start);
        }
        let later = start + Duration::from_mins(1);
        for _ in 0..5 {
            assert_eq!(pace.take(later), Duration::ZERO);
        }
        assert!(
            pace.take(later) > Duration::ZERO,
            "a minute of quiet is worth one burst, not 600 writes"
        );
    }
}
