//! When to try again, when to give up, and the clock both are read from.
//!
//! Why a clock of our own: retries are hours apart, and tests must check the schedule
//! without sleeping. The delivery clock is the system clock plus an offset that only a
//! server started with `outbound.test_clock = true` lets the admin API move forward.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delivery clock: wall time plus an offset (zero unless a test moved it).
#[derive(Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Now, Unix ms.
    pub fn now_ms(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        wall + self.offset_ms.load(Ordering::Acquire)
    }

    /// Moves the clock forward (tests only; the admin API refuses unless enabled).
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::AcqRel);
    }
}

/// Retry intervals, message expiry and the delay notice, per DOMAIN.md's classic
/// defaults: 15 min, 30 min, 1 h, 4 h, then every 4 h; expiry after 5 days; a "delayed"
/// DSN after 4 h when the sender asked for one.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The wait after the first, second, ... failed attempt; the last repeats.
    pub intervals: Vec<Duration>,
    /// Up to this fraction of an interval is added at random, so entries that failed
    /// together do not all come back in the same second.
    pub jitter: f64,
    /// Give up (and send a failure DSN) this long after the message was accepted.
    pub expire_after: Duration,
    /// Send a "delayed" DSN once a message has waited this long.
    pub delay_notice_after: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            intervals: vec![
                Duration::from_secs(15 * 60),
                Duration::from_secs(30 * 60),
                Duration::from_secs(60 * 60),
                Duration::from_secs(4 * 60 * 60),
            ],
            jitter: 0.1,
            expire_after: Duration::from_secs(5 * 24 * 60 * 60),
            delay_notice_after: Duration::from_secs(4 * 60 * 60),
        }
    }
}

impl Schedule {
    /// The wait after `failed_attempts` failures (1 for the first), jitter included.
    pub fn wait_after(&self, failed_attempts: u32) -> Duration {
        let index =
            (failed_attempts.max(1) as usize - 1).min(self.intervals.len().saturating_sub(1));
        let base = self
            .intervals
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(15 * 60));
        let mut random = [0u8; 8];
        let _ = getrandom::fill(&mut random);
        let unit = (u64::from_le_bytes(random) >> 11) as f64 / (1u64 << 53) as f64;
        base + base.mul_f64(self.jitter.clamp(0.0, 1.0) * unit)
    }

    /// When a message accepted at `received_at_ms` expires.
    pub fn expires_at_ms(&self, received_at_ms: i64) -> i64 {
        received_at_ms + self.expire_after.as_millis() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_intervals_then_every_four_hours_with_bounded_jitter() {
        let s = Schedule::default();
        let minutes = |n: u32| s.wait_after(n).as_secs_f64() / 60.0;
        for _ in 0..50 {
            assert!((15.0..=16.5).contains(&minutes(1)));
            assert!((30.0..=33.0).contains(&minutes(2)));
            assert!((60.0..=66.0).contains(&minutes(3)));
            assert!((240.0..=264.0).contains(&minutes(4)));
            assert!((240.0..=264.0).contains(&minutes(9)));
        }
    }

    #[test]
    fn the_clock_moves_only_forward_by_what_it_is_told() {
        let clock = Clock::default();
        let before = clock.now_ms();
        clock.advance(Duration::from_secs(3600));
        let after = clock.now_ms();
        assert!(after - before >= 3_600_000 && after - before < 3_610_000);
    }
}
