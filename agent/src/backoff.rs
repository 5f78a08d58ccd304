//! Reconnect delays: exponential with jitter, capped, never giving up.

use std::time::Duration;

/// The first delay is between half of this and this.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Exponential backoff with "equal jitter": each delay is half the current
/// step plus a random part of the other half, so agents that lost the same
/// edge do not reconnect in lockstep.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next delay; `jitter` is uniform in `[0, 1)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = BACKOFF_START
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// After a session that worked, start again from the shortest delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_under_200ms_to_the_cap() {
        let mut b = Backoff::new();
        let first = b.next_delay(0.999);
        assert!(
            first <= Duration::from_millis(100) && first >= Duration::from_millis(50),
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..40 {
            last = b.next_delay(0.999);
            assert!(last <= BACKOFF_CAP);
        }
        assert!(last >= BACKOFF_CAP / 2, "{last:?}");
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }
}
